package cluster

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

// inmemNet joins nodes through raft's in-memory transports (Options.
// Transport) and cuts or heals the links between them, so that a test can
// partition a cluster inside one process. Probes between two nodes follow
// the same links: a node the leader cannot reach fails its probe.
type inmemNet struct {
	mu    sync.Mutex
	trans map[string]*raft.InmemTransport // by node id; guarded by mu
	cut   map[[2]string]bool              // unordered pairs, smaller id first; guarded by mu
}

func newInmemNet() *inmemNet {
	return &inmemNet{trans: map[string]*raft.InmemTransport{}, cut: map[[2]string]bool{}}
}

func pair(a, b string) [2]string {
	if a > b {
		a, b = b, a
	}
	return [2]string{a, b}
}

// options returns a node's options on this network: its raft address is
// its id, and its Probe asks the network whether it reaches the target.
func (nw *inmemNet) options(t *testing.T, id string, bootstrap bool) Options {
	o := testOptions(t, t.TempDir(), id, bootstrap)
	_, tr := raft.NewInmemTransport(raft.ServerAddress(id))
	nw.mu.Lock()
	for peer, pt := range nw.trans {
		if !nw.cut[pair(id, peer)] {
			tr.Connect(raft.ServerAddress(peer), pt)
			pt.Connect(raft.ServerAddress(id), tr)
		}
	}
	nw.trans[id] = tr
	nw.mu.Unlock()
	o.Transport = tr
	o.Probe = func(_ context.Context, target string) error {
		if !nw.reaches(id, target) {
			return errors.New(id + " cannot reach " + target)
		}
		return nil
	}
	return o
}

func (nw *inmemNet) reaches(a, b string) bool {
	nw.mu.Lock()
	defer nw.mu.Unlock()
	return a == b || !nw.cut[pair(a, b)]
}

// partition cuts every link between two different groups and joins every
// pair inside a group; partition(all) heals.
func (nw *inmemNet) partition(groups ...[]string) {
	nw.mu.Lock()
	defer nw.mu.Unlock()
	group := map[string]int{}
	for i, g := range groups {
		for _, id := range g {
			group[id] = i
		}
	}
	for a, ta := range nw.trans {
		for b, tb := range nw.trans {
			if a >= b {
				continue
			}
			if group[a] == group[b] {
				delete(nw.cut, pair(a, b))
				ta.Connect(raft.ServerAddress(b), tb)
				tb.Connect(raft.ServerAddress(a), ta)
			} else {
				nw.cut[pair(a, b)] = true
				ta.Disconnect(raft.ServerAddress(b))
				tb.Disconnect(raft.ServerAddress(a))
			}
		}
	}
}

// threeOnNet starts n1 (bootstrapped, leading) and joins n2 and n3 on nw.
func threeOnNet(t *testing.T, nw *inmemNet, tune func(*Options)) []*Node {
	t.Helper()
	n1, n2, n3 := openThree(t, func(id string, boot bool) Options {
		o := nw.options(t, id, boot)
		if tune != nil {
			tune(&o)
		}
		return o
	})
	return []*Node{n1, n2, n3}
}

// TestPartitionedLeaderLosesTheLU: the leader n1, also the writer of LU
// a, is cut off from n2 and n3. The majority elects a primary that
// promotes n2's in-sync copy (epoch + 1, n1 out of sync) after
// FailoverAfter; the cut-off n1 commits nothing (a create it accepts
// never becomes visible, not even after the heal), grants no lease, and
// loses contact with the quorum. After the heal n1 follows and holds the
// majority's record.
func TestPartitionedLeaderLosesTheLU(t *testing.T) {
	ctx := ctxT(t)
	nw := newInmemNet()
	nodes := threeOnNet(t, nw, func(o *Options) { o.FailoverAfter = 1500 * time.Millisecond })
	n1, n2, n3 := nodes[0], nodes[1], nodes[2]
	if err := n1.CreateLU(ctx, LU{Name: "a", SizeBytes: 1 << 20, Copies: 2, CreatedOn: "n1",
		Replicas: []Replica{{NodeID: "n1", State: ReplicaInSync}, {NodeID: "n2", State: ReplicaInSync}}}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "n3 to see LU a", func() bool { _, err := n3.GetLU("a"); return err == nil })

	cut := time.Now()
	nw.partition([]string{"n1"}, []string{"n2", "n3"})
	// The cut-off leader may still accept a write for a moment; it must
	// never commit. Its ApplyTimeout is 10 s; a shorter context is enough.
	ghostCtx, cancel := context.WithTimeout(ctx, 3*time.Second)
	ghostErr := n1.CreateLU(ghostCtx, LU{Name: "ghost", SizeBytes: 1 << 20, Copies: 1, CreatedOn: "n1",
		Replicas: []Replica{{NodeID: "n1", State: ReplicaInSync}}})
	cancel()
	if ghostErr == nil {
		t.Fatal("the cut-off leader committed a create without a majority")
	}
	waitFor(t, "n2 to become the writer on the majority", func() bool {
		for _, n := range []*Node{n2, n3} {
			if rec, err := n.GetLU("a"); err != nil || rec.Writer != "n2" {
				return false
			}
		}
		return true
	})
	took := time.Since(cut)
	var leader *Node
	for _, n := range []*Node{n2, n3} {
		if n.IsLeader() {
			leader = n
		}
	}
	if leader == nil {
		t.Fatal("the majority promoted without a leader")
	}
	rec, _ := leader.GetLU("a")
	if rec.Epoch != 2 || rec.Replicas[0] != (Replica{NodeID: "n1", State: ReplicaOutOfSync}) {
		t.Fatalf("after the promotion: %+v", rec)
	}
	t.Logf("partition to promotion: %v (new primary %s)", took.Round(time.Millisecond), leader.ID())
	if took < 1500*time.Millisecond {
		t.Fatalf("promoted %v after the cut, before FailoverAfter", took)
	}
	if n1.IsLeader() {
		t.Fatal("the cut-off n1 still counts itself leader")
	}
	if err := n1.ConfirmCopy(ctx, "a", "n1", 1); err == nil {
		t.Fatal("the cut-off n1 confirmed a lease for its own copy")
	}
	if err := leader.ConfirmCopy(ctx, "a", "n1", 2); !errors.Is(err, ErrNotInSync) {
		t.Fatalf("majority ConfirmCopy(n1) = %v, want ErrNotInSync", err)
	}
	if age := time.Since(n1.QuorumContact()); age < time.Second {
		t.Fatalf("the cut-off n1 reports quorum contact %v ago", age)
	}
	if rec, err := n1.GetLU("a"); err != nil || rec.Writer != "n1" || rec.Epoch != 1 {
		t.Fatalf("n1's own view moved without the majority: %+v, %v", rec, err)
	}

	nw.partition([]string{"n1", "n2", "n3"})
	waitFor(t, "n1 to follow the majority's record", func() bool {
		rec, err := n1.GetLU("a")
		return err == nil && rec.Writer == "n2" && rec.Epoch == 2
	})
	waitFor(t, "n1 in contact with the quorum", func() bool { return time.Since(n1.QuorumContact()) < time.Second })
	for _, n := range nodes {
		if _, err := n.GetLU("ghost"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("%s: the minority's create is visible after the heal: %v", n.ID(), err)
		}
	}
}

// TestPartitionedFollowerWriter: the writer n3 is a follower cut off from
// the leader n1 and n2. The primary promotes n2 (in sync) and sees n3
// dead; n3 sees its quorum contact age (what makes a daemon shed its
// clients); after the heal n3 holds the new record and is alive again.
func TestPartitionedFollowerWriter(t *testing.T) {
	ctx := ctxT(t)
	nw := newInmemNet()
	nodes := threeOnNet(t, nw, func(o *Options) { o.FailoverAfter = 1500 * time.Millisecond })
	n1, n3 := nodes[0], nodes[2]
	if err := n1.CreateLU(ctx, LU{Name: "b", SizeBytes: 1 << 20, Copies: 2, CreatedOn: "n3",
		Replicas: []Replica{{NodeID: "n3", State: ReplicaInSync}, {NodeID: "n2", State: ReplicaInSync}}}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "n3 to see LU b", func() bool { _, err := n3.GetLU("b"); return err == nil })
	nw.partition([]string{"n1", "n2"}, []string{"n3"})
	waitFor(t, "n2 to become the writer", func() bool {
		rec, err := n1.GetLU("b")
		return err == nil && rec.Writer == "n2" && rec.Epoch == 2
	})
	if age := time.Since(n3.QuorumContact()); age < time.Second {
		t.Fatalf("the cut-off n3 reports quorum contact %v ago", age)
	}
	if v, err := n1.Liveness(); err != nil || v[2].State != LiveDead {
		t.Fatalf("n3 in the primary's view: %+v, %v", v, err)
	}
	nw.partition([]string{"n1", "n2", "n3"})
	waitFor(t, "n3 to hold the new record", func() bool {
		rec, err := n3.GetLU("b")
		return err == nil && rec.Writer == "n2" && rec.Replicas[0].State == ReplicaOutOfSync
	})
	waitFor(t, "n3 alive again in the view", func() bool {
		v, err := n1.Liveness()
		return err == nil && v[2].State == LiveAlive
	})
}
