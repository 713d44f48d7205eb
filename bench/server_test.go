package bench

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lupool/lupool/internal/realclient"
)

// needTools ends the test unless every tool is installed: a skip, a
// failure in CI (realclient.Require).
func needTools(t *testing.T, tools ...string) {
	t.Helper()
	realclient.Require(t, tools...)
}

func testEnv(t *testing.T) Env {
	return Env{Dir: t.TempDir(), DeviceBytes: 64 << 20, LupoolBin: filepath.Join(t.TempDir(), "lupool"),
		EngineBin: defaultEngineBin(), Logger: slog.New(slog.DiscardHandler)}
}

func TestStartStopPeers(t *testing.T) {
	needTools(t, "nbdkit", "qemu-nbd")
	specs, err := SelectServers([]string{"nbdkit-memory", "nbdkit-file", "qemu-nbd", "engine-mem", "engine-file"})
	if err != nil {
		t.Fatal(err)
	}
	for _, spec := range specs {
		r, err := spec.Start(context.Background(), testEnv(t))
		if err != nil {
			t.Fatalf("%s: %v", spec.Name, err)
		}
		u, err := url.Parse(r.URI)
		if err != nil || u.Scheme != "nbd" || u.Hostname() != "127.0.0.1" {
			t.Fatalf("%s: URI %q", spec.Name, r.URI)
		}
		c, err := net.Dial("tcp", u.Host)
		if err != nil {
			t.Fatalf("%s: dial %s: %v", spec.Name, u.Host, err)
		}
		c.Close()
		pid := r.procs[0].cmd.Process.Pid
		if err := r.Stop(); err != nil {
			t.Errorf("%s: stop: %v", spec.Name, err)
		}
		// Stopped means reaped: the PID is gone and the port is closed.
		if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
			t.Errorf("%s: pid %d still exists after Stop (kill 0: %v)", spec.Name, pid, err)
		}
		if c, err := net.DialTimeout("tcp", u.Host, time.Second); err == nil {
			c.Close()
			t.Errorf("%s: %s still accepts connections after Stop", spec.Name, u.Host)
		}
	}
}

func TestLupoolUnavailable(t *testing.T) {
	specs, err := SelectServers([]string{"lupool-mem", "lupool-2copies"})
	if err != nil {
		t.Fatal(err)
	}
	env := testEnv(t)
	if _, err := specs[0].Start(context.Background(), env); !errors.Is(err, ErrServerUnavailable) ||
		!strings.Contains(err.Error(), "no lupool binary") {
		t.Errorf("missing binary: err = %v, want ErrServerUnavailable", err)
	}
	// A lupool that exits at once: the error carries its output.
	script := "#!/bin/sh\necho 'unknown command: serve' >&2\nexit 2\n"
	if err := os.WriteFile(env.LupoolBin, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	_, err = specs[0].Start(context.Background(), env)
	if !errors.Is(err, ErrServerUnavailable) || !strings.Contains(err.Error(), "unknown command: serve") {
		t.Errorf("exiting binary: err = %v, want ErrServerUnavailable with its output", err)
	}
	if _, err := specs[1].Start(context.Background(), env); !errors.Is(err, ErrServerUnavailable) ||
		!strings.Contains(err.Error(), "unknown command: serve") {
		t.Errorf("2 copies: err = %v, want ErrServerUnavailable with its output", err)
	}
	if _, err := SelectServers([]string{"nbdkit-memory", "nope"}); err == nil {
		t.Error("SelectServers accepted an unknown server")
	}
}

// TestRunEngine measures lupool's NBD engine (re-executed test binary)
// against nbdkit memory on the paging profile, which sends trims.
func TestRunEngine(t *testing.T) {
	needTools(t, "fio", "nbdkit")
	ws, err := SelectWorkloads([]string{"paging-qd4"})
	if err != nil {
		t.Fatal(err)
	}
	servers, err := SelectServers([]string{"engine-mem", "engine-file", "nbdkit-memory"})
	if err != nil {
		t.Fatal(err)
	}
	r, err := Run(context.Background(), Options{Servers: servers, Workloads: ws, Runtime: 300 * time.Millisecond,
		SizeBytes: 8 << 20, Rounds: 1, OutDir: t.TempDir(), Logger: slog.New(slog.NewTextHandler(t.Output(), nil))})
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	for _, s := range r.Servers {
		if s.Skipped != "" {
			t.Fatalf("%s skipped: %s", s.Name, s.Skipped)
		}
	}
	w := r.Workloads[0]
	for _, res := range w.Results {
		if s := res.Rounds[0].Sample; s == nil || s.Ops["trim"] == 0 || s.Ops["write"] == 0 {
			t.Errorf("%s: %+v, want writes and trims", res.Server, res.Rounds[0])
		}
	}
	if len(w.Ratios) != 2 || w.Ratios[0].Subject != "engine-mem" || w.Ratios[0].Peer != "nbdkit-memory" ||
		!w.Ratios[0].SameClass || w.Ratios[1].SameClass || w.Ratios[0].Pairs != 1 {
		t.Errorf("ratios = %+v", w.Ratios)
	}
}

// TestRunAgainstNbdkit runs the whole runner on two real servers with a
// subject chosen by option, so the ratio path runs without lupool.
func TestRunAgainstNbdkit(t *testing.T) {
	needTools(t, "fio", "nbdkit")
	ws, err := SelectWorkloads([]string{"randread-qd1", "paging-qd4"})
	if err != nil {
		t.Fatal(err)
	}
	servers, err := SelectServers([]string{"nbdkit-memory", "nbdkit-file", "lupool-mem"})
	if err != nil {
		t.Fatal(err)
	}
	out := t.TempDir()
	opts := Options{Servers: servers, Workloads: ws, Subjects: []string{"nbdkit-file"},
		Runtime: 300 * time.Millisecond, SizeBytes: 8 << 20, Rounds: 2, OutDir: out,
		LupoolBin: filepath.Join(t.TempDir(), "missing-lupool")}
	r, err := Run(context.Background(), opts)
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	if len(r.Servers) != 3 || r.Servers[0].Skipped != "" || r.Servers[1].Skipped != "" ||
		!strings.Contains(r.Servers[2].Skipped, "no lupool binary") {
		t.Fatalf("servers = %+v", r.Servers)
	}
	if len(r.Workloads) != 2 {
		t.Fatalf("workloads = %d, want 2", len(r.Workloads))
	}
	if len(strings.Fields(r.Meta.LoadAverageStart)) != 3 || len(strings.Fields(r.Meta.LoadAverageEnd)) != 3 {
		t.Errorf("load averages %q, %q", r.Meta.LoadAverageStart, r.Meta.LoadAverageEnd)
	}
	for _, w := range r.Workloads {
		if len(w.Results) != 2 {
			t.Fatalf("%s: %d results, want 2 (the skipped server has none)", w.Name, len(w.Results))
		}
		for _, res := range w.Results {
			if len(res.Rounds) != 2 {
				t.Fatalf("%s/%s: %d rounds", w.Name, res.Server, len(res.Rounds))
			}
			for i, round := range res.Rounds {
				if round.Sample == nil || round.Sample.IOPS <= 0 || round.Sample.LatencyP99Microsecond <= 0 {
					t.Errorf("%s/%s round %d: %+v", w.Name, res.Server, i+1, round)
					continue
				}
				if w.Family == FamilyPaging && (round.Sample.Ops["trim"] == 0 || round.Sample.Ops["write"] == 0 || round.Sample.Ops["read"] == 0) {
					t.Errorf("%s/%s round %d: paging ops %v, want reads, writes and trims", w.Name, res.Server, i+1, round.Sample.Ops)
				}
			}
		}
		if len(w.Ratios) != 1 || w.Ratios[0].Subject != "nbdkit-file" || w.Ratios[0].Peer != "nbdkit-memory" || w.Ratios[0].Pairs != 2 {
			t.Errorf("%s: ratios %+v", w.Name, w.Ratios)
		}
	}
	for _, w := range ws {
		if _, err := os.Stat(filepath.Join(out, "jobs", w.Name+".fio")); err != nil {
			t.Errorf("job file: %v", err)
		}
	}
	if _, err := os.Stat(filepath.Join(out, "raw")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("raw output kept without KeepRaw: %v", err)
	}
}
