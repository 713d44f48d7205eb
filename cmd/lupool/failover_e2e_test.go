package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lupool/lupool/internal/realclient"
)

// failoverWriterScript writes versioned 4 KiB blocks until STOPFILE exists
// and appends "W <unix ns> <block> <version>" to the ledger after each
// acknowledged write; an error is recorded as "E <unix ns> <message>" and
// ends the run (a client that saw an error is what the test must not see).
const failoverWriterScript = `
import os, random, struct, time
ledger = open(os.environ["LEDGER"], "a", buffering=1)
blocks = int(os.environ["BLOCKS"])
stop = os.environ["STOPFILE"]
version = 0
while not os.path.exists(stop):
    version += 1
    b = int(os.environ.get("BASE", "0")) + random.randrange(blocks)
    try:
        h.pwrite(struct.pack(">QQ", b, version) * 256, b * 4096)
    except Exception as e:
        ledger.write("E %d %s\n" % (time.time_ns(), str(e).replace("\n", " ")))
        break
    ledger.write("W %d %d %d\n" % (time.time_ns(), b, version))
`

// failoverReaderScript reads random blocks below BLOCKS until STOPFILE
// exists and appends "R <done unix ns> <issued unix ns> <block> <version>"
// for each read, or "E <unix ns> <message>" for an error (which ends it).
const failoverReaderScript = `
import os, random, struct, time
out = open(os.environ["READS"], "a", buffering=1 << 16)
blocks = int(os.environ["BLOCKS"])
stop = os.environ["STOPFILE"]
while not os.path.exists(stop):
    b = random.randrange(blocks)
    issued = time.time_ns()
    try:
        page = h.pread(4096, b * 4096)
    except Exception as e:
        out.write("E %d %s\n" % (time.time_ns(), str(e).replace("\n", " ")))
        break
    blk, ver = struct.unpack(">QQ", page[:16])
    if (blk, ver) != (0, 0) and blk != b:
        ver = -1
    out.write("R %d %d %d %d\n" % (time.time_ns(), issued, b, ver))
out.flush()
`

// ledgerLine is one line of a writer or reader log.
type ledgerLine struct {
	kind   string
	at     time.Time
	fields []string
}

func readLedger(t *testing.T, path string) []ledgerLine {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out []ledgerLine
	for _, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		ns, err := strconv.ParseInt(f[1], 10, 64)
		if err != nil {
			t.Fatalf("bad ledger line %q", line)
		}
		out = append(out, ledgerLine{kind: f[0], at: time.Unix(0, ns), fields: f[2:]})
	}
	return out
}

// longestGap returns the longest time between two consecutive lines of
// kind, and when it began.
func longestGap(lines []ledgerLine, kind string) (gap time.Duration, from time.Time) {
	var prev time.Time
	for _, l := range lines {
		if l.kind != kind {
			continue
		}
		if !prev.IsZero() && l.at.Sub(prev) > gap {
			gap, from = l.at.Sub(prev), prev
		}
		prev = l.at
	}
	return gap, from
}

// staleReads returns the reads in rl that returned a version older than
// one acknowledged to the writer before the read was issued.
func staleReads(rl, wl []ledgerLine) []string {
	type ack struct {
		at      time.Time
		version int
	}
	acks := map[int][]ack{}
	for _, l := range wl {
		if l.kind == "W" {
			b, _ := strconv.Atoi(l.fields[0])
			v, _ := strconv.Atoi(l.fields[1])
			acks[b] = append(acks[b], ack{l.at, v})
		}
	}
	var stale []string
	for _, l := range rl {
		if l.kind != "R" {
			continue
		}
		issuedNs, _ := strconv.ParseInt(l.fields[0], 10, 64)
		b, _ := strconv.Atoi(l.fields[1])
		v, _ := strconv.Atoi(l.fields[2])
		issued := time.Unix(0, issuedNs)
		want := 0
		for _, a := range acks[b] {
			if a.at.Before(issued) {
				want = max(want, a.version)
			}
		}
		if v < want {
			stale = append(stale, fmt.Sprintf("block %d read as version %d at %v, version %d acknowledged before", b, v, issued.Format("15:04:05.000"), want))
		}
	}
	return stale
}

// tlsURI is an nbds:// URI for LU name on d (a node started with --tls,
// on its cluster certificate): libnbd verifies it against the cluster CA.
func (d *daemon) tlsURI(t *testing.T, name string) string {
	t.Helper()
	dir := t.TempDir()
	pem, err := os.ReadFile(d.caFile())
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "ca-cert.pem"), pem, 0o644); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("nbds://%s/%s?tls-certificates=%s", d.nbd, name, dir)
}

// checkBlocks reads every block through d and reports acknowledged
// versions it lacks.
func checkBlocks(t *testing.T, d *daemon, name string, blocks int, acked map[int]int) {
	t.Helper()
	checkBlocksFrom(t, d, name, 0, blocks, acked)
}

// checkBlocksFrom is checkBlocks for the blocks base..base+count.
func checkBlocksFrom(t *testing.T, d *daemon, name string, base, count int, acked map[int]int) {
	t.Helper()
	script := fmt.Sprintf(`
import struct
for b in range(%d, %d):
    blk, ver = struct.unpack(">QQ", h.pread(4096, b * 4096)[:16])
    print(b, blk, ver)
`, base, base+count)
	reader := realclient.Nbdsh(t, d.uri(name), script)
	if slices.Contains(d.extra, "--tls") {
		// TLS with the cluster CA from a file: nbdsh -u refuses URIs
		// that name local files, so connect from the script.
		connect := fmt.Sprintf("h.set_uri_allow_local_file(True)\nh.connect_uri(%q)\n", d.tlsURI(t, name))
		reader = exec.Command(realclient.NbdshPython(t), "-m", "nbd", "-c", connect+script)
	}
	out, err := reader.CombinedOutput()
	if err != nil {
		t.Fatalf("reading %s through %s: %v\n%s", name, d.id, err, out)
	}
	missing := 0
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		var b, blk, v int
		if _, err := fmt.Sscan(line, &b, &blk, &v); err != nil {
			t.Fatalf("bad nbdsh line %q", line)
		}
		if want, ok := acked[b]; ok && (blk != b || v < want) {
			missing++
			if missing <= 5 {
				t.Errorf("block %d through %s holds (block %d, version %d); acknowledged version %d", b, d.id, blk, v, want)
			}
		}
	}
	if missing > 0 {
		t.Fatalf("%d of %d acknowledged blocks missing through %s", missing, len(acked), d.id)
	}
}

// TestWriterFailover: three nodes, an LU with two copies written by n2.
// A client writes numbered blocks and another reads through the node
// holding the other copy; kill -9 the writer. The primary makes the
// surviving copy the writer; neither client sees an error, writes resume
// within 3 s, reads never stop for more than 1 s, no read goes back in
// time, and every acknowledged write reads back from every node. The old
// writer then restarts, comes back as a copy, is compared by region hashes
// and resynced, and `lu verify` finds the copies equal.
// LUPOOL_FAILOVER_RUNS repeats the kill (default 1).
func TestWriterFailover(t *testing.T) {
	realclient.NbdshPython(t)
	runs := 1
	if v := os.Getenv("LUPOOL_FAILOVER_RUNS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("LUPOOL_FAILOVER_RUNS=%q: want a count", v)
		}
		runs = n
	}
	var writeStalls, readStalls []time.Duration
	for run := 1; run <= runs; run++ {
		ws, rs := failoverRun(t, run, "kill")
		writeStalls, readStalls = append(writeStalls, ws), append(readStalls, rs)
	}
	slices.Sort(writeStalls)
	slices.Sort(readStalls)
	t.Logf("%d runs: write stall median %v max %v; read stall median %v max %v", runs,
		writeStalls[len(writeStalls)/2], writeStalls[len(writeStalls)-1], readStalls[len(readStalls)/2], readStalls[len(readStalls)-1])
}

// clientRun is one nbdsh client of a failover test.
type clientRun struct {
	wait func()
	log  string
}

func startClient(t *testing.T, d *daemon, lu, script, log string, env ...string) clientRun {
	t.Helper()
	return startClientURI(t, d.uri(lu), d.id, script, log, env...)
}

// startClientURI is startClient for any NBD URI (who names it in errors).
func startClientURI(t *testing.T, uri, who, script, log string, env ...string) clientRun {
	t.Helper()
	cmd := realclient.Nbdsh(t, uri, script)
	cmd.Env = append(append(os.Environ(), "LEDGER="+log, "READS="+log), env...)
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	return clientRun{log: log, wait: func() {
		if err := cmd.Wait(); err != nil {
			t.Errorf("nbdsh through %s: %v\n%s", who, err, out.String())
		}
	}}
}

// ackedVersions returns the highest acknowledged version of each block in
// a writer's ledger, and reports its errors (want none when strict).
func ackedVersions(t *testing.T, wl []ledgerLine, who string, since time.Time, strict bool) map[int]int {
	t.Helper()
	acked := map[int]int{}
	for _, l := range wl {
		switch l.kind {
		case "E":
			if strict {
				t.Errorf("%s got a write error %v after the fault: %s", who, l.at.Sub(since).Round(time.Millisecond), strings.Join(l.fields, " "))
			} else {
				t.Logf("%s got a write error %v after the fault: %s", who, l.at.Sub(since).Round(time.Millisecond), strings.Join(l.fields, " "))
			}
		case "W":
			b, _ := strconv.Atoi(l.fields[0])
			v, _ := strconv.Atoi(l.fields[1])
			acked[b] = max(acked[b], v)
		}
	}
	return acked
}

// failoverRun: mode "kill" kills the writer n2 with SIGKILL and starts it
// again after the failover; mode "stop" freezes it with SIGSTOP for 10 s
// while its own clients go on sending, then lets it go on (SIGCONT); mode
// "partition" runs the nodes in network namespaces and cuts n2 off from
// the other two for 10 s (its clients still reach it). A frozen or cut-off
// writer must be fenced, acknowledge nothing the new writer lacks and
// serve no stale read.
func failoverRun(t *testing.T, run int, mode string) (writeStall, readStall time.Duration) {
	var n1, n2, n3 *daemon
	var lab *netLab
	if mode == "partition" {
		lab = newNetLab(t, 3)
		n1, n2, n3 = lab.cluster3()
	} else {
		n1, n2, n3 = cluster3(t)
	}
	nodes := map[string]*daemon{"n1": n1, "n2": n2, "n3": n3}
	n2.mustCLI("lu", "create", "f", "--size", "16M", "--copies", "2")
	rec := n1.showLU("f")
	if rec.Writer != "n2" {
		t.Fatalf("LU created through n2 is written by %s", rec.Writer)
	}
	var copyID string
	for _, r := range rec.Replicas {
		if r.Node != "n2" {
			copyID = r.Node
		}
	}
	other := map[string]string{"n1": "n3", "n3": "n1"}[copyID]
	client := nodes[copyID]
	events := n1.startWatch("--kind", "NodeDead,NodeBack,WriterMoved,QuorumLost,QuorumRegained", "--tail", "0")

	dir := t.TempDir()
	if os.Getenv("LUPOOL_KEEP_LEDGERS") != "" { // for a look at the timelines
		var err error
		if dir, err = os.MkdirTemp("", "failover-"+mode+"-"); err != nil {
			t.Fatal(err)
		}
		t.Logf("ledgers in %s", dir)
	}
	const blocks = 1024
	stopFile := filepath.Join(dir, "stop")
	env := []string{"BLOCKS=" + strconv.Itoa(blocks), "STOPFILE=" + stopFile}
	w := startClient(t, client, "f", failoverWriterScript, filepath.Join(dir, "ledger"), env...)
	r := startClient(t, client, "f", failoverReaderScript, filepath.Join(dir, "reads"), env...)
	var oldW, oldR clientRun
	if mode != "kill" {
		// Clients of the old writer itself: one writes blocks of its own
		// range, one reads the other client's blocks.
		oldW = startClient(t, n2, "f", failoverWriterScript, filepath.Join(dir, "ledger-old"), append(env, "BASE=1024")...)
		oldR = startClient(t, n2, "f", failoverReaderScript, filepath.Join(dir, "reads-old"), env...)
	}
	time.Sleep(3 * time.Second)
	sentBefore := metricValue(client.metrics(), "lupool_replication_sent_bytes_total", `lu="f"`, `copy="n2"`, `kind="resync"`)
	faulted := time.Now()
	switch mode {
	case "kill":
		n2.stop(syscall.SIGKILL)
	case "stop":
		if err := n2.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		time.Sleep(10 * time.Second)
		if err := n2.cmd.Process.Signal(syscall.SIGCONT); err != nil {
			t.Fatal(err)
		}
	case "partition":
		lab.isolate(1)
		time.Sleep(8 * time.Second)
		// Cut off for longer than --minority-disconnect (5 s): n2 sends
		// its clients elsewhere.
		if g := metricValue(n2.metrics(), "lupool_minority"); g != 1 {
			t.Errorf("run %d: lupool_minority on the cut-off node is %v 8 s into the partition, want 1", run, g)
		}
		time.Sleep(2 * time.Second)
		lab.heal(1)
	}
	time.Sleep(6 * time.Second)
	if err := os.WriteFile(stopFile, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	stopped := time.Now()
	w.wait()
	r.wait()

	wl, rl := readLedger(t, w.log), readLedger(t, r.log)
	acked := ackedVersions(t, wl, "the client of "+copyID, faulted, true)
	// What the old writer missed: the distinct blocks written after the
	// fault (its resync should send about that much, not the whole LU).
	since := map[string]bool{}
	for _, l := range wl {
		if l.kind == "W" && !l.at.Before(faulted) {
			since[l.fields[0]] = true
		}
	}
	for _, l := range rl {
		if l.kind == "E" {
			t.Errorf("run %d: the reading client got an error %v after the fault: %s", run, l.at.Sub(faulted).Round(time.Millisecond), strings.Join(l.fields, " "))
		}
	}
	for _, st := range staleReads(rl, wl) {
		t.Errorf("run %d: stale read through %s: %s", run, copyID, st)
	}
	writeStall, wfrom := longestGap(wl, "W")
	readStall, rfrom := longestGap(rl, "R")
	lastWrite := wl[len(wl)-1].at
	t.Logf("run %d (%s): writes stalled %v (from %v after the fault), reads %v (from %v); %d writes acknowledged, the last %v after the fault",
		run, mode, writeStall.Round(time.Millisecond), wfrom.Sub(faulted).Round(time.Millisecond), readStall.Round(time.Millisecond),
		rfrom.Sub(faulted).Round(time.Millisecond), len(wl), lastWrite.Sub(faulted).Round(time.Millisecond))
	if writeStall > 3*time.Second {
		t.Errorf("run %d: writes stalled %v, want at most 3 s", run, writeStall)
	}
	if readStall > time.Second {
		t.Errorf("run %d: reads stalled %v, want at most 1 s", run, readStall)
	}
	if stopped.Sub(lastWrite) > time.Second {
		t.Errorf("run %d: the last write was acknowledged %v before the client was told to stop, want writes to go on", run, stopped.Sub(lastWrite))
	}
	after := n1.showLU("f")
	if after.Writer != copyID || after.Epoch <= rec.Epoch {
		t.Fatalf("run %d: after the failover the LU is %+v, want writer %s", run, after, copyID)
	}
	var live []struct {
		ID       string `json:"id"`
		Liveness string `json:"liveness"`
	}
	if err := json.Unmarshal([]byte(client.mustCLI("node", "list", "-o", "json")), &live); err != nil {
		t.Fatal(err)
	}
	for _, n := range live {
		want := "alive"
		if n.ID == "n2" && mode == "kill" {
			want = "dead"
		}
		if n.Liveness != want {
			t.Errorf("run %d: node list through %s shows %s %q, want %q", run, copyID, n.ID, n.Liveness, want)
		}
	}
	total := blocks
	if mode != "kill" {
		oldW.wait()
		oldR.wait()
		owl, orl := readLedger(t, oldW.log), readLedger(t, oldR.log)
		if mode == "partition" {
			// Both clients of the cut-off node were sent away (ESHUTDOWN
			// or a closed connection) once it had been cut off for
			// --minority-disconnect, not before.
			for _, l := range append(append([]ledgerLine(nil), owl...), orl...) {
				if l.kind != "E" {
					continue
				}
				if at := l.at.Sub(faulted); at < 4500*time.Millisecond || at > 9*time.Second {
					t.Errorf("run %d: a client of the cut-off node was sent away %v after the partition began, want 5–8 s", run, at.Round(time.Millisecond))
				} else {
					t.Logf("run %d: a client of the cut-off node was sent away %v after the partition began: %s", run, at.Round(time.Millisecond), strings.Join(l.fields, " "))
				}
			}
		}
		for b, v := range ackedVersions(t, owl, "the client of the old writer", faulted, mode == "stop") {
			acked[b] = v
		}
		for _, st := range staleReads(orl, wl) {
			t.Errorf("run %d: stale read through the old writer: %s", run, st)
		}
		t.Logf("run %d: the old writer's clients: %d writes and %d reads answered", run, len(owl), len(orl))
		total = 2 * blocks
	}
	checkBlocks(t, client, "f", total, acked)
	checkBlocks(t, nodes[other], "f", total, acked)
	events.waitFor(t, "WriterMoved", 10*time.Second, func(ev eventJSON) bool {
		return ev.Kind == "WriterMoved" && ev.LU == "f" && ev.Node == copyID && ev.Details["from"] == "n2" && ev.Details["reason"] == "failover"
	})
	if mode == "kill" {
		events.waitFor(t, "NodeDead", 10*time.Second, func(ev eventJSON) bool { return ev.Kind == "NodeDead" && ev.Node == "n2" })
	}
	if mode == "partition" {
		for _, kind := range []string{"QuorumLost", "QuorumRegained"} {
			events.waitFor(t, kind, 20*time.Second, func(ev eventJSON) bool { return ev.Kind == kind && ev.Node == "n2" })
		}
	}

	// The old writer comes back as a copy and is brought in line.
	if mode == "kill" {
		n2.start()
	}
	n1.waitState("f", "n2", "in-sync", 60*time.Second)
	if mode == "kill" {
		events.waitFor(t, "NodeBack", 20*time.Second, func(ev eventJSON) bool { return ev.Kind == "NodeBack" && ev.Node == "n2" })
	}
	sent := metricValue(client.metrics(), "lupool_replication_sent_bytes_total", `lu="f"`, `copy="n2"`, `kind="resync"`) - sentBefore
	if out, errOut, code := n1.cli("lu", "verify", "f"); code != 0 {
		t.Fatalf("run %d: copies differ after the old writer rejoined (exit %d):\n%s%s", run, code, out, errOut)
	}
	checkBlocks(t, n2, "f", total, acked)
	t.Logf("run %d: old writer resynced with %.0f bytes sent; %d bytes (distinct 4 KiB blocks) written through the other nodes after the fault, LU 16 MiB, %d distinct blocks written in all",
		run, max(sent, 0), len(since)*4096, len(acked))
	return writeStall, readStall
}

// TestWriterFrozenFenced: the writer is frozen (SIGSTOP) for 10 s, the
// primary fails it over, and it goes on (SIGCONT) with its own clients'
// requests in flight: it acknowledges nothing the new writer lacks, serves
// no stale read, its clients get no error (what it can no longer do as the
// writer runs again on the new one), and it rejoins as a copy equal to the
// new writer.
func TestWriterFrozenFenced(t *testing.T) {
	realclient.NbdshPython(t)
	failoverRun(t, 1, "stop")
}

// TestPartitionedWriterFenced: three hosts in network namespaces; the
// writer's host is cut off from the other two for 10 s. The majority fails
// the LU over; the cut-off writer acknowledges nothing the new writer
// lacks and serves no stale read to its own clients; after the partition
// heals it rejoins as a copy equal to the new writer.
func TestPartitionedWriterFenced(t *testing.T) {
	realclient.NbdshPython(t)
	failoverRun(t, 1, "partition")
}

// TestWitnessFailover: two storage nodes and a witness (metadata only).
// The LU's copies go on the two storage nodes, never the witness; kill -9
// the writer, which also leads the metadata: the survivor and the witness
// elect a primary, which fails the writer over to the survivor. A client
// of the survivor sees no error and every acknowledged write reads back.
func TestWitnessFailover(t *testing.T) {
	realclient.NbdshPython(t)
	s1 := newDaemon(t, "s1")
	s1.start()
	s2 := newJoiner(t, "s2", s1)
	s2.start()
	w := newJoiner(t, "w", s1, "--witness")
	w.start()
	s1.mustCLI("lu", "create", "wf", "--size", "8M", "--copies", "2")
	rec := s2.showLU("wf")
	if rec.Writer != "s1" || rec.state("s2") != "in-sync" || rec.state("w") != "" {
		t.Fatalf("placement %+v: want the writer on s1 and the copy on s2, none on the witness", rec)
	}
	if out := w.mustCLI("node", "list"); !strings.Contains(out, "(witness)") {
		t.Errorf("node list does not show the witness:\n%s", out)
	}
	if _, _, code := s1.cli("lu", "create", "three", "--size", "1M", "--copies", "3"); code == 0 {
		t.Error("a 3-copy LU was placed with two storage nodes and a witness")
	}
	dir := t.TempDir()
	stopFile := filepath.Join(dir, "stop")
	env := []string{"BLOCKS=512", "STOPFILE=" + stopFile}
	wr := startClient(t, s2, "wf", failoverWriterScript, filepath.Join(dir, "ledger"), env...)
	time.Sleep(2 * time.Second)
	s1.stop(syscall.SIGKILL)
	killed := time.Now()
	deadline := time.Now().Add(30 * time.Second)
	for s2.showLU("wf").Writer != "s2" {
		if time.Now().After(deadline) {
			t.Fatalf("no failover to s2 within 30 s: %+v", s2.showLU("wf"))
		}
		time.Sleep(200 * time.Millisecond)
	}
	failedOver := time.Since(killed)
	time.Sleep(2 * time.Second)
	if err := os.WriteFile(stopFile, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	wr.wait()
	wl := readLedger(t, wr.log)
	acked := ackedVersions(t, wl, "the client of s2", killed, true)
	gap, _ := longestGap(wl, "W")
	checkBlocks(t, s2, "wf", 512, acked)
	t.Logf("writer and primary killed: new writer recorded %v later, writes stalled %v, %d writes acknowledged",
		failedOver.Round(time.Millisecond), gap.Round(time.Millisecond), len(wl))
	// s1 comes back as the copy and is resynced.
	s1.start()
	s2.waitState("wf", "s1", "in-sync", 60*time.Second)
	if out, errOut, code := s2.cli("lu", "verify", "wf"); code != 0 {
		t.Fatalf("copies differ after s1 rejoined (exit %d):\n%s%s", code, out, errOut)
	}
}
