package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lupool/lupool/internal/realclient"
)

// attachLedgerRun writes numbered blocks through a `lupool attach`
// endpoint on the LU "a" (written by n2, copy elsewhere) while fault hits
// n2, the node the endpoint uses, and returns the acknowledged versions.
// The client must see no error: the endpoint replays what n2 never
// answered on another node, which forwards it to the new writer.
func attachLedgerRun(t *testing.T, n2 *daemon, api *daemon, extra []string, fault func()) (map[int]int, *attachProc) {
	t.Helper()
	waitExported(t, n2, "a")
	dir := t.TempDir()
	sock := filepath.Join(dir, "a.sock")
	a := startAttach(t, api, "a", "unix:"+sock, append([]string{"--prefer", "n2"}, extra...)...)
	stopFile := filepath.Join(dir, "stop")
	w := startClientURI(t, a.uri(), "the endpoint", failoverWriterScript, filepath.Join(dir, "ledger"),
		"BLOCKS=1024", "STOPFILE="+stopFile)
	time.Sleep(2 * time.Second)
	faulted := time.Now()
	fault()
	time.Sleep(8 * time.Second)
	if err := os.WriteFile(stopFile, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	w.wait()
	wl := readLedger(t, w.log)
	acked := ackedVersions(t, wl, "the endpoint's client", faulted, true)
	gap, from := longestGap(wl, "W")
	n, nodes := a.reconnects()
	t.Logf("writes through the endpoint paused %v (from %v after the fault); %d acknowledged; %d reconnects to %v, %d requests replayed",
		gap.Round(time.Millisecond), from.Sub(faulted).Round(time.Millisecond), len(wl), n, nodes, a.replayed())
	if n < 1 || nodes[0] == "n2" {
		t.Errorf("the endpoint did not move off n2: %d reconnects to %v", n, nodes)
	}
	if !strings.Contains(a.log.String(), "node=n2") {
		t.Errorf("the endpoint did not start on n2, the node it prefers:\n%s", a.log.String())
	}
	return acked, a
}

// waitExported waits until d serves LU name over NBD (a create returns
// once the primary applied it; each node exports it when it follows).
func waitExported(t *testing.T, d *daemon, name string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		var err error
		if d.netns != "" {
			// NBD with TLS there: the writer's copy-state series appear
			// when its mirror is up, just before the export.
			if !strings.Contains(d.metrics(), `lupool_replication_copy_state{copy=`) {
				err = fmt.Errorf("no mirror of %s yet", name)
			} else {
				time.Sleep(200 * time.Millisecond)
			}
		} else {
			err = exec.Command("nbdinfo", "--size", d.uri(name)).Run()
		}
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s does not export %s after 30 s: %v", d.id, name, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestAttachRidesWriterFailover: the endpoint uses the LU's writer; kill
// -9 it. The endpoint moves to another node, the primary promotes the
// copy, and the client sees no error; every acknowledged block reads back
// from both surviving nodes.
func TestAttachRidesWriterFailover(t *testing.T) {
	realclient.NbdshPython(t)
	n1, n2, n3 := cluster3(t)
	n2.mustCLI("lu", "create", "a", "--size", "16M", "--copies", "2")
	acked, _ := attachLedgerRun(t, n2, n1, nil, func() { n2.stop(syscall.SIGKILL) })
	if w := n1.showLU("a").Writer; w == "n2" {
		t.Fatalf("no failover: the writer is still n2")
	}
	checkBlocks(t, n1, "a", 1024, acked)
	checkBlocks(t, n3, "a", 1024, acked)
}

// TestAttachLeavesMinority: three hosts in network namespaces; the
// endpoint (in the test's own namespace, which reaches every host) uses
// n2, the LU's writer, and n2's host is cut off from the other two. n2
// sends its clients away after --minority-disconnect; the endpoint moves
// to the majority, which has failed the LU over; the client sees no error.
func TestAttachLeavesMinority(t *testing.T) {
	realclient.NbdshPython(t)
	lab := newNetLab(t, 3)
	// NBD beyond loopback with TLS, on each node's cluster certificate,
	// which the endpoint verifies.
	n1, n2, n3 := lab.cluster3("--tls", "required")
	n2.mustCLI("lu", "create", "a", "--size", "16M", "--copies", "2")
	acked, a := attachLedgerRun(t, n2, n1, []string{"--ca-file", n1.caFile()}, func() { lab.isolate(1) })
	if _, nodes := a.reconnects(); len(nodes) > 0 && nodes[0] == "n2" {
		t.Errorf("the endpoint went back to the cut-off node: %v", nodes)
	}
	checkBlocks(t, n1, "a", 1024, acked)
	checkBlocks(t, n3, "a", 1024, acked)
	lab.heal(1)
	n1.waitState("a", "n2", "in-sync", 60*time.Second)
	checkBlocks(t, n2, "a", 1024, acked)
}
