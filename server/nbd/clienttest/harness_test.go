// Package clienttest drives the NBD engine (server/nbd) with the real
// clients users run: nbdinfo, nbdsh, nbdcopy (libnbd), qemu-img, qemu-io,
// fio's nbd engine and nbd-client -l, plus hostile raw connections. Each
// test starts the engine in-process on 127.0.0.1:0 over memory devices
// (blockdev/blockdevtest) or sparse files (lu), runs a client, and checks
// what the client saw and what the device holds afterwards.
//
// A test skips only when the client it needs is not installed
// (scripts/install-test-deps.sh installs them all), and fails instead in CI
// (CI=true; realclient.Missing).
package clienttest

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/blockdev/blockdevtest"
	"github.com/lupool/lupool/internal/realclient"
	"github.com/lupool/lupool/server/nbd"
)

const (
	kiB = 1 << 10
	miB = 1 << 20

	// clientTimeout bounds every client command.
	clientTimeout = 60 * time.Second
)

// serverConfig describes the server a test wants.
type serverConfig struct {
	exports   []nbd.Export
	tlsMode   nbd.TLSMode
	tlsConfig *tls.Config
	// replyTimeout, if set, overrides nbd.Options.ReplyTimeout.
	replyTimeout time.Duration
}

// server is an engine running on a loopback listener for one test.
type server struct {
	srv     *nbd.Server
	exports *nbd.ExportSet
	addr    string // host:port
	port    string
	metrics *nbd.Metrics
}

// startServer starts the engine serving cfg's exports and stops it when the
// test ends, failing the test if Serve returns anything but ErrServerClosed.
func startServer(t *testing.T, cfg serverConfig) *server {
	t.Helper()
	es := nbd.NewExportSet()
	for _, e := range cfg.exports {
		if err := es.Add(e); err != nil {
			t.Fatalf("add export %q: %v", e.Name, err)
		}
	}
	metrics := nbd.NewMetrics()
	srv, err := nbd.NewServer(nbd.Options{
		Exports:      es,
		Logger:       slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn})),
		TLSMode:      cfg.tlsMode,
		TLSConfig:    cfg.tlsConfig,
		Metrics:      metrics,
		ReplyTimeout: cfg.replyTimeout,
	})
	if err != nil {
		t.Fatalf("NewServer: %v", err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		if err := <-served; !errors.Is(err, nbd.ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
	})
	_, port, _ := net.SplitHostPort(l.Addr().String())
	return &server{srv: srv, exports: es, addr: l.Addr().String(), port: port, metrics: metrics}
}

// uri returns the nbd:// URI of an export.
func (s *server) uri(export string) string { return "nbd://" + s.addr + "/" + export }

// testWriter sends server logs to the test log.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Logf("server: %s", bytes.TrimRight(p, "\n"))
	return len(p), nil
}

// inlineMem is a memory device the engine runs inline, like lu.MemVolume.
type inlineMem struct{ *blockdevtest.Mem }

func (inlineMem) InlineIO() bool { return true }

var _ nbd.InlineDevice = inlineMem{}

// memExport returns an export over a new memory device, served inline as
// lupool's memory volumes are (the file tests cover the worker path).
func memExport(name string, sizeBytes int64, caps blockdev.Caps) (nbd.Export, *blockdevtest.Mem) {
	dev := blockdevtest.NewMem(sizeBytes, caps)
	return nbd.Export{Name: name, Description: "memory export " + name, Device: inlineMem{dev}}, dev
}

// startMem starts a server with one memory export called "mem".
func startMem(t *testing.T, sizeBytes int64, caps blockdev.Caps) (*server, *blockdevtest.Mem) {
	t.Helper()
	e, dev := memExport("mem", sizeBytes, caps)
	return startServer(t, serverConfig{exports: []nbd.Export{e}}), dev
}

// needTool returns the path of a client binary or ends the test
// (realclient.Missing: a skip, a failure in CI).
func needTool(t *testing.T, name string) string {
	t.Helper()
	return realclient.LookPath(t, name)
}

// result is a finished client command.
type result struct {
	stdout, stderr string
	err            error
}

// runTool runs a client with the given environment additions and returns
// its output whatever the exit status.
func runTool(t *testing.T, env []string, name string, args ...string) result {
	t.Helper()
	path := needTool(t, name)
	ctx, cancel := context.WithTimeout(context.Background(), clientTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Dir = t.TempDir() // clients that leave files (fio state) leave them there
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	err := cmd.Run()
	t.Logf("%s %s: %v in %v", name, strings.Join(args, " "), err, time.Since(start).Round(time.Millisecond))
	return result{stdout: stdout.String(), stderr: stderr.String(), err: err}
}

// mustRun runs a client and fails the test unless it exits 0.
func mustRun(t *testing.T, name string, args ...string) string {
	t.Helper()
	r := runTool(t, nil, name, args...)
	if r.err != nil {
		t.Fatalf("%s %s: %v\nstdout:\n%s\nstderr:\n%s", name, strings.Join(args, " "), r.err, r.stdout, r.stderr)
	}
	return r.stdout
}

// nbdshPython returns a Python interpreter that can import libnbd's nbd
// module (realclient.NbdshPython).
func nbdshPython(t *testing.T) string {
	t.Helper()
	return realclient.NbdshPython(t)
}

// runNbdsh runs testdata/lib.py then testdata/<script> inside nbdsh, with
// env (NBD_URI=... and script parameters), and fails the test unless the
// script printed OK.
func runNbdsh(t *testing.T, script string, env ...string) {
	t.Helper()
	py := nbdshPython(t)
	lib, err := filepath.Abs(filepath.Join("testdata", "lib.py"))
	if err != nil {
		t.Fatal(err)
	}
	body, err := filepath.Abs(filepath.Join("testdata", script))
	if err != nil {
		t.Fatal(err)
	}
	code := fmt.Sprintf("exec(open(%q).read()); exec(open(%q).read())", lib, body)
	r := runTool(t, env, py, "-m", "nbd", "-c", code)
	if r.err != nil || !strings.Contains(r.stdout, "OK") {
		t.Fatalf("nbdsh %s (%s): %v\nstdout:\n%s\nstderr:\n%s", script, strings.Join(env, " "), r.err, r.stdout, r.stderr)
	}
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitGoroutines waits until the goroutine count is back to at most base.
func waitGoroutines(t *testing.T, base int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > base {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			n := runtime.Stack(buf, true)
			t.Fatalf("goroutines: %d, want <= %d\n%s", runtime.NumGoroutine(), base, buf[:n])
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// pattern returns n deterministic bytes (the same as lib.py's pattern).
func pattern(n int, seed int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte((i*7 + seed) % 251)
	}
	return b
}
