package nbd

import (
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/blockdev/blockdevtest"
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

// registered returns m's collectors on a fresh registry.
func registered(t *testing.T, m *Metrics) *prometheus.Registry {
	t.Helper()
	reg := prometheus.NewRegistry()
	for _, c := range m.Collectors() {
		if err := reg.Register(c); err != nil {
			t.Fatal(err)
		}
	}
	return reg
}

// exportSeries counts the series labelled export=name.
func exportSeries(t *testing.T, reg *prometheus.Registry, name string) int {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "export" && l.GetValue() == name {
					n++
				}
			}
		}
	}
	return n
}

// TestMetricsForgetExport: after the export is removed, its connections
// ended and ForgetExport called, no series names it, the other export's
// stay, and a connection still draining cannot bring them back.
func TestMetricsForgetExport(t *testing.T) {
	m := NewMetrics()
	reg := registered(t, m)
	other := Export{Name: "other", Device: blockdevtest.NewMem(testSizeBytes, blockdev.Caps{})}
	ts := startServer(t, blockdev.Caps{}, func(o *Options) { o.Metrics = m }, other)
	var diskClient *rawClient
	for _, name := range []string{"disk", "other"} {
		c := dialRaw(t, ts.addr)
		c.attach(name, false)
		if code := c.do(nbdproto.CmdWrite, 0, 0, 4096, make([]byte, 4096)); code != 0 {
			t.Fatal(errName(code))
		}
		if name == "disk" {
			diskClient = c
		}
	}
	perExport := exportSeries(t, reg, "other")
	if perExport == 0 || exportSeries(t, reg, "disk") != perExport {
		t.Fatalf("before: %d series for disk, %d for other", exportSeries(t, reg, "disk"), perExport)
	}
	total := testutil.CollectAndCount(m.requests)

	ts.exports.Remove("disk")
	if n := ts.srv.DisconnectExport("disk"); n != 1 {
		t.Fatalf("DisconnectExport ended %d connections, want 1", n)
	}
	m.ForgetExport("disk")
	if n := exportSeries(t, reg, "disk"); n != 0 {
		t.Errorf("%d series still name the deleted export", n)
	}
	if n := exportSeries(t, reg, "other"); n != perExport {
		t.Errorf("%d series for the other export, want %d", n, perExport)
	}
	if got, want := testutil.CollectAndCount(m.requests), total/2; got != want {
		t.Errorf("lupool_nbd_requests_total has %d series, want %d", got, want)
	}
	// The disconnected connection's goroutine ends after ForgetExport (it
	// decrements its gauges then): the series stay gone.
	diskClient.expectClosed()
	waitFor(t, func() bool { return ts.srv.Connections("disk") == 0 })
	time.Sleep(10 * time.Millisecond)
	if n := exportSeries(t, reg, "disk"); n != 0 {
		t.Errorf("%d series of the deleted export came back after its connection ended", n)
	}
}

// TestMetricsLateConnection: a connection that negotiated an export which
// is removed (and forgotten) before its transmission starts is ended and
// creates no series.
func TestMetricsLateConnection(t *testing.T) {
	m := NewMetrics()
	reg := registered(t, m)
	ts := startServer(t, blockdev.Caps{}, nil)
	src := &vanishingExports{ExportSource: ts.exports, name: "disk",
		removed: func() { m.ForgetExport("disk") }}
	srv, err := NewServer(Options{Exports: src, Metrics: m})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	serveUntilCleanup(t, srv, l)
	c := dialRaw(t, l.Addr().String())
	c.attach("disk", false) // the only lookup that finds it
	c.expectClosed()
	if n := exportSeries(t, reg, "disk"); n != 0 {
		t.Errorf("a connection to a removed export created %d series", n)
	}
	// Children resolved before ForgetExport count nowhere afterwards.
	em := m.forExport("late", func() bool { return true })
	m.ForgetExport("late")
	em.connections.Inc()
	em.commands[nbdproto.CmdWrite].requests.Inc()
	if n := exportSeries(t, reg, "late"); n != 0 {
		t.Errorf("counting into forgotten children brought back %d series", n)
	}
}

// vanishingExports finds name at its first lookup only, as if the export
// were removed (and removed called) right after negotiation resolved it.
type vanishingExports struct {
	ExportSource
	name    string
	removed func()
	found   atomic.Bool
}

func (v *vanishingExports) Lookup(name string) (Export, bool) {
	e, ok := v.ExportSource.Lookup(name)
	if name != v.name || !ok {
		return e, ok
	}
	if v.found.Swap(true) {
		return Export{}, false
	}
	v.removed()
	return e, ok
}
