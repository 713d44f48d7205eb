package bench

import (
	"context"
	"encoding/json"
	"flag"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lupool/lupool/internal/realclient"
)

var rewrite = flag.Bool("rewrite", false, "rewrite testdata/report.golden.md")

func sample(iops, p99 float64) Round {
	return Round{Sample: &Sample{IOPS: iops, BandwidthBytesPerSec: iops * 4096,
		LatencyP50Microsecond: p99 / 4, LatencyP99Microsecond: p99, LatencyP999Microsecond: p99 * 2,
		Ops: map[string]int64{"read": int64(iops)}}}
}

// cannedReport is two workloads on three servers, three rounds each, with a
// failed round on the file peer and values chosen so every median, spread
// and ratio is a round number.
func cannedReport(t *testing.T) *Report {
	t.Helper()
	servers := []string{"lupool-mem", "nbdkit-memory", "nbdkit-file"}
	subjects := map[string]bool{"lupool-mem": true}
	classes := map[string]string{"lupool-mem": ClassMemory, "nbdkit-memory": ClassMemory, "nbdkit-file": ClassFile}
	ws, err := SelectWorkloads([]string{"randread-qd1", "randread-qd32"})
	if err != nil {
		t.Fatal(err)
	}
	qd1 := summarizeWorkload(ws[0], servers, subjects, classes, map[string][]Round{
		"lupool-mem":    {sample(11000, 100), sample(9000, 120), sample(10000, 110)},
		"nbdkit-memory": {sample(10000, 100), sample(10000, 100), sample(8000, 100)},
		"nbdkit-file":   {sample(5000, 200), {Error: "fio: exit status 1"}, sample(5000, 220)},
	})
	qd32 := summarizeWorkload(ws[1], servers, subjects, classes, map[string][]Round{
		"lupool-mem":    {sample(90000, 800), sample(100000, 900), sample(95000, 1000)},
		"nbdkit-memory": {sample(100000, 1000), sample(100000, 1000), sample(100000, 1000)},
		"nbdkit-file":   {sample(50000, 2000), sample(50000, 2000), sample(47500, 2000)},
	})
	return &Report{
		Meta: Meta{Date: "2026-11-22T03:00:00Z", Host: "vm", CPUs: 2, CPUModel: "Xeon", Kernel: "6.1",
			Versions: map[string]string{"fio": "fio-3.33"}, Runtime: "1s", SizeBytes: 256 << 20,
			DeviceBytes: 1 << 30, Rounds: 3, CommandLine: "nbdbench --quick",
			LoadAverageStart: "1.50 1.20 0.90", LoadAverageEnd: "2.00 1.40 1.00"},
		Servers: []ServerReport{
			{Name: "lupool-mem", Class: ClassMemory, Subject: true, Notes: "memory LU"},
			{Name: "lupool-file", Class: ClassFile, Subject: true, Notes: "file LU", Skipped: "no lupool binary"},
			{Name: "nbdkit-memory", Class: ClassMemory, Notes: "nbdkit memory"},
			{Name: "nbdkit-file", Class: ClassFile, Notes: "nbdkit file"},
		},
		Workloads: []WorkloadReport{qd1, qd32},
	}
}

func TestSummarizeWorkload(t *testing.T) {
	r := cannedReport(t)
	qd1 := r.Workloads[0]
	if len(qd1.Results) != 3 || qd1.Results[0].Server != "lupool-mem" {
		t.Fatalf("results = %+v", qd1.Results)
	}
	if got := qd1.Results[0].IOPS; got != (Spread{Median: 10000, Min: 9000, Max: 11000}) {
		t.Errorf("lupool-mem IOPS = %+v", got)
	}
	// The failed round is left out of the file peer's spread.
	if got := qd1.Results[2].LatencyP99Microsecond; got != (Spread{Median: 210, Min: 200, Max: 220}) {
		t.Errorf("nbdkit-file p99 = %+v", got)
	}
	if len(qd1.Ratios) != 2 {
		t.Fatalf("ratios = %+v, want lupool-mem against the two peers", qd1.Ratios)
	}
	mem, file := qd1.Ratios[0], qd1.Ratios[1]
	// Per round: 11000/10000, 9000/10000, 10000/8000.
	if mem.Peer != "nbdkit-memory" || !mem.SameClass || mem.Pairs != 3 ||
		!near(mem.IOPS.Median, 1.1) || !near(mem.IOPS.Min, 0.9) || !near(mem.IOPS.Max, 1.25) {
		t.Errorf("lupool-mem/nbdkit-memory = %+v", mem)
	}
	if !near(mem.LatencyP99.Median, 1.1) || !near(mem.LatencyP99.Min, 1) || !near(mem.LatencyP99.Max, 1.2) {
		t.Errorf("p99 ratio = %+v", mem.LatencyP99)
	}
	// Round 2 of the file peer failed: two pairs, 11000/5000 and 10000/5000.
	if file.Peer != "nbdkit-file" || file.SameClass || file.Pairs != 2 ||
		!near(file.IOPS.Median, 2.1) || !near(file.IOPS.Min, 2) || !near(file.IOPS.Max, 2.2) {
		t.Errorf("lupool-mem/nbdkit-file = %+v", file)
	}
}

func TestRenderMarkdown(t *testing.T) {
	got := RenderMarkdown(cannedReport(t))
	for _, line := range []string{
		"Load average (1, 5, 15 min) at the start: 1.50 1.20 0.90; at the end: 2.00 1.40 1.00.",
		"| lupool-file | file | skipped: no lupool binary | file LU |",
		"| workload | lupool-mem / nbdkit-memory |",
		"| randread-qd1 | 1.10 (0.90–1.25) |",
		"| randread-qd32 | 0.95 (0.90–1.00) |",
		"| randread-qd32 | 95.0k | 100.0k | 50.0k |",
		"| lupool-mem | 10.0k (9.0k–11.0k) | 39.1 | 28 | 110 | 220 |",
		"| nbdkit-file | 5.0k (5.0k–5.0k) | 19.5 | 52 | 210 | 420 |",
		"| lupool-mem / nbdkit-file (other class) | 2.10 (2.00–2.20) | 0.50 (0.50–0.50) |",
		"| lupool-mem / nbdkit-memory | 0.95 (0.90–1.00) | 0.90 (0.80–1.00) |",
		"- randread-qd32, lupool-mem / nbdkit-memory: 0.95 (0.90–1.00), met in every round",
	} {
		if !strings.Contains(got, line+"\n") {
			t.Errorf("markdown lacks line %q", line)
		}
	}
	golden := filepath.Join("testdata", "report.golden.md")
	if *rewrite {
		if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatal(err)
	}
	if got != string(want) {
		t.Errorf("markdown differs from %s (go test -run TestRenderMarkdown -rewrite):\n%s", golden, got)
	}
}

func TestTargetLines(t *testing.T) {
	r := cannedReport(t)
	if got := strings.Join(targetLines(r), "; "); got != "randread-qd32, lupool-mem / nbdkit-memory: 0.95 (0.90–1.00), met in every round" {
		t.Errorf("target = %q", got)
	}
	r.Workloads[1].Ratios[0].IOPS = Spread{Median: 0.89, Min: 0.8, Max: 0.95}
	if got := strings.Join(targetLines(r), "; "); got != "randread-qd32, lupool-mem / nbdkit-memory: 0.89 (0.80–0.95), NOT met by the median (some rounds above)" {
		t.Errorf("target = %q", got)
	}
	for _, tc := range []struct {
		in   Spread
		want string
	}{
		{Spread{Median: 0.9, Min: 0.9, Max: 0.9}, "met in every round"},
		{Spread{Median: 1.2, Min: 0.5, Max: 1.3}, "met by the median (some rounds below)"},
		{Spread{Median: 0.5, Min: 0.4, Max: 0.89}, "NOT met in any round"},
	} {
		if got := targetVerdict(tc.in); got != tc.want {
			t.Errorf("targetVerdict(%+v) = %q, want %q", tc.in, got, tc.want)
		}
	}
	r.Workloads = r.Workloads[:1]
	if got := targetLines(r); got != nil {
		t.Errorf("target without randread-qd32 = %q", got)
	}
}

func TestFormatting(t *testing.T) {
	for _, tc := range []struct{ got, want string }{
		{fmtCount(999.4), "999"}, {fmtCount(1500), "1.5k"}, {fmtCount(2_345_678), "2.35M"}, {fmtCount(math.NaN()), "n/a"},
		{fmtMicros(9.94), "9.9"}, {fmtMicros(1234.5), "1234"}, {fmtMiB(3 << 20), "3.0"},
		{fmtRatio(Spread{Median: 0.912, Min: 0.9, Max: 1.005}), "0.91 (0.90–1.00)"}, {fmtRatio(Summarize(nil)), "n/a"},
		{fmtBytes(1 << 30), "1 GiB"}, {fmtBytes(256 << 20), "256 MiB"}, {fmtBytes(1000), "1000 B"},
		{sizeArg(1 << 30), "1G"}, {sizeArg(512 << 20), "512M"}, {sizeArg(4096), "4096"},
		{mdCell("a|b\nc"), `a\|b c`},
	} {
		if tc.got != tc.want {
			t.Errorf("got %q, want %q", tc.got, tc.want)
		}
	}
}

func TestPlotData(t *testing.T) {
	data, servers := plotData(cannedReport(t), FamilyRandRead)
	want := "# lupool-mem\n1 10000.0 9000.0 11000.0 110.0 100.0 120.0\n32 95000.0 90000.0 100000.0 900.0 800.0 1000.0\n" +
		"\n\n# nbdkit-memory\n1 10000.0 8000.0 10000.0 100.0 100.0 100.0\n32 100000.0 100000.0 100000.0 1000.0 1000.0 1000.0\n" +
		"\n\n# nbdkit-file\n1 5000.0 5000.0 5000.0 210.0 200.0 220.0\n32 50000.0 47500.0 50000.0 2000.0 2000.0 2000.0\n"
	if data != want {
		t.Errorf("plot data:\n%s\nwant:\n%s", data, want)
	}
	if strings.Join(servers, ",") != "lupool-mem,nbdkit-memory,nbdkit-file" {
		t.Errorf("servers = %v", servers)
	}
	if data, servers := plotData(cannedReport(t), FamilyPaging); data != "" || servers != nil {
		t.Errorf("paging plot data = %q %v, want none", data, servers)
	}
}

func TestWriteReport(t *testing.T) {
	dir := t.TempDir()
	r := cannedReport(t)
	written, err := WriteReport(context.Background(), dir, r)
	if err != nil {
		t.Fatal(err)
	}
	var back Report
	data, err := os.ReadFile(filepath.Join(dir, "results.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, &back); err != nil {
		t.Fatal(err)
	}
	if RenderMarkdown(&back) != RenderMarkdown(r) {
		t.Error("results.json does not round-trip to the same markdown")
	}
	md, err := os.ReadFile(filepath.Join(dir, "results.md"))
	if err != nil || string(md) != RenderMarkdown(r) {
		t.Errorf("results.md: %v", err)
	}
	if _, err := exec.LookPath("gnuplot"); err != nil {
		// The rest was checked: outside CI the test passes without plots.
		if realclient.InCI() {
			t.Fatalf("gnuplot not installed (run ./scripts/install-test-deps.sh): %v (CI=true: plots must be checked)", err)
		}
		t.Logf("gnuplot not installed: plots not checked")
		return
	}
	for _, png := range []string{"iops_by_qd.png", "p99_by_qd.png"} {
		data, err := os.ReadFile(filepath.Join(dir, png))
		if err != nil {
			t.Fatalf("%s: %v (wrote %v)", png, err, written)
		}
		if len(data) < 1000 || string(data[1:4]) != "PNG" {
			t.Errorf("%s is not a PNG (%d bytes)", png, len(data))
		}
	}
}
