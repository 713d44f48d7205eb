package main

import (
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// attachProc is one running `lupool attach LU --listen ADDR`.
type attachProc struct {
	t      *testing.T
	lu     string
	listen string
	cmd    *exec.Cmd
	log    syncBuffer
	exited chan struct{}
}

// startAttach runs lupool attach against d's API and waits until it serves.
func startAttach(t *testing.T, d *daemon, lu, listen string, extra ...string) *attachProc {
	t.Helper()
	a := &attachProc{t: t, lu: lu, listen: listen, exited: make(chan struct{})}
	args := append([]string{"attach", lu, "--listen", listen, "--api", d.api, "--token-file", d.tokenFile()}, extra...)
	a.cmd = exec.Command(lupoolBin, args...)
	a.cmd.Stdout, a.cmd.Stderr = &a.log, &a.log
	if err := a.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = a.cmd.Wait(); close(a.exited) }()
	t.Cleanup(func() {
		_ = a.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-a.exited:
		case <-time.After(30 * time.Second):
			_ = a.cmd.Process.Kill()
			<-a.exited
		}
		if t.Failed() {
			t.Logf("attach log:\n%s", a.log.String())
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(a.log.String(), "serving "+lu) {
		select {
		case <-a.exited:
			t.Fatalf("lupool attach exited: %s", a.log.String())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("lupool attach not serving after 30s: %s", a.log.String())
		}
	}
	return a
}

// uri is the NBD URI of the endpoint.
func (a *attachProc) uri() string {
	if path, ok := strings.CutPrefix(a.listen, "unix:"); ok {
		return "nbd+unix:///" + a.lu + "?socket=" + path
	}
	return "nbd://" + a.listen + "/" + a.lu
}

// reconnects counts the endpoint's reconnects in its log, and the nodes it
// reconnected to.
func (a *attachProc) reconnects() (n int, nodes []string) {
	for _, line := range strings.Split(a.log.String(), "\n") {
		if strings.Contains(line, `msg="endpoint: reconnected"`) {
			n++
			for _, f := range strings.Fields(line) {
				if v, ok := strings.CutPrefix(f, "node="); ok {
					nodes = append(nodes, v)
				}
			}
		}
	}
	return n, nodes
}

// replayed sums the requests the endpoint re-sent, from its log.
func (a *attachProc) replayed() int {
	n := 0
	for _, line := range strings.Split(a.log.String(), "\n") {
		if !strings.Contains(line, `msg="endpoint: reconnected"`) {
			continue
		}
		for _, f := range strings.Fields(line) {
			if v, ok := strings.CutPrefix(f, "replayed="); ok {
				k, _ := strconv.Atoi(v)
				n += k
			}
		}
	}
	return n
}

// waitReconnects waits until the endpoint has reconnected n times.
func (a *attachProc) waitReconnects(n int) {
	a.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		got, _ := a.reconnects()
		if got == n {
			return
		}
		if got > n || time.Now().After(deadline) {
			a.t.Fatalf("%d reconnects, want %d", got, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// restart stops d with sig and starts it again.
func (d *daemon) restart(sig syscall.Signal) {
	d.t.Helper()
	d.stop(sig)
	d.start()
}

// fioVerifyJob writes random 4 KiB blocks at queue depth 32 with crc32c
// checksums and verifies them after each pass over 16 MiB, for runtime.
func fioVerifyJob(uri string, runtime time.Duration) []string {
	return fioVerifyJobSize(uri, runtime, "16M")
}

// fioVerifyJobSize is fioVerifyJob over size bytes: fio verifies a loop's
// blocks once it has written them all, so a short run must write a small
// region to verify anything on a slow (loaded, -race) machine.
func fioVerifyJobSize(uri string, runtime time.Duration, size string) []string {
	return []string{"--name=attach", "--uri=" + uri, "--rw=randwrite", "--bs=4k", "--iodepth=32",
		"--size=" + size, "--loops=100000", fmt.Sprintf("--runtime=%ds", int(runtime.Seconds())),
		"--verify=crc32c", "--verify_fatal=1"}
}

// checkFio fails t unless fio exited 0 with no error and verified data.
func checkFio(t *testing.T, out string, err error) {
	t.Helper()
	if err != nil || !strings.Contains(out, "err= 0") {
		t.Fatalf("fio through lupool attach failed: %v\n%s", err, out)
	}
	if !strings.Contains(out, "READ:") {
		t.Fatalf("fio verified nothing (no READ line):\n%s", out)
	}
}

// TestAttachFioAcrossRestarts: fio at queue depth 32 with crc32c
// verification through lupool attach while the node is stopped with
// SIGTERM and started again three times, then killed with SIGKILL and
// started again: fio sees no error and every block verifies.
func TestAttachFioAcrossRestarts(t *testing.T) {
	needTools(t, "fio")
	n1 := newDaemon(t, "n1")
	n1.start()
	n1.mustCLI("lu", "create", "v", "--size", "64M")
	a := startAttach(t, n1, "v", freePort(t))
	wait := startFio(t, fioVerifyJob(a.uri(), 25*time.Second)...)
	for i, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGTERM, syscall.SIGTERM, syscall.SIGKILL} {
		a.waitReconnects(i)
		time.Sleep(time.Second)
		n1.restart(sig)
	}
	out, err := wait()
	checkFio(t, out, err)
	a.waitReconnects(4) // one per restart
	if n := a.replayed(); n == 0 {
		t.Error("no request was replayed across four restarts at queue depth 32: the replay path was not exercised")
	}
}

// TestAttachMovesOnNodeLoss: a 2-copy LU attached through its non-writer
// copy's node; that node is killed with SIGKILL under fio: the endpoint
// moves to the writer, fio sees no error and every block verifies.
func TestAttachMovesOnNodeLoss(t *testing.T) {
	needTools(t, "fio")
	n1, n2, n3 := cluster3(t)
	n1.mustCLI("lu", "create", "m", "--size", "64M", "--copies", "2")
	lu := n1.showLU("m")
	var copyNode *daemon
	for _, r := range lu.Replicas {
		for _, d := range []*daemon{n2, n3} {
			if r.Node == d.id && r.Node != lu.Writer {
				copyNode = d
			}
		}
	}
	if lu.Writer != "n1" || copyNode == nil {
		t.Fatalf("LU m: writer %q, copies %+v; want writer n1 and a copy on n2 or n3", lu.Writer, lu.Replicas)
	}
	n1.waitState("m", copyNode.id, "in-sync", 30*time.Second)
	a := startAttach(t, n1, "m", freePort(t), "--prefer", copyNode.id)
	if !strings.Contains(a.log.String(), "node="+copyNode.id) {
		t.Fatalf("attach did not start on the preferred node %s", copyNode.id)
	}
	wait := startFio(t, fioVerifyJob(a.uri(), 10*time.Second)...)
	time.Sleep(2 * time.Second)
	copyNode.stop(syscall.SIGKILL)
	out, err := wait()
	checkFio(t, out, err)
	a.waitReconnects(1)
	if _, nodes := a.reconnects(); nodes[0] != "n1" {
		t.Errorf("reconnected to %v, want the writer n1", nodes)
	}
}

// TestAttachQemuIOAcrossRestart: QEMU's own NBD client through the
// endpoint's unix socket: data written before a restart reads back, and
// requests made while the node is down wait for it instead of failing.
func TestAttachQemuIOAcrossRestart(t *testing.T) {
	needTools(t, "qemu-io")
	n1 := newDaemon(t, "n1")
	n1.start()
	n1.mustCLI("lu", "create", "q", "--size", "16M")
	sock := filepath.Join(t.TempDir(), "q.sock")
	metricsAddr := freePort(t)
	a := startAttach(t, n1, "q", "unix:"+sock, "--metrics", metricsAddr)
	qemuIO := func(cmds ...string) *exec.Cmd {
		args := []string{"-f", "raw"}
		for _, c := range cmds {
			args = append(args, "-c", c)
		}
		return exec.Command("qemu-io", append(args, a.uri())...)
	}
	if out, err := qemuIO("write -P 0xab 0 1M").CombinedOutput(); err != nil || strings.Contains(string(out), "failed") {
		t.Fatalf("qemu-io write: %v\n%s", err, out)
	}
	n1.stop(syscall.SIGTERM)
	cmd := qemuIO("read -P 0xab 0 1M", "write -P 0xcd 1M 1M", "flush", "read -P 0xcd 1M 1M")
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		t.Fatalf("qemu-io ended while the node was down (%v): %s", err, out.String())
	case <-time.After(time.Second):
	}
	n1.start()
	select {
	case err := <-done:
		if err != nil || strings.Contains(out.String(), "failed") || strings.Count(out.String(), "read 1048576/1048576") != 2 {
			t.Fatalf("qemu-io across the restart: %v\n%s", err, out.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("qemu-io still waiting 60 s after the node came back: %s", out.String())
	}
	resp, err := http.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	text, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if v := metricValue(string(text), "lupool_attach_reconnects_total", `lu="q"`); v != 1 {
		t.Errorf("lupool_attach_reconnects_total = %v, want 1:\n%s", v, text)
	}
	if v := metricValue(string(text), "lupool_attach_unavailable_seconds_total", `lu="q"`); v < 0.5 {
		t.Errorf("lupool_attach_unavailable_seconds_total = %v, want the second or more the node was down", v)
	}
	if v := metricValue(string(text), "lupool_attach_replayed_requests_total", `lu="q"`); v < 0 {
		t.Errorf("lupool_attach_replayed_requests_total missing:\n%s", text)
	}
}

// TestAttachNbdcopyAcrossRestart: nbdcopy of a 256 MiB image into the LU
// through the endpoint, with the node restarted in the middle; the LU
// then holds exactly the image.
func TestAttachNbdcopyAcrossRestart(t *testing.T) {
	needTools(t, "nbdcopy")
	n1 := newDaemon(t, "n1")
	n1.start()
	n1.mustCLI("lu", "create", "img", "--size", "256M")
	sock := filepath.Join(t.TempDir(), "img.sock")
	a := startAttach(t, n1, "img", "unix:"+sock)
	src, want := randomFile(t, 256<<20)
	start := time.Now()
	cmd := exec.Command("nbdcopy", "--flush", src, a.uri())
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	time.Sleep(200 * time.Millisecond)
	select {
	case err := <-done:
		t.Fatalf("nbdcopy ended (%v) before the restart; the test would prove nothing: %s", err, out.String())
	default:
	}
	n1.restart(syscall.SIGTERM)
	if err := <-done; err != nil {
		t.Fatalf("nbdcopy across the restart: %v\n%s", err, out.String())
	}
	t.Logf("nbdcopy of 256 MiB across a restart: %v", time.Since(start).Round(time.Millisecond))
	// The LU's volume file on the node is the image (nbdcopy --flush
	// made it durable through the endpoint).
	if got := volumeSHA(t, n1, "img"); got != want {
		t.Errorf("LU holds %s after the copy, want the image's %s", got, want)
	}
	a.waitReconnects(1)
}

// TestAttachGiveUp: with --give-up 2s and the only node down, a read fails
// with EIO about 2 s after the node went away instead of hanging.
func TestAttachGiveUp(t *testing.T) {
	needTools(t, "qemu-io")
	n1 := newDaemon(t, "n1")
	n1.start()
	n1.mustCLI("lu", "create", "g", "--size", "16M")
	a := startAttach(t, n1, "g", freePort(t), "--give-up", "2s")
	start := time.Now() // the give-up time counts from the loss of the node
	n1.stop(syscall.SIGTERM)
	out, _ := exec.Command("qemu-io", "-f", "raw", "-c", "read 0 4k", a.uri()).CombinedOutput()
	took := time.Since(start)
	if !strings.Contains(string(out), "Input/output error") {
		t.Fatalf("read with the node down: %s, want Input/output error", out)
	}
	if took < 1900*time.Millisecond || took > 10*time.Second {
		t.Errorf("EIO %v after the node stopped, want about 2s", took)
	}
	// The log reaches the buffer through a copying goroutine: wait a bit.
	for deadline := time.Now().Add(5 * time.Second); !strings.Contains(a.log.String(), "failing requests with EIO"); {
		if time.Now().After(deadline) {
			t.Fatal("no give-up in the log")
		}
		time.Sleep(20 * time.Millisecond)
	}
}
