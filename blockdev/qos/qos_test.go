package qos

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/blockdev/blockdevtest"
)

func wrapped(t *testing.T, lim Limits) (*Device, *Set, *Metrics) {
	t.Helper()
	m := NewMetrics()
	s := NewSet(m)
	s.SetLimits("lu", lim)
	dev, err := s.Wrap("lu", blockdevtest.NewMem(64<<20, blockdev.Caps{}))
	if err != nil {
		t.Fatal(err)
	}
	return dev.(*Device), s, m
}

// run issues requests from depth goroutines for d and returns how many
// completed.
func run(t *testing.T, depth int, d time.Duration, req func(ctx context.Context) error) int64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	var n atomic.Int64
	var wg sync.WaitGroup
	for range depth {
		wg.Go(func() {
			for {
				err := req(ctx)
				if ctx.Err() != nil {
					return
				}
				if err != nil {
					t.Error(err)
					return
				}
				n.Add(1)
			}
		})
	}
	wg.Wait()
	return n.Load()
}

// TestIOPSLimit: 32 requesters at once get the limit (plus one burst), for
// reads and writes separately; the other direction is not limited.
func TestIOPSLimit(t *testing.T) {
	const iops, window = 400, time.Second
	dev, _, m := wrapped(t, Limits{WriteIOPS: iops, ReadIOPS: 2 * iops})
	p := make([]byte, 4096)
	writes := run(t, 32, window, func(ctx context.Context) error { return dev.WriteAt(ctx, p, 0, 0) })
	want := float64(iops)*window.Seconds() + iops*BurstDefault.Seconds()
	if f := float64(writes); f < 0.85*want || f > 1.1*want {
		t.Errorf("%d writes in %v at %d IOPS; want about %.0f", writes, window, iops, want)
	}
	reads := run(t, 32, window, func(ctx context.Context) error { return dev.ReadAt(ctx, p, 0) })
	if f := float64(reads); f < 0.85*2*want || f > 1.1*2*want {
		t.Errorf("%d reads in %v at %d IOPS; want about %.0f", reads, window, 2*iops, 2*want)
	}
	if v := testutil.ToFloat64(m.throttled.WithLabelValues("lu", "write")); v < float64(writes)/2 {
		t.Errorf("throttled writes %v of %d", v, writes)
	}
	if v := testutil.ToFloat64(m.waited.WithLabelValues("lu", "write")); v < 1 {
		t.Errorf("write wait seconds %v; 32 requesters waited about 1 s each", v)
	}
}

// TestBytesLimit: a request larger than the byte bucket waits for it in
// parts; the time for 1 MiB at 1 MiB/s is about a second less the burst.
func TestBytesLimit(t *testing.T) {
	dev, _, _ := wrapped(t, Limits{WriteBytesPerSecond: 1 << 20})
	p := make([]byte, 256<<10)
	start := time.Now()
	for range 4 {
		if err := dev.WriteAt(context.Background(), p, 0, 0); err != nil {
			t.Fatal(err)
		}
	}
	if took := time.Since(start); took < 800*time.Millisecond || took > 1500*time.Millisecond {
		t.Errorf("1 MiB at 1 MiB/s took %v", took)
	}
	// Reads are not limited.
	start = time.Now()
	for range 64 {
		if err := dev.ReadAt(context.Background(), p, 0); err != nil {
			t.Fatal(err)
		}
	}
	if took := time.Since(start); took > 500*time.Millisecond {
		t.Errorf("16 MiB of unlimited reads took %v", took)
	}
}

// TestWaitEndsWithContext: a request waiting for tokens fails with its
// context's error when the client goes away, and gives its tokens back.
func TestWaitEndsWithContext(t *testing.T) {
	dev, _, _ := wrapped(t, Limits{WriteIOPS: 1, Burst: time.Millisecond})
	p := make([]byte, 512)
	if err := dev.WriteAt(context.Background(), p, 0, 0); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := dev.WriteAt(ctx, p, 0, 0); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("write over the limit with a 50 ms context: %v", err)
	}
}

// TestLimitsChangeOnline: limits set and lifted apply to the next request;
// the engine's shortcuts turn off while a limit applies.
func TestLimitsChangeOnline(t *testing.T) {
	dev, s, _ := wrapped(t, Limits{})
	p := make([]byte, 4096)
	// Unlimited and lifted: at least 200 writes in 200 ms, 20 times the
	// limit below (an in-memory write takes microseconds; the bound leaves
	// room for a loaded machine).
	if n := run(t, 4, 200*time.Millisecond, func(ctx context.Context) error { return dev.WriteAt(ctx, p, 0, 0) }); n < 200 {
		t.Fatalf("unlimited: %d writes in 200 ms", n)
	}
	if ok, err := dev.TryReadAt(context.Background(), p, 0); ok || err != nil {
		t.Fatalf("TryReadAt on a device that cannot try: %v %v", ok, err)
	}
	s.SetLimits("lu", Limits{WriteIOPS: 50, ReadIOPS: 50})
	if dev.AsyncWrites() {
		t.Fatal("AsyncWrites while writes are limited")
	}
	if dev.InlineIO() {
		t.Fatal("InlineIO while limited")
	}
	if n := run(t, 4, 500*time.Millisecond, func(ctx context.Context) error { return dev.WriteAt(ctx, p, 0, 0) }); n > 40 {
		t.Fatalf("at 50 IOPS: %d writes in 500 ms", n)
	}
	s.SetLimits("lu", Limits{})
	if n := run(t, 4, 200*time.Millisecond, func(ctx context.Context) error { return dev.WriteAt(ctx, p, 0, 0) }); n < 200 {
		t.Fatalf("limit lifted: %d writes in 200 ms", n)
	}
}

// TestTryReadTakesTokens: a try that finds no tokens answers false at
// once, and one that finds them counts.
func TestTryReadTakesTokens(t *testing.T) {
	m := NewMetrics()
	s := NewSet(m)
	s.SetLimits("lu", Limits{ReadIOPS: 10, Burst: 100 * time.Millisecond}) // one token
	dev, err := s.Wrap("lu", tryDev{blockdevtest.NewMem(1<<20, blockdev.Caps{})})
	if err != nil {
		t.Fatal(err)
	}
	d := dev.(*Device)
	p := make([]byte, 512)
	if ok, err := d.TryReadAt(context.Background(), p, 0); !ok || err != nil {
		t.Fatalf("first try: %v %v", ok, err)
	}
	start := time.Now()
	if ok, err := d.TryReadAt(context.Background(), p, 0); ok || err != nil || time.Since(start) > 10*time.Millisecond {
		t.Fatalf("try without tokens: %v %v after %v", ok, err, time.Since(start))
	}
}

// tryDev is a device that can try reads.
type tryDev struct{ *blockdevtest.Mem }

func (d tryDev) TryReadAt(ctx context.Context, p []byte, off int64) (bool, error) {
	return true, d.ReadAt(ctx, p, off)
}

// TestForgetDeletesSeries and Wrap's refusal of a device without the
// interfaces it forwards.
func TestForgetAndWrap(t *testing.T) {
	dev, s, m := wrapped(t, Limits{WriteIOPS: 1, Burst: time.Millisecond})
	p := make([]byte, 512)
	for range 2 {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
		_ = dev.WriteAt(ctx, p, 0, 0)
		cancel()
	}
	if n := testutil.CollectAndCount(m.throttled); n != 1 {
		t.Fatalf("%d throttled series, want 1 (write; reads never waited)", n)
	}
	s.Forget("lu")
	if n := testutil.CollectAndCount(m.throttled) + testutil.CollectAndCount(m.waited); n != 0 {
		t.Fatalf("%d series after Forget", n)
	}
	// A device still open after its LU went counts nowhere.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	_ = dev.WriteAt(ctx, p, 0, 0)
	cancel()
	if n := testutil.CollectAndCount(m.throttled); n != 0 {
		t.Fatalf("%d series after a forgotten LU's device waited", n)
	}
	// Limits read from a table do not overwrite those a change set.
	s.SetLimits("y", Limits{WriteIOPS: 7})
	s.SetInitialLimits("y", Limits{})
	if !s.Limiter("y").limited(opWrite) {
		t.Fatal("SetInitialLimits overwrote newer limits")
	}
	if _, err := s.Wrap("x", plainDev{blockdevtest.NewMem(4096, blockdev.Caps{})}); !errors.Is(err, ErrUnsupported) {
		t.Fatalf("Wrap of a device without trim: %v", err)
	}
}

// plainDev hides every optional interface of its device.
type plainDev struct{ d blockdev.Device }

func (p plainDev) Size() int64                                         { return p.d.Size() }
func (p plainDev) Caps() blockdev.Caps                                 { return p.d.Caps() }
func (p plainDev) ReadAt(ctx context.Context, b []byte, o int64) error { return p.d.ReadAt(ctx, b, o) }
func (p plainDev) WriteAt(ctx context.Context, b []byte, o int64, f blockdev.Flags) error {
	return p.d.WriteAt(ctx, b, o, f)
}
func (p plainDev) Flush(ctx context.Context) error { return p.d.Flush(ctx) }

// BenchmarkUnlimited is the filter's cost on a request when the LU has no
// limit, and when it has one far above the load.
func BenchmarkUnlimited(b *testing.B) {
	for _, tc := range []struct {
		name string
		lim  Limits
	}{{"none", Limits{}}, {"high", Limits{WriteIOPS: 1 << 30, WriteBytesPerSecond: 1 << 40}}} {
		b.Run(tc.name, func(b *testing.B) {
			s := NewSet(NewMetrics())
			s.SetLimits("lu", tc.lim)
			dev, err := s.Wrap("lu", blockdevtest.NewMem(1<<20, blockdev.Caps{}))
			if err != nil {
				b.Fatal(err)
			}
			p := make([]byte, 4096)
			ctx := context.Background()
			b.ReportAllocs()
			b.SetBytes(4096)
			for b.Loop() {
				if err := dev.WriteAt(ctx, p, 0, 0); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
