package replication

import (
	"context"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/time/rate"
)

// Budget defaults.
const (
	// BudgetTickDefault is how often the budget looks at client latency.
	BudgetTickDefault = 250 * time.Millisecond
	// budgetFloorDivisor: the budget never falls below its maximum over
	// this, so that background work always finishes.
	budgetFloorDivisor = 16
	// budgetMinRequests is how many client requests a tick needs for its
	// latency to count: a handful of requests say nothing.
	budgetMinRequests = 20
	// budgetTargetFloor is the lowest latency target: below it, latency
	// moves with noise, not with load.
	budgetTargetFloor = 500 * time.Microsecond
	// budgetBaselineUnknown is the target before a baseline is measured.
	budgetBaselineUnknown = 2 * time.Millisecond
	// budgetChunkBytes is the largest take from the bucket at once: a
	// resync chunk, a scrub region.
	budgetChunkBytes = 1 << 20
)

// BudgetOptions configure a Budget.
type BudgetOptions struct {
	// BytesPerSecond is the most that resync, rebuild and scrub together
	// may move per second on this node. Required (> 0).
	BytesPerSecond int64
	// ClientLatency returns the client requests this node answered since
	// the last call and their 99th percentile latency (requests slowed by
	// their own QoS limits left out). Required.
	ClientLatency func() (requests int64, p99 time.Duration)
	// LatencyTarget is the client p99 latency above which background work
	// backs off; 0 means twice the p99 measured while no background work
	// ran (at least 500 µs; 2 ms until measured).
	LatencyTarget time.Duration
	// Tick is how often the budget adapts; default BudgetTickDefault.
	Tick   time.Duration
	Logger *slog.Logger
}

// Budget is the per-node allowance of background work (resync, rebuild,
// scrub): a token bucket of bytes per second whose rate adapts to client
// latency, additive increase and multiplicative decrease like TCP's
// congestion window. While background work runs and the node's client p99
// latency over a tick is above the target, the rate halves (down to
// a sixteenth of the maximum, so that the work still ends); otherwise it
// grows by a sixteenth of the maximum per tick, up to the maximum. Each
// kind's own cap (--resync-rate, --scrub-rate) still applies. Safe for
// concurrent use; Run adapts it.
type Budget struct {
	opts BudgetOptions
	lim  *rate.Limiter
	// taken counts the bytes background work took since the last tick.
	taken atomic.Int64
	// rateBytes is the current rate (bytes per second), for metrics.
	rateBytes atomic.Int64
	// baseline is the client p99 measured while no background work ran
	// (an average over ticks); 0 until measured. Run's alone.
	baseline time.Duration
	desc     *prometheus.Desc
}

// NewBudget returns a Budget at its full rate; Run must run for it to
// adapt.
func NewBudget(opts BudgetOptions) *Budget {
	if opts.Tick <= 0 {
		opts.Tick = BudgetTickDefault
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	b := &Budget{opts: opts,
		lim: rate.NewLimiter(rate.Limit(opts.BytesPerSecond), int(max(opts.BytesPerSecond/10, budgetChunkBytes))),
		desc: prometheus.NewDesc("lupool_replication_background_rate_bytes",
			"Bytes per second resync, rebuild and scrub may move on this node now (the background budget, adapted to client latency).", nil, nil)}
	b.rateBytes.Store(opts.BytesPerSecond)
	return b
}

// Take waits until background work may move n more bytes, or until stop
// closes or ctx ends.
func (b *Budget) Take(ctx context.Context, n int64) {
	b.taken.Add(n)
	for n > 0 {
		part := min(n, budgetChunkBytes)
		n -= part
		r := b.lim.ReserveN(time.Now(), int(part))
		if !r.OK() {
			return
		}
		t := time.NewTimer(r.Delay())
		select {
		case <-ctx.Done():
			t.Stop()
			r.Cancel()
			return
		case <-t.C:
		}
	}
}

// Run adapts the rate until ctx ends.
func (b *Budget) Run(ctx context.Context) {
	t := time.NewTicker(b.opts.Tick)
	defer t.Stop()
	b.opts.ClientLatency() // start the first window now
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		requests, p99 := b.opts.ClientLatency()
		b.adapt(requests, p99, b.taken.Swap(0) > 0)
	}
}

// adapt sets the next rate from one tick's client requests, their p99
// latency, and whether background work ran.
func (b *Budget) adapt(requests int64, p99 time.Duration, background bool) {
	maxRate := b.opts.BytesPerSecond
	cur := b.rateBytes.Load()
	next := min(maxRate, cur+maxRate/budgetFloorDivisor)
	if requests >= budgetMinRequests {
		switch {
		case !background:
			// A client-only tick: what latency is without us.
			if b.baseline == 0 {
				b.baseline = p99
			} else {
				b.baseline = (4*b.baseline + p99) / 5
			}
		case p99 > b.target():
			next = max(maxRate/budgetFloorDivisor, cur/2)
			if next != cur {
				b.opts.Logger.Debug("background work backs off: client latency above target",
					"p99", p99, "target", b.target(), "rate_bytes", next)
			}
		}
	}
	if next != cur {
		b.rateBytes.Store(next)
		b.lim.SetLimit(rate.Limit(next))
	}
}

// target is the client latency above which background work backs off.
func (b *Budget) target() time.Duration {
	switch {
	case b.opts.LatencyTarget > 0:
		return b.opts.LatencyTarget
	case b.baseline == 0:
		return budgetBaselineUnknown
	default:
		return max(budgetTargetFloor, 2*b.baseline)
	}
}

// Describe implements prometheus.Collector.
func (b *Budget) Describe(ch chan<- *prometheus.Desc) { ch <- b.desc }

// Collect implements prometheus.Collector.
func (b *Budget) Collect(ch chan<- prometheus.Metric) {
	ch <- prometheus.MustNewConstMetric(b.desc, prometheus.GaugeValue, float64(b.rateBytes.Load()))
}

var _ prometheus.Collector = (*Budget)(nil)

// SetBackground makes resync, rebuild and scrub on m take their bytes from
// b (nil: no shared budget).
func (m *Manager) SetBackground(b *Budget) { m.background.Store(b) }

// takeBackground takes n bytes of background work from the node's budget,
// if it has one, waiting until stop closes at most.
func (m *Manager) takeBackground(n int64, stop <-chan struct{}) {
	b := m.background.Load()
	if b == nil || n <= 0 {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-stop:
			cancel()
		case <-ctx.Done():
		}
	}()
	b.Take(ctx, n)
}
