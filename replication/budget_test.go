package replication

import (
	"context"
	"testing"
	"time"
)

// TestBudgetAdapts walks the budget's controller through ticks: client
// latency without background work sets the baseline, latency above twice
// it while background work runs halves the rate down to the floor, and
// quiet ticks grow it back to the maximum.
func TestBudgetAdapts(t *testing.T) {
	const maxRate = 160 << 20
	b := NewBudget(BudgetOptions{BytesPerSecond: maxRate, ClientLatency: func() (int64, time.Duration) { return 0, 0 }})
	tick := func(requests int64, avg time.Duration, background bool) int64 {
		b.adapt(requests, avg, background)
		return b.rateBytes.Load()
	}
	if got := b.target(); got != budgetBaselineUnknown {
		t.Fatalf("target before a baseline: %v", got)
	}
	for range 5 {
		tick(1000, 400*time.Microsecond, false)
	}
	if b.baseline != 400*time.Microsecond || b.target() != 800*time.Microsecond {
		t.Fatalf("baseline %v target %v, want 400µs and 800µs", b.baseline, b.target())
	}
	if got := tick(1000, 700*time.Microsecond, true); got != maxRate {
		t.Fatalf("latency under the target: rate %d, want the maximum", got)
	}
	want := []int64{maxRate / 2, maxRate / 4, maxRate / 8, maxRate / 16, maxRate / 16}
	for i, w := range want {
		if got := tick(1000, 3*time.Millisecond, true); got != w {
			t.Fatalf("slow tick %d: rate %d, want %d", i, got, w)
		}
	}
	// Too few requests to judge: grow.
	if got := tick(5, 50*time.Millisecond, true); got != maxRate/16+maxRate/16 {
		t.Fatalf("a tick of 5 requests: rate %d", got)
	}
	for range 20 {
		tick(1000, 500*time.Microsecond, true)
	}
	if got := b.rateBytes.Load(); got != maxRate {
		t.Fatalf("after fast ticks: rate %d, want the maximum", got)
	}
	// The baseline does not move while background work runs.
	if b.baseline != 400*time.Microsecond {
		t.Fatalf("baseline moved to %v", b.baseline)
	}
	if fixed := NewBudget(BudgetOptions{BytesPerSecond: 1, LatencyTarget: 3 * time.Millisecond}); fixed.target() != 3*time.Millisecond {
		t.Fatalf("explicit target %v", fixed.target())
	}
}

// TestBudgetTake: takes wait for the rate, and end with their context.
func TestBudgetTake(t *testing.T) {
	b := NewBudget(BudgetOptions{BytesPerSecond: 4 << 20, ClientLatency: func() (int64, time.Duration) { return 0, 0 }})
	start := time.Now()
	b.Take(context.Background(), 3<<20) // 1 MiB of burst, then 2 MiB at 4 MiB/s
	if took := time.Since(start); took < 400*time.Millisecond || took > 900*time.Millisecond {
		t.Fatalf("3 MiB at 4 MiB/s with a 1 MiB burst took %v", took)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	start = time.Now()
	b.Take(ctx, 64<<20)
	if took := time.Since(start); took > 300*time.Millisecond {
		t.Fatalf("a take whose context ended after 50 ms returned after %v", took)
	}
	if b.taken.Load() != 67<<20 {
		t.Fatalf("taken %d", b.taken.Load())
	}
}

// TestResyncTakesFromBudget: a resync's bytes come out of the node's
// background budget, so a budget of 2 MiB/s makes a 4 MiB resync take at
// least 1.5 s (one 1 MiB burst, then 3 MiB at the rate).
func TestResyncTakesFromBudget(t *testing.T) {
	mt, nodes := newTestCluster(t, "a", "b")
	mt.create(t, twoCopies("r", 8<<20, "file"))
	a, b := nodes["a"], nodes["b"]
	mir := streamingMirror(t, a.m, "r")
	budget := NewBudget(BudgetOptions{BytesPerSecond: 2 << 20, ClientLatency: func() (int64, time.Duration) { return 0, 0 }})
	a.m.SetBackground(budget)
	b.down()
	p := make([]byte, 1<<20)
	for i := range 4 {
		p[0] = byte(i + 1)
		if err := mir.WriteAt(context.Background(), p, int64(i)<<20, 0); err != nil {
			t.Fatal(err)
		}
	}
	start := time.Now()
	b.up(t)
	waitFor(t, "b in sync", func() bool { return mt.get("r").Replicas[1].State == "in-sync" })
	if took := time.Since(start); took < 1400*time.Millisecond {
		t.Fatalf("a 4 MiB resync under a 2 MiB/s budget took %v", took)
	}
	if got := budget.taken.Load(); got < 4<<20 {
		t.Fatalf("the budget saw %d bytes of the resync", got)
	}
}
