package main

import (
	"encoding/json"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lupool/lupool/internal/realclient"
)

const imageBytes = 16 << 20

// TestSingleNodeLifecycle is what a new user does: start a pool with
// defaults, create LUs, see them as NBD exports, copy an image in and out,
// read the metrics, stop (cleanly and not), start again and find it all.
func TestSingleNodeLifecycle(t *testing.T) {
	alongside(t)
	needTools(t, "nbdinfo", "nbdcopy")
	d := newDaemon(t, "n1")
	d.start()

	for _, name := range []string{"alpha", "beta", "gamma"} {
		d.mustCLI("lu", "create", name, "--size", "64M", "--description", "test LU "+name)
	}
	d.mustCLI("lu", "create", "scratch", "--size", "1G", "--kind", "memory")

	var list struct {
		Exports []struct {
			Name        string `json:"export-name"`
			Description string `json:"description"`
			Size        int64  `json:"export-size"`
		} `json:"exports"`
	}
	if err := json.Unmarshal([]byte(runTool(t, "nbdinfo", "--list", "--json", "nbd://"+d.nbd)), &list); err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range list.Exports {
		names = append(names, e.Name)
		if e.Name == "beta" && (e.Size != 64<<20 || e.Description != "test LU beta") {
			t.Errorf("export beta: size %d description %q", e.Size, e.Description)
		}
	}
	sort.Strings(names)
	if strings.Join(names, ",") != "alpha,beta,gamma,scratch" {
		t.Fatalf("nbdinfo --list exports = %v, want alpha,beta,gamma,scratch", names)
	}

	img, want := randomFile(t, imageBytes)
	runTool(t, "nbdcopy", img, d.uri("alpha"))
	out := filepath.Join(t.TempDir(), "out.raw")
	runTool(t, "nbdcopy", d.uri("alpha"), out)
	if got := fileSHA(t, out); got == want {
		t.Fatalf("read back %s has the image's checksum but must be 64 MiB (image padded with zeros)", out)
	}
	checkPrefix(t, out, img)

	m := d.metrics()
	if v := metricValue(m, "lupool_nbd_bytes_total", `export="alpha"`, `command="write"`); v < imageBytes {
		t.Errorf("metrics: alpha write bytes = %v, want >= %d (the image written)", v, imageBytes)
	}
	// nbdcopy asks for block status and reads only the allocated part.
	if v := metricValue(m, "lupool_nbd_bytes_total", `export="alpha"`, `command="read"`); v < imageBytes || v >= 64<<20 {
		t.Errorf("metrics: alpha read bytes = %v, want the %d allocated bytes (holes skipped by block status)", v, imageBytes)
	}
	if v := metricValue(m, "lupool_nbd_requests_total", `export="alpha"`, `command="block_status"`); v < 1 {
		t.Errorf("metrics: alpha block_status requests = %v, want >= 1", v)
	}
	if v := metricValue(m, "lupool_nbd_requests_total", `export="alpha"`, `command="write"`); v < 1 {
		t.Errorf("metrics: alpha write requests = %v, want >= 1", v)
	}
	if v := metricValue(m, "lupool_pool_allocated_bytes"); v < imageBytes {
		t.Errorf("metrics: pool allocated = %v, want >= %d", v, imageBytes)
	}
	var alpha luJSON
	if err := json.Unmarshal([]byte(d.mustCLI("lu", "show", "alpha", "-o", "json")), &alpha); err != nil {
		t.Fatal(err)
	}
	if alpha.AllocatedBytes < imageBytes || alpha.AllocatedBytes > imageBytes+1<<20 {
		t.Errorf("lu show alpha: allocated_bytes = %d, want about %d", alpha.AllocatedBytes, imageBytes)
	}

	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
		d.stop(sig)
		d.start()
		lus := d.listLUs()
		if len(lus) != 4 {
			t.Fatalf("after %v and restart: %d LUs, want 4: %+v", sig, len(lus), lus)
		}
		runTool(t, "nbdcopy", d.uri("alpha"), out)
		checkPrefix(t, out, img)
		m := d.metrics()
		if v := metricValue(m, "lupool_lu_changes_applied_total", `change="created"`); v > 0 {
			t.Errorf("after %v and restart: %v LU creates re-applied, want 0", sig, v)
		}
		if v := metricValue(m, "lupool_raft_applied_index"); v < 4 {
			t.Errorf("after %v and restart: raft applied index %v, want >= 4", sig, v)
		}
	}
}

// checkPrefix checks that out starts with img's bytes and is zero after.
func checkPrefix(t *testing.T, out, img string) {
	t.Helper()
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	want, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) < len(want) || sha(got[:len(want)]) != sha(want) {
		t.Fatalf("LU contents differ from the image written (%d bytes read, %d written)", len(got), len(want))
	}
	for i, b := range got[len(want):] {
		if b != 0 {
			t.Fatalf("byte %d past the image is %#x, want 0 (never written)", len(want)+i, b)
		}
	}
}

// TestBadInputChangesNothing: every mistake gets a clear error and the LU
// table is as it was.
func TestBadInputChangesNothing(t *testing.T) {
	alongside(t)
	d := newDaemon(t, "bad", "--overcommit", "1")
	d.start()
	d.mustCLI("lu", "create", "keep", "--size", "1M")

	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"lu", "show", "nosuch"}, 1, `no LU named "nosuch"`},
		{[]string{"lu", "delete", "nosuch"}, 1, `no LU named "nosuch"`},
		{[]string{"lu", "create", "x", "--size", "10X"}, 2, "like 512, 64K, 10G"},
		{[]string{"lu", "create", "x"}, 2, "--size is required"},
		{[]string{"lu", "create", "bad/name", "--size", "1M"}, 1, "use 1 to 128 of"},
		{[]string{"lu", "create", "keep", "--size", "1M"}, 1, `"keep" exists`},
		{[]string{"lu", "create", "huge", "--size", "1P"}, 1, "limit is"},
		{[]string{"lu", "create", "x", "--size", "1M", "--kind", "tape"}, 1, "use file or memory"},
		{[]string{"lu", "create", "x", "--size", "1M", "--copies", "0"}, 2, "--copies must be 1 or more"},
		{[]string{"lu", "frobnicate"}, 2, "unknown lu subcommand"},
		{[]string{"lu", "list", "-o", "yaml"}, 2, "use table or json"},
		{[]string{"pool", "status", "--api", "127.0.0.1:1"}, 1, "cannot reach the lupool API"},
	} {
		out, errOut, code := d.cli(tc.args...)
		if code != tc.code || !strings.Contains(errOut, tc.want) {
			t.Errorf("lupool %s: exit %d, stderr %q; want exit %d mentioning %q (stdout %q)",
				strings.Join(tc.args, " "), code, errOut, tc.code, tc.want, out)
		}
	}

	for _, body := range []string{`{"name":`, `{"name":"x","size_bytes":"big"}`, `[1,2]`} {
		resp := d.request("POST", "/v1/lus", body)
		var eb struct{ Error string }
		_ = json.NewDecoder(resp.Body).Decode(&eb)
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest || !strings.Contains(eb.Error, "malformed JSON") {
			t.Errorf("POST %s: status %d error %q, want 400 malformed JSON", body, resp.StatusCode, eb.Error)
		}
	}

	// A second daemon on the same data directory refuses to start.
	second := exec.Command(lupoolBin, "serve", "--data", d.data, "--nbd", freePort(t), "--api", freePort(t), "--peer", freePort(t))
	done := make(chan struct{})
	var secondOut []byte
	var secondErr error
	go func() { secondOut, secondErr = second.CombinedOutput(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		_ = second.Process.Kill()
		t.Fatal("second daemon on the same data directory did not exit")
	}
	if secondErr == nil || !strings.Contains(string(secondOut), "in use by another lupool daemon") {
		t.Errorf("second daemon: err %v, output %q; want a refusal naming the lock", secondErr, secondOut)
	}

	lus := d.listLUs()
	if len(lus) != 1 || lus[0].Name != "keep" || lus[0].SizeBytes != 1<<20 {
		t.Fatalf("bad input changed the LU table: %+v", lus)
	}
}

// TestJoinSeesLUTable: a second node joins and sees the same LUs.
func TestJoinSeesLUTable(t *testing.T) {
	alongside(t)
	n1 := newDaemon(t, "n1")
	n1.start()
	n1.mustCLI("lu", "create", "one", "--size", "4M")
	n1.mustCLI("lu", "create", "two", "--size", "8M")

	n2 := newJoiner(t, "n2", n1)
	n2.start()
	deadline := time.Now().Add(30 * time.Second)
	for {
		lus := n2.listLUs()
		if len(lus) == 2 && lus[0].Name == "one" && lus[1].Name == "two" && lus[1].SizeBytes == 8<<20 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("node 2 lists %+v, want one and two", lus)
		}
		time.Sleep(200 * time.Millisecond)
	}
	// A create sent to the follower is forwarded to the leader and shows up
	// on both nodes, with its writer on the node that received it.
	n2.mustCLI("lu", "create", "three", "--size", "1M")
	var three luJSON
	if err := json.Unmarshal([]byte(n1.mustCLI("lu", "show", "three", "-o", "json")), &three); err != nil {
		t.Fatal(err)
	}
	if three.Writer != "n2" {
		t.Errorf("LU created through n2 has writer %q, want n2", three.Writer)
	}
	var nodes []struct {
		ID     string `json:"id"`
		Leader bool   `json:"leader"`
	}
	if err := json.Unmarshal([]byte(n2.mustCLI("node", "list", "-o", "json")), &nodes); err != nil {
		t.Fatal(err)
	}
	if len(nodes) != 2 {
		t.Fatalf("node list on n2: %+v, want 2 nodes", nodes)
	}
}

// TestDeleteAndResizeWithAttachedClient: delete is refused while a client
// is attached, --force ends the client's I/O with an error; resize grows
// online and refuses to cut off data.
func TestDeleteAndResizeWithAttachedClient(t *testing.T) {
	alongside(t)
	d := newDaemon(t, "del")
	d.start()
	d.mustCLI("lu", "create", "held", "--size", "1M")

	// The client writes, says "ready", waits for a line on stdin, then
	// tries to read and prints what happened.
	script := `
import sys
h.pwrite(b"x" * 4096, 0)
print("ready", flush=True)
sys.stdin.readline()
try:
    h.pread(4096, 0)
    print("read-ok", flush=True)
except nbd.Error as e:
    print("read-error", e.errno, flush=True)
`
	cmd := realclient.Nbdsh(t, d.uri("held"), script)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(out.String(), "ready") {
		if time.Now().After(deadline) {
			t.Fatalf("nbdsh client never got ready: %s", out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}

	var held luJSON
	if err := json.Unmarshal([]byte(d.mustCLI("lu", "show", "held", "-o", "json")), &held); err != nil {
		t.Fatal(err)
	}
	// Grow online; shrinking below written data is refused.
	d.mustCLI("lu", "resize", "held", "--size", "2M")
	if _, errOut, code := d.cli("lu", "resize", "held", "--size", "512"); code != 1 || !strings.Contains(errOut, "allocated") {
		t.Errorf("shrink over data: exit %d %q, want a refusal naming allocated data", code, errOut)
	}

	if _, errOut, code := d.cli("lu", "delete", "held"); code != 1 || !strings.Contains(errOut, "client connection(s) attached") {
		t.Fatalf("delete with a client attached: exit %d %q, want refused", code, errOut)
	}
	if lus := d.listLUs(); len(lus) != 1 || lus[0].SizeBytes != 2<<20 {
		t.Fatalf("after refused delete: %+v, want held at 2 MiB", lus)
	}
	d.mustCLI("lu", "delete", "held", "--force")
	if _, err := stdin.Write([]byte("go\n")); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("client hung after forced delete")
	}
	if got := out.String(); strings.Contains(got, "read-ok") || !(strings.Contains(got, "read-error") || strings.Contains(got, "disconnect") || strings.Contains(got, "Error")) {
		t.Fatalf("client after forced delete: %q, want its I/O to fail", got)
	}
	if lus := d.listLUs(); len(lus) != 0 {
		t.Fatalf("after forced delete: %+v, want none", lus)
	}
}
