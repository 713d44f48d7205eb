package main

import (
	"context"
	"encoding/json"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lupool/lupool/internal/realclient"
)

// serveInDir runs `lupool serve args...` with dir as its working directory
// and env (plus PATH and HOME) as its whole environment, and waits until
// /readyz on api answers 200. Unlike daemon.start it passes no --data and
// no --node-id, so the defaults are what runs.
func serveInDir(t *testing.T, dir, api string, env []string, args ...string) *daemon {
	t.Helper()
	d := &daemon{t: t, api: api, id: "defaults", data: filepath.Join(dir, "lupool-data")}
	d.cmd = exec.Command(lupoolBin, append([]string{"serve"}, args...)...)
	d.cmd.Dir = dir
	d.cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME")}, env...)
	d.cmd.Stdout, d.cmd.Stderr = &d.log, &d.log
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	d.exited = make(chan struct{})
	go func() {
		d.exitErr = d.cmd.Wait()
		close(d.exited)
	}()
	t.Cleanup(func() {
		if d.cmd.ProcessState == nil {
			_ = d.cmd.Process.Kill()
			<-d.exited
		}
		if t.Failed() {
			t.Logf("daemon log:\n%s", d.logs())
		}
	})
	deadline := time.Now().Add(60 * time.Second)
	for {
		resp, err := http.Get("http://" + api + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return d
			}
		}
		select {
		case <-d.exited:
			t.Fatalf("daemon exited during start (%v):\n%s", d.exitErr, d.logs())
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon not ready after 60s:\n%s", d.logs())
		}
	}
}

// mustMetric returns a sample that must be present (metricValue gives -1
// for a missing one, which would let a "<= n" check pass by accident).
func mustMetric(t *testing.T, text, name string, labels ...string) float64 {
	t.Helper()
	v := metricValue(text, name, labels...)
	if v < 0 {
		t.Fatalf("metric %s%v missing from /metrics", name, labels)
	}
	return v
}

// TestAuditDefaultsExactMetricsRestart starts `lupool serve` in a fresh
// directory with only the ports overridden, so the data directory and node
// id are the defaults; sends a known number of NBD requests with nbdsh and
// checks /metrics counts exactly those; reads the pool status JSON fields;
// then restarts after SIGTERM (with the NBD address from LUPOOL_NBD, beyond
// loopback, which must warn) and after kill -9, and checks that raft
// re-delivered the old entries and the state machine skipped every one of
// them instead of applying it twice.
func TestAuditDefaultsExactMetricsRestart(t *testing.T) {
	alongside(t)
	realclient.NbdshPython(t) // skips without python3-libnbd
	work := t.TempDir()
	nbdAddr, apiAddr, peerAddr := freePort(t), freePort(t), freePort(t)
	ports := []string{"--nbd", nbdAddr, "--api", apiAddr, "--peer", peerAddr}
	d := serveInDir(t, work, apiAddr, nil, ports...)
	d.nbd = nbdAddr

	// Defaults: ./lupool-data holds the metadata, volumes and node id.
	idBytes, err := os.ReadFile(filepath.Join(work, "lupool-data", "node-id"))
	if err != nil {
		t.Fatalf("default data directory: %v", err)
	}
	nodeID := strings.TrimSpace(string(idBytes))
	for _, sub := range []string{"meta", "volumes"} {
		if fi, err := os.Stat(filepath.Join(work, "lupool-data", sub)); err != nil || !fi.IsDir() {
			t.Fatalf("default data directory has no %s/: %v", sub, err)
		}
	}

	// Sizes round up to 512 and the CLI says so.
	out, errOut, code := d.cli("lu", "create", "exact", "--size", "1000")
	if code != 0 || !strings.Contains(out+errOut, "rounded up to 1024 bytes") {
		t.Fatalf("create --size 1000: exit %d, %q %q; want a note that it was rounded up to 1024", code, out, errOut)
	}
	var exact luJSON
	if err := json.Unmarshal([]byte(d.mustCLI("lu", "show", "exact", "-o", "json")), &exact); err != nil {
		t.Fatal(err)
	}
	if exact.SizeBytes != 1024 || exact.Copies != 1 || exact.Writer != nodeID {
		t.Fatalf("lu show exact: %+v; want 1024 bytes, 1 copy, writer %q", exact, nodeID)
	}
	d.mustCLI("lu", "create", "m", "--size", "1M")

	// Exactly 10 writes of 4 KiB, 3 reads of 8 KiB and 1 flush.
	const writes, reads = 10, 3
	script := `
for i in range(10):
    h.pwrite(bytes([i + 1]) * 4096, i * 8192)
for i in range(3):
    h.pread(8192, i * 65536)
h.flush()
`
	if b, err := realclient.Nbdsh(t, d.uri("m"), script).CombinedOutput(); err != nil {
		t.Fatalf("nbdsh: %v\n%s", err, b)
	}
	m := d.metrics()
	for _, c := range []struct {
		name, command string
		want          float64
	}{
		{"lupool_nbd_requests_total", "write", writes},
		{"lupool_nbd_bytes_total", "write", writes * 4096},
		{"lupool_nbd_request_duration_seconds_count", "write", writes},
		{"lupool_nbd_requests_total", "read", reads},
		{"lupool_nbd_bytes_total", "read", reads * 8192},
		{"lupool_nbd_requests_total", "flush", 1},
	} {
		if got := mustMetric(t, m, c.name, `export="m"`, `command="`+c.command+`"`); got != c.want {
			t.Errorf("%s{export=m,command=%s} = %v, want exactly %v (what nbdsh sent)", c.name, c.command, got, c.want)
		}
	}
	if got := metricValue(m, "lupool_nbd_request_errors_total", `export="m"`, `command="write"`); got > 0 {
		t.Errorf("write errors = %v, want 0", got)
	}

	// pool status -o json carries the four accounting fields.
	var pool map[string]any
	if err := json.Unmarshal([]byte(d.mustCLI("pool", "status", "-o", "json")), &pool); err != nil {
		t.Fatal(err)
	}
	num := func(key string) float64 {
		t.Helper()
		v, ok := pool[key].(float64)
		if !ok {
			t.Fatalf("pool status JSON has no number %q: %v", key, pool)
		}
		return v
	}
	capacity, free, allocated, provisioned := num("capacity_bytes"), num("free_bytes"), num("allocated_bytes"), num("provisioned_bytes")
	if provisioned != 1024+1<<20 || allocated < writes*4096 || capacity <= 0 || free <= 0 || free > capacity {
		t.Errorf("pool status: capacity %v free %v allocated %v provisioned %v; want provisioned %d, allocated >= %d",
			capacity, free, allocated, provisioned, 1024+1<<20, writes*4096)
	}
	appliedBefore := mustMetric(t, m, "lupool_raft_applied_index")
	// commandsBefore counts every command applied by the earlier runs; after
	// a restart raft hands each of them to the state machine again, which
	// must skip them all.
	commandsBefore := 0.0

	verify := `
for i in range(10):
    assert h.pread(4096, i * 8192) == bytes([i + 1]) * 4096, i
    assert h.pread(4096, i * 8192 + 4096) == bytes(4096), i
`
	for _, restart := range []struct {
		sig syscall.Signal
		env []string
	}{
		{syscall.SIGTERM, []string{"LUPOOL_NBD=0.0.0.0:" + nbdAddr[strings.LastIndexByte(nbdAddr, ':')+1:]}},
		{syscall.SIGKILL, nil},
	} {
		// Read just before the stop, seconds after start, so the leader's
		// own address records (written once leadership settles) are in.
		commandsBefore += mustMetric(t, d.metrics(), "lupool_raft_applied_since_start_total")
		d.stop(restart.sig)
		args := ports
		if restart.env != nil {
			args = []string{"--api", apiAddr, "--peer", peerAddr} // --nbd from the environment
		}
		d = serveInDir(t, work, apiAddr, restart.env, args...)
		d.nbd = nbdAddr // 0.0.0.0:PORT also answers on 127.0.0.1:PORT
		warned := strings.Contains(d.logs(), "NBD listens beyond loopback")
		if warned != (restart.env != nil) {
			t.Errorf("after %v: beyond-loopback warning logged = %v, want %v", restart.sig, warned, restart.env != nil)
		}
		lus := d.listLUs()
		if len(lus) != 2 || lus[0].Name != "exact" || lus[1].Name != "m" || lus[1].SizeBytes != 1<<20 {
			t.Fatalf("after %v: LUs %+v, want exact and m", restart.sig, lus)
		}
		if b, err := realclient.Nbdsh(t, d.uri("m"), verify).CombinedOutput(); err != nil {
			t.Fatalf("after %v: data read back differs: %v\n%s", restart.sig, err, b)
		}
		m := d.metrics()
		// Raft hands every old command entry to the state machine again on
		// start (no snapshot yet: 8192 entries); each must be skipped, none
		// applied twice. The commands applied now are the leader recording
		// its own addresses: serve.go calls RegisterSelf on every start, and
		// cluster's leaderLoop does too when they changed (here the NBD
		// address changes on each restart); and the new primary records its
		// PrimaryElected event.
		applied := mustMetric(t, m, "lupool_raft_applied_since_start_total")
		skipped := mustMetric(t, m, "lupool_raft_skipped_since_start_total")
		index := mustMetric(t, m, "lupool_raft_applied_index")
		if skipped != commandsBefore || applied > 3 || index <= appliedBefore {
			t.Errorf("after %v: skipped %v, want exactly the %v commands applied before; applied since start %v (want <= 3); applied index %v (was %v)",
				restart.sig, skipped, commandsBefore, applied, index, appliedBefore)
		}
		if v := metricValue(m, "lupool_lu_changes_applied_total", `change="created"`); v > 0 {
			t.Errorf("after %v: %v LU creates re-applied to volumes, want 0", restart.sig, v)
		}
		var nodes []struct {
			ID string `json:"id"`
		}
		if err := json.Unmarshal([]byte(d.mustCLI("node", "list", "-o", "json")), &nodes); err != nil {
			t.Fatal(err)
		}
		if len(nodes) != 1 || nodes[0].ID != nodeID {
			t.Errorf("after %v: nodes %+v, want the one generated id %q kept in lupool-data/node-id", restart.sig, nodes, nodeID)
		}
		appliedBefore = index
	}
}

// TestAuditBadInputLeavesNoTrace sends the bad inputs of the issue (unknown
// LU, bad size, duplicate name, over-commit create, malformed JSON, a second
// daemon on the same directory) and checks every layer, not only the LU
// table: no raft entry was appended, no volume file appeared, provisioned
// bytes and the NBD export list are as before, and the refusals carry the
// status code the README promises.
func TestAuditBadInputLeavesNoTrace(t *testing.T) {
	alongside(t)
	needTools(t, "nbdinfo")
	d := newDaemon(t, "bad2", "--overcommit", "1")
	d.start()
	d.mustCLI("lu", "create", "keep", "--size", "1M")

	type snapshot struct {
		lastLog, provisioned float64
		files, exports       string
	}
	take := func() snapshot {
		t.Helper()
		m := d.metrics()
		entries, err := os.ReadDir(filepath.Join(d.data, "volumes"))
		if err != nil {
			t.Fatal(err)
		}
		var files []string
		for _, e := range entries {
			files = append(files, e.Name())
		}
		var list struct {
			Exports []struct {
				Name string `json:"export-name"`
			} `json:"exports"`
		}
		if err := json.Unmarshal([]byte(runTool(t, "nbdinfo", "--list", "--json", "nbd://"+d.nbd)), &list); err != nil {
			t.Fatal(err)
		}
		var exports []string
		for _, e := range list.Exports {
			exports = append(exports, e.Name)
		}
		return snapshot{
			lastLog:     mustMetric(t, m, "lupool_raft_last_log_index"),
			provisioned: mustMetric(t, m, "lupool_pool_provisioned_bytes"),
			files:       strings.Join(files, ","),
			exports:     strings.Join(exports, ","),
		}
	}
	before := take()
	if before.files != "keep.lu" || before.exports != "keep" || before.provisioned != 1<<20 {
		t.Fatalf("before the bad input: %+v", before)
	}

	for _, c := range []struct {
		method, path, body string
		status             int
	}{
		{"GET", "/v1/lus/nosuch", "", http.StatusNotFound},
		{"DELETE", "/v1/lus/nosuch", "", http.StatusNotFound},
		{"POST", "/v1/lus/nosuch/resize", `{"size_bytes": 1048576}`, http.StatusNotFound},
		{"POST", "/v1/lus", `{"name": "x", "size_bytes": 1000}`, http.StatusBadRequest},
		{"POST", "/v1/lus", `{"name": "x", "size_bytes": -512}`, http.StatusBadRequest},
		{"POST", "/v1/lus", `{"name": "x", "size_bytes": 0}`, http.StatusBadRequest},
		{"POST", "/v1/lus/keep/resize", `{"size_bytes": 1000}`, http.StatusBadRequest},
		{"POST", "/v1/lus", `{"name": "keep", "size_bytes": 512}`, http.StatusConflict},
		{"POST", "/v1/lus", `{"name": "huge", "size_bytes": 1125899906842624}`, http.StatusInsufficientStorage},
		{"POST", "/v1/lus/keep/resize", `{"size_bytes": 1125899906842624}`, http.StatusInsufficientStorage},
		{"POST", "/v1/lus", `{"name": "` + strings.Repeat("n", 129) + `", "size_bytes": 512}`, http.StatusBadRequest},
		{"POST", "/v1/lus", `{"name":`, http.StatusBadRequest},
		{"POST", "/v1/lus", `{"name": "x", "size_bytes": 512, "colour": "red"}`, http.StatusBadRequest},
		{"POST", "/v1/lus/keep/resize", `{"size_bytes": "big"}`, http.StatusBadRequest},
	} {
		resp := d.request(c.method, c.path, c.body)
		var eb struct {
			Error string `json:"error"`
		}
		decodeErr := json.NewDecoder(resp.Body).Decode(&eb)
		resp.Body.Close()
		if resp.StatusCode != c.status || decodeErr != nil || eb.Error == "" {
			t.Errorf("%s %s %s: status %d, error %q (decode %v); want %d with an {\"error\": ...} body",
				c.method, c.path, c.body, resp.StatusCode, eb.Error, decodeErr, c.status)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	second := exec.CommandContext(ctx, lupoolBin, "serve", "--data", d.data, "--nbd", freePort(t), "--api", freePort(t), "--peer", freePort(t))
	if out, err := second.CombinedOutput(); err == nil || !strings.Contains(string(out), "in use by another lupool daemon") {
		t.Errorf("second daemon on the same directory: err %v, output %q", err, out)
	}

	if after := take(); after != before {
		t.Errorf("bad input left a trace: before %+v, after %+v", before, after)
	}
	if lus := d.listLUs(); len(lus) != 1 || lus[0].Name != "keep" || lus[0].SizeBytes != 1<<20 {
		t.Errorf("LU table after bad input: %+v", lus)
	}
}
