//go:build linux

package nbdkernel

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"testing"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/blockdev/blockdevtest"
	"github.com/lupool/lupool/server/nbd"
	"github.com/lupool/lupool/server/nbdproto"
	"golang.org/x/sys/unix"
)

// TestKernelSocketProxy checks the socket-pair path used for TLS: bytes
// the kernel end writes reach the connection and back, and releasing it
// closes the connection.
func TestKernelSocketProxy(t *testing.T) {
	client, server := net.Pipe()
	defer server.Close()
	f, release, err := kernelSocket(client, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write([]byte("request")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 7)
	_ = server.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(server, buf); err != nil || string(buf) != "request" {
		t.Fatalf("server got %q, %v", buf, err)
	}
	if _, err := server.Write([]byte("reply")); err != nil {
		t.Fatal(err)
	}
	buf = make([]byte, 5)
	if _, err := io.ReadFull(f, buf); err != nil || string(buf) != "reply" {
		t.Fatalf("kernel end got %q, %v", buf, err)
	}
	release()
	if _, err := server.Read(buf); err == nil {
		t.Error("connection still open after release")
	}
}

// TestKernelSocketTCP checks a plain TCP connection is handed over as a
// blocking socket.
func TestKernelSocketTCP(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		c, err := l.Accept()
		if err == nil {
			c.Write([]byte("x"))
			c.Close()
		}
	}()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	f, release, err := kernelSocket(c, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	flags, err := unix.FcntlInt(f.Fd(), unix.F_GETFL, 0)
	if err != nil {
		t.Fatal(err)
	}
	if flags&unix.O_NONBLOCK != 0 {
		t.Error("socket for the kernel is non-blocking")
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		t.Errorf("kernel file is not a socket: mode %#o %v", st.Mode, err)
	}
}

// kernelTwin stands in for the kernel driver: it records the ioctls and, in
// NBD_DO_IT, speaks the transmission phase over the socket it was given in
// NBD_SET_SOCK, as the kernel would: a WRITE, a READ, then NBD_CMD_DISC.
type kernelTwin struct {
	t        *testing.T
	sockFD   int
	sizeBlks uintptr
	blkBytes uintptr
	readBack []byte
}

var _ kernelDevice = (*kernelTwin)(nil)

func (k *kernelTwin) ioctl(req uint, arg uintptr) error {
	switch req {
	case nbdSetSock:
		fd, err := unix.Dup(int(arg))
		if err != nil {
			return err
		}
		k.sockFD = fd
	case nbdSetBlockSize:
		k.blkBytes = arg
	case nbdSetSizeBlocks:
		k.sizeBlks = arg
	case nbdDoIt:
		return k.serve()
	}
	return nil
}

func (k *kernelTwin) serve() error {
	f := os.NewFile(uintptr(k.sockFD), "twin")
	defer f.Close()
	if err := k.io(f); err != nil {
		return err
	}
	b := make([]byte, nbdproto.RequestSize)
	nbdproto.PutRequest(b, nbdproto.Request{Type: nbdproto.CmdDisc, Handle: 3})
	_, err := f.Write(b)
	return err
}

func (k *kernelTwin) io(f *os.File) error {
	send := func(cmd uint16, handle, off uint64, payload []byte, length uint32) error {
		b := make([]byte, nbdproto.RequestSize)
		nbdproto.PutRequest(b, nbdproto.Request{Type: cmd, Handle: handle, Offset: off, Length: length})
		_, err := f.Write(append(b, payload...))
		return err
	}
	reply := func(handle uint64, data int) ([]byte, error) {
		b := make([]byte, nbdproto.SimpleReplySize+data)
		if _, err := io.ReadFull(f, b); err != nil {
			return nil, err
		}
		r, err := nbdproto.ParseSimpleReply(b)
		if err != nil || r.Handle != handle || r.Error != 0 {
			return nil, fmt.Errorf("reply %+v %v", r, err)
		}
		return b[nbdproto.SimpleReplySize:], nil
	}
	payload := []byte("written by the kernel twin")
	if err := send(nbdproto.CmdWrite, 1, 8192, payload, uint32(len(payload))); err != nil {
		return err
	}
	if _, err := reply(1, 0); err != nil {
		return err
	}
	if err := send(nbdproto.CmdRead, 2, 8192, nil, uint32(len(payload))); err != nil {
		return err
	}
	got, err := reply(2, len(payload))
	if err != nil {
		return err
	}
	k.readBack = got
	return nil
}

func (k *kernelTwin) Close() error { return nil }

// TestAttachHandsOverSocket runs Attach with the real socket handover
// (plain TCP, and the TLS proxy) and a kernel twin that does I/O through
// the handed-over socket.
func TestAttachHandsOverSocket(t *testing.T) {
	serverCfg, pool := testCert(t)
	for _, tc := range []struct {
		name string
		mode nbd.TLSMode
		cfg  *tls.Config
	}{
		{"tcp", nbd.TLSOff, nil},
		{"tls", nbd.TLSRequired, &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dev := blockdevtest.NewMem(6<<20, blockdev.Caps{})
			addr := startEngine(t, tc.mode, serverCfg, nbd.Export{Name: "mem", Device: dev})
			twin := &kernelTwin{t: t}
			p := platform{
				check:  func(string) error { return nil },
				open:   func(string) (kernelDevice, error) { return twin, nil },
				socket: kernelSocket,
			}
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			opts := Options{Addr: addr, Export: "mem", Device: "/dev/nbd1", TLSConfig: tc.cfg}
			if err := attach(ctx, opts, p); err != nil {
				t.Fatalf("attach: %v", err)
			}
			want := "written by the kernel twin"
			if string(twin.readBack) != want {
				t.Errorf("twin read back %q", twin.readBack)
			}
			if got := dev.Bytes()[8192 : 8192+len(want)]; string(got) != want {
				t.Errorf("device holds %q", got)
			}
			if twin.blkBytes != 4096 || twin.sizeBlks != (6<<20)/4096 {
				t.Errorf("block size %d, %d blocks", twin.blkBytes, twin.sizeBlks)
			}
		})
	}
}
