package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/cockroachdb/pebble/v2"
)

// The applied side of planned moves (move.go): the state machine's apply,
// the Node's calls, and the primary's move monitor.

// applyMove applies a move command if NextMove allows it against the
// recorded move, LU and node records.
func (f *fsm) applyMove(b *pebble.Batch, c *command, index uint64) applyResult {
	op := *c.Move
	lu, err := f.mustGetLU(op.LU)
	if err != nil {
		return applyResult{err: err}
	}
	cur, err := getMove(f.db, op.LU)
	if err != nil {
		return applyResult{err: err}
	}
	addrs, err := nbdAddrs(f.db)
	if err != nil {
		return applyResult{err: err}
	}
	res, err := NextMove(cur, lu, addrs, op, c.proposer(), c.At)
	if err != nil {
		return applyResult{err: err}
	}
	out := applyResult{events: moveEvents(lu, res, op, c.At, c.By), moveOutcome: res.Outcome}
	if res.Move != nil {
		if err := putJSON(b, movePrefix+op.LU, *res.Move); err != nil {
			return applyResult{err: err}
		}
	} else if err := b.Delete([]byte(movePrefix+op.LU), nil); err != nil {
		return applyResult{err: err}
	}
	if res.LU != nil {
		if err := validateLU(res.LU); err != nil {
			return applyResult{err: err}
		}
		put := f.putLU(b, *res.LU, Updated, index)
		if put.err != nil {
			return put
		}
		out.change = put.change
	}
	return out
}

// getMove returns the move record of LU name, or nil.
func getMove(r reader, name string) (*Move, error) {
	var m Move
	found, err := getJSON(r, movePrefix+name, &m)
	if err != nil || !found {
		return nil, err
	}
	return &m, nil
}

// nbdAddrs maps every member with a record to its NBD address.
func nbdAddrs(r reader) (map[string]string, error) {
	recs, err := listNodeRecords(r)
	if err != nil {
		return nil, err
	}
	out := make(map[string]string, len(recs))
	for id, rec := range recs {
		out[id] = rec.NBDAddr
	}
	return out, nil
}

func listMoves(r reader) ([]Move, error) {
	var out []Move
	err := scan(r, movePrefix, func(_, v []byte) error {
		var m Move
		if err := json.Unmarshal(v, &m); err != nil {
			return err
		}
		out = append(out, m)
		return nil
	})
	return out, err
}

// Moves returns the moves in progress, by LU name, from the local applied
// state.
func (n *Node) Moves() (moves []Move, err error) {
	err = n.readDB(func() error {
		moves, err = listMoves(n.db)
		return err
	})
	return moves, err
}

// GetMove returns the move of LU name in progress, from the local applied
// state; ok is false when there is none.
func (n *Node) GetMove(name string) (m Move, ok bool, err error) {
	err = n.readDB(func() error {
		cur, err := getMove(n.db, name)
		if cur != nil {
			m, ok = *cur, true
		}
		return err
	})
	return m, ok, err
}

// ProposeMove proposes a move operation on behalf of by and waits until it
// is applied. Leader only. The caller sets by from the requester's
// authenticated identity, or for the primary's own monitor and the admin
// operation it runs (start), Proposer{NodeID: n.ID(), Primary: true}.
// NextMove runs first against the local state to refuse an illegal
// operation without a log entry; Apply decides. Returns ErrIllegalMove,
// ErrMoveInProgress, ErrNoMove, ErrNotFound, ErrNotLeader (on a follower,
// before any check) or ErrOutcomeUnknown.
func (n *Node) ProposeMove(ctx context.Context, by Proposer, op MoveOp) error {
	if err := ValidateName(op.LU); err != nil {
		return err
	}
	if by.NodeID == "" {
		return fmt.Errorf("%w: a move operation needs the proposer's node id", ErrInvalid)
	}
	if !n.IsLeader() {
		// A follower's applied state may lag what the proposer saw
		// applied on the leader: leave the verdict to the leader.
		return ErrNotLeader
	}
	var lu LU
	var cur *Move
	var addrs map[string]string
	err := n.readDB(func() (err error) {
		if lu, err = n.fsm.mustGetLU(op.LU); err != nil {
			return err
		}
		if cur, err = getMove(n.db, op.LU); err != nil {
			return err
		}
		addrs, err = nbdAddrs(n.db)
		return err
	})
	if err != nil {
		return err
	}
	if _, err := NextMove(cur, lu, addrs, op, by, time.Now().UTC()); err != nil {
		return err
	}
	_, err = n.propose(ctx, &command{Type: cmdMove, Move: &op, By: by.NodeID, Primary: by.Primary})
	if err == nil && op.Op == MoveOpSwitch {
		// The source holds its writes until it applied the switch, and the
		// target acknowledges nothing before it did: an entry appended now
		// carries the new commit index to them at once, instead of within
		// CommitTimeout. Raft owns the future; nothing waits for it.
		n.raft.Barrier(n.opts.ApplyTimeout)
	}
	return err
}

// moveLoop is the primary's move monitor: while this node leads, it
// records its step on every move, and ends a move whose source or target
// is dead in its liveness view, or that has run longer than MoveTimeout:
// it completes one that switched and rolls back one that did not.
func (n *Node) moveLoop() {
	defer n.wg.Done()
	tick := time.NewTicker(n.opts.ProbeInterval)
	defer tick.Stop()
	for {
		select {
		case <-n.closed:
			return
		case <-tick.C:
		}
		if !n.IsLeader() {
			continue
		}
		moves, err := n.Moves()
		if err != nil || len(moves) == 0 {
			continue
		}
		live := map[string]string{}
		if view, err := n.Liveness(); err == nil {
			for _, nl := range view {
				live[nl.ID] = nl.State
			}
		}
		for _, m := range moves {
			op, ok := n.movePass(m, live, time.Now())
			if !ok {
				continue
			}
			ctx, cancel := context.WithTimeout(context.Background(), n.opts.ApplyTimeout)
			err := n.ProposeMove(ctx, Proposer{NodeID: n.opts.NodeID, Primary: true}, op)
			cancel()
			if err != nil && !errors.Is(err, ErrClosed) {
				n.log.Warn("move monitor: cannot record", "lu", m.LU, "op", op.Op, "err", err)
			} else if op.Op != MoveOpStep {
				n.log.Warn("move monitor ended a move", "lu", m.LU, "from", m.From, "to", m.To, "op", op.Op, "reason", op.Reason)
			}
		}
	}
}

// movePass decides what the primary's monitor does about move m: a pure
// function of the move, the liveness view and the time.
func (n *Node) movePass(m Move, live map[string]string, now time.Time) (MoveOp, bool) {
	return primaryMoveStep(m, n.opts.NodeID, live, now, n.opts.MoveTimeout)
}

func primaryMoveStep(m Move, self string, live map[string]string, now time.Time, timeout time.Duration) (MoveOp, bool) {
	op := MoveOp{LU: m.LU, Role: MonitorPrimary}
	var dead []string
	for _, id := range []string{m.From, m.To} {
		if live[id] == LiveDead {
			dead = append(dead, id)
		}
	}
	late := now.Sub(m.StartedAt) > timeout
	switch {
	case m.State == MoveSwitching && (len(dead) > 0 || late):
		op.Op, op.Step = MoveOpComplete, "completed"
		op.Reason = "completed by the primary: the switch was recorded"
		if len(dead) > 0 {
			op.Reason += "; dead: " + strings.Join(dead, ", ")
		}
		return op, true
	case len(dead) > 0:
		op.Op, op.Step = MoveOpRollBack, "rolled back"
		op.Reason = fmt.Sprintf("%s dead before the switch (in state %s)", strings.Join(dead, " and "), m.State)
		return op, true
	case late:
		op.Op, op.Step = MoveOpRollBack, "rolled back"
		op.Reason = fmt.Sprintf("not switched within %v (stuck in state %s)", timeout, m.State)
		return op, true
	}
	if mon, ok := m.Monitor(MonitorPrimary); !ok || mon.Node != self || mon.Step != "watching" {
		op.Op, op.Step = MoveOpStep, "watching"
		return op, true
	}
	return MoveOp{}, false
}
