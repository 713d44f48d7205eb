package replication

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/internal/testseed"
)

// recorder is a blockdev.Completion for tests: results arrive on res, and
// it checks the flush contract (every Complete that returned it is
// followed by a FlushReplies).
type recorder struct {
	res       chan error
	completed atomic.Int64
	unflushed atomic.Int64 // Completes not yet followed by a FlushReplies
	flushes   atomic.Int64
}

func newRecorder() *recorder { return &recorder{res: make(chan error, 1024)} }

type recordedWrite struct {
	r *recorder
	// check, if set, runs at completion; its error replaces a nil result.
	check func() error
}

func (w recordedWrite) Complete(err error) blockdev.ReplyFlusher {
	if err == nil && w.check != nil {
		err = w.check()
	}
	w.r.completed.Add(1)
	w.r.unflushed.Store(1)
	w.r.res <- err
	return w.r
}

func (r *recorder) FlushReplies() {
	r.unflushed.Store(0)
	r.flushes.Add(1)
}

// wait collects n results.
func (r *recorder) wait(t *testing.T, n int) []error {
	t.Helper()
	var errs []error
	timeout := time.After(20 * time.Second)
	for range n {
		select {
		case err := <-r.res:
			errs = append(errs, err)
		case <-timeout:
			t.Fatalf("only %d of %d writes completed", len(errs), n)
		}
	}
	select {
	case err := <-r.res:
		t.Fatalf("an extra completion (%v): a write completed twice", err)
	case <-time.After(20 * time.Millisecond):
	}
	// The flush follows the last Complete on the same goroutine, a moment
	// after the result is sent.
	waitFor(t, "the last replies flushed", func() bool { return r.unflushed.Load() == 0 })
	return errs
}

// TestMirrorAsyncWrites drives WriteAsync the way the NBD engine does (one
// goroutine starts writes, the stream's reader completes them) with many
// writes in flight: both copies match the model; then the copy dies with
// writes in flight: every write still completes without error, the copy
// ends out of sync with the missed ranges dirty, and a resync brings it back
// equal. (That the loss is recorded before a missed write completes is
// TestMirrorAsyncRecordsLossBeforeCompleting's.)
func TestMirrorAsyncWrites(t *testing.T) {
	rng := rand.New(rand.NewSource(int64(testseed.Seed(t, "./replication/"))))
	mt, nodes := newTestCluster(t, "a", "b")
	const size = 4 << 20
	mt.create(t, twoCopies("x", size, "file"))
	a, b := nodes["a"], nodes["b"]
	mir := streamingMirror(t, a.m, "x")
	if !mir.AsyncWrites() {
		t.Fatal("a mirror with a copy does not take asynchronous writes")
	}
	ctx := context.Background()
	model := make([]byte, size)
	rec := newRecorder()
	start := func(n int, between func(i int)) {
		for i := range n {
			off := int64(rng.Intn(size/4096)) * 4096
			p := make([]byte, min(int64(1+rng.Intn(4))*4096, size-off))
			rng.Read(p)
			copy(model[off:], p)
			mir.WriteAsync(ctx, p, off, 0, recordedWrite{r: rec})
			clear(p) // the mirror must be done with p once WriteAsync returns
			if between != nil {
				between(i)
			}
		}
	}

	start(200, nil)
	for i, err := range rec.wait(t, 200) {
		if err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
	}
	if rec.flushes.Load() == 0 {
		t.Fatal("no FlushReplies after 200 completions")
	}
	if !bytes.Equal(readAll(t, mir), model) {
		t.Fatal("writer differs from the model")
	}
	vb, _ := b.m.Volume("x")
	if !bytes.Equal(readAll(t, vb), model) {
		t.Fatal("copy differs from the model")
	}

	// The copy dies with writes in flight.
	start(200, func(i int) {
		if i == 50 {
			b.down()
		}
	})
	for i, err := range rec.wait(t, 200) {
		if err != nil {
			t.Fatalf("write %d after the copy died: %v (a lost copy must not fail writes)", i, err)
		}
	}
	if got := mt.get("x"); got.Replicas[1].State != cluster.ReplicaOutOfSync || got.Epoch != 2 {
		t.Fatalf("after b failed: %+v; want b out-of-sync at epoch 2", got)
	}
	if !bytes.Equal(readAll(t, mir), model) {
		t.Fatal("writer differs from the model after the copy failed")
	}
	// While b is out of sync, writes complete at once and are recorded
	// dirty.
	dirtyBefore := mir.linkSet()[0].dirty.dirtyBytes()
	start(50, nil)
	rec.wait(t, 50)
	if d := mir.linkSet()[0].dirty.dirtyBytes(); d < dirtyBefore || d == 0 {
		t.Fatalf("dirty bytes %d after writes while out of sync (before: %d)", d, dirtyBefore)
	}
	b.up(t)
	waitFor(t, "b in sync", func() bool { return mt.get("x").Replicas[1].State == cluster.ReplicaInSync })
	if !bytes.Equal(readAll(t, vb), model) {
		t.Fatal("copy differs from the model after resync")
	}
}

// TestMirrorAsyncRecordsLossBeforeCompleting: after the copy dies, no
// write it missed completes before the copy is recorded out of sync, however
// long the metadata leader takes.
func TestMirrorAsyncRecordsLossBeforeCompleting(t *testing.T) {
	mt, nodes := newTestCluster(t, "a", "b")
	mt.create(t, twoCopies("y", 1<<20, "memory"))
	mir := streamingMirror(t, nodes["a"].m, "y")
	release := make(chan struct{})
	mt.mu.Lock()
	mt.block = release
	mt.mu.Unlock()
	nodes["b"].down()
	check := func() error {
		if st := mt.get("y").Replicas[1].State; st != cluster.ReplicaOutOfSync {
			return fmt.Errorf("a write b missed completed while b was %s", st)
		}
		return nil
	}
	rec := newRecorder()
	for i := range 20 {
		mir.WriteAsync(context.Background(), make([]byte, 4096), int64(i)*4096, 0, recordedWrite{rec, check})
	}
	select {
	case err := <-rec.res:
		t.Fatalf("a write completed (%v) while b's loss could not be recorded", err)
	case <-time.After(300 * time.Millisecond):
	}
	mt.mu.Lock()
	mt.block = nil
	mt.mu.Unlock()
	close(release)
	for i, err := range rec.wait(t, 20) {
		if err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
	}
}

// TestMirrorAsyncNoLeaderFailsWrite: when the copy is gone and its loss
// cannot be recorded, an asynchronous write completes with ErrIO rather
// than being acknowledged.
func TestMirrorAsyncNoLeaderFailsWrite(t *testing.T) {
	mt, nodes := newTestCluster(t, "a", "b")
	mt.create(t, twoCopies("y", 1<<20, "memory"))
	mir := streamingMirror(t, nodes["a"].m, "y")
	mt.mu.Lock()
	mt.refuse = true
	mt.mu.Unlock()
	nodes["b"].down()
	rec := newRecorder()
	mir.WriteAsync(context.Background(), make([]byte, 4096), 0, 0, recordedWrite{r: rec})
	if err := rec.wait(t, 1)[0]; !errors.Is(err, blockdev.ErrIO) {
		t.Fatalf("write with a dead copy and no metadata leader: %v, want ErrIO", err)
	}
}

// TestStreamForgetsAnsweredBatches: a stream that carries only frames of
// holdMaxBytes or more (never held back) still drops the batches that were
// answered, so its bookkeeping stays small.
func TestStreamForgetsAnsweredBatches(t *testing.T) {
	mt, nodes := newTestCluster(t, "a", "b")
	mt.create(t, cluster.LU{Name: "g", SizeBytes: 16 << 20, Kind: "memory", Copies: 1, Writer: "a", CreatedOn: "a", Epoch: 1,
		Replicas: []cluster.Replica{{NodeID: "a", State: cluster.ReplicaInSync}}})
	fb := exported(t, nodes["b"].m, "g").(*Forwarder)
	buf := make([]byte, 512<<10)
	for i := range 200 {
		if err := fb.WriteAt(context.Background(), buf, int64(i%16)*int64(len(buf)), 0); err != nil {
			t.Fatal(err)
		}
	}
	c := fb.conn.Load()
	c.qmu.Lock()
	n := len(c.batchEnds)
	c.qmu.Unlock()
	if n > sendWindow+1 {
		t.Fatalf("%d batches remembered after 200 answered writes of 512 KiB, want at most %d", n, sendWindow+1)
	}
}
