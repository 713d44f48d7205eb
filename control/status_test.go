package control

import (
	"errors"
	"strings"
	"testing"

	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/server/api"
)

func TestLUHealth(t *testing.T) {
	rep := func(states ...string) []cluster.Replica {
		var out []cluster.Replica
		for i, s := range states {
			out = append(out, cluster.Replica{NodeID: string(rune('a' + i)), State: s})
		}
		return out
	}
	in, re, out, nw := cluster.ReplicaInSync, cluster.ReplicaResyncing, cluster.ReplicaOutOfSync, cluster.ReplicaNew
	for _, tc := range []struct {
		copies   int
		replicas []cluster.Replica
		want     string
	}{
		{1, rep(in), api.LUHealthy},
		{2, rep(in, in), api.LUHealthy},
		{2, rep(in, re), api.LUResyncing},
		{3, rep(in, re, re), api.LUResyncing},
		{2, rep(in, out), api.LUDegraded},
		{2, rep(in, nw), api.LUDegraded},
		{3, rep(in, re, out), api.LUDegraded}, // one copy is caught up, one is not
		{2, rep(in), api.LUDegraded},          // a copy is missing
		{1, rep(in, nw), api.LUDegraded},      // an added copy not built yet
	} {
		rec := cluster.LU{Name: "x", Copies: tc.copies, Replicas: tc.replicas}
		if got := luHealth(rec); got != tc.want {
			t.Errorf("copies %d replicas %v: %s, want %s", tc.copies, tc.replicas, got, tc.want)
		}
	}
	s := summarizeLUs([]cluster.LU{
		{Name: "h", Copies: 1, Replicas: rep(in)},
		{Name: "r", Copies: 2, Replicas: rep(in, re)},
		{Name: "d", Copies: 2, Replicas: rep(in, out)},
	})
	if s.Total != 3 || s.Healthy != 1 || s.Resyncing != 1 || s.Degraded != 1 || len(s.NotHealthy) != 2 ||
		s.NotHealthy[0].Name != "r" || s.NotHealthy[1].Name != "d" || s.NotHealthy[1].Replicas[1].State != out {
		t.Errorf("summary %+v", s)
	}
}

func TestSumPools(t *testing.T) {
	nodes := []api.NodeStatus{
		{Node: api.Node{ID: "a"}, State: api.NodeUp, Pool: &api.PoolStatus{CapacityBytes: 100, FreeBytes: 40, AllocatedBytes: 10, ProvisionedBytes: 300, Level: "ok"}},
		{Node: api.Node{ID: "b"}, State: api.NodeUnreachable, Error: "timeout"},
		{Node: api.Node{ID: "c"}, State: api.NodeUp, Pool: &api.PoolStatus{CapacityBytes: 50, FreeBytes: 5, AllocatedBytes: 20, ProvisionedBytes: 50, Level: "critical"}},
		{Node: api.Node{ID: "d"}, State: api.NodeUp, Pool: &api.PoolStatus{CapacityBytes: 50, FreeBytes: 10, Level: "warn"}},
	}
	got := sumPools(nodes)
	want := api.PoolSummary{CapacityBytes: 200, FreeBytes: 55, AllocatedBytes: 30, ProvisionedBytes: 350, Level: "critical", NodesCounted: 3}
	if got != want {
		t.Errorf("sumPools = %+v, want %+v", got, want)
	}
	if got := sumPools(nil); got.Level != "ok" || got.NodesCounted != 0 {
		t.Errorf("no nodes: %+v", got)
	}
}

// TestStatus: the plane asks every other node for its pool; one that
// fails is reported unreachable with why and left out of the sums; the
// primary and the LUs by health come from the metadata.
func TestStatus(t *testing.T) {
	p, meta, peers, _ := remoteOnly(t, 3)
	ctx := ctxT(t)
	peers.nodes["n1"] = &peerNode{}
	peers.nodes["n2"] = &peerNode{fail: errors.New("connection refused")}
	meta.put(cluster.LU{Name: "ok", SizeBytes: 512, Copies: 2, Writer: "n0", Epoch: 1,
		Replicas: []cluster.Replica{{NodeID: "n0", State: cluster.ReplicaInSync}, {NodeID: "n1", State: cluster.ReplicaInSync}}})
	meta.put(cluster.LU{Name: "lagging", SizeBytes: 512, Copies: 2, Writer: "n0", Epoch: 2,
		Replicas: []cluster.Replica{{NodeID: "n0", State: cluster.ReplicaInSync}, {NodeID: "n2", State: cluster.ReplicaOutOfSync}}})
	st, err := p.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Node != "n0" || st.Primary != "n0" || len(st.Nodes) != 3 {
		t.Fatalf("status %+v", st)
	}
	want := map[string]string{"n0": api.NodeUp, "n1": api.NodeUp, "n2": api.NodeUnreachable}
	for _, n := range st.Nodes {
		if n.State != want[n.ID] || (n.Pool == nil) != (n.State == api.NodeUnreachable) {
			t.Errorf("node %s: state %s pool %v; want %s", n.ID, n.State, n.Pool, want[n.ID])
		}
		if n.ID == "n2" && !strings.Contains(n.Error, "connection refused") {
			t.Errorf("n2's error %q does not say why", n.Error)
		}
		if n.ID == "n0" && (n.Pool.Thresholds == nil || n.Pool.Thresholds.WarnPercent != 80 || n.Pool.Thresholds.CriticalPercent != 90) {
			t.Errorf("n0's pool has no thresholds: %+v", n.Pool)
		}
	}
	if st.Pool.NodesCounted != 2 || st.Pool.CapacityBytes != st.Nodes[0].Pool.CapacityBytes+1<<30 {
		t.Errorf("pool sums %+v over n0 %+v and n1", st.Pool, st.Nodes[0].Pool)
	}
	if st.LUs.Total != 2 || st.LUs.Healthy != 1 || st.LUs.Degraded != 1 || st.LUs.NotHealthy[0].Name != "lagging" {
		t.Errorf("LUs %+v", st.LUs)
	}
}
