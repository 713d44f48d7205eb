package cluster

import (
	"errors"
	"fmt"
	"slices"
	"strconv"
	"time"
)

// Planned writer moves (issue 19, item 6). A move hands an LU's writer
// role to a node that holds an in-sync copy, without an I/O error for any
// client. It is a record in the replicated metadata, one per LU at a time
// ("meta/move/" + LU name), with a state and three monitors (the source,
// the target and the primary), each with its last recorded step:
//
//	            start (primary)
//	                 │
//	                 ▼
//	            requested ──sync (source: it quiesces)──▶ syncing
//	                 │                                      │
//	                 │ rollback (any monitor)               │ switch (source, after its drain):
//	                 ▼                                      │ the LU's writer is the target,
//	           rolled-back ◀──rollback (any monitor)────────┤ epoch+1, the old writer an
//	         (record removed)                               │ in-sync copy, in the same entry
//	                                                        ▼
//	                                                    switching ──complete (any monitor)──▶ done
//	                                                                                     (record removed)
//
// The switch is the only step that changes the LU, and it does so in the
// same log entry as the move's state: a move recorded "switching" has
// made the target the writer, and one not yet switching has changed
// nothing. A surviving monitor therefore completes a move that was
// switching and rolls back one that was not, and either way removes the
// record (NextMove is the whole rule set: a pure function of the record,
// the LU, the members and the proposer).
//
// The switch keeps the old writer's copy in sync: the source drained
// every request in flight before it proposed the switch, and copies are
// synchronous, so every in-sync copy holds every acknowledged write and
// none is in flight. The LU records the epoch of such a clean handover
// (LU.HandoverEpoch) so that the new writer takes over without the
// failover's distrust (no lease wait, no region-hash compare).

// Move states. Part of the on-disk format.
const (
	MoveRequested  = "requested"
	MoveSyncing    = "syncing"
	MoveSwitching  = "switching"
	MoveDone       = "done"        // the outcome of complete; never stored
	MoveRolledBack = "rolled-back" // the outcome of rollback; never stored
)

// Monitor roles of a move. Part of the on-disk format.
const (
	MonitorSource  = "source"
	MonitorTarget  = "target"
	MonitorPrimary = "primary"
)

// Move operations (MoveOp.Op). Part of the on-disk format.
const (
	MoveOpStart    = "start"    // the primary: a new move, requested
	MoveOpStep     = "step"     // a monitor records its step
	MoveOpSync     = "sync"     // the source: requested → syncing (it quiesces)
	MoveOpSwitch   = "switch"   // the source: syncing → switching; the target writes at epoch+1
	MoveOpComplete = "complete" // any monitor: switching → done, record removed
	MoveOpRollBack = "rollback" // any monitor: requested or syncing → rolled-back, record removed
)

// movePrefix keys the move records by LU name. Part of the on-disk format.
const movePrefix = "meta/move/"

var (
	// ErrIllegalMove is returned (wrapped, with the rule and the values)
	// by ProposeMove, and recorded as a rejected command by Apply, when a
	// move operation breaks a rule of NextMove.
	ErrIllegalMove = errors.New("cluster: illegal move")
	// ErrMoveInProgress is returned by ProposeMove (start) when the LU
	// already has a move record.
	ErrMoveInProgress = errors.New("cluster: a move of the LU is in progress")
	// ErrNoMove is returned by ProposeMove (every operation but start)
	// when the LU has no move record.
	ErrNoMove = errors.New("cluster: no move of the LU in progress")
)

// MoveMonitor is one monitor of a move and the last step it recorded.
type MoveMonitor struct {
	Role string    `json:"role"`
	Node string    `json:"node"`
	Step string    `json:"step"`
	At   time.Time `json:"at"`
}

// Move is the record of a planned writer move. The JSON encoding is part
// of the on-disk format.
type Move struct {
	LU   string `json:"lu"`
	From string `json:"from"`
	To   string `json:"to"`
	// Epoch is the LU's epoch when the move started; the switch needs the
	// LU still there (any copy change in between rolls the move back).
	Epoch    uint64        `json:"epoch"`
	State    string        `json:"state"`
	Monitors []MoveMonitor `json:"monitors"`
	// Reason says why a move was rolled back (or who completed it); it
	// is carried by the final event, the record being removed.
	Reason    string    `json:"reason,omitempty"`
	StartedAt time.Time `json:"started_at"`
	UpdatedAt time.Time `json:"updated_at"`
}

// Monitor returns the move's monitor of role.
func (m Move) Monitor(role string) (MoveMonitor, bool) {
	for _, mon := range m.Monitors {
		if mon.Role == role {
			return mon, true
		}
	}
	return MoveMonitor{}, false
}

func (m Move) clone() Move {
	m.Monitors = slices.Clone(m.Monitors)
	return m
}

// MoveOp is one operation on an LU's move, proposed by a monitor (Role)
// or, for start, by the primary. The JSON encoding is part of the on-disk
// format (the body of a "move" command).
type MoveOp struct {
	LU string `json:"lu"`
	Op string `json:"op"`
	// Role is the monitor the proposer speaks as (every operation but
	// start): source and target must be the move's nodes, primary the
	// primary itself.
	Role string `json:"role,omitempty"`
	// To is the target of a start.
	To string `json:"to,omitempty"`
	// Step is recorded as the proposer's monitor's step (optional).
	Step string `json:"step,omitempty"`
	// Reason is required for a rollback, optional for a complete.
	Reason string `json:"reason,omitempty"`
}

// MoveResult is what NextMove decides.
type MoveResult struct {
	// Move is the record after the operation; nil when it is removed
	// (complete, rollback).
	Move *Move
	// LU is the LU after the operation when it changes (switch).
	LU *LU
	// Outcome is MoveDone or MoveRolledBack when the move ended.
	Outcome string
	// Ended is the record as it stood when the move ended (for the event).
	Ended *Move
}

// Move rule names, as they appear in ErrIllegalMove messages.
const (
	moveRuleOp        = "known operation"
	moveRuleProposer  = "proposer"
	moveRuleTarget    = "target"
	moveRuleState     = "state transition"
	moveRuleUnchanged = "LU unchanged since start"
	moveRuleReason    = "reason"
)

func illegalMove(lu, rule, format string, args ...any) error {
	return fmt.Errorf("%w: LU %q: rule %q: %s", ErrIllegalMove, lu, rule, fmt.Sprintf(format, args...))
}

// NextMove is the move rule set, a pure function used by Apply and (as a
// fast pre-check) by ProposeMove. cur is the LU's move record (nil: none),
// lu the LU's record, nbdAddrs the NBD address of every member (a member
// without one maps to ""), by the proposer and at the proposal's time.
//
//   - start: by the primary; no move of the LU; the target is a member
//     with an NBD address, not the writer, and holds an in-sync copy. The
//     record starts requested, from the current writer, at the LU's epoch.
//   - step: a monitor records its step, in any state.
//   - sync: the source, from requested, while the LU is unchanged.
//   - switch: the source, from syncing, while the LU is unchanged and the
//     target's copy is in sync: the LU's writer becomes the target at
//     epoch+1 with every copy's state kept (the old writer's in sync), and
//     its HandoverEpoch is that epoch.
//   - complete: any monitor, from switching; the record is removed.
//   - rollback: any monitor, from requested or syncing, with a reason; the
//     record is removed. A move that switched is never rolled back.
//
// Every operation but start names the role the proposer speaks as:
// source and target must be the move's From and To, primary must be the
// primary. A step given with any operation is recorded for that monitor.
func NextMove(cur *Move, lu LU, nbdAddrs map[string]string, op MoveOp, by Proposer, at time.Time) (MoveResult, error) {
	if op.LU != lu.Name {
		return MoveResult{}, illegalMove(op.LU, moveRuleOp, "the operation names %q but the LU is %q", op.LU, lu.Name)
	}
	if op.Op == MoveOpStart {
		return startMove(cur, lu, nbdAddrs, op, by, at)
	}
	switch op.Op {
	case MoveOpStep, MoveOpSync, MoveOpSwitch, MoveOpComplete, MoveOpRollBack:
	default:
		return MoveResult{}, illegalMove(lu.Name, moveRuleOp, "operation %q; use %s, %s, %s, %s, %s or %s", op.Op,
			MoveOpStart, MoveOpStep, MoveOpSync, MoveOpSwitch, MoveOpComplete, MoveOpRollBack)
	}
	if cur == nil {
		return MoveResult{}, fmt.Errorf("%w: LU %q: %s", ErrNoMove, lu.Name, op.Op)
	}
	if err := checkMoveRole(*cur, op, by); err != nil {
		return MoveResult{}, err
	}
	next := cur.clone()
	next.UpdatedAt = at
	recordStep(&next, op, by, at)
	switch op.Op {
	case MoveOpStep:
		return MoveResult{Move: &next}, nil
	case MoveOpSync:
		if err := moveFrom(next, op, MoveRequested); err != nil {
			return MoveResult{}, err
		}
		if err := luUnchanged(next, lu); err != nil {
			return MoveResult{}, err
		}
		next.State = MoveSyncing
		return MoveResult{Move: &next}, nil
	case MoveOpSwitch:
		return switchMove(next, lu, nbdAddrs, op)
	case MoveOpComplete:
		if err := moveFrom(next, op, MoveSwitching); err != nil {
			return MoveResult{}, err
		}
		next.Reason = op.Reason
		return MoveResult{Outcome: MoveDone, Ended: &next}, nil
	}
	// rollback
	if next.State != MoveRequested && next.State != MoveSyncing {
		return MoveResult{}, illegalMove(lu.Name, moveRuleState, "rollback from %s: a move that switched is completed, never rolled back", next.State)
	}
	if op.Reason == "" {
		return MoveResult{}, illegalMove(lu.Name, moveRuleReason, "a rollback needs a reason")
	}
	next.Reason = op.Reason
	return MoveResult{Outcome: MoveRolledBack, Ended: &next}, nil
}

func startMove(cur *Move, lu LU, nbdAddrs map[string]string, op MoveOp, by Proposer, at time.Time) (MoveResult, error) {
	if !by.Primary {
		return MoveResult{}, illegalMove(lu.Name, moveRuleProposer, "%q starts a move; only the primary does", by.NodeID)
	}
	if cur != nil {
		return MoveResult{}, fmt.Errorf("%w: %q moves from %s to %s (%s since %s)", ErrMoveInProgress, lu.Name,
			cur.From, cur.To, cur.State, cur.StartedAt.Format(time.RFC3339))
	}
	if err := checkTarget(lu, nbdAddrs, op.To); err != nil {
		return MoveResult{}, err
	}
	m := Move{LU: lu.Name, From: writerOfLU(lu), To: op.To, Epoch: lu.Epoch, State: MoveRequested, StartedAt: at, UpdatedAt: at,
		Monitors: []MoveMonitor{
			{Role: MonitorSource, Node: writerOfLU(lu), Step: "assigned", At: at},
			{Role: MonitorTarget, Node: op.To, Step: "assigned", At: at},
			{Role: MonitorPrimary, Node: by.NodeID, Step: "started", At: at},
		}}
	return MoveResult{Move: &m}, nil
}

// checkTarget says whether node to may become lu's writer by a move.
func checkTarget(lu LU, nbdAddrs map[string]string, to string) error {
	addr, member := nbdAddrs[to]
	switch {
	case to == "":
		return illegalMove(lu.Name, moveRuleTarget, "no target node")
	case !member:
		return illegalMove(lu.Name, moveRuleTarget, "target %q is not a member", to)
	case addr == "":
		return illegalMove(lu.Name, moveRuleTarget, "target %q has no NBD address", to)
	case to == writerOfLU(lu):
		return illegalMove(lu.Name, moveRuleTarget, "%q already is the writer", to)
	}
	for _, r := range lu.Replicas {
		if r.NodeID == to {
			if r.State != ReplicaInSync {
				return illegalMove(lu.Name, moveRuleTarget, "the copy on %q is %s, not %s", to, r.State, ReplicaInSync)
			}
			return nil
		}
	}
	return illegalMove(lu.Name, moveRuleTarget, "%q holds no copy (copies: %v)", to, lu.Replicas)
}

func checkMoveRole(m Move, op MoveOp, by Proposer) error {
	switch op.Role {
	case MonitorSource:
		if by.NodeID != m.From {
			return illegalMove(m.LU, moveRuleProposer, "%q speaks as the source monitor, which is %q", by.NodeID, m.From)
		}
	case MonitorTarget:
		if by.NodeID != m.To {
			return illegalMove(m.LU, moveRuleProposer, "%q speaks as the target monitor, which is %q", by.NodeID, m.To)
		}
	case MonitorPrimary:
		if !by.Primary {
			return illegalMove(m.LU, moveRuleProposer, "%q speaks as the primary monitor but is not the primary", by.NodeID)
		}
	default:
		return illegalMove(m.LU, moveRuleProposer, "role %q; use %s, %s or %s", op.Role, MonitorSource, MonitorTarget, MonitorPrimary)
	}
	if (op.Op == MoveOpSync || op.Op == MoveOpSwitch) && op.Role != MonitorSource {
		return illegalMove(m.LU, moveRuleProposer, "%s by the %s monitor; only the source quiesces and switches", op.Op, op.Role)
	}
	return nil
}

// recordStep records op's step for the proposer's monitor (the primary's
// monitor follows the primary to whichever node leads).
func recordStep(m *Move, op MoveOp, by Proposer, at time.Time) {
	if op.Step == "" {
		return
	}
	for i := range m.Monitors {
		if m.Monitors[i].Role == op.Role {
			m.Monitors[i].Node, m.Monitors[i].Step, m.Monitors[i].At = by.NodeID, op.Step, at
		}
	}
}

func moveFrom(m Move, op MoveOp, want string) error {
	if m.State != want {
		return illegalMove(m.LU, moveRuleState, "%s from %s; it goes from %s", op.Op, m.State, want)
	}
	return nil
}

func luUnchanged(m Move, lu LU) error {
	if writerOfLU(lu) != m.From || lu.Epoch != m.Epoch {
		return illegalMove(m.LU, moveRuleUnchanged, "the move started from writer %s at epoch %d; the LU is at writer %s epoch %d: roll it back",
			m.From, m.Epoch, writerOfLU(lu), lu.Epoch)
	}
	return nil
}

func switchMove(m Move, lu LU, nbdAddrs map[string]string, op MoveOp) (MoveResult, error) {
	if err := moveFrom(m, op, MoveSyncing); err != nil {
		return MoveResult{}, err
	}
	if err := luUnchanged(m, lu); err != nil {
		return MoveResult{}, err
	}
	if err := checkTarget(lu, nbdAddrs, m.To); err != nil {
		return MoveResult{}, err
	}
	next := lu
	next.Replicas = slices.Clone(lu.Replicas)
	next.Writer, next.Epoch = m.To, lu.Epoch+1
	next.HandoverEpoch = next.Epoch
	next.UpdatedAt = m.UpdatedAt
	m.State = MoveSwitching
	return MoveResult{Move: &m, LU: &next}, nil
}

func writerOfLU(lu LU) string {
	if lu.Writer != "" {
		return lu.Writer
	}
	return lu.CreatedOn
}

// moveEvents derives the events of an applied move operation.
func moveEvents(old LU, res MoveResult, op MoveOp, at time.Time, by string) []Event {
	switch {
	case op.Op == MoveOpStart:
		m := res.Move
		return []Event{{Time: at, Kind: EventMoveStarted, LU: m.LU, Node: m.To, By: by,
			Details: map[string]string{"from": m.From, "to": m.To, "epoch": strconv.FormatUint(m.Epoch, 10)}}}
	case res.LU != nil:
		return copyEvents(old, *res.LU, at, by)
	case res.Outcome == MoveDone:
		m := res.Ended
		return []Event{{Time: at, Kind: EventMoveCompleted, LU: m.LU, Node: m.To, By: by,
			Details: map[string]string{"from": m.From, "to": m.To, "by_monitor": op.Role, "reason": m.Reason,
				"seconds": strconv.FormatFloat(at.Sub(m.StartedAt).Seconds(), 'f', 3, 64)}}}
	case res.Outcome == MoveRolledBack:
		m := res.Ended
		return []Event{{Time: at, Kind: EventMoveRolledBack, LU: m.LU, Node: m.From, By: by,
			Details: map[string]string{"from": m.From, "to": m.To, "state": m.State, "by_monitor": op.Role, "reason": m.Reason,
				"seconds": strconv.FormatFloat(at.Sub(m.StartedAt).Seconds(), 'f', 3, 64)}}}
	}
	return nil
}
