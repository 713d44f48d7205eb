package nbd

import (
	"bytes"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/blockdev/blockdevtest"
	"github.com/lupool/lupool/server/nbdproto"
)

// TestInline runs the transmission tests again with "disk" served as an
// InlineDevice, so that the reader runs its requests itself.
func TestInline(t *testing.T) { rerunTransmissionTests(t, &testInline) }

// rerunTransmissionTests runs the transmission tests with *mode set, which
// makes startServer serve "disk" another way.
func rerunTransmissionTests(t *testing.T, mode *bool) {
	tests := []struct {
		name string
		fn   func(*testing.T)
	}{
		{"ReadWriteSimple", TestReadWriteSimple},
		{"Validation", TestValidation},
		{"WriteTooLargeClosesOnlyThatConnection", TestWriteTooLargeClosesOnlyThatConnection},
		{"StructuredReplies", TestStructuredReplies},
		{"DeviceErrorsKeepConnection", TestDeviceErrorsKeepConnection},
		{"DisconnectExport", TestDisconnectExport},
		{"HostileTransmission", TestHostileTransmission},
		{"NoGoroutineGrowth", TestNoGoroutineGrowth},
		{"HotPathAllocations", TestHotPathAllocations},
		{"MetricsAndConnStats", TestMetricsAndConnStats},
	}
	*mode = true
	t.Cleanup(func() { *mode = false })
	for _, tc := range tests {
		t.Run(tc.name, tc.fn)
	}
}

// TestInlineFlushesBeforeBlocking checks that the reader sends the replies
// it holds back before it waits for the rest of a request: a client that
// waits for a reply before finishing the next request must get it.
func TestInlineFlushesBeforeBlocking(t *testing.T) {
	testInline = true
	ts := startServer(t, blockdev.Caps{}, nil)
	testInline = false
	data := pattern(4096, 5)
	header := func(typ uint16, handle, off uint64, length uint32) []byte {
		b := make([]byte, nbdproto.RequestSize)
		nbdproto.PutRequest(b, nbdproto.Request{Type: typ, Handle: handle, Offset: off, Length: length})
		return b
	}
	for _, tc := range []struct {
		name        string
		first, rest []byte // the second request, split
	}{
		{"partial header", header(nbdproto.CmdWrite, 2, 8192, 4096)[:10],
			append(header(nbdproto.CmdWrite, 2, 8192, 4096)[10:], data...)},
		{"partial payload", append(header(nbdproto.CmdWrite, 2, 8192, 4096), data[:1000]...), data[1000:]},
		{"no payload yet", header(nbdproto.CmdWrite, 2, 8192, 4096), data},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := dialRaw(t, ts.addr)
			c.attach("disk", false)
			c.send(header(nbdproto.CmdWrite, 1, 0, 4096), data, tc.first)
			_ = c.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
			if h, code, _ := c.simpleReply(0); h != 1 || code != 0 {
				t.Fatalf("first write: handle %d %s", h, errName(code))
			}
			c.send(tc.rest)
			if h, code, _ := c.simpleReply(0); h != 2 || code != 0 {
				t.Fatalf("second write: handle %d %s", h, errName(code))
			}
			if !bytes.Equal(ts.mem.Bytes()[8192:8192+4096], data) {
				t.Fatal("second write did not land")
			}
		})
	}
}

// countingConn counts the writes of replies.
type countingConn struct {
	net.Conn
	writes *atomic.Int64
}

func (c countingConn) Write(p []byte) (int, error) {
	c.writes.Add(1)
	return c.Conn.Write(p)
}

type countingListener struct {
	net.Listener
	writes atomic.Int64
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return countingConn{Conn: c, writes: &l.writes}, nil
}

// TestInlineBatchesReplies sends bursts of pipelined requests, small and
// large (large ones go to workers), to an InlineDevice: every reply must
// come back with the right data, and the replies of a burst of small reads
// must share a few writes instead of one each.
func TestInlineBatchesReplies(t *testing.T) {
	mem := blockdevtest.NewMem(testSizeBytes, blockdev.Caps{})
	set := NewExportSet()
	if err := set.Add(Export{Name: "disk", Device: inlineMem{mem}}); err != nil {
		t.Fatal(err)
	}
	srv, err := NewServer(Options{Exports: set})
	if err != nil {
		t.Fatal(err)
	}
	l0, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := &countingListener{Listener: l0}
	serveUntilCleanup(t, srv, l)
	c := dialRaw(t, l0.Addr().String())
	c.attach("disk", false)

	// Writes of 4 KiB, of 100 KiB (inline, but larger than the reader's
	// and the writer's buffers) and of 256 KiB (above InlineMaxBytes, run
	// by a worker) in one burst.
	const burst = 32
	if 256<<10 <= InlineMaxBytes || 100<<10 > InlineMaxBytes || 100<<10 <= readBufferBytes || 100<<10 <= writeBufferBytes {
		t.Fatal("the request sizes no longer cover every path")
	}
	sizes := func(i int) int {
		switch i % 8 {
		case 3:
			return 100 << 10
		case 7:
			return 256 << 10
		}
		return 4096
	}
	offset := func(i int) uint64 { return uint64(i) * (512 << 10) }
	var req bytes.Buffer
	want := map[uint64][]byte{}
	for i := range burst {
		data := pattern(sizes(i), byte(i))
		b := make([]byte, nbdproto.RequestSize)
		nbdproto.PutRequest(b, nbdproto.Request{Type: nbdproto.CmdWrite, Handle: uint64(i), Offset: offset(i), Length: uint32(len(data))})
		req.Write(b)
		req.Write(data)
		want[uint64(i)] = data
	}
	go func() { _, _ = c.conn.Write(req.Bytes()) }()
	for range burst {
		h, code, _ := c.simpleReply(0)
		if code != 0 || want[h] == nil {
			t.Fatalf("write reply: handle %d %s", h, errName(code))
		}
		delete(want, h)
	}

	// Reads of the same ranges, in one burst.
	req.Reset()
	for i := range burst {
		b := make([]byte, nbdproto.RequestSize)
		nbdproto.PutRequest(b, nbdproto.Request{Type: nbdproto.CmdRead, Handle: uint64(i), Offset: offset(i), Length: uint32(sizes(i))})
		req.Write(b)
	}
	c.send(req.Bytes())
	for range burst {
		r, err := nbdproto.ParseSimpleReply(c.read(nbdproto.SimpleReplySize))
		if err != nil || r.Error != 0 || r.Handle >= burst {
			t.Fatalf("read reply %+v: %v", r, err)
		}
		i := int(r.Handle)
		if got := c.read(sizes(i)); !bytes.Equal(got, pattern(sizes(i), byte(i))) {
			t.Fatalf("read %d: wrong data", i)
		}
	}

	// A burst of small reads only: a handful of writes carry the replies.
	req.Reset()
	for i := range burst {
		b := make([]byte, nbdproto.RequestSize)
		nbdproto.PutRequest(b, nbdproto.Request{Type: nbdproto.CmdRead, Handle: uint64(i), Offset: uint64(i) * 4096, Length: 4096})
		req.Write(b)
	}
	before := l.writes.Load()
	c.send(req.Bytes())
	for i := range burst {
		h, code, _ := c.simpleReply(4096)
		if h != uint64(i) || code != 0 {
			t.Fatalf("small read reply: handle %d %s, want handle %d in order", h, errName(code), i)
		}
	}
	// 32 replies of 4 KiB fill the 64 KiB writer about twice; allow for
	// the burst arriving in pieces.
	if n := l.writes.Load() - before; n > burst/4 {
		t.Errorf("%d writes for %d small read replies, want at most %d", n, burst, burst/4)
	}
}

// switchDevice is a gateDevice whose InlineIO answer can change.
type switchDevice struct {
	*gateDevice
	inline atomic.Bool
	asked  atomic.Int64
}

func (d *switchDevice) InlineIO() bool {
	d.asked.Add(1)
	return d.inline.Load()
}

// TestInlineAskedPerRequest checks that the engine asks InlineIO for each
// request, so that a device that starts to block (a mirror that gains a
// remote copy) gets its requests run by workers from then on.
func TestInlineAskedPerRequest(t *testing.T) {
	dev := &switchDevice{gateDevice: &gateDevice{Mem: blockdevtest.NewMem(1<<20, blockdev.Caps{}), gate: make(chan struct{})}}
	dev.inline.Store(true)
	ts := startServer(t, blockdev.Caps{}, nil, Export{Name: "switch", Device: dev})
	c := dialRaw(t, ts.addr)
	c.attach("switch", false)
	for i := range 4 {
		c.request(nbdproto.CmdRead, 0, uint64(i), 4096, 4096, nil)
		if h, code, _ := c.simpleReply(4096); h != uint64(i) || code != 0 {
			t.Fatalf("inline read: handle %d %s", h, errName(code))
		}
	}
	if n := dev.asked.Load(); n != 4 {
		t.Fatalf("InlineIO asked %d times for 4 reads", n)
	}
	// Now the device blocks: a read held at the gate must not hold up the
	// next one.
	dev.inline.Store(false)
	c.request(nbdproto.CmdRead, 0, 10, 0, 4096, nil)    // waits for the gate
	c.request(nbdproto.CmdRead, 0, 11, 4096, 4096, nil) // answered first
	if h, code, _ := c.simpleReply(4096); h != 11 || code != 0 {
		t.Fatalf("first reply: handle %d %s, want 11", h, errName(code))
	}
	close(dev.gate)
	if h, code, _ := c.simpleReply(4096); h != 10 || code != 0 {
		t.Fatalf("gated read: handle %d %s", h, errName(code))
	}
}
