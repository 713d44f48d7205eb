//go:build linux

package endpoint

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/blockdev/blockdevtest"
	"github.com/lupool/lupool/server/nbd"
	"github.com/lupool/lupool/server/nbdkernel"
	"github.com/lupool/lupool/server/nbdproto"
)

// TestKernelSocketPair is the path of `lupool attach LU /dev/nbdX` up to
// the ioctls: the kernel's end of a socket pair negotiates as the kernel
// client does (nbdkernel.Negotiate: simple replies), the engine serves the
// other end over the endpoint, and a request sent while the node is down
// is answered once it is back, on the same socket.
func TestKernelSocketPair(t *testing.T) {
	dev := blockdevtest.NewMem(testSizeBytes, blockdev.Caps{})
	a := newNode(t, "a", dev, "a@1")
	d := newDevice(t, Options{}, a)
	kernelEnd, serverEnd, err := nbdkernel.SocketPair()
	if err != nil {
		t.Fatal(err)
	}
	defer kernelEnd.Close()
	es := nbd.NewExportSet()
	if err := es.Add(nbd.Export{Name: "lu", Device: d}); err != nil {
		t.Fatal(err)
	}
	srv, err := nbd.NewServer(nbd.Options{Exports: es})
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(NewConnListener(serverEnd)) }()
	defer func() {
		_ = srv.Shutdown(context.Background())
		if err := <-served; !errors.Is(err, nbd.ErrServerClosed) {
			t.Errorf("Serve: %v", err)
		}
	}()
	c, info, err := nbdkernel.Negotiate(context.Background(), kernelEnd, "lu", nil)
	if err != nil {
		t.Fatal(err)
	}
	// The kernel sends FLUSH and TRIM only when these flags are set.
	want := nbdproto.TxFlagHasFlags | nbdproto.TxFlagSendFlush | nbdproto.TxFlagSendFUA | nbdproto.TxFlagSendTrim
	if info.SizeBytes != testSizeBytes || info.TransmissionFlags&want != want {
		t.Fatalf("export %+v, want %d bytes and flags %#x", info, testSizeBytes, want)
	}
	request := func(typ uint16, handle uint64, off uint64, payload []byte, readLen uint32) {
		t.Helper()
		b := make([]byte, nbdproto.RequestSize, nbdproto.RequestSize+len(payload))
		n := uint32(len(payload))
		if typ == nbdproto.CmdRead {
			n = readLen
		}
		nbdproto.PutRequest(b, nbdproto.Request{Type: typ, Handle: handle, Offset: off, Length: n})
		if _, err := c.Write(append(b, payload...)); err != nil {
			t.Fatal(err)
		}
	}
	// reply reads one reply, in any order; read (handle 3) carries data.
	reply := func(dataLen int) (uint64, []byte) {
		t.Helper()
		_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
		b := make([]byte, nbdproto.SimpleReplySize)
		if _, err := io.ReadFull(c, b); err != nil {
			t.Fatal(err)
		}
		r, err := nbdproto.ParseSimpleReply(b)
		if err != nil || r.Error != 0 {
			t.Fatalf("reply %+v %v, want no error", r, err)
		}
		if r.Handle != 3 {
			return r.Handle, nil
		}
		data := make([]byte, dataLen)
		if _, err := io.ReadFull(c, data); err != nil {
			t.Fatal(err)
		}
		return r.Handle, data
	}
	data := bytes.Repeat([]byte("kernel"), 1000)
	request(nbdproto.CmdWrite, 1, 8192, data, 0)
	if h, _ := reply(0); h != 1 {
		t.Fatalf("reply for handle %d, want 1", h)
	}
	a.stop()
	request(nbdproto.CmdFlush, 2, 0, nil, 0)
	request(nbdproto.CmdRead, 3, 8192, nil, uint32(len(data)))
	_ = c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, errTimeout(err)) {
		t.Fatalf("a reply while the node is down: %v", err)
	}
	a.start()
	got := map[uint64][]byte{}
	for range 2 {
		h, b := reply(len(data))
		got[h] = b
	}
	if _, ok := got[2]; !ok || !bytes.Equal(got[3], data) {
		t.Errorf("replies %v, want the flush (2) and the read (3) of what was written", got)
	}
}

// errTimeout returns err when it is a timeout, else a sentinel it is not.
func errTimeout(err error) error {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return err
	}
	return errors.New("not a timeout")
}
