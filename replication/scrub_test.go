package replication

import (
	"bytes"
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/lupool/lupool/replication/replproto"
)

// TestScrubRepairsDivergedCopy changes a copy's volume behind the writer's
// back: the scrub finds exactly the changed regions, rewrites them from the
// writer, reports, counts and hooks each repair, and the copies are equal
// afterwards; a copy over the threshold is reported degraded.
func TestScrubRepairsDivergedCopy(t *testing.T) {
	mt, nodes := newTestCluster(t, "a", "b")
	const size = 4 << 20 // 64 regions of 64 KiB
	mt.create(t, twoCopies("s", size, "file"))
	mir := streamingMirror(t, nodes["a"].m, "s")
	ctx := context.Background()
	data := bytes.Repeat([]byte("lupool scrub "), size/13)
	if err := mir.WriteAt(ctx, data[:size/2], 0, 0); err != nil {
		t.Fatal(err)
	}
	var hooked []ScrubRepair
	sc := NewScrubber(nodes["a"].m, ScrubOptions{Interval: -1, DegradedRegions: 1, OnRepair: func(r ScrubRepair) { hooked = append(hooked, r) }})

	report, err := sc.Scrub(ctx, "s")
	if err != nil || len(report.Repairs) != 0 || report.Regions != 64 || !slices.Equal(report.Copies, []string{"b"}) {
		t.Fatalf("scrub of equal copies: %+v, %v", report, err)
	}
	// Behind the writer's back: a flipped byte in allocated data, and
	// bytes where the writer has a hole.
	vb, _ := nodes["b"].m.Volume("s")
	if err := vb.WriteAt(ctx, []byte{data[70000] ^ 0x01}, 70000, 0); err != nil {
		t.Fatal(err)
	}
	if err := vb.WriteAt(ctx, []byte("stray"), 3<<20+5, 0); err != nil {
		t.Fatal(err)
	}
	report, err = sc.Scrub(ctx, "s")
	if err != nil {
		t.Fatal(err)
	}
	want := []ScrubRepair{{LU: "s", Copy: "b", OffsetBytes: 64 << 10, LengthBytes: 64 << 10}, {LU: "s", Copy: "b", OffsetBytes: 3 << 20, LengthBytes: 64 << 10}}
	if !slices.Equal(report.Repairs, want) || !slices.Equal(hooked, want) || len(report.Skipped) != 0 {
		t.Fatalf("repairs %+v, hooked %+v, skipped %v; want %+v", report.Repairs, hooked, report.Skipped, want)
	}
	if !bytes.Equal(readAll(t, vb), readAll(t, mir)) {
		t.Fatal("copy differs from the writer after the scrub")
	}
	st, ok := sc.Status("s")
	if !ok || st.Running || st.LastRepaired != 2 || st.Repaired["b"] != 2 || !slices.Equal(st.Degraded, []string{"b"}) ||
		st.RegionsDone != 64 || st.RegionsTotal != 64 || st.LastFinished.IsZero() {
		t.Fatalf("status %+v", st)
	}
	if n := testutil.CollectAndCount(sc, "lupool_replication_scrub_repaired_regions_total"); n != 1 {
		t.Fatalf("%d repair series, want 1", n)
	}
	expected := `
# HELP lupool_replication_scrub_repaired_regions_total Regions of a copy the scrub found different from the writer's and rewrote from it, since this node became the LU's writer.
# TYPE lupool_replication_scrub_repaired_regions_total counter
lupool_replication_scrub_repaired_regions_total{copy="b",lu="s"} 2
`
	if err := testutil.CollectAndCompare(sc, strings.NewReader(expected), "lupool_replication_scrub_repaired_regions_total"); err != nil {
		t.Fatal(err)
	}
	// The copy stayed in sync throughout: a repair is not a resync.
	if got := mt.get("s"); got.Epoch != 1 {
		t.Fatalf("epoch %d after the scrub, want 1", got.Epoch)
	}
	// Only the writer scrubs.
	if _, err := NewScrubber(nodes["b"].m, ScrubOptions{}).Scrub(ctx, "s"); !errors.Is(err, replproto.ErrNotWriter) {
		t.Fatalf("scrub on a copy's node: %v", err)
	}
}

// TestScrubUnderWrites scrubs while a writer rewrites regions: writes in
// flight are never taken for divergence (no repairs), and the copies end
// equal.
func TestScrubUnderWrites(t *testing.T) {
	mt, nodes := newTestCluster(t, "a", "b")
	const size = 2 << 20
	mt.create(t, twoCopies("w", size, "file"))
	mir := streamingMirror(t, nodes["a"].m, "w")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() {
		p := make([]byte, 16<<10)
		for i := 0; ; i++ {
			if ctx.Err() != nil {
				done <- nil
				return
			}
			p[0] = byte(i)
			if err := mir.WriteAt(context.Background(), p, int64(i*4096)%size, 0); err != nil {
				done <- err
				return
			}
		}
	}()
	sc := NewScrubber(nodes["a"].m, ScrubOptions{Interval: -1})
	for range 3 {
		report, err := sc.Scrub(context.Background(), "w")
		if err != nil || len(report.Repairs) != 0 || len(report.Skipped) != 0 {
			t.Fatalf("scrub under writes: %+v, %v", report, err)
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	vb, _ := nodes["b"].m.Volume("w")
	if !bytes.Equal(readAll(t, vb), readAll(t, mir)) {
		t.Fatal("copies differ")
	}
}

// TestScrubSchedule: an LU is due once per interval at its own slot, never
// when first seen.
func TestScrubSchedule(t *testing.T) {
	mt, nodes := newTestCluster(t, "a", "b")
	mt.create(t, twoCopies("p", 1<<20, "memory"))
	streamingMirror(t, nodes["a"].m, "p")
	const interval = time.Hour
	sc := NewScrubber(nodes["a"].m, ScrubOptions{Interval: interval})
	slot := scrubSlot("p", interval)
	base := time.Unix(0, 0).Add(1000*interval + slot) // at the slot of a period
	if due := sc.due(base.Add(time.Minute)); len(due) != 0 {
		t.Fatalf("due when first seen: %v", due)
	}
	if due := sc.due(base.Add(interval - time.Minute)); len(due) != 0 {
		t.Fatalf("due within the same period: %v", due)
	}
	if due := sc.due(base.Add(interval + time.Minute)); !slices.Equal(due, []string{"p"}) {
		t.Fatalf("not due in the next period: %v", due)
	}
	if due := sc.due(base.Add(interval + 2*time.Minute)); len(due) != 0 {
		t.Fatalf("due twice in a period: %v", due)
	}
	if s1, s2 := scrubSlot("p", interval), scrubSlot("q", interval); s1 == s2 || s1 >= interval || s2 >= interval {
		t.Fatalf("slots %v %v", s1, s2)
	}
	// The copy's node writes nothing: nothing is due there.
	if due := NewScrubber(nodes["b"].m, ScrubOptions{Interval: interval}).due(base); len(due) != 0 {
		t.Fatalf("due on a copy's node: %v", due)
	}
}
