package nbd

import (
	"io"
	"net"
	"testing"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/server/nbdproto"
)

// benchClient issues requests with preallocated buffers so that it does not
// allocate itself; what is measured is the server.
type benchClient struct {
	conn  net.Conn
	req   [nbdproto.RequestSize]byte
	reply [nbdproto.SimpleReplySize]byte
	data  []byte
}

func newBenchClient(tb testing.TB, addr string, size int) *benchClient {
	return newBenchClientExport(tb, addr, "disk", size)
}

func newBenchClientExport(tb testing.TB, addr, export string, size int) *benchClient {
	c := dialRaw(tb, addr)
	c.attach(export, false)
	if c.r.Buffered() != 0 {
		tb.Fatal("unread bytes after handshake")
	}
	return &benchClient{conn: c.conn, data: make([]byte, size)}
}

// send sends one read or write request.
func (c *benchClient) send(typ uint16, handle, off uint64) error {
	nbdproto.PutRequest(c.req[:], nbdproto.Request{Type: typ, Handle: handle, Offset: off, Length: uint32(len(c.data))})
	if _, err := c.conn.Write(c.req[:]); err != nil {
		return err
	}
	if typ == nbdproto.CmdWrite {
		_, err := c.conn.Write(c.data)
		return err
	}
	return nil
}

// recv reads one reply (with data for a read).
func (c *benchClient) recv(typ uint16) error {
	if _, err := io.ReadFull(c.conn, c.reply[:]); err != nil {
		return err
	}
	if c.reply[7] != 0 {
		return io.ErrUnexpectedEOF
	}
	if typ == nbdproto.CmdRead {
		_, err := io.ReadFull(c.conn, c.data)
		return err
	}
	return nil
}

func (c *benchClient) roundTrip(typ uint16, handle, off uint64) error {
	if err := c.send(typ, handle, off); err != nil {
		return err
	}
	return c.recv(typ)
}

// TestHotPathAllocations checks that a 4 KiB read or write, after warm-up,
// makes no heap allocation anywhere in the process (server included), with
// metrics on.
func TestHotPathAllocations(t *testing.T) {
	ts := startServer(t, blockdev.Caps{}, func(o *Options) { o.Metrics = NewMetrics() })
	c := newBenchClient(t, ts.addr, 4096)
	for _, typ := range []uint16{nbdproto.CmdRead, nbdproto.CmdWrite} {
		var err error
		for i := range 200 { // warm up pools, workers and metric children
			err = c.roundTrip(typ, uint64(i), uint64(i%64)*4096)
		}
		n := 0
		allocs := testing.AllocsPerRun(500, func() {
			if e := c.roundTrip(typ, 1, uint64(n%64)*4096); e != nil {
				err = e
			}
			n++
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%s: %.2f allocations per 4 KiB request", nbdproto.CommandName(typ), allocs)
		// A stray allocation from the runtime (timers, netpoll) is tolerated
		// on average; one per request is a regression.
		if allocs >= 0.5 {
			t.Errorf("%s: %.2f allocations per 4 KiB request, want 0", nbdproto.CommandName(typ), allocs)
		}
	}
}

func benchmarkRoundTrip(b *testing.B, typ uint16, size, depth int) {
	ts := startServer(b, blockdev.Caps{}, func(o *Options) { o.Metrics = NewMetrics() })
	c := newBenchClient(b, ts.addr, size)
	slots := uint64(testSizeBytes / size)
	for i := range 100 {
		if err := c.roundTrip(typ, uint64(i), uint64(i)%slots*uint64(size)); err != nil {
			b.Fatal(err)
		}
	}
	b.SetBytes(int64(size))
	b.ReportAllocs()
	b.ResetTimer()
	errc := make(chan error, 1)
	sent := make(chan struct{}, depth)
	go func() {
		for i := range b.N {
			sent <- struct{}{}
			if err := c.send(typ, uint64(i), uint64(i)%slots*uint64(size)); err != nil {
				errc <- err
				return
			}
		}
		errc <- nil
	}()
	for range b.N {
		if err := c.recv(typ); err != nil {
			b.Fatal(err)
		}
		<-sent
	}
	if err := <-errc; err != nil {
		b.Fatal(err)
	}
}

func BenchmarkServer(b *testing.B) {
	for _, bc := range []struct {
		name        string
		typ         uint16
		size, depth int
	}{
		{"read/4KiB/qd1", nbdproto.CmdRead, 4096, 1},
		{"read/4KiB/qd32", nbdproto.CmdRead, 4096, 32},
		{"write/4KiB/qd1", nbdproto.CmdWrite, 4096, 1},
		{"write/4KiB/qd32", nbdproto.CmdWrite, 4096, 32},
		{"read/1MiB/qd4", nbdproto.CmdRead, 1 << 20, 4},
		{"write/1MiB/qd4", nbdproto.CmdWrite, 1 << 20, 4},
	} {
		b.Run(bc.name, func(b *testing.B) { benchmarkRoundTrip(b, bc.typ, bc.size, bc.depth) })
	}
}
