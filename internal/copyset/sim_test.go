package copyset

import (
	"fmt"
	"sort"
	"strings"
	"time"
)

// sim is a whole copy set built from this package's rules: one writer,
// its copies, the metadata (the primary, always on the side of a
// partition that holds the majority of nodes) and a network that loses,
// holds or cuts messages. It runs on a logical clock in steps of stepMs.
// After every read it checks the invariant: a read never misses an
// acknowledged write.
type sim struct {
	p          Params
	ackTimeout int64
	metaLeases bool
	// unsafe turns a rule off, to show that the invariant check sees the
	// stale read it lets through: "no-ack-wait" (AckAfterCopyLoss) or
	// "no-takeover-wait" (TakeOverAt), "lease-on-arrival" (a copy's lease
	// counted from each frame's arrival) or "hold-missed-only" (after a
	// copy loss only the writes then pending wait).
	unsafe string

	now     int64
	primary string // the node the metadata leader runs on
	nodes   map[string]*node
	ids     []string
	meta    record
	// primary's view
	heard     map[string]int64
	confirmed map[string]int64

	queue []msg
	cut   map[[2]string]bool

	acked   map[int]int // block -> highest acknowledged version
	version int
	writes  int
	out     strings.Builder
	stale   int
}

const stepMs = 10

type record struct {
	epoch  uint64
	writer string
	inSync map[string]bool
	holds  map[string]bool // the nodes with a copy (the others hold metadata only)
}

type node struct {
	id             string
	up, frozen     bool
	epoch          uint64 // of the record this node applied last
	writer         bool   // this node acts as the writer
	inSync         bool   // its copy, in the record it applied last
	vol            map[int]int
	lastAnswered   int64            // copy: when it last answered a writer's frame
	leaseFrom      int64            // copy: its answer time the writer echoed last
	echo           map[string]int64 // writer: each copy's last ping-answer time
	metaAsked      int64
	metaEpoch      uint64
	peers          map[string]*Peer
	lastAck        map[string]int64
	pending        []*write
	takeOverAt     int64
	holdUntil      int64 // writer: acknowledges nothing before (AckAfterCopyLoss)
	lastPing       int64
	takeOverMarked bool
	restarted      bool // applies its record afresh, whatever the epoch
	distrust       bool // a restarted writer: its copies are resynced
}

type write struct {
	id, block, version int
	sentAt             int64
	waiting            map[string]bool
	ackAt              int64
	failed             bool
}

type msg struct {
	from, to string
	answer   bool
	ok       bool
	epoch    uint64
	block    int // -1: a ping
	version  int
	writeID  int
	sentAt   int64
	echo     int64 // a ping: the copy's answer time echoed; an answer: the copy's time
}

func ms(v int64) int64 { return v * int64(time.Millisecond) }

func newSim(p Params, ids, copies []string, writer, primary string, ackTimeoutMs int64, metaLeases bool, unsafe string) *sim {
	s := &sim{p: p, ackTimeout: ms(ackTimeoutMs), metaLeases: metaLeases, unsafe: unsafe, primary: primary,
		nodes: map[string]*node{}, ids: ids, heard: map[string]int64{}, confirmed: map[string]int64{},
		cut: map[[2]string]bool{}, acked: map[int]int{}}
	s.meta = record{epoch: 1, writer: writer, inSync: map[string]bool{}, holds: map[string]bool{}}
	for _, id := range copies {
		s.meta.inSync[id], s.meta.holds[id] = true, true
	}
	for _, id := range ids {
		s.nodes[id] = &node{id: id, up: true, vol: map[int]int{}, lastAnswered: Never, leaseFrom: Never, metaAsked: Never}
		s.heard[id], s.confirmed[id] = 0, Never
	}
	for _, id := range ids {
		s.apply(s.nodes[id])
	}
	return s
}

func (s *sim) logf(format string, args ...any) {
	fmt.Fprintf(&s.out, "%5dms ", s.now/int64(time.Millisecond))
	fmt.Fprintf(&s.out, format, args...)
	s.out.WriteByte('\n')
}

// live: the node runs (up and not frozen).
func (n *node) live() bool { return n.up && !n.frozen }

func (s *sim) linked(a, b string) bool {
	if a > b {
		a, b = b, a
	}
	return !s.cut[[2]string{a, b}]
}

// majority reports whether node id, running, is linked to more than half
// of all nodes that run (itself included): raft can elect and commit on
// its side.
func (s *sim) majority(id string) bool {
	if !s.nodes[id].live() {
		return false
	}
	n := 0
	for _, o := range s.ids {
		if s.nodes[o].live() && s.linked(id, o) {
			n++
		}
	}
	return n*2 > len(s.ids)
}

// metaUp: the primary runs and sits with a majority.
func (s *sim) metaUp() bool { return s.nodes[s.primary].live() && s.majority(s.primary) }

// reachMeta: node n can talk to the metadata now.
func (s *sim) reachMeta(n *node) bool { return n.live() && s.metaUp() && s.linked(n.id, s.primary) }

// apply makes n follow the metadata record (roles, epoch, copy states).
func (s *sim) apply(n *node) {
	if n.epoch == s.meta.epoch && !n.restarted {
		return
	}
	restarted := n.restarted
	n.restarted = false
	n.epoch = s.meta.epoch
	n.inSync = s.meta.inSync[n.id]
	switch {
	case s.meta.writer == n.id && !n.writer:
		n.writer = true
		n.peers, n.lastAck, n.echo = map[string]*Peer{}, map[string]int64{}, map[string]int64{}
		wait := TakeOverAt(s.p, n.lastAnswered)
		if s.unsafe == "no-takeover-wait" {
			wait = Never
		}
		if restarted {
			// After an unclean stop the writer does not know what its
			// copies hold, and they may read on leases of its
			// previous run: it waits those out and distrusts them.
			wait = max(wait, s.now+int64(s.p.ReadLease))
		}
		n.takeOverAt = max(wait, s.now)
		n.distrust = restarted
		// The first writer of a copy set has nothing to take over.
		n.takeOverMarked = n.epoch == 1 && !restarted && n.takeOverAt <= s.now
		s.logf("%s: writer at epoch %d, acknowledges from %dms", n.id, n.epoch, n.takeOverAt/int64(time.Millisecond))
	case s.meta.writer != n.id && n.writer:
		n.writer = false
		for _, w := range n.pending {
			w.failed = true
			s.logf("%s: w%d not acknowledged: no longer the writer", n.id, w.id)
		}
		n.pending = nil
		s.logf("%s: a copy at epoch %d", n.id, n.epoch)
	}
	if n.writer {
		for _, id := range s.ids {
			if id == n.id || !s.meta.holds[id] {
				continue
			}
			p := n.peers[id]
			if p == nil {
				p = &Peer{LeaseFrom: Never}
				n.peers[id] = p
				n.lastAck[id] = Never
			}
			p.InSync = s.meta.inSync[id]
		}
	}
}

// propose changes the record on behalf of n, conditional on n's epoch and
// on n being the writer in it; false when refused or unreachable.
func (s *sim) propose(n *node, change func(*record)) bool {
	if !s.reachMeta(n) || s.meta.writer != n.id || s.meta.epoch != n.epoch {
		return false
	}
	change(&s.meta)
	s.meta.epoch++
	s.apply(n)
	return true
}

func (s *sim) send(m msg) { s.queue = append(s.queue, m) }

// deliverable: both ends run and the link is not cut. A frozen end holds
// its messages.
func (s *sim) deliverable(m msg) bool {
	return s.nodes[m.from].up && s.nodes[m.to].live() && s.linked(m.from, m.to)
}

// deliver hands over every deliverable message in order; messages to a
// crashed node or over a cut link are lost; those to a frozen one wait.
func (s *sim) deliver() {
	q := s.queue
	s.queue = nil
	for _, m := range q {
		switch {
		case !s.nodes[m.to].up || !s.linked(m.from, m.to) || !s.nodes[m.from].up:
			// lost
		case !s.deliverable(m):
			s.queue = append(s.queue, m)
		case m.answer:
			s.onAnswer(m)
		default:
			s.onFrame(m)
		}
	}
}

func (s *sim) onFrame(m msg) {
	c := s.nodes[m.to]
	ok := !c.writer && AcceptFrame(c.epoch, m.epoch)
	if ok {
		if m.block >= 0 {
			c.vol[m.block] = m.version
		}
		c.lastAnswered = s.now
		switch {
		case s.unsafe == "lease-on-arrival":
			c.leaseFrom = s.now
		case m.block < 0 && m.echo != Never:
			c.leaseFrom = max(c.leaseFrom, m.echo)
		}
	}
	s.send(msg{from: c.id, to: m.from, answer: true, ok: ok, epoch: c.epoch, writeID: m.writeID, sentAt: m.sentAt, block: m.block, echo: s.now})
}

func (s *sim) onAnswer(m msg) {
	w := s.nodes[m.to]
	if !w.writer {
		return
	}
	p := w.peers[m.from]
	if m.ok && m.epoch <= w.epoch {
		w.lastAck[m.from] = s.now
		p.LeaseFrom = max(p.LeaseFrom, m.sentAt)
		if m.block < 0 {
			w.echo[m.from] = m.echo
		}
	}
	for _, x := range w.pending {
		if x.id == m.writeID && x.waiting[m.from] {
			delete(x.waiting, m.from)
			if !m.ok {
				s.copyLost(w, m.from, x)
			}
		}
	}
}

// copyLost records copy id out of sync for write x (AckAfterCopyLoss), or
// fails x when the record is refused (this writer was fenced).
func (s *sim) copyLost(w *node, id string, x *write) {
	p := w.peers[id]
	if !p.InSync {
		return
	}
	if !s.propose(w, func(r *record) { r.inSync[id] = false }) {
		x.failed = true
		s.logf("%s: cannot record %s out of sync: w%d fails", w.id, id, x.id)
		return
	}
	at := AckAfterCopyLoss(s.p, w.lastAck[id], s.now, s.metaLeases)
	if s.unsafe == "no-ack-wait" {
		at = s.now
	}
	// Every acknowledgement waits, not only those of the writes the copy
	// missed: a later write never reaches the copy either, and the copy
	// may still read on its lease.
	if s.unsafe == "hold-missed-only" {
		// As lupool did before: only the writes pending now wait.
		for _, o := range w.pending {
			o.ackAt = max(o.ackAt, at)
		}
		s.logf("%s: %s out of sync at epoch %d; holds the pending writes until %dms", w.id, id, w.epoch, at/int64(time.Millisecond))
		return
	}
	w.holdUntil = max(w.holdUntil, at)
	s.logf("%s: %s out of sync at epoch %d; acknowledges from %dms", w.id, id, w.epoch, at/int64(time.Millisecond))
}

// step runs one clock step: deliveries, the nodes' timers, the primary.
func (s *sim) step(deliver bool) {
	s.now += ms(stepMs)
	if deliver {
		s.deliver()
	}
	if !s.metaUp() {
		// The metadata leader died, froze or lost its majority: raft
		// elects another node that has one (instantly here).
		for _, id := range s.ids {
			if s.majority(id) {
				s.elect(id)
				break
			}
		}
	}
	for _, id := range s.ids {
		n := s.nodes[id]
		if !n.live() {
			continue
		}
		if s.reachMeta(n) {
			s.apply(n)
			s.heard[id] = s.now
		}
		if n.writer {
			s.writerTimers(n)
		}
	}
	s.failover()
}

func (s *sim) writerTimers(w *node) {
	if !w.takeOverMarked && s.now >= w.takeOverAt {
		// A new writer cannot tell what the old one's last writes
		// reached: every other copy in sync is recorded out of sync.
		w.takeOverMarked = true
		if w.epoch > 1 || w.distrust {
			for _, id := range s.ids {
				if id != w.id && s.meta.inSync[id] && w.peers[id].InSync {
					if s.propose(w, func(r *record) { r.inSync[id] = false }) {
						s.logf("%s: took over; %s out of sync at epoch %d", w.id, id, w.epoch)
					}
				}
			}
		}
	}
	if !w.takeOverMarked {
		// Like replication's newMirror: a writer still waiting to take
		// over sends nothing, so no copy gets a lease of this run
		// before the copies that may differ are recorded out of sync.
		return
	}
	if s.now-w.lastPing >= int64(s.p.ReadLease)/4 {
		w.lastPing = s.now
		for id, p := range w.peers {
			if p.InSync {
				echo, ok := w.echo[id]
				if !ok {
					echo = Never
				}
				s.send(msg{from: w.id, to: id, epoch: w.epoch, block: -1, writeID: -1, sentAt: s.now, echo: echo})
			}
		}
	}
	var keep []*write
	for _, x := range w.pending {
		if s.now-x.sentAt >= s.ackTimeout {
			for id := range x.waiting {
				delete(x.waiting, id)
				s.copyLost(w, id, x)
			}
		}
		switch {
		case x.failed:
		case len(x.waiting) == 0 && s.now >= x.ackAt && s.now >= w.takeOverAt && s.now >= w.holdUntil:
			if x.version > s.acked[x.block] {
				s.acked[x.block] = x.version
			}
			s.logf("%s: w%d acknowledged (block %d = v%d)", w.id, x.id, x.block, x.version)
		default:
			keep = append(keep, x)
		}
	}
	w.pending = keep
}

// failover: the primary promotes a live copy in sync when the writer is
// silent.
func (s *sim) failover() {
	if !s.metaUp() {
		return
	}
	old := s.meta.writer
	if !MayPromote(s.p, s.now, s.heard[old], s.confirmed[old]) {
		return
	}
	for _, id := range s.ids {
		if id == old || !s.meta.inSync[id] || !within(s.now, s.heard[id], s.p.ReadLease) {
			continue
		}
		s.meta.writer = id
		s.meta.inSync[old] = false
		s.meta.epoch++
		s.logf("primary: %s silent; %s promoted at epoch %d", old, id, s.meta.epoch)
		return
	}
}

// confirm is the metadata lease (cluster.Node.ConfirmCopy): n's copy is
// in sync at its epoch.
func (s *sim) confirm(n *node) bool {
	if !s.metaLeases || !s.reachMeta(n) || !s.meta.inSync[n.id] || s.meta.epoch != n.epoch {
		return false
	}
	n.metaAsked, n.metaEpoch = s.now, n.epoch
	s.confirmed[n.id] = s.now
	return true
}

func (s *sim) doWrite(id string, block int) {
	w := s.nodes[id]
	if !w.live() || !w.writer {
		s.logf("%s: write refused: not a running writer", id)
		return
	}
	if !w.takeOverMarked {
		s.logf("%s: write refused: writer still taking over", id)
		return
	}
	s.writes++
	s.version++
	x := &write{id: s.writes, block: block, version: s.version, sentAt: s.now, waiting: map[string]bool{}, ackAt: s.now}
	w.vol[block] = s.version
	for _, pid := range s.sortedPeers(w) {
		if w.peers[pid].InSync {
			x.waiting[pid] = true
			s.send(msg{from: id, to: pid, epoch: w.epoch, block: block, version: s.version, writeID: x.id, sentAt: s.now})
		}
	}
	w.pending = append(w.pending, x)
	s.logf("%s: w%d sent (block %d = v%d) to %d copies", id, x.id, block, s.version, len(x.waiting))
}

func (s *sim) sortedPeers(w *node) []string {
	var ids []string
	for id := range w.peers {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids
}

func (s *sim) doRead(id string, block int) {
	n := s.nodes[id]
	if !n.live() || !s.meta.holds[id] {
		s.logf("%s: read: node not running or holds no copy", id)
		return
	}
	var may bool
	if n.writer {
		var peers []Peer
		for _, pid := range s.sortedPeers(n) {
			peers = append(peers, *n.peers[pid])
		}
		may = WriterMayRead(s.p, s.now, peers, false) || s.confirm(n) && s.meta.writer == n.id
	} else {
		may = CopyMayRead(s.p, s.now, n.inSync, n.leaseFrom, n.epoch, n.metaEpoch, n.metaAsked)
		if !may && s.confirm(n) {
			may = CopyMayRead(s.p, s.now, true, n.leaseFrom, n.epoch, n.metaEpoch, n.metaAsked)
		}
	}
	if !may {
		s.logf("%s: read of block %d refused: no lease", id, block)
		return
	}
	v := n.vol[block]
	if v < s.acked[block] {
		s.stale++
		s.logf("%s: STALE READ of block %d: v%d, acknowledged v%d", id, block, v, s.acked[block])
		return
	}
	s.logf("%s: read block %d = v%d", id, block, v)
}

// elect moves the metadata leader to node id; like cluster's failover
// view, a new primary counts every member as heard when it takes over.
func (s *sim) elect(id string) {
	s.primary = id
	for _, o := range s.ids {
		s.heard[o] = s.now
		s.confirmed[o] = Never
	}
	s.logf("%s: primary", id)
}

// restart starts node id again: its lease clocks are gone, and every
// writer's connection to it (and the ping times echoed on it) with them.
func (s *sim) restart(id string) {
	n := s.nodes[id]
	if n.up {
		return
	}
	n.up, n.lastAnswered, n.leaseFrom, n.metaAsked, n.restarted = true, Never, Never, Never, true
	for _, o := range s.nodes {
		delete(o.echo, id)
	}
}

// resync copies the writer's volume to copy id and records it in sync.
func (s *sim) resync(id string) {
	w := s.nodes[s.meta.writer]
	c := s.nodes[id]
	if !w.writer || !w.live() || !c.live() || !s.linked(w.id, id) || !s.reachMeta(c) {
		s.logf("resync of %s: writer or copy unreachable", id)
		return
	}
	// The resync stream's hello makes the copy apply the writer's epoch
	// first, so frames of an older stream still on their way are refused.
	s.apply(c)
	for k, v := range w.vol {
		c.vol[k] = v
	}
	c.lastAnswered = s.now
	if s.propose(w, func(r *record) { r.inSync[id] = true }) {
		s.apply(c)
		s.logf("%s: resynced from %s, in sync at epoch %d", id, w.id, w.epoch)
	}
}

func (s *sim) state() string {
	var b strings.Builder
	fmt.Fprintf(&b, "meta on %s: epoch %d writer %s in-sync", s.primary, s.meta.epoch, s.meta.writer)
	for _, id := range s.ids {
		if s.meta.inSync[id] {
			fmt.Fprintf(&b, " %s", id)
		}
	}
	b.WriteByte('\n')
	for _, id := range s.ids {
		n := s.nodes[id]
		role := "copy"
		switch {
		case n.writer:
			role = "writer"
		case !s.meta.holds[id]:
			role = "witness"
		}
		st := "up"
		switch {
		case !n.up:
			st = "down"
		case n.frozen:
			st = "frozen"
		}
		var blocks []int
		for k := range n.vol {
			blocks = append(blocks, k)
		}
		sort.Ints(blocks)
		fmt.Fprintf(&b, "%s: %s %s epoch %d vol", id, st, role, n.epoch)
		for _, k := range blocks {
			fmt.Fprintf(&b, " %d=v%d", k, n.vol[k])
		}
		b.WriteByte('\n')
	}
	return b.String()
}
