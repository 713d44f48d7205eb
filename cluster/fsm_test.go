package cluster

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus"
)

func newTestFSM(t *testing.T) *fsm {
	t.Helper()
	db, err := pebble.Open("db", &pebble.Options{FS: vfs.NewMem(), Logger: pebbleLogger{testLogger()}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Close() })
	f, err := newFSM(db, testLogger())
	if err != nil {
		t.Fatal(err)
	}
	return f
}

var fixedTime = time.Date(2026, 11, 22, 3, 0, 0, 0, time.UTC)

func entry(t *testing.T, index uint64, c *command) *raft.Log {
	t.Helper()
	if c.At.IsZero() {
		c.At = fixedTime.Add(time.Duration(index) * time.Second)
	}
	data, err := encodeCommand(c)
	if err != nil {
		t.Fatal(err)
	}
	return &raft.Log{Index: index, Term: 1, Type: raft.LogCommand, Data: data}
}

func applyOK(t *testing.T, f *fsm, l *raft.Log) *Change {
	t.Helper()
	res, ok := f.Apply(l).(applyResult)
	if !ok || res.err != nil {
		t.Fatalf("Apply(%d): %+v", l.Index, res)
	}
	return res.change
}

// registerNodes applies one self-registration per id from index first on.
func registerNodes(t *testing.T, f *fsm, first uint64, ids ...string) {
	t.Helper()
	for i, id := range ids {
		applyOK(t, f, entry(t, first+uint64(i), &command{Type: cmdUpsertNode, By: id,
			Node: &nodeRecord{ID: id, PeerAddr: "peer-" + id, APIAddr: "api-" + id}}))
	}
}

func newLU(name string, size int64) *LU {
	lu := withDefaults(LU{Name: name, SizeBytes: size}, "n1")
	return &lu
}

// dump returns every state machine key and value, for comparisons.
func dump(t *testing.T, f *fsm) string {
	t.Helper()
	var b strings.Builder
	if err := scan(f.db, metaPrefix, func(k, v []byte) error {
		fmt.Fprintf(&b, "%s=%x\n", k, v)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return b.String()
}

// memSink is a raft.SnapshotSink in memory.
type memSink struct {
	bytes.Buffer
	closed, cancelled bool
}

func (s *memSink) ID() string    { return "mem" }
func (s *memSink) Close() error  { s.closed = true; return nil }
func (s *memSink) Cancel() error { s.cancelled = true; return nil }

func fillFSM(t *testing.T, f *fsm) uint64 {
	t.Helper()
	applyOK(t, f, entry(t, 1, &command{Type: cmdUpsertNode, By: "n1", Node: &nodeRecord{ID: "n1", PeerAddr: "p", APIAddr: "a"}}))
	i := uint64(1)
	for ; i < 6; i++ {
		applyOK(t, f, entry(t, i+1, &command{Type: cmdCreateLU, LU: newLU(fmt.Sprintf("lu%d", i-1), 512*int64(i))}))
	}
	i++
	applyOK(t, f, entry(t, i, &command{Type: cmdSetSetting, Name: "k", Value: "v"}))
	return i
}

func TestSnapshotRestoreRoundTrip(t *testing.T) {
	src := newTestFSM(t)
	last := fillFSM(t, src)
	snap, err := src.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	// Changes after the snapshot must not leak into it.
	applyOK(t, src, entry(t, last+1, &command{Type: cmdDeleteLU, Name: "lu0"}))
	var sink memSink
	if err := snap.Persist(&sink); err != nil || !sink.closed {
		t.Fatalf("Persist: %v (closed %v)", err, sink.closed)
	}
	snap.Release()

	dst := newTestFSM(t)
	// dst has state of its own that the restore must replace entirely.
	registerNodes(t, dst, 1, "n1", "n9")
	applyOK(t, dst, entry(t, 3, &command{Type: cmdCreateLU, LU: newLU("stale", 512)}))
	applyOK(t, dst, entry(t, 4, &command{Type: cmdCreateLU, LU: newLU("lu1", 4096)}))
	var seen changeLog
	cancel := dst.watch(seen.add)
	defer cancel()
	if err := dst.Restore(io.NopCloser(bytes.NewReader(sink.Bytes()))); err != nil {
		t.Fatal(err)
	}
	ref := newTestFSM(t)
	fillFSM(t, ref)
	if got, want := dump(t, dst), dump(t, ref); got != want {
		t.Fatalf("restored state differs:\n%s\nwant\n%s", got, want)
	}
	if dst.applied.Load() != last || dst.luCount.Load() != 5 {
		t.Fatalf("after restore applied %d, LUs %d", dst.applied.Load(), dst.luCount.Load())
	}
	kinds := map[string]ChangeKind{}
	for _, c := range seen.get() {
		kinds[c.LU.Name] = c.Kind
		if c.Index != last {
			t.Fatalf("restore change index %d, want %d", c.Index, last)
		}
	}
	want := map[string]ChangeKind{"stale": Deleted, "lu0": Created, "lu1": Resized, "lu2": Created, "lu3": Created, "lu4": Created}
	if fmt.Sprint(kinds) != fmt.Sprint(want) {
		t.Fatalf("restore changes %v, want %v", kinds, want)
	}

	// Any damage to the stream is refused and leaves the state as it was.
	before := dump(t, dst)
	good := sink.Bytes()
	for _, bad := range [][]byte{
		nil,
		good[:len(good)-1],
		good[:len(good)/2],
		append(append([]byte(nil), good[:len(good)-3]...), good[len(good)-3]^1, good[len(good)-2], good[len(good)-1]),
		append(append([]byte(nil), good[:40]...), append([]byte{good[40] ^ 0x10}, good[41:]...)...),
	} {
		if err := dst.Restore(io.NopCloser(bytes.NewReader(bad))); err == nil {
			t.Fatalf("Restore of a damaged stream (%d bytes) succeeded", len(bad))
		}
		if dump(t, dst) != before {
			t.Fatal("a failed Restore changed the state")
		}
	}
}

// TestRejectedCommands puts commands that must not change the state into
// the log: each is refused with an error, counted, and moves only the
// applied index.
func TestRejectedCommands(t *testing.T) {
	f := newTestFSM(t)
	registerNodes(t, f, 1, "n1", "n2")
	applyOK(t, f, entry(t, 3, &command{Type: cmdCreateLU, LU: newLU("a", 512)}))
	two := newLU("two", 512)
	two.Copies, two.Replicas = 2, []Replica{{NodeID: "n1", State: ReplicaInSync}}
	stranger := newLU("stranger", 512)
	stranger.Replicas = []Replica{{NodeID: "mallory", State: ReplicaInSync}}
	stranger.Writer = "mallory"
	notFirst := newLU("notfirst", 512)
	notFirst.Copies, notFirst.Replicas = 2, []Replica{{NodeID: "n2", State: ReplicaInSync}, {NodeID: "n1", State: ReplicaInSync}}
	fresh := newLU("fresh", 512)
	fresh.Replicas[0].State = ReplicaNew
	late := newLU("late", 512)
	late.Epoch = 2
	bad := []struct {
		data []byte
		err  error
	}{
		{[]byte("not json"), ErrInvalid},
		{[]byte(`{"v":2,"type":"lu.create"}`), ErrUnknownCommand},
		{[]byte(`{"v":1,"type":"lu.explode"}`), ErrUnknownCommand},
		{[]byte(`{"v":1,"type":"lu.create"}`), ErrInvalid},
		{mustJSON(t, command{Version: 1, Type: cmdCreateLU, LU: newLU("a", 512)}), ErrExists},
		{mustJSON(t, command{Version: 1, Type: cmdCreateLU, LU: newLU("b c", 512)}), ErrInvalid},
		{mustJSON(t, command{Version: 1, Type: cmdCreateLU, LU: newLU("b", 100)}), ErrInvalid},
		{mustJSON(t, command{Version: 1, Type: cmdCreateLU, LU: &LU{Name: "b", SizeBytes: 512}}), ErrInvalid},
		{mustJSON(t, command{Version: 1, Type: cmdResizeLU, Name: "a", SizeBytes: -512}), ErrInvalid},
		{mustJSON(t, command{Version: 1, Type: cmdResizeLU, Name: "zz", SizeBytes: 512}), ErrNotFound},
		{mustJSON(t, command{Version: 1, Type: cmdDeleteLU, Name: "zz"}), ErrNotFound},
		{mustJSON(t, command{Version: 1, Type: cmdUpdateLU, LU: &LU{Name: "a", Epoch: 0, Copies: 1}}), ErrInvalid},
		// lu.update is retired even when it would be legal as lu.copies.
		{mustJSON(t, command{Version: 1, Type: cmdUpdateLU, IfEpoch: 1, LU: newLU("a", 512)}), ErrInvalid},
		{mustJSON(t, command{Version: 1, Type: cmdSetSetting}), ErrInvalid},
		// New LUs: every copy in sync on a member, the writer's first, epoch 1.
		{mustJSON(t, command{Version: 1, Type: cmdCreateLU, LU: two}), ErrInvalid},
		{mustJSON(t, command{Version: 1, Type: cmdCreateLU, LU: stranger}), ErrInvalid},
		{mustJSON(t, command{Version: 1, Type: cmdCreateLU, LU: notFirst}), ErrInvalid},
		{mustJSON(t, command{Version: 1, Type: cmdCreateLU, LU: fresh}), ErrInvalid},
		{mustJSON(t, command{Version: 1, Type: cmdCreateLU, LU: late}), ErrInvalid},
		// Copy changes go through the rules.
		{[]byte(`{"v":1,"type":"lu.copies","by":"n1"}`), ErrInvalid},
		{mustJSON(t, command{Version: 1, Type: cmdCopies, By: "n2", Change: &CopyChange{Name: "a", ExpectedEpoch: 1, Epoch: 2,
			Writer: "n2", Copies: 1, Replicas: []Replica{{NodeID: "n2", State: ReplicaInSync}}}}), ErrIllegalChange},
		{mustJSON(t, command{Version: 1, Type: cmdCopies, By: "n1", Primary: true, Change: &CopyChange{Name: "a", ExpectedEpoch: 7,
			Epoch: 8, Writer: "n1", Copies: 1, Replicas: []Replica{{NodeID: "n1", State: ReplicaInSync}}}}), ErrEpochChanged},
		{mustJSON(t, command{Version: 1, Type: cmdCopies, By: "n1", Primary: true, Change: &CopyChange{Name: "zz", ExpectedEpoch: 1,
			Epoch: 1, Writer: "n1", Copies: 1, Replicas: []Replica{{NodeID: "n1", State: ReplicaInSync}}}}), ErrNotFound},
		// Node records: only one's own, a join only where none exists.
		{mustJSON(t, command{Version: 1, Type: cmdUpsertNode, By: "n2", Node: &nodeRecord{ID: "n1", PeerAddr: "evil"}}), ErrForeignRecord},
		{mustJSON(t, command{Version: 1, Type: cmdUpsertNode, By: "n1", Primary: true, Join: true,
			Node: &nodeRecord{ID: "n2", PeerAddr: "evil"}}), ErrMember},
		{mustJSON(t, command{Version: 1, Type: cmdUpsertNode, By: "n2", Join: true, Node: &nodeRecord{ID: "n3", PeerAddr: "p"}}), ErrForeignRecord},
		{mustJSON(t, command{Version: 1, Type: cmdRemoveNode, By: "n2", Name: "n1"}), ErrForeignRecord},
	}
	before := dump(t, f)
	for i, b := range bad {
		index := uint64(i + 4)
		res, _ := f.Apply(&raft.Log{Index: index, Term: 1, Type: raft.LogCommand, Data: b.data}).(applyResult)
		if !errors.Is(res.err, b.err) || res.change != nil {
			t.Fatalf("bad command %d (%s): %+v, want %v", i, b.data, res, b.err)
		}
		if f.applied.Load() != index {
			t.Fatalf("bad command %d: applied index %d", i, f.applied.Load())
		}
	}
	if f.rejected.Load() != uint64(len(bad)) {
		t.Fatalf("rejected = %d, want %d", f.rejected.Load(), len(bad))
	}
	evs, err := readEvents(f.db, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	rejectedEvents := 0
	for _, ev := range evs {
		if ev.Kind == EventCommandRejected {
			rejectedEvents++
		}
	}
	if rejectedEvents != len(bad) {
		t.Fatalf("%d CommandRejected events, want %d", rejectedEvents, len(bad))
	}
	// Only the applied index and the rejected counter moved.
	if stripCounters(dump(t, f)) != stripCounters(before) {
		t.Fatal("a rejected command changed the state")
	}
	// Entries at or below the applied index are skipped.
	res, _ := f.Apply(entry(t, 3, &command{Type: cmdCreateLU, LU: newLU("late", 512)})).(applyResult)
	if res.err != nil || res.change != nil || !res.skipped || f.skippedSinceOpen.Load() != 1 {
		t.Fatalf("re-delivered entry: %+v, skipped %d", res, f.skippedSinceOpen.Load())
	}
	if _, err := f.mustGetLU("late"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("a skipped entry was applied: %v", err)
	}
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestApplyDeterministic applies the same log to two state machines and
// checks byte-identical state (timestamps come from the commands).
func TestApplyDeterministic(t *testing.T) {
	var logs []*raft.Log
	for i, id := range []string{"n1", "n2"} {
		logs = append(logs, entry(t, uint64(i+1), &command{Type: cmdUpsertNode, By: id, Node: &nodeRecord{ID: id, PeerAddr: "p-" + id}}))
	}
	logs = append(logs, entry(t, 3, &command{Type: cmdCreateLU, LU: newLU("a", 512)}))
	logs = append(logs, entry(t, 4, &command{Type: cmdResizeLU, Name: "a", SizeBytes: 1024}))
	add := CopyChange{Name: "a", ExpectedEpoch: 1, Epoch: 2, Writer: "n1", Copies: 2,
		Replicas: []Replica{{NodeID: "n1", State: ReplicaInSync}, {NodeID: "n2", State: ReplicaNew}}}
	logs = append(logs, entry(t, 5, &command{Type: cmdCopies, By: "n1", Primary: true, Change: &add}))
	stale := add // the same change again, from the epoch it no longer has
	logs = append(logs, entry(t, 6, &command{Type: cmdCopies, By: "n1", Primary: true, Change: &stale}))
	built := CopyChange{Name: "a", ExpectedEpoch: 2, Epoch: 2, Writer: "n1", Copies: 2,
		Replicas: []Replica{{NodeID: "n1", State: ReplicaInSync}, {NodeID: "n2", State: ReplicaOutOfSync}}}
	logs = append(logs, entry(t, 7, &command{Type: cmdCopies, By: "n1", Change: &built}))
	logs = append(logs, entry(t, 8, &command{Type: cmdCreateLU, LU: newLU("b", 512)}))
	logs = append(logs, entry(t, 9, &command{Type: cmdDeleteLU, Name: "b"}))
	var states []string
	for run := 0; run < 2; run++ {
		f := newTestFSM(t)
		for _, l := range logs {
			f.Apply(l)
		}
		states = append(states, dump(t, f))
		lu, err := f.mustGetLU("a")
		if err != nil || lu.Epoch != 2 || lu.Writer != "n1" || len(lu.Replicas) != 2 || lu.SizeBytes != 1024 ||
			lu.Replicas[1] != (Replica{NodeID: "n2", State: ReplicaOutOfSync}) ||
			!lu.CreatedAt.Equal(fixedTime.Add(3*time.Second)) || !lu.UpdatedAt.Equal(fixedTime.Add(7*time.Second)) {
			t.Fatalf("run %d: a = %+v, %v", run, lu, err)
		}
		if f.rejected.Load() != 1 {
			t.Fatalf("run %d: rejected %d, want 1 (the stale-epoch change)", run, f.rejected.Load())
		}
	}
	if states[0] != states[1] {
		t.Fatalf("same log, different state:\n%s\n%s", states[0], states[1])
	}
}

func TestValidateName(t *testing.T) {
	for _, ok := range []string{"a", "A-b_c.d", strings.Repeat("x", 128), "0"} {
		if err := ValidateName(ok); err != nil {
			t.Errorf("ValidateName(%q): %v", ok, err)
		}
	}
	for _, bad := range []string{"", strings.Repeat("x", 129), "a b", "a/b", "ü", ".", "..", "a\x00"} {
		if err := ValidateName(bad); !errors.Is(err, ErrInvalid) {
			t.Errorf("ValidateName(%q) = %v, want ErrInvalid", bad, err)
		}
	}
	if err := ValidateSize(513); err == nil || !strings.Contains(err.Error(), "1024") {
		t.Errorf("ValidateSize(513) = %v; want a hint to round up to 1024", err)
	}
}

func TestOptionsValidate(t *testing.T) {
	base := Options{Dir: "d", NodeID: "n", PeerAddr: "127.0.0.1:1"}
	base.EnsureDefaults()
	if err := base.Validate(); err != nil {
		t.Fatal(err)
	}
	wild := base
	wild.PeerAddr, wild.PeerAdvertise = "0.0.0.0:10811", "10.0.0.5:10811"
	if err := wild.Validate(); err != nil {
		t.Fatalf("wildcard bind with an advertise address: %v", err)
	}
	for _, mut := range []func(o *Options){
		func(o *Options) { o.Dir = "" },
		func(o *Options) { o.NodeID = "" },
		func(o *Options) { o.PeerAddr = "" },
		func(o *Options) { o.PeerAddr = "nohostport" },
		func(o *Options) { o.PeerAddr = "0.0.0.0:10811" },
		func(o *Options) { o.PeerAddr = ":10811" },
		func(o *Options) { o.LeaderLeaseTimeout = o.HeartbeatTimeout + 1 },
		func(o *Options) { o.ElectionTimeout = o.HeartbeatTimeout - 1 },
	} {
		o := base
		mut(&o)
		if err := o.Validate(); err == nil {
			t.Errorf("Validate accepted %+v", o)
		}
	}
}

// TestRaftRejectsBadEntry sends an undecodable command through the real
// log: the proposer gets the error and the node keeps working.
func TestRaftRejectsBadEntry(t *testing.T) {
	n := openNode(t, testOptions(t, t.TempDir(), "n1", true))
	waitLeaderIs(t, n)
	f := n.raft.Apply([]byte(`{"v":1,"type":"lu.frobnicate"}`), testTimeout)
	if err := f.Error(); err != nil {
		t.Fatal(err)
	}
	if res, _ := f.Response().(applyResult); !errors.Is(res.err, ErrUnknownCommand) {
		t.Fatalf("response %+v, want ErrUnknownCommand", res)
	}
	if err := n.CreateLU(ctxT(t), LU{Name: "ok", SizeBytes: 512}); err != nil {
		t.Fatal(err)
	}
	if st := n.Stats(); st.Rejected != 1 || st.LUs != 1 {
		t.Fatalf("stats %+v", st)
	}

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
	got := map[string]float64{}
	for _, mf := range mfs {
		m := mf.GetMetric()[0]
		if m.GetGauge() != nil {
			got[mf.GetName()] = m.GetGauge().GetValue()
		} else {
			got[mf.GetName()] = m.GetCounter().GetValue()
		}
	}
	st := n.Stats()
	for name, want := range map[string]float64{
		"lupool_raft_state":                     2,
		"lupool_lus":                            1,
		"lupool_raft_rejected_commands_total":   1,
		"lupool_raft_applied_index":             float64(st.FSMIndex),
		"lupool_raft_term":                      float64(st.Term),
		"lupool_raft_nodes":                     1,
		"lupool_raft_applied_since_start_total": float64(st.AppliedSinceOpen),
		"lupool_raft_skipped_since_start_total": 0,
	} {
		if got[name] != want {
			t.Errorf("%s = %v, want %v (all: %v)", name, got[name], want, got)
		}
	}
	if st.AppliedSinceOpen < 3 { // self record, the rejected entry, the create
		t.Errorf("applied since open = %d", st.AppliedSinceOpen)
	}
	if _, ok := got["lupool_raft_commit_index"]; !ok {
		t.Error("lupool_raft_commit_index missing")
	}
}
