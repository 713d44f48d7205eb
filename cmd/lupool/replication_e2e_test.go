package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lupool/lupool/internal/realclient"
	"github.com/lupool/lupool/replication/replproto"
)

// cluster3 starts three nodes: n1 bootstraps, n2 and n3 join it.
func cluster3(t *testing.T, extra ...string) (n1, n2, n3 *daemon) {
	t.Helper()
	n1 = newDaemon(t, "n1", extra...)
	n1.start()
	n2 = newJoiner(t, "n2", n1, extra...)
	n2.start()
	n3 = newJoiner(t, "n3", n1, extra...)
	n3.start()
	return n1, n2, n3
}

type replicaJSON struct {
	Node       string `json:"node"`
	State      string `json:"state"`
	DirtyBytes *int64 `json:"dirty_bytes"`
}

type luDetail struct {
	luJSON
	Epoch    uint64        `json:"epoch"`
	Replicas []replicaJSON `json:"replicas"`
}

func (d *daemon) showLU(name string) luDetail {
	d.t.Helper()
	var lu luDetail
	if err := json.Unmarshal([]byte(d.mustCLI("lu", "show", name, "-o", "json")), &lu); err != nil {
		d.t.Fatal(err)
	}
	return lu
}

func (l luDetail) state(node string) string {
	for _, r := range l.Replicas {
		if r.Node == node {
			return r.State
		}
	}
	return ""
}

// waitState polls until node's copy of name is in state (as d sees it).
func (d *daemon) waitState(name, node, state string, within time.Duration) luDetail {
	d.t.Helper()
	deadline := time.Now().Add(within)
	for {
		lu := d.showLU(name)
		if lu.state(node) == state {
			return lu
		}
		if time.Now().After(deadline) {
			d.t.Fatalf("copy of %s on %s is %q after %v, want %q (%+v)", name, node, lu.state(node), within, state, lu)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func volumeSHA(t *testing.T, d *daemon, name string) string {
	t.Helper()
	return fileSHA(t, filepath.Join(d.data, "volumes", name+".lu"))
}

func fio(t *testing.T, args ...string) string {
	t.Helper()
	out, err := startFio(t, args...)()
	if err != nil {
		t.Fatalf("fio %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// startFio starts fio over NBD in the background; the returned wait gives
// its output and error.
func startFio(t *testing.T, args ...string) (wait func() (string, error)) {
	t.Helper()
	base := []string{"--ioengine=nbd", "--output-format=normal", "--verify_state_save=0"}
	cmd := exec.Command("fio", append(base, args...)...)
	cmd.Dir = t.TempDir()
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	return func() (string, error) {
		err := cmd.Wait()
		return out.String(), err
	}
}

// TestReplicatedWritesReadLocally: an LU with two copies written through
// its writer reads back through the other copy's node from that node's own
// copy, with no read traffic to the writer; both copies are identical.
func TestReplicatedWritesReadLocally(t *testing.T) {
	needTools(t, "fio")
	n1, n2, _ := cluster3(t)
	n1.mustCLI("lu", "create", "r", "--size", "64M", "--copies", "2")
	lu := n1.showLU("r")
	if lu.Writer != "n1" || len(lu.Replicas) != 2 || lu.state("n1") != "in-sync" || lu.state("n2") != "in-sync" {
		t.Fatalf("placement: %+v; want writer n1 and in-sync copies on n1 and n2", lu)
	}
	job := []string{"--name=pages", "--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=32M",
		"--verify=crc32c", "--randseed=7"}
	fio(t, append(job, "--uri="+n1.uri("r"), "--do_verify=0")...)
	fio(t, append(job, "--uri="+n2.uri("r"), "--verify_only=1")...)

	m2 := n2.metrics()
	local := metricValue(m2, "lupool_replication_read_bytes_total", `lu="r"`, `source="local"`)
	remote := metricValue(m2, "lupool_replication_read_bytes_total", `lu="r"`, `source="writer"`)
	if local < 32<<20 || remote > 0 {
		t.Errorf("n2 read %v bytes locally and %v from the writer; want >= 32 MiB locally and none remote", local, remote)
	}
	if served := metricValue(n1.metrics(), "lupool_replication_served_read_bytes_total", `lu="r"`); served > 0 {
		t.Errorf("writer n1 served %v read bytes to other nodes; want 0", served)
	}
	if received := metricValue(m2, "lupool_replication_received_bytes_total", `lu="r"`, `kind="live"`); received < 32<<20 {
		t.Errorf("n2's copy received %v live bytes, want >= 32 MiB", received)
	}
	if a, b := volumeSHA(t, n1, "r"), volumeSHA(t, n2, "r"); a != b {
		t.Errorf("copies differ: n1 %s, n2 %s", a, b)
	}
	// n3 holds no copy: it forwards reads to the writer and sees the same.
	fio(t, append(job, "--uri="+n3uri(t, n1, "r"), "--verify_only=1", "--size=4M")...)
}

func n3uri(t *testing.T, n1 *daemon, name string) string {
	t.Helper()
	var nodes []struct {
		ID      string `json:"id"`
		NBDAddr string `json:"nbd_addr"`
	}
	if err := json.Unmarshal([]byte(n1.mustCLI("node", "list", "-o", "json")), &nodes); err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		if n.ID == "n3" {
			return "nbd://" + n.NBDAddr + "/" + name
		}
	}
	t.Fatal("n3 not in node list")
	return ""
}

// TestCopyKilledThenResynced: kill -9 of the non-writer copy's node during
// writes; writes go on, the copy is out of sync; after a restart the resync
// sends about what was written meanwhile, the copy is in sync again and
// both copies are identical. Then a stale-epoch stream is refused.
func TestCopyKilledThenResynced(t *testing.T) {
	needTools(t, "fio")
	n1, n2, _ := cluster3(t)
	n1.mustCLI("lu", "create", "k", "--size", "64M", "--copies", "2")
	fio(t, "--name=base", "--uri="+n1.uri("k"), "--rw=write", "--bs=1M", "--size=16M")

	// Kill n2 while a write load runs through n1: the load finishes clean.
	wait := startFio(t, "--name=during", "--uri="+n1.uri("k"),
		"--rw=randwrite", "--bs=4k", "--iodepth=16", "--offset=16M", "--size=8M", "--time_based", "--runtime=3")
	time.Sleep(time.Second)
	n2.stop(syscall.SIGKILL)
	if out, err := wait(); err != nil {
		t.Fatalf("writes through the writer failed while a copy died: %v\n%s", err, out)
	}
	// A known amount more while n2 is down: 8 MiB of distinct 4 KiB blocks.
	fio(t, "--name=outage", "--uri="+n1.uri("k"), "--rw=randwrite", "--bs=4k", "--iodepth=16", "--offset=32M", "--size=8M")
	lu := n1.showLU("k")
	if lu.state("n2") != "out-of-sync" || lu.Epoch < 2 {
		t.Fatalf("after n2 died: %+v; want n2 out-of-sync at epoch >= 2", lu)
	}
	m1 := n1.metrics()
	dirty := metricValue(m1, "lupool_replication_dirty_bytes", `lu="k"`, `copy="n2"`)
	if dirty < 8<<20 || dirty > 16<<20 {
		t.Fatalf("dirty bytes for n2 = %v; want between 8 MiB (the outage write) and 16 MiB (plus the 8 MiB range of the load)", dirty)
	}
	for _, r := range n1.showLU("k").Replicas {
		if r.Node == "n2" && (r.DirtyBytes == nil || float64(*r.DirtyBytes) != dirty) {
			t.Errorf("lu show on the writer: n2 lacks %v bytes, metrics say %v", r.DirtyBytes, dirty)
		}
	}

	n2.start()
	n1.waitState("k", "n2", "in-sync", 60*time.Second)
	m1 = n1.metrics()
	sent := metricValue(m1, "lupool_replication_sent_bytes_total", `lu="k"`, `copy="n2"`, `kind="resync"`)
	t.Logf("resync: %v bytes dirty, %v bytes sent (%.3fx)", dirty, sent, sent/dirty)
	if sent < dirty || sent > 1.1*dirty {
		t.Errorf("resync sent %v bytes for %v dirty bytes; want between 1x and 1.1x", sent, dirty)
	}
	if left := metricValue(m1, "lupool_replication_dirty_bytes", `lu="k"`, `copy="n2"`); left != 0 {
		t.Errorf("dirty bytes after resync = %v, want 0", left)
	}
	if a, b := volumeSHA(t, n1, "k"), volumeSHA(t, n2, "k"); a != b {
		t.Errorf("copies differ after resync: n1 %s, n2 %s", a, b)
	}

	// A writer at an old epoch is refused by the copy.
	stale := n1.showLU("k").Epoch - 1
	status := helloStatus(t, n2, n1, "k", stale)
	if status != replproto.StatusStaleEpoch {
		t.Errorf("hello at stale epoch %d answered %v, want StaleEpoch", stale, status)
	}
	if v := metricValue(n2.metrics(), "lupool_replication_stale_epoch_refused_total", `lu="k"`); v < 1 {
		t.Errorf("stale refusals on n2 = %v, want >= 1", v)
	}
}

// helloStatus opens a replication stream to node to as a copy writer at
// epoch, with the certificate of node as, and returns the hello's answer.
func helloStatus(t *testing.T, to, as *daemon, name string, epoch uint64) replproto.Status {
	t.Helper()
	s, err := openStream(t, to, as.certDir(), replproto.Hello{Role: replproto.RoleCopy, LU: name, Node: as.id}, epoch)
	if err != nil {
		t.Fatal(err)
	}
	s.conn.Close()
	return s.status
}

// ledgerScript writes versioned 4 KiB blocks through nbd and appends
// "block version" to the ledger after each acknowledged write, until the
// server goes away.
const ledgerScript = `
import os, random, struct, sys
ledger = open(os.environ["LEDGER"], "a", buffering=1)
blocks = int(os.environ["BLOCKS"])
version = 0
try:
    while True:
        version += 1
        b = random.randrange(blocks)
        page = struct.pack(">QQ", b, version) * 256
        h.pwrite(page, b * 4096)
        ledger.write("%d %d\n" % (b, version))
except Exception as e:
    print("stopped after version", version, e, file=sys.stderr)
`

// TestWriterKilledLedger: every write the writer acknowledged before it
// was killed is on the surviving copy, read through that copy's node.
func TestWriterKilledLedger(t *testing.T) { writerKilledLedger(t) }

// writerKilledLedger runs TestWriterKilledLedger on nodes started with
// the extra serve flags.
func writerKilledLedger(t *testing.T, extra ...string) {
	realclient.NbdshPython(t)
	n1, n2, _ := cluster3(t, extra...)
	n1.mustCLI("lu", "create", "l", "--size", "16M", "--copies", "2")
	dir := t.TempDir()
	script, ledger := filepath.Join(dir, "ledger.py"), filepath.Join(dir, "ledger.txt")
	if err := os.WriteFile(script, []byte(ledgerScript), 0o644); err != nil {
		t.Fatal(err)
	}
	const blocks = 1024
	writer := realclient.Nbdsh(t, n1.uri("l"), "exec(open("+strconv.Quote(script)+").read())")
	writer.Env = append(os.Environ(), "LEDGER="+ledger, "BLOCKS="+strconv.Itoa(blocks))
	var wout syncBuffer
	writer.Stdout, writer.Stderr = &wout, &wout
	if err := writer.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second)
	n1.stop(syscall.SIGKILL)
	_ = writer.Wait()

	data, err := os.ReadFile(ledger)
	if err != nil {
		t.Fatal(err)
	}
	acked := map[int]int{}
	for _, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
		var b, v int
		if _, err := fmt.Sscan(line, &b, &v); err == nil {
			acked[b] = v
		}
	}
	if len(acked) < 50 {
		t.Fatalf("only %d blocks acknowledged before the kill; the test needs more (writer said: %s)", len(acked), wout.String())
	}
	// Read every block back through n2, from n2's own copy.
	reader := realclient.Nbdsh(t, n2.uri("l"), fmt.Sprintf(`
import struct
for b in range(%d):
    page = h.pread(4096, b * 4096)
    blk, ver = struct.unpack(">QQ", page[:16])
    print(b, blk, ver)
`, blocks))
	outBytes, err := reader.CombinedOutput()
	if err != nil {
		t.Fatalf("reading through n2: %v\n%s", err, outBytes)
	}
	out := string(outBytes)
	missing := 0
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		var b, blk, v int
		if _, err := fmt.Sscan(line, &b, &blk, &v); err != nil {
			t.Fatalf("bad nbdsh line %q", line)
		}
		want, ok := acked[b]
		if !ok {
			continue
		}
		if blk != b || v < want {
			missing++
			if missing < 5 {
				t.Errorf("block %d on n2 holds (block %d, version %d); acknowledged version %d", b, blk, v, want)
			}
		}
	}
	if missing > 0 {
		t.Fatalf("%d of %d acknowledged blocks missing on the surviving copy", missing, len(acked))
	}
	t.Logf("%d blocks, %d acknowledged writes, all on n2's copy", len(acked), len(strings.Split(string(data), "\n"))-1)
}

type verifyJSON struct {
	Regions    int64    `json:"regions"`
	Copies     []string `json:"copies"`
	Equal      bool     `json:"equal"`
	Mismatches []struct {
		OffsetBytes int64             `json:"offset_bytes"`
		Hashes      map[string]string `json:"hashes"`
	} `json:"mismatches"`
	Skipped map[string]string `json:"skipped"`
}

func (d *daemon) verify(name string) (verifyJSON, int) {
	d.t.Helper()
	out, errOut, code := d.cli("lu", "verify", name, "-o", "json")
	var v verifyJSON
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		d.t.Fatalf("lu verify %s: %v\n%s%s", name, err, out, errOut)
	}
	return v, code
}

// TestAddCopyAndVerify: a copy added while writes go on is rebuilt from
// the allocated extents and ends identical; lu verify finds the copies
// equal, then finds the one region a test corrupts behind lupool's back.
func TestAddCopyAndVerify(t *testing.T) {
	alongside(t)
	needTools(t, "fio")
	n1, n2, n3 := cluster3(t)
	n1.mustCLI("lu", "create", "v", "--size", "32M", "--copies", "2")
	fio(t, "--name=fill", "--uri="+n1.uri("v"), "--rw=randwrite", "--bs=4k", "--size=16M", "--iodepth=16")
	if v, code := n2.verify("v"); code != 0 || !v.Equal || v.Regions != 32 || len(v.Copies) != 2 {
		t.Fatalf("verify of two equal copies: exit %d %+v", code, v)
	}

	wait := startFio(t, "--name=during", "--uri="+n1.uri("v"),
		"--rw=randwrite", "--bs=4k", "--iodepth=8", "--offset=8M", "--size=16M", "--time_based", "--runtime=3")
	time.Sleep(500 * time.Millisecond)
	lu := luDetail{}
	if err := json.Unmarshal([]byte(n2.mustCLI("lu", "add-copy", "v", "--node", "n3", "-o", "json")), &lu); err != nil {
		t.Fatal(err)
	}
	if lu.Copies != 3 || lu.state("n3") == "" || lu.state("n3") == "in-sync" {
		t.Fatalf("after add-copy: %+v; want 3 copies with n3 not yet in sync", lu)
	}
	if out, err := wait(); err != nil {
		t.Fatalf("writes during add-copy failed: %v\n%s", err, out)
	}
	n1.waitState("v", "n3", "in-sync", 60*time.Second)
	if a, c := volumeSHA(t, n1, "v"), volumeSHA(t, n3, "v"); a != c {
		t.Fatalf("rebuilt copy differs: n1 %s n3 %s", a, c)
	}
	if got := metricValue(n3.metrics(), "lupool_replication_received_bytes_total", `lu="v"`, `kind="resync"`); got < 8<<20 {
		t.Errorf("n3 received %v rebuild bytes, want at least the 8 MiB written before the load", got)
	}
	if v, code := n1.verify("v"); code != 0 || !v.Equal || len(v.Copies) != 3 {
		t.Fatalf("verify of three copies: exit %d %+v", code, v)
	}
	if _, _, code := n1.cli("lu", "add-copy", "v", "--node", "n3"); code != 1 {
		t.Errorf("add-copy on a node that has a copy: exit %d, want 1", code)
	}
	if _, errOut, code := n1.cli("lu", "add-copy", "v"); code != 1 || !strings.Contains(errOut, "no node without a copy") {
		t.Errorf("add-copy with every node holding a copy: exit %d %q, want 1 saying no node is left", code, errOut)
	}

	// Corrupt n2's copy behind lupool's back: verify names the region.
	f, err := os.OpenFile(filepath.Join(n2.data, "volumes", "v.lu"), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("bit rot"), 5<<20+100); err != nil {
		t.Fatal(err)
	}
	f.Close()
	v, code := n3.verify("v")
	if code != 1 || v.Equal || len(v.Mismatches) != 1 || v.Mismatches[0].OffsetBytes != 5<<20 {
		t.Fatalf("verify after corrupting n2 at 5 MiB: exit %d %+v; want one mismatch at offset %d", code, v, 5<<20)
	}
	h := v.Mismatches[0].Hashes
	if h["n1"] != h["n3"] || h["n1"] == h["n2"] {
		t.Errorf("mismatch hashes %v: want n1 == n3 != n2", h)
	}
}

// TestMemoryCopyRestartRebuilt: a memory LU's copy loses its data when its
// node restarts; it is recorded new and rebuilt from the writer instead of
// passing for in sync.
func TestMemoryCopyRestartRebuilt(t *testing.T) {
	needTools(t, "fio")
	n1, n2, _ := cluster3(t)
	n1.mustCLI("lu", "create", "m", "--size", "16M", "--copies", "2", "--kind", "memory")
	fio(t, "--name=fill", "--uri="+n1.uri("m"), "--rw=write", "--bs=64k", "--size=8M", "--verify=crc32c", "--do_verify=0")
	before := n1.showLU("m").Epoch
	n2.stop(syscall.SIGKILL)
	n2.start()
	// Lost, recorded new, rebuilt, in sync: at least two epochs later.
	deadline := time.Now().Add(60 * time.Second)
	for {
		lu := n1.showLU("m")
		if lu.state("n2") == "in-sync" && lu.Epoch >= before+2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("memory copy on n2 not rebuilt: %+v (epoch before restart %d)", lu, before)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if got := metricValue(n2.metrics(), "lupool_replication_received_bytes_total", `lu="m"`, `kind="resync"`); got < 8<<20 {
		t.Errorf("restarted memory copy received %v rebuild bytes, want >= 8 MiB", got)
	}
	if v, code := n1.verify("m"); code != 0 || !v.Equal {
		t.Fatalf("verify after the memory copy was rebuilt: exit %d %+v", code, v)
	}
	// Reads through n2 see the data written before its restart.
	fio(t, "--name=fill", "--uri="+n2.uri("m"), "--rw=write", "--bs=64k", "--size=8M", "--verify=crc32c", "--verify_only=1")
}

// TestLaggingCopyReplaced: a copy whose node stays down is replaced, after
// --replace-after, by a new copy on another node, rebuilt from the writer.
func TestLaggingCopyReplaced(t *testing.T) {
	needTools(t, "fio")
	n1, n2, n3 := cluster3(t, "--replace-after", "2s")
	n1.mustCLI("lu", "create", "p", "--size", "16M", "--copies", "2")
	if lu := n1.showLU("p"); lu.state("n2") != "in-sync" {
		t.Fatalf("placement %+v, want a copy on n2", lu)
	}
	fio(t, "--name=fill", "--uri="+n1.uri("p"), "--rw=write", "--bs=64k", "--size=8M")
	n2.stop(syscall.SIGKILL)
	fio(t, "--name=more", "--uri="+n1.uri("p"), "--rw=randwrite", "--bs=4k", "--offset=8M", "--size=2M")
	lu := n1.waitState("p", "n3", "in-sync", 60*time.Second)
	if lu.state("n2") != "" || len(lu.Replicas) != 2 {
		t.Fatalf("after replacement: %+v; want copies on n1 and n3 only", lu)
	}
	if a, c := volumeSHA(t, n1, "p"), volumeSHA(t, n3, "p"); a != c {
		t.Fatalf("replacement copy differs: n1 %s n3 %s", a, c)
	}
	if !strings.Contains(n1.logs()+n3.logs(), "replaced a copy that stayed out of sync") {
		t.Error("the leader did not log the replacement")
	}
}

// TestWriterRestartKeepsDirtyRegions: the regions a down copy lacks are on
// the writer's disk: after the writer itself is killed and restarted, the
// copy is still resynced to an identical state.
func TestWriterRestartKeepsDirtyRegions(t *testing.T) {
	needTools(t, "fio")
	n1, n2, _ := cluster3(t)
	n1.mustCLI("lu", "create", "w", "--size", "32M", "--copies", "2")
	fio(t, "--name=fill", "--uri="+n1.uri("w"), "--rw=write", "--bs=1M", "--size=16M")
	n2.stop(syscall.SIGKILL)
	fio(t, "--name=outage", "--uri="+n1.uri("w"), "--rw=randwrite", "--bs=4k", "--offset=4M", "--size=4M")
	if lu := n1.showLU("w"); lu.state("n2") != "out-of-sync" {
		t.Fatalf("after n2 died: %+v", lu)
	}
	n1.stop(syscall.SIGKILL)
	n1.start()
	n2.start()
	n1.waitState("w", "n2", "in-sync", 60*time.Second)
	if a, b := volumeSHA(t, n1, "w"), volumeSHA(t, n2, "w"); a != b {
		t.Fatalf("copies differ after a writer restart and resync: n1 %s n2 %s", a, b)
	}
	// After the restart only whole recorded regions are known: the resync
	// sends the 4 MiB range's regions, not the whole LU.
	sent := metricValue(n1.metrics(), "lupool_replication_sent_bytes_total", `lu="w"`, `copy="n2"`, `kind="resync"`)
	if sent < 4<<20 || sent > 6<<20 {
		t.Errorf("resync after a writer restart sent %v bytes; want the 4 MiB of recorded regions (at most one more region each side)", sent)
	}
}

// TestDeleteRefusedWhileAttachedElsewhere: a client attached through any
// node (here one that holds no copy) keeps an LU from being deleted.
func TestDeleteRefusedWhileAttachedElsewhere(t *testing.T) {
	n1, _, n3 := cluster3(t)
	n1.mustCLI("lu", "create", "busy", "--size", "4M", "--copies", "2")
	client := realclient.Nbdsh(t, n3.uri("busy"), "import sys\nh.pwrite(b'x' * 4096, 0)\nprint('attached', flush=True)\nsys.stdin.read()")
	stdin, err := client.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	var out syncBuffer
	client.Stdout, client.Stderr = &out, &out
	if err := client.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { stdin.Close(); _ = client.Wait() }()
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(out.String(), "attached") {
		if time.Now().After(deadline) {
			t.Fatalf("nbdsh did not attach through n3: %s", out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	_, errOut, code := n1.cli("lu", "delete", "busy")
	if code != 1 || !strings.Contains(errOut, "1 on n3") {
		t.Fatalf("delete with a client on n3: exit %d %q; want 1 naming n3", code, errOut)
	}
	if len(n1.listLUs()) != 1 {
		t.Fatal("refused delete removed the LU")
	}
	n1.mustCLI("lu", "delete", "busy", "--force")
}
