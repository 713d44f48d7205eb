// Package pairmux schedules the frames of many LUs onto one replication
// connection between two nodes (issue 20): per-LU order, fair turns
// between LUs, and a bounded buffer per LU. It is a pure data structure
// (no goroutines, no I/O); a sender pushes each LU's frames and a single
// writer takes batches to write. It is not wired into package replication
// yet.
//
// # Scheduling
//
// LUs with queued frames wait in a ring, in the order they became busy.
// Next serves them by deficit round robin: each turn gives the LU at the
// head QuantumBytes of credit, sends its frames in order while the credit
// covers them, and moves it to the tail if frames remain (an LU whose next
// frame is larger than its credit keeps the credit for its next turn). A
// busy LU thus gets one quantum per round however many frames it queued,
// and an LU with one small frame waits at most one round. An LU with
// nothing queued holds no buffer and has no place in the ring.
//
// # Bounds
//
// Push refuses a frame that would take an LU's queued bytes past
// LUBytesMax (ErrFull): the caller waits or fails the write, and no LU can
// fill the connection's memory. A frame larger than LUBytesMax is accepted
// when the LU's queue is empty, so every frame can be sent.
package pairmux

import (
	"errors"
	"fmt"
)

// ErrFull is returned by Push when the LU's queue is at its bound.
var ErrFull = errors.New("pairmux: LU queue full")

// Options bound a Mux.
type Options struct {
	// QuantumBytes is the credit an LU gets per turn (default 64 KiB).
	QuantumBytes int
	// LUBytesMax bounds the bytes queued for one LU (default 4 MiB).
	LUBytesMax int
}

// EnsureDefaults fills unset fields.
func (o *Options) EnsureDefaults() {
	if o.QuantumBytes == 0 {
		o.QuantumBytes = 64 << 10
	}
	if o.LUBytesMax == 0 {
		o.LUBytesMax = 4 << 20
	}
}

// Validate checks the options.
func (o *Options) Validate() error {
	if o.QuantumBytes <= 0 || o.LUBytesMax <= 0 {
		return fmt.Errorf("pairmux: quantum %d and per-LU bound %d must be positive", o.QuantumBytes, o.LUBytesMax)
	}
	return nil
}

// Frame is one queued frame of an LU.
type Frame struct {
	LU   string
	Data []byte
}

// queue is one busy LU's frames. Invariant: len(frames) > 0 while the LU
// is in the ring; bytes is the sum of their lengths.
type queue struct {
	lu      string
	frames  [][]byte
	bytes   int
	deficit int
}

// Mux is the scheduler of one connection. Not safe for concurrent use: the
// caller serializes Push and Next (one mutex around both).
type Mux struct {
	opts Options
	// busy maps each LU with queued frames to its queue; ring holds the
	// same queues in turn order, ring[head] first.
	busy map[string]*queue
	ring []*queue
	head int
}

// New returns an empty Mux.
func New(opts Options) (*Mux, error) {
	opts.EnsureDefaults()
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	return &Mux{opts: opts, busy: map[string]*queue{}}, nil
}

// Push queues frame for lu behind the LU's earlier frames.
func (m *Mux) Push(lu string, frame []byte) error {
	q, ok := m.busy[lu]
	if ok && q.bytes+len(frame) > m.opts.LUBytesMax {
		return fmt.Errorf("%w: %s has %d bytes queued, the bound is %d", ErrFull, lu, q.bytes, m.opts.LUBytesMax)
	}
	if !ok {
		q = &queue{lu: lu}
		m.busy[lu] = q
		m.ring = append(m.ring, q)
	}
	q.frames = append(q.frames, frame)
	q.bytes += len(frame)
	return nil
}

// Queued returns the bytes queued for lu.
func (m *Mux) Queued(lu string) int {
	if q, ok := m.busy[lu]; ok {
		return q.bytes
	}
	return 0
}

// Busy returns how many LUs have frames queued.
func (m *Mux) Busy() int { return len(m.busy) }

// Next appends to dst the frames to write next, in deficit-round-robin
// order, and returns it: whole turns until maxBytes is reached (a turn is
// not cut short, so a batch may exceed maxBytes by one quantum), and at
// least one frame when any is queued (a frame larger than the quantum
// waits until its LU saved up the credit).
func (m *Mux) Next(dst []Frame, maxBytes int) []Frame {
	taken := 0
	for len(m.ring) > 0 && (taken < maxBytes || taken == 0) {
		if m.head >= len(m.ring) {
			m.head = 0
		}
		q := m.ring[m.head]
		q.deficit += m.opts.QuantumBytes
		for len(q.frames) > 0 && len(q.frames[0]) <= q.deficit {
			f := q.frames[0]
			q.frames[0] = nil
			q.frames = q.frames[1:]
			q.bytes -= len(f)
			q.deficit -= len(f)
			taken += len(f)
			dst = append(dst, Frame{LU: q.lu, Data: f})
		}
		if len(q.frames) == 0 {
			delete(m.busy, q.lu)
			m.ring = append(m.ring[:m.head], m.ring[m.head+1:]...)
			continue // the next LU moved into head
		}
		m.head++
	}
	return dst
}
