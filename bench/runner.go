package bench

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"
)

// Options configure a run. Call EnsureDefaults, then Validate.
type Options struct {
	// Servers to start, in alternation order.
	Servers []ServerSpec
	// Workloads to run, in order.
	Workloads []Workload
	// Subjects names the servers whose ratios against the others are
	// reported. Empty means every ServerSpec with Subject set (lupool).
	Subjects []string
	// Runtime of each fio run.
	Runtime time.Duration
	// SizeBytes is the region of each export fio works on.
	SizeBytes int64
	// DeviceBytes is the size of each export; at least SizeBytes.
	DeviceBytes int64
	// Rounds is how many times each server runs each workload.
	Rounds int
	// OutDir receives results.md, results.json, the plots and the job files.
	OutDir string
	// KeepRaw keeps every fio JSON report under OutDir/raw.
	KeepRaw bool
	// LupoolBin is the lupool binary.
	LupoolBin string
	// EngineBin handles EngineCommand; default: the running binary.
	EngineBin string
	// BaselineLupoolBin and BaselineEngineBin are an older build's lupool
	// and nbdbench binaries, for the base-* servers (a before/after run of
	// a change side by side); empty: those servers are unavailable.
	BaselineLupoolBin string
	BaselineEngineBin string
	// FioBin is the fio binary.
	FioBin string
	// CommandLine is recorded in the report (how to reproduce the run).
	CommandLine string
	// Logger receives progress.
	Logger *slog.Logger
}

// Defaults, each chosen so that a default run stays short on a 2-core
// machine yet every number rests on a few hundred thousand operations.
const (
	defaultRuntime     = 2 * time.Second // ~0.3 s of fio start-up is added per run
	defaultSizeBytes   = 1 << 30         // larger than the L2 caches, fits RAM
	defaultRounds      = 3               // the minimum for a median with a spread
	defaultLupoolBin   = "bin/lupool"
	defaultFioBin      = "fio"
	fioTimeoutOverhead = 30 * time.Second // beyond Runtime before fio is killed
)

// EnsureDefaults fills unset fields.
func (o *Options) EnsureDefaults() {
	if o.Runtime == 0 {
		o.Runtime = defaultRuntime
	}
	if o.SizeBytes == 0 {
		o.SizeBytes = defaultSizeBytes
	}
	if o.DeviceBytes < o.SizeBytes {
		o.DeviceBytes = max(o.SizeBytes, defaultSizeBytes)
	}
	if o.Rounds == 0 {
		o.Rounds = defaultRounds
	}
	if o.LupoolBin == "" {
		o.LupoolBin = defaultLupoolBin
	}
	if o.EngineBin == "" {
		o.EngineBin = defaultEngineBin()
	}
	if o.FioBin == "" {
		o.FioBin = defaultFioBin
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Servers == nil {
		o.Servers = Servers()
	}
	if o.Workloads == nil {
		o.Workloads = Catalog()
	}
}

// Validate reports options that cannot work.
func (o *Options) Validate() error {
	switch {
	case len(o.Servers) == 0:
		return errors.New("bench: no servers selected")
	case len(o.Workloads) == 0:
		return errors.New("bench: no workloads selected")
	case o.Runtime < 100*time.Millisecond:
		return fmt.Errorf("bench: runtime %v is below 100ms", o.Runtime)
	case o.SizeBytes < 1<<20 || o.SizeBytes%4096 != 0:
		return fmt.Errorf("bench: size %d must be at least 1 MiB and a multiple of 4 KiB", o.SizeBytes)
	case o.Rounds < 1:
		return fmt.Errorf("bench: rounds %d below 1", o.Rounds)
	case o.OutDir == "":
		return errors.New("bench: no output directory")
	case o.Logger == nil:
		return errors.New("bench: nil logger")
	}
	return nil
}

func (o *Options) isSubject(s ServerSpec) bool {
	if len(o.Subjects) == 0 {
		return s.Subject
	}
	for _, n := range o.Subjects {
		if n == s.Name {
			return true
		}
	}
	return false
}

// Run starts the servers, runs every workload against each in alternation
// for o.Rounds rounds, stops the servers and returns the report. A server
// that cannot start is skipped and the reason recorded; Run fails only if
// none starts or the context ends. Run writes job files (and raw fio output
// with KeepRaw) under o.OutDir but not the report itself; see WriteReport.
func Run(ctx context.Context, o Options) (report *Report, err error) {
	o.EnsureDefaults()
	if err := o.Validate(); err != nil {
		return nil, err
	}
	workDir, err := os.MkdirTemp("", "nbdbench-")
	if err != nil {
		return nil, err
	}
	defer func() { err = errors.Join(err, os.RemoveAll(workDir)) }()
	rawDir := filepath.Join(workDir, "raw")
	if o.KeepRaw {
		rawDir = filepath.Join(o.OutDir, "raw")
	}
	for _, d := range []string{rawDir, filepath.Join(o.OutDir, "jobs")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, err
		}
	}
	report = &Report{Meta: collectMeta(ctx, &o)}
	var running []*Running
	var live []ServerSpec
	defer func() {
		for _, r := range running {
			err = errors.Join(err, r.Stop())
		}
	}()
	for _, s := range o.Servers {
		sr := ServerReport{Name: s.Name, Class: s.Class, Subject: o.isSubject(s), Notes: s.Notes}
		dir := filepath.Join(workDir, s.Name)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, err
		}
		r, err := s.Start(ctx, Env{Dir: dir, DeviceBytes: o.DeviceBytes, LupoolBin: o.LupoolBin, EngineBin: o.EngineBin,
			BaselineLupoolBin: o.BaselineLupoolBin, BaselineEngineBin: o.BaselineEngineBin, Logger: o.Logger})
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if err != nil {
			sr.Skipped = strings.TrimPrefix(err.Error(), s.Name+": ")
			o.Logger.Warn("server skipped", "server", s.Name, "reason", err)
			report.Servers = append(report.Servers, sr)
			continue
		}
		running = append(running, r)
		sr.Commands = r.Commands
		if err := runFioJob(ctx, &o, prefillJob(r.URI, o.SizeBytes), filepath.Join(rawDir, s.Name+"-prefill"), false); err != nil {
			sr.Skipped = "prefill failed: " + err.Error()
			o.Logger.Warn("server skipped", "server", s.Name, "reason", err)
			report.Servers = append(report.Servers, sr)
			running = running[:len(running)-1]
			if err := r.Stop(); err != nil {
				return nil, err
			}
			continue
		}
		o.Logger.Info("server ready", "server", s.Name, "uri", r.URI)
		report.Servers = append(report.Servers, sr)
		live = append(live, s)
	}
	if len(live) == 0 {
		return report, errors.New("bench: no server could start (see the skip reasons above)")
	}
	defer func() {
		report.Meta.LoadAverageEnd = loadAverage()
		for i, s := range live {
			exited := running[i].Exited()
			for j := range report.Servers {
				if report.Servers[j].Name == s.Name && exited != "" {
					report.Servers[j].Died = exited
				}
			}
		}
	}()
	for _, w := range o.Workloads {
		wr, err := runWorkload(ctx, &o, w, live, running, rawDir)
		if err != nil {
			return report, err
		}
		report.Workloads = append(report.Workloads, wr)
	}
	return report, nil
}

// loadAverage returns the 1, 5 and 15 minute load averages, or "" where
// /proc/loadavg does not exist.
func loadAverage() string {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return ""
	}
	fields := strings.Fields(string(data))
	if len(fields) < 3 {
		return ""
	}
	return strings.Join(fields[:3], " ")
}

// runWorkload runs w for every round against every live server, rotating
// the starting server each round, and summarizes.
func runWorkload(ctx context.Context, o *Options, w Workload, live []ServerSpec, running []*Running, rawDir string) (WorkloadReport, error) {
	jobPath := filepath.Join(o.OutDir, "jobs", w.Name+".fio")
	if err := os.WriteFile(jobPath, []byte(w.JobFile("nbd://HOST:PORT/EXPORT", o.Runtime, o.SizeBytes)), 0o644); err != nil {
		return WorkloadReport{}, err
	}
	rounds := make(map[string][]Round, len(live))
	for r := range o.Rounds {
		for k := range live {
			i := (r + k) % len(live)
			s := live[i]
			if exited := running[i].Exited(); exited != "" {
				// Record the gap so that rounds stay paired; don't wait on fio.
				rounds[s.Name] = append(rounds[s.Name], Round{Error: "server not running: " + exited})
				continue
			}
			base := filepath.Join(rawDir, fmt.Sprintf("%s-%s-r%d", w.Name, s.Name, r+1))
			sample, err := runSample(ctx, o, w.JobFile(running[i].URI, o.Runtime, o.SizeBytes), base)
			if ctx.Err() != nil {
				return WorkloadReport{}, ctx.Err()
			}
			round := Round{Sample: sample}
			if err != nil {
				round = Round{Error: err.Error()}
				o.Logger.Warn("fio run failed", "workload", w.Name, "server", s.Name, "round", r+1, "err", err)
				if exited := running[i].Exited(); exited != "" {
					o.Logger.Error("server died", "server", s.Name, "exit", exited)
				}
			} else {
				o.Logger.Info("run", "workload", w.Name, "server", s.Name, "round", r+1,
					"iops", math.Round(sample.IOPS), "p99_us", sample.LatencyP99Microsecond)
			}
			rounds[s.Name] = append(rounds[s.Name], round)
		}
	}
	subjects := map[string]bool{}
	classes := map[string]string{}
	var names []string
	for _, s := range live {
		names = append(names, s.Name)
		subjects[s.Name] = o.isSubject(s)
		classes[s.Name] = s.Class
	}
	return summarizeWorkload(w, names, subjects, classes, rounds), nil
}

func runSample(ctx context.Context, o *Options, job, base string) (*Sample, error) {
	if err := runFioJob(ctx, o, job, base, true); err != nil {
		return nil, err
	}
	data, err := os.ReadFile(base + ".json")
	if err != nil {
		return nil, err
	}
	s, err := ParseFio(data)
	if err != nil {
		return nil, err
	}
	return &s, nil
}

// runFioJob writes job to base.fio and runs fio on it, with the JSON report
// in base.json when report is set.
func runFioJob(ctx context.Context, o *Options, job, base string, report bool) error {
	if err := os.WriteFile(base+".fio", []byte(job), 0o644); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, o.Runtime+fioTimeoutOverhead)
	defer cancel()
	args := []string{base + ".fio"}
	if report {
		args = []string{"--output-format=json", "--output=" + base + ".json", base + ".fio"}
	}
	cmd := exec.CommandContext(ctx, o.FioBin, args...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("bench: fio %s: %w: %s", base+".fio", err, tail(out))
	}
	return nil
}

// collectMeta records the machine and tool versions the run used.
func collectMeta(ctx context.Context, o *Options) Meta {
	m := Meta{
		Date:        time.Now().UTC().Format(time.RFC3339),
		CPUs:        runtime.NumCPU(),
		Runtime:     o.Runtime.String(),
		SizeBytes:   o.SizeBytes,
		DeviceBytes: o.DeviceBytes,
		Rounds:      o.Rounds,
		CommandLine: o.CommandLine,
		Versions:    map[string]string{},
	}
	m.Host, _ = os.Hostname()
	m.LoadAverageStart = loadAverage()
	if data, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(data))
	}
	if data, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(data), "\n") {
			if name, ok := strings.CutPrefix(line, "model name"); ok {
				m.CPUModel = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(name), ":"))
				break
			}
		}
	}
	for tool, args := range map[string][]string{
		"fio": {o.FioBin, "--version"}, "nbdkit": {"nbdkit", "--version"}, "qemu-nbd": {"qemu-nbd", "--version"},
	} {
		out, err := exec.CommandContext(ctx, args[0], args[1:]...).Output()
		if err == nil {
			m.Versions[tool], _, _ = strings.Cut(strings.TrimSpace(string(out)), "\n")
		}
	}
	return m
}
