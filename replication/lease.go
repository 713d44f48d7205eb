package replication

import (
	"context"

	"github.com/lupool/lupool/internal/copyset"
	"sync"
	"time"
)

// A metadata read lease (cluster.Node.ConfirmCopy) lets a copy in sync go
// on serving reads from its own volume while the writer is unreachable,
// and the writer while its copies do not answer: the metadata leader
// confirmed, after applying every committed entry, that this node's copy
// is in sync at the epoch asked about. The lease runs ReadLease from when
// the request was sent, so it ends no later than ReadLease after the
// leader's answer. It stays safe because a writer that records a copy out
// of sync waits ReadLease after the record before it acknowledges anything
// the copy missed, and the primary promotes a new writer only ReadLease
// after it last confirmed the old one.

// metaLease is one LU's metadata read lease on this node.
type metaLease struct {
	mu       sync.Mutex
	epoch    uint64 // guarded by mu; the epoch the lease is for
	askedAt  int64  // guarded by mu; Manager.now when the granted request was sent
	renewing bool   // guarded by mu; a renewal is in flight
}

func (m *Manager) metaLeaseOf(name string) *metaLease {
	v, ok := m.metaLeases.Load(name)
	if !ok {
		v, _ = m.metaLeases.LoadOrStore(name, &metaLease{})
	}
	return v.(*metaLease)
}

// metaLeaseValid reports whether this node holds a metadata read lease on
// its copy of name at epoch. A lease past half its life is renewed in the
// background; an expired one is renewed before the call returns (bounded
// by half the lease), so a read waits at most that long.
func (m *Manager) metaLeaseValid(name string, epoch uint64) bool {
	if m.opts.ConfirmLease == nil {
		return false
	}
	l := m.metaLeaseOf(name)
	now := m.now()
	lease := int64(m.opts.ReadLease)
	l.mu.Lock()
	valid := l.epoch == epoch && now-l.askedAt < lease
	renew := !l.renewing && (!valid || now-l.askedAt > lease/2)
	if renew {
		l.renewing = true
	}
	l.mu.Unlock()
	switch {
	case valid && renew:
		if !m.goBackground(func() { m.renewMetaLease(name, epoch, l) }) {
			l.mu.Lock()
			l.renewing = false
			l.mu.Unlock()
		}
		return true
	case valid:
		return true
	case renew:
		return m.renewMetaLease(name, epoch, l)
	}
	return false
}

// renewMetaLease asks the leader to confirm the lease; l.renewing is set.
func (m *Manager) renewMetaLease(name string, epoch uint64, l *metaLease) bool {
	asked := m.now()
	ctx, cancel := context.WithTimeout(context.Background(), m.opts.ReadLease/2)
	err := m.opts.ConfirmLease(ctx, name, epoch)
	cancel()
	l.mu.Lock()
	defer l.mu.Unlock()
	l.renewing = false
	if err != nil {
		return false
	}
	if l.epoch != epoch || asked > l.askedAt {
		l.epoch, l.askedAt = epoch, asked
	}
	return m.now()-l.askedAt < int64(m.opts.ReadLease)
}

// waitOutWriterLease sleeps until this node's copy of name can no longer
// be relied on by an old writer: ReadLease after it last heard from the
// writer. A node that becomes the writer calls it before it acknowledges
// anything: the old writer may serve reads from its own volume until
// ReadLease after a frame this node answered.
func (m *Manager) waitOutWriterLease(name string) time.Duration {
	v, ok := m.leases.Load(name)
	if !ok {
		return 0
	}
	p := copyset.Params{ReadLease: m.opts.ReadLease}
	l := v.(*copyLease)
	wait := time.Duration(copyset.TakeOverAt(p, max(l.answered.Load(), l.pair.lastAnswered())) - m.now())
	if wait > 0 {
		time.Sleep(wait)
		return wait
	}
	return 0
}
