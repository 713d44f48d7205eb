package cluster

import (
	"errors"
	"strconv"
	"testing"
	"time"
)

// TestEventLogOnNode checks the event log of a running one-node cluster:
// the primary announces itself, LU commands derive events in order, a
// proposed event is numbered after them, EventsChanged wakes a reader, and
// the retention loop prunes beyond EventsMax while keeping the seq counter.
func TestEventLogOnNode(t *testing.T) {
	opts := testOptions(t, t.TempDir(), "n1", true)
	opts.EventsMax = 4
	opts.EventRetentionEvery = 50 * time.Millisecond
	n := openNode(t, opts)
	ctx := ctxT(t)
	if err := n.WaitLeader(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "PrimaryElected", func() bool {
		evs, err := n.Events(0, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, ev := range evs {
			if ev.Kind == EventPrimaryElected && ev.Node == "n1" && ev.Details["term"] != "" {
				return true
			}
		}
		return false
	})
	last := n.LastEventSeq()
	changed := n.EventsChanged()
	if err := n.CreateLU(ctx, LU{Name: "a", SizeBytes: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-changed:
	case <-time.After(testTimeout):
		t.Fatal("EventsChanged not closed after an LU was created")
	}
	if err := n.AppendEvent(ctx, Proposer{NodeID: "n1"}, Event{Kind: EventPoolThreshold, Details: map[string]string{"level": "warn"}}); err != nil {
		t.Fatal(err)
	}
	if err := n.DeleteLU(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	evs, err := n.Events(last, 0)
	if err != nil {
		t.Fatal(err)
	}
	var kinds []string
	for i, ev := range evs {
		if ev.Seq != last+uint64(i)+1 {
			t.Fatalf("event %d has seq %d, want %d (no gaps)", i, ev.Seq, last+uint64(i)+1)
		}
		if ev.Kind == EventPrimaryElected && ev.Details["term"] != "" {
			continue // a re-election on a starved machine: a new term, rightly recorded
		}
		kinds = append(kinds, ev.Kind)
	}
	want := []string{EventLUCreated, EventPoolThreshold, EventLUDeleted}
	if len(kinds) != len(want) {
		t.Fatalf("events after %d: %v, want %v", last, kinds, want)
	}
	for i := range want {
		if kinds[i] != want[i] {
			t.Fatalf("events after %d: %v, want %v", last, kinds, want)
		}
	}
	if evs[1].Node != "n1" || evs[1].By != "n1" {
		t.Fatalf("a node's own event: node %q by %q, want n1 n1", evs[1].Node, evs[1].By)
	}
	// Refused before the log: an unknown kind, a derived kind, another node's event.
	for _, bad := range []struct {
		by Proposer
		ev Event
	}{
		{Proposer{NodeID: "n1"}, Event{Kind: "NoSuchKind"}},
		{Proposer{NodeID: "n1", Primary: true}, Event{Kind: EventLUDeleted, LU: "a"}},
		{Proposer{NodeID: "n1"}, Event{Kind: EventNodeDead, Node: "n2"}},
	} {
		err := n.AppendEvent(ctx, bad.by, bad.ev)
		if !errors.Is(err, ErrInvalid) && !errors.Is(err, ErrForeignRecord) {
			t.Fatalf("AppendEvent(%+v) = %v, want ErrInvalid or ErrForeignRecord", bad.ev, err)
		}
	}
	lastSeq := n.LastEventSeq()
	waitFor(t, "retention to keep 4 events", func() bool {
		evs, err := n.Events(0, 0)
		if err != nil {
			t.Fatal(err)
		}
		// A prune is itself no event; the log ends at lastSeq.
		return len(evs) == 4 && evs[0].Seq == lastSeq-3 && evs[3].Seq == lastSeq
	})
	if got := n.LastEventSeq(); got != lastSeq {
		t.Fatalf("LastEventSeq after pruning = %d, want %d", got, lastSeq)
	}
}

// TestRetentionCutoff checks the pruning bound by count and by age.
func TestRetentionCutoff(t *testing.T) {
	f := newTestFSM(t)
	b := f.db.NewBatch()
	var evs []Event
	for i := range 10 {
		evs = append(evs, Event{Kind: EventNodeBack, Time: fixedTime.Add(time.Duration(i) * time.Minute)})
	}
	last, err := appendEvents(b, 0, evs)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Commit(nil); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		count int
		age   time.Duration
		now   time.Time
		want  uint64
	}{
		{count: 0, age: 0, now: fixedTime, want: 0},
		{count: 10, age: 0, now: fixedTime, want: 0},
		{count: 4, age: 0, now: fixedTime, want: 7},
		{count: 0, age: 5 * time.Minute, now: fixedTime.Add(9 * time.Minute), want: 5},
		{count: 8, age: 5 * time.Minute, now: fixedTime.Add(9 * time.Minute), want: 5},
		{count: 2, age: 5 * time.Minute, now: fixedTime.Add(9 * time.Minute), want: 9},
		{count: 0, age: time.Hour, now: fixedTime.Add(2 * time.Hour), want: 11},
	} {
		got, err := retentionCutoff(f.db, last, tc.count, tc.age, tc.now)
		if err != nil {
			t.Fatal(err)
		}
		if got != tc.want {
			t.Errorf("retentionCutoff(count %d, age %v) = %d, want %d", tc.count, tc.age, got, tc.want)
		}
	}
}

// waitPrimaryEvent waits until n, the leader, has recorded the
// PrimaryElected event of its current term.
func waitPrimaryEvent(t *testing.T, n *Node) {
	t.Helper()
	waitFor(t, "PrimaryElected of the current term", func() bool {
		term := strconv.FormatUint(n.Stats().Term, 10)
		evs, err := n.Events(0, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, ev := range evs {
			if ev.Kind == EventPrimaryElected && ev.Node == n.ID() && ev.Details["term"] == term {
				return true
			}
		}
		return false
	})
}
