package control

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/server/api"
)

// Moves is the metadata's planned writer moves (cluster.Node).
type Moves interface {
	ProposeMove(ctx context.Context, by cluster.Proposer, op cluster.MoveOp) error
	Moves() ([]cluster.Move, error)
	GetMove(name string) (cluster.Move, bool, error)
	// Events and LastEventSeq read the event log, where a move's outcome
	// stays once its record is removed.
	Events(after uint64, limit int) ([]cluster.Event, error)
	LastEventSeq() uint64
}

var _ Moves = (*cluster.Node)(nil)

// errNoMoves is returned by the move calls of a Plane without Moves.
var errNoMoves = fmt.Errorf("%w: this node does not run planned moves", api.ErrUnavailable)

// moveWaitMax bounds MoveLU's wait: well above cluster.Options.MoveTimeout,
// after which the primary ends any move.
const moveWaitMax = time.Minute

// MoveLU hands the writer role of LU name to node to, a planned move
// (cluster/move.go): it records the move (leader only: elsewhere a
// NotLeaderError, which the API forwards) and, with wait, waits until it
// ended and says how (done, or rolled back and why). It is the Go entry
// point for callers inside the daemon (paging migrate). Errors wrap
// api.ErrNotFound (unknown LU), api.ErrInvalid (unknown node, a target
// without an in-sync copy, or the writer already), api.ErrExists (a move
// of the LU is in progress) or api.ErrUnavailable.
func (p *Plane) MoveLU(ctx context.Context, name, to string, wait bool) (api.MoveResult, error) {
	if p.opts.Moves == nil {
		return api.MoveResult{}, errNoMoves
	}
	rec, err := p.opts.Metadata.GetLU(name)
	if err != nil {
		if errors.Is(err, cluster.ErrNotFound) {
			return api.MoveResult{}, notFound(name)
		}
		return api.MoveResult{}, p.APIError(err)
	}
	if to == "" {
		return api.MoveResult{}, fmt.Errorf("%w: a move needs a target node (--to)", api.ErrInvalid)
	}
	nodes, err := p.opts.Metadata.Nodes()
	if err != nil {
		return api.MoveResult{}, err
	}
	if !knownNode(nodes, to) {
		return api.MoveResult{}, fmt.Errorf("%w: node %q is not a member of this cluster (see lupool node list)", api.ErrInvalid, to)
	}
	if p.opts.Liveness != nil {
		if view, err := p.opts.Liveness(ctx); err == nil {
			for _, nl := range view {
				if nl.ID == to && (nl.State == cluster.LiveDead || nl.State == cluster.LiveSuspect) {
					return api.MoveResult{}, fmt.Errorf("%w: target %s is %s", api.ErrUnavailable, to, nl.State)
				}
			}
		}
	}
	from := rec.Writer
	since := p.opts.Moves.LastEventSeq()
	err = p.opts.Moves.ProposeMove(ctx, cluster.Proposer{NodeID: p.opts.NodeID, Primary: true},
		cluster.MoveOp{LU: name, Op: cluster.MoveOpStart, To: to})
	if err != nil {
		return api.MoveResult{}, p.moveError(err)
	}
	res := api.MoveResult{LU: name, From: from, To: to, Outcome: cluster.MoveRequested}
	if !wait {
		return res, nil
	}
	return p.waitMove(ctx, res, since)
}

// waitMove waits until the move res started (after event since) ended,
// and reads its outcome from the event log.
func (p *Plane) waitMove(ctx context.Context, res api.MoveResult, since uint64) (api.MoveResult, error) {
	ctx, cancel := context.WithTimeout(ctx, moveWaitMax)
	defer cancel()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		evs, err := p.opts.Moves.Events(since, 1000)
		if err != nil {
			return res, err
		}
		for _, ev := range evs {
			since = ev.Seq
			if ev.LU != res.LU || (ev.Kind != cluster.EventMoveCompleted && ev.Kind != cluster.EventMoveRolledBack) {
				continue
			}
			res.Outcome, res.Reason = cluster.MoveDone, ev.Details["reason"]
			if ev.Kind == cluster.EventMoveRolledBack {
				res.Outcome = cluster.MoveRolledBack
			}
			res.Seconds, _ = strconv.ParseFloat(ev.Details["seconds"], 64)
			if rec, err := p.opts.Metadata.GetLU(res.LU); err == nil {
				res.Writer = rec.Writer
			}
			return res, nil
		}
		select {
		case <-ctx.Done():
			return res, fmt.Errorf("%w: the move of %s has not ended: %v (see lupool move list)", api.ErrUnavailable, res.LU, ctx.Err())
		case <-tick.C:
		}
	}
}

func (p *Plane) moveError(err error) error {
	switch {
	case errors.Is(err, cluster.ErrMoveInProgress):
		return fmt.Errorf("%w: %v", api.ErrExists, err)
	case errors.Is(err, cluster.ErrIllegalMove):
		return fmt.Errorf("%w: %v", api.ErrInvalid, err)
	case errors.Is(err, cluster.ErrNoMove):
		return fmt.Errorf("%w: %v", api.ErrNotFound, err)
	}
	return p.APIError(err)
}

// ProposeMoveOp records a move monitor's operation on LU name as node by
// (the caller's certificate; never the primary flag, which only the
// primary's own monitor sets). Leader only.
func (p *Plane) ProposeMoveOp(ctx context.Context, by, name string, req api.MoveOpRequest) error {
	if p.opts.Moves == nil {
		return errNoMoves
	}
	op := cluster.MoveOp{LU: name, Op: req.Op, Role: req.Role, Step: req.Step, Reason: req.Reason}
	err := p.opts.Moves.ProposeMove(ctx, cluster.Proposer{NodeID: by}, op)
	if errors.Is(err, cluster.ErrIllegalMove) {
		return fmt.Errorf("%w: %v", api.ErrForbidden, err)
	}
	return p.moveError(err)
}

// ListMoves returns the moves in progress.
func (p *Plane) ListMoves(context.Context) ([]api.Move, error) {
	if p.opts.Moves == nil {
		return []api.Move{}, nil
	}
	moves, err := p.opts.Moves.Moves()
	if err != nil {
		return nil, err
	}
	out := make([]api.Move, 0, len(moves))
	for _, m := range moves {
		out = append(out, p.apiMove(m))
	}
	return out, nil
}

func (p *Plane) apiMove(m cluster.Move) api.Move {
	out := api.Move{LU: m.LU, From: m.From, To: m.To, Epoch: m.Epoch, State: m.State, StartedAt: m.StartedAt,
		AgeSeconds: p.opts.Now().Sub(m.StartedAt).Seconds()}
	for _, mon := range m.Monitors {
		out.Monitors = append(out.Monitors, api.MoveMonitor{Role: mon.Role, Node: mon.Node, Step: mon.Step, At: mon.At})
	}
	return out
}

// luMove returns LU name's move in progress for its API record, or nil.
func (p *Plane) luMove(name string) *api.Move {
	if p.opts.Moves == nil {
		return nil
	}
	m, ok, err := p.opts.Moves.GetMove(name)
	if err != nil || !ok {
		return nil
	}
	out := p.apiMove(m)
	return &out
}
