package bench

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// fakeLupoolEnv makes the test binary act as a stand-in for bin/lupool, so
// the runner's lupool path (serve, /readyz, lu create over LUPOOL_API, two
// nodes with --join, SIGTERM) is exercised before the real daemon exists.
// Its NBD export is nbdkit memory on the --nbd port.
const fakeLupoolEnv = "BENCH_FAKE_LUPOOL"

// fakeLupoolDieEnv names a file: the fake daemon writes its PID there
// and, on SIGUSR1, "crashes" (exit status 3). A test sends the signal at a
// point of the run it chooses, whatever the machine's load.
const fakeLupoolDieEnv = "BENCH_FAKE_LUPOOL_PIDFILE"

func TestMain(m *testing.M) {
	if os.Getenv(fakeLupoolEnv) == "1" {
		os.Exit(fakeLupool(os.Args[1:]))
	}
	// The runner re-executes its own binary for the engine servers.
	if len(os.Args) > 1 && os.Args[1] == EngineCommand {
		if err := EngineMain(os.Args[2:], slog.New(slog.DiscardHandler)); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func fakeLupool(args []string) int {
	switch {
	case len(args) > 0 && args[0] == "serve":
		return fakeServe(args[1:])
	case len(args) > 1 && args[0] == "cluster" && args[1] == "join-token":
		if os.Getenv("LUPOOL_TOKEN_FILE") == "" {
			fmt.Fprintln(os.Stderr, "fake lupool: no admin token")
			return 1
		}
		fmt.Println("lupool1.fake")
		return 0
	case len(args) > 2 && args[0] == "lu" && args[1] == "create":
		fs := flag.NewFlagSet("create", flag.ContinueOnError)
		size := fs.String("size", "", "")
		kind := fs.String("kind", "file", "")
		copies := fs.Int("copies", 1, "")
		if err := fs.Parse(args[3:]); err != nil {
			return 2
		}
		q := url.Values{"size": {*size}, "kind": {*kind}, "copies": {fmt.Sprint(*copies)}}
		resp, err := http.Get("http://" + os.Getenv("LUPOOL_API") + "/create?" + q.Encode())
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusOK {
			fmt.Fprintf(os.Stderr, "lu create: %s\n", body)
			return 1
		}
		return 0
	}
	fmt.Fprintf(os.Stderr, "fake lupool: unknown command %q\n", args)
	return 2
}

func fakeServe(args []string) int {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	nbd := fs.String("nbd", "", "")
	api := fs.String("api", "", "")
	join := fs.String("join", "", "")
	joinToken := fs.String("join-token", "", "")
	fs.String("data", "", "")
	fs.String("peer", "", "")
	fs.String("node-id", "", "")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *join != "" && *joinToken == "" {
		fmt.Fprintln(os.Stderr, "fake lupool: --join needs --join-token")
		return 2
	}
	var mu sync.Mutex
	nodes := 1 // guarded by mu
	var server *exec.Cmd
	mux := http.NewServeMux()
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {})
	mux.HandleFunc("/join", func(w http.ResponseWriter, _ *http.Request) {
		mu.Lock()
		nodes++
		mu.Unlock()
	})
	mux.HandleFunc("/create", func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		if r.FormValue("copies") != "1" && nodes < 2 {
			http.Error(w, "not enough nodes for 2 copies", http.StatusConflict)
			return
		}
		_, port, _ := strings.Cut(*nbd, ":")
		server = exec.Command("nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", port, "memory", r.FormValue("size"))
		if err := server.Start(); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
		}
		if pidFile := os.Getenv(fakeLupoolDieEnv); pidFile != "" {
			// Crash mid-run when told: the runner must notice and
			// report it.
			usr1 := make(chan os.Signal, 1)
			signal.Notify(usr1, syscall.SIGUSR1)
			go func() {
				<-usr1
				fmt.Fprintln(os.Stderr, "fake crash")
				os.Exit(3)
			}()
			if err := os.WriteFile(pidFile, []byte(fmt.Sprint(os.Getpid())), 0o644); err != nil {
				http.Error(w, err.Error(), http.StatusInternalServerError)
			}
		}
	})
	go http.ListenAndServe(*api, mux)
	if *join != "" {
		// Join late, so that lu create --copies 2 has to be retried.
		go func() {
			time.Sleep(time.Second)
			http.Get("http://" + *join + "/join")
		}()
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM)
	<-sig
	mu.Lock()
	if server != nil {
		server.Process.Kill()
		server.Wait()
	}
	return 0
}

func TestRunWithFakeLupool(t *testing.T) {
	needTools(t, "fio", "nbdkit")
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv(fakeLupoolEnv, "1")
	ws, err := SelectWorkloads([]string{"randread-qd1"})
	if err != nil {
		t.Fatal(err)
	}
	servers, err := SelectServers([]string{"lupool-mem", "lupool-2copies", "nbdkit-memory"})
	if err != nil {
		t.Fatal(err)
	}
	r, err := Run(context.Background(), Options{Servers: servers, Workloads: ws, Runtime: 300 * time.Millisecond,
		SizeBytes: 8 << 20, Rounds: 1, OutDir: t.TempDir(), LupoolBin: self, Logger: slog.New(slog.NewTextHandler(t.Output(), nil))})
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	for _, s := range r.Servers {
		if s.Skipped != "" {
			t.Errorf("%s skipped: %s", s.Name, s.Skipped)
		}
	}
	copies := strings.Join(r.Servers[1].Commands, "\n")
	for _, want := range []string{"--node-id bench1", "--node-id bench2", "--join 127.0.0.1:", "--join-token lupool1.fake", "LUPOOL_TOKEN_FILE=", "lu create bench --size 1G --kind file --copies 2"} {
		if !strings.Contains(copies, want) {
			t.Errorf("lupool-2copies commands lack %q:\n%s", want, copies)
		}
	}
	if !strings.Contains(strings.Join(r.Servers[0].Commands, "\n"), "lu create bench --size 1G --kind memory") {
		t.Errorf("lupool-mem commands: %q", r.Servers[0].Commands)
	}
	w := r.Workloads[0]
	if len(w.Ratios) != 2 || w.Ratios[0].Subject != "lupool-mem" || w.Ratios[1].Subject != "lupool-2copies" ||
		!w.Ratios[0].SameClass || w.Ratios[1].SameClass || w.Ratios[0].Pairs != 1 {
		t.Errorf("ratios = %+v", w.Ratios)
	}
}

// TestServerDiesMidRun: a daemon that exits during the run is reported as
// dead with its log, its later rounds are gaps, and the run goes on.
func TestServerDiesMidRun(t *testing.T) {
	needTools(t, "fio", "nbdkit")
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv(fakeLupoolEnv, "1")
	pidFile := filepath.Join(t.TempDir(), "fake.pid")
	t.Setenv(fakeLupoolDieEnv, pidFile)
	ws, err := SelectWorkloads([]string{"randread-qd1"})
	if err != nil {
		t.Fatal(err)
	}
	servers, err := SelectServers([]string{"lupool-mem", "nbdkit-memory"})
	if err != nil {
		t.Fatal(err)
	}
	r, err := Run(context.Background(), Options{Servers: servers, Workloads: ws, Runtime: 500 * time.Millisecond,
		SizeBytes: 8 << 20, Rounds: 6, OutDir: t.TempDir(), LupoolBin: self,
		Logger: slog.New(&killAfterRound{Handler: slog.NewTextHandler(t.Output(), nil), t: t, pidFile: pidFile,
			server: "lupool-mem", round: 2})})
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	if len(r.Servers) != 2 || len(r.Workloads) != 1 || len(r.Workloads[0].Results) != 2 || len(r.Workloads[0].Results[0].Rounds) != 6 {
		t.Fatalf("run result: %d servers, %d workloads; want 2 servers and 6 rounds of one workload: %+v", len(r.Servers), len(r.Workloads), r)
	}
	if d := r.Servers[0].Died; !strings.Contains(d, "fake crash") || !strings.Contains(d, "exit status 3") {
		t.Errorf("lupool-mem Died = %q, want its exit status and log", d)
	}
	if r.Servers[1].Died != "" {
		t.Errorf("nbdkit-memory Died = %q", r.Servers[1].Died)
	}
	res := r.Workloads[0].Results
	if last := res[0].Rounds[5]; last.Sample != nil || !strings.Contains(last.Error, "server not running") {
		t.Errorf("lupool-mem last round = %+v, want a gap", last)
	}
	for i, round := range res[1].Rounds {
		if round.Sample == nil {
			t.Errorf("nbdkit-memory round %d failed: %s", i+1, round.Error)
		}
	}
	if !strings.Contains(RenderMarkdown(r), "| lupool-mem | memory | DIED during the run: ") {
		t.Error("markdown does not show the death")
	}
}

// killAfterRound is a log handler that sends the fake daemon of server
// SIGUSR1 once the runner logs that server's round: a crash at a chosen
// point of the run.
type killAfterRound struct {
	slog.Handler
	t       *testing.T
	pidFile string
	server  string
	round   int64
}

func (k *killAfterRound) Handle(ctx context.Context, rec slog.Record) error {
	if rec.Message == "run" {
		var server string
		var round int64
		rec.Attrs(func(a slog.Attr) bool {
			switch a.Key {
			case "server":
				server = a.Value.String()
			case "round":
				round = a.Value.Int64()
			}
			return true
		})
		if server == k.server && round == k.round {
			b, err := os.ReadFile(k.pidFile)
			pid, perr := strconv.Atoi(strings.TrimSpace(string(b)))
			if err != nil || perr != nil {
				k.t.Errorf("fake daemon's PID file: %v %v", err, perr)
			} else if err := syscall.Kill(pid, syscall.SIGUSR1); err != nil {
				k.t.Errorf("signal the fake daemon: %v", err)
			}
		}
	}
	return k.Handler.Handle(ctx, rec)
}

func (k *killAfterRound) WithAttrs(as []slog.Attr) slog.Handler {
	return &killAfterRound{Handler: k.Handler.WithAttrs(as), t: k.t, pidFile: k.pidFile, server: k.server, round: k.round}
}

func (k *killAfterRound) WithGroup(name string) slog.Handler {
	return &killAfterRound{Handler: k.Handler.WithGroup(name), t: k.t, pidFile: k.pidFile, server: k.server, round: k.round}
}
