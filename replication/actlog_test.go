package replication

import (
	"errors"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/cockroachdb/pebble/v2/vfs"
)

// TestActivityLogRules: a region is durable in the store before begin
// returns; it leaves the log only with no write in flight and a flush
// since its last write; past twice the limit the log flushes the local
// volume itself; a failed synced batch fails the writes that waited on it
// and leaves nothing counted.
func TestActivityLogRules(t *testing.T) {
	const rb = 64 << 10
	s := openStore(t, vfs.NewMem(), false)
	defer s.Close()
	var localFlushes atomic.Int32
	a := newActivityLog(s, "lu", rb, 5, func() error { localFlushes.Add(1); return nil })
	stored := func() int64 {
		t.Helper()
		r, err := s.loadActive("lu")
		if err != nil {
			t.Fatal(err)
		}
		var n int64
		for _, x := range r {
			n += x[1]
		}
		return n / rb
	}

	// A write over two regions puts both in the log, on disk.
	if err := a.begin(rb-4096, 8192); err != nil {
		t.Fatal(err)
	}
	if got := stored(); got != 2 {
		t.Fatalf("%d regions on disk after begin, want 2", got)
	}
	a.end(rb-4096, 8192)

	// Six more regions: over the limit, but nothing was flushed, so
	// nothing leaves.
	for r := int64(2); r < 8; r++ {
		if err := a.begin(r*rb, 4096); err != nil {
			t.Fatal(err)
		}
		a.end(r*rb, 4096)
	}
	if a.size() != 8 || stored() != 8 {
		t.Fatalf("log %d regions, %d on disk; want all 8 (none flushed)", a.size(), stored())
	}
	// A flush, then one more region: the oldest flushed ones leave, down
	// to 3/4 of the limit; one in flight stays.
	if err := a.begin(0, 4096); err != nil { // in flight through the flush
		t.Fatal(err)
	}
	n := a.flushStart()
	a.flushDone(n)
	if err := a.begin(9*rb, 4096); err != nil {
		t.Fatal(err)
	}
	a.end(9*rb, 4096)
	a.mu.Lock()
	_, kept0 := a.regions[0]
	_, kept9 := a.regions[9]
	a.mu.Unlock()
	if !kept0 || !kept9 || a.size() != 3 {
		t.Fatalf("after a flush: %d regions (region 0 in flight kept %v, region 9 written after kept %v), want 3 with both", a.size(), kept0, kept9)
	}
	if got := stored(); got != 3 {
		t.Fatalf("%d regions on disk after eviction, want 3", got)
	}
	a.end(0, 4096)

	// Past twice the limit with nothing flushed, the log flushes the local
	// volume itself and evicts.
	for r := int64(10); r < 20; r++ {
		if err := a.begin(r*rb, 4096); err != nil {
			t.Fatal(err)
		}
		a.end(r*rb, 4096)
	}
	if localFlushes.Load() == 0 || a.size() > 2*a.limit {
		t.Fatalf("after 10 unflushed regions: %d local flushes, %d regions; want a flush and at most %d", localFlushes.Load(), a.size(), 2*a.limit)
	}

	// Concurrent writers to new regions all wait for the batch.
	var wg sync.WaitGroup
	for r := int64(100); r < 116; r++ {
		wg.Go(func() {
			if err := a.begin(r*rb, 4096); err != nil {
				t.Error(err)
				return
			}
			a.mu.Lock()
			durable := a.regions[uint64(r)].durable
			a.mu.Unlock()
			if !durable {
				t.Errorf("region %d not durable when begin returned", r)
			}
			a.end(r*rb, 4096)
		})
	}
	wg.Wait()

	// A store that fails: the write fails, nothing stays counted.
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := a.begin(500*rb, 4096); !errors.Is(err, ErrDirtyStoreClosed) {
		t.Fatalf("begin on a closed store: %v, want ErrDirtyStoreClosed", err)
	}
	a.mu.Lock()
	e := a.regions[500]
	a.mu.Unlock()
	if e != nil && (e.inflight != 0 || e.durable) {
		t.Fatalf("failed region left %+v, want not counted, not durable", *e)
	}
}
