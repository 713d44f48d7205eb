package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/lupool/lupool/internal/freeport"
	"github.com/lupool/lupool/internal/realclient"
	"github.com/lupool/lupool/replication"
	"github.com/lupool/lupool/replication/replproto"
)

// lupoolBin is the binary under test, built once by TestMain.
var lupoolBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "lupool-e2e-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	lupoolBin = filepath.Join(dir, "lupool")
	// -buildvcs=auto: the binary names its commit when built from a git
	// checkout (TestCLIVersion), whatever GOFLAGS says.
	args := []string{"build", "-buildvcs=auto", "-o", lupoolBin}
	if raceEnabled {
		args = append(args, "-race")
	}
	cmd := exec.Command("go", append(args, ".")...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building lupool:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// ports hands out the loopback addresses of every daemon in this test
// binary: never the same one twice, and never one that a daemon's own
// outgoing connections could be given by the kernel.
var ports = freeport.New()

func freePort(t *testing.T) string {
	t.Helper()
	a, err := ports.Addr()
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// alongside marks an end-to-end test that measures no time, holds no
// fixed port and changes nothing outside its own daemons: it runs next to
// other such tests (t.Parallel), after the package's timing-sensitive
// tests have run one at a time (Go starts parallel tests only once the
// sequential ones are done). LUPOOL_E2E_SERIAL=1 runs every test alone.
func alongside(t *testing.T) {
	t.Helper()
	if os.Getenv("LUPOOL_E2E_SERIAL") == "" {
		t.Parallel()
	}
}

// needTools ends the test unless every tool is installed: a skip, a
// failure in CI (realclient.Require).
func needTools(t *testing.T, tools ...string) {
	t.Helper()
	realclient.Require(t, tools...)
}

// syncBuffer is a bytes.Buffer safe for a child process to write while
// the test reads it.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// daemon is one running `lupool serve` process.
type daemon struct {
	t     *testing.T
	data  string
	nbd   string
	api   string
	peer  string
	id    string
	extra []string
	// netns, when set, is the network namespace the daemon runs in (a
	// netLab host); its addresses are on the lab's bridge.
	netns string
	// via is the member a joining node joins through (nil: d bootstraps
	// its own cluster); its admin token is d's too.
	via     *daemon
	cmd     *exec.Cmd
	log     syncBuffer
	exited  chan struct{}
	exitErr error
}

func newDaemon(t *testing.T, id string, extra ...string) *daemon {
	t.Helper()
	return &daemon{t: t, data: t.TempDir(), nbd: freePort(t), api: freePort(t), peer: freePort(t), id: id, extra: extra}
}

// newJoiner is a daemon that joins via's cluster on its first start, with
// a join token it asks via for.
func newJoiner(t *testing.T, id string, via *daemon, extra ...string) *daemon {
	t.Helper()
	d := newDaemon(t, id, extra...)
	d.via = via
	return d
}

func (d *daemon) logs() string { return d.log.String() }

// tokenFile is the admin token of d's cluster: the first node's
// DATA/admin.token.
func (d *daemon) tokenFile() string {
	if d.via != nil {
		return d.via.tokenFile()
	}
	return filepath.Join(d.data, "admin.token")
}

func (d *daemon) token() string {
	d.t.Helper()
	b, err := os.ReadFile(d.tokenFile())
	if err != nil {
		d.t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// request sends an API request to d with the admin token.
func (d *daemon) request(method, path, body string) *http.Response {
	d.t.Helper()
	req, err := http.NewRequest(method, d.baseURL()+path, strings.NewReader(body))
	if err != nil {
		d.t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+d.token())
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := d.httpClient().Do(req)
	if err != nil {
		d.t.Fatal(err)
	}
	return resp
}

// caFile is the cluster CA's certificate (the first node's).
func (d *daemon) caFile() string {
	if d.via != nil {
		return d.via.caFile()
	}
	return filepath.Join(d.data, "pki", "ca.crt")
}

// baseURL is where d's API answers: plain HTTP on loopback, HTTPS beyond
// (a netLab host).
func (d *daemon) baseURL() string {
	if d.netns != "" {
		return "https://" + d.api
	}
	return "http://" + d.api
}

// httpClient trusts the cluster CA for a daemon beyond loopback.
func (d *daemon) httpClient() *http.Client {
	if d.netns == "" {
		return http.DefaultClient
	}
	pool := x509.NewCertPool()
	if pem, err := os.ReadFile(d.caFile()); err == nil {
		pool.AppendCertsFromPEM(pem)
	}
	return &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
}

// joinToken asks d for a new join token.
func (d *daemon) joinToken() string {
	d.t.Helper()
	return strings.TrimSpace(d.mustCLI("cluster", "join-token"))
}

// start runs the daemon and waits until /readyz answers 200.
func (d *daemon) start() {
	d.t.Helper()
	args := append([]string{"serve", "--data", d.data, "--nbd", d.nbd, "--api", d.api, "--peer", d.peer, "--node-id", d.id}, d.extra...)
	if _, err := os.Stat(filepath.Join(d.data, "cluster-id")); d.via != nil && err != nil {
		args = append(args, "--join", d.via.api, "--join-token", d.via.joinToken())
	}
	d.cmd = exec.Command(lupoolBin, args...)
	if d.netns != "" {
		// ip netns exec execs the binary: the process is lupool itself.
		d.cmd = exec.Command("ip", append([]string{"netns", "exec", d.netns, lupoolBin}, args...)...)
	}
	d.cmd.Stdout, d.cmd.Stderr = &d.log, &d.log
	if err := d.cmd.Start(); err != nil {
		d.t.Fatal(err)
	}
	d.exited = make(chan struct{})
	go func() {
		d.exitErr = d.cmd.Wait()
		close(d.exited)
	}()
	d.t.Cleanup(func() {
		if d.cmd.ProcessState == nil {
			_ = d.cmd.Process.Kill()
			<-d.exited
		}
		if d.t.Failed() {
			d.t.Logf("daemon %s log:\n%s", d.id, d.logs())
		}
	})
	deadline := time.Now().Add(60 * time.Second)
	for {
		resp, err := d.httpClient().Get(d.baseURL() + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		select {
		case <-d.exited:
			d.t.Fatalf("daemon %s exited during start (%v):\n%s", d.id, d.exitErr, d.logs())
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			d.t.Fatalf("daemon %s not ready after 60s:\n%s", d.id, d.logs())
		}
	}
}

// stop sends sig and waits for the process to exit.
func (d *daemon) stop(sig syscall.Signal) {
	d.t.Helper()
	if err := d.cmd.Process.Signal(sig); err != nil {
		d.t.Fatal(err)
	}
	select {
	case <-d.exited:
	case <-time.After(60 * time.Second):
		d.t.Fatalf("daemon %s did not stop on %v:\n%s", d.id, sig, d.logs())
	}
	if sig == syscall.SIGTERM && d.exitErr != nil {
		d.t.Fatalf("daemon %s exited with %v after SIGTERM:\n%s", d.id, d.exitErr, d.logs())
	}
}

// cli runs a lupool client command against this daemon's API and returns
// stdout, stderr and the exit code.
func (d *daemon) cli(args ...string) (string, string, int) {
	d.t.Helper()
	cmd := exec.Command(lupoolBin, args...)
	cmd.Env = append(os.Environ(), "LUPOOL_API="+d.api, "LUPOOL_TOKEN_FILE="+d.tokenFile())
	if d.netns != "" {
		cmd.Env = append(cmd.Env, "LUPOOL_CA_FILE="+d.caFile())
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		d.t.Fatal(err)
	}
	return stdout.String(), stderr.String(), code
}

// mustCLI runs a client command that must succeed.
func (d *daemon) mustCLI(args ...string) string {
	d.t.Helper()
	out, errOut, code := d.cli(args...)
	if code != 0 {
		d.t.Fatalf("lupool %s: exit %d: %s%s", strings.Join(args, " "), code, out, errOut)
	}
	return out
}

type luJSON struct {
	Name           string `json:"name"`
	SizeBytes      int64  `json:"size_bytes"`
	AllocatedBytes int64  `json:"allocated_bytes"`
	Copies         int    `json:"copies"`
	Kind           string `json:"kind"`
	Writer         string `json:"writer"`
}

func (d *daemon) listLUs() []luJSON {
	d.t.Helper()
	var lus []luJSON
	if err := json.Unmarshal([]byte(d.mustCLI("lu", "list", "-o", "json")), &lus); err != nil {
		d.t.Fatal(err)
	}
	return lus
}

func (d *daemon) uri(name string) string { return "nbd://" + d.nbd + "/" + name }

// metrics returns the /metrics text.
func (d *daemon) metrics() string {
	d.t.Helper()
	resp, err := d.httpClient().Get(d.baseURL() + "/metrics")
	if err != nil {
		d.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		d.t.Fatal(err)
	}
	return string(b)
}

// metricValue finds the sample line that starts with name{ and contains
// every label in labels; it returns -1 when there is none.
func metricValue(text, name string, labels ...string) float64 {
	for _, line := range strings.Split(text, "\n") {
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		ok := true
		for _, l := range labels {
			if !strings.Contains(line, l) {
				ok = false
			}
		}
		if !ok {
			continue
		}
		var v float64
		if _, err := fmt.Sscan(line[strings.LastIndexByte(line, ' ')+1:], &v); err == nil {
			return v
		}
	}
	return -1
}

func runTool(t *testing.T, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func randomFile(t *testing.T, size int) (string, string) {
	t.Helper()
	buf := make([]byte, size)
	if _, err := rand.Read(buf); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "image.raw")
	if err := os.WriteFile(path, buf, 0o644); err != nil {
		t.Fatal(err)
	}
	return path, sha(buf)
}

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func fileSHA(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha(b)
}

// certDir is where d keeps its node certificate.
func (d *daemon) certDir() string { return filepath.Join(d.data, "pki") }

// peerTLS is a client TLS config for d's peer port: with the node
// certificate in certDir ("" for none), trusting any server.
func peerTLS(t *testing.T, certDir string) *tls.Config {
	t.Helper()
	conf := &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS12} // the test checks the client side
	if certDir != "" {
		cert, err := tls.LoadX509KeyPair(filepath.Join(certDir, "node.crt"), filepath.Join(certDir, "node.key"))
		if err != nil {
			t.Fatal(err)
		}
		conf.Certificates = []tls.Certificate{cert}
	}
	return conf
}

// rawStream is a replication stream a test opened by hand.
type rawStream struct {
	conn   net.Conn
	br     *bufio.Reader
	status replproto.Status // the hello's answer
	epoch  uint64           // the epoch in the hello's answer
}

// openStream dials to's peer port over TLS with the certificate in
// certDir, upgrades to a replication stream and sends hello at epoch. An
// error means the TLS handshake or the upgrade failed.
func openStream(t *testing.T, to *daemon, certDir string, hello replproto.Hello, epoch uint64) (*rawStream, error) {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second}
	conn, err := tls.DialWithDialer(&d, "tcp", to.peer, peerTLS(t, certDir))
	if err != nil {
		return nil, err
	}
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	fail := func(err error) (*rawStream, error) {
		conn.Close()
		return nil, err
	}
	fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: %s\r\n\r\n", replication.StreamPath, replication.StreamUpgrade)
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return fail(fmt.Errorf("upgrade: %w", err))
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
		return fail(fmt.Errorf("upgrade answered %s: %s", resp.Status, body))
	}
	payload := replproto.AppendHello(nil, hello)
	if _, err := conn.Write(replproto.AppendFrame(nil, replproto.Header{Type: replproto.TypeHello, Epoch: epoch}, payload)); err != nil {
		return fail(err)
	}
	var hb [replproto.HeaderBytes]byte
	h, err := replproto.ReadHeader(br, &hb)
	if err != nil {
		return fail(fmt.Errorf("hello reply: %w", err))
	}
	_, _ = io.CopyN(io.Discard, br, int64(h.PayloadLen))
	return &rawStream{conn: conn, br: br, status: h.Status, epoch: h.Epoch}, nil
}
