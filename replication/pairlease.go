package replication

import (
	"maps"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/lupool/lupool/internal/copyset"
)

// Read leases per node pair (issue 20), not yet wired into Mirror and
// ServeStream: one heartbeat between a writer node and a copy node renews
// the read leases of every LU the two share, instead of one ping loop per
// LU. An idle LU then costs a few words on each side: no timer, no
// goroutine, no system call of its own.
//
// The heartbeat runs in sessions: a session is one connection from the
// writer node to the copy node, and both sides forget a session's state
// when its connection ends. Within a session, frames arrive in the order
// they were sent. Each heartbeat carries
//
//   - the echo: the copy node's answer time in the latest heartbeat answer
//     the writer node received in this session (copyset.Never before the
//     first), and
//   - the enrollment deltas since the previous heartbeat: "enroll LU" (the
//     writer counts this node's copy of LU in sync and has a stream to
//     it) and "drop LU" (it no longer does: the copy missed something, or
//     the writer stopped being the writer here).
//
// The copy node applies the deltas in order, then moves the session's
// lease to the echo; the lease covers every LU enrolled in the session.
// Its answer carries its answer time and the LUs it refuses to vouch for
// (fenced: its record names another writer, or no such LU). The rules of
// package copyset keep holding per LU:
//
//   - A copy's lease counts from its own answer time that the writer
//     echoed (copyset.CopyMayRead), now the session's: the writer received
//     that answer, and a writer that loses a copy drops the LU first and
//     then counts its wait from the session's last answer
//     (pairSender.drop returns it, for copyset.AckAfterCopyLoss). A
//     heartbeat sent after the drop carries the drop ahead of its echo; one
//     sent before echoes an answer received before the drop.
//   - The writer's lease from a copy counts from when it sent a heartbeat
//     the copy answered without fencing the LU (copyset.WriterMayRead). A
//     copy whose record names another writer fences the LU, in the answer
//     to the enrollment or, when the record changes, in its next answer,
//     and records the session's last answer time as the last frame it
//     answered the old writer (copyset.TakeOverAt), since every answer
//     until then vouched for the LU.
//   - Epochs fence per LU: a copy vouches for an LU only while its record
//     names the session's peer as the writer; an LU whose writer changed
//     is fenced in that session for good (a new writer enrolls it in its
//     own session).

// pairDelta is one enrollment change in a heartbeat.
type pairDelta struct {
	lu   string
	drop bool // false: enroll
	// seat is the writer's seat of an enrollment (not on the wire).
	seat *pairSeat
}

// pairSender is the writer node's side of the heartbeat to one copy node.
// Safe for concurrent use.
type pairSender struct {
	// lastAck is when (the writer's clock) a heartbeat answer of any
	// session last arrived.
	lastAck atomic.Int64
	// latest is the latest heartbeat that was answered (nil: none).
	latest atomic.Pointer[pairSent]

	mu struct {
		sync.Mutex
		// session counts connections; enrollments of an older session
		// are sent again in the new one.
		session uint64
		// echo is the copy node's answer time in the latest answer of
		// this session (copyset.Never: none yet).
		echo int64
		// enrolled holds the LUs whose copies on the peer are in sync
		// and reached; an entry is fenced when the peer refused to vouch
		// for its LU.
		enrolled map[string]*pairSeat
		// pending are the deltas not yet sent in this session, in order.
		pending []pairDelta
		// seq numbers heartbeats across sessions, from 1.
		seq uint64
	}
}

// pairSent is a heartbeat the copy node answered: its number and when it
// was sent. Immutable.
type pairSent struct {
	seq    uint64
	sentAt int64
}

// pairSeat is one LU's place in a pairSender: the whole per-LU state of a
// pair lease on the writer side.
type pairSeat struct {
	fenced atomic.Bool
	// firstSeq is the heartbeat that first carried the enrollment (0:
	// not sent yet): answers to earlier ones did not vouch for the LU.
	firstSeq atomic.Uint64
}

func newPairSender() *pairSender {
	s := &pairSender{}
	s.lastAck.Store(copyset.Never)
	s.mu.echo = copyset.Never
	s.mu.enrolled = map[string]*pairSeat{}
	return s
}

// enroll adds lu to the LUs the heartbeat vouches for and returns its seat,
// whose lease the writer reads with leaseFrom. Enrolling an LU already
// enrolled and not fenced returns its seat unchanged.
func (s *pairSender) enroll(lu string) *pairSeat {
	s.mu.Lock()
	defer s.mu.Unlock()
	if seat, ok := s.mu.enrolled[lu]; ok && !seat.fenced.Load() {
		return seat
	}
	seat := &pairSeat{}
	s.mu.enrolled[lu] = seat
	s.mu.pending = append(s.mu.pending, pairDelta{lu: lu, seat: seat})
	return seat
}

// drop takes lu out of the LUs the heartbeat vouches for and returns the
// time from which the writer's wait after losing this copy counts (the
// lastAck argument of copyset.AckAfterCopyLoss): every heartbeat sent from
// now on carries the drop before its echo, so the copy's lease on lu runs
// from an answer that arrived before this call, at the latest.
func (s *pairSender) drop(lu string) int64 {
	s.mu.Lock()
	if seat, ok := s.mu.enrolled[lu]; ok {
		seat.fenced.Store(true)
		delete(s.mu.enrolled, lu)
		s.mu.pending = append(s.mu.pending, pairDelta{lu: lu, drop: true})
	}
	s.mu.Unlock()
	return s.lastAck.Load() // after the drop is queued
}

// newSession starts a session on a new connection: the copy node forgot
// the old one, so every enrolled LU is enrolled again, and the echo starts
// over (an answer time of the old session means nothing in the new one).
func (s *pairSender) newSession() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.mu.session++
	s.mu.echo = copyset.Never
	s.mu.pending = s.mu.pending[:0]
	for _, lu := range slices.Sorted(maps.Keys(s.mu.enrolled)) {
		s.mu.pending = append(s.mu.pending, pairDelta{lu: lu, seat: s.mu.enrolled[lu]})
	}
}

// heartbeat returns the next heartbeat of the current session: its
// session, the echo, and the deltas since the previous one.
func (s *pairSender) heartbeat() pairBeat {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.mu.seq++
	b := pairBeat{seq: s.mu.seq, session: s.mu.session, echo: s.mu.echo, deltas: slices.Clone(s.mu.pending)}
	for _, d := range b.deltas {
		if d.seat != nil {
			d.seat.firstSeq.CompareAndSwap(0, b.seq)
		}
	}
	s.mu.pending = s.mu.pending[:0]
	return b
}

// pairBeat is one heartbeat as sent.
type pairBeat struct {
	seq     uint64
	session uint64
	echo    int64
	deltas  []pairDelta
}

// pairAnswer is the copy node's answer to a heartbeat.
type pairAnswer struct {
	// at is the copy node's clock when it answered: the next heartbeat
	// of the session echoes it.
	at int64
	// fenced are the LUs the copy node does not vouch for.
	fenced []string
}

// answered takes the answer a to heartbeat b, which was sent at sentAt and
// answered at now (the writer's clock). Fenced LUs lose their lease before
// the lease moves to sentAt.
func (s *pairSender) answered(b pairBeat, sentAt, now int64, a pairAnswer) {
	s.mu.Lock()
	for _, lu := range a.fenced {
		if seat, ok := s.mu.enrolled[lu]; ok {
			seat.fenced.Store(true)
			delete(s.mu.enrolled, lu)
		}
	}
	if b.session == s.mu.session {
		s.mu.echo = max(s.mu.echo, a.at)
	}
	s.mu.Unlock()
	advance(&s.lastAck, now)
	sent := &pairSent{seq: b.seq, sentAt: sentAt}
	for {
		cur := s.latest.Load()
		if cur != nil && cur.seq >= sent.seq || s.latest.CompareAndSwap(cur, sent) {
			return
		}
	}
}

// leaseFrom returns when the writer sent the latest heartbeat that renewed
// its read lease from this copy of seat's LU (copyset.Peer.LeaseFrom;
// copyset.Never once the LU is dropped or fenced).
func (s *pairSender) leaseFromSeat(seat *pairSeat) int64 {
	latest := s.latest.Load()
	// Read after latest: a fence stored before a later answer is seen.
	if latest == nil || seat == nil || seat.fenced.Load() {
		return copyset.Never
	}
	if first := seat.firstSeq.Load(); first == 0 || latest.seq < first {
		return copyset.Never // answered before the LU was enrolled
	}
	return latest.sentAt
}

// pairReceiver is the copy node's side of one heartbeat session from a
// writer node. Safe for concurrent use.
type pairReceiver struct {
	// writer is the node at the other end (from its certificate).
	// Immutable.
	writer string
	// from is the latest of this node's answer times in this session
	// that the writer echoed: every LU enrolled in the session reads on
	// it (copyset.CopyMayRead).
	from atomic.Int64

	// answered is when this node last answered a heartbeat of the
	// session; written with mu held.
	answered atomic.Int64

	mu struct {
		sync.Mutex
		// enrolled maps each LU the session vouches for to its copy
		// lease.
		enrolled map[string]*pairCopySeat
		// fenced are LUs to report in the next answer.
		fenced []string
		// closed: the connection ended; nothing renews any more.
		closed bool
	}
}

// pairCopySeat is one LU's place in a pairReceiver; it is the copy lease's
// pair pointer while the LU is enrolled.
type pairCopySeat struct {
	r *pairReceiver
}

func newPairReceiver(writer string) *pairReceiver {
	r := &pairReceiver{writer: writer}
	r.from.Store(copyset.Never)
	r.answered.Store(copyset.Never)
	r.mu.enrolled = map[string]*pairCopySeat{}
	return r
}

// pairLUs is what a pairReceiver needs of the copy node: the writer its
// latest record of an LU names (ok false: no such LU here), and each LU's
// copy lease.
type pairLUs interface {
	writerOf(lu string) (writer string, ok bool)
	leaseOf(lu string) *pairCopyLease
}

// pairCopyLease is a copy's per-LU lease state that a session renews: the
// session it is enrolled in (nil: none) and the last time this node
// answered a frame of the LU's writer (copyset.TakeOverAt).
type pairCopyLease struct {
	seat     atomic.Pointer[pairCopySeat]
	answered atomic.Int64
}

func newPairCopyLease() *pairCopyLease {
	l := &pairCopyLease{}
	l.answered.Store(copyset.Never)
	return l
}

// beat applies heartbeat b at now (this node's clock): the deltas in
// order, then the echo; it returns the answer.
func (r *pairReceiver) beat(b pairBeat, now int64, lus pairLUs) pairAnswer {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.mu.closed {
		return pairAnswer{at: now}
	}
	for _, d := range b.deltas {
		if d.drop {
			r.unenrollLocked(d.lu, lus.leaseOf(d.lu), false)
			continue
		}
		if w, ok := lus.writerOf(d.lu); !ok || w != r.writer {
			r.mu.fenced = append(r.mu.fenced, d.lu)
			continue
		}
		l := lus.leaseOf(d.lu)
		if old := l.seat.Load(); old != nil && old.r != r {
			// Enrolled by another session (the old connection's, not yet
			// closed): what it answered still counts for a take-over.
			advance(&l.answered, old.r.answered.Load())
		}
		seat := &pairCopySeat{r: r}
		r.mu.enrolled[d.lu] = seat
		l.seat.Store(seat)
	}
	if b.echo != copyset.Never && b.echo <= now {
		advance(&r.from, b.echo)
	}
	r.answered.Store(now)
	a := pairAnswer{at: now, fenced: r.mu.fenced}
	r.mu.fenced = nil
	return a
}

// recordChanged is called when this node applies a new record of lu
// (deleted: gone). An LU whose writer is no longer the session's peer is
// unenrolled and fenced in the next answer; the session's last answer
// becomes the last frame this copy answered the old writer.
func (r *pairReceiver) recordChanged(lu string, writer string, deleted bool, lease *pairCopyLease) {
	if !deleted && writer == r.writer {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.unenrollLocked(lu, lease, true)
}

// unenrollLocked takes lu out of the session; fence reports it in the
// next answer. r.mu must be held.
func (r *pairReceiver) unenrollLocked(lu string, lease *pairCopyLease, fence bool) {
	seat, ok := r.mu.enrolled[lu]
	if !ok {
		return
	}
	delete(r.mu.enrolled, lu)
	lease.seat.CompareAndSwap(seat, nil)
	advance(&lease.answered, r.answered.Load())
	if fence {
		r.mu.fenced = append(r.mu.fenced, lu)
	}
}

// close ends the session: its LUs no longer read on it.
func (r *pairReceiver) close(lus pairLUs) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.mu.closed = true
	for _, lu := range slices.Sorted(maps.Keys(r.mu.enrolled)) {
		r.unenrollLocked(lu, lus.leaseOf(lu), false)
	}
}

// leaseFrom returns the time from which this copy's lease on its LU runs
// through a session (copyset.Never: not enrolled), for
// copyset.CopyMayRead's leaseFrom.
func (l *pairCopyLease) leaseFrom() int64 {
	seat := l.seat.Load()
	if seat == nil {
		return copyset.Never
	}
	from := seat.r.from.Load()
	if l.seat.Load() != seat { // unenrolled meanwhile: from may be later than its drop
		return copyset.Never
	}
	return from
}

// lastAnswered returns when this copy last answered a frame of the writer
// through a session it is enrolled in, or as recorded when it left one.
func (l *pairCopyLease) lastAnswered() int64 {
	at := l.answered.Load()
	if seat := l.seat.Load(); seat != nil {
		at = max(at, seat.r.answered.Load())
	}
	return at
}

// advance moves v to t if t is later.
func advance(v *atomic.Int64, t int64) {
	for {
		cur := v.Load()
		if t <= cur || v.CompareAndSwap(cur, t) {
			return
		}
	}
}
