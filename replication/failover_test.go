package replication

import (
	"bytes"
	"context"
	"math/rand"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/internal/testseed"
)

// roleOf returns the device the front end serves for name on m.
func roleOf(t testing.TB, m *Manager, name string) *roleDevice {
	t.Helper()
	m.mu.Lock()
	defer m.mu.Unlock()
	rd := m.mu.exported[name]
	if rd == nil {
		t.Fatalf("%s not exported on %s", name, m.opts.NodeID)
	}
	return rd
}

// promote records node as name's writer (epoch + 1, the old writer out of
// sync), as the primary does on a failover.
func promote(t testing.TB, mt *metaTwin, name, node string) cluster.LU {
	t.Helper()
	rec := mt.get(name)
	next := cloneLU(rec)
	for i := range next.Replicas {
		if next.Replicas[i].NodeID == rec.Writer {
			next.Replicas[i].State = cluster.ReplicaOutOfSync
		}
	}
	next.Writer = node
	next.Epoch++
	if err := mt.update(context.Background(), next, rec.Epoch); err != nil {
		t.Fatal(err)
	}
	return next
}

// TestFailoverKeepsClientAndConverges: a client of the copy's node writes
// while the writer is down; its write waits (no error) until the copy is
// promoted, then completes on the new writer, through the same device.
// The old writer comes back as a copy that holds writes the new writer
// never saw (in flight when it went down): it is compared by region hashes
// and ends identical.
func TestFailoverKeepsClientAndConverges(t *testing.T) {
	rng := rand.New(rand.NewSource(int64(testseed.Seed(t, "./replication/"))))
	mt, nodes := newTestClusterOpts(t, func(o *ManagerOptions) { o.FailoverWait = 20 * time.Second }, "a", "b")
	const size = 1 << 20
	mt.create(t, twoCopies("f", size, "file"))
	streamingMirror(t, nodes["a"].m, "f")
	dev := roleOf(t, nodes["b"].m, "f")
	if _, ok := dev.Device().(*Forwarder); !ok {
		t.Fatalf("b serves %T before the failover, want *Forwarder", dev.Device())
	}
	ctx := context.Background()
	want := make([]byte, size)
	rng.Read(want)
	if err := dev.WriteAt(ctx, want, 0, 0); err != nil {
		t.Fatal(err)
	}

	// a goes down; before it does, a write reached only a's volume (in
	// flight, never acknowledged).
	va, _ := nodes["a"].pool.Get("f")
	nodes["a"].down()
	nodes["a"].m.Close() // a's process is gone: nothing of it answers
	junk := bytes.Repeat([]byte{0xee}, 8192)
	if err := va.WriteAt(ctx, junk, 5*64<<10, 0); err != nil {
		t.Fatal(err)
	}

	page := bytes.Repeat([]byte{0x5a}, 4096)
	var done atomic.Pointer[error]
	go func() {
		err := dev.WriteAt(ctx, page, 12*4096, 0)
		done.Store(&err)
	}()
	time.Sleep(300 * time.Millisecond)
	if p := done.Load(); p != nil {
		t.Fatalf("a write with the writer down returned %v before any failover, want it to wait", *p)
	}
	promote(t, mt, "f", "b")
	waitFor(t, "the waiting write", func() bool { return done.Load() != nil })
	if err := *done.Load(); err != nil {
		t.Fatalf("the write that waited out the failover: %v", err)
	}
	copy(want[12*4096:], page)
	if _, ok := dev.Device().(*Mirror); !ok {
		t.Fatalf("b serves %T after the failover, want *Mirror", dev.Device())
	}
	if got := readAll(t, dev); !bytes.Equal(got, want) {
		t.Fatal("b's data after the failover differs from what was acknowledged")
	}

	// The old writer comes back (a new process) and is brought in line.
	restartedA := restartManager(t, mt, nodes, "a")
	waitFor(t, "a in sync", func() bool { return replicaState(mt.get("f"), "a") == cluster.ReplicaInSync })
	if _, ok := roleOf(t, restartedA, "f").Device().(*Forwarder); !ok {
		t.Fatal("the old writer is not a copy after it came back")
	}
	va, _ = nodes["a"].pool.Get("f")
	if got := readAll(t, va); !bytes.Equal(got, want) {
		t.Fatal("the old writer's volume differs from the new writer's after the resync")
	}
	// It read only the regions that differ: the one with the junk and the
	// one written during the failover.
	if sent := sentBytes(nodes["b"].m, "f", "a", "resync"); sent != 2*64<<10 {
		t.Errorf("resync sent %v bytes, want the 2 regions that differ", sent)
	}
}

// TestFencedWriterRetiresNotFails: a writer whose copy was promoted while it
// was cut off gets its write refused by the copy; the write is not
// acknowledged there and, through the role device, runs again as a
// forwarded write to the new writer once this node follows the metadata.
// So does a write started asynchronously (the NBD engine's path), whose
// buffer the caller reuses as soon as WriteAsync returns.
func TestFencedWriterRetiresNotFails(t *testing.T) {
	t.Run("sync", func(t *testing.T) { fencedWriterRetires(t, false, false) })
	t.Run("async", func(t *testing.T) { fencedWriterRetires(t, true, false) })
	t.Run("async-client-gone", func(t *testing.T) { fencedWriterRetires(t, true, true) })
}

// fencedWriterRetires: gone says the client's connection closes (its
// context ends) before the role changes: the write must then never run on
// the new role, where the client may have sent it again already, and later
// writes after it.
func fencedWriterRetires(t *testing.T, async, gone bool) {
	mt, nodes := newTestCluster(t, "a", "b")
	mt.create(t, twoCopies("g", 1<<20, "file"))
	streamingMirror(t, nodes["a"].m, "g")
	devA := roleOf(t, nodes["a"].m, "g")
	ctx := context.Background()
	// Promote b while a does not follow the metadata yet: a keeps its
	// Mirror at the old epoch.
	mt.mu.Lock()
	mt.managers = []*Manager{nodes["b"].m}
	mt.mu.Unlock()
	next := promote(t, mt, "g", "b")
	sync1(t, nodes["b"].m)
	page := bytes.Repeat([]byte{7}, 4096)
	errc := make(chan error, 1)
	if async {
		rec := newRecorder()
		p := bytes.Clone(page)
		reqCtx, closeConn := context.WithCancel(ctx)
		defer closeConn()
		devA.WriteAsync(reqCtx, p, 0, 0, recordedWrite{r: rec})
		clear(p) // the caller's buffer is its own again
		if gone {
			closeConn()
		}
		go func() { errc <- <-rec.res }()
	} else {
		go func() { errc <- devA.WriteAt(ctx, page, 0, 0) }()
	}
	time.Sleep(100 * time.Millisecond)
	// Now a learns of the new record: its mirror is retired, the write
	// runs again on a's forwarder.
	nodes["a"].m.Enqueue(cluster.Change{Kind: cluster.Updated, LU: next})
	// From now on a follows the metadata again: the new writer may record
	// a in sync (epoch + 1) before the forwarded write reaches it, and a's
	// forwarder then needs that record to be let in.
	mt.mu.Lock()
	mt.managers = []*Manager{nodes["a"].m, nodes["b"].m}
	mt.mu.Unlock()
	nodes["a"].m.Enqueue(cluster.Change{Kind: cluster.Updated, LU: mt.get("g")})
	err := <-errc
	if gone {
		vb, _ := nodes["b"].pool.Get("g")
		got := make([]byte, 4096)
		if rerr := vb.ReadAt(ctx, got, 0); rerr != nil || bytes.Equal(got, page) || err == nil {
			t.Fatalf("a write whose client went away before the role changed: result %v, on the new writer %v (read err %v); want an error and not there", err, bytes.Equal(got, page), rerr)
		}
		return
	}
	if err != nil {
		t.Fatalf("a write on the fenced writer: %v, want it sent to the new writer", err)
	}
	if rec := mt.get("g"); rec.Writer != "b" || replicaState(rec, "b") != cluster.ReplicaInSync {
		t.Fatalf("the fenced writer changed the record: %+v", rec)
	}
	vb, _ := nodes["b"].pool.Get("g")
	got := make([]byte, 4096)
	if err := vb.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, page) {
		t.Fatalf("the new writer lacks the write (err %v)", err)
	}
}

// restartManager starts a new Manager for node id (its old one closed), with
// the same options, store and pool, and reconciles it with the table.
func restartManager(t *testing.T, mt *metaTwin, nodes map[string]*testNode, id string) *Manager {
	t.Helper()
	n := nodes[id]
	m2, err := NewManager(n.m.opts)
	if err != nil {
		t.Fatal(err)
	}
	mt.mu.Lock()
	for i, m := range mt.managers {
		if m == n.m {
			mt.managers[i] = m2
		}
	}
	lus := make([]cluster.LU, 0, len(mt.lus))
	for _, rec := range mt.lus {
		lus = append(lus, cloneLU(rec))
	}
	mt.mu.Unlock()
	n.m = m2
	n.up(t)
	if err := m2.Reconcile(context.Background(), lus); err != nil {
		t.Fatal(err)
	}
	return m2
}
