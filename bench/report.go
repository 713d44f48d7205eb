package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Report is everything a run measured. It is written as results.json; the
// markdown and the plots are rendered from it.
type Report struct {
	Meta      Meta             `json:"meta"`
	Servers   []ServerReport   `json:"servers"`
	Workloads []WorkloadReport `json:"workloads"`
}

// Meta describes the machine, the tools and the options of a run.
type Meta struct {
	Date        string            `json:"date"`
	Host        string            `json:"host"`
	CPUs        int               `json:"cpus"`
	CPUModel    string            `json:"cpu_model"`
	Kernel      string            `json:"kernel"`
	Versions    map[string]string `json:"versions"`
	Runtime     string            `json:"runtime"`
	SizeBytes   int64             `json:"size_bytes"`
	DeviceBytes int64             `json:"device_bytes"`
	Rounds      int               `json:"rounds"`
	CommandLine string            `json:"command_line"`
	// LoadAverageStart and LoadAverageEnd are /proc/loadavg's 1, 5 and 15
	// minute figures when the run started and ended: how busy the machine
	// was with other work.
	LoadAverageStart string `json:"load_average_start,omitempty"`
	LoadAverageEnd   string `json:"load_average_end,omitempty"`
}

// ServerReport says how a server ran, or why it was skipped.
type ServerReport struct {
	Name     string   `json:"name"`
	Class    string   `json:"class"`
	Subject  bool     `json:"subject"`
	Notes    string   `json:"notes"`
	Commands []string `json:"commands,omitempty"`
	// Skipped is empty if the server ran, else the reason it did not.
	Skipped string `json:"skipped,omitempty"`
	// Died is set when the server ran but exited before the runner
	// stopped it: which process, how, and the end of its log.
	Died string `json:"died,omitempty"`
}

// WorkloadReport is one workload's results on every server that ran.
type WorkloadReport struct {
	Name        string         `json:"name"`
	Family      string         `json:"family"`
	QueueDepth  int            `json:"queue_depth"`
	Connections int            `json:"connections"`
	Description string         `json:"description"`
	Results     []ServerResult `json:"results"`
	Ratios      []Ratio        `json:"ratios,omitempty"`
}

// Round is one fio run: a Sample, or the Error that prevented one.
type Round struct {
	Sample *Sample `json:"sample,omitempty"`
	Error  string  `json:"error,omitempty"`
}

// ServerResult summarizes one server's rounds of one workload.
type ServerResult struct {
	Server                 string  `json:"server"`
	Rounds                 []Round `json:"rounds"`
	IOPS                   Spread  `json:"iops"`
	BandwidthBytesPerSec   Spread  `json:"bw_bytes_per_sec"`
	LatencyP50Microsecond  Spread  `json:"lat_p50_us"`
	LatencyP99Microsecond  Spread  `json:"lat_p99_us"`
	LatencyP999Microsecond Spread  `json:"lat_p999_us"`
}

// Ratio compares a subject (lupool) with a peer, round by round.
type Ratio struct {
	Subject string `json:"subject"`
	Peer    string `json:"peer"`
	// SameClass is true when both keep data alike (both memory or both
	// file); only those pairs appear in the summary table.
	SameClass bool `json:"same_class"`
	// Pairs is the number of rounds in which both produced a sample.
	Pairs int `json:"pairs"`
	// IOPS is subject/peer IOPS: above 1 means the subject is faster.
	IOPS Spread `json:"iops"`
	// LatencyP99 is subject/peer p99 latency: below 1 means the subject's
	// tail is shorter.
	LatencyP99 Spread `json:"lat_p99"`
}

// MarshalJSON writes NaN (no data) as null, which encoding/json refuses.
func (s Spread) MarshalJSON() ([]byte, error) {
	f := func(x float64) any {
		if math.IsNaN(x) || math.IsInf(x, 0) {
			return nil
		}
		return x
	}
	return json.Marshal(map[string]any{"median": f(s.Median), "min": f(s.Min), "max": f(s.Max)})
}

// UnmarshalJSON reads null back as NaN.
func (s *Spread) UnmarshalJSON(data []byte) error {
	var v struct{ Median, Min, Max *float64 }
	if err := json.Unmarshal(data, &v); err != nil {
		return err
	}
	g := func(p *float64) float64 {
		if p == nil {
			return math.NaN()
		}
		return *p
	}
	*s = Spread{Median: g(v.Median), Min: g(v.Min), Max: g(v.Max)}
	return nil
}

// summarizeWorkload builds a workload's report from each server's rounds.
// servers gives the order; subjects and classes come from the specs. Rounds
// line up by index: round i of every server ran in the same pass.
func summarizeWorkload(w Workload, servers []string, subjects map[string]bool, classes map[string]string, rounds map[string][]Round) WorkloadReport {
	wr := WorkloadReport{Name: w.Name, Family: w.Family, QueueDepth: w.QueueDepth,
		Connections: w.Connections, Description: w.Description}
	series := func(name string, pick func(*Sample) float64) []float64 {
		var xs []float64
		for _, r := range rounds[name] {
			if r.Sample == nil {
				xs = append(xs, math.NaN())
				continue
			}
			xs = append(xs, pick(r.Sample))
		}
		return xs
	}
	iops := func(s *Sample) float64 { return s.IOPS }
	p99 := func(s *Sample) float64 { return s.LatencyP99Microsecond }
	for _, name := range servers {
		wr.Results = append(wr.Results, ServerResult{
			Server:                 name,
			Rounds:                 rounds[name],
			IOPS:                   Summarize(series(name, iops)),
			BandwidthBytesPerSec:   Summarize(series(name, func(s *Sample) float64 { return s.BandwidthBytesPerSec })),
			LatencyP50Microsecond:  Summarize(series(name, func(s *Sample) float64 { return s.LatencyP50Microsecond })),
			LatencyP99Microsecond:  Summarize(series(name, p99)),
			LatencyP999Microsecond: Summarize(series(name, func(s *Sample) float64 { return s.LatencyP999Microsecond })),
		})
	}
	for _, subject := range servers {
		if !subjects[subject] {
			continue
		}
		for _, peer := range servers {
			if subjects[peer] {
				continue
			}
			ratio := Ratio{Subject: subject, Peer: peer, SameClass: classes[subject] == classes[peer]}
			ratio.IOPS, ratio.Pairs = PairedRatios(series(subject, iops), series(peer, iops))
			ratio.LatencyP99, _ = PairedRatios(series(subject, p99), series(peer, p99))
			wr.Ratios = append(wr.Ratios, ratio)
		}
	}
	return wr
}

// Formatting of numbers in the markdown.
func fmtCount(x float64) string {
	switch {
	case math.IsNaN(x):
		return "n/a"
	case x >= 1e6:
		return fmt.Sprintf("%.2fM", x/1e6)
	case x >= 1e3:
		return fmt.Sprintf("%.1fk", x/1e3)
	default:
		return fmt.Sprintf("%.0f", x)
	}
}

func fmtMiB(bytesPerSec float64) string {
	if math.IsNaN(bytesPerSec) {
		return "n/a"
	}
	return fmt.Sprintf("%.1f", bytesPerSec/(1<<20))
}

func fmtMicros(us float64) string {
	switch {
	case math.IsNaN(us):
		return "n/a"
	case us < 10:
		return fmt.Sprintf("%.1f", us)
	default:
		return fmt.Sprintf("%.0f", us)
	}
}

func fmtRatio(s Spread) string {
	if math.IsNaN(s.Median) {
		return "n/a"
	}
	return fmt.Sprintf("%.2f (%.2f–%.2f)", s.Median, s.Min, s.Max)
}

func fmtCountSpread(s Spread) string {
	if math.IsNaN(s.Median) {
		return "n/a"
	}
	return fmt.Sprintf("%s (%s–%s)", fmtCount(s.Median), fmtCount(s.Min), fmtCount(s.Max))
}

// summaryPairs lists the same-class subject/peer pairs in the order the
// first workload reports them.
func summaryPairs(r *Report) [][2]string {
	seen := map[[2]string]bool{}
	var pairs [][2]string
	for _, w := range r.Workloads {
		for _, ra := range w.Ratios {
			p := [2]string{ra.Subject, ra.Peer}
			if ra.SameClass && !seen[p] {
				seen[p] = true
				pairs = append(pairs, p)
			}
		}
	}
	return pairs
}

// RenderMarkdown renders the report as markdown: the run's facts, the
// servers, a summary of ratios, then one table per workload.
func RenderMarkdown(r *Report) string {
	var b strings.Builder
	m := r.Meta
	fmt.Fprintf(&b, "# lupool fio benchmark: %s\n\n", m.Date)
	fmt.Fprintf(&b, "Machine: %s, %d CPUs (%s), Linux %s. Each fio run lasts %s over the first %s of a %s export; %d rounds, servers alternating.\n\n",
		m.Host, m.CPUs, m.CPUModel, m.Kernel, m.Runtime, fmtBytes(m.SizeBytes), fmtBytes(m.DeviceBytes), m.Rounds)
	if m.CommandLine != "" {
		fmt.Fprintf(&b, "Command: `%s`\n\n", m.CommandLine)
	}
	if m.LoadAverageStart != "" {
		fmt.Fprintf(&b, "Load average (1, 5, 15 min) at the start: %s; at the end: %s.\n\n", m.LoadAverageStart, m.LoadAverageEnd)
	}
	var tools []string
	for _, t := range []string{"fio", "nbdkit", "qemu-nbd"} {
		if v, ok := m.Versions[t]; ok {
			tools = append(tools, v)
		}
	}
	if len(tools) > 0 {
		fmt.Fprintf(&b, "Tools: %s.\n\n", strings.Join(tools, "; "))
	}
	b.WriteString("The machine is small and shared: absolute numbers move from run to run. Read the same-run ratios; " +
		"a ratio is the median over rounds of (subject in round i) / (peer in round i), with min–max.\n\n")

	b.WriteString("## Servers\n\n| server | class | status | configuration |\n|---|---|---|---|\n")
	for _, s := range r.Servers {
		status := "ran"
		switch {
		case s.Skipped != "":
			status = "skipped: " + s.Skipped
		case s.Died != "":
			status = "DIED during the run: " + s.Died
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s |\n", s.Name, s.Class, mdCell(status), mdCell(s.Notes))
	}
	b.WriteString("\n")

	if pairs := summaryPairs(r); len(pairs) > 0 {
		b.WriteString("## Summary: IOPS ratio subject / peer (same class), median (min–max); above 1 = subject faster\n\n| workload |")
		for _, p := range pairs {
			fmt.Fprintf(&b, " %s / %s |", p[0], p[1])
		}
		b.WriteString("\n|---|" + strings.Repeat("---|", len(pairs)) + "\n")
		for _, w := range r.Workloads {
			fmt.Fprintf(&b, "| %s |", w.Name)
			for _, p := range pairs {
				cell := "n/a"
				for _, ra := range w.Ratios {
					if ra.Subject == p[0] && ra.Peer == p[1] {
						cell = fmtRatio(ra.IOPS)
					}
				}
				fmt.Fprintf(&b, " %s |", cell)
			}
			b.WriteString("\n")
		}
		b.WriteString("\n")
	}
	if lines := targetLines(r); len(lines) > 0 {
		b.WriteString("NBD engine target (issue 2): lupool-mem (or the bare engine-mem) reaches at least 0.90 of nbdkit-memory's IOPS " +
			"at 4 KiB random read and write, iodepth 32 (median ratio):\n\n")
		for _, l := range lines {
			fmt.Fprintf(&b, "- %s\n", l)
		}
		b.WriteString("\n")
	}
	if len(r.Workloads) > 0 {
		b.WriteString("## Summary: median IOPS\n\n| workload |")
		for _, res := range r.Workloads[0].Results {
			fmt.Fprintf(&b, " %s |", res.Server)
		}
		b.WriteString("\n|---|" + strings.Repeat("---|", len(r.Workloads[0].Results)) + "\n")
		for _, w := range r.Workloads {
			fmt.Fprintf(&b, "| %s |", w.Name)
			for _, res := range w.Results {
				fmt.Fprintf(&b, " %s |", fmtCount(res.IOPS.Median))
			}
			b.WriteString("\n")
		}
		b.WriteString("\n")
	}

	b.WriteString("## Workloads\n")
	for _, w := range r.Workloads {
		fmt.Fprintf(&b, "\n### %s: %s\n\n", w.Name, w.Description)
		b.WriteString("| server | IOPS median (min–max) | MiB/s | p50 µs | p99 µs | p99.9 µs |\n|---|---|---|---|---|---|\n")
		for _, res := range w.Results {
			fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s |\n", res.Server, fmtCountSpread(res.IOPS),
				fmtMiB(res.BandwidthBytesPerSec.Median), fmtMicros(res.LatencyP50Microsecond.Median),
				fmtMicros(res.LatencyP99Microsecond.Median), fmtMicros(res.LatencyP999Microsecond.Median))
		}
		if len(w.Ratios) > 0 {
			b.WriteString("\n| subject / peer | IOPS ratio | p99 latency ratio (below 1 = shorter tail) |\n|---|---|---|\n")
			for _, ra := range w.Ratios {
				class := ""
				if !ra.SameClass {
					class = " (other class)"
				}
				fmt.Fprintf(&b, "| %s / %s%s | %s | %s |\n", ra.Subject, ra.Peer, class, fmtRatio(ra.IOPS), fmtRatio(ra.LatencyP99))
			}
		}
	}
	return b.String()
}

// Target of the NBD engine issue: lupool-mem (or the bare engine,
// engine-mem) / nbdkit-memory IOPS at 4 KiB random read and write, iodepth
// 32.
const (
	targetPeer  = "nbdkit-memory"
	targetRatio = 0.9
)

// targetLines checks the NBD engine's target on the workloads that have it.
func targetLines(r *Report) []string {
	var lines []string
	for _, w := range r.Workloads {
		if w.Name != "randread-qd32" && w.Name != "randwrite-qd32" {
			continue
		}
		for _, ra := range w.Ratios {
			if (ra.Subject != "lupool-mem" && ra.Subject != "engine-mem") || ra.Peer != targetPeer || math.IsNaN(ra.IOPS.Median) {
				continue
			}
			verdict := targetVerdict(ra.IOPS)
			lines = append(lines, fmt.Sprintf("%s, %s / %s: %s, %s", w.Name, ra.Subject, ra.Peer, fmtRatio(ra.IOPS), verdict))
		}
	}
	return lines
}

// targetVerdict judges a ratio against targetRatio by its median and says
// when the rounds disagree, which on a noisy machine they often do.
func targetVerdict(s Spread) string {
	switch {
	case s.Median >= targetRatio && s.Min >= targetRatio:
		return "met in every round"
	case s.Median >= targetRatio:
		return "met by the median (some rounds below)"
	case s.Max < targetRatio:
		return "NOT met in any round"
	default:
		return "NOT met by the median (some rounds above)"
	}
}

func mdCell(s string) string {
	return strings.NewReplacer("|", "\\|", "\n", " ").Replace(s)
}

func fmtBytes(n int64) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return fmt.Sprintf("%d GiB", n>>30)
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	default:
		return fmt.Sprintf("%d B", n)
	}
}

// WriteReport writes results.json and results.md into dir and, when
// gnuplot is installed, iops_by_qd.png and p99_by_qd.png. It returns the
// paths written.
func WriteReport(ctx context.Context, dir string, r *Report) ([]string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	js, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return nil, err
	}
	written := []string{filepath.Join(dir, "results.json"), filepath.Join(dir, "results.md")}
	if err := os.WriteFile(written[0], append(js, '\n'), 0o644); err != nil {
		return nil, err
	}
	if err := os.WriteFile(written[1], []byte(RenderMarkdown(r)), 0o644); err != nil {
		return nil, err
	}
	plots, err := writePlots(ctx, dir, r)
	return append(written, plots...), err
}

// plotFamilies are the workload families drawn by queue depth.
func plotFamilies() []string {
	return []string{FamilyRandRead, FamilyRandWrite, FamilyRandRW, FamilyPaging}
}

// plotStyle gives each known server a fixed colour across runs, solid
// lines for the subjects (lupool, the engine) and dashed ones for peers.
func plotStyle(server string) string {
	colors := map[string]string{
		"lupool-mem": "#d62728", "lupool-file": "#ff7f0e", "lupool-2copies": "#8c564b",
		"engine-mem": "#e377c2", "engine-file": "#bcbd22",
		"base-lupool-mem": "#f7b6d2", "base-lupool-file": "#ffbb78", "base-engine-mem": "#c5b0d5", "base-engine-file": "#dbdb8d",
		"nbdkit-memory": "#1f77b4", "nbdkit-file": "#2ca02c", "qemu-nbd": "#9467bd",
	}
	color, ok := colors[server]
	if !ok {
		color = "#7f7f7f"
	}
	dash := 2
	for _, spec := range Servers() {
		if spec.Name == server && spec.Subject {
			dash = 1
		}
	}
	return fmt.Sprintf("lc rgb '%s' dt %d", color, dash)
}

// plotData renders one family's series for gnuplot: one block per server
// (separated by two blank lines, selected with "index"), each line
// "queue_depth iops_median iops_min iops_max p99_median p99_min p99_max".
// It returns the servers in block order.
func plotData(r *Report, family string) (string, []string) {
	var b strings.Builder
	var servers []string
	for _, res := range firstResults(r, family) {
		var lines []string
		for _, w := range r.Workloads {
			if w.Family != family {
				continue
			}
			for _, x := range w.Results {
				if x.Server == res.Server && !math.IsNaN(x.IOPS.Median) {
					lines = append(lines, fmt.Sprintf("%d %.1f %.1f %.1f %.1f %.1f %.1f", w.QueueDepth,
						x.IOPS.Median, x.IOPS.Min, x.IOPS.Max,
						x.LatencyP99Microsecond.Median, x.LatencyP99Microsecond.Min, x.LatencyP99Microsecond.Max))
				}
			}
		}
		if len(lines) == 0 {
			continue
		}
		if len(servers) > 0 {
			b.WriteString("\n\n")
		}
		fmt.Fprintf(&b, "# %s\n%s\n", res.Server, strings.Join(lines, "\n"))
		servers = append(servers, res.Server)
	}
	return b.String(), servers
}

func firstResults(r *Report, family string) []ServerResult {
	for _, w := range r.Workloads {
		if w.Family == family {
			return w.Results
		}
	}
	return nil
}

// plotScript renders the gnuplot script for one metric, to run in the
// directory holding the .dat files: a panel per family,
// queue depth on a log axis, one line per server with min–max error bars.
func plotScript(png, title, ylabel string, column int, scale float64, logY bool, families []string, servers map[string][]string) string {
	var b strings.Builder
	cols, rows := 2, (len(families)+1)/2
	if len(families) == 1 {
		cols = 1
	}
	fmt.Fprintf(&b, "set terminal pngcairo size %d,%d font 'sans,11'\nset output '%s'\n", 820*cols, 480*rows, png)
	fmt.Fprintf(&b, "set multiplot layout %d,%d title '%s' font 'sans,14'\n", rows, cols, title)
	b.WriteString("set logscale x 2\nset xtics (1,2,4,8,16,32,64)\nset xrange [0.7:48]\nset offsets 0,0,graph 0.2,0\nset grid\nset key outside right top\nset xlabel 'queue depth (iodepth)'\n")
	fmt.Fprintf(&b, "set ylabel '%s'\n", ylabel)
	if logY {
		b.WriteString("set logscale y\nset yrange [*:*]\nset format y '%g'\n")
	} else {
		b.WriteString("set yrange [0:*]\nset format y '%.0s%c'\n")
	}
	for _, fam := range families {
		fmt.Fprintf(&b, "set title '%s'\n", fam)
		var parts []string
		n := len(servers[fam])
		for i, s := range servers[fam] {
			// Spread the servers a little along x so that their bars do
			// not hide each other.
			shift := math.Pow(2, 0.08*(float64(i)-float64(n-1)/2))
			parts = append(parts, fmt.Sprintf("'%s' index %d using ($1*%.4f):($%d/%g):($%d/%g):($%d/%g) with yerrorlines lw 2 pt 7 ps 1.1 %s title '%s'",
				fam+".dat", i, shift, column, scale, column+1, scale, column+2, scale, plotStyle(s), s))
		}
		fmt.Fprintf(&b, "plot %s\n", strings.Join(parts, ", \\\n     "))
	}
	b.WriteString("unset multiplot\n")
	return b.String()
}

// writePlots writes the plot data and scripts under dir/plot and runs
// gnuplot. Without gnuplot it writes the data and scripts only.
func writePlots(ctx context.Context, dir string, r *Report) ([]string, error) {
	plotDir := filepath.Join(dir, "plot")
	if err := os.MkdirAll(plotDir, 0o755); err != nil {
		return nil, err
	}
	var families []string
	servers := map[string][]string{}
	for _, fam := range plotFamilies() {
		data, names := plotData(r, fam)
		if len(names) == 0 {
			continue
		}
		if err := os.WriteFile(filepath.Join(plotDir, fam+".dat"), []byte(data), 0o644); err != nil {
			return nil, err
		}
		families = append(families, fam)
		servers[fam] = names
	}
	if len(families) == 0 {
		return nil, nil
	}
	var written []string
	for _, p := range []struct {
		png, title, ylabel string
		column             int
		scale              float64
		logY               bool
	}{
		{"iops_by_qd.png", "IOPS by queue depth (median of rounds, bars min–max; higher is better)", "IOPS", 2, 1, false},
		{"p99_by_qd.png", "p99 latency by queue depth (median of rounds, bars min–max; lower is better)", "p99 latency (ms, log scale)", 5, 1000, true},
	} {
		script := plotScript(p.png, p.title, p.ylabel, p.column, p.scale, p.logY, families, servers)
		scriptPath := filepath.Join(plotDir, strings.TrimSuffix(p.png, ".png")+".gp")
		if err := os.WriteFile(scriptPath, []byte(script), 0o644); err != nil {
			return written, err
		}
		if _, err := exec.LookPath("gnuplot"); err != nil {
			continue
		}
		cmd := exec.CommandContext(ctx, "gnuplot", filepath.Base(scriptPath))
		cmd.Dir = plotDir
		out, err := cmd.CombinedOutput()
		if err != nil {
			return written, fmt.Errorf("bench: gnuplot %s: %w: %s", scriptPath, err, bytes.TrimSpace(out))
		}
		if err := os.Rename(filepath.Join(plotDir, p.png), filepath.Join(dir, p.png)); err != nil {
			return written, err
		}
		written = append(written, filepath.Join(dir, p.png))
	}
	return written, nil
}
