package replication

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/lu"
)

// blockWriters writes numbered 4 KiB blocks through each device (four
// writers each, at most two devices, each writer on blocks of its own) until
// stop is closed; every acknowledged (block, version) is recorded, and any
// error is reported.
type blockWriters struct {
	mu    sync.Mutex
	acked map[int64]uint64 // block -> highest acknowledged version
	errs  []error
	wg    sync.WaitGroup
}

func startBlockWriters(devs []*roleDevice, blocks int64, stop chan struct{}) *blockWriters {
	bw := &blockWriters{acked: map[int64]uint64{}}
	for i, dev := range devs {
		for lane := range 4 { // a few requests in flight per device
			bw.wg.Add(1)
			go func() {
				defer bw.wg.Done()
				page := make([]byte, lu.BlockSizeBytes)
				for v := uint64(1); ; v++ {
					select {
					case <-stop:
						return
					default:
					}
					// Each writer has blocks of its own, so that its
					// versions order the writes to them.
					w := int64(i*4 + lane)
					b := w + 8*((int64(v)*104729)%(blocks/8))
					version := uint64(w)<<40 | v
					binary.BigEndian.PutUint64(page, uint64(b))
					binary.BigEndian.PutUint64(page[8:], version)
					err := dev.WriteAt(context.Background(), page, b*lu.BlockSizeBytes, 0)
					bw.mu.Lock()
					if err != nil {
						bw.errs = append(bw.errs, err)
					} else if version > bw.acked[b] {
						bw.acked[b] = version
					}
					bw.mu.Unlock()
					if err != nil {
						return
					}
				}
			}()
		}
	}
	return bw
}

// TestHandOverUnderWrites: clients of both nodes write while the writer
// hands the LU over to its in-sync copy. No write fails; the target takes
// over without recording any copy out of sync (no distrust after a clean
// handover); both volumes end identical and hold every acknowledged write.
// A second handover back whose switch is refused rolls back: the writer
// goes on, no error.
func TestHandOverUnderWrites(t *testing.T) {
	mt, nodes := newTestCluster(t, "a", "b")
	const size = 1 << 20
	mt.create(t, twoCopies("f", size, "file"))
	streamingMirror(t, nodes["a"].m, "f")
	devs := []*roleDevice{roleOf(t, nodes["a"].m, "f"), roleOf(t, nodes["b"].m, "f")}
	stop := make(chan struct{})
	bw := startBlockWriters(devs, size/lu.BlockSizeBytes, stop)
	time.Sleep(100 * time.Millisecond)

	before := mt.get("f")
	pause, err := nodes["a"].m.HandOver(context.Background(), "f", "b", time.Second, 5*time.Second, func(ctx context.Context) error {
		next := cloneLU(before)
		next.Writer, next.Epoch = "b", before.Epoch+1
		next.HandoverEpoch = next.Epoch
		return mt.update(ctx, next, before.Epoch)
	})
	if err != nil {
		t.Fatalf("hand over: %v", err)
	}
	t.Logf("pause %v", pause)
	sync1(t, nodes["b"].m)
	if _, ok := exported(t, nodes["b"].m, "f").(*Mirror); !ok {
		t.Fatalf("b does not write f after the handover")
	}
	if _, ok := exported(t, nodes["a"].m, "f").(*Forwarder); !ok {
		t.Fatalf("a still writes f after the handover")
	}
	time.Sleep(100 * time.Millisecond)

	// Back to a, refused (the LU moved on meanwhile): a rollback.
	mid := mt.get("f")
	_, err = nodes["b"].m.HandOver(context.Background(), "f", "a", time.Second, 5*time.Second, func(context.Context) error {
		return cluster.ErrIllegalMove
	})
	if !errors.Is(err, cluster.ErrIllegalMove) {
		t.Fatalf("a refused switch: %v", err)
	}
	time.Sleep(100 * time.Millisecond)
	close(stop)
	bw.wg.Wait()
	if len(bw.errs) > 0 {
		t.Fatalf("%d writes failed across the handovers, the first: %v", len(bw.errs), bw.errs[0])
	}
	after := mt.get("f")
	if after.Epoch != mid.Epoch || after.Writer != "b" {
		t.Errorf("after the refused handover the LU is at writer %s epoch %d, want b at %d", after.Writer, after.Epoch, mid.Epoch)
	}
	if mid.Epoch != before.Epoch+1 {
		t.Errorf("the new writer changed the record on taking over (epoch %d → %d): a clean handover keeps every copy in sync", before.Epoch+1, mid.Epoch)
	}
	for _, r := range after.Replicas {
		if r.State != cluster.ReplicaInSync {
			t.Errorf("copy on %s is %s after a clean handover", r.NodeID, r.State)
		}
	}
	va, _ := nodes["a"].pool.Get("f")
	vb, _ := nodes["b"].pool.Get("f")
	da, db := readAll(t, va), readAll(t, vb)
	if !bytes.Equal(da, db) {
		t.Fatalf("the volumes differ after the handovers")
	}
	for b, v := range bw.acked {
		got := binary.BigEndian.Uint64(da[b*lu.BlockSizeBytes+8:])
		if binary.BigEndian.Uint64(da[b*lu.BlockSizeBytes:]) != uint64(b) || got < v {
			t.Errorf("block %d holds version %#x, acknowledged %#x", b, got, v)
		}
	}
}
