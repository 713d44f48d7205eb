package cluster

import (
	"errors"
	"strings"
	"testing"
	"time"
)

// TestPrimaryEndsMovesAlone: three nodes, the primary n1 the only monitor
// that acts (no node-side monitors run here). A move that switched and
// whose target then goes silent is completed by the primary; one whose
// source goes silent before the switch is rolled back; one that stays
// requested past MoveTimeout is rolled back with that reason. Each time
// the record is removed and the outcome is an event.
func TestPrimaryEndsMovesAlone(t *testing.T) {
	ctx := ctxT(t)
	probes := &probeSet{down: map[string]bool{}}
	opts := func(id string, boot bool) Options {
		o := testOptions(t, t.TempDir(), id, boot)
		o.Probe, o.FailoverAfter, o.MoveTimeout = probes.probe, 1500*time.Millisecond, 3*time.Second
		return o
	}
	n1, n2, n3 := openThree(t, opts)
	for _, name := range []string{"a", "b", "c"} {
		if err := n1.CreateLU(ctx, LU{Name: name, SizeBytes: 1 << 20, Copies: 3, CreatedOn: "n2", Replicas: []Replica{
			{NodeID: "n2", State: ReplicaInSync}, {NodeID: "n3", State: ReplicaInSync}, {NodeID: "n1", State: ReplicaInSync}}}); err != nil {
			t.Fatal(err)
		}
	}
	// Through whichever node leads (a loaded machine may move leadership).
	propose := func(by Proposer, op MoveOp) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			for _, n := range []*Node{n1, n2, n3} {
				if !n.IsLeader() {
					continue
				}
				if by.Primary {
					by.NodeID = n.ID()
				}
				err := n.ProposeMove(ctx, by, op)
				if err == nil {
					return
				}
				if !errors.Is(err, ErrNotLeader) {
					t.Fatalf("%s %s: %v", op.LU, op.Op, err)
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s %s: no leader", op.LU, op.Op)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	primary := Proposer{Primary: true}
	source := Proposer{NodeID: "n2"}
	gone := func(lu string) func() bool {
		return func() bool {
			_, ok, err := n1.GetMove(lu)
			return err == nil && !ok
		}
	}
	// c waits out MoveTimeout in requested: nobody quiesces it.
	propose(primary, MoveOp{LU: "c", Op: MoveOpStart, To: "n3"})
	waitFor(t, "c rolled back after MoveTimeout", gone("c"))
	// a switches to n3 (the source's steps, proposed as n2).
	propose(primary, MoveOp{LU: "a", Op: MoveOpStart, To: "n3"})
	propose(source, MoveOp{LU: "a", Op: MoveOpSync, Role: MonitorSource, Step: "quiescing"})
	propose(source, MoveOp{LU: "a", Op: MoveOpSwitch, Role: MonitorSource, Step: "drained"})
	if rec, _ := n1.GetLU("a"); rec.Writer != "n3" || rec.Epoch != 2 || rec.HandoverEpoch != 2 || rec.Replicas[0].State != ReplicaInSync {
		t.Fatalf("after the switch: %+v", rec)
	}
	if err := n1.ProposeMove(ctx, source, MoveOp{LU: "a", Op: MoveOpRollBack, Role: MonitorSource, Reason: "x"}); !errors.Is(err, ErrIllegalMove) && !errors.Is(err, ErrNotLeader) {
		t.Fatalf("a switched move rolled back: %v", err)
	}
	waitFor(t, "n2 and n3 alive in the primary's view", func() bool {
		for _, n := range []*Node{n1, n2, n3} {
			if v, err := n.Liveness(); n.IsLeader() && err == nil && len(v) == 3 && v[1].State == LiveAlive && v[2].State == LiveAlive {
				return true
			}
		}
		return false
	})
	// a's target goes silent after the switch; then b, requested from n2,
	// loses its source.
	probes.set("n3", true)
	waitFor(t, "a completed", gone("a"))
	propose(primary, MoveOp{LU: "b", Op: MoveOpStart, To: "n1"})
	probes.set("n2", true)
	waitFor(t, "b rolled back", gone("b"))
	evs, err := n1.Events(0, 1000)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]Event{}
	for _, ev := range evs {
		if ev.Kind == EventMoveCompleted || ev.Kind == EventMoveRolledBack {
			got[ev.LU] = ev
		}
	}
	for _, tc := range []struct{ lu, kind, reason string }{
		{"a", EventMoveCompleted, "dead: n3"},
		{"b", EventMoveRolledBack, "n2 dead before the switch"},
		{"c", EventMoveRolledBack, "not switched within 3s"},
	} {
		ev, ok := got[tc.lu]
		if !ok || ev.Kind != tc.kind || !strings.Contains(ev.Details["reason"], tc.reason) || ev.Details["by_monitor"] != MonitorPrimary {
			t.Errorf("move of %s ended with %+v; want %s by the primary, reason containing %q", tc.lu, ev, tc.kind, tc.reason)
		}
	}
	for _, lu := range []string{"b", "c"} {
		if rec, _ := n1.GetLU(lu); rec.HandoverEpoch != 0 {
			t.Errorf("the rolled-back move switched %s: %+v", lu, rec)
		}
	}
}
