package replication

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/internal/copyset"
	"github.com/lupool/lupool/lu"
	"github.com/lupool/lupool/replication/replproto"
)

// copyState is a copy's state as the writer acts on it.
type copyState int32

const (
	stInSync copyState = iota
	stResyncing
	stOutOfSync
	// stNew: the copy holds nothing usable; it is rebuilt from every
	// allocated extent.
	stNew
)

func (s copyState) replicaState() string {
	switch s {
	case stInSync:
		return cluster.ReplicaInSync
	case stResyncing:
		return cluster.ReplicaResyncing
	case stNew:
		return cluster.ReplicaNew
	}
	return cluster.ReplicaOutOfSync
}

func stateOf(replicaState string) copyState {
	switch replicaState {
	case cluster.ReplicaInSync:
		return stInSync
	case cluster.ReplicaNew:
		return stNew
	case cluster.ReplicaResyncing:
		// A resync that was running when the writer stopped starts over.
		return stOutOfSync
	}
	return stOutOfSync
}

// live reports whether a copy in state s takes client writes.
func (s copyState) live() bool { return s == stInSync || s == stResyncing }

// stripeCount is the number of region locks of a Mirror; region r uses
// stripe r % stripeCount.
const stripeCount = 256

// resyncChunkBytes is the largest write a resync pass sends in one frame.
const resyncChunkBytes = 1 << 20

// copyLink is the writer's view of one other copy.
type copyLink struct {
	node string
	// state is written only with Mirror.stateMu held; read anywhere.
	state atomic.Int32
	conn  atomic.Pointer[peerConn]
	dirty *dirtyMap
	// resyncing is true while a resync goroutine runs for this copy.
	resyncing atomic.Bool
	// lastAck is when (Manager.now) the copy last answered a request: its
	// read lease may run until lastAck + ReadLease.
	lastAck atomic.Int64
	// leaseFrom is when (Manager.now) the writer sent the latest frame
	// this copy answered at the writer's epoch: the writer may serve
	// reads from its own volume until leaseFrom + ReadLease, since a copy
	// that answered at this epoch had not yet become the writer of a
	// newer one (a promoted copy waits ReadLease after the last frame it
	// answered before it acknowledges anything).
	leaseFrom atomic.Int64
	// echo is the copy's lease-clock time in its latest ping answer on
	// one connection; the next ping on that connection echoes it, which
	// renews the copy's own read lease from that time (copyLease).
	echo atomic.Pointer[pingEcho]
	// lastPing is when (Manager.now) this writer last pinged the copy.
	lastPing atomic.Int64
	// sentLive and sentResync count live and resync write bytes sent to
	// this copy (children of metrics.sent, resolved once).
	sentLive, sentResync prometheus.Counter
	// lastDialErr avoids logging the same dial failure every retry.
	lastDialErr atomic.Pointer[string]
	// pairSeat is the copy's enrollment in the heartbeat to its node
	// (ManagerOptions.PairLeases; pairlink.go), nil when not enrolled.
	pairSeat atomic.Pointer[pairSeat]
}

// pingEcho is a copy's answer time as received on connection conn.
type pingEcho struct {
	conn *peerConn
	at   uint64
}

// Mirror is the writer's device of an LU with copies on other nodes. A
// write, trim or write-zeroes is applied to the local volume first, then
// sent to every copy in sync (or resyncing), and returns once each of them
// applied it. A copy that fails is recorded out of sync in the metadata
// before the operation returns, and the range is recorded in its
// dirty-region map; a later resync sends only those ranges. FUA and Flush
// complete once every copy in sync made the data durable.
//
// The NBD engine sends small plain writes through WriteAsync instead
// (blockdev.AsyncWriter): the same steps and guarantees, but the caller
// does not wait; the copies' answers complete the write on the stream's
// reader.
//
// # Locks
//
// Operations hold gate shared and the stripes of the regions they touch
// shared. A resync pass holds one region's stripe exclusively while it
// reads and sends that region, so a client write to the region cannot
// interleave with it. The resync → in-sync step holds gate exclusively:
// no operation is between deciding to skip a copy and marking its range
// dirty. stateMu serializes metadata changes and guards rec. Lock order:
// gate, stripes, dirty maps, stateMu.
type Mirror struct {
	name        string
	self        string
	local       lu.Volume
	m           *Manager
	regionBytes int64
	store       *DirtyStore
	// al is the LU's activity log (actlog.go); nil without a store.
	al *activityLog
	// links are the copies on other nodes. Replaced (never changed in
	// place) with gate held exclusively, so an operation sees one set
	// from start to end.
	links atomic.Pointer[[]*copyLink]

	gate    sync.RWMutex
	stripes [stripeCount]sync.RWMutex
	epoch   atomic.Uint64
	// ackHold is a Manager.now time before which the mirror acknowledges
	// nothing (holdAcks): a copy just recorded out of sync may still read
	// on its lease until then. 0: never held.
	ackHold atomic.Int64

	stateMu sync.Mutex
	rec     cluster.LU // guarded by stateMu

	// quiesced is set while a planned move holds gate exclusively
	// (move.go): new writes, trims, zeroes and flushes wait, those in
	// flight have drained. handedOver is set when the move switched and
	// this mirror was retired: what waited runs again on the new role.
	quiesced   atomic.Bool
	handedOver atomic.Bool

	stop chan struct{}
	wg   sync.WaitGroup
}

var (
	_ blockdev.Device    = (*Mirror)(nil)
	_ blockdev.Trimmer   = (*Mirror)(nil)
	_ blockdev.Zeroer    = (*Mirror)(nil)
	_ blockdev.Extenter  = (*Mirror)(nil)
	_ blockdev.TryReader = (*Mirror)(nil)
)

// newMirror builds the writer's device for rec over the local volume and
// starts connecting to the other copies.
//
// lost says the local volume lost its data at start (a memory LU after a
// restart): every other copy is then treated as new (it takes no live
// writes and gets no pings, so its read lease lapses) and recorded new, to
// be rebuilt from this volume.
//
// A writer whose dirty-region store is in doubt at start (it was not closed
// cleanly: a crash or kill -9; or a record failed its check) does not know
// which writes were in flight when it stopped: one may have reached a copy
// and not this volume, or the other way round, and both copies would stay
// recorded in sync, different. Every copy recorded in sync is then
// distrusted (see distrustInSync): compared by region hashes, and only the
// regions that differ sent, before it counts as in sync again. A store that
// is not in doubt but Crashed narrows that to the LU's activity-log regions
// (recoverLog). former is the LU's writer before this node, when this node
// was a copy until now.
func (m *Manager) newMirror(rec cluster.LU, local lu.Volume, lost, wasCopy bool, former string) (*Mirror, error) {
	mi := &Mirror{name: rec.Name, self: m.opts.NodeID, local: local, m: m,
		regionBytes: m.opts.RegionBytes, rec: cloneLU(rec), stop: make(chan struct{})}
	mi.epoch.Store(rec.Epoch)
	if lu.Kind(rec.Kind) == lu.KindFile {
		mi.store = m.opts.Dirty
	}
	if mi.store != nil {
		mi.al = newActivityLog(mi.store, rec.Name, mi.regionBytes, m.opts.ActivityLogRegions,
			func() error { return local.Flush(context.Background()) })
	}
	promoted, err := mi.promoted(rec, lost, wasCopy)
	if err != nil {
		return nil, err
	}
	distrust := !lost && mi.store != nil && mi.store.Doubt() != nil
	// After a crash, the activity log this node had as the LU's writer;
	// once carried over (or for an LU with no log), nothing to recover.
	crashed := !lost && mi.store != nil && mi.store.Crashed() && m.hasLeftoverLog(rec.Name)
	links, err := mi.linksFor(rec, nil, distrust)
	if err != nil {
		return nil, err
	}
	mi.links.Store(&links)
	if lost {
		for _, l := range links {
			l.state.Store(int32(stNew))
		}
		m.opts.Logger.Warn("writer's volume lost at start; every other copy will be rebuilt from it", "lu", rec.Name)
		mi.wg.Add(1)
		go func() {
			defer mi.wg.Done()
			mi.recordAllNew()
		}()
	}
	switch {
	case promoted && wasCopy && rec.HandoverEpoch == rec.Epoch:
		// A planned move's clean handover (move.go): trust the copies in
		// sync as they are.
		if err := mi.takeOverClean(links); err != nil {
			return nil, err
		}
		if distrust {
			mi.distrustInSync(links)
		}
	case promoted:
		if err := mi.takeOver(links, former); err != nil {
			return nil, err
		}
	case distrust:
		mi.distrustInSync(links)
	case crashed:
		if err := mi.recoverLog(links); err != nil {
			return nil, err
		}
	}
	// Whatever activity log this node kept for the LU is now either
	// carried over into the copies' dirty records (recoverLog) or stale
	// (a clean stop: every write ended; or a former turn as writer whose
	// copy was in sync since).
	if err := m.dropLeftoverLog(rec.Name); err != nil {
		return nil, err
	}
	if mi.store != nil && !lost {
		if err := mi.store.setWriter(rec.Name); err != nil {
			return nil, fmt.Errorf("record this node as the writer of %s: %w", rec.Name, err)
		}
	}
	// A first attempt to reach every copy that takes live writes before
	// the mirror takes any, so a writer restart does not record reachable
	// copies out of sync; all at once, so a copy that hangs (a frozen
	// node) delays the start by at most a second. Copies out of sync are
	// reached by run.
	var dials sync.WaitGroup
	for _, l := range links {
		if copyState(l.state.Load()).live() {
			dials.Go(func() { mi.dial(l, min(mi.m.opts.AckTimeout, time.Second)) })
		}
	}
	dials.Wait()
	mi.wg.Add(1)
	go mi.run()
	return mi, nil
}

// promoted reports whether this node just became the writer of an LU
// that another node wrote before (a failover or a move): it was serving
// the LU as a copy, or, after a restart, it keeps no writer key for an LU
// past its first epoch. Such a writer knows nothing of what its copies
// lack.
func (mi *Mirror) promoted(rec cluster.LU, lost, wasCopy bool) (bool, error) {
	if lost {
		return false, nil
	}
	if wasCopy {
		return true, nil
	}
	if mi.store == nil || rec.Epoch <= 1 {
		return false, nil
	}
	isWriter, err := mi.store.isWriter(rec.Name)
	return !isWriter, err
}

// takeOver prepares a node that just became the writer: the old writer
// may still serve reads until ReadLease after the last frame this node
// answered, so that passes first; every copy not in sync is compared by
// region hashes (this node has no record of what it lacks); and every
// other copy in sync may differ from this one where the old writer had
// writes in flight, so it is recorded out of sync and compared by hashes
// too, before this mirror acknowledges anything.
func (mi *Mirror) takeOver(links []*copyLink, former string) error {
	waited := mi.m.waitOutWriterLease(mi.name)
	var inSync []*copyLink
	for _, l := range links {
		if copyState(l.state.Load()) == stInSync {
			inSync = append(inSync, l)
		}
		switch {
		case copyState(l.state.Load()) == stNew:
		case l.node == former && mi.al != nil && copyState(l.state.Load()) != stInSync:
			// The old writer: what it may differ in from before is its
			// activity log, which resync asks it for (askLog); what it
			// lacks from now on, this node records.
			if err := l.dirty.reset(); err != nil {
				return err
			}
		default:
			if err := l.dirty.setUnknown(); err != nil {
				return err
			}
		}
	}
	mi.m.opts.Logger.Warn("this node is the LU's writer now; its other copies are compared by region hashes",
		"lu", mi.name, "epoch", mi.epoch.Load(), "waited_out_old_writer", waited)
	if len(inSync) == 0 {
		return nil
	}
	mi.stateMu.Lock()
	defer mi.stateMu.Unlock()
	for _, l := range inSync {
		if err := mi.proposeLocked(l.node, stOutOfSync, true); err != nil {
			return fmt.Errorf("record copy %s out of sync on taking over: %w", l.node, err)
		}
		l.state.Store(int32(stOutOfSync))
	}
	if mi.m.opts.ConfirmLease != nil {
		time.Sleep(mi.m.opts.ReadLease) // metadata leases granted before the record
	}
	return nil
}

// distrustInSync takes every copy recorded in sync whose dirty record the
// store in doubt left unknown out of the live set, before the mirror takes
// any write: it gets no live writes and no pings, and its resync records
// it out of sync (epoch + 1) and begins with a region-hash compare. Such a
// copy may still hold a read lease from this node's previous run, granted
// before that run stopped and renewed only by frames from the writer,
// which it no longer gets: before this mirror acknowledges anything the
// copy lacks, the lease is let run out, ReadLease after this manager
// started (so once per start, not per LU).
func (mi *Mirror) distrustInSync(links []*copyLink) {
	var nodes []string
	for _, l := range links {
		if copyState(l.state.Load()) == stInSync && l.dirty.isUnknown() {
			l.state.Store(int32(stOutOfSync))
			nodes = append(nodes, l.node)
		}
	}
	if len(nodes) == 0 {
		return
	}
	mi.m.opts.Logger.Warn("writer started after an unclean stop: copies recorded in sync are compared by region hashes before they count as in sync",
		"lu", mi.name, "copies", nodes, "doubt", mi.store.Doubt())
	mi.waitOutPreviousRun()
}

// waitOutPreviousRun sleeps until ReadLease after this manager started: a
// copy held back at start may still read on a lease from this node's
// previous run, renewed only by frames from it (once per start, not per LU).
func (mi *Mirror) waitOutPreviousRun() {
	if wait := int64(mi.m.opts.ReadLease) - mi.m.now(); wait > 0 {
		time.Sleep(time.Duration(wait))
	}
}

// recoverLog brings the copies in line after this writer crashed (its
// store is Crashed, not in doubt): the regions of the LU's activity log are
// the only ones where a write may have been in flight, so each is recorded
// dirty, to be compared by hash, for every copy but a new one; the copies
// recorded in sync are taken out of the live set until their resync ends
// (as distrustInSync does). An LU with an empty log needs nothing. A log
// that does not check out leaves every copy unknown.
func (mi *Mirror) recoverLog(links []*copyLink) error {
	ranges, err := mi.store.loadActive(mi.name)
	if err != nil && !errors.Is(err, ErrDirtyCorrupt) {
		return fmt.Errorf("read the activity log of %s: %w", mi.name, err)
	}
	if err != nil {
		mi.m.opts.Logger.Warn("activity log does not check out; every copy is compared by region hashes",
			"lu", mi.name, "err", err)
		for _, l := range links {
			if copyState(l.state.Load()) != stNew {
				if err := l.dirty.setUnknown(); err != nil {
					return err
				}
			}
		}
		mi.distrustInSync(links)
		return nil
	}
	if len(ranges) == 0 {
		return nil
	}
	var n int64
	for _, r := range ranges {
		n += r[1]
	}
	var held []string
	for _, l := range links {
		st := copyState(l.state.Load())
		if st == stNew {
			continue
		}
		if err := l.dirty.markCompare(ranges); err != nil {
			return err
		}
		if st == stInSync {
			l.state.Store(int32(stOutOfSync))
			held = append(held, l.node)
		}
	}
	mi.m.opts.Logger.Warn("writer started after a crash: its activity-log regions are compared with every copy",
		"lu", mi.name, "ranges", len(ranges), "bytes", n, "copies_held_back", held)
	if len(held) > 0 {
		mi.waitOutPreviousRun()
	}
	return nil
}

func cloneLU(rec cluster.LU) cluster.LU {
	rec.Replicas = append([]cluster.Replica(nil), rec.Replicas...)
	return rec
}

// linksFor returns a link for every copy of rec on another node, reusing
// those in old. distrust keeps the untrusted dirty record of a copy in
// sync unknown too (a writer starting after an unclean stop).
func (mi *Mirror) linksFor(rec cluster.LU, old []*copyLink, distrust bool) ([]*copyLink, error) {
	var links []*copyLink
	for _, r := range rec.Replicas {
		if r.NodeID == mi.self {
			continue
		}
		var l *copyLink
		for _, o := range old {
			if o.node == r.NodeID {
				l = o
			}
		}
		if l == nil {
			d, err := newDirtyMap(mi.store, rec.Name, r.NodeID, mi.regionBytes)
			if err != nil {
				return nil, err
			}
			// A copy not in sync whose record is not trusted (the
			// store is in doubt) is compared by region hashes; so is
			// one in sync when distrust says so.
			st := stateOf(r.State)
			unknown, err := d.settleStart(st == stOutOfSync || distrust && st == stInSync)
			if err != nil {
				return nil, err
			}
			if unknown {
				mi.m.opts.Logger.Warn("dirty regions of the copy not trusted; it will be resynced by region hashes",
					"lu", rec.Name, "copy", r.NodeID, "doubt", mi.store.Doubt())
			}
			node := r.NodeID
			holds := func(cur cluster.LU) bool { return holdsCopy(cur, node) }
			l = &copyLink{node: node, dirty: d,
				sentLive:   mi.m.luCounter(mi.m.metrics.sent, holds, rec.Name, node, "live"),
				sentResync: mi.m.luCounter(mi.m.metrics.sent, holds, rec.Name, node, "resync")}
			l.leaseFrom.Store(math.MinInt64 / 2) // never answered yet
			l.state.Store(int32(st))
		}
		links = append(links, l)
	}
	return links, nil
}

// recordAllNew records every other copy new (epoch + 1), retrying until it
// lands or the mirror closes.
func (mi *Mirror) recordAllNew() {
	for attempt := 0; ; attempt++ {
		mi.stateMu.Lock()
		rec := cloneLU(mi.rec)
		for i := range rec.Replicas {
			if rec.Replicas[i].NodeID != mi.self {
				rec.Replicas[i].State = cluster.ReplicaNew
			}
		}
		expected := rec.Epoch
		rec.Epoch++
		ctx, cancel := context.WithTimeout(context.Background(), mi.m.opts.MetadataTimeout)
		err := mi.m.opts.UpdateLU(ctx, rec, expected)
		cancel()
		if err == nil {
			mi.rec = rec
			mi.epoch.Store(rec.Epoch)
		} else if fresh, ok := mi.m.record(mi.name); ok && fresh.Epoch > mi.rec.Epoch {
			mi.rec = cloneLU(fresh)
			mi.epoch.Store(fresh.Epoch)
		}
		mi.stateMu.Unlock()
		if err == nil {
			return
		}
		mi.m.opts.Logger.Warn("cannot record copies new; retrying", "lu", mi.name, "err", err)
		select {
		case <-mi.stop:
			return
		case <-time.After(min(time.Duration(attempt+1)*200*time.Millisecond, 5*time.Second)):
		}
	}
}

// linkSet returns the current copies on other nodes.
func (mi *Mirror) linkSet() []*copyLink { return *mi.links.Load() }

// observe takes a record applied by the metadata log. Changes this mirror
// proposed itself are already in effect; a newer epoch from elsewhere (an
// operator, the primary) replaces the copy states, and copies added or
// removed there are added or dropped here, between two operations.
func (mi *Mirror) observe(rec cluster.LU) {
	mi.stateMu.Lock()
	if rec.Epoch <= mi.rec.Epoch {
		mi.rec.SizeBytes, mi.rec.Description = rec.SizeBytes, rec.Description
		mi.stateMu.Unlock()
		return
	}
	mi.stateMu.Unlock()
	mi.gate.Lock()
	defer mi.gate.Unlock()
	mi.stateMu.Lock()
	defer mi.stateMu.Unlock()
	old := mi.linkSet()
	links, err := mi.linksFor(rec, old, false)
	if err != nil {
		mi.m.opts.Logger.Error("cannot follow the copy set", "lu", mi.name, "err", err)
		return
	}
	for _, o := range old {
		kept := false
		for _, l := range links {
			kept = kept || l == o
		}
		if !kept {
			mi.dropPair(o)
			mi.dropConn(o)
			if err := o.dirty.reset(); err != nil {
				mi.m.opts.Logger.Warn("cannot drop dirty regions of a removed copy", "lu", mi.name, "copy", o.node, "err", err)
			}
		}
	}
	mi.links.Store(&links)
	mi.rec = cloneLU(rec)
	mi.epoch.Store(rec.Epoch)
	for _, r := range rec.Replicas {
		for _, l := range links {
			if l.node == r.NodeID {
				l.state.Store(int32(stateOf(r.State)))
			}
		}
	}
	for _, l := range links {
		if copyState(l.state.Load()) != stInSync {
			mi.dropPair(l)
		}
	}
}

// close stops the mirror's goroutines and streams. The local volume stays
// open (the pool owns it).
func (mi *Mirror) close() {
	select {
	case <-mi.stop:
		return
	default:
	}
	close(mi.stop)
	// A move that quiesced this mirror switched (or it is going): what
	// waited runs again on the device of the new role.
	mi.resume(true)
	for _, l := range mi.linkSet() {
		mi.dropPair(l)
		if c := l.conn.Swap(nil); c != nil {
			c.Close()
		}
	}
	mi.wg.Wait()
	for _, l := range mi.linkSet() {
		if c := l.conn.Swap(nil); c != nil {
			c.Close()
		}
	}
}

// drain waits, at most max, until no operation is in flight on the mirror
// (each holds gate shared to its end), and reports whether none is. Called
// after close, when operations end quickly: the copies' streams are closed
// and a retired mirror's fenced check returns at once.
func (mi *Mirror) drain(max time.Duration) bool {
	deadline := time.Now().Add(max)
	for !mi.gate.TryLock() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(5 * time.Millisecond)
	}
	mi.gate.Unlock()
	return true
}

// Size implements blockdev.Device.
func (mi *Mirror) Size() int64 { return mi.local.Size() }

// Caps implements blockdev.Device: the local volume's, and multi-conn,
// since a Flush flushes the local volume and every copy whoever wrote.
func (mi *Mirror) Caps() blockdev.Caps {
	c := mi.local.Caps()
	c.MultiConn = true
	return c
}

// InlineIO reports whether the mirror's operations may run on the goroutine
// that reads the requests (the NBD engine's InlineDevice): the local
// volume's answer (a memory volume; a file volume for whole-block writes
// without FUA and reads that hit the page cache) while there is no other
// copy to wait for. A copy added later makes operations wait on the
// network; front ends ask again before each request.
func (mi *Mirror) InlineIO() bool {
	d, ok := mi.local.(interface{ InlineIO() bool })
	return ok && d.InlineIO() && len(mi.linkSet()) == 0
}

// ReadAt implements blockdev.Device from the local volume, while this
// node provably still is the writer (see readable).
func (mi *Mirror) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := mi.readable(); err != nil {
		return err
	}
	return mi.local.ReadAt(ctx, p, off)
}

// leaseHeld reports whether every other copy in sync answered a frame
// sent within ReadLease: none of them can have become the writer of a
// newer epoch and acknowledged a write this volume lacks.
func (mi *Mirror) leaseHeld() bool {
	p, now := copyset.Params{ReadLease: mi.m.opts.ReadLease}, mi.m.now()
	for _, l := range mi.linkSet() {
		from := max(l.leaseFrom.Load(), mi.pairLeaseFrom(l))
		if !copyset.PeerHolds(p, now, copyset.Peer{InSync: copyState(l.state.Load()) == stInSync, LeaseFrom: from}) {
			return false
		}
	}
	return true
}

// readable returns nil when the writer may read its own volume: its read
// lease from the copies in sync holds, or the metadata confirms it still
// is the writer at this epoch; otherwise it pings the copies whose lease
// lapsed (a copy that does not answer is recorded out of sync, which is
// refused if this node is no longer the writer). A writer that was
// replaced (frozen, cut off) thus never serves a read that misses a write
// the new writer acknowledged.
func (mi *Mirror) readable() error {
	if mi.leaseHeld() || mi.m.metaLeaseValid(mi.name, mi.epoch.Load()) {
		return nil
	}
	now, lease := mi.m.now(), int64(mi.m.opts.ReadLease)
	for _, l := range mi.linkSet() {
		if copyState(l.state.Load()) != stInSync || now-max(l.leaseFrom.Load(), mi.pairLeaseFrom(l)) < lease {
			continue
		}
		if c := l.conn.Load(); c != nil && !c.broken() {
			mi.pingNow(l, c)
		} else if err := mi.copyMissed(l, 0, 0, ErrPeerDown); err != nil {
			return fmt.Errorf("%w: %s: a copy in sync does not answer and cannot be recorded out of sync: %v", blockdev.ErrIO, mi.name, err)
		}
	}
	if !mi.leaseHeld() {
		return fmt.Errorf("%w: %s: this node cannot show it still is the writer (its copies do not answer)", blockdev.ErrIO, mi.name)
	}
	return nil
}

// TryReadAt implements blockdev.TryReader from the local volume, as ReadAt
// does: a file volume answers from the page cache without waiting; a
// volume that cannot try reports false, and the engine calls ReadAt.
func (mi *Mirror) TryReadAt(ctx context.Context, p []byte, off int64) (bool, error) {
	if !mi.leaseHeld() {
		return false, nil // ReadAt checks, and may wait
	}
	if tr, ok := mi.local.(blockdev.TryReader); ok {
		return tr.TryReadAt(ctx, p, off)
	}
	return false, nil
}

// Extents implements blockdev.Extenter from the local volume.
func (mi *Mirror) Extents(ctx context.Context, off, length int64, dst []blockdev.Extent) ([]blockdev.Extent, error) {
	if err := mi.readable(); err != nil {
		return dst, err
	}
	return mi.local.Extents(ctx, off, length, dst)
}

// AsyncWrites implements blockdev.AsyncWriter: writes are started
// asynchronously while the LU has copies to wait for.
func (mi *Mirror) AsyncWrites() bool { return len(mi.linkSet()) > 0 }

// asyncWrite is one write started by WriteAsync: it completes when the
// local write and every copy it reached have answered.
type asyncWrite struct {
	mi     *Mirror
	f      fan
	off    int64
	length int64
	unlock rangeLock
	// logged says the write is counted in the activity log.
	logged bool
	// remaining counts the answers still to come: one per copy reached
	// and one for the local write.
	remaining atomic.Int32
	localErr  error
	done      blockdev.Completion
}

// WriteAsync implements blockdev.AsyncWriter. It does what WriteAt does,
// but returns once the local write is done and the copies' requests are
// queued on their streams; the last answer completes the write on the
// goroutine that delivers it. A write whose copies all answer OK completes
// there at once; otherwise the settling (which may wait for the metadata
// and a copy's read lease) runs on its own goroutine.
func (mi *Mirror) WriteAsync(ctx context.Context, p []byte, off int64, flags blockdev.Flags, done blockdev.Completion) {
	length := int64(len(p))
	if err := ctx.Err(); err != nil || length > replproto.LengthMax || length == 0 {
		if err == nil {
			err = mi.WriteAt(ctx, p, off, flags) // the engine never sends these
		}
		if fl := done.Complete(err); fl != nil {
			fl.FlushReplies()
		}
		return
	}
	mi.gate.RLock()
	if mi.handedOver.Load() {
		mi.gate.RUnlock()
		mi.rerunWrite(ctx, p, off, flags, done)
		return
	}
	logged, err := mi.logBegin(off, length)
	if err != nil {
		mi.gate.RUnlock()
		if fl := done.Complete(err); fl != nil {
			fl.FlushReplies()
		}
		return
	}
	w, _ := mi.m.asyncWrites.Get().(*asyncWrite)
	if w == nil {
		w = &asyncWrite{}
	}
	w.mi, w.off, w.length, w.done, w.localErr, w.logged = mi, off, length, done, nil, logged
	w.unlock = mi.lockRange(off, length)
	h := replproto.Header{Type: replproto.TypeWrite, Flags: wireFlags(flags), Offset: uint64(off), Length: uint32(length),
		Epoch: mi.epoch.Load()}
	w.f = fan{links: mi.linkSet(), bytes: len(p), typ: replproto.TypeWrite, sentAt: mi.m.now()}
	w.remaining.Store(1)
	for i, l := range w.f.links {
		c := l.liveConn()
		if c == nil {
			continue
		}
		w.f.sent[i] = true
		w.remaining.Add(1)
		if err := c.startAsync(h, p, w, i); err != nil {
			w.f.sent[i] = false
			w.remaining.Add(-1)
		}
	}
	// The copies have the write: the local volume must get it too, even if
	// the client has gone meanwhile (a cancelled write here would mark
	// every copy dirty and out of sync).
	w.localErr = mi.local.WriteAt(context.Background(), p, off, flags)
	if fl := w.answered(-1, nil); fl != nil {
		fl.FlushReplies()
	}
}

// answered records the answer of copy slot (-1: the local write) and, on
// the last one, completes the write.
func (w *asyncWrite) answered(slot int, err error) blockdev.ReplyFlusher {
	if slot >= 0 {
		w.f.errs[slot] = err
	}
	if w.remaining.Add(-1) != 0 {
		return nil
	}
	mi := w.mi
	if w.localErr == nil && w.allAnswered() && !mi.ackHeld() {
		// Nothing to record: settle only notes the acks, without waiting.
		return w.finish(mi.settle(&w.f, w.off, w.length, nil))
	}
	go func() {
		err := mi.settle(&w.f, w.off, w.length, w.localErr)
		if fl := w.finish(err); fl != nil {
			fl.FlushReplies()
		}
	}()
	return nil
}

// allAnswered reports whether every copy was reached and answered OK, so
// that nothing needs settling.
func (w *asyncWrite) allAnswered() bool {
	for i := range w.f.links {
		if !w.f.sent[i] || w.f.errs[i] != nil {
			return false
		}
	}
	return true
}

// finish releases the write's locks, recycles w and completes the write.
func (w *asyncWrite) finish(err error) blockdev.ReplyFlusher {
	mi, done := w.mi, w.done
	w.unlock.unlock()
	if w.logged {
		mi.al.end(w.off, w.length)
	}
	mi.gate.RUnlock()
	*w = asyncWrite{}
	mi.m.asyncWrites.Put(w)
	return done.Complete(err)
}

// WriteAt implements blockdev.Device.
func (mi *Mirror) WriteAt(ctx context.Context, p []byte, off int64, flags blockdev.Flags) error {
	return mi.mutate(ctx, replproto.TypeWrite, p, off, int64(len(p)), flags)
}

// Trim implements blockdev.Trimmer.
func (mi *Mirror) Trim(ctx context.Context, off, length int64, flags blockdev.Flags) error {
	return mi.mutate(ctx, replproto.TypeTrim, nil, off, length, flags)
}

// WriteZeroes implements blockdev.Zeroer.
func (mi *Mirror) WriteZeroes(ctx context.Context, off, length int64, flags blockdev.Flags) error {
	return mi.mutate(ctx, replproto.TypeZero, nil, off, length, flags)
}

// Flush implements blockdev.Device: the local volume, then every copy.
func (mi *Mirror) Flush(ctx context.Context) error {
	mi.gate.RLock()
	defer mi.gate.RUnlock()
	if mi.handedOver.Load() {
		return errRetired
	}
	if mi.al == nil {
		return mi.apply(ctx, replproto.Header{Type: replproto.TypeFlush}, nil, 0, 0, 0)
	}
	n := mi.al.flushStart()
	err := mi.apply(ctx, replproto.Header{Type: replproto.TypeFlush}, nil, 0, 0, 0)
	if err == nil {
		mi.al.flushDone(n)
	}
	return err
}

// logBegin puts [off, off+length) in the activity log before a write,
// trim or write-zeroes is issued there (see actlog.go), when the LU keeps
// one and has copies to diverge from; logged says mi.al.end must follow.
// mi.gate is held shared.
func (mi *Mirror) logBegin(off, length int64) (logged bool, err error) {
	if mi.al == nil || len(mi.linkSet()) == 0 {
		return false, nil
	}
	if err := mi.al.begin(off, length); err != nil {
		return false, fmt.Errorf("%w: %v", blockdev.ErrIO, err)
	}
	return true, nil
}

func wireFlags(f blockdev.Flags) replproto.Flags {
	var w replproto.Flags
	if f&blockdev.FUA != 0 {
		w |= replproto.FlagFUA
	}
	if f&blockdev.NoHole != 0 {
		w |= replproto.FlagNoHole
	}
	if f&blockdev.FastZero != 0 {
		w |= replproto.FlagFastZero
	}
	return w
}

func (mi *Mirror) mutate(ctx context.Context, typ replproto.Type, p []byte, off, length int64, flags blockdev.Flags) error {
	mi.gate.RLock()
	defer mi.gate.RUnlock()
	if mi.handedOver.Load() {
		return errRetired // the role device runs it again on the new role
	}
	logged, err := mi.logBegin(off, length)
	if err != nil {
		return err
	}
	if logged {
		defer mi.al.end(off, length)
	}
	defer mi.lockRange(off, length).unlock()
	// Trims and zeroes may exceed one frame; writes never do (the NBD
	// engine bounds them at 32 MiB).
	for done := int64(0); done < length || length == 0; {
		n := min(length-done, replproto.LengthMax)
		h := replproto.Header{Type: typ, Flags: wireFlags(flags), Offset: uint64(off + done), Length: uint32(n)}
		var payload []byte
		if typ == replproto.TypeWrite {
			payload = p[done : done+n]
		}
		if err := mi.apply(ctx, h, payload, off+done, n, flags); err != nil {
			return err
		}
		done += n
		if length == 0 {
			break
		}
	}
	return nil
}

// apply sends one operation to the copies, applies it to the local volume
// while they work, and waits for them. When the local volume fails, every
// copy the operation reached may now hold data the writer does not: each
// is recorded dirty for the range (and out of sync), so a resync restores
// the writer's content there, and the local error is returned.
func (mi *Mirror) apply(ctx context.Context, h replproto.Header, payload []byte, off, length int64, flags blockdev.Flags) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	f := mi.send(h, payload)
	// The copies have the operation: the local volume must get it too,
	// even if the client has gone meanwhile (a cancelled operation here
	// would mark every copy dirty and out of sync).
	ctx = context.Background()
	var err error
	switch h.Type {
	case replproto.TypeWrite:
		err = mi.local.WriteAt(ctx, payload, off, flags)
	case replproto.TypeTrim:
		err = mi.local.Trim(ctx, off, length, flags)
	case replproto.TypeZero:
		err = mi.local.WriteZeroes(ctx, off, length, flags)
	case replproto.TypeFlush:
		err = mi.local.Flush(ctx)
	}
	return mi.collect(&f, off, length, err)
}

// fan is one operation in flight to the copies.
type fan struct {
	links []*copyLink
	calls [cluster.CopiesMax]*call
	conns [cluster.CopiesMax]*peerConn
	// sent[i] says the request reached copy i's stream; errs[i] is its
	// answer once it came.
	sent  [cluster.CopiesMax]bool
	errs  [cluster.CopiesMax]error
	bytes int // a write's payload bytes
	typ   replproto.Type
	// sentAt is when (Manager.now) the operation was sent.
	sentAt int64
}

// liveConn returns the stream of a copy that takes live traffic, or nil.
func (l *copyLink) liveConn() *peerConn {
	if !copyState(l.state.Load()).live() {
		return nil
	}
	return l.conn.Load()
}

// send starts one request on every copy that takes live traffic.
func (mi *Mirror) send(h replproto.Header, payload []byte) fan {
	h.Epoch = mi.epoch.Load()
	f := fan{links: mi.linkSet(), bytes: len(payload), typ: h.Type, sentAt: mi.m.now()}
	for i, l := range f.links {
		c := l.liveConn()
		if c == nil {
			continue
		}
		if cl, err := c.start(h, payload, nil); err == nil {
			f.calls[i], f.conns[i], f.sent[i] = cl, c, true
		}
	}
	return f
}

// collect waits for every copy of f. A copy that was skipped or failed, or
// every copy reached when localErr is set, has [off, off+length) recorded
// dirty, and an in-sync one is recorded out of sync, before collect
// returns.
func (mi *Mirror) collect(f *fan, off, length int64, localErr error) error {
	for i := range f.links {
		if f.calls[i] != nil {
			_, f.errs[i] = f.conns[i].wait(f.calls[i])
			f.calls[i] = nil
		}
	}
	return mi.settle(f, off, length, localErr)
}

// settle concludes operation f once every copy it reached has answered
// (f.errs): see collect.
func (mi *Mirror) settle(f *fan, off, length int64, localErr error) error {
	var errs []error
	for i, l := range f.links {
		var cause error = ErrPeerDown
		if f.sent[i] {
			err := f.errs[i]
			if err == nil {
				l.lastAck.Store(mi.m.now())
				l.renewFrom(f.sentAt)
				if f.typ == replproto.TypeWrite {
					l.sentLive.Add(float64(f.bytes))
				}
				if localErr == nil {
					continue
				}
				err = fmt.Errorf("the writer's own volume failed: %w", localErr)
			}
			cause = err
		} else if localErr != nil {
			continue // not reached: it still matches the local volume
		}
		if err := mi.copyMissed(l, off, length, cause); err != nil {
			errs = append(errs, err)
		}
	}
	if localErr != nil {
		return localErr
	}
	if len(errs) > 0 {
		if mi.fenced() {
			// Another node is the writer now: the operation was not
			// acknowledged here; the role device sends it there.
			return errRetired
		}
		return fmt.Errorf("%w: %v", blockdev.ErrIO, errors.Join(errs...))
	}
	mi.waitAckHold()
	return nil
}

// fenced reports whether this mirror was replaced as the LU's writer
// (a failover while this node was frozen or cut off): a copy refused its
// frames and the metadata, once this node has applied it, names another
// writer. It waits (at most twice the read lease) for the manager to
// retire the mirror, so that the operation runs again on the new role.
func (mi *Mirror) fenced() bool {
	deadline := time.Now().Add(2 * mi.m.opts.ReadLease)
	for {
		select {
		case <-mi.stop:
			return true
		default:
		}
		if rec, ok := mi.m.record(mi.name); ok && (writerOf(rec) != mi.self || rec.Epoch > mi.epoch.Load()+1) {
			select {
			case <-mi.stop:
				return true
			case <-time.After(time.Until(deadline)):
				return writerOf(rec) != mi.self
			}
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// copyMissed records that copy l lacks [off, off+length) and, if it was
// in sync, records it out of sync in the metadata. It returns an error only
// when that record could not be made: then the operation must not be
// acknowledged as complete.
func (mi *Mirror) copyMissed(l *copyLink, off, length int64, cause error) error {
	if err := l.dirty.mark(off, length); err != nil {
		return err
	}
	if !copyState(l.state.Load()).live() {
		return nil
	}
	mi.stateMu.Lock()
	defer mi.stateMu.Unlock()
	switch copyState(l.state.Load()) {
	case stOutOfSync, stNew:
		return nil
	case stResyncing:
		l.state.Store(int32(stOutOfSync))
		mi.dropConn(l)
		mi.m.opts.Logger.Warn("copy failed during resync; back to out-of-sync", "lu", mi.name, "copy", l.node, "err", cause)
		if err := mi.proposeLocked(l.node, stOutOfSync, false); err != nil {
			mi.m.opts.Logger.Warn("cannot record copy out of sync (it is not in sync either)", "lu", mi.name, "copy", l.node, "err", err)
		}
		return nil
	}
	if err := mi.proposeLocked(l.node, stOutOfSync, true); err != nil {
		return fmt.Errorf("copy %s of %s failed (%v) and cannot be recorded out of sync: %w", l.node, mi.name, cause, err)
	}
	// The copy may still serve reads until its lease runs out: nothing it
	// misses is acknowledged before that, neither this operation nor any
	// later one (which no longer goes to the copy): the hold is set before
	// the copy leaves the live set. Its lease from this writer ends
	// ReadLease after it last answered; a metadata lease (confirmed before
	// the record just made) at most ReadLease from now.
	// With the pair heartbeat, the copy is dropped from it first: its
	// lease then runs from an answer that arrived before the drop.
	lastAck := max(mi.dropPair(l), l.lastAck.Load())
	p := copyset.Params{ReadLease: mi.m.opts.ReadLease}
	until := copyset.AckAfterCopyLoss(p, lastAck, mi.m.now(), mi.m.opts.ConfirmLease != nil)
	mi.holdAcks(until)
	l.state.Store(int32(stOutOfSync))
	mi.dropConn(l)
	mi.waitAckHold()
	mi.m.opts.Logger.Warn("copy out of sync", "lu", mi.name, "copy", l.node, "epoch", mi.rec.Epoch, "err", cause)
	return nil
}

// holdAcks makes the mirror acknowledge nothing before until (Manager.now).
func (mi *Mirror) holdAcks(until int64) {
	for {
		cur := mi.ackHold.Load()
		if until <= cur || mi.ackHold.CompareAndSwap(cur, until) {
			return
		}
	}
}

// ackHeld reports whether acknowledgements are on hold now.
func (mi *Mirror) ackHeld() bool {
	h := mi.ackHold.Load()
	return h != 0 && h > mi.m.now()
}

// waitAckHold sleeps until acknowledgements are no longer on hold.
func (mi *Mirror) waitAckHold() {
	if h := mi.ackHold.Load(); h != 0 {
		if wait := h - mi.m.now(); wait > 0 {
			time.Sleep(time.Duration(wait))
		}
	}
}

func (mi *Mirror) dropConn(l *copyLink) {
	if c := l.conn.Swap(nil); c != nil {
		c.Close()
	}
}

// proposeLocked records copy node in state through the metadata leader;
// bump raises the epoch (the in-sync set changes). mi.stateMu must be held.
func (mi *Mirror) proposeLocked(node string, state copyState, bump bool) error {
	ctx, cancel := context.WithTimeout(context.Background(), mi.m.opts.MetadataTimeout)
	defer cancel()
	for attempt := 0; ; attempt++ {
		rec := cloneLU(mi.rec)
		for i := range rec.Replicas {
			if rec.Replicas[i].NodeID == node {
				rec.Replicas[i].State = state.replicaState()
			}
		}
		expected := rec.Epoch
		if bump {
			rec.Epoch++
		}
		err := mi.m.opts.UpdateLU(ctx, rec, expected)
		if err == nil {
			mi.rec = rec
			mi.epoch.Store(rec.Epoch)
			return nil
		}
		if !errors.Is(err, cluster.ErrEpochChanged) || attempt >= 3 {
			return err
		}
		// Someone else changed the LU: take their record and try again,
		// unless it names another writer (this node was fenced).
		time.Sleep(50 * time.Millisecond)
		if fresh, ok := mi.m.record(mi.name); ok && fresh.Epoch > mi.rec.Epoch {
			if writerOf(fresh) != mi.self {
				return fmt.Errorf("%w: %s is the writer of %s at epoch %d, not this node", err, writerOf(fresh), mi.name, fresh.Epoch)
			}
			mi.rec = cloneLU(fresh)
			mi.epoch.Store(fresh.Epoch)
		}
	}
}

// lockRange takes the stripes of the regions [off, off+length) touches,
// shared, in stripe order; the returned rangeLock releases them. It is a
// value, not a closure, so the 4 KiB write path allocates nothing for it.
func (mi *Mirror) lockRange(off, length int64) rangeLock {
	if len(mi.linkSet()) == 0 {
		return rangeLock{}
	}
	first := off / mi.regionBytes
	last := first
	if length > 0 {
		last = (off + length - 1) / mi.regionBytes
	}
	l := rangeLock{mi: mi, first: first, last: last}
	l.each(func(s *sync.RWMutex) { s.RLock() })
	return l
}

// rangeLock is the set of stripes lockRange took: those of the regions
// first to last (every stripe once the range spans stripeCount regions or
// more). The zero value holds none.
type rangeLock struct {
	mi          *Mirror
	first, last int64
}

// each calls f on every stripe the lock holds, in stripe order (the order
// every locker takes them in).
func (l rangeLock) each(f func(*sync.RWMutex)) {
	st := &l.mi.stripes
	if l.last-l.first+1 >= stripeCount {
		for i := range st {
			f(&st[i])
		}
		return
	}
	a, b := l.first%stripeCount, l.last%stripeCount
	if a > b { // the range wraps past the last stripe
		for i := int64(0); i <= b; i++ {
			f(&st[i])
		}
		b = stripeCount - 1
	}
	for i := a; i <= b; i++ {
		f(&st[i])
	}
}

// unlock releases what lockRange took.
func (l rangeLock) unlock() {
	if l.mi != nil {
		l.each(func(s *sync.RWMutex) { s.RUnlock() })
	}
}

// run keeps a stream open to every copy and starts a resync for a copy
// that is out of sync and reachable.
func (mi *Mirror) run() {
	defer mi.wg.Done()
	tick := time.NewTicker(min(mi.m.opts.RetryInterval, mi.m.opts.ReadLease/4))
	defer tick.Stop()
	for {
		for _, l := range mi.linkSet() {
			mi.tend(l)
		}
		select {
		case <-mi.stop:
			return
		case <-tick.C:
		}
	}
}

// dial opens a stream to copy l unless one is open.
func (mi *Mirror) dial(l *copyLink, timeout time.Duration) {
	c := l.conn.Load()
	if c != nil && !c.broken() {
		return
	}
	if c != nil {
		l.conn.CompareAndSwap(c, nil)
	}
	addr, ok := mi.m.opts.NodeAPI(l.node)
	if !ok {
		return
	}
	hello := replproto.Hello{Role: replproto.RoleCopy, LU: mi.name, Node: mi.self}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	c, _, err := mi.m.dialStream(ctx, l.node, addr, hello, mi.epoch.Load(), mi.local.Size())
	if err != nil {
		msg := err.Error()
		if last := l.lastDialErr.Load(); last == nil || *last != msg {
			mi.m.opts.Logger.Info("copy not reachable", "lu", mi.name, "copy", l.node, "err", err)
			l.lastDialErr.Store(&msg)
		}
		return
	}
	l.lastDialErr.Store(nil)
	if copyState(l.state.Load()) == stInSync {
		// Two pings give a copy in sync its read lease before the stream
		// carries anything: the second echoes the first one's answer
		// (copyLease).
		for range 2 {
			if err := mi.pingOnce(l, c); err != nil {
				mi.m.opts.Logger.Info("copy not answering on a new stream", "lu", mi.name, "copy", l.node, "err", err)
				c.Close()
				return
			}
		}
	}
	l.conn.Store(c)
	mi.m.opts.Logger.Info("stream to copy open", "lu", mi.name, "copy", l.node, "state", copyState(l.state.Load()).replicaState())
}

// ping keeps an in-sync copy's read lease alive (every ReadLease/4 or
// so, also while writes flow: writes do not renew it, see copyLease), and
// finds a copy that stopped answering.
func (mi *Mirror) ping(l *copyLink) {
	c := l.conn.Load()
	if c == nil || copyState(l.state.Load()) != stInSync || mi.pairCovers(l) {
		return
	}
	if mi.m.now()-l.lastPing.Load() < int64(mi.m.opts.ReadLease)/8 {
		return
	}
	mi.pingNow(l, c)
}

// pingNow pings copy l over c (pingOnce); a failure records the copy out
// of sync.
func (mi *Mirror) pingNow(l *copyLink, c *peerConn) {
	if err := mi.pingOnce(l, c); err != nil {
		if mi.resyncCheckStop() != nil {
			return // the mirror closed the stream itself: the copy lacks nothing
		}
		if err := mi.copyMissed(l, 0, 0, err); err != nil {
			mi.m.opts.Logger.Warn("copy unreachable and not recorded out of sync", "lu", mi.name, "copy", l.node, "err", err)
		}
	}
}

// pingOnce pings copy l over c, echoing the copy's last answer time on c;
// the answer renews the writer's read lease from the copy and gives the
// time to echo next.
func (mi *Mirror) pingOnce(l *copyLink, c *peerConn) error {
	sent := mi.m.now()
	l.lastPing.Store(sent)
	var echo uint64
	if e := l.echo.Load(); e != nil && e.conn == c {
		echo = e.at
	}
	h, err := c.do(replproto.Header{Type: replproto.TypePing, Epoch: mi.epoch.Load(), Offset: echo}, nil, nil)
	if err != nil {
		return err
	}
	l.lastAck.Store(mi.m.now())
	l.renewFrom(sent)
	l.echo.Store(&pingEcho{conn: c, at: h.Offset})
	return nil
}

// renewFrom moves the writer's read lease from this copy to sent, if later.
func (l *copyLink) renewFrom(sent int64) {
	for {
		cur := l.leaseFrom.Load()
		if sent <= cur || l.leaseFrom.CompareAndSwap(cur, sent) {
			return
		}
	}
}

func (mi *Mirror) tend(l *copyLink) {
	mi.dial(l, mi.m.opts.AckTimeout)
	mi.enrollPair(l)
	mi.ping(l)
	if c := l.conn.Load(); c == nil {
		return
	}
	if st := copyState(l.state.Load()); (st == stOutOfSync || st == stNew) && l.resyncing.CompareAndSwap(false, true) {
		mi.wg.Add(1)
		go func() {
			defer mi.wg.Done()
			defer l.resyncing.Store(false)
			if err := mi.rebuild(l); err != nil {
				mi.m.opts.Logger.Warn("rebuild interrupted; it starts over when the copy is reachable", "lu", mi.name, "copy", l.node, "err", err)
				return
			}
			if err := mi.resync(l); err != nil {
				mi.m.opts.Logger.Warn("resync interrupted; it resumes when the copy is reachable", "lu", mi.name, "copy", l.node, "err", err)
			}
		}()
	}
}
