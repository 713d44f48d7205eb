package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/lupool/lupool/internal/freeport"
)

// Server classes: ratios are reported between a subject and the peers of
// its own class, so a memory LU is compared with nbdkit memory and a file LU
// with the file-backed servers.
const (
	// ClassMemory servers keep data in RAM and promise no durability.
	ClassMemory = "memory"
	// ClassFile servers write a sparse file through the page cache and make
	// it durable on NBD FLUSH (fdatasync). fio issues no flushes here, so
	// every file server runs out of the page cache alike.
	ClassFile = "file"
)

// Limits on waiting for servers.
const (
	readyTimeout   = 20 * time.Second
	readyPoll      = 50 * time.Millisecond
	stopGrace      = 5 * time.Second
	logTailMaxByte = 800
)

// ErrServerUnavailable is returned by ServerSpec.Start when the server's
// program is missing or cannot serve the configuration (for example lupool
// before its daemon exists, or before it can keep copies). The runner skips
// such a server and says why in the report.
var ErrServerUnavailable = errors.New("bench: server unavailable")

// Env is what starting a server needs from the runner.
type Env struct {
	// Dir is a fresh directory for this server's files and logs.
	Dir string
	// DeviceBytes is the size of the export to create.
	DeviceBytes int64
	// LupoolBin is the path of the lupool binary.
	LupoolBin string
	// EngineBin is a binary that handles EngineCommand (nbdbench itself).
	EngineBin string
	// BaselineLupoolBin and BaselineEngineBin stand in for LupoolBin and
	// EngineBin in the base-* servers; empty: unavailable.
	BaselineLupoolBin string
	BaselineEngineBin string
	// Logger receives progress; never nil.
	Logger *slog.Logger
}

// ServerSpec is one server configuration the suite can start.
type ServerSpec struct {
	// Name is unique, e.g. "nbdkit-memory"; used on the command line.
	Name string
	// Class is ClassMemory or ClassFile.
	Class string
	// Subject is true for lupool configurations: ratios are subject/peer.
	Subject bool
	// Notes says how the server is configured and why, for the report.
	Notes string
	start func(ctx context.Context, env Env) (*Running, error)
}

// Running is a started server. Stop it exactly once.
type Running struct {
	// URI is the NBD export to point fio at.
	URI string
	// Commands are the command lines that started it, for the report.
	Commands []string
	procs    []*proc
}

// Stop stops every process this server started (SIGTERM, then SIGKILL
// after a grace period) and waits for them.
func (r *Running) Stop() error {
	var errs []error
	for i := len(r.procs) - 1; i >= 0; i-- {
		errs = append(errs, r.procs[i].stop())
	}
	return errors.Join(errs...)
}

// Exited returns "" while every process of the server runs, else which one
// exited, how, and the end of its log.
func (r *Running) Exited() string {
	for _, p := range r.procs {
		if p.exited() {
			return fmt.Sprintf("%s exited (%v): %s", filepath.Base(p.cmd.Path), p.waitErr, p.logTail())
		}
	}
	return ""
}

// Start starts the server in env.Dir and returns once its export accepts
// connections. On failure nothing it started is left running.
func (s ServerSpec) Start(ctx context.Context, env Env) (*Running, error) {
	r, err := s.start(ctx, env)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", s.Name, err)
	}
	return r, nil
}

// Servers returns every server configuration the suite knows, subjects
// first.
func Servers() []ServerSpec {
	return []ServerSpec{
		{Name: "lupool-mem", Class: ClassMemory, Subject: true,
			Notes: "lupool serve, one memory LU (--kind memory)",
			start: func(ctx context.Context, env Env) (*Running, error) { return startLupool(ctx, env, "memory") }},
		{Name: "lupool-file", Class: ClassFile, Subject: true,
			Notes: "lupool serve, one thin file LU (--kind file) in a temp data dir",
			start: func(ctx context.Context, env Env) (*Running, error) { return startLupool(ctx, env, "file") }},
		{Name: "lupool-2copies", Class: ClassFile, Subject: true,
			Notes: "two lupool nodes on loopback (the second joins the first), one file LU with --copies 2; fio talks to the first",
			start: startLupoolCopies},
		{Name: "attach-mem", Class: ClassMemory, Subject: true,
			Notes: "lupool-mem reached through `lupool attach bench --listen 127.0.0.1:P` (the client-side endpoint that rides over node loss); compare with lupool-mem",
			start: func(ctx context.Context, env Env) (*Running, error) { return startLupoolAttach(ctx, env, "memory") }},
		{Name: "attach-file", Class: ClassFile, Subject: true,
			Notes: "lupool-file reached through `lupool attach bench --listen 127.0.0.1:P`; compare with lupool-file",
			start: func(ctx context.Context, env Env) (*Running, error) { return startLupoolAttach(ctx, env, "file") }},
		{Name: "engine-mem", Class: ClassMemory, Subject: true,
			Notes: "lupool's NBD engine (server/nbd) over an lu memory volume, without the daemon (nbdbench-engine)",
			start: startEngine("memory")},
		{Name: "engine-file", Class: ClassFile, Subject: true,
			Notes: "lupool's NBD engine (server/nbd) over an lu thin file volume, without the daemon (nbdbench-engine)",
			start: startEngine("file")},
		{Name: "base-lupool-mem", Class: ClassMemory,
			Notes: "lupool-mem from the baseline build (--baseline-lupool)",
			start: baseline(func(ctx context.Context, env Env) (*Running, error) { return startLupool(ctx, env, "memory") })},
		{Name: "base-lupool-file", Class: ClassFile,
			Notes: "lupool-file from the baseline build (--baseline-lupool)",
			start: baseline(func(ctx context.Context, env Env) (*Running, error) { return startLupool(ctx, env, "file") })},
		{Name: "base-engine-mem", Class: ClassMemory,
			Notes: "engine-mem from the baseline build (--baseline-engine)",
			start: baseline(startEngine("memory"))},
		{Name: "base-engine-file", Class: ClassFile,
			Notes: "engine-file from the baseline build (--baseline-engine)",
			start: baseline(startEngine("file"))},
		{Name: "nbdkit-memory", Class: ClassMemory,
			Notes: "nbdkit memory plugin (sparse RAM array), default 16 threads",
			start: startNbdkitMemory},
		{Name: "nbdkit-file", Class: ClassFile,
			Notes: "nbdkit file plugin on a sparse file, default cache (page cache; FLUSH = fdatasync)",
			start: startNbdkitFile},
		{Name: "qemu-nbd", Class: ClassFile,
			Notes: "qemu-nbd -f raw --cache=writeback --aio=threads --discard=unmap -e 16 on a sparse file " +
				"(writeback = page cache, FLUSH = fdatasync: the same durability class as nbdkit file and lupool file)",
			start: startQemuNbd},
	}
}

// baseline runs start with the baseline build's binaries in place of the
// current ones, so that a change can be measured against the build before
// it in the same run.
func baseline(start func(ctx context.Context, env Env) (*Running, error)) func(ctx context.Context, env Env) (*Running, error) {
	return func(ctx context.Context, env Env) (*Running, error) {
		env.LupoolBin, env.EngineBin = env.BaselineLupoolBin, env.BaselineEngineBin
		if env.LupoolBin == "" && env.EngineBin == "" {
			return nil, fmt.Errorf("%w: no baseline binaries (--baseline-lupool, --baseline-engine)", ErrServerUnavailable)
		}
		if env.LupoolBin == "" {
			env.LupoolBin = "/nonexistent/baseline-lupool"
		}
		return start(ctx, env)
	}
}

// SelectServers returns the named configurations in the order named.
func SelectServers(names []string) ([]ServerSpec, error) {
	all := Servers()
	var out []ServerSpec
	for _, n := range names {
		found := false
		for _, s := range all {
			if s.Name == n {
				out = append(out, s)
				found = true
			}
		}
		if !found {
			known := make([]string, len(all))
			for i, s := range all {
				known[i] = s.Name
			}
			return nil, fmt.Errorf("bench: unknown server %q (known: %s)", n, strings.Join(known, ", "))
		}
	}
	return out, nil
}

func startNbdkitMemory(ctx context.Context, env Env) (*Running, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	p, err := launch(ctx, env, "nbdkit", "nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1",
		"-p", fmt.Sprint(port), "memory", fmt.Sprint(env.DeviceBytes))
	if err != nil {
		return nil, err
	}
	return waitNBD(ctx, p, port, "")
}

func startNbdkitFile(ctx context.Context, env Env) (*Running, error) {
	file, err := sparseFile(env)
	if err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	p, err := launch(ctx, env, "nbdkit", "nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1",
		"-p", fmt.Sprint(port), "file", file)
	if err != nil {
		return nil, err
	}
	return waitNBD(ctx, p, port, "")
}

func startQemuNbd(ctx context.Context, env Env) (*Running, error) {
	file, err := sparseFile(env)
	if err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	p, err := launch(ctx, env, "qemu-nbd", "qemu-nbd", "-f", "raw", "-x", "bench", "-p", fmt.Sprint(port),
		"-b", "127.0.0.1", "--persistent", "--cache=writeback", "--aio=threads", "--discard=unmap",
		"-e", "16", file)
	if err != nil {
		return nil, err
	}
	return waitNBD(ctx, p, port, "bench")
}

// lupoolNode is one started lupool daemon.
type lupoolNode struct {
	proc    *proc
	api     string // HOST:PORT of its HTTP API
	nbdPort int
}

// lupoolTokenFile is the admin token of the bench pool: the first node's.
func lupoolTokenFile(env Env) string { return filepath.Join(env.Dir, "bench1", "admin.token") }

// lupoolJoinToken asks the node at api for a join token.
func lupoolJoinToken(ctx context.Context, env Env, api string) (string, error) {
	cmd := exec.CommandContext(ctx, env.LupoolBin, "cluster", "join-token")
	cmd.Env = append(os.Environ(), "LUPOOL_API="+api, "LUPOOL_TOKEN_FILE="+lupoolTokenFile(env))
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("%w: lupool cluster join-token: %w", ErrServerUnavailable, err)
	}
	return strings.TrimSpace(string(out)), nil
}

// startLupoolNode starts a lupool daemon with its data in env.Dir/id,
// joining the cluster at join (an API address) unless join is empty, and
// waits for /readyz.
func startLupoolNode(ctx context.Context, env Env, id, join string) (*lupoolNode, error) {
	if _, err := os.Stat(env.LupoolBin); err != nil {
		return nil, fmt.Errorf("%w: no lupool binary at %s (run make build): %w", ErrServerUnavailable, env.LupoolBin, err)
	}
	ports, err := freePorts(3)
	if err != nil {
		return nil, err
	}
	n := &lupoolNode{api: fmt.Sprintf("127.0.0.1:%d", ports[1]), nbdPort: ports[0]}
	args := []string{"serve", "--data", filepath.Join(env.Dir, id),
		"--nbd", fmt.Sprintf("127.0.0.1:%d", n.nbdPort), "--api", n.api,
		"--peer", fmt.Sprintf("127.0.0.1:%d", ports[2]), "--node-id", id}
	if join != "" {
		token, err := lupoolJoinToken(ctx, env, join)
		if err != nil {
			return nil, err
		}
		args = append(args, "--join", join, "--join-token", token)
	}
	n.proc, err = launch(ctx, env, id, env.LupoolBin, args...)
	if err != nil {
		return nil, err
	}
	if err := waitHTTP(ctx, n.proc, "http://"+n.api+"/readyz"); err != nil {
		return nil, errors.Join(fmt.Errorf("%w: %w", ErrServerUnavailable, err), n.proc.stop())
	}
	return n, nil
}

// lupoolCreate runs `lupool lu create bench` against api, retrying while
// the cluster settles (a joining node) until retryFor has passed.
func lupoolCreate(ctx context.Context, env Env, api string, retryFor time.Duration, flags ...string) (string, error) {
	args := append([]string{"lu", "create", "bench", "--size", sizeArg(env.DeviceBytes)}, flags...)
	line := "LUPOOL_API=" + api + " LUPOOL_TOKEN_FILE=" + lupoolTokenFile(env) + " " + env.LupoolBin + " " + strings.Join(args, " ")
	deadline := time.Now().Add(retryFor)
	for {
		create := exec.CommandContext(ctx, env.LupoolBin, args...)
		create.Env = append(os.Environ(), "LUPOOL_API="+api, "LUPOOL_TOKEN_FILE="+lupoolTokenFile(env))
		out, err := create.CombinedOutput()
		if err == nil {
			return line, nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return line, fmt.Errorf("%w: %s: %w: %s", ErrServerUnavailable, line, err, tail(out))
		}
		env.Logger.Debug("lu create failed; retrying", "err", err, "out", tail(out))
		select {
		case <-ctx.Done():
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// startLupool starts one lupool node and creates one LU of the given kind.
func startLupool(ctx context.Context, env Env, kind string) (*Running, error) {
	n, err := startLupoolNode(ctx, env, "bench1", "")
	if err != nil {
		return nil, err
	}
	r := &Running{Commands: []string{n.proc.commandLine()}, procs: []*proc{n.proc}}
	line, err := lupoolCreate(ctx, env, n.api, 0, "--kind", kind)
	r.Commands = append(r.Commands, line)
	if err != nil {
		return nil, errors.Join(err, r.Stop())
	}
	if err := waitTCP(ctx, n.proc, n.nbdPort); err != nil {
		return nil, errors.Join(err, r.Stop())
	}
	r.URI = fmt.Sprintf("nbd://127.0.0.1:%d/bench", n.nbdPort)
	return r, nil
}

// startLupoolAttach starts one lupool node with one LU of the given kind
// and `lupool attach` in front of it; fio talks to the endpoint.
func startLupoolAttach(ctx context.Context, env Env, kind string) (*Running, error) {
	r, err := startLupool(ctx, env, kind)
	if err != nil {
		return nil, err
	}
	node := r.procs[0]
	api := ""
	for i, a := range node.cmd.Args {
		if a == "--api" && i+1 < len(node.cmd.Args) {
			api = node.cmd.Args[i+1]
		}
	}
	port, err := freePort()
	if err != nil {
		return nil, errors.Join(err, r.Stop())
	}
	listen := fmt.Sprintf("127.0.0.1:%d", port)
	p, err := launch(ctx, env, "attach", env.LupoolBin, "attach", "bench", "--listen", listen,
		"--api", api, "--token-file", lupoolTokenFile(env))
	if err != nil {
		return nil, errors.Join(err, r.Stop())
	}
	r.procs = append(r.procs, p)
	r.Commands = append(r.Commands, p.commandLine())
	if err := waitTCP(ctx, p, port); err != nil {
		return nil, errors.Join(err, r.Stop())
	}
	r.URI = fmt.Sprintf("nbd://%s/bench", listen)
	return r, nil
}

// copiesSettle bounds how long a two-node pool may take before it accepts
// an LU with two copies.
const copiesSettle = 10 * time.Second

// startLupoolCopies starts two lupool nodes on loopback, the second joining
// the first, and creates a file LU with two copies; fio talks to the first.
func startLupoolCopies(ctx context.Context, env Env) (*Running, error) {
	first, err := startLupoolNode(ctx, env, "bench1", "")
	if err != nil {
		return nil, err
	}
	r := &Running{Commands: []string{first.proc.commandLine()}, procs: []*proc{first.proc}}
	second, err := startLupoolNode(ctx, env, "bench2", first.api)
	if err != nil {
		return nil, errors.Join(err, r.Stop())
	}
	r.Commands = append(r.Commands, second.proc.commandLine())
	r.procs = append(r.procs, second.proc)
	line, err := lupoolCreate(ctx, env, first.api, copiesSettle, "--kind", "file", "--copies", "2")
	r.Commands = append(r.Commands, line)
	if err != nil {
		return nil, errors.Join(err, r.Stop())
	}
	if err := waitTCP(ctx, first.proc, first.nbdPort); err != nil {
		return nil, errors.Join(err, r.Stop())
	}
	r.URI = fmt.Sprintf("nbd://127.0.0.1:%d/bench", first.nbdPort)
	return r, nil
}

// sizeArg renders a byte count for lupool's --size flag (binary units).
func sizeArg(n int64) string {
	const mib, gib = 1 << 20, 1 << 30
	switch {
	case n%gib == 0:
		return fmt.Sprintf("%dG", n/gib)
	case n%mib == 0:
		return fmt.Sprintf("%dM", n/mib)
	default:
		return fmt.Sprint(n)
	}
}

func sparseFile(env Env) (string, error) {
	path := filepath.Join(env.Dir, "disk.raw")
	f, err := os.Create(path)
	if err != nil {
		return "", err
	}
	if err := f.Truncate(env.DeviceBytes); err != nil {
		return "", errors.Join(err, f.Close())
	}
	return path, f.Close()
}

func freePort() (int, error) {
	ports, err := freePorts(1)
	if err != nil {
		return 0, err
	}
	return ports[0], nil
}

// freePorts returns n distinct loopback ports that were free a moment ago,
// taken from below the kernel's ephemeral range so that no outgoing
// connection takes one before the server binds it. They are released before
// use, so another program could take one in between; the readiness check
// then fails loudly rather than measuring the wrong server.
func freePorts(n int) ([]int, error) {
	picker := freeport.New()
	ports := make([]int, 0, n)
	for range n {
		port, err := picker.Port()
		if err != nil {
			return nil, fmt.Errorf("bench: %w", err)
		}
		ports = append(ports, port)
	}
	return ports, nil
}

// proc is one child process with its output in a log file.
type proc struct {
	cmd     *exec.Cmd
	logPath string
	done    chan struct{} // closed when the process has exited
	waitErr error         // set before done is closed
}

// launch starts program (looked up in PATH unless it contains a slash) with
// its stdout and stderr going to a log file in env.Dir.
func launch(ctx context.Context, env Env, tool, program string, args ...string) (*proc, error) {
	path, err := exec.LookPath(program)
	if err != nil {
		return nil, fmt.Errorf("%w: %s not installed (./scripts/install-test-deps.sh): %w", ErrServerUnavailable, tool, err)
	}
	logPath := filepath.Join(env.Dir, tool+".log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(path, args...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = childAttr()
	if err := cmd.Start(); err != nil {
		return nil, errors.Join(err, logFile.Close())
	}
	p := &proc{cmd: cmd, logPath: logPath, done: make(chan struct{})}
	go func() {
		p.waitErr = cmd.Wait()
		logFile.Close()
		close(p.done)
	}()
	env.Logger.Debug("started", "pid", cmd.Process.Pid, "cmd", p.commandLine())
	return p, nil
}

func (p *proc) commandLine() string { return strings.Join(p.cmd.Args, " ") }

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM, waits up to stopGrace, then SIGKILL. It signals only
// this process, by its PID.
func (p *proc) stop() error {
	if p.exited() {
		return nil
	}
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil && !p.exited() {
		return fmt.Errorf("bench: SIGTERM pid %d: %w", p.cmd.Process.Pid, err)
	}
	select {
	case <-p.done:
		return nil
	case <-time.After(stopGrace):
	}
	if err := p.cmd.Process.Kill(); err != nil && !p.exited() {
		return fmt.Errorf("bench: SIGKILL pid %d: %w", p.cmd.Process.Pid, err)
	}
	<-p.done
	return nil
}

// logTail returns the end of the process's log, for error messages.
func (p *proc) logTail() string {
	data, err := os.ReadFile(p.logPath)
	if err != nil {
		return ""
	}
	return tail(data)
}

func tail(data []byte) string {
	data = bytes.TrimSpace(data)
	if len(data) > logTailMaxByte {
		data = data[len(data)-logTailMaxByte:]
	}
	return string(data)
}

// waitNBD waits for the NBD port and returns the running server.
func waitNBD(ctx context.Context, p *proc, port int, export string) (*Running, error) {
	r := &Running{Commands: []string{p.commandLine()}, procs: []*proc{p},
		URI: fmt.Sprintf("nbd://127.0.0.1:%d/%s", port, export)}
	if err := waitTCP(ctx, p, port); err != nil {
		return nil, errors.Join(err, r.Stop())
	}
	return r, nil
}

// waitUntil polls ready until it reports true, the process exits, the
// context ends or readyTimeout passes.
func waitUntil(ctx context.Context, p *proc, what string, ready func() bool) error {
	deadline := time.Now().Add(readyTimeout)
	for {
		if ready() {
			return nil
		}
		if p.exited() {
			return fmt.Errorf("bench: %s exited before %s (%v): %s", p.commandLine(), what, p.waitErr, p.logTail())
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("bench: %s not %s after %v: %s", p.commandLine(), what, readyTimeout, p.logTail())
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(readyPoll):
		}
	}
}

func waitTCP(ctx context.Context, p *proc, port int) error {
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	return waitUntil(ctx, p, "listening on "+addr, func() bool {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			return false
		}
		c.Close()
		return true
	})
}

func waitHTTP(ctx context.Context, p *proc, url string) error {
	client := &http.Client{Timeout: time.Second}
	return waitUntil(ctx, p, "ready at "+url, func() bool {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return false
		}
		resp, err := client.Do(req)
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
}
