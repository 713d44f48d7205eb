package nbd

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/blockdev/blockdevtest"
)

// testServer is a server on a loopback listener, shut down by t.Cleanup.
type testServer struct {
	srv     *Server
	addr    string
	exports *ExportSet
	mem     *blockdevtest.Mem
	// asyncDev is the device behind "disk" when testAsync was set.
	asyncDev *asyncMem
}

const testSizeBytes = 16 << 20

// inlineMem is a Mem that the engine runs inline (InlineDevice).
type inlineMem struct{ *blockdevtest.Mem }

func (inlineMem) InlineIO() bool { return true }

var _ InlineDevice = inlineMem{}

// testInline makes startServer serve "disk" as an InlineDevice. Set only by
// TestInline, which runs tests in sequence.
var testInline bool

// testAsync makes startServer serve "disk" as an AsyncWriter (asyncMem).
// Set only by TestAsync and tests that run before any parallel test.
var testAsync bool

// testAsyncRead makes startServer serve "disk" as an AsyncReader and
// AsyncWriter that holds requests until FlushRequests (asyncReadMem). Set
// only by TestAsyncRead.
var testAsyncRead bool

// startServer serves a Mem device as export "disk" (and any extra exports).
func startServer(t testing.TB, caps blockdev.Caps, tweak func(*Options), extra ...Export) *testServer {
	t.Helper()
	mem := blockdevtest.NewMem(testSizeBytes, caps)
	var disk blockdev.Device = mem
	var asyncDev *asyncMem
	switch {
	case testInline:
		disk = inlineMem{mem}
	case testAsync:
		asyncDev = newAsyncMem(t, mem)
		disk = asyncDev
	case testAsyncRead:
		asyncDev = newAsyncMem(t, mem)
		disk = &asyncReadMem{asyncMem: asyncDev}
	}
	set := NewExportSet()
	if err := set.Add(Export{Name: "disk", Description: "test disk", Device: disk}); err != nil {
		t.Fatal(err)
	}
	for _, e := range extra {
		if err := set.Add(e); err != nil {
			t.Fatal(err)
		}
	}
	opts := Options{Exports: set}
	if tweak != nil {
		tweak(&opts)
	}
	srv, err := NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	serveUntilCleanup(t, srv, l)
	return &testServer{srv: srv, addr: l.Addr().String(), exports: set, mem: mem, asyncDev: asyncDev}
}

// serveUntilCleanup runs srv on l and, when the test ends, shuts it down
// and checks that Serve returned ErrServerClosed.
func serveUntilCleanup(t testing.TB, srv *Server, l net.Listener) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		if err := <-done; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
	})
}
