package cluster

import (
	"errors"
	"fmt"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus"
)

// reps builds a copy list from "node:state" pairs, state one of
// i (in-sync), o (out-of-sync), r (resyncing), n (new), or a literal.
func reps(pairs ...string) []Replica {
	short := map[string]string{"i": ReplicaInSync, "o": ReplicaOutOfSync, "r": ReplicaResyncing, "n": ReplicaNew}
	out := []Replica{}
	for _, p := range pairs {
		id, st, _ := strings.Cut(p, ":")
		if s, ok := short[st]; ok {
			st = s
		}
		out = append(out, Replica{NodeID: id, State: st})
	}
	return out
}

// copyCase is one row of the rule table: the recorded LU (writer n1 unless
// writer is set, epoch 5), the change, the proposer, and the verdict.
type copyCase struct {
	name    string
	old     []Replica
	writer  string // recorded writer; "" means n1
	members []string
	by      Proposer
	change  CopyChange
	err     error  // nil: legal
	rule    string // for illegal rows: the rule the message must name
}

var (
	writerN1  = Proposer{NodeID: "n1"}
	primaryN5 = Proposer{NodeID: "n5", Primary: true}
	primaryN1 = Proposer{NodeID: "n1", Primary: true}
	base      = reps("n1:i", "n2:i", "n3:o")
)

// chg builds a change of LU "m" from epoch 5 to epoch with writer and copies.
func chg(epoch uint64, writer string, rs []Replica) CopyChange {
	return CopyChange{Name: "m", ExpectedEpoch: 5, Epoch: epoch, Writer: writer, Copies: len(rs), Replicas: rs}
}

func copyCases() []copyCase {
	many := make([]string, CopiesMax+1)
	for i := range many {
		many[i] = fmt.Sprintf("x%02d:i", i)
	}
	return []copyCase{
		// Legal changes.
		{name: "writer records a copy out of sync, epoch +1", old: base, by: writerN1, change: chg(6, "n1", reps("n1:i", "n2:o", "n3:o"))},
		{name: "writer starts a resync, same epoch", old: base, by: writerN1, change: chg(5, "n1", reps("n1:i", "n2:i", "n3:r"))},
		{name: "writer starts a resync, epoch +1 is allowed too", old: base, by: writerN1, change: chg(6, "n1", reps("n1:i", "n2:i", "n3:r"))},
		{name: "writer finishes a resync, epoch +1", old: reps("n1:i", "n2:i", "n3:r"), by: writerN1, change: chg(6, "n1", reps("n1:i", "n2:i", "n3:i"))},
		{name: "writer: resync failed, back out of sync", old: reps("n1:i", "n2:i", "n3:r"), by: writerN1, change: chg(5, "n1", reps("n1:i", "n2:i", "n3:o"))},
		{name: "writer rebuilt a new copy: out of sync", old: reps("n1:i", "n3:n"), by: writerN1, change: chg(5, "n1", reps("n1:i", "n3:o"))},
		{name: "writer records an in-sync copy new, epoch +1", old: base, by: writerN1, change: chg(6, "n1", reps("n1:i", "n2:n", "n3:o"))},
		{name: "a node records its own lost copy new", old: base, by: Proposer{NodeID: "n3"}, change: chg(5, "n1", reps("n1:i", "n2:i", "n3:n"))},
		{name: "a node records its own in-sync copy new, epoch +1", old: base, by: Proposer{NodeID: "n2"}, change: chg(6, "n1", reps("n1:i", "n2:n", "n3:o"))},
		{name: "primary adds a new copy", old: base, by: primaryN5, change: chg(6, "n1", reps("n1:i", "n2:i", "n3:o", "n4:n"))},
		{name: "primary removes a lagging copy", old: base, by: primaryN5, change: chg(6, "n1", reps("n1:i", "n2:i"))},
		{name: "primary replaces a lagging copy", old: base, by: primaryN5, change: chg(6, "n1", reps("n1:i", "n2:i", "n4:n"))},
		{name: "primary moves the writer to an in-sync copy", old: base, by: primaryN5, change: chg(6, "n2", reps("n1:i", "n2:i", "n3:o"))},
		{name: "primary moves the writer and records the old one out of sync", old: base, by: primaryN5, change: chg(6, "n2", reps("n1:o", "n2:i", "n3:o"))},
		{name: "primary that is the writer demotes a copy and adds one", old: base, by: primaryN1, change: chg(6, "n1", reps("n1:i", "n2:o", "n3:o", "n4:n"))},
		{name: "writer proposes no change", old: base, by: writerN1, change: chg(5, "n1", base)},
		{name: "writer records a removed member's copy out of sync", old: reps("n1:i", "n2:i", "n3:r"), members: []string{"n1", "n2"}, by: writerN1, change: chg(5, "n1", reps("n1:i", "n2:i", "n3:o"))},
		{name: "a removed member's in-sync copy may stay while another changes", old: base, members: []string{"n1", "n3"}, by: writerN1, change: chg(5, "n1", reps("n1:i", "n2:i", "n3:r"))},

		// Stale proposer.
		{name: "expected epoch is not the recorded one", old: base, by: writerN1, change: CopyChange{Name: "m", ExpectedEpoch: 4, Epoch: 5, Writer: "n1", Copies: 3, Replicas: base}, err: ErrEpochChanged, rule: "epoch"},

		// Illegal changes: each names its rule.
		{name: "change names another LU", old: base, by: writerN1, change: CopyChange{Name: "other", ExpectedEpoch: 5, Epoch: 5, Writer: "n1", Copies: 3, Replicas: base}, err: ErrIllegalChange, rule: ruleName},
		{name: "epoch 2^62", old: base, by: primaryN1, change: chg(1<<62, "n1", base), err: ErrIllegalChange, rule: ruleEpoch},
		{name: "epoch +2", old: base, by: writerN1, change: chg(7, "n1", reps("n1:i", "n2:o", "n3:o")), err: ErrIllegalChange, rule: ruleEpoch},
		{name: "epoch goes back", old: base, by: writerN1, change: chg(4, "n1", base), err: ErrIllegalChange, rule: ruleEpoch},
		{name: "in-sync set shrinks without epoch +1", old: base, by: writerN1, change: chg(5, "n1", reps("n1:i", "n2:o", "n3:o")), err: ErrIllegalChange, rule: ruleEpoch},
		{name: "in-sync set grows without epoch +1", old: reps("n1:i", "n2:i", "n3:r"), by: writerN1, change: chg(5, "n1", reps("n1:i", "n2:i", "n3:i")), err: ErrIllegalChange, rule: ruleEpoch},
		{name: "copy added without epoch +1", old: base, by: primaryN5, change: chg(5, "n1", reps("n1:i", "n2:i", "n3:o", "n4:n")), err: ErrIllegalChange, rule: ruleEpoch},
		{name: "copy removed without epoch +1", old: base, by: primaryN5, change: chg(5, "n1", reps("n1:i", "n2:i")), err: ErrIllegalChange, rule: ruleEpoch},
		{name: "writer moved without epoch +1", old: base, by: primaryN5, change: chg(5, "n2", base), err: ErrIllegalChange, rule: ruleEpoch},
		{name: "copy count differs from the list", old: base, by: writerN1, change: CopyChange{Name: "m", ExpectedEpoch: 5, Epoch: 5, Writer: "n1", Copies: 2, Replicas: base}, err: ErrIllegalChange, rule: ruleCount},
		{name: "no copies at all", old: base, by: primaryN5, change: chg(6, "n1", reps()), err: ErrIllegalChange, rule: ruleCount},
		{name: "more copies than CopiesMax", old: base, by: primaryN5, change: chg(6, "n1", reps(many...)), err: ErrIllegalChange, rule: ruleCount},
		{name: "two copies on one node", old: base, by: writerN1, change: chg(5, "n1", reps("n1:i", "n2:i", "n2:o")), err: ErrIllegalChange, rule: ruleDistinct},
		{name: "copy with an empty node id", old: base, by: writerN1, change: chg(5, "n1", reps("n1:i", "n2:i", ":o")), err: ErrIllegalChange, rule: ruleDistinct},
		{name: "unknown copy state", old: base, by: writerN1, change: chg(5, "n1", reps("n1:i", "n2:i", "n3:bogus")), err: ErrIllegalChange, rule: ruleState},
		{name: "copy added on a node without a record", old: base, by: primaryN5, change: chg(6, "n1", reps("n1:i", "n2:i", "n3:o", "mallory:n")), err: ErrIllegalChange, rule: ruleMembers},
		{name: "writer moved to a removed member", old: reps("n1:i", "n2:i", "n3:i"), members: []string{"n1", "n2"}, by: primaryN5, change: chg(6, "n3", reps("n1:i", "n2:i", "n3:i")), err: ErrIllegalChange, rule: ruleMembers},
		{name: "a removed member's copy advances", old: base, members: []string{"n1", "n2"}, by: writerN1, change: chg(5, "n1", reps("n1:i", "n2:i", "n3:r")), err: ErrIllegalChange, rule: ruleMembers},
		{name: "no copy left in sync", old: base, by: writerN1, change: chg(6, "n1", reps("n1:o", "n2:o", "n3:o")), err: ErrIllegalChange, rule: ruleLastInSync},
		{name: "primary drops the last in-sync copy", old: reps("n1:i", "n2:o"), by: primaryN5, change: CopyChange{Name: "m", ExpectedEpoch: 5, Epoch: 6, Writer: "n2", Copies: 1, Replicas: reps("n2:o")}, err: ErrIllegalChange, rule: ruleLastInSync},
		{name: "writer holds no copy", old: base, by: primaryN5, change: chg(6, "n1", reps("n2:i", "n3:o")), err: ErrIllegalChange, rule: ruleWriterCopy},
		{name: "writer records its own copy out of sync", old: base, by: writerN1, change: chg(6, "n1", reps("n1:o", "n2:i", "n3:o")), err: ErrIllegalChange, rule: ruleWriterSync},
		{name: "writer moves the writer (not the primary)", old: base, by: writerN1, change: chg(6, "n2", base), err: ErrIllegalChange, rule: ruleWriterMove},
		{name: "a member moves the writer to itself (the audit)", old: base, by: Proposer{NodeID: "n4"}, change: chg(6, "n4", reps("n1:i", "n2:i", "n3:o", "n4:i")), err: ErrIllegalChange, rule: ruleWriterMove},
		{name: "primary promotes an out-of-sync copy", old: base, by: primaryN5, change: chg(6, "n3", reps("n1:i", "n2:i", "n3:i")), err: ErrIllegalChange, rule: ruleWriterMove},
		{name: "new → in-sync", old: reps("n1:i", "n3:n"), by: writerN1, change: chg(6, "n1", reps("n1:i", "n3:i")), err: ErrIllegalChange, rule: ruleTransition},
		{name: "out-of-sync → in-sync", old: base, by: writerN1, change: chg(6, "n1", reps("n1:i", "n2:i", "n3:i")), err: ErrIllegalChange, rule: ruleTransition},
		{name: "new → resyncing", old: reps("n1:i", "n3:n"), by: writerN1, change: chg(5, "n1", reps("n1:i", "n3:r")), err: ErrIllegalChange, rule: ruleTransition},
		{name: "in-sync → resyncing", old: base, by: writerN1, change: chg(6, "n1", reps("n1:i", "n2:r", "n3:o")), err: ErrIllegalChange, rule: ruleTransition},
		{name: "primary adds an in-sync copy (an empty copy marked in sync)", old: base, by: primaryN5, change: chg(6, "n1", reps("n1:i", "n2:i", "n3:o", "n4:i")), err: ErrIllegalChange, rule: ruleAdded},
		{name: "primary adds an out-of-sync copy", old: base, by: primaryN5, change: chg(6, "n1", reps("n1:i", "n2:i", "n3:o", "n4:o")), err: ErrIllegalChange, rule: ruleAdded},
		{name: "primary moves the writer and drops the old writer's copy", old: base, by: primaryN5, change: chg(6, "n2", reps("n2:i", "n3:o")), err: ErrIllegalChange, rule: ruleRemoved},
		{name: "writer adds a copy", old: base, by: writerN1, change: chg(6, "n1", reps("n1:i", "n2:i", "n3:o", "n4:n")), err: ErrIllegalChange, rule: ruleProposer},
		{name: "writer removes a copy", old: base, by: writerN1, change: chg(6, "n1", reps("n1:i", "n2:i")), err: ErrIllegalChange, rule: ruleProposer},
		{name: "a member without a copy changes a state", old: base, by: Proposer{NodeID: "n4"}, change: chg(5, "n1", reps("n1:i", "n2:i", "n3:r")), err: ErrIllegalChange, rule: ruleProposer},
		{name: "a copy records itself resyncing", old: base, by: Proposer{NodeID: "n3"}, change: chg(5, "n1", reps("n1:i", "n2:i", "n3:r")), err: ErrIllegalChange, rule: ruleProposer},
		{name: "a copy records itself new and another out of sync", old: base, by: Proposer{NodeID: "n3"}, change: chg(6, "n1", reps("n1:i", "n2:o", "n3:n")), err: ErrIllegalChange, rule: ruleProposer},
		{name: "a copy records another copy new", old: base, by: Proposer{NodeID: "n3"}, change: chg(6, "n1", reps("n1:i", "n2:n", "n3:o")), err: ErrIllegalChange, rule: ruleProposer},
		{name: "primary (not the writer) changes a state without moving the writer", old: base, by: primaryN5, change: chg(6, "n1", reps("n1:i", "n2:o", "n3:o")), err: ErrIllegalChange, rule: ruleProposer},
		{name: "primary moves the writer and demotes another copy", old: base, by: primaryN5, change: chg(6, "n2", reps("n1:i", "n2:i", "n3:n")), err: ErrIllegalChange, rule: ruleProposer},
		{name: "an outsider proposes no change", old: base, by: Proposer{NodeID: "n4"}, change: chg(5, "n1", base), err: ErrIllegalChange, rule: ruleProposer},
		{name: "a proposer without an identity", old: base, by: Proposer{}, change: chg(5, "n1", base), err: ErrIllegalChange, rule: ruleProposer},
	}
}

func (tc copyCase) record() LU {
	writer := tc.writer
	if writer == "" {
		writer = "n1"
	}
	return LU{Name: "m", SizeBytes: 1 << 20, Kind: KindFile, Copies: len(tc.old), CreatedOn: "n1", Writer: writer,
		Epoch: 5, Replicas: append([]Replica(nil), tc.old...)}
}

func (tc copyCase) memberSet() map[string]bool {
	ids := tc.members
	if ids == nil {
		ids = []string{"n1", "n2", "n3", "n4", "n5"}
		for i := 0; i <= CopiesMax; i++ {
			ids = append(ids, fmt.Sprintf("x%02d", i))
		}
	}
	out := map[string]bool{}
	for _, id := range ids {
		out[id] = true
	}
	return out
}

func TestCheckCopyChange(t *testing.T) {
	cases := copyCases()
	legal, illegalRows := 0, 0
	rules := map[string]bool{}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := CheckCopyChange(tc.record(), tc.change, tc.by, tc.memberSet())
			if tc.err == nil {
				if err != nil {
					t.Fatalf("legal change refused: %v", err)
				}
				return
			}
			if !errors.Is(err, tc.err) {
				t.Fatalf("got %v, want %v (rule %q)", err, tc.err, tc.rule)
			}
			if !strings.Contains(err.Error(), tc.rule) {
				t.Fatalf("error %q does not name the rule %q", err, tc.rule)
			}
		})
		if tc.err == nil {
			legal++
		} else {
			illegalRows++
			rules[tc.rule] = true
		}
	}
	if legal < 10 || illegalRows < 30 {
		t.Fatalf("%d legal and %d illegal rows; the table must keep at least 10 and 30", legal, illegalRows)
	}
	// Every rule has at least one row that breaks it.
	for _, r := range []string{ruleName, ruleCount, ruleDistinct, ruleState, ruleMembers, ruleEpoch, ruleLastInSync,
		ruleWriterCopy, ruleWriterSync, ruleWriterMove, ruleTransition, ruleAdded, ruleRemoved, ruleProposer} {
		if !rules[r] {
			t.Errorf("no row breaks rule %q", r)
		}
	}
}

// TestLegalTransitions checks the whole state matrix against the list of
// allowed moves.
func TestLegalTransitions(t *testing.T) {
	states := []string{ReplicaInSync, ReplicaOutOfSync, ReplicaResyncing, ReplicaNew}
	allowed := map[[2]string]bool{
		{ReplicaInSync, ReplicaOutOfSync}:    true,
		{ReplicaOutOfSync, ReplicaResyncing}: true,
		{ReplicaResyncing, ReplicaOutOfSync}: true,
		{ReplicaResyncing, ReplicaInSync}:    true,
		{ReplicaNew, ReplicaOutOfSync}:       true,
	}
	for _, from := range states {
		for _, to := range states {
			want := from == to || to == ReplicaNew || allowed[[2]string{from, to}]
			if got := legalTransition(from, to); got != want {
				t.Errorf("%s → %s: legal %v, want %v", from, to, got, want)
			}
		}
	}
	if legalTransition("bogus", ReplicaInSync) {
		t.Error("an unknown state may become in sync")
	}
}

// TestApplyRejectsIllegalCopies runs every illegal row of the table as a
// raw lu.copies log entry: Apply refuses it with the same error, the
// state in Pebble stays byte-for-byte as it was except the applied index
// and the rejected counter, which goes up by one; legal rows apply.
func TestApplyRejectsIllegalCopies(t *testing.T) {
	for _, tc := range copyCases() {
		t.Run(tc.name, func(t *testing.T) {
			f := newTestFSM(t)
			var index uint64
			members := tc.memberSet()
			for id := range members {
				index++
				applyOK(t, f, entry(t, index, &command{Type: cmdUpsertNode, By: id, Node: &nodeRecord{ID: id, PeerAddr: "p-" + id}}))
			}
			// The recorded LU as the test's starting state (a create
			// cannot make copies that are not in sync).
			b := f.db.NewBatch()
			if err := putJSON(b, luPrefix+"m", tc.record()); err != nil {
				t.Fatal(err)
			}
			if err := b.Commit(pebble.Sync); err != nil {
				t.Fatal(err)
			}
			before := dump(t, f)
			rejectedBefore := f.rejected.Load()
			index++
			ch := tc.change
			res, _ := f.Apply(entry(t, index, &command{Type: cmdCopies, By: tc.by.NodeID, Primary: tc.by.Primary, Change: &ch})).(applyResult)
			if f.applied.Load() != index {
				t.Fatalf("applied index %d, want %d", f.applied.Load(), index)
			}
			if tc.err == nil {
				if res.err != nil || res.change == nil || res.change.Kind != Updated {
					t.Fatalf("legal change: %+v", res)
				}
				got, err := f.mustGetLU("m")
				if err != nil || got.Epoch != tc.change.Epoch || got.Writer != tc.change.Writer || !reflect.DeepEqual(got.Replicas, tc.change.Replicas) {
					t.Fatalf("after a legal change: %+v, %v; want %+v", got, err, tc.change)
				}
				return
			}
			wantErr, wantRule := tc.err, tc.rule
			if tc.rule == ruleName {
				// Apply looks the LU up by the change's name.
				wantErr, wantRule = ErrNotFound, tc.change.Name
			}
			if !errors.Is(res.err, wantErr) || !strings.Contains(res.err.Error(), wantRule) || res.change != nil {
				t.Fatalf("Apply: %+v, want %v naming %q", res, tc.err, tc.rule)
			}
			after := dump(t, f)
			if stripCounters(after) != stripCounters(before) {
				t.Fatalf("a rejected entry changed the state:\n%s\nwas\n%s", after, before)
			}
			rejected, err := getUint64(f.db, keyRejected)
			if err != nil || rejected != rejectedBefore+1 || f.rejected.Load() != rejected {
				t.Fatalf("rejected counter %d (%v), in memory %d; want %d", rejected, err, f.rejected.Load(), rejectedBefore+1)
			}
		})
	}
}

// stripCounters drops the applied index and the rejected counter from a dump.
func stripCounters(s string) string {
	var keep []string
	for _, line := range strings.Split(s, "\n") {
		// A rejected entry moves the counters and leaves a CommandRejected
		// event (TestFSMDataDriven, testdata/fsm/events, checks it).
		if !strings.HasPrefix(line, keyApplied+"=") && !strings.HasPrefix(line, keyRejected+"=") &&
			!strings.HasPrefix(line, eventPrefix) && !strings.HasPrefix(line, keyEventSeq+"=") {
			keep = append(keep, line)
		}
	}
	return strings.Join(keep, "\n")
}

func TestCheckNodeUpsert(t *testing.T) {
	rec := nodeRecord{ID: "n2", PeerAddr: "p"}
	for _, tc := range []struct {
		name   string
		join   bool
		by     Proposer
		exists bool
		err    error
	}{
		{"own record, new", false, Proposer{NodeID: "n2"}, false, nil},
		{"own record, update", false, Proposer{NodeID: "n2"}, true, nil},
		{"own record through the primary", false, Proposer{NodeID: "n2", Primary: false}, true, nil},
		{"another node's record", false, Proposer{NodeID: "n3"}, true, ErrForeignRecord},
		{"the primary rewrites another node's record", false, Proposer{NodeID: "n1", Primary: true}, true, ErrForeignRecord},
		{"no proposer", false, Proposer{}, true, ErrForeignRecord},
		{"join of a new id", true, Proposer{NodeID: "n1", Primary: true}, false, nil},
		{"join over an existing record", true, Proposer{NodeID: "n1", Primary: true}, true, ErrMember},
		{"join not by the primary", true, Proposer{NodeID: "n3"}, false, ErrForeignRecord},
	} {
		if err := checkNodeUpsert(rec, tc.join, tc.by, tc.exists); !errors.Is(err, tc.err) || (tc.err == nil) != (err == nil) {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.err)
		}
	}
}

func rejectedMetric(t *testing.T, n *Node) float64 {
	t.Helper()
	reg := prometheus.NewRegistry()
	for _, c := range n.Collectors() {
		if err := reg.Register(c); err != nil {
			t.Fatal(err)
		}
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "lupool_raft_rejected_commands_total" {
			return mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	t.Fatal("lupool_raft_rejected_commands_total missing")
	return 0
}

// TestChangeCopies drives copy changes through a real one-node log: legal
// ones apply, a stale epoch loses, an illegal one is refused before the log
// by the pre-check and, when it reaches the log anyway, by Apply, which
// counts it and changes nothing.
func TestChangeCopies(t *testing.T) {
	n := openNode(t, testOptions(t, t.TempDir(), "n1", true))
	ctx := ctxT(t)
	waitLeaderIs(t, n)
	if err := n.RegisterNode(ctx, Proposer{NodeID: "n2"}, NodeAddrs{ID: "n2", PeerAddr: "127.0.0.1:9", APIAddr: "127.0.0.1:19"}); err != nil {
		t.Fatal(err)
	}
	if err := n.CreateLU(ctx, LU{Name: "m", SizeBytes: 1 << 20, Copies: 2, Replicas: reps("n1:i", "n2:i")}); err != nil {
		t.Fatal(err)
	}
	var seen changeLog
	_, cancel, err := n.ListAndWatch(seen.add)
	if err != nil {
		t.Fatal(err)
	}
	defer cancel()

	// Two proposers start from epoch 1 at once; exactly one wins.
	demote := CopyChange{Name: "m", ExpectedEpoch: 1, Epoch: 2, Writer: "n1", Copies: 2, Replicas: reps("n1:i", "n2:o")}
	move := CopyChange{Name: "m", ExpectedEpoch: 1, Epoch: 2, Writer: "n2", Copies: 2, Replicas: reps("n1:i", "n2:i")}
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i, p := range []struct {
		by Proposer
		c  CopyChange
	}{{Proposer{NodeID: "n1"}, demote}, {Proposer{NodeID: "n1", Primary: true}, move}} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = n.ChangeCopies(ctx, p.by, p.c)
		}()
	}
	wg.Wait()
	if (errs[0] == nil) == (errs[1] == nil) {
		t.Fatalf("racing changes from epoch 1: %v, %v; want exactly one to win", errs[0], errs[1])
	}
	for _, err := range errs {
		if err != nil && !errors.Is(err, ErrEpochChanged) {
			t.Fatalf("losing change: %v, want ErrEpochChanged", err)
		}
	}
	got, err := n.GetLU("m")
	if err != nil || got.Epoch != 2 {
		t.Fatalf("after the race: %+v, %v", got, err)
	}
	if c := seen.get(); len(c) != 1 || c[0].Kind != Updated || c[0].LU.Epoch != 2 {
		t.Fatalf("changes: %+v", c)
	}

	// From here on n1 is the writer with n2 out of sync: reset to that.
	wantChanges := 1
	if got.Writer == "n2" {
		wantChanges++
		t.Log("the writer move won the race; moving it back and demoting n2")
		back := CopyChange{Name: "m", ExpectedEpoch: 2, Epoch: 3, Writer: "n1", Copies: 2, Replicas: reps("n1:i", "n2:o")}
		if err := n.ChangeCopies(ctx, Proposer{NodeID: "n1", Primary: true}, back); err != nil {
			t.Fatal(err)
		}
	}
	cur, err := n.GetLU("m")
	if err != nil || !reflect.DeepEqual(cur.Replicas, reps("n1:i", "n2:o")) {
		t.Fatalf("m = %+v, %v", cur, err)
	}

	// n2 marks its own out-of-sync copy in sync: refused by the pre-check,
	// without a log entry.
	selfHeal := CopyChange{Name: "m", ExpectedEpoch: cur.Epoch, Epoch: cur.Epoch + 1, Writer: "n1", Copies: 2, Replicas: reps("n1:i", "n2:i")}
	// (The race's loser may have been rejected in Apply: count from here.)
	index, rejected := n.Stats().LastLogIndex, n.Stats().Rejected
	if err := n.ChangeCopies(ctx, Proposer{NodeID: "n2"}, selfHeal); !errors.Is(err, ErrIllegalChange) {
		t.Fatalf("self-heal: %v, want ErrIllegalChange", err)
	}
	if st := n.Stats(); st.LastLogIndex != index || st.Rejected != rejected {
		t.Fatalf("the pre-check let the illegal change into the log: %+v", st)
	}
	if err := n.ChangeCopies(ctx, Proposer{}, selfHeal); !errors.Is(err, ErrInvalid) {
		t.Fatalf("a change without a proposer: %v, want ErrInvalid", err)
	}
	if err := n.ChangeCopies(ctx, Proposer{NodeID: "n1"}, CopyChange{Name: "nope", ExpectedEpoch: 1, Epoch: 1}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown LU: %v, want ErrNotFound", err)
	}

	// The same entry put into the log directly (a proposer that skipped the
	// pre-check) is refused by Apply: counted, and nothing changes.
	var before string
	if err := n.readDB(func() error { before = stripCounters(dumpDB(t, n.db)); return nil }); err != nil {
		t.Fatal(err)
	}
	_, err = n.propose(ctx, &command{Type: cmdCopies, By: "n2", Change: &selfHeal})
	if !errors.Is(err, ErrIllegalChange) || !strings.Contains(err.Error(), ruleTransition) {
		t.Fatalf("illegal entry through the log: %v, want ErrIllegalChange naming %q", err, ruleTransition)
	}
	var after string
	if err := n.readDB(func() error { after = stripCounters(dumpDB(t, n.db)); return nil }); err != nil {
		t.Fatal(err)
	}
	if after != before {
		t.Fatalf("a rejected entry changed the state:\n%s\nwas\n%s", after, before)
	}
	if st := n.Stats(); st.Rejected != rejected+1 {
		t.Fatalf("rejected = %d, want %d", st.Rejected, rejected+1)
	}
	if v := rejectedMetric(t, n); v != float64(rejected+1) {
		t.Fatalf("lupool_raft_rejected_commands_total = %v, want %d", v, rejected+1)
	}
	if c := seen.get(); len(c) != wantChanges {
		t.Fatalf("a rejected entry reached the watchers: %+v", c)
	}

	// The legal path: writer resyncs, then records in sync.
	resync := CopyChange{Name: "m", ExpectedEpoch: cur.Epoch, Epoch: cur.Epoch, Writer: "n1", Copies: 2, Replicas: reps("n1:i", "n2:r")}
	if err := n.ChangeCopies(ctx, Proposer{NodeID: "n1"}, resync); err != nil {
		t.Fatal(err)
	}
	done := CopyChange{Name: "m", ExpectedEpoch: cur.Epoch, Epoch: cur.Epoch + 1, Writer: "n1", Copies: 2, Replicas: reps("n1:i", "n2:i")}
	if err := n.ChangeCopies(ctx, Proposer{NodeID: "n1"}, done); err != nil {
		t.Fatal(err)
	}
	if got, err := n.GetLU("m"); err != nil || got.Epoch != cur.Epoch+1 || !reflect.DeepEqual(got.Replicas, reps("n1:i", "n2:i")) ||
		got.SizeBytes != 1<<20 || got.Copies != 2 {
		t.Fatalf("after resync: %+v, %v", got, err)
	}
}

// dumpDB returns every state machine key and value of db.
func dumpDB(t *testing.T, db *pebble.DB) string {
	t.Helper()
	var b strings.Builder
	if err := scan(db, metaPrefix, func(k, v []byte) error {
		fmt.Fprintf(&b, "%s=%x\n", k, v)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return b.String()
}

// TestNodeRecordHijack: a member cannot write another member's record,
// neither through RegisterNode nor with an entry put into the log.
func TestNodeRecordHijack(t *testing.T) {
	n := openNode(t, testOptions(t, t.TempDir(), "n1", true))
	ctx := ctxT(t)
	waitLeaderIs(t, n)
	if err := n.RegisterNode(ctx, Proposer{NodeID: "n2"}, NodeAddrs{ID: "n2", PeerAddr: "127.0.0.1:9", APIAddr: "127.0.0.1:19"}); err != nil {
		t.Fatal(err)
	}
	nodesBefore, err := n.Nodes()
	if err != nil {
		t.Fatal(err)
	}
	evil := NodeAddrs{ID: "n1", PeerAddr: "10.6.6.6:1", APIAddr: "10.6.6.6:2"}
	if err := n.RegisterNode(ctx, Proposer{NodeID: "n2"}, evil); !errors.Is(err, ErrForeignRecord) {
		t.Fatalf("n2 registers n1's addresses: %v, want ErrForeignRecord", err)
	}
	if err := n.RegisterNode(ctx, Proposer{NodeID: "n2", Primary: true}, evil); !errors.Is(err, ErrForeignRecord) {
		t.Fatalf("with the primary flag: %v, want ErrForeignRecord", err)
	}
	if err := n.RegisterNode(ctx, Proposer{NodeID: "n2"}, NodeAddrs{ID: "n2"}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("without a peer address: %v, want ErrInvalid", err)
	}
	rec := nodeRecord{ID: "n1", PeerAddr: evil.PeerAddr, APIAddr: evil.APIAddr}
	if _, err := n.propose(ctx, &command{Type: cmdUpsertNode, By: "n2", Node: &rec}); !errors.Is(err, ErrForeignRecord) {
		t.Fatalf("hijack entry in the log: %v, want ErrForeignRecord", err)
	}
	if _, err := n.propose(ctx, &command{Type: cmdUpsertNode, By: "n1", Primary: true, Join: true, Node: &rec}); !errors.Is(err, ErrMember) {
		t.Fatalf("join over n1's record: %v, want ErrMember", err)
	}
	if _, err := n.propose(ctx, &command{Type: cmdRemoveNode, By: "n2", Name: "n1"}); !errors.Is(err, ErrForeignRecord) {
		t.Fatalf("n2 removes n1's record: %v, want ErrForeignRecord", err)
	}
	nodesAfter, err := n.Nodes()
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(nodesAfter, nodesBefore) {
		t.Fatalf("records changed:\n%+v\nwas\n%+v", nodesAfter, nodesBefore)
	}
	if id, api := n.Leader(); id != "n1" || api != n.opts.APIAddr {
		t.Fatalf("Leader() = %s %s after the hijack attempts", id, api)
	}
	if st := n.Stats(); st.Rejected != 3 {
		t.Fatalf("rejected %d, want 3", st.Rejected)
	}
	// A node re-registers its own addresses.
	if err := n.RegisterNode(ctx, Proposer{NodeID: "n2"}, NodeAddrs{ID: "n2", PeerAddr: "127.0.0.1:9", APIAddr: "127.0.0.1:29"}); err != nil {
		t.Fatal(err)
	}
	nodes, err := n.Nodes()
	if err != nil || len(nodes) != 2 || nodes[1].APIAddr != "127.0.0.1:29" {
		t.Fatalf("after n2 re-registered: %+v, %v", nodes, err)
	}
}

func configIDs(t *testing.T, n *Node) string {
	t.Helper()
	f := n.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprint(f.Configuration().Servers)
}

// TestAddVoterExistingMember: joining with a member's id at another
// address is refused before raft is touched; the same join again is a
// no-op.
func TestAddVoterExistingMember(t *testing.T) {
	ctx := ctxT(t)
	n1 := openNode(t, testOptions(t, t.TempDir(), "n1", true))
	waitLeaderIs(t, n1)
	n2 := openNode(t, testOptions(t, t.TempDir(), "n2", false))
	all := []*Node{n1, n2}
	onLeader(t, all, nil, func(l *Node) error {
		return l.AddVoter(ctx, "n2", n2.PeerAddress(), n2.opts.APIAddr, n2.opts.NBDAddr, "")
	})
	var leader *Node
	waitFor(t, "a leader that knows both records", func() bool {
		for _, f := range all {
			if f.IsLeader() && f.IsMember("n1") && f.IsMember("n2") {
				leader = f
				return true
			}
		}
		return false
	})
	// A record without a configuration entry (a node that registered itself).
	onLeader(t, all, nil, func(l *Node) error {
		return l.RegisterNode(ctx, Proposer{NodeID: "n5"}, NodeAddrs{ID: "n5", PeerAddr: "127.0.0.1:5", APIAddr: "127.0.0.1:15"})
	})
	waitFor(t, "n5's record", func() bool { return leader.IsMember("n5") })
	conf := configIDs(t, leader)
	nodes, err := leader.Nodes()
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ id, peer string }{
		{"n2", "10.6.6.6:10811"}, // in the configuration and recorded
		{"n1", "10.6.6.6:10811"}, // the first node
		{"n5", "10.6.6.6:10811"}, // recorded only
		{"n1", n2.PeerAddress()}, // n1's id at n2's address
		{"n2", n1.PeerAddress()}, // n2's id at n1's address
		{"n5", n1.PeerAddress()}, // a recorded id at a member's address
	} {
		err := leader.AddVoter(ctx, tc.id, tc.peer, "10.6.6.6:1", "10.6.6.6:2", "")
		if !errors.Is(err, ErrMember) {
			t.Fatalf("AddVoter(%s, %s): %v, want ErrMember", tc.id, tc.peer, err)
		}
	}
	if got := configIDs(t, leader); got != conf {
		t.Fatalf("raft configuration changed:\n%s\nwas\n%s", got, conf)
	}
	// The same join again changes nothing and succeeds.
	if err := leader.AddVoter(ctx, "n2", n2.PeerAddress(), "10.6.6.6:1", "10.6.6.6:2", ""); err != nil {
		t.Fatalf("repeated join: %v", err)
	}
	after, err := leader.Nodes()
	if err != nil {
		t.Fatal(err)
	}
	if got := configIDs(t, leader); got != conf || !reflect.DeepEqual(after, nodes) {
		t.Fatalf("a repeated join changed the pool:\n%s %+v\nwas\n%s %+v", got, after, conf, nodes)
	}
	if leader.IsMember("mallory") || !leader.IsMember("n2") {
		t.Fatalf("IsMember: mallory %v, n2 %v", leader.IsMember("mallory"), leader.IsMember("n2"))
	}
}

// TestCreateLUFreshNode creates LUs on a node that was just bootstrapped,
// without waiting for its leader loop to record it: CreateLU records the
// node first, so the writer's copy is on a member.
func TestCreateLUFreshNode(t *testing.T) {
	n := openNode(t, testOptions(t, t.TempDir(), "n1", true))
	ctx := ctxT(t)
	if err := n.WaitLeader(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "n1 to lead", n.IsLeader)
	for i := range 3 {
		if err := n.CreateLU(ctx, LU{Name: fmt.Sprintf("f%d", i), SizeBytes: 512}); err != nil {
			t.Fatalf("CreateLU on a fresh node: %v", err)
		}
	}
	if !n.IsMember("n1") {
		t.Fatal("n1 has no record after CreateLU")
	}
	if err := n.CreateLU(ctx, LU{Name: "far", SizeBytes: 512, Writer: "n7"}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("an LU whose writer is no member: %v, want ErrInvalid", err)
	}
	if err := n.CreateLU(ctx, LU{Name: "two", SizeBytes: 512, Copies: 2}); !errors.Is(err, ErrInvalid) ||
		!strings.Contains(err.Error(), "list every copy") {
		t.Fatalf("two copies without a list: %v, want ErrInvalid saying to list the copies", err)
	}
	if st := n.Stats(); st.LUs != 3 || st.Rejected != 0 {
		t.Fatalf("stats %+v", st)
	}
}

// TestReplaceLoopReplacesLaggingCopy: the primary's replace loop swaps a
// copy that stayed out of sync for a new copy on another node, through
// ChangeCopies as the primary.
func TestReplaceLoopReplacesLaggingCopy(t *testing.T) {
	opts := testOptions(t, t.TempDir(), "n1", true)
	opts.ReplaceAfter = 300 * time.Millisecond
	n := openNode(t, opts)
	ctx := ctxT(t)
	waitLeaderIs(t, n)
	// n2 holds the lagging copy (a record only); n3 can take a copy: a
	// non-voter in the configuration (no quorum effect; nothing listens)
	// with a record and an API address.
	if err := n.RegisterNode(ctx, Proposer{NodeID: "n2"}, NodeAddrs{ID: "n2", PeerAddr: freePort(t), APIAddr: "127.0.0.1:12"}); err != nil {
		t.Fatal(err)
	}
	p3 := freePort(t)
	if err := n.raft.AddNonvoter("n3", raft.ServerAddress(p3), 0, testTimeout).Error(); err != nil {
		t.Fatal(err)
	}
	if err := n.RegisterNode(ctx, Proposer{NodeID: "n3"}, NodeAddrs{ID: "n3", PeerAddr: p3, APIAddr: "127.0.0.1:13", NBDAddr: "127.0.0.1:23"}); err != nil {
		t.Fatal(err)
	}
	if err := n.CreateLU(ctx, LU{Name: "m", SizeBytes: 1 << 20, Copies: 2, Replicas: reps("n1:i", "n2:i")}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	lag := CopyChange{Name: "m", ExpectedEpoch: 1, Epoch: 2, Writer: "n1", Copies: 2, Replicas: reps("n1:i", "n2:o")}
	if err := n.ChangeCopies(ctx, Proposer{NodeID: "n1"}, lag); err != nil {
		t.Fatal(err)
	}
	var got LU
	waitFor(t, "the lagging copy on n2 to be replaced", func() bool {
		var err error
		got, err = n.GetLU("m")
		return err == nil && got.Epoch == 3
	})
	if !reflect.DeepEqual(got.Replicas, reps("n1:i", "n3:n")) || got.Writer != "n1" || got.Copies != 2 {
		t.Fatalf("after replacement: %+v", got)
	}
	if took := time.Since(start); took < opts.ReplaceAfter {
		t.Fatalf("replaced after %v, before ReplaceAfter %v", took, opts.ReplaceAfter)
	}
	if st := n.Stats(); st.Rejected != 0 {
		t.Fatalf("the replace loop's change was rejected: %+v", st)
	}
}
