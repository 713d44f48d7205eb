package main

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// TestLatencyMeter: the meter reports the requests since its last call and
// their 99th percentile, leaving out the LUs that waited for their QoS
// limit meanwhile, and nothing for series that are new or went down.
func TestLatencyMeter(t *testing.T) {
	dur := prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "lupool_nbd_request_duration_seconds",
		Buckets: prometheus.ExponentialBuckets(10e-6, 4, 11)}, []string{"export", "command"})
	wait := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "lupool_qos_wait_seconds_total"}, []string{"lu", "op"})
	other := prometheus.NewCounter(prometheus.CounterOpts{Name: "lupool_other_total"})
	m := &latencyMeter{nbd: []prometheus.Collector{dur, other}, qos: []prometheus.Collector{wait}}
	dur.WithLabelValues("a", "write")
	dur.WithLabelValues("b", "read")
	wait.WithLabelValues("b", "read")
	if n, p := m.since(); n != 0 || p != 0 {
		t.Fatalf("first call: %d %v", n, p)
	}
	// 1000 requests of a: 990 at 100 µs, 10 at 5 ms; b waited for QoS.
	for i := range 1000 {
		d := 100e-6
		if i%100 == 0 {
			d = 5e-3
		}
		dur.WithLabelValues("a", "write").Observe(d)
	}
	dur.WithLabelValues("b", "read").Observe(2)
	wait.WithLabelValues("b", "read").Add(1.9)
	n, p := m.since()
	// The 990th of 1000 falls at the top of the 40..160 µs bucket.
	if n != 1000 || p < 150*time.Microsecond || p > 160*time.Microsecond {
		t.Fatalf("since: %d requests, p99 %v; want 1000 and about 160µs", n, p)
	}
	for range 100 {
		dur.WithLabelValues("a", "write").Observe(5e-3)
	}
	dur.WithLabelValues("b", "read").Observe(1e-3) // b no longer waits: counted
	if n, p := m.since(); n != 101 || p < 2560*time.Microsecond || p > 10240*time.Microsecond {
		t.Fatalf("slow tick: %d requests, p99 %v", n, p)
	}
	dur.DeleteLabelValues("a", "write")
	if n, p := m.since(); n != 0 || p != 0 {
		t.Fatalf("after a series went: %d %v", n, p)
	}
}

func TestQuantile(t *testing.T) {
	bounds := []float64{1, 2, 4}
	for _, tc := range []struct {
		q      float64
		counts []uint64
		total  uint64
		want   float64
	}{
		{0.5, []uint64{10, 10, 10}, 10, 0.5},
		{0.99, []uint64{0, 100, 100}, 100, 1.99},
		{0.99, []uint64{0, 0, 0}, 10, 4},
		{0.5, []uint64{0, 0, 10}, 10, 3},
	} {
		if got := quantile(tc.q, bounds, tc.counts, tc.total); got < tc.want-1e-9 || got > tc.want+1e-9 {
			t.Errorf("quantile(%v, %v) = %v, want %v", tc.q, tc.counts, got, tc.want)
		}
	}
}
