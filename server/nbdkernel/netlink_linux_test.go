//go:build linux

package nbdkernel

import (
	"context"
	"encoding/binary"
	"errors"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/blockdev/blockdevtest"
	"github.com/lupool/lupool/server/nbd"
	"github.com/lupool/lupool/server/nbdproto"
)

// nlTwin stands in for the kernel's nbd netlink family. NBD_CMD_CONNECT is
// decoded from the bytes Attach encoded and refused as the kernel refuses
// it (EINVAL for missing attributes, EBUSY for a device in use); the socket
// it names is then served like kernelTwin does in NBD_DO_IT (a WRITE, a
// READ), and, with detach, NBD_CMD_DISC follows and the device reads as
// disconnected, as after `nbd-client -d`.
type nlTwin struct {
	t      *testing.T
	detach bool

	mu        sync.Mutex
	connected map[uint32]bool // guarded by mu
	cmds      []uint8         // guarded by mu
	got       nlConnect       // guarded by mu
	readBack  []byte          // guarded by mu
	served    chan error
}

var _ nlConn = (*nlTwin)(nil)

func newNLTwin(t *testing.T, detach bool) *nlTwin {
	return &nlTwin{t: t, detach: detach, connected: map[uint32]bool{}, served: make(chan error, 1)}
}

func (k *nlTwin) execute(cmd uint8, attrs []byte) ([][]byte, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.cmds = append(k.cmds, cmd)
	switch cmd {
	case nlCmdConnect:
		c, err := decodeConnect(attrs)
		if err != nil {
			return nil, syscall.EINVAL
		}
		if k.connected[c.Index] {
			return nil, syscall.EBUSY
		}
		fd, err := unix.Dup(int(c.SocketFDs[0]))
		if err != nil {
			return nil, err
		}
		k.got, k.connected[c.Index] = c, true
		go k.serve(c.Index, fd)
		return nil, nil
	case nlCmdDisconnect, nlCmdStatus:
		ad, err := netlink.NewAttributeDecoder(attrs)
		if err != nil {
			return nil, err
		}
		var index uint32
		for ad.Next() {
			if ad.Type() == nlAttrIndex {
				index = ad.Uint32()
			}
		}
		if cmd == nlCmdDisconnect {
			k.connected[index] = false
			return nil, nil
		}
		return [][]byte{k.statusLocked(index)}, nil
	}
	return nil, syscall.EOPNOTSUPP
}

func (k *nlTwin) statusLocked(index uint32) []byte {
	ae := netlink.NewAttributeEncoder()
	ae.Nested(nlAttrDeviceList, func(le *netlink.AttributeEncoder) error {
		for _, idx := range []uint32{index + 1, index} { // another device first
			le.Nested(nlDeviceItem, func(de *netlink.AttributeEncoder) error {
				de.Uint32(nlDeviceIndex, idx)
				conn := uint8(0)
				if k.connected[idx] {
					conn = 1
				}
				de.Uint8(nlDeviceConnected, conn)
				return nil
			})
		}
		return nil
	})
	b, err := ae.Encode()
	if err != nil {
		k.t.Error(err)
	}
	return b
}

func (k *nlTwin) serve(index uint32, fd int) {
	tw := &kernelTwin{t: k.t, sockFD: fd}
	if !k.detach {
		// Do the I/O but keep the device attached (the socket open)
		// until the test ends.
		f := os.NewFile(uintptr(fd), "twin")
		k.t.Cleanup(func() { f.Close() })
		err := tw.io(f)
		k.mu.Lock()
		k.readBack = tw.readBack
		k.mu.Unlock()
		k.served <- err
		return
	}
	err := tw.serve()
	k.mu.Lock()
	k.readBack = tw.readBack
	k.connected[index] = false
	k.mu.Unlock()
	k.served <- err
}

func (k *nlTwin) Close() error { return nil }

func (k *nlTwin) commands() []uint8 {
	k.mu.Lock()
	defer k.mu.Unlock()
	return append([]uint8(nil), k.cmds...)
}

func netlinkPlatform(tw *nlTwin, dev kernelDevice) platform {
	return platform{
		check:   func(string) error { return nil },
		open:    func(string) (kernelDevice, error) { return dev, nil },
		socket:  kernelSocket,
		netlink: func() (nlConn, error) { return tw, nil },
	}
}

// TestAttachNetlink: Attach configures the device with NBD_CMD_CONNECT
// (block size, size, flags, the request timeout, the dead-connection
// timeout, the handed-over socket), the kernel twin does I/O through that
// socket, and Attach returns once the device reads as disconnected.
func TestAttachNetlink(t *testing.T) {
	dev := blockdevtest.NewMem(6<<20, blockdev.Caps{})
	addr := startEngine(t, nbd.TLSOff, nil, nbd.Export{Name: "mem", Device: dev})
	tw := newNLTwin(t, true)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	opts := Options{Addr: addr, Export: "mem", Device: "/dev/nbd7", NoIOTimeout: true}
	if err := attach(ctx, opts, netlinkPlatform(tw, nil)); err != nil {
		t.Fatalf("attach: %v", err)
	}
	if err := <-tw.served; err != nil {
		t.Fatalf("twin I/O: %v", err)
	}
	want := "written by the kernel twin"
	if string(tw.readBack) != want || string(dev.Bytes()[8192:8192+len(want)]) != want {
		t.Fatalf("twin read back %q; device holds %q", tw.readBack, dev.Bytes()[8192:8192+len(want)])
	}
	g := tw.got
	flags := uint64(nbdproto.TxFlagHasFlags | nbdproto.TxFlagSendFlush | nbdproto.TxFlagSendFUA)
	if g.Index != 7 || g.BlockBytes != 4096 || g.SizeBytes != 6<<20 || g.TimeoutSeconds != 0 ||
		g.DeadConnSecs != uint64(DefaultDeadConnTimeout/time.Second) || g.ServerFlags&flags != flags || len(g.SocketFDs) != 1 {
		t.Fatalf("NBD_CMD_CONNECT carried %+v", g)
	}
	if cmds := tw.commands(); cmds[0] != nlCmdConnect || cmds[len(cmds)-1] != nlCmdStatus {
		t.Fatalf("commands %v: want connect first, a status poll last", cmds)
	}
}

// TestAttachNetlinkCancel: when ctx ends, Attach sends NBD_CMD_DISCONNECT
// for its device and returns ctx's error; a second Attach to a device in
// use gets a message that says how to free it.
func TestAttachNetlinkCancel(t *testing.T) {
	dev := blockdevtest.NewMem(6<<20, blockdev.Caps{})
	addr := startEngine(t, nbd.TLSOff, nil, nbd.Export{Name: "mem", Device: dev})
	tw := newNLTwin(t, false)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	opts := Options{Addr: addr, Export: "mem", Device: "/dev/nbd2", IOTimeout: 1500 * time.Millisecond, DeadConnTimeout: 45 * time.Second}
	go func() { done <- attach(ctx, opts, netlinkPlatform(tw, nil)) }()
	select {
	case err := <-tw.served:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the twin never served I/O")
	}
	busyCtx, busyCancel := context.WithTimeout(context.Background(), 10*time.Second)
	err := attach(busyCtx, opts, netlinkPlatform(tw, nil))
	busyCancel()
	if !errors.Is(err, syscall.EBUSY) || !strings.Contains(err.Error(), "nbd-client -d /dev/nbd2") {
		t.Fatalf("second attach = %v, want EBUSY with a hint", err)
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("attach = %v, want context.Canceled", err)
	}
	cmds := tw.commands()
	if cmds[len(cmds)-1] != nlCmdDisconnect {
		t.Fatalf("commands %v: want NBD_CMD_DISCONNECT last", cmds)
	}
	if tw.got.TimeoutSeconds != 2 || tw.got.DeadConnSecs != 45 {
		t.Fatalf("timeouts %+v, want 2 s and 45 s", tw.got)
	}
}

// TestAttachNetlinkFallsBackToIoctls: a kernel without the family gets the
// ioctls.
func TestAttachNetlinkFallsBackToIoctls(t *testing.T) {
	dev := blockdevtest.NewMem(6<<20, blockdev.Caps{})
	addr := startEngine(t, nbd.TLSOff, nil, nbd.Export{Name: "mem", Device: dev})
	twin := &kernelTwin{t: t}
	p := netlinkPlatform(nil, twin)
	p.netlink = func() (nlConn, error) { return nil, errNoNetlinkFamily }
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := attach(ctx, Options{Addr: addr, Export: "mem", Device: "/dev/nbd1"}, p); err != nil {
		t.Fatalf("attach: %v", err)
	}
	if twin.blkBytes != 4096 || string(twin.readBack) != "written by the kernel twin" {
		t.Fatalf("ioctl path not taken: %+v", twin)
	}
	p.netlink = func() (nlConn, error) { return nil, errors.New("netlink socket: permission denied") }
	if err := attach(ctx, Options{Addr: addr, Export: "mem", Device: "/dev/nbd1"}, p); err == nil || !strings.Contains(err.Error(), "permission denied") {
		t.Fatalf("attach with a broken netlink socket = %v, want its error", err)
	}
}

// TestNetlinkConnectArgumentErrors: every value the kernel would refuse
// with a bare EINVAL (or accept and misbehave on) is refused before the
// call, with a message that names it.
func TestNetlinkConnectArgumentErrors(t *testing.T) {
	ok := nlConnect{Index: 0, SizeBytes: 1 << 20, BlockBytes: 4096, DeadConnSecs: 60, SocketFDs: []uint32{3}}
	if _, err := ok.encode(); err != nil {
		t.Fatalf("a good config refused: %v", err)
	}
	for _, tc := range []struct {
		mut  func(*nlConnect)
		want string
	}{
		{func(c *nlConnect) { c.Index = nlMaxIndex + 1 }, "device index"},
		{func(c *nlConnect) { c.BlockBytes = 1000 }, "block size 1000"},
		{func(c *nlConnect) { c.BlockBytes = 8192 }, "block size 8192"},
		{func(c *nlConnect) { c.SizeBytes = 2048 }, "smaller than one block"},
		{func(c *nlConnect) { c.SocketFDs = nil }, "no socket"},
		{func(c *nlConnect) { c.SocketFDs = make([]uint32, nlMaxSockets+1) }, "sockets, at most"},
		{func(c *nlConnect) { c.DeadConnSecs = 0 }, "dead-connection timeout of 0"},
	} {
		c := ok
		c.SocketFDs = append([]uint32(nil), ok.SocketFDs...)
		tc.mut(&c)
		_, err := c.encode()
		if !errors.Is(err, ErrInvalidOptions) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want ErrInvalidOptions naming %q", c, err, tc.want)
		}
	}
	if err := (&Options{Addr: "x:1", Device: "/dev/nbd0", DeadConnTimeout: -time.Second}).validate(); !errors.Is(err, ErrInvalidOptions) {
		t.Errorf("negative DeadConnTimeout: %v", err)
	}
	// What encode writes, the kernel's side reads back the same.
	b, _ := ok.encode()
	back, err := decodeConnect(b)
	if err != nil || back.SizeBytes != ok.SizeBytes || back.DeadConnSecs != 60 || back.SocketFDs[0] != 3 {
		t.Fatalf("round trip %+v, %v", back, err)
	}
}

// TestDialNetlinkFamily asks this machine's kernel, over a real generic
// netlink socket, for the nbd family: it is there exactly when the nbd
// module is loaded, and its absence is errNoNetlinkFamily (which makes
// Attach use the ioctls), not some other failure.
func TestDialNetlinkFamily(t *testing.T) {
	_, statErr := os.Stat("/sys/module/nbd")
	loaded := statErr == nil
	c, err := dialNetlink()
	switch {
	case loaded && err != nil:
		t.Fatalf("nbd module loaded, but dialNetlink = %v", err)
	case loaded:
		c.Close()
	case !errors.Is(err, errNoNetlinkFamily):
		t.Fatalf("no nbd module: dialNetlink = %v, want errNoNetlinkFamily", err)
	}
	t.Logf("nbd module loaded: %v; dialNetlink: %v", loaded, err)
}

// FuzzDecodeStatus: any reply to NBD_CMD_STATUS is decoded or refused,
// never a panic; a device is reported connected only when the reply names
// it with a non-zero connected attribute.
func FuzzDecodeStatus(f *testing.F) {
	tw := &nlTwin{connected: map[uint32]bool{4: true}}
	f.Add(tw.statusLocked(4), uint32(4))
	f.Add(tw.statusLocked(9), uint32(9))
	f.Add([]byte{4, 0, 9, 0}, uint32(0))
	f.Fuzz(func(t *testing.T, b []byte, index uint32) {
		connected, err := decodeStatus(b, index)
		if err != nil && connected {
			t.Fatalf("connected with an error: %v", err)
		}
		if connected && !containsUint32(b, index) {
			t.Fatalf("device %d connected, but the reply never names it: %x", index, b)
		}
	})
}

// containsUint32 reports whether b holds v's native-endian bytes anywhere.
func containsUint32(b []byte, v uint32) bool {
	var w [4]byte
	binary.NativeEndian.PutUint32(w[:], v)
	return strings.Contains(string(b), string(w[:]))
}
