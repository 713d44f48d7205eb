package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lupool/lupool/internal/realclient"
)

// TestSnapshotUnderLoadThenRollback: an LU with two copies on two nodes is
// snapshotted while fio writes to it; the snapshot's own read-only export,
// copied out with nbdcopy right away (the load still going) on both nodes,
// reads the same; both copies of the LU and of the snapshot verify equal;
// more writes change the LU; rollback is refused while a client is
// attached, then forced: the LU reads, on both nodes, exactly what the
// snapshot export read; bad arguments change nothing and say what to fix;
// deleting the snapshot merges it away on both nodes and leaves the LU's
// content as it was.
func TestSnapshotUnderLoadThenRollback(t *testing.T) {
	alongside(t)
	needTools(t, "fio", "nbdcopy")
	n1 := newDaemon(t, "n1")
	n1.start()
	n2 := newJoiner(t, "n2", n1)
	n2.start()
	n1.mustCLI("lu", "create", "v", "--size", "16M", "--copies", "2")
	fio(t, "--name=fill", "--uri="+n1.uri("v"), "--rw=write", "--bs=1M", "--size=16M", "--iodepth=4")

	load := startFio(t, "--name=load", "--uri="+n1.uri("v"), "--rw=randwrite", "--bs=4k", "--iodepth=8",
		"--size=16M", "--time_based", "--runtime=3", "--randrepeat=0")
	time.Sleep(time.Second)
	started := time.Now()
	var snap luDetail
	if err := json.Unmarshal([]byte(n1.mustCLI("lu", "snapshot", "v", "s1", "-o", "json")), &snap); err != nil {
		t.Fatal(err)
	}
	t.Logf("lu snapshot under load took %v", time.Since(started))
	if snap.Name != "v@s1" || len(snap.Replicas) != 2 {
		t.Fatalf("snapshot record %+v; want v@s1 with both copies", snap)
	}
	atSnap := nbdRead(t, n1.uri("v@s1")) // while the load goes on
	onN2 := nbdRead(t, n2.uri("v@s1"))
	want := fileSHA(t, atSnap)
	if got := fileSHA(t, onN2); got != want {
		t.Fatalf("snapshot export reads %s on n2, %s on n1", got, want)
	}
	if out, err := load(); err != nil {
		t.Fatalf("writes during the snapshot failed: %v\n%s", err, out)
	}
	if got := fileSHA(t, nbdRead(t, n1.uri("v@s1"))); got != want {
		t.Fatal("the snapshot changed while the LU was written")
	}
	if got := fileSHA(t, nbdRead(t, n1.uri("v"))); got == want {
		t.Fatal("the LU reads the snapshot's content after 2 s of writes: the load did not reach it")
	}
	for _, name := range []string{"v", "v@s1"} {
		if v, code := n1.verify(name); code != 0 || !v.Equal || len(v.Copies) != 2 {
			t.Fatalf("verify %s after the snapshot: exit %d %+v", name, code, v)
		}
	}
	if _, errOut, code := n1.cli("lu", "show", "v@s1"); code != 0 {
		t.Fatalf("lu show v@s1: %s", errOut)
	}
	if out, err := realclient.Nbdsh(t, n2.uri("v@s1"), "print(h.is_read_only())").CombinedOutput(); err != nil || strings.TrimSpace(string(out)) != "True" {
		t.Fatalf("snapshot export is not read-only: %v %q", err, out)
	}

	// Bad arguments: each says what to fix and changes nothing.
	for _, bad := range []struct {
		args []string
		says string
	}{
		{[]string{"lu", "snapshot", "v", "s1"}, "pick another name"},
		{[]string{"lu", "snapshot", "v", "a/b"}, "snapshot name"},
		{[]string{"lu", "snapshot", "nope", "s2"}, "no LU named"},
		{[]string{"lu", "snapshot", "v@s1", "s2"}, "snapshot or roll back v instead"},
		{[]string{"lu", "rollback", "v", "nope"}, "no snapshot nope"},
		{[]string{"snapshot", "delete", "v", "nope"}, "no snapshot nope"},
		{[]string{"lu", "delete", "v"}, "delete them first"},
		{[]string{"lu", "resize", "v", "--size", "32M"}, "delete them first"},
	} {
		if _, errOut, code := n2.cli(bad.args...); code == 0 || !strings.Contains(errOut, bad.says) {
			t.Errorf("lupool %s: exit %d %q; want a failure saying %q", strings.Join(bad.args, " "), code, errOut, bad.says)
		}
	}
	var list []luJSON
	if err := json.Unmarshal([]byte(n2.mustCLI("snapshot", "list", "v", "-o", "json")), &list); err != nil {
		t.Fatal(err)
	}
	if len(list) != 1 || list[0].Name != "v@s1" {
		t.Fatalf("snapshot list after the refused commands: %+v", list)
	}

	// A client attached: rollback refused without --force.
	attached := realclient.Nbdsh(t, n1.uri("v"), "import time; time.sleep(30)")
	if err := attached.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = attached.Process.Kill(); _ = attached.Wait() }()
	deadline := time.Now().Add(10 * time.Second)
	for clientsOf(n1, "v") == 0 && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	if _, errOut, code := n1.cli("lu", "rollback", "v", "s1"); code != 1 || !strings.Contains(errOut, "--force") {
		t.Fatalf("rollback with a client attached: exit %d %q; want refused, naming --force", code, errOut)
	}
	n1.mustCLI("lu", "rollback", "v", "s1", "--force")
	_ = attached.Process.Kill()
	_ = attached.Wait()
	for _, d := range []*daemon{n1, n2} {
		if got := fileSHA(t, nbdRead(t, d.uri("v"))); got != want {
			t.Fatalf("after rollback the LU reads %s through %s, the snapshot read %s", got, d.id, want)
		}
	}
	if v, code := n2.verify("v"); code != 0 || !v.Equal || len(v.Copies) != 2 {
		t.Fatalf("verify after rollback: exit %d %+v", code, v)
	}

	// Delete: merged away on both nodes, the LU's content unchanged.
	fio(t, "--name=after", "--uri="+n1.uri("v"), "--rw=randwrite", "--bs=4k", "--size=4M", "--offset=8M")
	var shown struct {
		AllocatedBytes int64 `json:"allocated_bytes"`
	}
	if err := json.Unmarshal([]byte(n1.mustCLI("lu", "show", "v@s1", "-o", "json")), &shown); err != nil || shown.AllocatedBytes < 16<<20 {
		t.Fatalf("lu show v@s1: %v, %d bytes allocated; the snapshot holds the 16 MiB written before it", err, shown.AllocatedBytes)
	}
	before := fileSHA(t, nbdRead(t, n1.uri("v")))
	n2.mustCLI("snapshot", "delete", "v", "s1")
	for _, d := range []*daemon{n1, n2} {
		path := filepath.Join(d.data, "volumes", "v+s1.lu")
		for deadline := time.Now().Add(20 * time.Second); ; {
			if _, err := os.Stat(path); os.IsNotExist(err) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s still holds %s after the snapshot was deleted", d.id, path)
			}
			time.Sleep(100 * time.Millisecond)
		}
		if got := fileSHA(t, nbdRead(t, d.uri("v"))); got != before {
			t.Fatalf("deleting the snapshot changed the LU as read through %s", d.id)
		}
	}
	if v, code := n1.verify("v"); code != 0 || !v.Equal {
		t.Fatalf("verify after the snapshot was deleted: exit %d %+v", code, v)
	}

	// An LU written by n2, not the metadata leader (n1): the request
	// asked of n1 goes to n2, which freezes both copies and has the
	// leader record the snapshot under its own certificate's name.
	if leader := leaderOf(t, n1, n2); leader != n1 {
		t.Fatalf("the metadata leader is %s; this part needs n1 to lead", leader.id)
	}
	n2.mustCLI("lu", "create", "w", "--size", "4M", "--copies", "2")
	if lu := n1.showLU("w"); lu.Writer != "n2" {
		t.Fatalf("w is written by %s; want n2, where it was created", lu.Writer)
	}
	first, second := make([]byte, 1<<20), make([]byte, 1<<20)
	for i := range first {
		first[i], second[i] = byte(i*7+1), byte(i*13+5)
	}
	pwriteRegions(t, n2.uri("w"), first, []int64{0, 2 << 20})
	wantW := fileSHA(t, nbdRead(t, n2.uri("w")))
	if err := json.Unmarshal([]byte(n1.mustCLI("lu", "snapshot", "w", "s1", "-o", "json")), &snap); err != nil {
		t.Fatal(err)
	}
	if snap.Name != "w@s1" || snap.Writer != "n2" || len(snap.Replicas) != 2 {
		t.Fatalf("snapshot of w through n1: %+v; want w@s1 written by n2 with both copies", snap)
	}
	pwriteRegions(t, n2.uri("w"), second, []int64{0, 1 << 20})
	for _, d := range []*daemon{n1, n2} {
		if got := fileSHA(t, nbdRead(t, d.uri("w@s1"))); got != wantW {
			t.Fatalf("w@s1 read through %s differs from w at the snapshot", d.id)
		}
	}
	n1.mustCLI("lu", "rollback", "w", "s1")
	for _, d := range []*daemon{n1, n2} {
		if got := fileSHA(t, nbdRead(t, d.uri("w"))); got != wantW {
			t.Fatalf("after rollback through n1, w read through %s is not its content at the snapshot", d.id)
		}
	}
	for _, name := range []string{"w", "w@s1"} {
		if v, code := n1.verify(name); code != 0 || !v.Equal || len(v.Copies) != 2 {
			t.Fatalf("verify %s: exit %d %+v", name, code, v)
		}
	}
}

// clientsOf returns the NBD clients attached to LU name through d.
func clientsOf(d *daemon, name string) int {
	d.t.Helper()
	var lu struct {
		Connections int `json:"connections"`
	}
	if err := json.Unmarshal([]byte(d.mustCLI("lu", "show", name, "-o", "json")), &lu); err != nil {
		d.t.Fatal(err)
	}
	return lu.Connections
}
