package endpoint

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/blockdev/blockdevtest"
	"github.com/lupool/lupool/internal/testseed"
	"github.com/lupool/lupool/server/nbd"
)

const testSizeBytes = 8 << 20

// node is one in-process "pool node": the real engine serving a shared
// device, restartable on the same address.
type node struct {
	t    testing.TB
	id   string
	addr string
	dev  blockdev.Device
	luID string
	srv  *nbd.Server
	done chan error
}

func newNode(t testing.TB, id string, dev blockdev.Device, luID string) *node {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	n := &node{t: t, id: id, addr: l.Addr().String(), dev: dev, luID: luID}
	n.serve(l)
	t.Cleanup(func() { n.stop() })
	return n
}

func (n *node) serve(l net.Listener) {
	es := nbd.NewExportSet()
	if err := es.Add(nbd.Export{Name: "lu", ID: n.luID, Device: n.dev}); err != nil {
		n.t.Fatal(err)
	}
	srv, err := nbd.NewServer(nbd.Options{Exports: es})
	if err != nil {
		n.t.Fatal(err)
	}
	n.srv, n.done = srv, make(chan error, 1)
	go func() { n.done <- srv.Serve(l) }()
}

// stop is SIGTERM: in-flight requests finish, later ones get ESHUTDOWN.
func (n *node) stop() {
	if n.srv == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_ = n.srv.Shutdown(ctx)
	<-n.done
	n.srv = nil
}

func (n *node) start() {
	var l net.Listener
	var err error
	for range 100 { // the port may linger a moment
		if l, err = net.Listen("tcp", n.addr); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err != nil {
		n.t.Fatal(err)
	}
	n.serve(l)
}

func newDevice(t *testing.T, opts Options, nodes ...*node) *Device {
	t.Helper()
	opts.Export = "lu"
	opts.Nodes = func(context.Context) ([]Node, error) {
		out := make([]Node, len(nodes))
		for i, n := range nodes {
			out[i] = Node{ID: n.id, NBDAddr: n.addr}
		}
		return out, nil
	}
	if opts.Prefer == nil {
		opts.Prefer = func(n Node) bool { return n.ID == nodes[0].id }
	}
	opts.Metrics = NewMetrics()
	d, err := New(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// load writes and reads back random blocks from workers goroutines until
// stop is closed, checking every read against what it wrote last.
func load(t *testing.T, d *Device, workers int, stop <-chan struct{}) (wait func() int) {
	var wg sync.WaitGroup
	var mu sync.Mutex
	ops := 0
	seed := testseed.Seed(t, "./server/endpoint")
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, uint64(w)))
			// Each worker owns its own blocks, so reads check exactly.
			base := int64(w) * (testSizeBytes / int64(workers))
			blocks := testSizeBytes / int64(workers) / 4096
			want := map[int64][]byte{}
			ctx := context.Background()
			for i := 0; ; i++ {
				select {
				case <-stop:
					mu.Lock()
					ops += i
					mu.Unlock()
					return
				default:
				}
				off := base + rng.Int64N(blocks)*4096
				if w := want[off]; w != nil && rng.IntN(2) == 0 {
					got := make([]byte, 4096)
					if err := d.ReadAt(ctx, got, off); err != nil {
						t.Errorf("read at %d: %v", off, err)
						return
					}
					if !bytes.Equal(got, w) {
						t.Errorf("read at %d: wrong data", off)
						return
					}
					continue
				}
				p := make([]byte, 4096)
				for j := range p {
					p[j] = byte(rng.Uint32())
				}
				if err := d.WriteAt(ctx, p, off, 0); err != nil {
					t.Errorf("write at %d: %v", off, err)
					return
				}
				want[off] = p
				if i%50 == 0 {
					if err := d.Flush(ctx); err != nil {
						t.Errorf("flush: %v", err)
						return
					}
				}
			}
		}()
	}
	return func() int { wg.Wait(); return ops }
}

// TestRidesOverShutdownAndLoss: under load from 16 goroutines, the node in
// use is stopped (ESHUTDOWN), then the other node's connections are cut:
// no call fails, every read matches, and the endpoint ends where a node is.
func TestRidesOverShutdownAndLoss(t *testing.T) {
	dev := blockdevtest.NewMem(testSizeBytes, blockdev.Caps{})
	a := newNode(t, "a", dev, "a@1")
	b := newNode(t, "b", dev, "a@1")
	d := newDevice(t, Options{}, a, b)
	if d.Node() != "a" {
		t.Fatalf("started on %q, want the preferred node a", d.Node())
	}
	stop := make(chan struct{})
	wait := load(t, d, 16, stop)
	time.Sleep(100 * time.Millisecond)
	a.stop()
	time.Sleep(100 * time.Millisecond)
	if d.Node() != "b" {
		t.Errorf("after a stopped: on %q, want b", d.Node())
	}
	b.srv.DisconnectExport("lu") // a dropped connection, as kill -9 does
	time.Sleep(100 * time.Millisecond)
	a.start()
	b.stop()
	time.Sleep(200 * time.Millisecond)
	close(stop)
	ops := wait()
	if ops == 0 {
		t.Error("no operation completed")
	}
	if d.Node() != "a" {
		t.Errorf("after b stopped: on %q, want a", d.Node())
	}
	m := d.opts.Metrics
	if n := counter(t, m.reconnects); n < 3 {
		t.Errorf("%v reconnects, want at least 3", n)
	}
	if n := counter(t, m.replayed); n == 0 {
		t.Error("nothing replayed: no request was in flight at the breaks, the test proves nothing")
	}
	t.Logf("%d operations, %v reconnects, %v replayed, %.3fs without service", ops,
		counter(t, m.reconnects), counter(t, m.replayed), counter(t, m.unavailable))
}

// TestWaitsForTheSameNode: with one node, requests made while it is down
// wait and complete once it is back.
func TestWaitsForTheSameNode(t *testing.T) {
	dev := blockdevtest.NewMem(testSizeBytes, blockdev.Caps{})
	a := newNode(t, "a", dev, "a@1")
	d := newDevice(t, Options{}, a)
	a.stop()
	errc := make(chan error, 1)
	go func() { errc <- d.WriteAt(context.Background(), []byte("held"), 4096, blockdev.FUA) }()
	select {
	case err := <-errc:
		t.Fatalf("write with no node answered %v, want it held", err)
	case <-time.After(200 * time.Millisecond):
	}
	a.start()
	select {
	case err := <-errc:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("write still held 10 s after the node came back")
	}
	got := make([]byte, 4)
	if err := dev.ReadAt(context.Background(), got, 4096); err != nil || string(got) != "held" {
		t.Errorf("device has %q, %v", got, err)
	}
}

// TestGiveUp: with every node down, a call fails with ErrIO after about
// GiveUp, later calls at once, and service resumes when a node is back.
func TestGiveUp(t *testing.T) {
	dev := blockdevtest.NewMem(testSizeBytes, blockdev.Caps{})
	a := newNode(t, "a", dev, "a@1")
	d := newDevice(t, Options{GiveUp: 300 * time.Millisecond}, a)
	a.stop()
	start := time.Now()
	err := d.ReadAt(context.Background(), make([]byte, 512), 0)
	took := time.Since(start)
	if !errors.Is(err, blockdev.ErrIO) {
		t.Fatalf("read with every node down: %v, want ErrIO", err)
	}
	if took < 250*time.Millisecond || took > 3*time.Second {
		t.Errorf("gave up after %v, want about 300ms", took)
	}
	start = time.Now()
	if err := d.Flush(context.Background()); !errors.Is(err, blockdev.ErrIO) || time.Since(start) > 100*time.Millisecond {
		t.Errorf("flush after giving up: %v after %v, want ErrIO at once", err, time.Since(start))
	}
	a.start()
	deadline := time.Now().Add(10 * time.Second)
	for d.Flush(context.Background()) != nil {
		if time.Now().After(deadline) {
			t.Fatal("no service 10 s after the node came back")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestRefusesAnotherLU: a node serving an export of the same name with
// another id (an LU deleted and created again) is never used.
func TestRefusesAnotherLU(t *testing.T) {
	dev := blockdevtest.NewMem(testSizeBytes, blockdev.Caps{})
	a := newNode(t, "a", dev, "a@1")
	other := newNode(t, "b", blockdevtest.NewMem(testSizeBytes, blockdev.Caps{}), "b@2")
	d := newDevice(t, Options{GiveUp: 500 * time.Millisecond}, a, other)
	a.stop()
	if err := d.Flush(context.Background()); !errors.Is(err, blockdev.ErrIO) {
		t.Errorf("flush with only another LU up: %v, want ErrIO", err)
	}
	if n := d.Node(); n != "" {
		t.Errorf("endpoint on %q, which serves another LU", n)
	}
	if _, err := New(context.Background(), Options{Export: "nosuch", Nodes: func(context.Context) ([]Node, error) {
		return []Node{{ID: "b", NBDAddr: other.addr}}, nil
	}}); !errors.Is(err, ErrNoNode) {
		t.Errorf("New for an export no node has: %v, want ErrNoNode", err)
	}
}

// TestReplayTableBounded: the table never holds more than
// MaxReplayRequests calls; the others wait for room.
func TestReplayTableBounded(t *testing.T) {
	dev := blockdevtest.NewMem(testSizeBytes, blockdev.Caps{})
	a := newNode(t, "a", dev, "")
	d := newDevice(t, Options{MaxReplayRequests: 4, MaxReplayBytes: 64 << 10}, a)
	a.stop()
	var wg sync.WaitGroup
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := d.WriteAt(context.Background(), make([]byte, 4096), int64(i)*4096, 0); err != nil {
				t.Error(err)
			}
		}()
	}
	time.Sleep(200 * time.Millisecond)
	d.mu.Lock()
	n := len(d.mu.pending)
	d.mu.Unlock()
	if n != 4 {
		t.Errorf("%d calls in the table, want the limit 4", n)
	}
	a.start()
	wg.Wait()
}

func TestOptions(t *testing.T) {
	nodes := func(context.Context) ([]Node, error) { return nil, nil }
	for i, o := range []Options{
		{Nodes: nodes},
		{Export: "x"},
		{Export: "x", Nodes: nodes, GiveUp: -1},
		{Export: "x", Nodes: nodes, MaxReplayBytes: -1},
	} {
		if _, err := New(context.Background(), o); !errors.Is(err, ErrInvalidOptions) {
			t.Errorf("options %d: %v, want ErrInvalidOptions", i, err)
		}
	}
	if _, err := New(context.Background(), Options{Export: "x", Nodes: func(context.Context) ([]Node, error) {
		return nil, fmt.Errorf("api down")
	}}); err == nil {
		t.Error("New with no node list succeeded")
	}
}

func counter(t *testing.T, c *prometheus.CounterVec) float64 {
	t.Helper()
	return testutil.ToFloat64(c.WithLabelValues("lu"))
}

// TestLargeAndSmallRequestsInterleaved: requests larger than the send
// buffer kept for reuse, mixed with small ones from other goroutines, all
// reach the server intact (the combining sender never lets two buffers
// alias).
func TestLargeAndSmallRequestsInterleaved(t *testing.T) {
	dev := blockdevtest.NewMem(testSizeBytes, blockdev.Caps{})
	a := newNode(t, "a", dev, "")
	d := newDevice(t, Options{}, a)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			size := 4096
			if g%2 == 0 {
				size = testSizeBytes / 8 // large requests among small ones
			}
			off := int64(g) * (testSizeBytes / 8)
			for i := range 10 {
				p := bytes.Repeat([]byte{byte(g*16 + i)}, size)
				if err := d.WriteAt(context.Background(), p, off, 0); err != nil {
					t.Error(err)
					return
				}
				got := make([]byte, size)
				if err := d.ReadAt(context.Background(), got, off); err != nil || !bytes.Equal(got, p) {
					t.Errorf("goroutine %d round %d: read back differs (%v)", g, i, err)
					return
				}
			}
		}()
	}
	wg.Wait()
}
