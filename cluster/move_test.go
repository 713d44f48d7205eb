package cluster

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/cockroachdb/datadriven"
)

// TestMoveDataDriven drives NextMove (the move rule set) from
// testdata/move. Commands:
//
//	lu writer=N epoch=E copies=N:STATE,...   sets the LU (name vm1)
//	nodes N=ADDR ...                         the members and their NBD addresses ("-" for none)
//	op op=OP by=N [primary] [role=R] [to=N] [step=S] [reason=R]
//	                                         applies one operation; prints the verdict, the
//	                                         record (or its removal) and the LU when it changed
//	move                                     prints the record
//
// Rewrite the expected output with: go test ./cluster -run MoveDataDriven -rewrite
func TestMoveDataDriven(t *testing.T) {
	datadriven.Walk(t, "testdata/move", func(t *testing.T, path string) {
		var lu LU
		var cur *Move
		addrs := map[string]string{}
		at := time.Date(2026, 12, 7, 15, 0, 0, 0, time.UTC)
		datadriven.RunTest(t, path, func(t *testing.T, d *datadriven.TestData) string {
			switch d.Cmd {
			case "lu":
				lu = LU{Name: "vm1", SizeBytes: 1 << 20, Kind: KindFile}
				for _, a := range d.CmdArgs {
					switch a.Key {
					case "writer":
						lu.Writer = a.Vals[0]
					case "epoch":
						fmt.Sscan(a.Vals[0], &lu.Epoch)
					case "copies":
						for _, c := range a.Vals {
							id, state, _ := strings.Cut(c, ":")
							lu.Replicas = append(lu.Replicas, Replica{NodeID: id, State: state})
						}
					}
				}
				lu.Copies = len(lu.Replicas)
				return ""
			case "nodes":
				clear(addrs)
				for _, a := range d.CmdArgs {
					addrs[a.Key] = strings.TrimPrefix(a.Vals[0], "-")
				}
				return ""
			case "op":
				at = at.Add(time.Second)
				var op MoveOp
				op.LU = lu.Name
				var by Proposer
				for _, a := range d.CmdArgs {
					v := ""
					if len(a.Vals) > 0 {
						v = a.Vals[0]
					}
					switch a.Key {
					case "op":
						op.Op = v
					case "by":
						by.NodeID = v
					case "primary":
						by.Primary = true
					case "role":
						op.Role = v
					case "to":
						op.To = v
					case "step":
						op.Step = v
					case "reason":
						op.Reason = strings.ReplaceAll(v, "_", " ")
					case "lu":
						op.LU = v
					}
				}
				res, err := NextMove(cur, lu, addrs, op, by, at)
				if err != nil {
					return fmt.Sprintf("refused: %v\n", err)
				}
				var b strings.Builder
				cur = res.Move
				if res.LU != nil {
					lu = *res.LU
					fmt.Fprintf(&b, "lu: writer=%s epoch=%d handover=%d copies=%v\n", lu.Writer, lu.Epoch, lu.HandoverEpoch, lu.Replicas)
				}
				if res.Outcome != "" {
					fmt.Fprintf(&b, "ended: %s from %s reason=%q; record removed\n", res.Outcome, res.Ended.State, res.Ended.Reason)
					return b.String()
				}
				b.WriteString(formatMove(cur))
				return b.String()
			case "move":
				return formatMove(cur)
			}
			d.Fatalf(t, "unknown command %q", d.Cmd)
			return ""
		})
	})
}

func formatMove(m *Move) string {
	if m == nil {
		return "no move\n"
	}
	var b strings.Builder
	fmt.Fprintf(&b, "move %s %s→%s epoch=%d state=%s", m.LU, m.From, m.To, m.Epoch, m.State)
	for _, mon := range m.Monitors {
		fmt.Fprintf(&b, " %s@%s:%q", mon.Role, mon.Node, mon.Step)
	}
	b.WriteString("\n")
	return b.String()
}

// TestMoveTransitionTable runs every operation, as every monitor, from
// every state (and from no move) against an LU that allows a move, and
// checks the verdict against the table of legal transitions written out
// here (the rule set's doc, as data).
func TestMoveTransitionTable(t *testing.T) {
	lu := LU{Name: "vm1", SizeBytes: 1 << 20, Kind: KindFile, Writer: "n1", Epoch: 4, Copies: 2,
		Replicas: []Replica{{NodeID: "n1", State: ReplicaInSync}, {NodeID: "n2", State: ReplicaInSync}}}
	addrs := map[string]string{"n1": "h1:10809", "n2": "h2:10809", "n3": "h3:10809"}
	at := time.Date(2026, 12, 7, 15, 0, 0, 0, time.UTC)
	proposers := map[string]Proposer{
		MonitorSource:  {NodeID: "n1"},
		MonitorTarget:  {NodeID: "n2"},
		MonitorPrimary: {NodeID: "n3", Primary: true},
	}
	// legal[from][op] lists the roles that may run op from state from
	// ("" is no move); the resulting state is to[op] (removed for "").
	legal := map[string]map[string][]string{
		"":            {MoveOpStart: {MonitorPrimary}},
		MoveRequested: {MoveOpStep: {MonitorSource, MonitorTarget, MonitorPrimary}, MoveOpSync: {MonitorSource}, MoveOpRollBack: {MonitorSource, MonitorTarget, MonitorPrimary}},
		MoveSyncing:   {MoveOpStep: {MonitorSource, MonitorTarget, MonitorPrimary}, MoveOpSwitch: {MonitorSource}, MoveOpRollBack: {MonitorSource, MonitorTarget, MonitorPrimary}},
		MoveSwitching: {MoveOpStep: {MonitorSource, MonitorTarget, MonitorPrimary}, MoveOpComplete: {MonitorSource, MonitorTarget, MonitorPrimary}},
	}
	to := map[string]string{MoveOpStart: MoveRequested, MoveOpSync: MoveSyncing, MoveOpSwitch: MoveSwitching, MoveOpComplete: "", MoveOpRollBack: ""}
	ops := []string{MoveOpStart, MoveOpStep, MoveOpSync, MoveOpSwitch, MoveOpComplete, MoveOpRollBack}
	checked := 0
	for _, from := range []string{"", MoveRequested, MoveSyncing, MoveSwitching} {
		for _, op := range ops {
			for _, role := range []string{MonitorSource, MonitorTarget, MonitorPrimary} {
				var cur *Move
				if from != "" {
					cur = &Move{LU: "vm1", From: "n1", To: "n2", Epoch: 4, State: from, StartedAt: at,
						Monitors: []MoveMonitor{{Role: MonitorSource, Node: "n1"}, {Role: MonitorTarget, Node: "n2"}, {Role: MonitorPrimary, Node: "n3"}}}
				}
				o := MoveOp{LU: "vm1", Op: op, Role: role, To: "n2", Step: "s", Reason: "r"}
				if op == MoveOpStart {
					o.Role = ""
				}
				res, err := NextMove(cur, lu, addrs, o, proposers[role], at)
				want := false
				for _, r := range legal[from][op] {
					want = want || r == role
				}
				checked++
				if want != (err == nil) {
					t.Errorf("from %q, %s by the %s monitor: err %v, want legal=%v", from, op, role, err, want)
					continue
				}
				if err != nil {
					continue
				}
				got := ""
				if res.Move != nil {
					got = res.Move.State
				}
				wantState, changes := to[op]
				if !changes {
					wantState = from
				}
				if got != wantState {
					t.Errorf("from %q, %s by %s: state %q, want %q", from, op, role, got, wantState)
				}
				if (res.LU != nil) != (op == MoveOpSwitch) {
					t.Errorf("from %q, %s: LU changed %v; only a switch changes it", from, op, res.LU != nil)
				}
				if res.LU != nil && (res.LU.Writer != "n2" || res.LU.Epoch != 5 || res.LU.HandoverEpoch != 5 ||
					res.LU.Replicas[0].State != ReplicaInSync) {
					t.Errorf("switch made %+v; want writer n2 at epoch 5, handover 5, n1 still in sync", *res.LU)
				}
			}
		}
	}
	if checked != 4*len(ops)*3 {
		t.Fatalf("checked %d cases", checked)
	}
}

// TestPrimaryMoveStep: the primary's monitor completes a switched move
// whose source or target died, rolls back one that had not switched, and
// ends a move past the bound.
func TestPrimaryMoveStep(t *testing.T) {
	start := time.Date(2026, 12, 7, 15, 0, 0, 0, time.UTC)
	base := Move{LU: "vm1", From: "n1", To: "n2", Epoch: 4, StartedAt: start,
		Monitors: []MoveMonitor{{Role: MonitorPrimary, Node: "n3", Step: "watching"}}}
	alive := map[string]string{"n1": LiveAlive, "n2": LiveAlive, "n3": LiveAlive}
	for _, tc := range []struct {
		state, dead string
		after       time.Duration
		op          string
	}{
		{MoveRequested, "", time.Second, ""},
		{MoveRequested, "n1", time.Second, MoveOpRollBack},
		{MoveSyncing, "n2", time.Second, MoveOpRollBack},
		{MoveSwitching, "n1", time.Second, MoveOpComplete},
		{MoveSwitching, "n2", time.Second, MoveOpComplete},
		{MoveSyncing, "", 20 * time.Second, MoveOpRollBack},
		{MoveSwitching, "", 20 * time.Second, MoveOpComplete},
		{MoveSwitching, "", time.Second, ""},
	} {
		m := base
		m.State = tc.state
		live := map[string]string{}
		for k, v := range alive {
			live[k] = v
		}
		if tc.dead != "" {
			live[tc.dead] = LiveDead
		}
		op, ok := primaryMoveStep(m, "n3", live, start.Add(tc.after), 15*time.Second)
		if got := map[bool]string{true: op.Op, false: ""}[ok]; got != tc.op {
			t.Errorf("%s, dead %q, after %v: op %q, want %q", tc.state, tc.dead, tc.after, got, tc.op)
		}
		if ok && op.Op == MoveOpRollBack && op.Reason == "" {
			t.Errorf("rollback without a reason")
		}
	}
	// A new primary records that it watches.
	op, ok := primaryMoveStep(base, "n1", alive, start, 15*time.Second)
	if !ok || op.Op != MoveOpStep || op.Step != "watching" {
		t.Errorf("new primary: %+v %v", op, ok)
	}
}
