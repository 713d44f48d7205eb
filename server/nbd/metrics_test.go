package nbd

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/server/nbdproto"
)

// gather returns metric values keyed by name and the export/command labels.
func gather(t *testing.T, reg *prometheus.Registry) map[string]float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := make(map[string]float64)
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			key := mf.GetName()
			for _, l := range m.GetLabel() {
				key += "," + l.GetValue()
			}
			out[key] = value(mf.GetType(), m)
		}
	}
	return out
}

func value(typ dto.MetricType, m *dto.Metric) float64 {
	switch typ {
	case dto.MetricType_COUNTER:
		return m.GetCounter().GetValue()
	case dto.MetricType_GAUGE:
		return m.GetGauge().GetValue()
	case dto.MetricType_HISTOGRAM:
		return float64(m.GetHistogram().GetSampleCount())
	}
	return -1
}

func TestMetricsAndConnStats(t *testing.T) {
	m := NewMetrics()
	reg := prometheus.NewRegistry()
	for _, c := range m.Collectors() {
		if err := reg.Register(c); err != nil {
			t.Fatal(err)
		}
	}
	ts := startServer(t, blockdev.Caps{}, func(o *Options) { o.Metrics = m })
	c := dialRaw(t, ts.addr)
	c.attach("disk", false)
	for range 3 {
		if code := c.do(nbdproto.CmdWrite, 0, 0, 4096, make([]byte, 4096)); code != 0 {
			t.Fatal(errName(code))
		}
	}
	c.request(nbdproto.CmdRead, 0, 1, 0, 512, nil)
	c.simpleReply(512)
	if code := c.do(nbdproto.CmdRead, 0, testSizeBytes, 1, nil); code != nbdproto.EINVAL {
		t.Fatal(errName(code))
	}
	c.do(nbdproto.CmdFlush, 0, 0, 0, nil)
	c.do(nbdproto.CmdWriteZeroes, 0, 0, 4096, nil)
	c.do(nbdproto.CmdTrim, 0, 0, 4096, nil)
	c.do(nbdproto.CmdCache, 0, 0, 4096, nil)

	got := gather(t, reg)
	want := map[string]float64{
		"lupool_nbd_requests_total,write,disk":                  3,
		"lupool_nbd_bytes_total,write,disk":                     3 * 4096,
		"lupool_nbd_requests_total,read,disk":                   2,
		"lupool_nbd_request_errors_total,read,disk":             1,
		"lupool_nbd_bytes_total,read,disk":                      512,
		"lupool_nbd_request_duration_seconds,read,disk":         2,
		"lupool_nbd_requests_total,flush,disk":                  1,
		"lupool_nbd_requests_total,write_zeroes,disk":           1,
		"lupool_nbd_requests_total,trim,disk":                   1,
		"lupool_nbd_requests_total,cache,disk":                  1,
		"lupool_nbd_requests_total,block_status,disk":           0,
		"lupool_nbd_connections,disk":                           1,
		"lupool_nbd_inflight_requests,disk":                     0,
		"lupool_nbd_request_errors_total,write,disk":            0,
		"lupool_nbd_request_duration_seconds,write_zeroes,disk": 1,
	}
	for k, v := range want {
		// Labels come sorted by name: command before export.
		if g, ok := got[k]; !ok || g != v {
			t.Errorf("%s = %v (present %v), want %v", k, g, ok, v)
		}
	}
	st := ts.srv.ConnStats()
	if len(st) != 1 {
		t.Fatalf("%d conn stats", len(st))
	}
	if w := st[0].Commands["write"]; w.Requests != 3 || w.Bytes != 3*4096 || w.Errors != 0 {
		t.Errorf("write stats %+v", w)
	}
	if r := st[0].Commands["read"]; r.Requests != 2 || r.Errors != 1 || r.Bytes != 512 {
		t.Errorf("read stats %+v", r)
	}
	c.request(nbdproto.CmdDisc, 0, 0, 0, 0, nil)
	c.expectClosed()
	waitFor(t, func() bool {
		g := gather(t, reg)
		return g["lupool_nbd_connections,disk"] == 0 && g["lupool_nbd_inflight_requests,disk"] == 0
	})
}
