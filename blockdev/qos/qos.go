// Package qos limits the client I/O of one LU on one node: operations and
// bytes per second, separately for reads and writes, each a token bucket
// with a burst (golang.org/x/time/rate). It is a blockdev filter, like an
// nbdkit filter stacked on a plugin: Wrap returns a device that takes its
// tokens before it calls the device below.
//
// A request over the limit waits; it never fails (unless its context ends:
// the client went away). The wait happens where the front end runs the
// request, so the requests waiting on one connection are bounded by that
// connection's in-flight limit, and memory by its in-flight bytes: a
// throttled client fills its pipeline and then is not read from until
// tokens come. For that the filter turns off the front end's shortcuts
// that run requests on the connection's reading goroutine while a limit
// applies to them (InlineIO, AsyncWrites; TryReadAt answers "not now" when
// it would have to wait), so that a waiting request never holds back the
// reading of others.
//
// What counts: a read is one read operation and its length in read bytes;
// a write one write operation and its length in write bytes; a trim or a
// write-zeroes one write operation and no bytes (they move no data over
// the wire). Flush, block status and cache requests are not limited.
//
// Every device of one LU on a node (its connections through this node's
// NBD server) shares the LU's Limiter, so the limit holds per LU and node;
// each node that serves the LU applies the same limit from the LU's
// record. Limits change at any time (Set.SetLimits) and apply to the next
// request; a change refills the buckets.
package qos

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/time/rate"

	"github.com/lupool/lupool/blockdev"
)

// BurstDefault is how long a quiet LU saves up its allowance when Limits
// names no burst: a tenth of a second lets a client's queue of requests
// start at once without letting it run much over its rate in any second.
const BurstDefault = 100 * time.Millisecond

// ErrUnsupported is returned by Wrap for a device without trim,
// write-zeroes or allocation status, which every device lupool exports
// has: the filter would otherwise have to advertise what it cannot do.
var ErrUnsupported = errors.New("qos: device lacks an interface the filter forwards")

// Limits are one LU's limits. A zero rate is unlimited.
type Limits struct {
	ReadIOPS, WriteIOPS                     int64
	ReadBytesPerSecond, WriteBytesPerSecond int64
	// Burst is how much unused allowance a bucket holds, as time at its
	// rate; 0 means BurstDefault. A bucket holds at least one operation,
	// and a request larger than a byte bucket waits for it in parts.
	Burst time.Duration
}

// Zero reports whether l limits nothing.
func (l Limits) Zero() bool {
	return l.ReadIOPS == 0 && l.WriteIOPS == 0 && l.ReadBytesPerSecond == 0 && l.WriteBytesPerSecond == 0
}

// op is the kind of a limited request.
type op int

const (
	opRead op = iota
	opWrite
	opCount
)

var opNames = [opCount]string{opRead: "read", opWrite: "write"}

// buckets are the token buckets of one set of limits; a nil bucket is
// unlimited. Immutable once built (rate.Limiter is safe for concurrent
// use).
type buckets struct {
	ops, bytes [opCount]*rate.Limiter
	// limited[o] says ops[o] or bytes[o] is set.
	limited [opCount]bool
}

func bucket(perSecond int64, burst time.Duration) *rate.Limiter {
	if perSecond <= 0 {
		return nil
	}
	size := max(1, int(min(float64(perSecond)*burst.Seconds(), math.MaxInt32)))
	return rate.NewLimiter(rate.Limit(perSecond), size)
}

func newBuckets(l Limits) *buckets {
	if l.Zero() {
		return nil
	}
	burst := l.Burst
	if burst <= 0 {
		burst = BurstDefault
	}
	b := &buckets{}
	b.ops[opRead], b.bytes[opRead] = bucket(l.ReadIOPS, burst), bucket(l.ReadBytesPerSecond, burst)
	b.ops[opWrite], b.bytes[opWrite] = bucket(l.WriteIOPS, burst), bucket(l.WriteBytesPerSecond, burst)
	for o := range opCount {
		b.limited[o] = b.ops[o] != nil || b.bytes[o] != nil
	}
	return b
}

// reserve takes one operation and n bytes of o's tokens at now and returns
// the reservations and how long the request must wait for them.
func (b *buckets) reserve(o op, n int64, now time.Time, rs []*rate.Reservation) ([]*rate.Reservation, time.Duration) {
	var delay time.Duration
	take := func(lim *rate.Limiter, count int) {
		r := lim.ReserveN(now, count)
		rs = append(rs, r)
		delay = max(delay, r.DelayFrom(now))
	}
	if lim := b.ops[o]; lim != nil {
		take(lim, 1)
	}
	if lim := b.bytes[o]; lim != nil {
		// Parts of at most the bucket's size: ReserveN refuses more.
		for part := int64(lim.Burst()); n > 0; n -= part {
			take(lim, int(min(n, part)))
		}
	}
	return rs, delay
}

// Limiter applies one LU's limits on this node. Safe for concurrent use.
type Limiter struct {
	// b is the current buckets; nil when nothing is limited.
	b atomic.Pointer[buckets]
	// name and metrics say where the requests that waited and the
	// seconds they waited are counted, per op: series made on the first
	// wait, so that an LU that never waits has none. Immutable.
	name    string
	metrics *Metrics
	// forgotten is set once the LU is gone (Set.Forget): its series are
	// deleted and must not come back.
	forgotten atomic.Bool
}

// count records one request of o that waited d.
func (l *Limiter) count(o op, d time.Duration) {
	if l.forgotten.Load() {
		return
	}
	l.metrics.throttled.WithLabelValues(l.name, opNames[o]).Inc()
	l.metrics.waited.WithLabelValues(l.name, opNames[o]).Add(d.Seconds())
}

// SetLimits replaces the limits; the next request sees them.
func (l *Limiter) SetLimits(lim Limits) { l.b.Store(newBuckets(lim)) }

// limited reports whether o is limited now.
func (l *Limiter) limited(o op) bool {
	b := l.b.Load()
	return b != nil && b.limited[o]
}

// wait takes o's tokens for a request of n bytes, waiting for them as long
// as it takes. It fails only when ctx ends first, and then gives the
// tokens back.
func (l *Limiter) wait(ctx context.Context, o op, n int64) error {
	b := l.b.Load()
	if b == nil || !b.limited[o] {
		return nil
	}
	var buf [4]*rate.Reservation
	now := time.Now()
	rs, delay := b.reserve(o, n, now, buf[:0])
	if delay <= 0 {
		return nil
	}
	t := time.NewTimer(delay)
	defer t.Stop()
	select {
	case <-t.C:
		l.count(o, delay)
		return nil
	case <-ctx.Done():
		cancelAt := time.Now()
		undo(rs, cancelAt)
		l.count(o, cancelAt.Sub(now))
		return ctx.Err()
	}
}

// try takes o's tokens for a request of n bytes if they are there now. It
// reports whether it did, and returns the reservations to cancel (undo) if
// the request then does not run.
func (l *Limiter) try(o op, n int64, rs []*rate.Reservation) ([]*rate.Reservation, bool) {
	b := l.b.Load()
	if b == nil || !b.limited[o] {
		return rs, true
	}
	now := time.Now()
	rs, delay := b.reserve(o, n, now, rs)
	if delay <= 0 {
		return rs, true
	}
	undo(rs, now)
	return rs[:0], false
}

// undo gives the tokens of reservations rs back.
func undo(rs []*rate.Reservation, now time.Time) {
	for _, r := range rs {
		r.CancelAt(now)
	}
}

// Metrics are the filter's per-LU series, built unregistered; cmd registers
// them (Collectors). Set.Forget deletes an LU's series.
type Metrics struct {
	throttled, waited *prometheus.CounterVec
}

// NewMetrics builds the filter's metrics.
func NewMetrics() *Metrics {
	return &Metrics{
		throttled: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lupool_qos_throttled_requests_total",
			Help: "Client requests to the LU through this node that waited for its QoS limit, by op (read or write).",
		}, []string{"lu", "op"}),
		waited: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lupool_qos_wait_seconds_total",
			Help: "Seconds client requests to the LU through this node waited for its QoS limit, by op (read or write).",
		}, []string{"lu", "op"}),
	}
}

// Collectors returns the metrics to register.
func (m *Metrics) Collectors() []prometheus.Collector {
	return []prometheus.Collector{m.throttled, m.waited}
}

// Set holds the Limiters of the LUs on this node. Safe for concurrent use.
type Set struct {
	metrics *Metrics
	mu      struct {
		sync.Mutex
		lus map[string]*Limiter // guarded by mu
	}
}

// NewSet returns an empty Set that counts into m.
func NewSet(m *Metrics) *Set {
	s := &Set{metrics: m}
	s.mu.lus = map[string]*Limiter{}
	return s
}

// Limiter returns the LU's Limiter, made (unlimited) on first use.
func (s *Set) Limiter(name string) *Limiter {
	s.mu.Lock()
	defer s.mu.Unlock()
	if l, ok := s.mu.lus[name]; ok {
		return l
	}
	l := &Limiter{name: name, metrics: s.metrics}
	s.mu.lus[name] = l
	return l
}

// SetLimits sets the LU's limits.
func (s *Set) SetLimits(name string, lim Limits) { s.Limiter(name).SetLimits(lim) }

// SetInitialLimits sets the LU's limits unless it has a Limiter already:
// limits from a table read before later changes must not overwrite what
// those changes set.
func (s *Set) SetInitialLimits(name string, lim Limits) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.mu.lus[name]; ok {
		return
	}
	l := &Limiter{name: name, metrics: s.metrics}
	l.SetLimits(lim)
	s.mu.lus[name] = l
}

// Forget drops the LU's Limiter and deletes its series: the LU is gone. A
// device still wrapped keeps its Limiter, whose counts no registry reports.
func (s *Set) Forget(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if l, ok := s.mu.lus[name]; ok {
		l.forgotten.Store(true)
	}
	delete(s.mu.lus, name)
	s.metrics.throttled.DeletePartialMatch(prometheus.Labels{"lu": name})
	s.metrics.waited.DeletePartialMatch(prometheus.Labels{"lu": name})
}

// Wrap returns dev behind the LU's Limiter. dev must implement
// blockdev.Trimmer, Zeroer and Extenter (ErrUnsupported otherwise);
// TryReader, AsyncWriter, Cacher and InlineIO are forwarded when dev has
// them.
func (s *Set) Wrap(name string, dev blockdev.Device) (blockdev.Device, error) {
	d := &Device{inner: dev, lim: s.Limiter(name)}
	var ok1, ok2, ok3 bool
	d.trimmer, ok1 = dev.(blockdev.Trimmer)
	d.zeroer, ok2 = dev.(blockdev.Zeroer)
	d.extenter, ok3 = dev.(blockdev.Extenter)
	if !ok1 || !ok2 || !ok3 {
		return nil, fmt.Errorf("%w: %T (trim %v, write-zeroes %v, extents %v)", ErrUnsupported, dev, ok1, ok2, ok3)
	}
	d.tryr, _ = dev.(blockdev.TryReader)
	d.asyncw, _ = dev.(blockdev.AsyncWriter)
	d.cacher, _ = dev.(blockdev.Cacher)
	d.inliner, _ = dev.(interface{ InlineIO() bool })
	return d, nil
}

// Device is a blockdev.Device behind a Limiter. Its optional interfaces
// are resolved once, in Wrap.
type Device struct {
	inner    blockdev.Device
	lim      *Limiter
	trimmer  blockdev.Trimmer
	zeroer   blockdev.Zeroer
	extenter blockdev.Extenter
	tryr     blockdev.TryReader   // nil if inner has none
	asyncw   blockdev.AsyncWriter // nil if inner has none
	cacher   blockdev.Cacher      // nil if inner has none
	inliner  interface{ InlineIO() bool }
}

var (
	_ blockdev.Device      = (*Device)(nil)
	_ blockdev.Trimmer     = (*Device)(nil)
	_ blockdev.Zeroer      = (*Device)(nil)
	_ blockdev.Extenter    = (*Device)(nil)
	_ blockdev.TryReader   = (*Device)(nil)
	_ blockdev.AsyncWriter = (*Device)(nil)
	_ blockdev.Cacher      = (*Device)(nil)
)

// Size implements blockdev.Device.
func (d *Device) Size() int64 { return d.inner.Size() }

// Caps implements blockdev.Device.
func (d *Device) Caps() blockdev.Caps { return d.inner.Caps() }

// ReadAt implements blockdev.Device: it waits for a read and len(p) bytes.
func (d *Device) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := d.lim.wait(ctx, opRead, int64(len(p))); err != nil {
		return err
	}
	return d.inner.ReadAt(ctx, p, off)
}

// WriteAt implements blockdev.Device: it waits for a write and len(p)
// bytes.
func (d *Device) WriteAt(ctx context.Context, p []byte, off int64, flags blockdev.Flags) error {
	if err := d.lim.wait(ctx, opWrite, int64(len(p))); err != nil {
		return err
	}
	return d.inner.WriteAt(ctx, p, off, flags)
}

// Flush implements blockdev.Device; not limited.
func (d *Device) Flush(ctx context.Context) error { return d.inner.Flush(ctx) }

// Trim implements blockdev.Trimmer: it waits for a write.
func (d *Device) Trim(ctx context.Context, off, length int64, flags blockdev.Flags) error {
	if err := d.lim.wait(ctx, opWrite, 0); err != nil {
		return err
	}
	return d.trimmer.Trim(ctx, off, length, flags)
}

// WriteZeroes implements blockdev.Zeroer: it waits for a write.
func (d *Device) WriteZeroes(ctx context.Context, off, length int64, flags blockdev.Flags) error {
	if err := d.lim.wait(ctx, opWrite, 0); err != nil {
		return err
	}
	return d.zeroer.WriteZeroes(ctx, off, length, flags)
}

// Extents implements blockdev.Extenter; not limited.
func (d *Device) Extents(ctx context.Context, off, length int64, dst []blockdev.Extent) ([]blockdev.Extent, error) {
	return d.extenter.Extents(ctx, off, length, dst)
}

// TryReadAt implements blockdev.TryReader: false, without waiting, when
// the device below cannot try or the read's tokens are not there now (the
// caller then calls ReadAt, which waits for them).
func (d *Device) TryReadAt(ctx context.Context, p []byte, off int64) (bool, error) {
	if d.tryr == nil {
		return false, nil
	}
	var buf [4]*rate.Reservation
	rs, ok := d.lim.try(opRead, int64(len(p)), buf[:0])
	if !ok {
		return false, nil
	}
	done, err := d.tryr.TryReadAt(ctx, p, off)
	if !done && err == nil {
		// The read goes to ReadAt, which takes its tokens again: give
		// these back rather than count the read twice.
		undo(rs, time.Now())
	}
	return done, err
}

// AsyncWrites implements blockdev.AsyncWriter: only while writes are not
// limited (a write that waits must wait on a goroutine of its own, not on
// the connection's reader).
func (d *Device) AsyncWrites() bool {
	return d.asyncw != nil && !d.lim.limited(opWrite) && d.asyncw.AsyncWrites()
}

// WriteAsync implements blockdev.AsyncWriter. A limit set since
// AsyncWrites answered is waited for here.
func (d *Device) WriteAsync(ctx context.Context, p []byte, off int64, flags blockdev.Flags, done blockdev.Completion) {
	if err := d.lim.wait(ctx, opWrite, int64(len(p))); err != nil {
		if fl := done.Complete(err); fl != nil {
			fl.FlushReplies()
		}
		return
	}
	d.asyncw.WriteAsync(ctx, p, off, flags, done)
}

// Cache implements blockdev.Cacher: forwarded, or a no-op.
func (d *Device) Cache(ctx context.Context, off, length int64) error {
	if d.cacher == nil {
		return nil
	}
	return d.cacher.Cache(ctx, off, length)
}

// InlineIO is the NBD engine's inline-device check: only while nothing is
// limited (a request that waits must not run on the connection's reader).
func (d *Device) InlineIO() bool {
	return d.inliner != nil && d.lim.b.Load() == nil && d.inliner.InlineIO()
}
