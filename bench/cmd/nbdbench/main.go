// Command nbdbench runs lupool's side-by-side fio benchmark: it starts lupool
// and its peers (nbdkit memory, nbdkit file, qemu-nbd) on 127.0.0.1, runs
// the same fio jobs against each in alternation, and writes results.md,
// results.json and PNG plots. See bench/README.md.
//
//	go run ./bench/cmd/nbdbench --quick --out bench/results
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"math"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/lupool/lupool/bench"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == bench.EngineCommand {
		logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
		if err := bench.EngineMain(os.Args[2:], logger); err != nil {
			fmt.Fprintln(os.Stderr, "nbdbench-engine:", err)
			os.Exit(1)
		}
		return
	}
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "nbdbench:", err)
		os.Exit(1)
	}
}

// Modes: quick must finish under 2 minutes and full under 15 on the 2-core
// build machine with five servers.
const (
	quickRuntime = 750 * time.Millisecond
	quickSize    = 256 << 20
	fullRuntime  = 2 * time.Second
	fullSize     = 1 << 30
)

func run(args []string) error {
	fs := flag.NewFlagSet("nbdbench", flag.ContinueOnError)
	quick := fs.Bool("quick", false, "quick mode: 0.75s runs over 256 MiB, workloads "+strings.Join(bench.QuickNames(), ","))
	full := fs.Bool("full", false, "full mode: 2s runs over 1 GiB, every workload")
	servers := fs.String("servers", "", "comma-separated servers in alternation order (default: lupool-mem,lupool-file,nbdkit-memory,nbdkit-file,qemu-nbd; known: "+serverNames()+")")
	workloads := fs.String("workloads", "", "comma-separated workloads (default: by mode; 'list' prints them)")
	subjects := fs.String("subjects", "", "comma-separated servers to report ratios for (default: the lupool and engine ones)")
	runtime := fs.Duration("runtime", 0, "length of each fio run (overrides the mode)")
	size := fs.String("size", "", "region of each export fio works on, e.g. 256M, 1G (overrides the mode)")
	rounds := fs.Int("rounds", 3, "rounds per workload (each server once per round)")
	out := fs.String("out", "bench/results", "output directory")
	lupoolBin := fs.String("lupool", "bin/lupool", "lupool binary")
	baseLupool := fs.String("baseline-lupool", "", "lupool binary of the baseline build, for the base-lupool-* servers")
	baseEngine := fs.String("baseline-engine", "", "nbdbench binary of the baseline build, for the base-engine-* servers")
	keepRaw := fs.Bool("keep-raw", false, "keep every fio JSON report under OUT/raw")
	verbose := fs.Bool("v", false, "debug logging")
	render := fs.String("render", "", "re-render results.md and the plots from this results.json into --out, running nothing")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *quick && *full {
		return errors.New("--quick and --full exclude each other")
	}
	if *workloads == "list" {
		for _, w := range bench.Catalog() {
			fmt.Printf("%-16s %s\n", w.Name, w.Description)
		}
		return nil
	}
	level := slog.LevelInfo
	if *verbose {
		level = slog.LevelDebug
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	if *render != "" {
		return rerender(*render, *out, logger)
	}

	opts := bench.Options{Rounds: *rounds, OutDir: *out, LupoolBin: *lupoolBin, KeepRaw: *keepRaw,
		BaselineLupoolBin: *baseLupool, BaselineEngineBin: *baseEngine,
		Logger: logger, CommandLine: "nbdbench " + strings.Join(args, " ")}
	workloadNames := splitList(*workloads)
	switch {
	case *quick:
		opts.Runtime, opts.SizeBytes = quickRuntime, quickSize
		if workloadNames == nil {
			workloadNames = bench.QuickNames()
		}
	default:
		opts.Runtime, opts.SizeBytes = fullRuntime, fullSize
	}
	if *runtime != 0 {
		opts.Runtime = *runtime
	}
	if *size != "" {
		n, err := parseSize(*size)
		if err != nil {
			return err
		}
		opts.SizeBytes = n
	}
	var err error
	if workloadNames != nil {
		if opts.Workloads, err = bench.SelectWorkloads(workloadNames); err != nil {
			return err
		}
	}
	serverList := splitList(*servers)
	if serverList == nil {
		serverList = []string{"lupool-mem", "lupool-file", "nbdkit-memory", "nbdkit-file", "qemu-nbd"}
	}
	if opts.Servers, err = bench.SelectServers(serverList); err != nil {
		return err
	}
	opts.Subjects = splitList(*subjects)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	started := time.Now()
	report, runErr := bench.Run(ctx, opts)
	if report == nil {
		return runErr
	}
	// Write what was measured even after an interrupt.
	written, err := bench.WriteReport(context.Background(), *out, report)
	for _, p := range written {
		logger.Info("wrote", "path", p)
	}
	logger.Info("done", "elapsed", time.Since(started).Round(time.Second))
	return errors.Join(runErr, err)
}

// rerender rewrites the report in out from an earlier results.json.
func rerender(path, out string, logger *slog.Logger) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var report bench.Report
	if err := json.Unmarshal(data, &report); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	written, err := bench.WriteReport(context.Background(), out, &report)
	for _, p := range written {
		logger.Info("wrote", "path", p)
	}
	return err
}

func serverNames() string {
	var names []string
	for _, s := range bench.Servers() {
		names = append(names, s.Name)
	}
	return strings.Join(names, ",")
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// parseSize reads a byte count with an optional K, M or G (binary) suffix.
func parseSize(s string) (int64, error) {
	if s == "" {
		return 0, errors.New("empty --size: want e.g. 256M or 1G")
	}
	mult := int64(1)
	switch strings.ToUpper(s[len(s)-1:]) {
	case "K":
		mult = 1 << 10
	case "M":
		mult = 1 << 20
	case "G":
		mult = 1 << 30
	}
	if mult != 1 {
		s = s[:len(s)-1]
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n <= 0 || n > math.MaxInt64/mult {
		return 0, fmt.Errorf("bad --size %q: want e.g. 256M or 1G", s)
	}
	return n * mult, nil
}
