package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// eventJSON is one line of `lupool events watch -o json`.
type eventJSON struct {
	Seq     uint64            `json:"seq"`
	Time    time.Time         `json:"time"`
	Kind    string            `json:"kind"`
	LU      string            `json:"lu"`
	Node    string            `json:"node"`
	Details map[string]string `json:"details"`
}

func (e eventJSON) String() string {
	return fmt.Sprintf("%d %s lu=%s node=%s %v", e.Seq, e.Kind, e.LU, e.Node, e.Details)
}

// watcher is a running `lupool events watch -o json` and what it printed.
type watcher struct {
	cmd  *exec.Cmd
	mu   sync.Mutex
	evs  []eventJSON // guarded by mu
	bad  []string    // guarded by mu: lines that are not events
	done chan struct{}
}

// startWatch runs `lupool events watch -o json args...` against d.
func (d *daemon) startWatch(args ...string) *watcher {
	d.t.Helper()
	w := &watcher{done: make(chan struct{})}
	w.cmd = exec.Command(lupoolBin, append([]string{"events", "watch", "-o", "json"}, args...)...)
	w.cmd.Env = append(os.Environ(), "LUPOOL_API="+d.api, "LUPOOL_TOKEN_FILE="+d.tokenFile())
	out, err := w.cmd.StdoutPipe()
	if err != nil {
		d.t.Fatal(err)
	}
	if err := w.cmd.Start(); err != nil {
		d.t.Fatal(err)
	}
	go func() {
		defer close(w.done)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			var ev eventJSON
			err := json.Unmarshal(sc.Bytes(), &ev)
			w.mu.Lock()
			if err != nil || ev.Seq == 0 || ev.Kind == "" || ev.Time.IsZero() {
				w.bad = append(w.bad, sc.Text())
			} else {
				w.evs = append(w.evs, ev)
			}
			w.mu.Unlock()
		}
	}()
	d.t.Cleanup(func() {
		_ = w.cmd.Process.Kill()
		<-w.done
		_ = w.cmd.Wait()
	})
	return w
}

func (w *watcher) events() []eventJSON {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]eventJSON(nil), w.evs...)
}

// waitFor waits until the watcher saw an event matching match.
func (w *watcher) waitFor(t *testing.T, what string, within time.Duration, match func(eventJSON) bool) eventJSON {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		for _, ev := range w.events() {
			if match(ev) {
				return ev
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %s event within %v; saw:\n%s", what, within, eventList(w.events()))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func eventList(evs []eventJSON) string {
	var b strings.Builder
	for _, ev := range evs {
		b.WriteString(ev.String() + "\n")
	}
	return b.String()
}

// checkNoGaps fails unless evs have consecutive seqs starting after after.
func checkNoGaps(t *testing.T, evs []eventJSON, after uint64) {
	t.Helper()
	for i, ev := range evs {
		if ev.Seq != after+uint64(i)+1 {
			t.Fatalf("event %d has seq %d, want %d (a gap or a repeat):\n%s", i, ev.Seq, after+uint64(i)+1, eventList(evs))
		}
	}
}

// TestEventsWatchCopyLifecycle: a watcher started before the run sees, in
// order and without gaps, the events of an LU's life with a copy whose
// node is killed and comes back: created, the copy out of sync, resync
// started and finished, the copy in sync, deleted. Restarted with --after
// SEQ, it receives exactly the events after SEQ.
func TestEventsWatchCopyLifecycle(t *testing.T) {
	needTools(t, "fio")
	n1, n2, n3 := cluster3(t)
	// The watcher follows n1, the writer, which stays up.
	w := n1.startWatch("--tail", "0")
	time.Sleep(300 * time.Millisecond) // the stream is open
	n1.mustCLI("lu", "create", "ev", "--size", "16M", "--copies", "2")
	created := w.waitFor(t, "LUCreated", 20*time.Second, func(e eventJSON) bool { return e.Kind == "LUCreated" && e.LU == "ev" })
	var copyNode string
	for _, r := range n1.showLU("ev").Replicas {
		if r.Node != "n1" {
			copyNode = r.Node
		}
	}
	victim := map[string]*daemon{"n2": n2, "n3": n3}[copyNode]
	if victim == nil {
		t.Fatalf("copy of ev placed on %q", copyNode)
	}
	victim.stop(syscall.SIGKILL)
	fio(t, "--name=outage", "--uri="+n1.uri("ev"), "--rw=randwrite", "--bs=4k", "--size=4M")
	w.waitFor(t, "copy out of sync", 20*time.Second, func(e eventJSON) bool {
		return e.Kind == "CopyStateChanged" && e.Node == copyNode && e.Details["to"] == "out-of-sync"
	})
	victim.start()
	w.waitFor(t, "ResyncFinished", 60*time.Second, func(e eventJSON) bool { return e.Kind == "ResyncFinished" && e.Node == copyNode })
	n1.mustCLI("lu", "delete", "ev")
	deleted := w.waitFor(t, "LUDeleted", 20*time.Second, func(e eventJSON) bool { return e.Kind == "LUDeleted" && e.LU == "ev" })

	evs := w.events()
	checkNoGaps(t, evs, evs[0].Seq-1)
	if created.Seq > deleted.Seq {
		t.Fatalf("created at %d after deleted at %d", created.Seq, deleted.Seq)
	}
	// The LU's story, in this order (other events may come in between).
	want := []func(eventJSON) bool{
		func(e eventJSON) bool { return e.Kind == "LUCreated" && e.LU == "ev" },
		func(e eventJSON) bool {
			return e.Kind == "CopyStateChanged" && e.Node == copyNode && e.Details["from"] == "in-sync" && e.Details["to"] == "out-of-sync" && e.Details["epoch"] != ""
		},
		func(e eventJSON) bool { return e.Kind == "ResyncStarted" && e.LU == "ev" && e.Node == copyNode },
		func(e eventJSON) bool {
			return e.Kind == "CopyStateChanged" && e.Node == copyNode && e.Details["from"] == "resyncing" && e.Details["to"] == "in-sync"
		},
		func(e eventJSON) bool { return e.Kind == "ResyncFinished" && e.LU == "ev" && e.Node == copyNode },
		func(e eventJSON) bool { return e.Kind == "LUDeleted" && e.LU == "ev" },
	}
	i := 0
	for _, ev := range evs {
		if i < len(want) && want[i](ev) {
			i++
		}
	}
	if i != len(want) {
		t.Fatalf("found %d of the %d steps in order; events:\n%s", i, len(want), eventList(evs))
	}
	w.mu.Lock()
	bad := w.bad
	w.mu.Unlock()
	if len(bad) > 0 {
		t.Fatalf("lines that are not events: %q", bad)
	}

	// Resume: exactly the events after a seq in the middle, from any node.
	mid := evs[len(evs)/2].Seq
	out := n3.mustCLI("events", "watch", "-o", "json", "--after", strconv.FormatUint(mid, 10), "--follow=false")
	var resumed []eventJSON
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		var ev eventJSON
		if err := json.Unmarshal([]byte(line), &ev); err != nil {
			t.Fatalf("bad line %q: %v", line, err)
		}
		resumed = append(resumed, ev)
	}
	checkNoGaps(t, resumed, mid)
	for _, ev := range evs {
		if ev.Seq <= mid {
			continue
		}
		r := resumed[ev.Seq-mid-1]
		if r.Kind != ev.Kind || r.LU != ev.LU || r.Node != ev.Node || !r.Time.Equal(ev.Time) {
			t.Fatalf("resumed event %d = %v, the watcher saw %v", ev.Seq, r, ev)
		}
	}
	if last := resumed[len(resumed)-1].Seq; last < deleted.Seq {
		t.Fatalf("resumed stream ends at %d, before LUDeleted at %d", last, deleted.Seq)
	}
}
