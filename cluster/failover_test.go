package cluster

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"
)

func TestPromotionPicksLiveInSyncCopy(t *testing.T) {
	rec := LU{Name: "a", Epoch: 7, Copies: 3, Writer: "n1", Replicas: []Replica{
		{NodeID: "n1", State: ReplicaInSync}, {NodeID: "n2", State: ReplicaInSync}, {NodeID: "n3", State: ReplicaInSync}}}
	for _, tc := range []struct {
		name    string
		state   map[string]string
		written map[string]int
		states  map[string]string // copy states to use instead of rec's
		want    string            // "" = no promotion
	}{
		{"both live, tie by id", map[string]string{"n2": LiveAlive, "n3": LiveAlive}, nil, nil, "n2"},
		{"least loaded", map[string]string{"n2": LiveAlive, "n3": LiveAlive}, map[string]int{"n2": 5, "n3": 1}, nil, "n3"},
		{"suspect skipped", map[string]string{"n2": LiveSuspect, "n3": LiveAlive}, nil, nil, "n3"},
		{"none live", map[string]string{"n2": LiveDead, "n3": LiveSuspect}, nil, nil, ""},
		{"out of sync skipped", map[string]string{"n2": LiveAlive, "n3": LiveAlive}, nil,
			map[string]string{"n2": ReplicaOutOfSync, "n3": ReplicaResyncing}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := cloneRec(rec)
			for i := range r.Replicas {
				if st, ok := tc.states[r.Replicas[i].NodeID]; ok {
					r.Replicas[i].State = st
				}
			}
			next, ok := promotion(r, tc.state, tc.written)
			if tc.want == "" {
				if ok {
					t.Fatalf("promoted %s, want none", next.Writer)
				}
				return
			}
			if !ok || next.Writer != tc.want {
				t.Fatalf("promotion = %+v, %v; want writer %s", next, ok, tc.want)
			}
			if next.Epoch != 8 || next.ExpectedEpoch != 7 || next.Replicas[0].State != ReplicaOutOfSync {
				t.Fatalf("promotion = %+v: want epoch 7→8 and the old writer out of sync", next)
			}
			members := map[string]bool{"n1": true, "n2": true, "n3": true}
			if err := CheckCopyChange(r, next, Proposer{NodeID: "n9", Primary: true}, members); err != nil {
				t.Fatalf("the state machine refuses the promotion: %v", err)
			}
			if err := CheckCopyChange(r, next, Proposer{NodeID: "n2"}, members); !errors.Is(err, ErrIllegalChange) {
				t.Fatalf("a non-primary may promote: %v", err)
			}
		})
	}
}

func cloneRec(rec LU) LU {
	rec.Replicas = append([]Replica(nil), rec.Replicas...)
	return rec
}

func TestLivenessView(t *testing.T) {
	w := newWatch()
	t0 := time.Unix(1000, 0)
	members := []string{"a", "b", "c"}
	if v := w.view(members, "a", t0, time.Second, 2*time.Second); v[1].State != LiveUnknown {
		t.Fatalf("not leading: %+v", v)
	}
	w.lead(true, t0, members)
	w.heard("b", t0.Add(1500*time.Millisecond))
	v := w.view(members, "a", t0.Add(2400*time.Millisecond), time.Second, 2*time.Second)
	want := []string{LiveAlive, LiveAlive, LiveDead}
	for i := range v {
		if v[i].State != want[i] {
			t.Fatalf("view = %+v, want states %v", v, want)
		}
	}
	v = w.view(members, "a", t0.Add(2600*time.Millisecond), time.Second, 2*time.Second)
	if v[1].State != LiveSuspect {
		t.Fatalf("b silent 1.1 s: %+v, want suspect", v[1])
	}
	// A new term forgets the old view: every member counts as heard now.
	w.lead(false, t0, members)
	w.lead(true, t0.Add(10*time.Second), members)
	if v := w.view(members, "a", t0.Add(11*time.Second), time.Second, 2*time.Second); v[2].State != LiveSuspect {
		t.Fatalf("after a new term: %+v", v)
	}
	if g := w.grantedAt("c"); !g.Equal(t0.Add(10 * time.Second)) {
		t.Fatalf("grants of an earlier term count as made at take-over, got %v", g)
	}
}

// probeSet is a Probe whose answers tests switch per node.
type probeSet struct {
	mu   sync.Mutex
	down map[string]bool
}

func (p *probeSet) set(id string, down bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.down[id] = down
}

func (p *probeSet) probe(_ context.Context, id string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.down[id] {
		return fmt.Errorf("%s down", id)
	}
	return nil
}

// TestFailoverPromotesInSyncCopy: n1 leads, n2 writes LU a with a copy on
// n3. When n2 stops answering probes, the primary records n3 as the writer
// (epoch + 1, n2 out of sync) after FailoverAfter, not before; a metadata
// lease is confirmed for n3 and refused for n2.
func TestFailoverPromotesInSyncCopy(t *testing.T) {
	ctx := ctxT(t)
	probes := &probeSet{down: map[string]bool{}}
	opts := func(id string, boot bool) Options {
		o := testOptions(t, t.TempDir(), id, boot)
		o.Probe, o.FailoverAfter = probes.probe, 1500*time.Millisecond
		return o
	}
	n1, n2, _ := openThree(t, opts)
	if err := n1.CreateLU(ctx, LU{Name: "a", SizeBytes: 1 << 20, Copies: 2, CreatedOn: "n2",
		Replicas: []Replica{{NodeID: "n2", State: ReplicaInSync}, {NodeID: "n3", State: ReplicaInSync}}}); err != nil {
		t.Fatal(err)
	}
	if err := n1.ConfirmCopy(ctx, "a", "n3", 1); err != nil {
		t.Fatalf("ConfirmCopy(n3) = %v", err)
	}
	if err := n2.ConfirmCopy(ctx, "a", "n3", 1); !errors.Is(err, ErrNotLeader) {
		t.Fatalf("ConfirmCopy on a follower = %v, want ErrNotLeader", err)
	}
	waitFor(t, "n2 alive in the view", func() bool {
		v, err := n1.Liveness()
		return err == nil && len(v) == 3 && v[1].State == LiveAlive
	})
	killed := time.Now()
	probes.set("n2", true)
	waitFor(t, "n3 to become the writer", func() bool {
		rec, err := n1.GetLU("a")
		return err == nil && rec.Writer == "n3"
	})
	took := time.Since(killed)
	seen := time.Now()
	// FailoverAfter runs from the last probe n2 answered, which may be a
	// probe interval (or, on a starved machine, more) before killed.
	v, err := n1.Liveness()
	if err != nil {
		t.Fatal(err)
	}
	if silent := seen.Sub(v[1].LastHeard); silent < 1500*time.Millisecond {
		t.Fatalf("failed over %v after n2 last answered, before FailoverAfter", silent)
	}
	rec, _ := n1.GetLU("a")
	if rec.Epoch != 2 || rec.Replicas[0] != (Replica{NodeID: "n2", State: ReplicaOutOfSync}) {
		t.Fatalf("after failover: %+v", rec)
	}
	t.Logf("failover %v after the writer went silent", took.Round(time.Millisecond))
	if v, _ := n1.Liveness(); v[1].State != LiveDead {
		t.Fatalf("n2 in the view: %+v", v[1])
	}
	if err := n1.ConfirmCopy(ctx, "a", "n2", 2); !errors.Is(err, ErrNotInSync) {
		t.Fatalf("ConfirmCopy(n2, old writer) = %v, want ErrNotInSync", err)
	}
	if err := n1.ConfirmCopy(ctx, "a", "n3", 1); !errors.Is(err, ErrNotInSync) {
		t.Fatalf("ConfirmCopy at the old epoch = %v, want ErrNotInSync", err)
	}
	if n1.failovers.Load() != 1 {
		t.Fatalf("failovers = %d", n1.failovers.Load())
	}
	// With n3 silent too, nothing is left to promote: the record stays.
	probes.set("n3", true)
	time.Sleep(2 * time.Second)
	if rec, _ := n1.GetLU("a"); rec.Writer != "n3" || rec.Epoch != 2 {
		t.Fatalf("promoted with no live in-sync copy: %+v", rec)
	}
}

func TestFailoverWaitsOutGrantedLease(t *testing.T) {
	w := newWatch()
	t0 := time.Unix(1000, 0)
	w.lead(true, t0, []string{"a", "b"})
	w.grant("b", t0.Add(5*time.Second))
	if g := w.grantedAt("b"); !g.Equal(t0.Add(5 * time.Second)) {
		t.Fatalf("grantedAt = %v", g)
	}
	w.grant("b", t0.Add(time.Second)) // older: ignored
	if g := w.grantedAt("b"); !g.Equal(t0.Add(5 * time.Second)) {
		t.Fatalf("an older grant moved the time back: %v", g)
	}
}
