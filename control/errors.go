package control

import (
	"errors"
	"fmt"

	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/internal/rules"
	"github.com/lupool/lupool/internal/units"
	"github.com/lupool/lupool/lu"
	"github.com/lupool/lupool/server/api"
)

// APIError maps a metadata error onto the API's sentinels (nil stays nil;
// an error it does not know is returned as it is). A cluster.ErrNotLeader
// becomes the *api.NotLeaderError of NotLeader.
func (p *Plane) APIError(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, cluster.ErrNotLeader):
		return p.NotLeader()
	case errors.Is(err, cluster.ErrExists):
		return fmt.Errorf("%w: %v", api.ErrExists, err)
	case errors.Is(err, cluster.ErrNotFound):
		return fmt.Errorf("%w: %v", api.ErrNotFound, err)
	case errors.Is(err, cluster.ErrInvalid):
		return fmt.Errorf("%w: %v", api.ErrInvalid, err)
	case errors.Is(err, cluster.ErrEpochChanged):
		return fmt.Errorf("%w: %v; try again", api.ErrStale, err)
	case errors.Is(err, cluster.ErrIllegalChange), errors.Is(err, cluster.ErrForeignRecord):
		return fmt.Errorf("%w: %v", api.ErrForbidden, err)
	case errors.Is(err, cluster.ErrMember), errors.Is(err, cluster.ErrImageExists):
		return fmt.Errorf("%w: %v", api.ErrExists, err)
	case errors.Is(err, cluster.ErrImageNotFound):
		return fmt.Errorf("%w: %v", api.ErrNotFound, err)
	case errors.Is(err, cluster.ErrHasClones):
		return fmt.Errorf("%w: %v", api.ErrBusy, err)
	}
	return err
}

// NotLeader names the metadata leader for the API to forward to.
func (p *Plane) NotLeader() error {
	leaderID, leaderAPI := p.opts.Metadata.Leader()
	if leaderID == "" {
		return &api.NotLeaderError{}
	}
	peer := ""
	if nodes, err := p.opts.Metadata.Nodes(); err == nil {
		peer, _ = peerAddr(nodes, leaderID)
	}
	return &api.NotLeaderError{LeaderID: leaderID, LeaderAPI: leaderAPI, LeaderPeer: peer}
}

// overcommitError says by how much a create or grow would pass the
// overcommit limit and what to do. cause, when it holds a
// *rules.OvercommitError (the pool's own refusal, which counts the
// reservations of creates in flight), gives the numbers; else they are
// measured now for growBytes.
func (p *Plane) overcommitError(cause error, growBytes int64) error {
	var oe *rules.OvercommitError
	if !errors.As(cause, &oe) {
		st := p.opts.Pool.Status()
		oe = &rules.OvercommitError{ProvisionedBytes: st.ProvisionedBytes, GrowBytes: growBytes,
			CapacityBytes: st.CapacityBytes, Ratio: p.opts.OvercommitRatio,
			LimitBytes: rules.OvercommitLimit(st.CapacityBytes, p.opts.OvercommitRatio)}
	}
	return fmt.Errorf("%w: pool would be provisioned to %s (%d bytes) but its limit is %s (%.1f x capacity %s); free space, add a data directory, or raise --overcommit",
		api.ErrNoSpace, units.Format(oe.AfterBytes()), oe.AfterBytes(),
		units.Format(oe.LimitBytes), oe.Ratio, units.Format(oe.CapacityBytes))
}

// memoryBudgetError is the API's answer for a memory LU past node's
// memory budget (cause matches lu.ErrMemoryBudget).
func memoryBudgetError(node string, cause error) error {
	var be *lu.MemoryBudgetError
	if !errors.As(cause, &be) {
		return fmt.Errorf("%w: memory budget of node %s: %v; raise --memory-budget or use --kind file", api.ErrNoSpace, node, cause)
	}
	return fmt.Errorf("%w: memory budget of node %s: %s asked, %s of %s free; release memory LUs there, raise its --memory-budget, or use --kind file",
		api.ErrNoSpace, node, units.Format(be.AddBytes), units.Format(max(be.LimitBytes-be.UsedBytes, 0)), units.Format(be.LimitBytes))
}

// checkOvercommit refuses growing the local pool's provisioned bytes by
// growBytes past its overcommit limit, or a memory LU past this node's
// memory budget.
func (p *Plane) checkOvercommit(kind lu.Kind, growBytes int64) error {
	if kind == lu.KindMemory {
		// A memory LU grows within the node's memory budget instead.
		st := p.opts.Pool.Status()
		if st.MemoryBudgetBytes > 0 && growBytes > st.MemoryFreeBytes {
			return memoryBudgetError(p.opts.NodeID, &lu.MemoryBudgetError{Name: "", AddBytes: growBytes,
				UsedBytes: st.MemoryBudgetBytes - st.MemoryFreeBytes, LimitBytes: st.MemoryBudgetBytes})
		}
		return nil
	}
	if kind != lu.KindFile {
		return nil
	}
	st := p.opts.Pool.Status()
	if err := rules.Overcommit(st.ProvisionedBytes, growBytes, st.CapacityBytes, p.opts.OvercommitRatio); err != nil {
		return p.overcommitError(err, growBytes)
	}
	return nil
}

// notFound is the API's answer for an unknown LU name.
func notFound(name string) error {
	return fmt.Errorf("%w: no LU named %q (see lupool lu list)", api.ErrNotFound, name)
}

// peerAddr returns the peer address recorded for node id.
func peerAddr(nodes []cluster.NodeInfo, id string) (string, bool) {
	for _, n := range nodes {
		if n.ID == id && n.PeerAddr != "" {
			return n.PeerAddr, true
		}
	}
	return "", false
}

func knownNode(nodes []cluster.NodeInfo, id string) bool {
	for _, n := range nodes {
		if n.ID == id {
			return true
		}
	}
	return false
}
