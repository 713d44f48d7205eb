package main

import (
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// latencyMeter reads the node's client latency for the background budget
// from the NBD engine's request-duration histogram, less the time requests
// spent waiting for their LU's QoS limit (a throttled client is slow by
// choice, not because background work loads the node).
type latencyMeter struct {
	nbd, qos []prometheus.Collector
	mu       sync.Mutex
	// last are the totals at the previous call. Guarded by mu.
	lastCount          uint64
	lastSum, lastWaits float64
}

// sums collects from cs and adds up the samples of the metric name:
// histogram counts and sums, or counter values (in sum).
func sums(cs []prometheus.Collector, name string) (count uint64, sum float64) {
	ch := make(chan prometheus.Metric, 64)
	go func() {
		for _, c := range cs {
			c.Collect(ch)
		}
		close(ch)
	}()
	for m := range ch {
		if !strings.Contains(m.Desc().String(), `"`+name+`"`) {
			continue
		}
		var d dto.Metric
		if m.Write(&d) != nil {
			continue
		}
		if h := d.GetHistogram(); h != nil {
			count += h.GetSampleCount()
			sum += h.GetSampleSum()
		} else if c := d.GetCounter(); c != nil {
			sum += c.GetValue()
		}
	}
	return count, sum
}

// since returns the requests answered since the last call and their total
// latency. Series of deleted LUs vanish from the totals; a tick whose
// totals went down reports nothing.
func (l *latencyMeter) since() (int64, time.Duration) {
	count, sum := sums(l.nbd, "lupool_nbd_request_duration_seconds")
	_, waits := sums(l.qos, "lupool_qos_wait_seconds_total")
	l.mu.Lock()
	defer l.mu.Unlock()
	dc, ds, dw := int64(count)-int64(l.lastCount), sum-l.lastSum, waits-l.lastWaits
	l.lastCount, l.lastSum, l.lastWaits = count, sum, waits
	if dc <= 0 || ds < 0 || dw < 0 {
		return 0, 0
	}
	return dc, time.Duration(max(0, ds-dw) * float64(time.Second))
}
