package replication

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"slices"
	"sync"

	"github.com/cockroachdb/pebble/v2"

	"github.com/lupool/lupool/internal/rules"
)

// The activity log.
//
// A write in flight on the writer may reach some copies and not others, or
// a copy and not the writer's own volume: if the writer dies then, the
// copies are all recorded in sync and differ where that write went. The
// activity log bounds where: before the writer issues a write, trim or
// write-zeroes to a region (the dirty map's region, RegionBytes), the
// region is in its activity log, an "active/" key in the dirty store
// written with Sync (one synced batch for every region that writers are
// waiting on at that moment). A region leaves the log only when no write to
// it is in flight and every write to it was flushed since (a Flush of the
// LU, or the log's own flush of the local volume when the log has grown to
// twice its limit), so the log names every region where the copies may
// differ, even after the whole machine lost power. Like DRBD's activity
// log, it keeps the recently written regions (up to ActivityLogRegions per
// LU), so that a hot region costs no synced write per write.
//
// Its uses:
//
//   - the writer starts after a crash (DirtyStore.Crashed): every region in
//     the LU's log is recorded dirty, to be compared by hash, for every
//     other copy, before the writer acknowledges anything (copies in sync
//     are taken out of the live set until resynced);
//   - the writer was deposed (a failover while it was dead, frozen or cut
//     off): it keeps its log as a copy, and the new writer asks for it
//     (replproto.TypeLog) when it resyncs this copy; the new writer's own
//     dirty record holds what was written since the promotion, the old
//     writer's log what it may have applied without the new writer having
//     it, or the other way round. The copy drops the log once it is
//     recorded in sync again.
//
// Memory LUs keep no log: their writer's volume is lost with the process.

// activeKeyPrefix is the prefix of every activity-log key of luName.
func activeKeyPrefix(luName string) []byte {
	return []byte(activePrefix + luName + "\x00")
}

func activeKey(luName string, region uint64) []byte {
	return binary.BigEndian.AppendUint64(activeKeyPrefix(luName), region)
}

// addActive records regions of regionBytes in luName's activity log,
// synced. The value's payload is regionBytes (8 bytes, big-endian), so
// that the log reads back right whatever the region size later.
func (s *DirtyStore) addActive(luName string, regionBytes int64, regions []uint64) error {
	return s.setRegions(regions, func(r uint64) []byte { return activeKey(luName, r) },
		binary.BigEndian.AppendUint64(nil, uint64(regionBytes)))
}

// removeActive forgets regions of luName's activity log. Not synced: a
// region that comes back after a crash is only compared again.
func (s *DirtyStore) removeActive(luName string, regions []uint64) error {
	done, err := s.use()
	if err != nil {
		return err
	}
	defer done()
	b := s.db.NewBatch()
	for _, r := range regions {
		if err := b.Delete(activeKey(luName, r), nil); err != nil {
			return errors.Join(err, b.Close())
		}
	}
	return b.Commit(pebble.NoSync)
}

// clearActive forgets luName's whole activity log. Not synced: a log that
// comes back after a crash is only compared again.
func (s *DirtyStore) clearActive(luName string) error {
	done, err := s.use()
	if err != nil {
		return err
	}
	defer done()
	prefix := activeKeyPrefix(luName)
	return s.db.DeleteRange(prefix, prefixEnd(prefix), pebble.NoSync)
}

// loadActive returns the byte ranges ([offset, length]) of the regions in
// luName's activity log, ascending, adjacent ones joined. A record that
// does not check out is an error wrapping ErrDirtyCorrupt.
func (s *DirtyStore) loadActive(luName string) ([][2]int64, error) {
	done, err := s.use()
	if err != nil {
		return nil, err
	}
	defer done()
	prefix := activeKeyPrefix(luName)
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: prefix, UpperBound: prefixEnd(prefix)})
	if err != nil {
		return nil, err
	}
	var out [][2]int64
	for it.First(); it.Valid(); it.Next() {
		k := it.Key()
		if len(k) != len(prefix)+8 {
			err = fmt.Errorf("%w: key %q of %s: %d bytes, want %d", ErrDirtyCorrupt, k, luName, len(k), len(prefix)+8)
			break
		}
		var payload []byte
		if payload, err = decodeRecord(k, it.Value()); err != nil {
			break
		}
		var regionBytes uint64
		if len(payload) == 8 {
			regionBytes = binary.BigEndian.Uint64(payload)
		}
		r := binary.BigEndian.Uint64(k[len(prefix):])
		if rules.DirtyRegion(int64(regionBytes)) != nil || r > uint64(math.MaxInt64)/regionBytes-1 {
			err = fmt.Errorf("%w: key %q of %s: region %d of %d bytes", ErrDirtyCorrupt, k, luName, r, regionBytes)
			break
		}
		off := int64(r * regionBytes)
		if n := len(out); n > 0 && out[n-1][0]+out[n-1][1] == off {
			out[n-1][1] += int64(regionBytes)
		} else {
			out = append(out, [2]int64{off, int64(regionBytes)})
		}
	}
	if err = errors.Join(err, markCorrupt(it.Error()), it.Close()); err != nil {
		return nil, err
	}
	return out, nil
}

// activeLUs returns the names of the LUs that have an activity log in the
// store.
func (s *DirtyStore) activeLUs() ([]string, error) {
	done, err := s.use()
	if err != nil {
		return nil, err
	}
	defer done()
	prefix := []byte(activePrefix)
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: prefix, UpperBound: append([]byte(activePrefix[:len(activePrefix)-1]), '/'+1)})
	if err != nil {
		return nil, err
	}
	var out []string
	for it.First(); it.Valid(); {
		k := it.Key()
		if checkKey(k) != nil {
			it.Next()
			continue
		}
		name := string(k[len(prefix) : len(k)-9])
		out = append(out, name)
		it.SeekGE(prefixEnd(activeKeyPrefix(name)))
	}
	if err := errors.Join(markCorrupt(it.Error()), it.Close()); err != nil {
		return nil, err
	}
	return out, nil
}

// activityLog is one LU's activity log on its writer. Safe for concurrent
// use; begin and end cost a mutex and a map lookup per region when the
// regions are in the log already.
type activityLog struct {
	store       *DirtyStore
	luName      string
	regionBytes int64
	limit       int
	// flushLocal makes the writer's volume durable (the log's own flush
	// when it has grown to twice its limit).
	flushLocal func() error

	mu   sync.Mutex
	cond sync.Cond // on mu: a synced batch ended
	// regions are the regions in the log, durable or being added.
	regions map[uint64]*alRegion
	// pending are regions waiting to be written, syncing says a writer is
	// writing a batch.
	pending []uint64
	syncing bool
	// started numbers the flushes of the LU as they start; covered is
	// the greatest number of a flush that completed: every write that
	// ended before that flush started is durable.
	started, covered uint64
	// clock orders writes, for eviction.
	clock uint64
	// fails counts the batches that failed; lastErr is the last failure.
	fails   uint64
	lastErr error
}

// alRegion is one region of the log.
type alRegion struct {
	inflight int32
	durable  bool
	// endedAt is the flush number (started) when the last write to the
	// region ended: the region may leave the log once a flush numbered
	// above it completed.
	endedAt uint64
	// used orders regions by their last write, for eviction.
	used uint64
}

func newActivityLog(store *DirtyStore, luName string, regionBytes int64, limit int, flushLocal func() error) *activityLog {
	a := &activityLog{store: store, luName: luName, regionBytes: regionBytes, limit: max(limit, 1),
		flushLocal: flushLocal, regions: map[uint64]*alRegion{}}
	a.cond.L = &a.mu
	return a
}

func (a *activityLog) span(off, length int64) (uint64, uint64) {
	first := uint64(off / a.regionBytes)
	last := first
	if length > 0 {
		last = uint64((off + length - 1) / a.regionBytes)
	}
	return first, last
}

// begin puts the regions of [off, off+length) in the log and counts a
// write in flight in each; it returns once every one of them is durable in
// the store, or an error (then nothing is counted). Every begin that
// returned nil is followed by end with the same range.
func (a *activityLog) begin(off, length int64) error {
	first, last := a.span(off, length)
	a.mu.Lock()
	defer a.mu.Unlock()
	ready := true
	a.clock++
	for r := first; r <= last; r++ {
		e := a.regions[r]
		if e == nil {
			e = &alRegion{}
			a.regions[r] = e
			a.pending = append(a.pending, r)
		}
		e.inflight++
		e.used = a.clock
		ready = ready && e.durable
	}
	if ready {
		return nil
	}
	fails := a.fails
	for {
		if a.fails != fails {
			err := a.lastErr
			a.endLocked(first, last)
			return err
		}
		if a.durableLocked(first, last) {
			return nil
		}
		if a.syncing {
			a.cond.Wait()
			continue
		}
		a.syncBatchLocked()
	}
}

// durableLocked reports whether every region of [first, last] is durable.
func (a *activityLog) durableLocked(first, last uint64) bool {
	for r := first; r <= last; r++ {
		if e := a.regions[r]; e == nil || !e.durable {
			return false
		}
	}
	return true
}

// syncBatchLocked writes every pending region in one synced batch, with
// a.mu released meanwhile, then evicts past the limit.
func (a *activityLog) syncBatchLocked() {
	batch := a.pending
	a.pending = nil
	a.syncing = true
	a.mu.Unlock()
	err := a.store.addActive(a.luName, a.regionBytes, batch)
	a.mu.Lock()
	a.syncing = false
	if err != nil {
		a.fails++
		a.lastErr = fmt.Errorf("replication: record the activity log of %s: %w", a.luName, err)
		a.pending = append(a.pending, batch...)
	} else {
		for _, r := range batch {
			if e := a.regions[r]; e != nil {
				e.durable = true
			}
		}
	}
	a.cond.Broadcast()
	if err == nil && len(a.regions) > a.limit {
		a.evictLocked()
	}
}

// end counts the write in flight in [off, off+length) as done.
func (a *activityLog) end(off, length int64) {
	first, last := a.span(off, length)
	a.mu.Lock()
	a.endLocked(first, last)
	a.mu.Unlock()
}

func (a *activityLog) endLocked(first, last uint64) {
	for r := first; r <= last; r++ {
		if e := a.regions[r]; e != nil {
			e.inflight--
			e.endedAt = a.started
			if e.inflight == 0 && !e.durable && !slices.Contains(a.pending, r) {
				delete(a.regions, r) // its batch failed: never recorded
			}
		}
	}
}

// flushStart numbers a flush of the LU (the local volume and every copy
// in sync) that starts now; flushDone(n) says it completed.
func (a *activityLog) flushStart() uint64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.started++
	return a.started
}

// flushDone records that flush n completed: every write that ended before
// it started is durable.
func (a *activityLog) flushDone(n uint64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.covered = max(a.covered, n)
}

// evictLocked takes regions out of the log, oldest first, down to 3/4 of
// the limit: only regions with no write in flight whose writes were
// flushed since. A log at twice its limit with nothing to evict flushes
// the local volume first.
func (a *activityLog) evictLocked() {
	victims := a.evictableLocked()
	if len(a.regions)-len(victims) >= 2*a.limit && a.flushLocal != nil {
		a.started++
		n := a.started
		a.mu.Unlock()
		err := a.flushLocal()
		a.mu.Lock()
		if err != nil {
			return
		}
		a.covered = max(a.covered, n)
		victims = a.evictableLocked()
	}
	want := len(a.regions) - a.limit*3/4
	if want <= 0 || len(victims) == 0 {
		return
	}
	slices.SortFunc(victims, func(x, y uint64) int {
		ux, uy := a.regions[x].used, a.regions[y].used
		switch {
		case ux < uy:
			return -1
		case ux > uy:
			return 1
		}
		return 0
	})
	victims = victims[:min(want, len(victims))]
	for _, r := range victims {
		delete(a.regions, r)
	}
	// Unsynced: a region that comes back after a crash is compared again.
	_ = a.store.removeActive(a.luName, victims)
}

func (a *activityLog) evictableLocked() []uint64 {
	var out []uint64
	for r, e := range a.regions {
		if e.inflight == 0 && e.durable && e.endedAt < a.covered {
			out = append(out, r)
		}
	}
	return out
}

// size returns the number of regions in the log.
func (a *activityLog) size() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.regions)
}
