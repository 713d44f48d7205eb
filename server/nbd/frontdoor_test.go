package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/server/nbdproto"
)

// lockedBuffer collects log output written from many goroutines.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// registeredMetrics returns fresh Metrics on their own registry.
func registeredMetrics(t *testing.T) (*Metrics, *prometheus.Registry) {
	t.Helper()
	m := NewMetrics()
	reg := prometheus.NewRegistry()
	for _, c := range m.Collectors() {
		if err := reg.Register(c); err != nil {
			t.Fatal(err)
		}
	}
	return m, reg
}

// greeted dials addr and reports whether the server sent its greeting
// (true) or closed the connection without a byte (false). A greeted
// connection is left open, and closed when the test ends. Safe to call from
// any goroutine.
func greeted(t *testing.T, addr string) (bool, error) {
	nc, err := net.Dial("tcp", addr)
	if errors.Is(err, syscall.ECONNRESET) {
		return false, nil // reset before connect returned: refused
	}
	if err != nil {
		return false, err
	}
	t.Cleanup(func() { _ = nc.Close() })
	_ = nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	var g [nbdproto.GreetingSize]byte
	n, err := io.ReadFull(nc, g[:])
	switch {
	case err == nil && string(g[:8]) == "NBDMAGIC":
		return true, nil
	case err == nil:
		return false, fmt.Errorf("greeting %q", g[:])
	case n == 0 && !isTimeout(err):
		return false, nil // EOF or reset: refused
	default:
		return false, fmt.Errorf("after %d greeting bytes: %w", n, err)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// TestServerConnectionCap: connections over MaxConnections, negotiating
// ones included, are closed before any byte, counted and logged once per
// interval; a freed place is taken again. Concurrent dials never get more
// places than the cap.
func TestServerConnectionCap(t *testing.T) {
	const limit = 10
	const dials = 60
	m, reg := registeredMetrics(t)
	var logs lockedBuffer
	ts := startServer(t, blockdev.Caps{}, func(o *Options) {
		o.MaxConnections = limit
		o.Metrics = m
		o.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	})
	var ok, refused atomic.Int32
	var wg sync.WaitGroup
	for range dials {
		wg.Go(func() {
			switch got, err := greeted(t, ts.addr); {
			case err != nil:
				t.Error(err)
			case got:
				ok.Add(1)
			default:
				refused.Add(1)
			}
		})
	}
	wg.Wait()
	if ok.Load() != limit || refused.Load() != dials-limit {
		t.Fatalf("%d dials at once with MaxConnections %d: %d greeted, %d refused; want %d and %d",
			dials, limit, ok.Load(), refused.Load(), limit, dials-limit)
	}
	if n := len(ts.srv.ConnStats()); n != limit {
		t.Fatalf("server holds %d connections, cap %d", n, limit)
	}
	g := gather(t, reg)
	if v := g["lupool_nbd_connections_refused_total,"+RefusedServerLimit]; v != dials-limit {
		t.Errorf("refused{server_limit} = %v, want %d", v, dials-limit)
	}
	if v := g["lupool_nbd_open_connections"]; v != limit {
		t.Errorf("open connections gauge = %v, want %d", v, limit)
	}
	if n := strings.Count(logs.String(), "server is at its connection limit"); n != 1 {
		t.Errorf("%d refusals logged %d times within %v, want once:\n%s", dials-limit, n, refusalLogInterval, logs.String())
	}
	if !strings.Contains(logs.String(), "limit=10") {
		t.Errorf("refusal log does not name the limit:\n%s", logs.String())
	}

	// A negotiating connection that gives up frees its place.
	if got, err := greeted(t, ts.addr); err != nil || got {
		t.Fatalf("dial at the cap: greeted %v, %v; want refused", got, err)
	}
	ts.srv.mu.Lock()
	for conn := range ts.srv.mu.conns {
		conn.close()
		break
	}
	ts.srv.mu.Unlock()
	waitFor(t, func() bool { return len(ts.srv.ConnStats()) == limit-1 })
	ok2 := dialRaw(t, ts.addr)
	ok2.attach("disk", false)
	if code := ok2.do(nbdproto.CmdFlush, 0, 0, 0, nil); code != 0 {
		t.Fatalf("flush on the freed place: %s", errName(code))
	}
}

// TestExportConnectionCap: NBD_OPT_GO over MaxConnectionsPerExport gets
// NBD_REP_ERR_POLICY with a message, and the connection may go on to
// another export; EXPORT_NAME over it is closed; a place is given back when
// a connection ends; concurrent GOs never exceed the cap.
func TestExportConnectionCap(t *testing.T) {
	m, reg := registeredMetrics(t)
	var logs lockedBuffer
	other := Export{Name: "other", Device: newZeroDevice(1 << 20)}
	ts := startServer(t, blockdev.Caps{}, func(o *Options) {
		o.MaxConnections = 64
		o.MaxConnectionsPerExport = 2
		o.Metrics = m
		o.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	}, other)
	a := dialRaw(t, ts.addr)
	a.attach("disk", false)
	b := dialRaw(t, ts.addr)
	b.attach("disk", true)

	c := dialRaw(t, ts.addr)
	c.greet(nbdproto.ClientFlagFixedNewstyle | nbdproto.ClientFlagNoZeroes)
	c.option(nbdproto.OptGo, infoPayload("disk"))
	r := c.expectReply(nbdproto.OptGo, nbdproto.RepErrPolicy)
	if !strings.Contains(string(r.data), "limit of 2 connections") {
		t.Errorf("refusal message %q does not name the limit", r.data)
	}
	// INFO is still answered, and GO on another export works.
	c.option(nbdproto.OptInfo, infoPayload("disk"))
	c.goReplies(nbdproto.OptInfo)
	c.option(nbdproto.OptGo, infoPayload("other"))
	c.goReplies(nbdproto.OptGo)
	if code := c.do(nbdproto.CmdFlush, 0, 0, 0, nil); code != 0 {
		t.Fatalf("flush on other: %s", errName(code))
	}

	// EXPORT_NAME cannot be answered with an error: closed.
	d := dialRaw(t, ts.addr)
	d.greet(nbdproto.ClientFlagFixedNewstyle | nbdproto.ClientFlagNoZeroes)
	d.option(nbdproto.OptExportName, []byte("disk"))
	d.expectClosed()

	g := gather(t, reg)
	if v := g["lupool_nbd_connections_refused_total,"+RefusedExportLimit]; v != 2 {
		t.Errorf("refused{export_limit} = %v, want 2", v)
	}
	if !strings.Contains(logs.String(), "export is at its connection limit") || !strings.Contains(logs.String(), "export=disk") {
		t.Errorf("export refusal not logged with the export:\n%s", logs.String())
	}

	// A connection that ends gives its place back.
	a.request(nbdproto.CmdDisc, 0, 0, 0, 0, nil)
	a.expectClosed()
	waitFor(t, func() bool { return ts.srv.Connections("disk") == 1 })
	e := dialRaw(t, ts.addr)
	e.attach("disk", false)
	b.request(nbdproto.CmdDisc, 0, 0, 0, 0, nil)
	b.expectClosed()
	e.request(nbdproto.CmdDisc, 0, 0, 0, 0, nil)
	e.expectClosed()
	waitFor(t, func() bool { return ts.srv.Connections("disk") == 0 })

	// Many at once: exactly the cap get in.
	const tries = 30
	var in, out atomic.Int32
	var wg sync.WaitGroup
	for range tries {
		wg.Go(func() {
			switch got, err := tryGo(t, ts.addr, "disk"); {
			case err != nil:
				t.Error(err)
			case got == nbdproto.RepAck:
				in.Add(1)
			case got == nbdproto.RepErrPolicy:
				out.Add(1)
			default:
				t.Errorf("final reply type %#x to GO", got)
			}
		})
	}
	wg.Wait()
	if in.Load() != 2 || out.Load() != tries-2 {
		t.Fatalf("%d concurrent GOs with cap 2: %d in, %d refused", tries, in.Load(), out.Load())
	}
	// The server counts a connection in transmission once it has sent
	// the reply the client just read: allow it a moment.
	deadline := time.Now().Add(5 * time.Second)
	for ts.srv.Connections("disk") != 2 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if n := ts.srv.Connections("disk"); n != 2 {
		t.Fatalf("%d connections in transmission on disk, cap 2", n)
	}
}

// tryGo negotiates NBD_OPT_GO on export and returns the type of the
// server's last reply to it (NBD_REP_ACK or an error). The connection stays
// open until the test ends. Safe to call from any goroutine.
func tryGo(t *testing.T, addr, export string) (uint32, error) {
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		return 0, err
	}
	t.Cleanup(func() { _ = nc.Close() })
	_ = nc.SetDeadline(time.Now().Add(10 * time.Second))
	var g [nbdproto.GreetingSize]byte
	if _, err := io.ReadFull(nc, g[:]); err != nil {
		return 0, fmt.Errorf("greeting: %w", err)
	}
	p := infoPayload(export)
	msg := binary.BigEndian.AppendUint32(nil, nbdproto.ClientFlagFixedNewstyle|nbdproto.ClientFlagNoZeroes)
	var hdr [nbdproto.OptionHeaderSize]byte
	nbdproto.PutOptionHeader(hdr[:], nbdproto.OptionHeader{Option: nbdproto.OptGo, Length: uint32(len(p))})
	msg = append(append(msg, hdr[:]...), p...)
	if _, err := nc.Write(msg); err != nil {
		return 0, err
	}
	for {
		var rh [nbdproto.OptionReplyHeaderSize]byte
		if _, err := io.ReadFull(nc, rh[:]); err != nil {
			return 0, fmt.Errorf("option reply: %w", err)
		}
		rep, err := nbdproto.ParseOptionReply(rh[:])
		if err != nil {
			return 0, err
		}
		if _, err := io.CopyN(io.Discard, nc, int64(rep.Length)); err != nil {
			return 0, err
		}
		if rep.Type != nbdproto.RepInfo {
			return rep.Type, nil
		}
	}
}

// TestHandshakeDeadlineTrickle: a client that trickles option bytes never
// gets past the handshake deadline, which is absolute.
func TestHandshakeDeadlineTrickle(t *testing.T) {
	const timeout = 500 * time.Millisecond
	ts := startServer(t, blockdev.Caps{}, func(o *Options) { o.HandshakeTimeout = timeout })
	c := dialRaw(t, ts.addr)
	c.greet(nbdproto.ClientFlagFixedNewstyle)
	start := time.Now()
	var hdr [nbdproto.OptionHeaderSize]byte
	nbdproto.PutOptionHeader(hdr[:], nbdproto.OptionHeader{Option: nbdproto.OptGo, Length: 4000})
	stream := append(hdr[:], make([]byte, 4000)...)
	for _, b := range stream {
		if _, err := c.conn.Write([]byte{b}); err != nil {
			break // closed by the server
		}
		time.Sleep(20 * time.Millisecond)
		if time.Since(start) > 5*time.Second {
			t.Fatal("trickling client still connected after 5 s, handshake timeout 500 ms")
		}
	}
	c.expectClosed()
	if d := time.Since(start); d > 4*timeout {
		t.Fatalf("closed after %v, handshake timeout %v", d, timeout)
	}
	waitFor(t, func() bool { return len(ts.srv.ConnStats()) == 0 })
}

// TestNegotiationBuffersGrowInTransmission: requests sent right behind
// NBD_OPT_GO, before its reply was read, survive the switch from the small
// negotiation buffers to the transmission ones.
func TestNegotiationBuffersGrowInTransmission(t *testing.T) {
	ts := startServer(t, blockdev.Caps{}, nil)
	want := pattern(8192, 7)
	if err := ts.mem.WriteAt(context.Background(), want, 0, 0); err != nil {
		t.Fatal(err)
	}
	c := dialRaw(t, ts.addr)
	c.greet(nbdproto.ClientFlagFixedNewstyle | nbdproto.ClientFlagNoZeroes)
	var hdr [nbdproto.OptionHeaderSize]byte
	p := infoPayload("disk")
	nbdproto.PutOptionHeader(hdr[:], nbdproto.OptionHeader{Option: nbdproto.OptGo, Length: uint32(len(p))})
	msg := append(hdr[:], p...)
	for i := range 3 {
		var rq [nbdproto.RequestSize]byte
		nbdproto.PutRequest(rq[:], nbdproto.Request{Type: nbdproto.CmdRead, Handle: uint64(i), Offset: uint64(i) * 2048, Length: 2048})
		msg = append(msg, rq[:]...)
	}
	c.send(msg) // one write: the server reads it all into its buffer at once
	c.goReplies(nbdproto.OptGo)
	// Replies may come in any order (the reads run on workers).
	seen := map[uint64]bool{}
	for range 3 {
		h, code, data := c.simpleReply(2048)
		if h > 2 || seen[h] || code != 0 || !bytes.Equal(data, want[h*2048:(h+1)*2048]) {
			t.Fatalf("reply for handle %d (seen before %v): code %s, data match %v", h, seen[h], errName(code), h <= 2 && bytes.Equal(data, want[h*2048:(h+1)*2048]))
		}
		seen[h] = true
	}
}

// TestLogLimiter: one event per interval, with the count held back.
func TestLogLimiter(t *testing.T) {
	var l logLimiter
	t0 := time.Unix(1000, 0)
	if ok, n := l.allow(t0); !ok || n != 0 {
		t.Fatalf("first event: %v %d", ok, n)
	}
	for i := range 5 {
		if ok, _ := l.allow(t0.Add(time.Duration(i) * time.Second)); ok {
			t.Fatalf("event %d within the interval let through", i)
		}
	}
	if ok, n := l.allow(t0.Add(refusalLogInterval)); !ok || n != 5 {
		t.Fatalf("after the interval: %v, %d held back; want true, 5", ok, n)
	}
}

// TestFreeMemoryScheduling: connections that allocated little do not make
// the server free memory; a wave of connections that allocated a lot makes
// it call FreeMemory once, shortly after they ended.
func TestFreeMemoryScheduling(t *testing.T) {
	var calls atomic.Int32
	ts := startServer(t, blockdev.Caps{}, func(o *Options) {
		o.FreeMemory = func() { calls.Add(1) }
	})
	for range 4 {
		c := dialRaw(t, ts.addr)
		c.attach("disk", false)
		c.request(nbdproto.CmdRead, 0, 1, 0, 4096, nil)
		c.simpleReply(4096)
		c.request(nbdproto.CmdDisc, 0, 0, 0, 0, nil)
		c.expectClosed()
	}
	waitFor(t, func() bool { return len(ts.srv.ConnStats()) == 0 })
	time.Sleep(freeMemoryDelay + 200*time.Millisecond)
	if n := calls.Load(); n != 0 {
		t.Fatalf("FreeMemory called %d times after small connections", n)
	}
	for range 3 {
		c := dialRaw(t, ts.addr)
		c.attach("disk", false)
		for i := range 3 {
			c.request(nbdproto.CmdRead, 0, uint64(i), 0, testSizeBytes, nil)
			c.simpleReply(testSizeBytes)
		}
		_ = c.conn.Close()
	}
	waitFor(t, func() bool { return len(ts.srv.ConnStats()) == 0 })
	deadline := time.Now().Add(freeMemoryDelay + 5*time.Second)
	for calls.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := calls.Load(); n != 1 {
		t.Fatalf("FreeMemory called %d times after connections that allocated %d MiB, want 1",
			n, 9*testSizeBytes>>20)
	}
}

// zeroDevice reads zeros and discards writes: a device that holds no
// memory of its own, for measuring the engine's.
type zeroDevice struct{ size int64 }

func newZeroDevice(size int64) *zeroDevice { return &zeroDevice{size: size} }

var _ blockdev.Device = (*zeroDevice)(nil)

func (d *zeroDevice) Size() int64               { return d.size }
func (d *zeroDevice) Caps() blockdev.Caps       { return blockdev.Caps{} }
func (*zeroDevice) Flush(context.Context) error { return nil }
func (d *zeroDevice) ReadAt(_ context.Context, p []byte, off int64) error {
	if err := blockdev.CheckRange(off, int64(len(p)), d.size); err != nil {
		return err
	}
	clear(p)
	return nil
}
func (d *zeroDevice) WriteAt(_ context.Context, p []byte, off int64, _ blockdev.Flags) error {
	return blockdev.CheckRange(off, int64(len(p)), d.size)
}

// readRequest encodes a simple READ request.
func readRequest(handle, off uint64, length uint32) []byte {
	var b [nbdproto.RequestSize]byte
	nbdproto.PutRequest(b[:], nbdproto.Request{Type: nbdproto.CmdRead, Handle: handle, Offset: off, Length: length})
	return b[:]
}

// TestFreeMemoryStragglers: a connection that was still open when a wave's
// memory was given back (it may hold buffers of that wave) makes the
// server give memory back again when it ends, although nothing was
// allocated since.
func TestFreeMemoryStragglers(t *testing.T) {
	var calls atomic.Int32
	ts := startServer(t, blockdev.Caps{}, func(o *Options) {
		o.FreeMemory = func() { calls.Add(1) }
	})
	straggler := dialRaw(t, ts.addr)
	straggler.attach("disk", false)
	for i := range 3 {
		straggler.request(nbdproto.CmdRead, 0, uint64(i), 0, testSizeBytes, nil)
		straggler.simpleReply(testSizeBytes)
	}
	c := dialRaw(t, ts.addr)
	c.attach("disk", false)
	c.request(nbdproto.CmdRead, 0, 9, 0, testSizeBytes, nil)
	c.simpleReply(testSizeBytes)
	_ = c.conn.Close()
	waitFor(t, func() bool { return len(ts.srv.ConnStats()) == 1 })
	deadline := time.Now().Add(freeMemoryDelay + 5*time.Second)
	for calls.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := calls.Load(); n != 1 {
		t.Fatalf("FreeMemory called %d times after the wave, want 1", n)
	}
	_ = straggler.conn.Close()
	waitFor(t, func() bool { return len(ts.srv.ConnStats()) == 0 })
	deadline = time.Now().Add(freeMemoryInterval + 5*time.Second)
	for calls.Load() == 1 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if n := calls.Load(); n != 2 {
		t.Fatalf("FreeMemory called %d times after the straggler ended, want 2", n)
	}
}
