package cluster

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"time"

	"github.com/cockroachdb/pebble/v2"
)

// The event log (issue 14): every event the pool reports is a record in the
// replicated metadata, numbered by the state machine, so every node holds
// the same log, a reader resumes exactly after a sequence number, and no
// event is lost with the node that saw it.
//
// Most events are derived by the state machine itself when it applies a
// command (an LU created, a copy's state changed, a writer moved, a node
// joined, a command rejected): no extra round trip, and no event without
// its change or change without its event. Events only a node can observe
// (a pool threshold crossed, a primary elected, an FFDC bundle, a node
// found dead) are proposed with AppendEvent, an event.append command.
//
// Keys (part of the on-disk format, inside "meta/", so snapshots carry
// them):
//
//	"meta/event/" + 16 hex digits of seq -> JSON Event
//	"meta/event-seq"                     -> last assigned seq (8 bytes, big-endian)
//
// Retention: the primary proposes event.prune commands that delete every
// event below a sequence number (PruneEvents; Options.EventsMax and
// Options.EventsMaxAge drive the primary's retention loop). Sequence
// numbers are never reused: after a prune, a reader asking for events after
// a pruned seq gets the oldest kept event next (a jump in seq it can see).
const (
	eventPrefix = "meta/event/"
	keyEventSeq = "meta/event-seq"
)

// Event kinds. Part of the on-disk format (stored in events, matched by
// subscribers).
const (
	// Derived by the state machine.
	EventLUCreated        = "LUCreated"        // lu; details size_bytes, copies, kind, writer
	EventLUResized        = "LUResized"        // lu; details from_bytes, to_bytes
	EventLUDeleted        = "LUDeleted"        // lu
	EventCopyStateChanged = "CopyStateChanged" // lu, node (the copy's); details from, to ("removed" when dropped), epoch
	EventResyncStarted    = "ResyncStarted"    // lu, node; details epoch (a copy went to resyncing)
	EventResyncFinished   = "ResyncFinished"   // lu, node; details epoch (resyncing to in-sync)
	EventWriterMoved      = "WriterMoved"      // lu, node (the new writer); details from, to, epoch, reason
	EventNodeJoined       = "NodeJoined"       // node
	EventNodeRemoved      = "NodeRemoved"      // node
	EventCommandRejected  = "CommandRejected"  // by (the proposer); details type, error (an illegal state-machine command)
	EventFFDCCaptured     = "FFDCCaptured"     // node (whose bundle); details id, correlation_id, trigger, bytes, nodes
	EventMoveStarted      = "MoveStarted"      // lu, node (the target); details from, to, epoch
	EventMoveCompleted    = "MoveCompleted"    // lu, node (the new writer); details from, to, by_monitor, reason, seconds
	EventMoveRolledBack   = "MoveRolledBack"   // lu, node (the writer kept); details from, to, state, by_monitor, reason, seconds

	// Proposed with AppendEvent by the node that observes them.
	EventPrimaryElected       = "PrimaryElected"       // node (the new primary); details term
	EventPoolThreshold        = "PoolThreshold"        // node; details level (ok|warn|critical), from, used_percent
	EventOvercommitApproached = "OvercommitApproached" // node; details ratio, limit
	EventResyncBytes          = "ResyncBytes"          // lu, node (the writer); details copy, bytes, seconds: what a finished resync sent
	EventNodeSuspect          = "NodeSuspect"          // node (issue 19 wires it)
	EventNodeDead             = "NodeDead"             // node (issue 19)
	EventNodeBack             = "NodeBack"             // node (issue 19)
	EventQuorumLost           = "QuorumLost"           // node (the observer; issue 19)
	EventQuorumRegained       = "QuorumRegained"       // node (issue 19)
	EventPagingRequested      = "PagingRequested"      // lu; details vm, size_bytes
	EventPagingReleased       = "PagingReleased"       // lu; details vm
	EventScrubRepaired        = "ScrubRepaired"        // lu, node (the writer); details copy, offset_bytes, length_bytes
	EventECDegradedRead       = "ECDegradedRead"       // node (the reader); details image, disk, shards: a read of an EC image was reconstructed
	EventECEncoding           = "ECEncoding"           // details image, ec: a conversion to erasure coding started (derived)
	EventECReady              = "ECReady"              // details image, ec, raw_bytes: the image is served from its shards (derived)
	EventECShardMoved         = "ECShardMoved"         // node (the new one); details image, disk, shard, from, to: a rebuilt shard replaced a lost one (derived)
)

// derivedKinds are written only by the state machine: an event.append of
// one of them is rejected (no node can fake an LU deletion).
var derivedKinds = map[string]bool{
	EventLUCreated: true, EventLUResized: true, EventLUDeleted: true, EventCopyStateChanged: true,
	EventResyncStarted: true, EventResyncFinished: true, EventNodeJoined: true, EventNodeRemoved: true,
	EventCommandRejected: true, EventFFDCCaptured: true, EventMoveStarted: true, EventMoveCompleted: true,
	EventMoveRolledBack: true, EventECEncoding: true, EventECReady: true, EventECShardMoved: true,
}

// proposedKinds may be proposed with AppendEvent.
var proposedKinds = map[string]bool{
	EventPrimaryElected: true, EventPoolThreshold: true, EventOvercommitApproached: true,
	EventResyncBytes: true, EventNodeSuspect: true, EventNodeDead: true, EventNodeBack: true, EventQuorumLost: true,
	EventQuorumRegained: true, EventPagingRequested: true, EventPagingReleased: true, EventWriterMoved: true,
	EventScrubRepaired: true, EventECDegradedRead: true,
}

// EventKinds returns every known event kind (derived and proposed).
func EventKinds() []string {
	out := make([]string, 0, len(derivedKinds)+len(proposedKinds))
	for k := range derivedKinds {
		out = append(out, k)
	}
	for k := range proposedKinds {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// KnownEventKind reports whether kind is an event kind of this binary.
func KnownEventKind(kind string) bool { return derivedKinds[kind] || proposedKinds[kind] }

// Limits on one event.
const (
	eventKindLengthMax     = 64
	eventDetailsMax        = 32
	eventDetailKeyMax      = 64
	eventDetailValueMax    = 1024
	eventsReadLimitMax     = 4096
	defaultEventsMax       = 100000
	defaultEventsMaxAge    = 30 * 24 * time.Hour
	eventRetentionEvery    = time.Minute
	eventPruneBatchMax     = 1 << 20
	rejectedErrorLengthMax = 512
)

// Event is one entry of the event log. Its JSON is part of the on-disk
// format and of the API (GET /v1/events).
type Event struct {
	// Seq is assigned by the state machine: 1, 2, 3, ... with no gaps
	// (until retention prunes the oldest).
	Seq uint64 `json:"seq"`
	// Time is the proposer's clock when it proposed the command.
	Time time.Time `json:"time"`
	Kind string    `json:"kind"`
	LU   string    `json:"lu,omitempty"`
	Node string    `json:"node,omitempty"`
	// By is the node that proposed the command behind the event.
	By      string            `json:"by,omitempty"`
	Details map[string]string `json:"details,omitempty"`
}

func eventKey(seq uint64) string { return fmt.Sprintf("%s%016x", eventPrefix, seq) }

// checkEventInput checks what a proposer may put in an event.append.
func checkEventInput(ev Event, by Proposer) error {
	if ev.Kind == "" || len(ev.Kind) > eventKindLengthMax {
		return fmt.Errorf("%w: event kind %q: 1 to %d characters", ErrInvalid, ev.Kind, eventKindLengthMax)
	}
	for _, r := range ev.Kind {
		if !(r >= 'A' && r <= 'Z' || r >= 'a' && r <= 'z' || r >= '0' && r <= '9') {
			return fmt.Errorf("%w: event kind %q: letters and digits only", ErrInvalid, ev.Kind)
		}
	}
	if derivedKinds[ev.Kind] {
		return fmt.Errorf("%w: event kind %s is written by the state machine only", ErrInvalid, ev.Kind)
	}
	if ev.LU != "" {
		if err := ValidateName(ev.LU); err != nil {
			return err
		}
	}
	if len(ev.Node) > NameLengthMax {
		return fmt.Errorf("%w: event node id is %d bytes, at most %d", ErrInvalid, len(ev.Node), NameLengthMax)
	}
	if len(ev.Details) > eventDetailsMax {
		return fmt.Errorf("%w: event has %d details, at most %d", ErrInvalid, len(ev.Details), eventDetailsMax)
	}
	for k, v := range ev.Details {
		if k == "" || len(k) > eventDetailKeyMax || len(v) > eventDetailValueMax {
			return fmt.Errorf("%w: event detail %q: key 1 to %d bytes, value at most %d", ErrInvalid, k, eventDetailKeyMax, eventDetailValueMax)
		}
	}
	if by.NodeID == "" {
		return fmt.Errorf("%w: an event needs its proposer's node id", ErrInvalid)
	}
	if !by.Primary && ev.Node != by.NodeID {
		return fmt.Errorf("%w: %q proposes an event about node %q; a node reports events about itself only (the primary about any)",
			ErrForeignRecord, by.NodeID, ev.Node)
	}
	return nil
}

// AppendEvent proposes ev (Kind, LU, Node, Details; Seq, Time and By are
// filled in) on behalf of by and waits until the state machine has
// numbered and stored it. It is the one way for code outside the state
// machine to report an event (the primary's loops: Proposer{NodeID:
// n.ID(), Primary: true}; another node's report forwarded by the leader:
// its authenticated id, and then ev.Node must be that id, filled in when
// empty). Leader only: a node that is not the leader sends the event to the
// leader's peer port (POST /v1/internal/events; the daemon's emitter does
// that, queued, without blocking the caller). Kinds the state machine
// derives itself are refused. Returns ErrInvalid, ErrForeignRecord,
// ErrNotLeader or ErrOutcomeUnknown.
func (n *Node) AppendEvent(ctx context.Context, by Proposer, ev Event) error {
	if ev.Node == "" && !by.Primary {
		ev.Node = by.NodeID
	}
	if err := checkEventInput(ev, by); err != nil {
		return err
	}
	if !KnownEventKind(ev.Kind) {
		return fmt.Errorf("%w: unknown event kind %q", ErrInvalid, ev.Kind)
	}
	ev.Seq, ev.Time, ev.By = 0, time.Time{}, ""
	_, err := n.propose(ctx, &command{Type: cmdAppendEvent, Event: &ev, By: by.NodeID, Primary: by.Primary})
	return err
}

// PruneEvents deletes every event with a seq below belowSeq (proposed by
// this node as the primary). Leader only.
func (n *Node) PruneEvents(ctx context.Context, belowSeq uint64) error {
	_, err := n.propose(ctx, &command{Type: cmdPruneEvents, BelowSeq: belowSeq, By: n.opts.NodeID, Primary: true})
	return err
}

// Events returns up to limit events with a seq above after, in seq order,
// from the local applied state (a follower may lag the leader by a few
// entries). limit is capped at 4096.
func (n *Node) Events(after uint64, limit int) (out []Event, err error) {
	err = n.readDB(func() error {
		out, err = readEvents(n.db, after, limit)
		return err
	})
	return out, err
}

// LastEventSeq returns the seq of the newest event (0 when none).
func (n *Node) LastEventSeq() uint64 { return n.fsm.eventSeq.Load() }

// EventsChanged returns a channel closed when the next event is stored:
// read Events after the last seq seen, and if there is nothing new, wait
// on the channel (taken before the read, so nothing is missed).
func (n *Node) EventsChanged() <-chan struct{} { return n.fsm.eventsChanged() }

func readEvents(r reader, after uint64, limit int) ([]Event, error) {
	if limit <= 0 || limit > eventsReadLimitMax {
		limit = eventsReadLimitMax
	}
	if after == ^uint64(0) {
		return nil, nil
	}
	it, err := r.NewIter(&pebble.IterOptions{LowerBound: []byte(eventKey(after + 1)), UpperBound: prefixEnd(eventPrefix)})
	if err != nil {
		return nil, fmt.Errorf("cluster: iterate events: %w", err)
	}
	var out []Event
	for ok := it.First(); ok && len(out) < limit; ok = it.Next() {
		var ev Event
		if err := json.Unmarshal(it.Value(), &ev); err != nil {
			it.Close()
			return nil, fmt.Errorf("cluster: decode %s: %w", it.Key(), err)
		}
		out = append(out, ev)
	}
	if err := it.Close(); err != nil {
		return nil, fmt.Errorf("cluster: iterate events: %w", err)
	}
	return out, nil
}

// firstEvent returns the oldest kept event (ok false when there is none).
func firstEvent(r reader) (Event, bool, error) {
	evs, err := readEvents(r, 0, 1)
	if err != nil || len(evs) == 0 {
		return Event{}, false, err
	}
	return evs[0], true, nil
}

// appendEvents numbers evs after the last seq and stages them in b; it
// returns the new last seq. Called by Apply only.
func appendEvents(b *pebble.Batch, last uint64, evs []Event) (uint64, error) {
	for i := range evs {
		last++
		evs[i].Seq = last
		if err := putJSON(b, eventKey(last), evs[i]); err != nil {
			return 0, err
		}
	}
	if len(evs) > 0 {
		if err := b.Set([]byte(keyEventSeq), binary.BigEndian.AppendUint64(nil, last), nil); err != nil {
			return 0, fmt.Errorf("cluster: batch: %w", err)
		}
	}
	return last, nil
}

// copyEvents derives the events of an applied lu.copies change: one
// CopyStateChanged per copy whose state changed (or that was added or
// dropped), ResyncStarted and ResyncFinished for the resync transitions,
// and WriterMoved when the writer changed.
func copyEvents(old, lu LU, at time.Time, by string) []Event {
	epoch := strconv.FormatUint(lu.Epoch, 10)
	mk := func(kind, node string, d map[string]string) Event {
		return Event{Time: at, Kind: kind, LU: lu.Name, Node: node, By: by, Details: d}
	}
	var out []Event
	if old.Writer != lu.Writer {
		// A failover records the old writer's copy out of sync (or new):
		// it may hold writes it never acknowledged.
		reason := "move"
		for _, r := range lu.Replicas {
			if r.NodeID == old.Writer && r.State != ReplicaInSync {
				reason = "failover"
			}
		}
		out = append(out, mk(EventWriterMoved, lu.Writer, map[string]string{"from": old.Writer, "to": lu.Writer, "epoch": epoch, "reason": reason}))
	}
	oldStates := map[string]string{}
	for _, r := range old.Replicas {
		oldStates[r.NodeID] = r.State
	}
	for _, r := range lu.Replicas {
		from, had := oldStates[r.NodeID]
		delete(oldStates, r.NodeID)
		if !had {
			from = "none"
		}
		if from == r.State {
			continue
		}
		out = append(out, mk(EventCopyStateChanged, r.NodeID, map[string]string{"from": from, "to": r.State, "epoch": epoch}))
		switch {
		case r.State == ReplicaResyncing:
			out = append(out, mk(EventResyncStarted, r.NodeID, map[string]string{"epoch": epoch}))
		case from == ReplicaResyncing && r.State == ReplicaInSync:
			out = append(out, mk(EventResyncFinished, r.NodeID, map[string]string{"epoch": epoch}))
		}
	}
	for _, r := range old.Replicas { // dropped copies, in the old record's order
		if _, gone := oldStates[r.NodeID]; gone {
			out = append(out, mk(EventCopyStateChanged, r.NodeID, map[string]string{"from": r.State, "to": "removed", "epoch": epoch}))
		}
	}
	return out
}

// rejectedEvent is the CommandRejected event of an entry Apply refused.
func rejectedEvent(res applyResult, at time.Time) Event {
	msg := res.err.Error()
	if len(msg) > rejectedErrorLengthMax {
		msg = msg[:rejectedErrorLengthMax]
	}
	d := map[string]string{"error": msg}
	if res.cmdType != "" {
		d["type"] = res.cmdType
	}
	return Event{Time: at, Kind: EventCommandRejected, By: res.by, Details: d}
}

// retentionCutoff returns the seq below which events go under the limits
// (0: nothing to prune): at most maxCount events, none older than maxAge
// at now.
func retentionCutoff(r reader, last uint64, maxCount int, maxAge time.Duration, now time.Time) (uint64, error) {
	first, ok, err := firstEvent(r)
	if err != nil || !ok {
		return 0, err
	}
	var below uint64
	if maxCount > 0 && last >= first.Seq && last-first.Seq+1 > uint64(maxCount) {
		below = last - uint64(maxCount) + 1
	}
	if maxAge > 0 {
		oldest := now.Add(-maxAge)
		after := first.Seq - 1
		for {
			evs, err := readEvents(r, after, 256)
			if err != nil {
				return 0, err
			}
			stop := len(evs) == 0
			for _, ev := range evs {
				if !ev.Time.Before(oldest) {
					stop = true
					break
				}
				after = ev.Seq
				if ev.Seq+1 > below {
					below = ev.Seq + 1
				}
			}
			if stop || after-first.Seq > eventPruneBatchMax {
				break
			}
		}
	}
	if below <= first.Seq {
		return 0, nil
	}
	return below, nil
}

// retentionLoop runs on every node and prunes only while this node is the
// primary: every eventRetentionEvery it proposes one event.prune when the
// log exceeds Options.EventsMax events or holds events older than
// Options.EventsMaxAge.
func (n *Node) retentionLoop() {
	defer n.wg.Done()
	t := time.NewTicker(n.opts.EventRetentionEvery)
	defer t.Stop()
	for {
		select {
		case <-n.closed:
			return
		case <-t.C:
		}
		if !n.IsLeader() {
			continue
		}
		if err := n.pruneOnce(); err != nil && !errors.Is(err, ErrClosed) && !errors.Is(err, ErrNotLeader) {
			n.log.Warn("event retention", "err", err)
		}
	}
}

func (n *Node) pruneOnce() error {
	var below uint64
	err := n.readDB(func() (err error) {
		below, err = retentionCutoff(n.db, n.fsm.eventSeq.Load(), n.opts.EventsMax, n.opts.EventsMaxAge, time.Now())
		return err
	})
	if err != nil || below == 0 {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), n.opts.ApplyTimeout)
	defer cancel()
	return n.PruneEvents(ctx, below)
}
