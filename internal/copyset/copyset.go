// Package copyset holds the timing and fencing rules of one LU's copy set
// as pure functions and values: no goroutines, no clock, no I/O. Time is
// an int64 of nanoseconds on a clock the caller owns (replication's
// Manager.now, or a test's logical clock), and every rule answers a
// question or returns the time from which something becomes allowed.
//
// replication's Mirror (the writer), its incoming streams (the copies) and
// the failover path ask these rules; the interaction tests of this package
// (testdata/, commands write, read, deliver, drop, partition, heal, crash,
// restart, tick) drive a whole copy set built from the same rules through
// message loss, partitions, freezes and crashes and check, after every
// step, the invariant the replication package promises:
//
//	no node ever serves a read that misses an acknowledged write.
//
// # The rules
//
//   - Fencing. A copy answers only frames of its epoch or a newer one; a
//     writer whose epoch is older is refused and cannot acknowledge
//     (AcceptFrame).
//   - A copy's read lease. A copy in sync reads its own volume until
//     ReadLease after the latest of its own ping-answer times that the
//     writer echoed back in a later ping (the writer received that answer,
//     so its wait after a copy loss, counted from the answers it received,
//     covers the lease), or while a metadata lease confirmed at its epoch
//     is younger than ReadLease from when it was asked (CopyMayRead). A
//     frame that waited in a buffer (the copy was frozen, the network held
//     it) echoes an old time and cannot stretch the lease; a lease counted
//     from a frame's arrival could, and the interaction tests show the
//     stale read that follows (unsafe=lease-on-arrival).
//   - The writer's read lease. The writer reads its own volume while every
//     other copy in sync answered a frame it sent within ReadLease (none of
//     them can have become the writer of a newer epoch and acknowledged a
//     write this volume lacks), or while a metadata lease holds
//     (WriterMayRead).
//   - Losing a copy. A writer whose copy misses a frame records it out of
//     sync (epoch + 1) in the metadata, then acknowledges what the copy
//     missed only from ReadLease after the copy last answered, and, where
//     copies may hold metadata leases, ReadLease after the record
//     (AckAfterCopyLoss): by then the copy no longer reads locally.
//   - Promotion. The primary promotes a copy in sync when the writer has
//     been silent for FailoverAfter and ReadLease has passed since it last
//     confirmed the old writer a metadata lease (MayPromote); FailoverAfter
//     must exceed ReadLease (Params.Validate).
//   - Taking over. A promoted copy acknowledges nothing before ReadLease
//     after the last frame it answered the old writer (TakeOverAt): the old
//     writer's own read lease, renewed by that answer, has run out.
//   - After an unclean stop, a writer waits ReadLease from its start
//     before it acknowledges anything (its copies may read on leases of
//     its previous run) and compares its copies before it trusts them.
//
// These rules assume the nodes' clocks advance at the same rate.
package copyset

import (
	"errors"
	"fmt"
	"time"
)

// Params are the copy set's timings.
type Params struct {
	// ReadLease is how long an answer (or a metadata confirmation) lets
	// a node read its own volume.
	ReadLease time.Duration
	// FailoverAfter is how long the writer must be silent before the
	// primary promotes a copy.
	FailoverAfter time.Duration
}

// ErrParams is returned (wrapped) by Params.Validate.
var ErrParams = errors.New("copyset: invalid timings")

// Validate checks the relations the rules rely on.
func (p Params) Validate() error {
	if p.ReadLease <= 0 {
		return fmt.Errorf("%w: read lease %v must be positive", ErrParams, p.ReadLease)
	}
	if p.FailoverAfter != 0 && p.FailoverAfter <= p.ReadLease {
		return fmt.Errorf("%w: failover after %v must be longer than the read lease %v", ErrParams, p.FailoverAfter, p.ReadLease)
	}
	return nil
}

// never is a time so far in the past that no lease from it holds.
const never = -1 << 62

// Never is the time of an answer or confirmation that never came.
const Never int64 = never

// within reports whether now is less than lease after since.
func within(now, since int64, lease time.Duration) bool {
	return since != never && now-since < int64(lease)
}

// LeaseHolds reports whether a lease that began at since (Never: none)
// still holds at now.
func LeaseHolds(p Params, now, since int64) bool { return within(now, since, p.ReadLease) }

// AcceptFrame reports whether a copy at epoch copyEpoch answers a frame
// the writer sent at frameEpoch: only frames of its epoch or newer.
func AcceptFrame(copyEpoch, frameEpoch uint64) bool { return frameEpoch >= copyEpoch }

// CopyMayRead reports whether a copy recorded in sync may serve a read
// from its own volume at now: the writer echoed one of its ping answers
// made within ReadLease (leaseFrom), or a metadata lease asked at
// metaAskedAt was confirmed for the copy's current epoch (metaEpoch ==
// epoch).
func CopyMayRead(p Params, now int64, inSync bool, leaseFrom int64, epoch, metaEpoch uint64, metaAskedAt int64) bool {
	if !inSync {
		return false
	}
	return within(now, leaseFrom, p.ReadLease) || (metaEpoch == epoch && within(now, metaAskedAt, p.ReadLease))
}

// Peer is the writer's view of another copy, as the rules need it.
type Peer struct {
	// InSync: the copy is recorded in sync (a resyncing or out-of-sync
	// copy serves no reads, so it holds no lease to wait for).
	InSync bool
	// LeaseFrom is when the writer sent the latest frame this copy
	// answered at the writer's epoch (Never if none).
	LeaseFrom int64
}

// WriterMayRead reports whether the writer may read its own volume at
// now: every other copy in sync answered a frame sent within ReadLease, or
// metaValid (a metadata lease confirms this node still writes at its
// epoch).
func WriterMayRead(p Params, now int64, peers []Peer, metaValid bool) bool {
	if metaValid {
		return true
	}
	for _, c := range peers {
		if !PeerHolds(p, now, c) {
			return false
		}
	}
	return true
}

// PeerHolds reports whether copy c does not stand in the way of the
// writer's read lease at now: it is not in sync, or it answered a frame
// sent within ReadLease.
func PeerHolds(p Params, now int64, c Peer) bool {
	return !c.InSync || within(now, c.LeaseFrom, p.ReadLease)
}

// AckAfterCopyLoss returns the time from which the writer may acknowledge
// what a copy missed, once the copy's out-of-sync record is committed at
// recordedAt: ReadLease after the copy last answered (lastAck, when the
// writer received its answer), and, when copies may hold metadata leases,
// ReadLease after the record (a lease confirmed just before it).
func AckAfterCopyLoss(p Params, lastAck, recordedAt int64, metaLeases bool) int64 {
	at := int64(never)
	if lastAck != never {
		at = lastAck + int64(p.ReadLease)
	}
	if metaLeases {
		at = max(at, recordedAt+int64(p.ReadLease))
	}
	return at
}

// MayPromote reports whether the primary may promote a copy of an LU whose
// writer it last heard from at lastHeard and last confirmed a metadata
// lease at lastConfirmed (Never if it did not).
func MayPromote(p Params, now, lastHeard, lastConfirmed int64) bool {
	if p.FailoverAfter <= 0 {
		return false
	}
	return !within(now, lastHeard, p.FailoverAfter) && !within(now, lastConfirmed, p.ReadLease)
}

// TakeOverAt returns the time from which a promoted copy may acknowledge
// anything: ReadLease after the last frame it answered the old writer.
func TakeOverAt(p Params, lastAnswered int64) int64 {
	if lastAnswered == never {
		return never
	}
	return lastAnswered + int64(p.ReadLease)
}
