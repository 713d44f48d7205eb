package main

import (
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
