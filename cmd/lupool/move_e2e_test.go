package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lupool/lupool/internal/realclient"
)

// moveJSON is one move of GET /v1/moves (`lupool move list -o json`).
type moveJSON struct {
	LU       string `json:"lu"`
	From     string `json:"from"`
	To       string `json:"to"`
	State    string `json:"state"`
	Monitors []struct {
		Role string `json:"role"`
		Node string `json:"node"`
		Step string `json:"step"`
	} `json:"monitors"`
}

func (d *daemon) moves() []moveJSON {
	d.t.Helper()
	resp := d.request("GET", "/v1/moves", "")
	defer resp.Body.Close()
	var out []moveJSON
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil || resp.StatusCode != 200 {
		d.t.Fatalf("GET /v1/moves: %s %v", resp.Status, err)
	}
	return out
}

// waitMoves polls until the moves in progress (as d sees them) satisfy ok.
func (d *daemon) waitMoves(what string, within time.Duration, ok func([]moveJSON) bool) []moveJSON {
	d.t.Helper()
	deadline := time.Now().Add(within)
	for {
		m := d.moves()
		if ok(m) {
			return m
		}
		if time.Now().After(deadline) {
			d.t.Fatalf("%s: not within %v; moves: %+v", what, within, m)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// pauseDuring is the longest gap between two acknowledged writes of the
// ledger that overlaps [from, to]: the pause a client saw.
func pauseDuring(wl []ledgerLine, from, to time.Time) time.Duration {
	var prev time.Time
	var gap time.Duration
	for _, l := range wl {
		if l.kind != "W" {
			continue
		}
		if !prev.IsZero() && l.at.After(from) && prev.Before(to) && l.at.Sub(prev) > gap {
			gap = l.at.Sub(prev)
		}
		prev = l.at
	}
	return gap
}

// TestMoveUnderFio: three nodes, an LU with three copies written through
// n1 by fio at queue depth 32 with crc32c verification, and by a numbered
// ledger writer through n3. The writer role is moved round the nodes with
// `lupool lu move --wait`: fio sees no error and verifies, every move is
// done, the pause (the longest gap in the ledger writer's acknowledgements
// during a move) is reported, every acknowledged block reads back from
// every node and `lu verify` finds the copies equal. The move CLI's
// refusals are checked on the way.
func TestMoveUnderFio(t *testing.T) {
	needTools(t, "fio")
	realclient.NbdshPython(t)
	n1, n2, n3 := cluster3(t)
	nodes := map[string]*daemon{"n1": n1, "n2": n2, "n3": n3}
	n2.mustCLI("lu", "create", "m", "--size", "32M", "--copies", "3")
	n2.mustCLI("lu", "create", "two", "--size", "1M", "--copies", "2")

	// Clear refusals, each changing nothing.
	two := n1.showLU("two")
	var noCopy string
	for _, id := range []string{"n1", "n3"} {
		if two.state(id) == "" {
			noCopy = id
		}
	}
	for _, tc := range []struct {
		args []string
		says string
	}{
		{[]string{"lu", "move", "nosuch", "--to", "n1"}, "not found"},
		{[]string{"lu", "move", "m", "--to", "n9"}, `node "n9" is not a member`},
		{[]string{"lu", "move", "m", "--to", "n2"}, "already is the writer"},
		{[]string{"lu", "move", "two", "--to", noCopy}, "holds no copy"},
		{[]string{"lu", "move", "m"}, "needs --to NODE"},
	} {
		_, errOut, code := n3.cli(tc.args...)
		if code == 0 || !strings.Contains(errOut, tc.says) {
			t.Errorf("lupool %s: exit %d, stderr %q; want a refusal saying %q", strings.Join(tc.args, " "), code, errOut, tc.says)
		}
	}
	if lu := n1.showLU("m"); lu.Writer != "n2" || len(n1.moves()) != 0 {
		t.Fatalf("refused moves changed something: writer %s, moves %v", lu.Writer, n1.moves())
	}

	events := n1.startWatch("--kind", "WriterMoved,MoveStarted,MoveCompleted,MoveRolledBack", "--tail", "0")
	dir := t.TempDir()
	stopFile := filepath.Join(dir, "stop")
	const blocks = 1024
	w := startClient(t, n3, "m", failoverWriterScript, filepath.Join(dir, "ledger"),
		"BLOCKS="+strconv.Itoa(blocks), "BASE=4096", "STOPFILE="+stopFile)
	const moves = 5
	// 2 MiB: 512 blocks a loop, verified even at a few hundred writes a
	// second (a loaded machine, -race).
	fioWait := startFio(t, fioVerifyJobSize(n1.uri("m"), 2*time.Second+moves*time.Second, "2M")...)
	time.Sleep(1500 * time.Millisecond)

	order := []string{"n3", "n1", "n2"}
	type span struct{ from, to time.Time }
	var spans []span
	var took []string
	for i := range moves {
		to := order[i%len(order)]
		start := time.Now()
		out := nodes[order[(i+1)%len(order)]].mustCLI("lu", "move", "m", "--to", to, "--wait")
		spans = append(spans, span{start, time.Now()})
		if !strings.Contains(out, "moved m") || !strings.Contains(out, "→ "+to) {
			t.Fatalf("move %d to %s: %q", i+1, to, out)
		}
		took = append(took, strings.TrimSpace(out))
		if lu := n1.showLU("m"); lu.Writer != to {
			t.Fatalf("after move %d the writer is %s, want %s", i+1, lu.Writer, to)
		}
		time.Sleep(400 * time.Millisecond)
	}
	out, err := fioWait()
	checkFio(t, out, err)
	if err := os.WriteFile(stopFile, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	w.wait()
	wl := readLedger(t, w.log)
	acked := ackedVersions(t, wl, "the ledger client of n3", spans[0].from, true)

	var pauses []time.Duration
	for _, s := range spans {
		pauses = append(pauses, pauseDuring(wl, s.from, s.to))
	}
	sorted := slices.Clone(pauses)
	slices.Sort(sorted)
	t.Logf("%d moves under fio QD32 (race-enabled binary: %v): client-side pause p50 %v p99 %v max %v (each %v); %d ledger writes",
		moves, raceEnabled, sorted[len(sorted)/2].Round(time.Millisecond), sorted[len(sorted)-1].Round(time.Millisecond),
		sorted[len(sorted)-1].Round(time.Millisecond), pauses, len(wl))
	for _, s := range took {
		t.Logf("  %s", s)
	}
	for _, d := range []*daemon{n1, n2, n3} {
		checkBlocksFrom(t, d, "m", 4096, blocks, acked)
	}
	if out, errOut, code := n1.cli("lu", "verify", "m"); code != 0 {
		t.Fatalf("copies differ after the moves (exit %d):\n%s%s", code, out, errOut)
	}
	if m := n2.moves(); len(m) != 0 {
		t.Errorf("move records left: %+v", m)
	}
	if list := n2.mustCLI("move", "list", "-o", "json"); strings.TrimSpace(list) != "[]" {
		t.Errorf("move list -o json after the moves: %q, want []", list)
	}
	lu := n1.showLU("m")
	for _, r := range lu.Replicas {
		if r.State != "in-sync" {
			t.Errorf("copy on %s is %s after clean moves; a handover keeps every copy in sync", r.Node, r.State)
		}
	}
	for _, to := range order {
		events.waitFor(t, "WriterMoved to "+to, 10*time.Second, func(ev eventJSON) bool {
			return ev.Kind == "WriterMoved" && ev.LU == "m" && ev.Node == to && ev.Details["reason"] == "move"
		})
	}
	done := 0
	for _, ev := range events.events() {
		switch ev.Kind {
		case "MoveCompleted":
			done++
		case "MoveRolledBack":
			t.Errorf("a move rolled back: %v", ev)
		}
	}
	if done != moves {
		t.Errorf("%d MoveCompleted events, want %d", done, moves)
	}
	var handed, pauseCount, pauseSum float64
	for _, d := range []*daemon{n1, n2, n3} {
		text := d.metrics()
		pauseCount += metricValue(text, "lupool_move_pause_seconds_count")
		pauseSum += metricValue(text, "lupool_move_pause_seconds_sum")
		if d.id == "n1" {
			handed = metricValue(text, "lupool_moves_total", `outcome="done"`)
		}
	}
	t.Logf("server side (the sources' lupool_move_pause_seconds): mean %v", time.Duration(pauseSum/max(pauseCount, 1)*float64(time.Second)).Round(time.Millisecond))
	if handed != moves || pauseCount != moves {
		t.Errorf("metrics: lupool_moves_total{outcome=done} %v on n1, lupool_move_pause_seconds_count %v over the nodes; want %d", handed, pauseCount, moves)
	}
}

// TestMoveNodeKilledMidMove: a move is made to stall in a known state by
// freezing (SIGSTOP) its source before it is asked for: the record stays
// requested, its monitors visible in GET /v1/moves and the LU's record
// (what `move list` and `lu show` print), and a second move is refused. Then one end is killed (kill -9):
//   - "source": the source itself, frozen. The primary's monitor sees it
//     dead and rolls the move back, or the target's sees the LU fail over
//     and does, whichever first (the failover promotes a copy);
//   - "target": the target, while the source is frozen for well under the
//     failover time; then the source goes on (SIGCONT), finds the target
//     gone and rolls back, or the primary does. The source writes as before.
//
// A ledger writer runs through the third node throughout: no error, every
// acknowledged block reads back from every node after the killed node
// restarted and was resynced, the record is gone and `lu verify` finds the
// copies equal. Both runs share one cluster (--failover-after 4s, so that
// the frozen source is not failed over while the test looks at the
// stalled move), each on an LU of its own.
func TestMoveNodeKilledMidMove(t *testing.T) {
	realclient.NbdshPython(t)
	n1, n2, n3 := cluster3(t, "--failover-after", "4s")
	for i, killed := range []string{"source", "target"} {
		t.Run(killed, func(t *testing.T) { moveKillRun(t, n1, n2, n3, fmt.Sprintf("k%d", i), killed) })
	}
}

func moveKillRun(t *testing.T, n1, n2, n3 *daemon, name, killed string) {
	nodes := map[string]*daemon{"n1": n1, "n2": n2, "n3": n3}
	n2.mustCLI("lu", "create", name, "--size", "16M", "--copies", "3")
	// n2 writes; n3 is the target; the ledger goes through n1 (the
	// primary, which neither end is).
	source, target, client := n2, n3, n1
	victim := map[string]*daemon{"source": source, "target": target}[killed]
	rolledBefore := max(0, metricValue(n1.metrics(), "lupool_moves_total", `outcome="rolled-back"`)) // -1: no series yet
	events := n1.startWatch("--kind", "WriterMoved,MoveStarted,MoveCompleted,MoveRolledBack,NodeDead", "--tail", "0")
	dir := t.TempDir()
	stopFile := filepath.Join(dir, "stop")
	const blocks = 1024
	w := startClient(t, client, name, failoverWriterScript, filepath.Join(dir, "ledger"),
		"BLOCKS="+strconv.Itoa(blocks), "STOPFILE="+stopFile)
	time.Sleep(time.Second)

	faulted := time.Now()
	if err := source.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	resp := n1.request("POST", "/v1/lus/"+name+"/move", `{"to":"`+target.id+`"}`)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("POST move: %s", resp.Status)
	}
	m := n1.waitMoves("the move recorded, stalled in requested", 3*time.Second, func(m []moveJSON) bool {
		return len(m) == 1 && m[0].State == "requested"
	})
	if m[0].From != source.id || m[0].To != target.id || len(m[0].Monitors) != 3 {
		t.Fatalf("move list: %+v", m)
	}
	// The LU's record carries its move, on a node that is not the primary
	// (once it applied the record).
	var shown struct {
		Move *moveJSON `json:"move"`
	}
	for deadline := time.Now().Add(2 * time.Second); ; {
		resp = n3.request("GET", "/v1/lus/"+name, "")
		err := json.NewDecoder(resp.Body).Decode(&shown)
		resp.Body.Close()
		if err == nil && shown.Move != nil && shown.Move.State == "requested" && shown.Move.To == target.id {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("GET /v1/lus/%s through n3: move %+v (%v); want the move, requested", name, shown.Move, err)
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	second := n1.request("POST", "/v1/lus/"+name+"/move", `{"to":"n1"}`)
	body, _ := io.ReadAll(second.Body)
	second.Body.Close()
	if second.StatusCode != 409 || !strings.Contains(string(body), "in progress") {
		t.Errorf("a second move while one is in progress: %s %s; want 409 naming the move in progress", second.Status, body)
	}
	t.Logf("the source frozen %v while the stalled move was looked at", time.Since(faulted).Round(time.Millisecond))
	if since := time.Since(faulted); since > 3*time.Second {
		t.Fatalf("the source was frozen %v before the kill; the primary may have failed it over (--failover-after 4s)", since)
	}
	victim.stop(syscall.SIGKILL) // a stopped process dies too
	if killed == "target" {
		if err := source.cmd.Process.Signal(syscall.SIGCONT); err != nil {
			t.Fatal(err)
		}
	}
	ended := events.waitFor(t, "MoveRolledBack", 15*time.Second, func(ev eventJSON) bool {
		return ev.LU == name && (ev.Kind == "MoveRolledBack" || ev.Kind == "MoveCompleted")
	})
	t.Logf("kill -9 the %s mid-move: %s %v after the freeze: by the %s monitor, %q", killed, ended.Kind,
		ended.Time.Sub(faulted).Round(time.Millisecond), ended.Details["by_monitor"], ended.Details["reason"])
	if ended.Kind != "MoveRolledBack" {
		t.Errorf("the move %s; it never switched, so it must roll back", ended.Kind)
	}
	client.waitMoves("the record cleaned", 5*time.Second, func(m []moveJSON) bool { return len(m) == 0 })
	lu := client.showLU(name)
	switch killed {
	case "target":
		if lu.Writer != source.id {
			t.Errorf("after the rollback %s writes %s, want the source %s", lu.Writer, name, source.id)
		}
	case "source":
		// The primary fails the dead source over to a live copy.
		deadline := time.Now().Add(10 * time.Second)
		for lu.Writer == source.id && time.Now().Before(deadline) {
			time.Sleep(200 * time.Millisecond)
			lu = client.showLU(name)
		}
		if lu.Writer == source.id {
			t.Errorf("the killed source still writes %s", name)
		}
	}
	time.Sleep(time.Second) // writes go on after the fault
	if err := os.WriteFile(stopFile, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	w.wait()
	wl := readLedger(t, w.log)
	acked := ackedVersions(t, wl, "the ledger client of "+client.id, faulted, true)
	gap, from := longestGap(wl, "W")
	t.Logf("%s killed: %d writes acknowledged; the longest gap %v from %v after the freeze", killed, len(wl),
		gap.Round(time.Millisecond), from.Sub(faulted).Round(time.Millisecond))

	victim.start()
	n1.waitState(name, victim.id, "in-sync", 60*time.Second)
	for _, id := range []string{"n1", "n2", "n3"} {
		checkBlocks(t, nodes[id], name, blocks, acked)
	}
	if out, errOut, code := n1.cli("lu", "verify", name); code != 0 {
		t.Fatalf("copies differ after the %s rejoined (exit %d):\n%s%s", killed, code, out, errOut)
	}
	if rolled := metricValue(n1.metrics(), "lupool_moves_total", `outcome="rolled-back"`) - rolledBefore; rolled != 1 {
		t.Errorf("lupool_moves_total{outcome=rolled-back} on n1 rose by %v, want 1", rolled)
	}
}
