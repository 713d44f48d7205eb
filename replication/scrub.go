package replication

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/lupool/lupool/replication/replproto"
)

// Scrub defaults.
const (
	// ScrubIntervalDefault is how often the schedule scrubs each LU: a
	// week, as DRBD's and ZFS's usual verify and scrub cadence.
	ScrubIntervalDefault = 7 * 24 * time.Hour
	// ScrubDegradedRegionsDefault is how many repaired regions make a copy
	// count as degraded: one region may be a torn write or a bit flip; a
	// handful say the copy's disk or node is bad.
	ScrubDegradedRegionsDefault = 8
	// scrubTickMax bounds how long the schedule sleeps between looks at
	// the LUs it writes.
	scrubTickMax = time.Minute
)

// ErrScrubRunning is returned by Scrubber.Scrub when a scrub of the LU is
// already running on this node.
var ErrScrubRunning = errors.New("replication: a scrub of this LU is already running")

// ScrubOptions configure a Scrubber.
type ScrubOptions struct {
	// Interval is how often the schedule scrubs each LU this node writes;
	// each LU at its own offset within the interval (a hash of its name),
	// so the pool never scrubs everything at once. 0 means
	// ScrubIntervalDefault; negative turns the schedule off (Scrub still
	// works).
	Interval time.Duration
	// DegradedRegions is the number of repaired regions above which a copy
	// is reported degraded. 0 means ScrubDegradedRegionsDefault.
	DegradedRegions int64
	// BytesPerSecond bounds the bytes a scrub hashes per second on the
	// writer (each copy hashes as much); 0 means no bound.
	BytesPerSecond int64
	// OnRepair, if set, is called once per repaired region, after the
	// repair: the hook through which the event log records it.
	OnRepair func(ScrubRepair)
	// Logger receives one line per repair and per scrub. Default: discard.
	Logger *slog.Logger
}

// ScrubRepair is one region of a copy that differed from the writer's and
// was rewritten from it.
type ScrubRepair struct {
	LU          string `json:"lu"`
	Copy        string `json:"copy"`
	OffsetBytes int64  `json:"offset_bytes"`
	LengthBytes int64  `json:"length_bytes"`
}

// ScrubReport is the outcome of one scrub of an LU.
type ScrubReport struct {
	Name        string
	RegionBytes int64
	// Regions is how many regions were compared with each copy.
	Regions int64
	// Copies are the in-sync copies compared (the writer excluded).
	Copies []string
	// Repairs are the regions rewritten from the writer.
	Repairs []ScrubRepair
	// Skipped names the copies not compared (to the end) and why.
	Skipped  map[string]string
	Started  time.Time
	Finished time.Time
}

// ScrubStatus is what this node, as an LU's writer, knows of its scrubs.
type ScrubStatus struct {
	Running                   bool
	RegionsDone, RegionsTotal int64
	// LastStarted and LastFinished are the times of the last scrub that
	// finished (zero if none has yet).
	LastStarted, LastFinished time.Time
	// LastRepaired is how many regions the last finished scrub repaired.
	LastRepaired int64
	// Repaired counts repaired regions per copy since this node became
	// the writer; Degraded lists the copies over the threshold.
	Repaired map[string]int64
	Degraded []string
}

// scrubState is one LU's scrub bookkeeping. Guarded by Scrubber.mu.
type scrubState struct {
	running                   bool
	regionsDone, regionsTotal int64
	lastStarted, lastFinished time.Time
	lastRepaired              int64
	repaired                  map[string]int64
	// period is the schedule period the LU was last scrubbed (or first
	// seen) in.
	period int64
	seen   bool
}

// Scrubber compares the copies of the LUs this node writes with its own
// volume, region by region by SHA-256, and repairs a region that differs
// from the writer (whose data is authoritative: copies only ever lag it).
// A region that differs is compared again with the region's stripe held
// exclusively before it is repaired: a write in flight holds the stripe
// shared until every copy has it, so it is waited out, not mistaken for a
// divergence. Scrubs run on demand (Scrub) and on a schedule (Run). Safe
// for concurrent use.
type Scrubber struct {
	m    *Manager
	opts ScrubOptions

	mu struct {
		sync.Mutex
		lus map[string]*scrubState // guarded by mu
	}

	descRepairs, descRegions, descLast, descProgress, descDegraded *prometheus.Desc
}

// NewScrubber returns a Scrubber of m's LUs.
func NewScrubber(m *Manager, opts ScrubOptions) *Scrubber {
	if opts.Interval == 0 {
		opts.Interval = ScrubIntervalDefault
	}
	if opts.DegradedRegions <= 0 {
		opts.DegradedRegions = ScrubDegradedRegionsDefault
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Scrubber{m: m, opts: opts,
		descRepairs: prometheus.NewDesc("lupool_replication_scrub_repaired_regions_total",
			"Regions of a copy the scrub found different from the writer's and rewrote from it, since this node became the LU's writer.", []string{"lu", "copy"}, nil),
		descRegions: prometheus.NewDesc("lupool_replication_scrub_regions",
			"Regions of the LU the running (or last) scrub has compared so far, and its total.", []string{"lu", "of"}, nil),
		descLast: prometheus.NewDesc("lupool_replication_scrub_last_finished_timestamp_seconds",
			"When the last scrub of the LU finished (Unix time); absent before the first.", []string{"lu"}, nil),
		descProgress: prometheus.NewDesc("lupool_replication_scrub_running",
			"1 while a scrub of the LU runs on this node.", []string{"lu"}, nil),
		descDegraded: prometheus.NewDesc("lupool_replication_scrub_degraded",
			"1 when the scrub repaired more regions of the copy than the degraded threshold.", []string{"lu", "copy"}, nil),
	}
	s.mu.lus = map[string]*scrubState{}
	return s
}

// stateLocked returns name's bookkeeping, made on first use. s.mu must be
// held.
func (s *Scrubber) stateLocked(name string) *scrubState {
	st, ok := s.mu.lus[name]
	if !ok {
		st = &scrubState{repaired: map[string]int64{}}
		s.mu.lus[name] = st
	}
	return st
}

// Status returns the scrub status of an LU this node writes, and false for
// an LU it does not write.
func (s *Scrubber) Status(name string) (ScrubStatus, bool) {
	if _, ok := s.m.mirror(name); !ok {
		return ScrubStatus{}, false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.stateLocked(name)
	out := ScrubStatus{Running: st.running, RegionsDone: st.regionsDone, RegionsTotal: st.regionsTotal,
		LastStarted: st.lastStarted, LastFinished: st.lastFinished, LastRepaired: st.lastRepaired,
		Repaired: map[string]int64{}}
	for node, n := range st.repaired {
		out.Repaired[node] = n
		if n > s.opts.DegradedRegions {
			out.Degraded = append(out.Degraded, node)
		}
	}
	slices.Sort(out.Degraded)
	return out, true
}

// Scrub compares every in-sync copy of the LU with this node's volume, as
// its writer, and repairs the regions that differ; it returns when done.
// It fails with an error wrapping replproto.ErrNotWriter if this node does
// not write the LU, ErrScrubRunning if a scrub of it runs already, and
// ctx's error if ctx ends first. A copy that cannot be compared (its
// stream is down, or it fails) is skipped with the reason in the report.
func (s *Scrubber) Scrub(ctx context.Context, name string) (ScrubReport, error) {
	dev, ok := s.m.mirror(name)
	if !ok {
		return ScrubReport{}, fmt.Errorf("%w: %s does not write %s", replproto.ErrNotWriter, s.m.opts.NodeID, name)
	}
	mi := dev.(*Mirror)
	regions := (mi.local.Size() + mi.regionBytes - 1) / mi.regionBytes
	s.mu.Lock()
	st := s.stateLocked(name)
	if st.running {
		s.mu.Unlock()
		return ScrubReport{}, fmt.Errorf("%w: %s", ErrScrubRunning, name)
	}
	st.running, st.regionsDone, st.regionsTotal = true, 0, regions
	s.mu.Unlock()

	report := ScrubReport{Name: name, RegionBytes: mi.regionBytes, Repairs: []ScrubRepair{},
		Skipped: map[string]string{}, Started: time.Now()}
	err := s.scrub(ctx, mi, &report, regions)
	report.Finished = time.Now()

	s.mu.Lock()
	st.running = false
	if err == nil {
		st.lastStarted, st.lastFinished, st.lastRepaired = report.Started, report.Finished, int64(len(report.Repairs))
	}
	s.mu.Unlock()
	if err != nil {
		return ScrubReport{}, err
	}
	s.opts.Logger.Info(fmt.Sprintf("scrub done: %d regions, %d repaired", report.Regions, len(report.Repairs)),
		"lu", name, "copies", report.Copies, "skipped", report.Skipped,
		"took", report.Finished.Sub(report.Started).Round(time.Millisecond))
	return report, nil
}

// scrub runs Scrub's compare over every region.
func (s *Scrubber) scrub(ctx context.Context, mi *Mirror, report *ScrubReport, regions int64) error {
	var links []*copyLink
	for _, l := range mi.linkSet() {
		if copyState(l.state.Load()) != stInSync {
			report.Skipped[l.node] = "copy is " + copyState(l.state.Load()).replicaState() + ": a resync, not a scrub, brings it level"
			continue
		}
		links = append(links, l)
		report.Copies = append(report.Copies, l.node)
	}
	s.mu.Lock()
	st := s.stateLocked(mi.name)
	for _, l := range links {
		st.repaired[l.node] += 0 // a copy compared has a series, 0 until a repair
	}
	s.mu.Unlock()
	for r := int64(0); r < regions && len(links) > 0; r++ {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := mi.resyncCheckStop(); err != nil {
			return fmt.Errorf("%w: %s is closing", ErrPeerDown, mi.name)
		}
		off := r * mi.regionBytes
		n := min(mi.regionBytes, mi.local.Size()-off)
		for _, l := range links {
			if _, skipped := report.Skipped[l.node]; skipped {
				continue
			}
			repaired, err := s.scrubRegion(mi, l, uint64(r), off, n)
			if err != nil {
				report.Skipped[l.node] = fmt.Sprintf("stopped at offset %d: %v", off, err)
				continue
			}
			if repaired {
				s.repaired(ScrubRepair{LU: mi.name, Copy: l.node, OffsetBytes: off, LengthBytes: n}, report)
			}
		}
		report.Regions++
		s.mu.Lock()
		s.stateLocked(mi.name).regionsDone = r + 1
		s.mu.Unlock()
		s.pace(ctx, n)
	}
	return nil
}

// scrubRegion compares region r ([off, off+n)) of copy l with the local
// volume and repairs it if it still differs with the region's stripe held
// exclusively. It returns whether it repaired the region. A copy that
// fails while being repaired is recorded out of sync for the region (a
// resync finishes the repair).
func (s *Scrubber) scrubRegion(mi *Mirror, l *copyLink, r uint64, off, n int64) (bool, error) {
	if copyState(l.state.Load()) != stInSync {
		return false, fmt.Errorf("copy is %s", copyState(l.state.Load()).replicaState())
	}
	equal, err := mi.regionEqual(l, off, n)
	if err != nil || equal {
		return false, err
	}
	// Differs: compare again once no write to the region is in flight.
	stripe := &mi.stripes[r%stripeCount]
	stripe.Lock()
	defer stripe.Unlock()
	if equal, err := mi.regionEqual(l, off, n); err != nil || equal {
		return false, err
	}
	_, err = mi.sendRuns(l, [][2]int64{{off, n}})
	if err == nil {
		equal, err = mi.regionEqual(l, off, n)
		if err == nil && !equal {
			err = fmt.Errorf("%w: %s, offset %d", errHashMismatch, l.node, off)
		}
	}
	if err != nil {
		if missErr := mi.copyMissed(l, off, n, err); missErr != nil {
			err = errors.Join(err, missErr)
		}
		return false, err
	}
	return true, nil
}

// repaired counts, logs and reports one repair.
func (s *Scrubber) repaired(rp ScrubRepair, report *ScrubReport) {
	report.Repairs = append(report.Repairs, rp)
	s.mu.Lock()
	st := s.stateLocked(rp.LU)
	st.repaired[rp.Copy]++
	total := st.repaired[rp.Copy]
	s.mu.Unlock()
	s.opts.Logger.Warn("scrub repaired a region of a copy that differed from the writer",
		"lu", rp.LU, "copy", rp.Copy, "offset", rp.OffsetBytes, "length", rp.LengthBytes, "repaired_regions", total)
	if total == s.opts.DegradedRegions+1 {
		s.opts.Logger.Error("copy degraded: the scrub repaired more regions than the threshold",
			"lu", rp.LU, "copy", rp.Copy, "repaired_regions", total, "threshold", s.opts.DegradedRegions)
	}
	if s.opts.OnRepair != nil {
		s.opts.OnRepair(rp)
	}
}

// pace takes the bytes from the node's background budget and sleeps long
// enough to keep the scrub at BytesPerSecond.
func (s *Scrubber) pace(ctx context.Context, hashedBytes int64) {
	if b := s.m.background.Load(); b != nil {
		b.Take(ctx, hashedBytes)
	}
	if s.opts.BytesPerSecond <= 0 {
		return
	}
	t := time.NewTimer(time.Duration(float64(hashedBytes) / float64(s.opts.BytesPerSecond) * float64(time.Second)))
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// scrubSlot is name's offset within the schedule interval.
func scrubSlot(name string, interval time.Duration) time.Duration {
	h := fnv.New64a()
	_, _ = h.Write([]byte(name))
	return time.Duration(h.Sum64() % uint64(interval))
}

// scrubPeriod is the schedule period of name at now: it advances once per
// interval, at the LU's slot.
func scrubPeriod(name string, interval time.Duration, now time.Time) int64 {
	return (now.UnixNano() - int64(scrubSlot(name, interval))) / int64(interval)
}

// Run scrubs, until ctx ends, each LU this node writes once per interval
// at its slot (an LU first seen is scrubbed at its next slot, not at once,
// so a restart does not scrub the whole pool). LUs are scrubbed one at a
// time. It returns at once when the schedule is off.
func (s *Scrubber) Run(ctx context.Context) {
	if s.opts.Interval < 0 {
		return
	}
	tick := min(s.opts.Interval/16, scrubTickMax)
	t := time.NewTicker(max(tick, 10*time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for _, name := range s.due(time.Now()) {
			if _, err := s.Scrub(ctx, name); err != nil && ctx.Err() == nil && !errors.Is(err, ErrScrubRunning) {
				s.opts.Logger.Warn("scheduled scrub failed", "lu", name, "err", err)
			}
		}
	}
}

// due returns the LUs this node writes whose schedule period has advanced
// since they were last scrubbed, and forgets the LUs it no longer writes.
func (s *Scrubber) due(now time.Time) []string {
	s.m.mu.Lock()
	var names []string
	for name, d := range s.m.mu.devices {
		if _, ok := d.(*Mirror); ok {
			names = append(names, name)
		}
	}
	s.m.mu.Unlock()
	slices.Sort(names)
	s.mu.Lock()
	defer s.mu.Unlock()
	for name := range s.mu.lus {
		if !slices.Contains(names, name) {
			delete(s.mu.lus, name)
		}
	}
	var due []string
	for _, name := range names {
		st := s.stateLocked(name)
		p := scrubPeriod(name, s.opts.Interval, now)
		switch {
		case !st.seen:
			st.seen, st.period = true, p
		case p > st.period && !st.running:
			st.period = p
			due = append(due, name)
		}
	}
	return due
}

// Describe implements prometheus.Collector.
func (s *Scrubber) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{s.descRepairs, s.descRegions, s.descLast, s.descProgress, s.descDegraded} {
		ch <- d
	}
}

// Collect implements prometheus.Collector: the series of the LUs this node
// writes, read from their scrub state at scrape time (an LU's series go
// with the LU, or when this node stops writing it).
func (s *Scrubber) Collect(ch chan<- prometheus.Metric) {
	s.m.mu.Lock()
	writes := map[string]bool{}
	for name, d := range s.m.mu.devices {
		_, writes[name] = d.(*Mirror)
	}
	s.m.mu.Unlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	for name, st := range s.mu.lus {
		if !writes[name] {
			continue
		}
		for node, n := range st.repaired {
			ch <- prometheus.MustNewConstMetric(s.descRepairs, prometheus.CounterValue, float64(n), name, node)
			degraded := 0.0
			if n > s.opts.DegradedRegions {
				degraded = 1
			}
			ch <- prometheus.MustNewConstMetric(s.descDegraded, prometheus.GaugeValue, degraded, name, node)
		}
		ch <- prometheus.MustNewConstMetric(s.descRegions, prometheus.GaugeValue, float64(st.regionsDone), name, "done")
		ch <- prometheus.MustNewConstMetric(s.descRegions, prometheus.GaugeValue, float64(st.regionsTotal), name, "total")
		running := 0.0
		if st.running {
			running = 1
		}
		ch <- prometheus.MustNewConstMetric(s.descProgress, prometheus.GaugeValue, running, name)
		if !st.lastFinished.IsZero() {
			ch <- prometheus.MustNewConstMetric(s.descLast, prometheus.GaugeValue, float64(st.lastFinished.UnixNano())/1e9, name)
		}
	}
}

var _ prometheus.Collector = (*Scrubber)(nil)
