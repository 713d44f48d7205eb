package control

import (
	"context"
	"fmt"
	"sync"

	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/lu"
	"github.com/lupool/lupool/server/api"
)

// Nodes lists the cluster's members, the leader marked.
func (p *Plane) Nodes(ctx context.Context) ([]api.Node, error) {
	nodes, err := p.opts.Metadata.Nodes()
	if err != nil {
		return nil, err
	}
	live := map[string]api.NodeLiveness{}
	if p.opts.Liveness != nil {
		lctx, cancel := context.WithTimeout(ctx, p.opts.PeerTimeout)
		view, err := p.opts.Liveness(lctx)
		cancel()
		for _, nl := range view {
			if err == nil {
				live[nl.ID] = nl
			}
		}
	}
	out := make([]api.Node, 0, len(nodes))
	for _, n := range nodes {
		node := api.Node{ID: n.ID, PeerAddr: n.PeerAddr, APIAddr: n.APIAddr, NBDAddr: n.NBDAddr, Voter: n.Suffrage == "voter",
			Leader: n.Leader, CertSHA256: n.CertSHA256}
		if nl, ok := live[n.ID]; ok {
			node.Liveness = nl.State
			if !nl.LastHeard.IsZero() {
				node.LastHeard = &nl.LastHeard
			}
		}
		out = append(out, node)
	}
	return out, nil
}

// Status gathers the cluster's one-screen view: the members and whether
// they answer (each is asked for its pool over the peer port, all at once,
// for at most Options.PeerTimeout), the primary, the LUs by health.
func (p *Plane) Status(ctx context.Context) (api.Status, error) {
	nodes, err := p.Nodes(ctx)
	if err != nil {
		return api.Status{}, err
	}
	lus, err := p.opts.Metadata.ListLUs()
	if err != nil {
		return api.Status{}, err
	}
	primary, _ := p.opts.Metadata.Leader()
	out := api.Status{Node: p.opts.NodeID, Primary: primary, Nodes: make([]api.NodeStatus, len(nodes)), LUs: summarizeLUs(lus)}
	var wg sync.WaitGroup
	for i, n := range nodes {
		out.Nodes[i] = api.NodeStatus{Node: n}
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, err := p.nodePool(ctx, n)
			if err != nil {
				out.Nodes[i].State, out.Nodes[i].Error = api.NodeUnreachable, err.Error()
				return
			}
			out.Nodes[i].State, out.Nodes[i].Pool = api.NodeUp, &st
		}()
	}
	wg.Wait()
	out.Pool = sumPools(out.Nodes)
	return out, nil
}

// nodePool is node n's pool status: this node's own, or asked over the
// peer port.
func (p *Plane) nodePool(ctx context.Context, n api.Node) (api.PoolStatus, error) {
	if n.ID == p.opts.NodeID {
		return p.PoolStatus(ctx)
	}
	if n.PeerAddr == "" {
		return api.PoolStatus{}, fmt.Errorf("node %s has no known peer address", n.ID)
	}
	ctx, cancel := context.WithTimeout(ctx, p.opts.PeerTimeout)
	defer cancel()
	return p.opts.Peers.PoolStatus(ctx, n.ID, n.PeerAddr)
}

// summarizeLUs counts LUs by health (luHealth) and lists the unhealthy.
func summarizeLUs(lus []cluster.LU) api.LUSummary {
	s := api.LUSummary{Total: len(lus), NotHealthy: []api.LUHealth{}}
	for _, rec := range lus {
		h := luHealth(rec)
		switch h {
		case api.LUHealthy:
			s.Healthy++
			continue
		case api.LUResyncing:
			s.Resyncing++
		default:
			s.Degraded++
		}
		lh := api.LUHealth{Name: rec.Name, Health: h, Writer: rec.Writer, Copies: rec.Copies, Replicas: []api.Replica{}}
		for _, r := range rec.Replicas {
			lh.Replicas = append(lh.Replicas, api.Replica{Node: r.NodeID, State: r.State})
		}
		s.NotHealthy = append(s.NotHealthy, lh)
	}
	return s
}

// luHealth classifies an LU by its recorded copies: degraded when fewer
// copies than asked for are in sync or resyncing (one is out of sync, new,
// or missing, and nothing catches it up yet), resyncing when every copy
// that lacks data is being caught up, healthy otherwise.
func luHealth(rec cluster.LU) string {
	inSync, resyncing := 0, 0
	for _, r := range rec.Replicas {
		switch r.State {
		case cluster.ReplicaInSync:
			inSync++
		case cluster.ReplicaResyncing:
			resyncing++
		}
	}
	switch {
	case inSync+resyncing < max(rec.Copies, len(rec.Replicas)):
		return api.LUDegraded
	case resyncing > 0:
		return api.LUResyncing
	}
	return api.LUHealthy
}

// sumPools adds up the pools of the nodes that answered; the level is the
// worst of them.
func sumPools(nodes []api.NodeStatus) api.PoolSummary {
	rank := map[string]int{string(lu.LevelOK): 0, string(lu.LevelWarn): 1, string(lu.LevelCritical): 2}
	s := api.PoolSummary{Level: string(lu.LevelOK)}
	for _, n := range nodes {
		p := n.Pool
		if p == nil {
			continue
		}
		s.NodesCounted++
		s.CapacityBytes += p.CapacityBytes
		s.FreeBytes += p.FreeBytes
		s.AllocatedBytes += p.AllocatedBytes
		s.ProvisionedBytes += p.ProvisionedBytes
		if rank[p.Level] > rank[s.Level] {
			s.Level = p.Level
		}
	}
	return s
}
