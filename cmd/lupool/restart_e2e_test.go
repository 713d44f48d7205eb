package main

import (
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestWriterRestartCopiesConverge: kill -9 an LU's writer under fio 4 KiB
// random writes at QD32 and start it again at once (no failover). Writes
// in flight at the kill may have reached the copy and not the writer's
// volume, or the other way round; the restarted writer must bring the copy
// in line (a region-hash compare, sending only the regions that differ)
// before the copy counts as in sync, so `lu verify` finds them equal after
// every run. LUPOOL_RESTART_RUNS sets the number of runs (default 5; the
// issue's check is 20).
// alCompared matches the writer's log line of an activity-log resync.
var alCompared = regexp.MustCompile(`activity-log regions compared: [0-9]+, sent [0-9]+`)

func TestWriterRestartCopiesConverge(t *testing.T) {
	needTools(t, "fio")
	runs := 5
	if v := os.Getenv("LUPOOL_RESTART_RUNS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("LUPOOL_RESTART_RUNS=%q: want a count", v)
		}
		runs = n
	}
	// No failover: the writer is back within the lease of its copies.
	n1, _, _ := cluster3(t, "--failover-after", "0")
	const size = 64 << 20
	n1.mustCLI("lu", "create", "w", "--size", "64M", "--copies", "2")
	copyNode := ""
	for _, r := range n1.showLU("w").Replicas {
		if r.Node != "n1" {
			copyNode = r.Node
		}
	}
	diverged := 0
	alSeen := 0
	for run := 1; run <= runs; run++ {
		wait := startFio(t, "--name=storm", "--uri="+n1.uri("w"), "--rw=randwrite", "--bs=4k", "--iodepth=32",
			"--size=64M", "--time_based", "--runtime=30", fmt.Sprintf("--randseed=%d", run))
		time.Sleep(1500 * time.Millisecond)
		sentBefore := 0.0
		n1.stop(syscall.SIGKILL)
		killed := time.Now()
		_, _ = wait() // fio ends with an error: its server went away
		n1.start()
		restarted := time.Since(killed)
		n1.waitState("w", copyNode, "in-sync", 60*time.Second)
		inSync := time.Since(killed)
		// The copy may still be recorded in sync from before the kill
		// while the restarted writer is about to resync its activity-log
		// regions: a verify that finds it resyncing waits for the end.
		out, errOut, code := n1.cli("lu", "verify", "w")
		for deadline := time.Now().Add(60 * time.Second); code != 0 && strings.Contains(out+errOut, "resyncing") && time.Now().Before(deadline); {
			time.Sleep(200 * time.Millisecond)
			n1.waitState("w", copyNode, "in-sync", 60*time.Second)
			out, errOut, code = n1.cli("lu", "verify", "w")
		}
		sent := metricValue(n1.metrics(), "lupool_replication_sent_bytes_total", `lu="w"`, `kind="resync"`) - sentBefore
		if code != 0 {
			diverged++
			t.Errorf("run %d: copies differ after the writer's restart (exit %d):\n%s%s", run, code, out, errOut)
		}
		// What the activity log narrowed the compare to (64 regions of
		// 1 MiB in the LU).
		compared := "activity log empty: nothing compared"
		if all := alCompared.FindAllString(n1.logs(), -1); len(all) > alSeen {
			compared = all[len(all)-1]
			alSeen = len(all)
		}
		t.Logf("run %d: writer back in %v, copy in sync %v after the kill, %.0f of %d bytes resent (%s)",
			run, restarted.Round(time.Millisecond), inSync.Round(time.Millisecond), max(sent, 0), size, compared)
		if !strings.Contains(out, "all copies equal") && code == 0 {
			t.Errorf("run %d: verify exit 0 without saying so: %q", run, out)
		}
	}
	if diverged > 0 {
		t.Errorf("copies differed after %d of %d writer restarts", diverged, runs)
	}
}
