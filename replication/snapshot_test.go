package replication

import (
	"bytes"
	"context"
	"errors"
	"math/rand"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/internal/testseed"
)

// TestSnapshotMarkerFreezesEveryCopyAtOnePoint: while writers keep
// writing numbered blocks through the Mirror, a snapshot freezes the
// writer's volume and the copy's between the same writes: both snapshots
// read the same, every block acknowledged before the snapshot call is in
// it, and the copies of the LU stay equal. A rollback then makes both
// copies read the snapshot. With the copy out of sync a snapshot is
// refused and nothing is frozen.
func TestSnapshotMarkerFreezesEveryCopyAtOnePoint(t *testing.T) {
	rng := rand.New(rand.NewSource(int64(testseed.Seed(t, "./replication/"))))
	ctx := context.Background()
	mt, nodes := newTestCluster(t, "a", "b")
	const size = 4 << 20
	mt.create(t, twoCopies("x", size, "file"))
	a, b := nodes["a"], nodes["b"]
	mir := streamingMirror(t, a.m, "x")

	// Writers: block i holds the number of its latest write; acked[i] the
	// last number acknowledged. Block i is written by writer i%4 only, so
	// writes to one block never overlap.
	const blocks = size / 4096
	var acked [blocks]atomic.Int64
	var seq atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 4 {
		r := rand.New(rand.NewSource(rng.Int63() + int64(w)))
		wg.Go(func() {
			p := make([]byte, 4096)
			for {
				select {
				case <-stop:
					return
				default:
				}
				i := r.Intn(blocks/4)*4 + w // each writer owns its blocks: one write at a time per block
				n := seq.Add(1)
				for j := range p {
					p[j] = byte(n >> (8 * (j % 8)))
				}
				if err := mir.WriteAt(ctx, p, int64(i)*4096, 0); err != nil {
					t.Errorf("write: %v", err)
					return
				}
				for old := acked[i].Load(); old < n && !acked[i].CompareAndSwap(old, n); old = acked[i].Load() {
				}
			}
		})
	}
	waitFor(t, "some writes", func() bool { return seq.Load() > 500 })
	var before [blocks]int64
	for i := range before {
		before[i] = acked[i].Load()
	}
	froze, err := a.m.Snapshot(ctx, "x", "s1")
	close(stop)
	wg.Wait()
	if err != nil {
		t.Fatal(err)
	}
	if len(froze) != 2 || froze[0] != "a" || froze[1] != "b" {
		t.Fatalf("froze on %v, want [a b]", froze)
	}
	snapA, okA := a.pool.Get("x@s1")
	snapB, okB := b.pool.Get("x@s1")
	if !okA || !okB {
		t.Fatal("x@s1 missing on a node")
	}
	atSnap := readAll(t, snapA)
	if !bytes.Equal(atSnap, readAll(t, snapB)) {
		t.Fatal("the snapshots of the writer and of the copy differ")
	}
	for i := range blocks {
		got := int64(0)
		for j := range 8 {
			got |= int64(atSnap[i*4096+j]) << (8 * j)
		}
		if got < before[i] {
			t.Fatalf("block %d holds write %d in the snapshot; write %d was acknowledged before it", i, got, before[i])
		}
	}
	if err := mir.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	va, _ := a.m.Volume("x")
	vb, _ := b.m.Volume("x")
	if !bytes.Equal(readAll(t, va), readAll(t, vb)) {
		t.Fatal("the copies of x differ after the snapshot")
	}

	if err := a.m.Rollback(ctx, "x", "x@s1"); err != nil {
		t.Fatal(err)
	}
	for _, v := range []interface {
		ReadAt(context.Context, []byte, int64) error
	}{va, vb} {
		got := make([]byte, size)
		if err := v.ReadAt(ctx, got, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, atSnap) {
			t.Fatal("after rollback a copy does not read the snapshot")
		}
	}

	b.down()
	if err := mir.WriteAt(ctx, make([]byte, 4096), 0, 0); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "b out of sync", func() bool { return mt.get("x").Replicas[1].State != cluster.ReplicaInSync })
	if _, err := a.m.Snapshot(ctx, "x", "s2"); !errors.Is(err, ErrCopyNotInSync) {
		t.Fatalf("snapshot with the copy out of sync: %v, want ErrCopyNotInSync", err)
	}
	if _, ok := a.pool.Get("x@s2"); ok {
		t.Fatal("a refused snapshot left x@s2 on the writer")
	}
}
