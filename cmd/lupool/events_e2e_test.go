package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
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
	if d.netns != "" {
		w.cmd.Env = append(w.cmd.Env, "LUPOOL_CA_FILE="+d.caFile())
	}
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
// node is killed and comes back: created, the copy out of sync, the node
// dead, the node back, resync started and finished, the copy in sync,
// deleted. Restarted with --after
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
	// The primary (n1) marks the killed node dead after --failover-after.
	dead := w.waitFor(t, "NodeDead", 20*time.Second, func(e eventJSON) bool { return e.Kind == "NodeDead" && e.Node == copyNode })
	victim.start()
	back := w.waitFor(t, "NodeBack", 20*time.Second, func(e eventJSON) bool { return e.Kind == "NodeBack" && e.Node == copyNode })
	if !(created.Seq < dead.Seq && dead.Seq < back.Seq) {
		t.Fatalf("node events out of order: created %d, dead %d, back %d", created.Seq, dead.Seq, back.Seq)
	}
	w.waitFor(t, "ResyncFinished", 60*time.Second, func(e eventJSON) bool { return e.Kind == "ResyncFinished" && e.Node == copyNode })
	bytesEv := w.waitFor(t, "ResyncBytes", 20*time.Second, func(e eventJSON) bool {
		return e.Kind == "ResyncBytes" && e.LU == "ev" && e.Node == "n1" && e.Details["copy"] == copyNode
	})
	if sent, err := strconv.ParseInt(bytesEv.Details["bytes"], 10, 64); err != nil || sent < 4<<20 {
		t.Fatalf("ResyncBytes says %q bytes sent; want at least the 4 MiB written while the copy was away", bytesEv.Details["bytes"])
	}
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

// tcpSubscriber is a registered caller on a TCP socket: it takes every
// event line, acknowledges its seq, and counts what it saw.
type tcpSubscriber struct {
	ln    net.Listener
	mu    sync.Mutex
	seen  map[uint64]int // guarded by mu: seq -> times received
	conns int            // guarded by mu
}

func newTCPSubscriber(t *testing.T) *tcpSubscriber {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &tcpSubscriber{ln: ln, seen: map[uint64]int{}}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.conns++
			s.mu.Unlock()
			go func() {
				defer conn.Close()
				sc := bufio.NewScanner(conn)
				for sc.Scan() {
					var ev eventJSON
					if json.Unmarshal(sc.Bytes(), &ev) != nil || ev.Seq == 0 {
						return
					}
					s.mu.Lock()
					s.seen[ev.Seq]++
					s.mu.Unlock()
					fmt.Fprintf(conn, "%d\n", ev.Seq)
				}
			}()
		}
	}()
	return s
}

// missing returns the seqs in (after, last] not received, and how many
// were received more than once.
func (s *tcpSubscriber) missing(after, last uint64) (missing []uint64, duplicates int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for seq := after + 1; seq <= last; seq++ {
		switch n := s.seen[seq]; {
		case n == 0:
			missing = append(missing, seq)
		case n > 1:
			duplicates += n - 1
		}
	}
	return missing, duplicates
}

// lastSeq is the newest event's seq as d reports it.
func (d *daemon) lastSeq() uint64 {
	d.t.Helper()
	out := d.mustCLI("events", "watch", "-o", "json", "--tail", "1", "--follow=false")
	var ev eventJSON
	if err := json.Unmarshal([]byte(strings.TrimSpace(out)), &ev); err != nil {
		d.t.Fatalf("events watch --tail 1: %q: %v", out, err)
	}
	return ev.Seq
}

// TestEventsSubscriberSurvivesPrimaryKill: a TCP caller registered on a
// three-node pool receives every event at least once while LUs come and
// go, across a kill -9 of the primary: the new primary goes on from the
// recorded position and no seq is missing (duplicates are counted).
func TestEventsSubscriberSurvivesPrimaryKill(t *testing.T) {
	n1, n2, n3 := cluster3(t)
	sub := newTCPSubscriber(t)
	var created struct {
		ID       string `json:"id"`
		AckedSeq uint64 `json:"acked_seq"`
	}
	out := n2.mustCLI("events", "subscribe", "--to", "tcp://"+sub.ln.Addr().String(), "-o", "json")
	if err := json.Unmarshal([]byte(out), &created); err != nil || created.ID == "" {
		t.Fatalf("events subscribe: %q: %v", out, err)
	}
	start := created.AckedSeq

	// Events while the old primary delivers, then kill -9 it mid-stream.
	churn := func(via *daemon, prefix string, count int) {
		for i := range count {
			name := fmt.Sprintf("%s%d", prefix, i)
			for attempt := 0; ; attempt++ {
				resp := via.request("POST", "/v1/lus", `{"name":"`+name+`","size_bytes":1048576}`)
				resp.Body.Close()
				if resp.StatusCode == 201 || resp.StatusCode == 409 {
					break
				}
				if attempt > 100 {
					t.Errorf("create %s: status %d", name, resp.StatusCode) // not Fatal: may run on another goroutine
					return
				}
				time.Sleep(200 * time.Millisecond)
			}
			for attempt := 0; ; attempt++ {
				resp := via.request("DELETE", "/v1/lus/"+name, "")
				resp.Body.Close()
				if resp.StatusCode == 204 || resp.StatusCode == 404 {
					break
				}
				if attempt > 100 {
					t.Errorf("delete %s: status %d", name, resp.StatusCode) // not Fatal: may run on another goroutine
					return
				}
				time.Sleep(200 * time.Millisecond)
			}
		}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		churn(n2, "a", 40)
	}()
	// Mid-stream: once the old primary has delivered some events.
	for deadline := time.Now().Add(30 * time.Second); ; {
		sub.mu.Lock()
		got := len(sub.seen)
		sub.mu.Unlock()
		if got >= 5 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the primary delivered %d events in 30 s", got)
		}
		time.Sleep(50 * time.Millisecond)
	}
	n1.stop(syscall.SIGKILL)
	<-done
	churn(n3, "b", 10)

	last := n2.lastSeq()
	deadline := time.Now().Add(60 * time.Second)
	var missing []uint64
	var dups int
	for {
		if missing, dups = sub.missing(start, last); len(missing) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 60 s the subscriber lacks %d of the events %d..%d: %v", len(missing), start+1, last, missing)
		}
		time.Sleep(200 * time.Millisecond)
	}
	sub.mu.Lock()
	conns := sub.conns
	sub.mu.Unlock()
	t.Logf("subscriber got every event %d..%d (%d events) with %d duplicates over %d connections", start+1, last, last-start, dups, conns)
	if conns < 2 {
		t.Errorf("the subscriber saw %d connection(s); the new primary should have connected anew", conns)
	}
	// The new primary reports the caller and its position.
	var subs []struct {
		ID       string `json:"id"`
		AckedSeq uint64 `json:"acked_seq"`
		State    string `json:"state"`
	}
	waitUntil := time.Now().Add(20 * time.Second)
	for {
		if err := json.Unmarshal([]byte(n3.mustCLI("events", "subscribers", "-o", "json")), &subs); err != nil {
			t.Fatal(err)
		}
		if len(subs) == 1 && subs[0].ID == created.ID && subs[0].AckedSeq >= last && subs[0].State == "ok" {
			break
		}
		if time.Now().After(waitUntil) {
			t.Fatalf("events subscribers: %+v; want %s acknowledged up to %d, state ok", subs, created.ID, last)
		}
		time.Sleep(200 * time.Millisecond)
	}
	n3.mustCLI("events", "unsubscribe", created.ID)
}
