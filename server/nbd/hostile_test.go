package nbd

import (
	"runtime"
	"testing"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/server/nbdproto"
)

// settleGoroutines waits until the goroutine count is at most base.
func settleGoroutines(t *testing.T, base int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		n := runtime.NumGoroutine()
		if n <= base {
			return
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d goroutines, baseline %d\n%s", n, base, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestHostileTransmission(t *testing.T) {
	ts := startServer(t, blockdev.Caps{}, func(o *Options) {
		o.MaxInflightRequests = 8
		o.MaxInflightBytes = 1 << 20
		o.ReplyTimeout = time.Second
	})
	base := runtime.NumGoroutine()

	// A client that disconnects in the middle of a write payload.
	c := dialRaw(t, ts.addr)
	c.attach("disk", false)
	c.request(nbdproto.CmdWrite, 0, 1, 0, 65536, make([]byte, 1000))
	_ = c.conn.Close()

	// A client that disconnects in the middle of a header.
	c = dialRaw(t, ts.addr)
	c.attach("disk", true)
	c.send([]byte{0x25, 0x60, 0x95})
	_ = c.conn.Close()

	// A client that sends many large reads and never reads the replies.
	stuck := dialRaw(t, ts.addr)
	stuck.attach("disk", false)
	go func() {
		var b [nbdproto.RequestSize]byte
		for i := range 4096 {
			nbdproto.PutRequest(b[:], nbdproto.Request{Type: nbdproto.CmdRead, Handle: uint64(i), Length: 1 << 20})
			if _, err := stuck.conn.Write(b[:]); err != nil {
				return
			}
		}
	}()
	// Meanwhile another client is served normally.
	ok := dialRaw(t, ts.addr)
	ok.attach("disk", false)
	for i := range 100 {
		if code := ok.do(nbdproto.CmdWrite, 0, uint64(i)*4096, 4096, pattern(4096, byte(i))); code != 0 {
			t.Fatalf("write %d: %s", i, errName(code))
		}
	}
	// The stuck connection holds at most its limits.
	for _, st := range ts.srv.ConnStats() {
		if st.InflightRequests > 8 {
			t.Errorf("%s has %d requests in flight, limit 8", st.RemoteAddr, st.InflightRequests)
		}
	}
	ok.request(nbdproto.CmdDisc, 0, 0, 0, 0, nil)
	ok.expectClosed()
	// The stuck client's connection is dropped by ReplyTimeout (without the
	// client reading anything).
	waitFor(t, func() bool { return ts.srv.Connections("disk") == 0 })
	_ = stuck.conn.Close()
	settleGoroutines(t, base)
}

// TestNoGoroutineGrowth churns connections and checks the server returns to
// its goroutine baseline.
func TestNoGoroutineGrowth(t *testing.T) {
	ts := startServer(t, blockdev.Caps{}, nil)
	base := runtime.NumGoroutine()
	rounds := 50
	if testing.Short() {
		rounds = 10
	}
	for i := range rounds {
		c := dialRaw(t, ts.addr)
		c.attach("disk", i%2 == 0)
		for j := range 16 {
			c.request(nbdproto.CmdRead, 0, uint64(j), uint64(j)*4096, 4096, nil)
		}
		if i%3 == 0 {
			c.request(nbdproto.CmdDisc, 0, 0, 0, 0, nil)
		}
		_ = c.conn.Close()
	}
	settleGoroutines(t, base)
	if n := len(ts.srv.ConnStats()); n != 0 {
		t.Fatalf("%d connections left", n)
	}
}
