package replication

import (
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/lupool/lupool/internal/copyset"
)

// pairCopyNode is a copy node's view for a pairReceiver: the writer each
// LU's record names, and each LU's copy lease.
type pairCopyNode struct {
	writers map[string]string
	leases  map[string]*pairCopyLease
}

func newPairCopyNode() *pairCopyNode {
	return &pairCopyNode{writers: map[string]string{}, leases: map[string]*pairCopyLease{}}
}

func (c *pairCopyNode) writerOf(lu string) (string, bool) {
	w, ok := c.writers[lu]
	return w, ok
}

func (c *pairCopyNode) leaseOf(lu string) *pairCopyLease {
	l, ok := c.leases[lu]
	if !ok {
		l = newPairCopyLease()
		c.leases[lu] = l
	}
	return l
}

var _ pairLUs = (*pairCopyNode)(nil)

// TestPairLeaseRenewsEveryEnrolledLU: one heartbeat exchange renews the
// copy's lease of every LU enrolled, and the writer's lease from the copy
// of each; an LU not enrolled gets neither.
func TestPairLeaseRenewsEveryEnrolledLU(t *testing.T) {
	s, c := newPairSender(), newPairCopyNode()
	r := newPairReceiver("w")
	var seats []*pairSeat
	for i := range 1000 {
		lu := fmt.Sprintf("lu%d", i)
		c.writers[lu] = "w"
		seats = append(seats, s.enroll(lu))
	}
	c.writers["idle"] = "w"
	now := int64(100)
	// Two exchanges: the second echoes the first one's answer.
	for range 2 {
		b := s.heartbeat()
		a := r.beat(b, now+1, c)
		s.answered(b, now, now+2, a)
		if len(a.fenced) != 0 {
			t.Fatalf("fenced %v", a.fenced)
		}
		now += 10
	}
	for i, seat := range seats {
		lu := fmt.Sprintf("lu%d", i)
		if got := c.leaseOf(lu).leaseFrom(); got != 101 {
			t.Fatalf("%s: copy lease from %d, want 101 (the first answer, echoed)", lu, got)
		}
		if got := s.leaseFromSeat(seat); got != 110 {
			t.Fatalf("%s: writer lease from %d, want 110 (the second heartbeat's send)", lu, got)
		}
	}
	if got := c.leaseOf("idle").leaseFrom(); got != copyset.Never {
		t.Fatalf("an LU never enrolled reads on a lease from %d", got)
	}
	// The heartbeat carried the 1000 enrollments once; the next carries none.
	if b := s.heartbeat(); len(b.deltas) != 0 {
		t.Fatalf("idle heartbeat carries %d deltas", len(b.deltas))
	}
}

// TestPairLeaseEnrollCountsOnlyLaterAnswers: an answer to a heartbeat sent
// before the enrollment did not vouch for the LU, so it gives the writer
// no lease from that copy.
func TestPairLeaseEnrollCountsOnlyLaterAnswers(t *testing.T) {
	s, c, r := newPairSender(), newPairCopyNode(), newPairReceiver("w")
	c.writers["a"], c.writers["b"] = "w", "w"
	s.enroll("a")
	b1 := s.heartbeat()
	seatB := s.enroll("b") // after b1 left
	s.answered(b1, 10, 12, r.beat(b1, 11, c))
	if got := s.leaseFromSeat(seatB); got != copyset.Never {
		t.Fatalf("b reads on an answer sent before it was enrolled: from %d", got)
	}
	b2 := s.heartbeat()
	s.answered(b2, 20, 22, r.beat(b2, 21, c))
	if got := s.leaseFromSeat(seatB); got != 20 {
		t.Fatalf("b: writer lease from %d, want 20", got)
	}
}

// TestPairLeaseDropStopsRenewal: after the writer drops an LU (its copy
// missed a write), no later heartbeat renews the copy's lease on it, even
// one that was in flight, and the time drop returns covers the lease the
// copy has.
func TestPairLeaseDropStopsRenewal(t *testing.T) {
	s, c, r := newPairSender(), newPairCopyNode(), newPairReceiver("w")
	c.writers["a"], c.writers["b"] = "w", "w"
	s.enroll("a")
	s.enroll("b")
	b1 := s.heartbeat()
	s.answered(b1, 0, 2, r.beat(b1, 1, c))
	b2 := s.heartbeat() // echoes 1; in flight across the drop
	waitFrom := s.drop("a")
	if waitFrom != 2 {
		t.Fatalf("drop returns %d, want 2 (the last answer's arrival)", waitFrom)
	}
	b3 := s.heartbeat()
	s.answered(b2, 5, 7, r.beat(b2, 6, c))
	s.answered(b3, 8, 10, r.beat(b3, 9, c))
	b4 := s.heartbeat()
	r.beat(b4, 11, c)
	if got := c.leaseOf("a").leaseFrom(); got != copyset.Never {
		t.Fatalf("dropped a still reads on a lease from %d", got)
	}
	if got := c.leaseOf("b").leaseFrom(); got != 9 {
		t.Fatalf("b: copy lease from %d, want 9", got)
	}
}

// TestPairLeaseFencesANewWriter: a copy whose record names another writer
// for an LU fences it in its next answer; the writer's lease from it for
// that LU ends, and every heartbeat the writer counted was answered no
// later than the copy's last answer for the old writer (what a promoted
// copy waits out: copyset.TakeOverAt).
func TestPairLeaseFencesANewWriter(t *testing.T) {
	s, c, r := newPairSender(), newPairCopyNode(), newPairReceiver("w")
	c.writers["a"], c.writers["b"] = "w", "w"
	seatA, seatB := s.enroll("a"), s.enroll("b")
	b1 := s.heartbeat()
	s.answered(b1, 0, 2, r.beat(b1, 1, c))
	// The copy node becomes a's writer.
	c.writers["a"] = "x"
	r.recordChanged("a", "x", false, c.leaseOf("a"))
	if got := c.leaseOf("a").lastAnswered(); got != 1 {
		t.Fatalf("last answered for the old writer %d, want 1", got)
	}
	b2 := s.heartbeat()
	a2 := r.beat(b2, 6, c)
	if len(a2.fenced) != 1 || a2.fenced[0] != "a" {
		t.Fatalf("answer fences %v, want [a]", a2.fenced)
	}
	s.answered(b2, 5, 7, a2)
	if got := s.leaseFromSeat(seatA); got != copyset.Never {
		t.Fatalf("the old writer reads a on a lease from %d after the copy took it over", got)
	}
	if got := s.leaseFromSeat(seatB); got != 5 {
		t.Fatalf("b: writer lease from %d, want 5", got)
	}
	// Enrolling again in the same session is refused the same way.
	seatA = s.enroll("a")
	b3 := s.heartbeat()
	a3 := r.beat(b3, 9, c)
	s.answered(b3, 8, 10, a3)
	if len(a3.fenced) != 1 || s.leaseFromSeat(seatA) != copyset.Never {
		t.Fatalf("re-enrollment not fenced: %v, lease from %d", a3.fenced, s.leaseFromSeat(seatA))
	}
}

// TestPairLeaseNewSession: a session that ends takes every lease it gave;
// the writer's next session enrolls its LUs again and starts the echo
// over.
func TestPairLeaseNewSession(t *testing.T) {
	s, c, r := newPairSender(), newPairCopyNode(), newPairReceiver("w")
	c.writers["a"] = "w"
	s.enroll("a")
	for i := int64(0); i < 2; i++ {
		b := s.heartbeat()
		s.answered(b, 10*i, 10*i+2, r.beat(b, 10*i+1, c))
	}
	if c.leaseOf("a").leaseFrom() != 1 {
		t.Fatalf("no lease before the break")
	}
	r.close(c)
	if got := c.leaseOf("a").leaseFrom(); got != copyset.Never {
		t.Fatalf("lease from %d after the session closed", got)
	}
	s.newSession()
	r2 := newPairReceiver("w")
	b := s.heartbeat()
	if b.echo != copyset.Never || len(b.deltas) != 1 || b.deltas[0].lu != "a" {
		t.Fatalf("first heartbeat of a new session: echo %d deltas %v", b.echo, b.deltas)
	}
	s.answered(b, 30, 32, r2.beat(b, 31, c))
	b = s.heartbeat()
	r2.beat(b, 41, c)
	if got := c.leaseOf("a").leaseFrom(); got != 31 {
		t.Fatalf("lease from %d in the new session, want 31", got)
	}
}

// TestPairLeaseRandom drives a writer node and a copy node through random
// heartbeats, delays (FIFO per direction, as on one connection),
// enrollments, drops, take-overs by the copy node and session breaks, and
// checks the copyset rules after every step, for every LU:
//
//   - a dropped LU's copy lease runs from no later than the time its drop
//     returned (copyset.AckAfterCopyLoss's lastAck);
//   - once the copy node took an LU over, the old writer's lease from it
//     runs from no later than the copy's last answer for the old writer
//     at the take-over (copyset.TakeOverAt).
func TestPairLeaseRandom(t *testing.T) {
	seed := time.Now().UnixNano()
	t.Logf("seed %d", seed)
	for run := range 200 {
		pairLeaseRun(t, rand.New(rand.NewPCG(uint64(seed), uint64(run))))
		if t.Failed() {
			t.Fatalf("run %d of seed %d", run, seed)
		}
	}
}

func pairLeaseRun(t *testing.T, rng *rand.Rand) {
	const lus = 6
	s, c := newPairSender(), newPairCopyNode()
	r := newPairReceiver("w")
	name := func(i int) string { return fmt.Sprintf("lu%d", i) }
	seats := map[string]*pairSeat{}
	dropAt := map[string]int64{}    // dropped (not enrolled since): drop's return
	takenOver := map[string]int64{} // taken over by the copy node: its last answer then
	for i := range lus {
		c.writers[name(i)] = "w"
	}
	type inFlight struct {
		b      pairBeat
		sentAt int64
		r      *pairReceiver
	}
	type reply struct {
		inFlight
		a pairAnswer
	}
	var toCopy []inFlight
	var toWriter []reply
	now := int64(0)
	for step := range 300 {
		now += rng.Int64N(5)
		switch k := rng.IntN(9); k {
		case 0, 1: // enroll an LU the writer still writes
			lu := name(rng.IntN(lus))
			if _, over := takenOver[lu]; !over {
				seats[lu] = s.enroll(lu)
				delete(dropAt, lu)
			}
		case 2: // the copy misses a write: drop
			lu := name(rng.IntN(lus))
			if _, ok := seats[lu]; ok {
				dropAt[lu] = s.drop(lu)
				delete(seats, lu)
			}
		case 3, 4: // send a heartbeat
			toCopy = append(toCopy, inFlight{b: s.heartbeat(), sentAt: now, r: r})
		case 5: // the copy node gets the oldest heartbeat
			if len(toCopy) > 0 {
				f := toCopy[0]
				toCopy = toCopy[1:]
				toWriter = append(toWriter, reply{inFlight: f, a: f.r.beat(f.b, now, c)})
			}
		case 6: // the writer gets the oldest answer
			if len(toWriter) > 0 {
				f := toWriter[0]
				toWriter = toWriter[1:]
				s.answered(f.b, f.sentAt, now, f.a)
			}
		case 7: // the copy node becomes an LU's writer
			lu := name(rng.IntN(lus))
			if _, over := takenOver[lu]; !over && rng.IntN(3) == 0 {
				c.writers[lu] = "x"
				l := c.leaseOf(lu)
				if seat := l.seat.Load(); seat != nil {
					seat.r.recordChanged(lu, "x", false, l)
				}
				takenOver[lu] = l.lastAnswered()
			}
		case 8: // the connection breaks: both sides start a new session
			if rng.IntN(4) == 0 {
				r.close(c)
				toCopy, toWriter = nil, nil
				s.newSession()
				r = newPairReceiver("w")
			}
		}
		for i := range lus {
			lu := name(i)
			if at, ok := dropAt[lu]; ok {
				if from := c.leaseOf(lu).leaseFrom(); from != copyset.Never && from > at {
					t.Errorf("step %d: dropped %s (wait counted from %d) reads on a copy lease from %d", step, lu, at, from)
					return
				}
			}
			if at, ok := takenOver[lu]; ok {
				if from := s.leaseFromSeat(seats[lu]); from != copyset.Never && from > at {
					t.Errorf("step %d: %s taken over after answering at %d; the old writer reads on a lease from %d", step, lu, at, from)
					return
				}
			}
		}
	}
}
