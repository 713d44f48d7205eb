package main

import (
	"math"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// latencyMeter reads the node's client latency for the background budget
// from the NBD engine's request-duration histograms: the 99th percentile
// of the requests answered since the last call, interpolated within the
// histogram's buckets as Prometheus's histogram_quantile does. Requests to
// an LU that waited for its QoS limit in that interval are left out: a
// throttled client is slow by choice, not because background work loads
// the node.
type latencyMeter struct {
	nbd, qos []prometheus.Collector
	mu       sync.Mutex
	// last holds each series' cumulative bucket counts (by export and
	// command), and each LU's QoS wait seconds, at the previous call.
	// Guarded by mu.
	last      map[string]histogramCounts
	lastWaits map[string]float64
}

// histogramCounts is one series: cumulative counts per upper bound.
type histogramCounts struct {
	export string
	bounds []float64 // seconds, ascending, +Inf excluded
	counts []uint64  // cumulative, per bound
	total  uint64
}

// collect gathers the metrics named name from cs.
func collect(cs []prometheus.Collector, name string) []*dto.Metric {
	ch := make(chan prometheus.Metric, 64)
	go func() {
		for _, c := range cs {
			c.Collect(ch)
		}
		close(ch)
	}()
	var out []*dto.Metric
	for m := range ch {
		if !strings.Contains(m.Desc().String(), `"`+name+`"`) {
			continue
		}
		d := &dto.Metric{}
		if m.Write(d) == nil {
			out = append(out, d)
		}
	}
	return out
}

func label(m *dto.Metric, name string) string {
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

// since returns the requests answered since the last call (QoS-throttled
// LUs left out) and their 99th percentile latency.
func (l *latencyMeter) since() (int64, time.Duration) {
	now := map[string]histogramCounts{}
	for _, m := range collect(l.nbd, "lupool_nbd_request_duration_seconds") {
		h := m.GetHistogram()
		if h == nil {
			continue
		}
		hc := histogramCounts{export: label(m, "export"), total: h.GetSampleCount()}
		for _, b := range h.GetBucket() {
			if math.IsInf(b.GetUpperBound(), 1) {
				continue
			}
			hc.bounds = append(hc.bounds, b.GetUpperBound())
			hc.counts = append(hc.counts, b.GetCumulativeCount())
		}
		now[hc.export+"\x00"+label(m, "command")] = hc
	}
	waits := map[string]float64{}
	for _, m := range collect(l.qos, "lupool_qos_wait_seconds_total") {
		waits[label(m, "lu")] += m.GetCounter().GetValue()
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	throttled := map[string]bool{}
	for lu, w := range waits {
		throttled[lu] = w > l.lastWaits[lu]
	}
	var bounds []float64
	var delta []uint64
	var total uint64
	for key, hc := range now {
		prev, ok := l.last[key]
		if !ok || throttled[hc.export] || hc.total < prev.total || len(prev.counts) != len(hc.counts) {
			continue
		}
		if bounds == nil {
			bounds, delta = hc.bounds, make([]uint64, len(hc.bounds))
		} else if len(bounds) != len(hc.bounds) {
			continue
		}
		for i := range hc.counts {
			delta[i] += hc.counts[i] - min(prev.counts[i], hc.counts[i])
		}
		total += hc.total - prev.total
	}
	l.last, l.lastWaits = now, waits
	if total == 0 {
		return 0, 0
	}
	return int64(total), time.Duration(quantile(0.99, bounds, delta, total) * float64(time.Second))
}

// quantile estimates the q-quantile of total samples from cumulative
// counts per upper bound, interpolating linearly within a bucket; past the
// last bound it answers the last bound.
func quantile(q float64, bounds []float64, counts []uint64, total uint64) float64 {
	rank := q * float64(total)
	i := sort.Search(len(counts), func(i int) bool { return float64(counts[i]) >= rank })
	if i == len(counts) {
		if len(bounds) == 0 {
			return 0
		}
		return bounds[len(bounds)-1]
	}
	lower, below := 0.0, 0.0
	if i > 0 {
		lower, below = bounds[i-1], float64(counts[i-1])
	}
	in := float64(counts[i]) - below
	if in <= 0 {
		return bounds[i]
	}
	return lower + (bounds[i]-lower)*(rank-below)/in
}
