package bench

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestRatiosFromCannedFio runs the runner's parsing and ratio code in a row
// on canned fio reports (testdata, real fio-3.33 output): ParseFio turns
// each report into a round as the runner does, summarizeWorkload pairs the
// rounds and computes the ratios, RenderMarkdown prints them. A report fio
// could not finish becomes a gap that drops only its round. The expected
// values come from the reports' own numbers (see TestParseFio), so a change
// anywhere along the chain fails here.
func TestRatiosFromCannedFio(t *testing.T) {
	round := func(file string) Round {
		t.Helper()
		var data []byte
		if file == "" {
			data = []byte("fio: connected to NBD server\nfio: pid=1, err=5/file:engines/nbd.c")
		} else {
			var err error
			if data, err = os.ReadFile(filepath.Join("testdata", file)); err != nil {
				t.Fatal(err)
			}
		}
		s, err := ParseFio(data)
		if err != nil {
			return Round{Error: err.Error()}
		}
		return Round{Sample: &s}
	}
	const (
		a = "fio-randread-qd1.json"  // 29427.1 IOPS, p99 50.944 µs
		b = "fio-stdout-prefix.json" // 74023.7 IOPS, p99 419.840 µs
		c = "fio-randrw70-qd4.json"  // 41203.6 IOPS, p99 1384.448 µs
		d = "fio-paging-qd4.json"    // 26265.5 IOPS, p99 1155.072 µs
		x = ""                       // fio output without a report
	)
	ws, err := SelectWorkloads([]string{"randread-qd1"})
	if err != nil {
		t.Fatal(err)
	}
	servers := []string{"lupool-mem", "nbdkit-memory"}
	w := summarizeWorkload(ws[0], servers, map[string]bool{"lupool-mem": true},
		map[string]string{"lupool-mem": ClassMemory, "nbdkit-memory": ClassMemory},
		map[string][]Round{
			"lupool-mem":    {round(a), round(b), round(c), round(x)},
			"nbdkit-memory": {round(b), round(a), round(d), round(a)},
		})

	if got := w.Results[0].Rounds[3]; got.Sample != nil || !strings.Contains(got.Error, "unusable fio output") {
		t.Errorf("round 4 of lupool-mem = %+v, want a gap with ParseFio's error", got)
	}
	if len(w.Ratios) != 1 {
		t.Fatalf("ratios = %+v, want lupool-mem / nbdkit-memory only", w.Ratios)
	}
	r := w.Ratios[0]
	// Rounds 1-3: a/b, b/a, c/d; round 4 has no subject sample.
	iopsA, iopsB := 29427.145709, 22344.551816+51679.106964
	iopsC, iopsD := 28874.251497+12329.341317, 10373.253493+15692.61477+199.600798
	if r.Subject != "lupool-mem" || r.Peer != "nbdkit-memory" || !r.SameClass || r.Pairs != 3 ||
		!near(r.IOPS.Median, iopsC/iopsD) || !near(r.IOPS.Min, iopsA/iopsB) || !near(r.IOPS.Max, iopsB/iopsA) {
		t.Errorf("IOPS ratio = %+v over %d pairs, want median %v (%v–%v) over 3",
			r.IOPS, r.Pairs, iopsC/iopsD, iopsA/iopsB, iopsB/iopsA)
	}
	if !near(r.LatencyP99.Median, 1384.448/1155.072) || !near(r.LatencyP99.Min, 50.944/419.840) ||
		!near(r.LatencyP99.Max, 419.840/50.944) {
		t.Errorf("p99 ratio = %+v", r.LatencyP99)
	}
	// Per-server medians over the rounds that produced a sample.
	if got := w.Results[0].IOPS; !near(got.Median, iopsC) || !near(got.Min, iopsA) || !near(got.Max, iopsB) {
		t.Errorf("lupool-mem IOPS = %+v, want median %v (c of a, b, c)", got, iopsC)
	}

	md := RenderMarkdown(&Report{
		Meta:      Meta{Rounds: 4, CommandLine: "canned"},
		Servers:   []ServerReport{{Name: "lupool-mem", Class: ClassMemory, Subject: true}, {Name: "nbdkit-memory", Class: ClassMemory}},
		Workloads: []WorkloadReport{w},
	})
	for _, line := range []string{
		"| randread-qd1 | 1.57 (0.40–2.52) |",
		"| lupool-mem / nbdkit-memory | 1.57 (0.40–2.52) | 1.20 (0.12–8.24) |",
	} {
		if !strings.Contains(md, line+"\n") {
			t.Errorf("markdown lacks line %q:\n%s", line, md)
		}
	}
}
