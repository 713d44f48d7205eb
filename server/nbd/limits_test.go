package nbd

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/blockdev/blockdevtest"
	"github.com/lupool/lupool/server/nbdproto"
)

// TestLimitRelationships asserts how the limits depend on each other.
func TestLimitRelationships(t *testing.T) {
	checks := []struct {
		what string
		ok   bool
	}{
		{"pooled buffers are at most the largest request", maxPooledBytes <= MaxRequestBytes},
		{"the largest request fits its buffer", bufferBytes(MaxRequestBytes) == MaxRequestBytes},
		{"the smallest pooled buffer is the preferred block", 1<<minBufferShift == PreferredBlockBytes},
		{"an inline request uses a pooled buffer", InlineMaxBytes <= maxPooledBytes},
		{"negotiation buffers are smaller than transmission ones",
			handshakeBufferBytes <= readBufferBytes && handshakeBufferBytes <= writeBufferBytes},
		{"a 64 KiB read's reply fits the reply writer (tried reads answer from it)",
			TryReadMaxBytes >= 64<<10 && TryReadMaxBytes+maxReadReplyHeadBytes <= writeBufferBytes},
		{"freeing memory waits for more than one largest request", freeMemoryMinBytes > MaxRequestBytes},
		{"freeing memory waits for closing connections to be gone", freeMemoryDelay < freeMemoryInterval},
		{"the per-export cap is within the server cap", DefaultMaxConnectionsPerExport <= DefaultMaxConnections},
		{"the server cap is within what Validate accepts", DefaultMaxConnections <= MaxConnectionsLimit},
		{"documented: refusals logged at most every 10 s", refusalLogInterval == 10*time.Second},
		{"documented: memory freed at most every 10 s, a second after", freeMemoryInterval == 10*time.Second && freeMemoryDelay == time.Second},
		{"documented: memory freed after 64 MiB of buffers", freeMemoryMinBytes == 64<<20},
		{"documented: buffers up to 1 MiB pooled, 4 KiB negotiation buffers", maxPooledBytes == 1<<20 && handshakeBufferBytes == 4<<10},
		{"a full server's negotiation buffers stay under 16 MiB",
			DefaultMaxConnections*2*handshakeBufferBytes <= 16<<20},
		{"preferred block is a multiple of the minimum", PreferredBlockBytes%MinBlockBytes == 0},
		{"maximum block is a multiple of the preferred", MaxRequestBytes%PreferredBlockBytes == 0},
		{"a block status payload fits a pooled buffer", blockStatusPayloadBytes <= maxPooledBytes},
		{"a block status payload fits its 32-bit chunk length", blockStatusPayloadBytes < 1<<32},
		{"an option holds the longest name and one longest query",
			MaxOptionBytes >= 4+nbdproto.MaxStringBytes+4+4+nbdproto.MaxStringBytes},
		{"default byte budget holds a maximum request", DefaultMaxInflightBytes >= MaxRequestBytes},
		{"default byte budget holds a full queue of preferred blocks",
			DefaultMaxInflightBytes >= DefaultMaxInflightRequests*PreferredBlockBytes},
		{"export names obey the spec string limit", MaxNameBytes <= nbdproto.MaxStringBytes},
		{"the zero buffer is a whole number of preferred blocks", zeroBufferBytes%PreferredBlockBytes == 0},
		{"commands counted fit the stats array", int(nbdproto.CmdBlockStatus) < numCommands},
		{"an inline request is a valid request", InlineMaxBytes <= MaxRequestBytes},
		{"a full queue of inline requests fits the default byte budget",
			DefaultMaxInflightRequests*InlineMaxBytes <= DefaultMaxInflightBytes},
	}
	for _, c := range checks {
		if !c.ok {
			t.Errorf("violated: %s", c.what)
		}
	}
}

func TestBufferPools(t *testing.T) {
	for _, tc := range []struct{ n, class int }{
		{1, 0}, {4096, 0}, {4097, 1}, {8192, 1}, {1 << 20, 8}, {maxPooledBytes - 1, numBufferPools - 1}, {maxPooledBytes, numBufferPools - 1},
	} {
		if got := sizeClass(tc.n); got != tc.class {
			t.Errorf("sizeClass(%d) = %d, want %d", tc.n, got, tc.class)
		}
	}
	for _, tc := range []struct{ n, bytes int }{
		{1, 4096}, {4097, 8192}, {maxPooledBytes, maxPooledBytes}, {maxPooledBytes + 1, maxPooledBytes + 1},
		{17 << 20, 17 << 20}, {MaxRequestBytes, MaxRequestBytes},
	} {
		if got := bufferBytes(tc.n); got != tc.bytes {
			t.Errorf("bufferBytes(%d) = %d, want %d", tc.n, got, tc.bytes)
		}
	}
	var p bufferPools
	b := p.get(5000)
	if len(b.b) != 8192 {
		t.Fatalf("get(5000) gave %d bytes", len(b.b))
	}
	if got := p.allocatedBytes.Load(); got != 8192 {
		t.Errorf("allocatedBytes = %d after one 8 KiB allocation", got)
	}
	p.put(b)
	p.put(&buffer{b: make([]byte, 5000)}) // foreign size: dropped, must not be handed out
	for range 10 {
		if got := p.get(5000); len(got.b) != 8192 {
			t.Fatalf("pool handed out a %d-byte buffer", len(got.b))
		}
	}
	// Above maxPooledBytes: exact size, never pooled.
	big := p.get(maxPooledBytes + 4096)
	if len(big.b) != maxPooledBytes+4096 {
		t.Fatalf("get(%d) gave %d bytes", maxPooledBytes+4096, len(big.b))
	}
	p.put(big)
	if big.b != nil {
		t.Fatal("put kept a reference to an unpooled buffer")
	}
	before := p.allocatedBytes.Load()
	if again := p.get(maxPooledBytes + 4096); len(again.b) != maxPooledBytes+4096 {
		t.Fatalf("get gave %d bytes", len(again.b))
	}
	if got := p.allocatedBytes.Load() - before; got != maxPooledBytes+4096 {
		t.Errorf("a large buffer came from a pool (allocated %d bytes, want %d)", got, maxPooledBytes+4096)
	}
}

func TestByteBudget(t *testing.T) {
	var b byteBudget
	b.init(10)
	b.acquire(6)
	acquired := make(chan struct{})
	go func() {
		b.acquire(6) // waits: 12 > 10
		close(acquired)
	}()
	time.Sleep(20 * time.Millisecond) // let it try
	select {
	case <-acquired:
		t.Fatal("budget over-committed")
	default:
	}
	b.release(6)
	<-acquired
	b.release(6)
	b.acquire(100) // larger than the budget, alone: allowed
	b.release(100)
}

func TestExportSet(t *testing.T) {
	s := NewExportSet()
	dev := blockdevtest.NewMem(4096, blockdev.Caps{})
	for _, e := range []Export{{Name: "", Device: dev}, {Name: "x"}, {Name: string(make([]byte, MaxNameBytes+1)), Device: dev}} {
		if err := s.Add(e); !errors.Is(err, ErrInvalidExport) {
			t.Errorf("Add(%.10q) = %v, want ErrInvalidExport", e.Name, err)
		}
	}
	for _, n := range []string{"b", "a", "c"} {
		if err := s.Add(Export{Name: n, Device: dev}); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Add(Export{Name: "a", Device: dev}); !errors.Is(err, ErrExportExists) {
		t.Fatalf("duplicate: %v", err)
	}
	if !s.Remove("b") || s.Remove("b") {
		t.Fatal("Remove")
	}
	l := s.List()
	if len(l) != 2 || l[0].Name != "a" || l[1].Name != "c" {
		t.Fatalf("List %+v", l)
	}
	if _, ok := s.Lookup("c"); !ok {
		t.Fatal("Lookup c")
	}
}

func TestOptionsValidate(t *testing.T) {
	bad := []Options{
		{},
		{Exports: NewExportSet(), TLSMode: TLSOptional},
		{Exports: NewExportSet(), TLSMode: 7},
		{Exports: NewExportSet(), MaxInflightRequests: -1},
		{Exports: NewExportSet(), MaxInflightBytes: -1},
		{Exports: NewExportSet(), MaxConnections: -1},
		{Exports: NewExportSet(), MaxConnections: MaxConnectionsLimit + 1},
		{Exports: NewExportSet(), MaxConnectionsPerExport: -1},
		{Exports: NewExportSet(), MaxConnections: 8, MaxConnectionsPerExport: 9},
	}
	for i, o := range bad {
		o.EnsureDefaults()
		if err := o.Validate(); !errors.Is(err, ErrInvalidOptions) {
			t.Errorf("case %d: %v, want ErrInvalidOptions", i, err)
		}
		if _, err := NewServer(o); err == nil {
			t.Errorf("case %d: NewServer accepted bad options", i)
		}
	}
	o := Options{Exports: NewExportSet()}
	o.EnsureDefaults()
	if err := o.Validate(); err != nil || o.MaxInflightRequests != 128 || o.MaxInflightBytes != 64<<20 || o.Logger == nil ||
		o.MaxConnections != DefaultMaxConnections || o.MaxConnectionsPerExport != DefaultMaxConnectionsPerExport || o.FreeMemory == nil {
		t.Fatalf("defaults: %+v, %v", o, err)
	}
	// A small server cap lowers the default per-export cap with it.
	o = Options{Exports: NewExportSet(), MaxConnections: 8}
	o.EnsureDefaults()
	if err := o.Validate(); err != nil || o.MaxConnectionsPerExport != 8 {
		t.Fatalf("MaxConnections 8: per export %d, %v; want 8, nil", o.MaxConnectionsPerExport, err)
	}
}

func TestServeSeveralListenersAndClose(t *testing.T) {
	ts := startServer(t, blockdev.Caps{}, nil)
	l2, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- ts.srv.Serve(l2) }()
	c := dialRaw(t, l2.Addr().String())
	c.attach("disk", false)
	if code := c.do(nbdproto.CmdFlush, 0, 0, 0, nil); code != 0 {
		t.Fatal(errName(code))
	}
	if err := ts.srv.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := <-done; !errors.Is(err, ErrServerClosed) {
		t.Fatalf("second Serve: %v", err)
	}
	l3, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if err := ts.srv.Serve(l3); !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Serve after Shutdown: %v", err)
	}
	c.expectClosed()
}

// TestShedSendsClientsElsewhere: while shedding, an idle connection is
// closed, a new connection is closed before the handshake, and after Shed
// is turned off clients are served again.
func TestShedSendsClientsElsewhere(t *testing.T) {
	ts := startServer(t, blockdev.Caps{}, nil)
	c := dialRaw(t, ts.addr)
	c.attach("disk", false)
	if code := c.do(nbdproto.CmdFlush, 0, 0, 0, nil); code != 0 {
		t.Fatal(errName(code))
	}
	ts.srv.Shed(true)
	if !ts.srv.Shedding() {
		t.Fatal("Shedding() false after Shed(true)")
	}
	c.expectClosed()
	nc, err := net.Dial("tcp", ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	_ = nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := nc.Read(make([]byte, 8)); err == nil {
		t.Fatalf("a new connection while shedding got %d bytes of a greeting, want it closed", n)
	}
	ts.srv.Shed(false)
	c2 := dialRaw(t, ts.addr)
	c2.attach("disk", false)
	if code := c2.do(nbdproto.CmdFlush, 0, 0, 0, nil); code != 0 {
		t.Fatalf("after Shed(false): %s", errName(code))
	}
}
