package cluster

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Environment of the child process started by TestKill9.
const (
	envKillChildDir  = "CLUSTER_KILL_CHILD_DIR"
	envKillChildPeer = "CLUSTER_KILL_CHILD_PEER"
	envKillChildBase = "CLUSTER_KILL_CHILD_BASE"
)

func TestMain(m *testing.M) {
	if dir := os.Getenv(envKillChildDir); dir != "" {
		os.Exit(killChild(dir, os.Getenv(envKillChildPeer), os.Getenv(envKillChildBase)))
	}
	os.Exit(m.Run())
}

// killChild opens a node and creates LUs until it is killed, printing
// "ACK name" after each acknowledged create.
func killChild(dir, peer, base string) int {
	opts := Options{Dir: dir, NodeID: "n1", PeerAddr: peer, APIAddr: "127.0.0.1:11",
		Bootstrap: true, SnapshotThreshold: 8, TrailingLogs: 4, SnapshotInterval: 50 * time.Millisecond}
	n, err := Open(opts)
	if err != nil {
		fmt.Println("ERR", err)
		return 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := n.WaitLeader(ctx); err != nil {
		fmt.Println("ERR", err)
		return 1
	}
	for i := 0; ; i++ {
		name := fmt.Sprintf("%s-%04d", base, i)
		if err := n.CreateLU(ctx, LU{Name: name, SizeBytes: 512}); err != nil {
			fmt.Println("ERR", err)
			return 1
		}
		fmt.Println("ACK", name)
	}
}

// TestKill9 kills a real node process with SIGKILL while it writes (with
// snapshots and log compaction running), on the OS file system, and
// reopens it: every acknowledged create is there, and nothing that was
// applied before the kill is applied again.
func TestKill9(t *testing.T) {
	dir := t.TempDir()
	peer := freePort(t)
	rounds := 3
	if testing.Short() {
		rounds = 1
	}
	var acked []string
	for round := 0; round < rounds; round++ {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), envKillChildDir+"="+dir, envKillChildPeer+"="+peer,
			envKillChildBase+"="+fmt.Sprintf("r%d", round))
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(out)
		killAfter := 15 + 10*round
		for got := 0; got < killAfter && sc.Scan(); {
			line := sc.Text()
			if name, ok := strings.CutPrefix(line, "ACK "); ok {
				acked = append(acked, name)
				got++
			} else if strings.HasPrefix(line, "ERR") {
				t.Fatalf("child: %s", line)
			}
		}
		if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		for sc.Scan() { // acks printed before the kill landed
			if name, ok := strings.CutPrefix(sc.Text(), "ACK "); ok {
				acked = append(acked, name)
			}
		}
		_ = cmd.Wait()

		n := openNode(t, Options{Dir: dir, NodeID: "n1", PeerAddr: peer, APIAddr: "127.0.0.1:11",
			Bootstrap: true, Logger: testLogger()})
		var seen changeLog
		lus, cancel, err := n.ListAndWatch(seen.add)
		if err != nil {
			t.Fatal(err)
		}
		had := map[string]bool{}
		for _, lu := range lus {
			had[lu.Name] = true
		}
		waitLeaderIs(t, n)
		if err := n.Barrier(ctxT(t)); err != nil {
			t.Fatal(err)
		}
		for _, name := range acked {
			if _, err := n.GetLU(name); err != nil {
				t.Fatalf("round %d: acknowledged %s missing after kill -9: %v", round, name, err)
			}
		}
		for _, c := range seen.get() {
			if had[c.LU.Name] {
				t.Fatalf("round %d: %s was applied again after restart (%v at %d)", round, c.LU.Name, c.Kind, c.Index)
			}
		}
		st := n.Stats()
		t.Logf("round %d: %d acked, %d LUs, fsm index %d, applied since open %d, skipped %d",
			round, len(acked), st.LUs, st.FSMIndex, st.AppliedSinceOpen, st.SkippedSinceOpen)
		cancel()
		if err := n.Close(); err != nil {
			t.Fatal(err)
		}
	}
}
