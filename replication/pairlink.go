package replication

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/internal/copyset"
	"github.com/lupool/lupool/replication/replproto"
)

// The pair heartbeat's driver (pairlease.go has the rules): with
// ManagerOptions.PairLeases, a writer node runs one goroutine per copy
// node it vouches to (pairLink), and a Mirror enrolls each copy in sync
// there instead of pinging it; every node serves RolePair streams.

// pairAnswerBytesMax bounds a heartbeat answer's fenced list that a
// pairLink reads: about 2000 LU names of the longest kind. A longer answer
// ends the session (the leases it would renew lapse; nothing is unsafe).
const pairAnswerBytesMax = 256 << 10

// pairLink is this node's heartbeat to one copy node.
type pairLink struct {
	node string
	s    *pairSender
	// kick asks for a heartbeat now (a new enrollment waits for none).
	kick chan struct{}
}

// pairTo returns the heartbeat to node, starting it on first use.
func (m *Manager) pairTo(node string) *pairLink {
	m.pairs.Lock()
	p, ok := m.pairs.m[node]
	if !ok {
		p = &pairLink{node: node, s: newPairSender(), kick: make(chan struct{}, 1)}
		m.pairs.m[node] = p
	}
	m.pairs.Unlock()
	if !ok { // started outside m.pairs: goBackground takes m.mu
		m.goBackground(func() { m.runPair(p) })
	}
	return p
}

// pairLinkOf returns the heartbeat to node if it runs.
func (m *Manager) pairLinkOf(node string) (*pairLink, bool) {
	m.pairs.Lock()
	defer m.pairs.Unlock()
	p, ok := m.pairs.m[node]
	return p, ok
}

// runPair sends p's heartbeats every ReadLease/4 (and when kicked) until
// the manager closes, over one stream, reopened (as a new session) when it
// fails.
func (m *Manager) runPair(p *pairLink) {
	tick := time.NewTicker(m.opts.ReadLease / 4)
	defer tick.Stop()
	var c *peerConn
	defer func() {
		if c != nil {
			c.Close()
		}
	}()
	dst := make([]byte, pairAnswerBytesMax)
	for {
		select {
		case <-m.quit:
			return
		case <-tick.C:
		case <-p.kick:
		}
		if c != nil && c.broken() {
			c = nil
		}
		if c == nil {
			addr, ok := m.opts.NodeAPI(p.node)
			if !ok {
				continue
			}
			ctx, cancel := context.WithTimeout(context.Background(), m.opts.AckTimeout)
			var err error
			c, _, err = m.dialStream(ctx, p.node, addr, replproto.Hello{Role: replproto.RolePair, LU: replproto.PairLU, Node: m.opts.NodeID}, 0, 0)
			cancel()
			if err != nil {
				m.opts.Logger.Debug("pair heartbeat: copy node not reachable", "node", p.node, "err", err)
				c = nil
				continue
			}
			p.s.newSession()
		}
		if err := m.beatOnce(p, c, dst); err != nil {
			m.opts.Logger.Debug("pair heartbeat failed; a new session follows", "node", p.node, "err", err)
			c.Close()
			c = nil
		}
	}
}

// beatOnce sends one heartbeat over c and applies the answer.
func (m *Manager) beatOnce(p *pairLink, c *peerConn, dst []byte) error {
	b := p.s.heartbeat()
	entries := make([]replproto.PairEntry, 0, len(b.deltas))
	for _, d := range b.deltas {
		kind := replproto.PairEnroll
		if d.drop {
			kind = replproto.PairDrop
		}
		entries = append(entries, replproto.PairEntry{Kind: kind, LU: d.lu})
	}
	var echo uint64
	if b.echo != copyset.Never && b.echo > 0 {
		echo = uint64(b.echo)
	}
	sent := m.now()
	h, err := c.do(replproto.Header{Type: replproto.TypePing, Offset: echo}, replproto.AppendPairList(nil, entries), dst)
	if err != nil {
		return err
	}
	if int(h.PayloadLen) > len(dst) {
		return fmt.Errorf("%w: heartbeat answer of %d bytes exceeds %d", ErrPeerDown, h.PayloadLen, len(dst))
	}
	list, err := replproto.ParsePairList(dst[:h.PayloadLen])
	if err != nil {
		return err
	}
	a := pairAnswer{at: int64(h.Offset)}
	for _, e := range list {
		if e.Kind == replproto.PairFenced {
			a.fenced = append(a.fenced, e.LU)
		}
	}
	if len(a.fenced) > 0 {
		m.opts.Logger.Info("copy node refuses to vouch for LUs this node writes", "node", p.node, "lus", a.fenced)
	}
	p.s.answered(b, sent, m.now(), a)
	return nil
}

// pairView is what a pairReceiver asks of this node.
type pairView struct{ m *Manager }

var _ pairLUs = pairView{}

func (v pairView) writerOf(lu string) (string, bool) {
	rec, ok := v.m.record(lu)
	if !ok || !holdsCopy(rec, v.m.opts.NodeID) {
		return "", false
	}
	return writerOf(rec), true
}

func (v pairView) leaseOf(lu string) *pairCopyLease { return &v.m.copyLeaseOf(lu).pair }

// pairRecordChanged tells the session an LU is enrolled in, if any, of
// its new record (deleted: gone).
func (m *Manager) pairRecordChanged(name, writer string, deleted bool) {
	v, ok := m.leases.Load(name)
	if !ok {
		return
	}
	l := &v.(*copyLease).pair
	if seat := l.seat.Load(); seat != nil {
		seat.r.recordChanged(name, writer, deleted, l)
	}
}

// servePair runs the copy node's side of a RolePair stream from peer
// (its certificate's identity) on conn: every ping is a heartbeat.
func (m *Manager) servePair(peer string, conn net.Conn, br *bufio.Reader, reply func(replproto.Header, []byte) error) {
	r := newPairReceiver(peer)
	view := pairView{m}
	defer r.close(view)
	var hb [replproto.HeaderBytes]byte
	for {
		h, err := replproto.ReadHeader(br, &hb)
		if err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				m.opts.Logger.Debug("pair heartbeat stream ends", "from", peer, "err", err)
			}
			return
		}
		payload := make([]byte, h.PayloadLen)
		if _, err := io.ReadFull(br, payload); err != nil {
			return
		}
		if h.Type != replproto.TypePing {
			_ = reply(replproto.Header{Type: replproto.TypeReply | h.Type, Status: replproto.StatusOf(blockdev.ErrInvalid), Handle: h.Handle},
				[]byte("only pings travel on a pair stream"))
			return
		}
		if err := h.CheckPayload(payload); err != nil {
			m.opts.Logger.Warn("pair heartbeat refused: checksum mismatch", "from", peer, "err", err)
			return
		}
		list, err := replproto.ParsePairList(payload)
		if err != nil {
			m.opts.Logger.Warn("pair heartbeat refused", "from", peer, "err", err)
			return
		}
		b := pairBeat{echo: copyset.Never}
		if h.Offset > 0 && h.Offset <= uint64(m.now()) {
			b.echo = int64(h.Offset)
		}
		for _, e := range list {
			switch e.Kind {
			case replproto.PairEnroll:
				b.deltas = append(b.deltas, pairDelta{lu: e.LU})
			case replproto.PairDrop:
				b.deltas = append(b.deltas, pairDelta{lu: e.LU, drop: true})
			}
		}
		a := r.beat(b, m.now(), view)
		fenced := make([]replproto.PairEntry, 0, len(a.fenced))
		for _, lu := range a.fenced {
			fenced = append(fenced, replproto.PairEntry{Kind: replproto.PairFenced, LU: lu})
		}
		if err := reply(replproto.Header{Type: replproto.TypeReply | replproto.TypePing, Handle: h.Handle, Offset: uint64(a.at)},
			replproto.AppendPairList(nil, fenced)); err != nil {
			return
		}
	}
}

// pairLeaseFrom returns when the writer's read lease from copy l through
// the pair heartbeat runs from (copyset.Never without one).
func (mi *Mirror) pairLeaseFrom(l *copyLink) int64 {
	seat := l.pairSeat.Load()
	if seat == nil {
		return copyset.Never
	}
	p, ok := mi.m.pairLinkOf(l.node)
	if !ok {
		return copyset.Never
	}
	return p.s.leaseFromSeat(seat)
}

// pairCovers reports whether the pair heartbeat keeps copy l's leases
// alive, so that the mirror need not ping it.
func (mi *Mirror) pairCovers(l *copyLink) bool {
	return mi.m.opts.PairLeases && copyset.LeaseHolds(copyset.Params{ReadLease: mi.m.opts.ReadLease}, mi.m.now(), mi.pairLeaseFrom(l))
}

// enrollPair enrolls copy l in the heartbeat to its node when it is in
// sync and reached and not enrolled (or was fenced), with PairLeases.
func (mi *Mirror) enrollPair(l *copyLink) {
	if !mi.m.opts.PairLeases || copyState(l.state.Load()) != stInSync || l.conn.Load() == nil {
		return
	}
	if seat := l.pairSeat.Load(); seat != nil && !seat.fenced.Load() {
		return
	}
	select {
	case <-mi.stop:
		return
	default:
	}
	p := mi.m.pairTo(l.node)
	l.pairSeat.Store(p.s.enroll(mi.name))
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// dropPair takes copy l out of the heartbeat to its node and returns the
// time from which the wait after losing it counts (pairSender.drop;
// copyset.Never if it was not enrolled). Called before the wait is
// computed, whenever the copy leaves the in-sync set here.
func (mi *Mirror) dropPair(l *copyLink) int64 {
	if l.pairSeat.Swap(nil) == nil {
		return copyset.Never
	}
	p, ok := mi.m.pairLinkOf(l.node)
	if !ok {
		return copyset.Never
	}
	return p.s.drop(mi.name)
}
