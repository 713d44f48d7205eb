package control

import (
	"context"
	"errors"
	"fmt"

	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/internal/rules"
	"github.com/lupool/lupool/internal/units"
	"github.com/lupool/lupool/lu"
	"github.com/lupool/lupool/server/api"
)

// checkCreate validates a create request and fills its defaults (kind
// file, one copy, the writer on this node).
func (p *Plane) checkCreate(req *api.CreateLURequest) error {
	if err := rules.Name(req.Name); err != nil {
		return fmt.Errorf("%w: LU name %q: %w", api.ErrInvalid, req.Name, err)
	}
	if err := rules.Size(req.SizeBytes); err != nil {
		return fmt.Errorf("%w: size_bytes %d: %w (the CLI rounds up for you)", api.ErrInvalid, req.SizeBytes, err)
	}
	if req.Kind == "" {
		req.Kind = string(lu.KindFile)
	}
	if req.Kind != string(lu.KindFile) && req.Kind != string(lu.KindMemory) {
		return fmt.Errorf("%w: kind %q: use file or memory", api.ErrInvalid, req.Kind)
	}
	if req.Copies == 0 {
		req.Copies = 1
	}
	if err := rules.Copies(req.Copies); err != nil {
		return fmt.Errorf("%w: copies %d: %w", api.ErrInvalid, req.Copies, err)
	}
	if req.Node == "" {
		req.Node = p.opts.NodeID
	}
	if req.QoS != nil {
		if err := checkQoS(*req.QoS); err != nil {
			return err
		}
	}
	return nil
}

// CreateLU records a new LU and waits until its volume exists here (when
// its writer is this node). On this node, the LU's room is reserved in the
// pool first (ErrNoSpace naming the numbers when there is none), so creates
// racing each other cannot all pass the overcommit limit. When the record
// is made but the volume cannot be, the record is removed again and the
// reservation released: no LU is left that no client can attach.
func (p *Plane) CreateLU(ctx context.Context, req api.CreateLURequest) (api.LU, error) {
	var base cluster.LU
	if req.From != "" {
		var err error
		if base, err = p.prepareClone(&req); err != nil {
			return api.LU{}, err
		}
	}
	if err := p.checkCreate(&req); err != nil {
		return api.LU{}, err
	}
	if req.From != "" {
		writer, _, err := placeClone(base, req.Node, req.Copies)
		if err != nil {
			return api.LU{}, err
		}
		req.Node = writer
	}
	nodes, err := p.opts.Metadata.Nodes()
	if err != nil {
		return api.LU{}, err
	}
	local := req.Node == p.opts.NodeID
	if !local && !knownNode(nodes, req.Node) {
		return api.LU{}, fmt.Errorf("%w: node %q is not a member of this cluster (see lupool node list)", api.ErrInvalid, req.Node)
	}
	if _, err := p.opts.Metadata.GetLU(req.Name); err == nil {
		return api.LU{}, fmt.Errorf("%w: an LU named %q exists; pick another name or delete it first", api.ErrExists, req.Name)
	}
	if local {
		// Hold the room until the volume exists: creates racing each
		// other cannot all pass the limit.
		err := p.opts.Pool.Reserve(req.Name, req.SizeBytes, lu.Kind(req.Kind), p.opts.ReserveTTL)
		if errors.Is(err, lu.ErrOvercommit) {
			return api.LU{}, p.overcommitError(err, req.SizeBytes)
		}
		if errors.Is(err, lu.ErrMemoryBudget) {
			return api.LU{}, memoryBudgetError(p.opts.NodeID, err)
		}
		if err != nil {
			return api.LU{}, err
		}
	}
	var replicas []cluster.Replica
	if req.From != "" {
		_, replicas, err = placeClone(base, req.Node, req.Copies)
	} else {
		replicas, err = p.place(nodes, req.Node, req.Copies)
	}
	if err == nil && req.Kind == string(lu.KindMemory) {
		err = p.checkMemoryBudgets(ctx, nodes, replicas, req.Node, req.SizeBytes)
	}
	if err != nil {
		p.release(local, req.Name)
		return api.LU{}, err
	}
	rec := cluster.LU{
		Name:        req.Name,
		Description: req.Description,
		SizeBytes:   req.SizeBytes,
		Kind:        req.Kind,
		Copies:      req.Copies,
		CreatedOn:   req.Node,
		Writer:      req.Node,
		Epoch:       1,
		Replicas:    replicas,
		CreatedAt:   p.opts.Now().UTC(),
		Base:        req.From,
	}
	if req.QoS != nil {
		if q := clusterQoS(*req.QoS); !q.Zero() {
			rec.QoS = &q
		}
	}
	if err := p.opts.Metadata.CreateLU(ctx, rec); err != nil {
		p.release(local, req.Name)
		return api.LU{}, p.APIError(err)
	}
	out, err := p.afterChange(ctx, req.Name)
	if err != nil || !local {
		return out, err
	}
	if _, ok := p.opts.Replicas.Volume(req.Name); !ok {
		return api.LU{}, p.rollBack(ctx, req)
	}
	return out, nil
}

// rollBack takes a recorded LU whose volume could not be made here back
// out, and says why it was not kept.
func (p *Plane) rollBack(ctx context.Context, req api.CreateLURequest) error {
	cause := p.opts.Replicas.LastError()
	derr := p.opts.Metadata.DeleteLU(ctx, req.Name)
	// The volume never took the reservation over (or took it and failed
	// afterwards): give it back in either case.
	p.opts.Pool.Release(req.Name)
	if derr != nil {
		return fmt.Errorf("LU %q was recorded but its volume could not be created (%v), and removing it failed: %w", req.Name, cause, derr)
	}
	// Let the local volumes follow the delete before the caller retries.
	_ = p.opts.Replicas.Sync(ctx)
	if errors.Is(cause, lu.ErrOvercommit) {
		return p.overcommitError(cause, req.SizeBytes)
	}
	if errors.Is(cause, lu.ErrMemoryBudget) {
		return memoryBudgetError(p.opts.NodeID, cause)
	}
	return fmt.Errorf("LU %q: its volume could not be created, so it was not kept: %v", req.Name, cause)
}

// release gives back the reservation of a create that failed, if this
// node made one.
func (p *Plane) release(local bool, name string) {
	if local {
		p.opts.Pool.Release(name)
	}
}

// place picks copies distinct nodes for a new LU: the writer first, then
// the members holding the fewest copies (ties by id; cluster.PickNodes).
// Every copy starts in sync: a new LU reads as zeros everywhere. Runs on
// the metadata leader (creates are forwarded there), the pool's primary
// node.
func (p *Plane) place(nodes []cluster.NodeInfo, writer string, copies int) ([]cluster.Replica, error) {
	replicas := []cluster.Replica{{NodeID: writer, State: cluster.ReplicaInSync}}
	if copies == 1 {
		return replicas, nil
	}
	lus, err := p.opts.Metadata.ListLUs()
	if err != nil {
		return nil, err
	}
	picked, err := cluster.PickNodes(nodes, lus, map[string]bool{writer: true}, copies-1)
	if err != nil {
		return nil, fmt.Errorf("%w: copies %d needs %d nodes (%v); add nodes or ask for fewer copies (see lupool node list)",
			api.ErrInvalid, copies, copies, err)
	}
	for _, id := range picked {
		replicas = append(replicas, cluster.Replica{NodeID: id, State: cluster.ReplicaInSync})
	}
	return replicas, nil
}

// checkMemoryBudgets refuses a memory LU of sizeBytes when a node that
// would hold a copy has less room left in its memory budget (the writer's
// room on this node is reserved by CreateLU instead). A node that does not
// answer in time is not refused here: its volume then fails to be created
// and the copy is reported missing.
func (p *Plane) checkMemoryBudgets(ctx context.Context, nodes []cluster.NodeInfo, replicas []cluster.Replica, writer string, sizeBytes int64) error {
	for _, r := range replicas {
		var st api.PoolStatus
		switch {
		case r.NodeID == p.opts.NodeID && r.NodeID == writer:
			continue
		case r.NodeID == p.opts.NodeID:
			ls := p.opts.Pool.Status()
			st = api.PoolStatus{MemoryBudgetBytes: ls.MemoryBudgetBytes, MemoryFreeBytes: ls.MemoryFreeBytes}
		default:
			addr, ok := peerAddr(nodes, r.NodeID)
			if !ok {
				continue
			}
			qctx, cancel := context.WithTimeout(ctx, p.opts.PeerTimeout)
			var err error
			st, err = p.opts.Peers.PoolStatus(qctx, r.NodeID, addr)
			cancel()
			if err != nil {
				continue
			}
		}
		if st.MemoryBudgetBytes == 0 || st.MemoryFreeBytes >= sizeBytes {
			continue
		}
		return fmt.Errorf("%w: memory budget of node %s: %s asked, %s of %s free; release memory LUs there, raise its --memory-budget, or use --kind file",
			api.ErrNoSpace, r.NodeID, units.Format(sizeBytes), units.Format(st.MemoryFreeBytes), units.Format(st.MemoryBudgetBytes))
	}
	return nil
}

// afterChange waits until this node's volumes follow the change just
// applied, then returns the LU as recorded.
func (p *Plane) afterChange(ctx context.Context, name string) (api.LU, error) {
	if err := p.opts.Replicas.Sync(ctx); err != nil {
		return api.LU{}, err
	}
	return p.GetLU(ctx, name)
}
