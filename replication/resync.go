package replication

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/replication/replproto"
)

// errResyncStopped is returned by resync when the mirror closes or the copy
// leaves the resyncing state.
var errResyncStopped = errors.New("replication: resync stopped")

// resync brings copy l from out of sync to in sync: it records the copy
// resyncing (from then on live writes reach it too), compares every region
// by hash first if the copy's dirty record is not trusted (hashResync),
// sends every dirty region from the local volume, flushes the copy, and
// records it in sync once no region is dirty. An interruption leaves the
// regions not yet sent in the dirty map (and on disk), so the next resync
// resumes there; an interrupted hash compare starts over.
func (mi *Mirror) resync(l *copyLink) error {
	mi.stateMu.Lock()
	if copyState(l.state.Load()) != stOutOfSync {
		mi.stateMu.Unlock()
		return nil
	}
	// A copy the writer took out of the live set at start (distrustInSync)
	// is still recorded in sync: record it out of sync first (the in-sync
	// set changes, so epoch + 1).
	if recordedState(mi.rec, l.node) == cluster.ReplicaInSync {
		if err := mi.proposeLocked(l.node, stOutOfSync, true); err != nil {
			mi.stateMu.Unlock()
			return fmt.Errorf("record copy out of sync: %w", err)
		}
	}
	if err := mi.proposeLocked(l.node, stResyncing, false); err != nil {
		mi.stateMu.Unlock()
		return fmt.Errorf("record copy resyncing: %w", err)
	}
	l.state.Store(int32(stResyncing))
	mi.stateMu.Unlock()
	start := time.Now()
	mi.m.opts.Logger.Info("resync starts", "lu", mi.name, "copy", l.node, "dirty_bytes", l.dirty.dirtyBytes())

	var sentBytes int64
	{
		if err := mi.askLog(l); err != nil {
			_ = mi.copyMissed(l, 0, 0, err)
			return err
		}
	}
	if l.dirty.isUnknown() {
		n, err := mi.hashResync(l)
		sentBytes += n
		if err != nil {
			return err
		}
	}
	var compared, differing int64
	for {
		for _, r := range l.dirty.regionList() {
			if err := mi.resyncCheck(l); err != nil {
				return err
			}
			var n int64
			var err error
			if l.dirty.toCompare(r) {
				var differs bool
				differs, n, err = mi.hashRegion(l, r)
				compared++
				if differs {
					differing++
				}
			} else {
				n, err = mi.resyncRegion(l, r)
			}
			sentBytes += n
			mi.throttle(n)
			if err != nil {
				_ = mi.copyMissed(l, 0, 0, err)
				return err
			}
		}
		if err := mi.resyncCheck(l); err != nil {
			return err
		}
		c := l.conn.Load()
		if c == nil {
			return fmt.Errorf("%w: stream to %s gone", ErrPeerDown, l.node)
		}
		if _, err := c.do(replproto.Header{Type: replproto.TypeFlush, Epoch: mi.epoch.Load()}, nil, nil); err != nil {
			_ = mi.copyMissed(l, 0, 0, err)
			return err
		}
		done, err := mi.finishResync(l)
		if err != nil {
			return err
		}
		if done {
			took := time.Since(start)
			if compared > 0 {
				mi.m.opts.Logger.Info(fmt.Sprintf("activity-log regions compared: %d, sent %d", compared, differing),
					"lu", mi.name, "copy", l.node, "regions_compared", compared, "regions_sent", differing)
			}
			mi.m.opts.Logger.Info("copy in sync", "lu", mi.name, "copy", l.node, "sent_bytes", sentBytes,
				"took", took.Round(time.Millisecond), "epoch", mi.epoch.Load())
			if mi.m.opts.ResyncDone != nil {
				mi.m.opts.ResyncDone(mi.name, l.node, sentBytes, took)
			}
			return nil
		}
	}
}

// logReplyRangesMax bounds the ranges of a copy's Log reply; a copy with
// more answers that it cannot tell (the writer compares the whole LU).
const logReplyRangesMax = 1 << 16

// askLog asks copy l for the regions it may differ in from a time as the
// LU's writer (replproto.TypeLog, answered from its activity log) and
// records them dirty, to be compared by hash; a copy that cannot tell is
// marked unknown (compared whole). The new writer's own record of l holds
// what l missed since this node became the writer. The copy answers once
// whatever its own retired writer's device had in flight has landed, so the
// question comes first, before any resync frame. A copy already unknown
// learns nothing from the answer.
func (mi *Mirror) askLog(l *copyLink) error {
	c := l.conn.Load()
	if c == nil {
		return fmt.Errorf("%w: stream to %s gone", ErrPeerDown, l.node)
	}
	buf := mi.m.bufs.Get(1 + logReplyRangesMax*16)
	defer mi.m.bufs.Put(buf)
	h, err := c.do(replproto.Header{Type: replproto.TypeLog, Epoch: mi.epoch.Load()}, nil, buf)
	if err != nil {
		return fmt.Errorf("ask copy %s for its activity log: %w", l.node, err)
	}
	known, ranges, err := replproto.ParseLog(buf[:h.PayloadLen])
	if err != nil {
		return fmt.Errorf("activity log of copy %s: %w", l.node, err)
	}
	if l.dirty.isUnknown() {
		return nil
	}
	if !known {
		mi.m.opts.Logger.Warn("copy cannot tell where it may differ from its time as writer; comparing the whole LU by region hashes",
			"lu", mi.name, "copy", l.node)
		return l.dirty.setUnknown()
	}
	if len(ranges) == 0 {
		return nil
	}
	var n int64
	for _, r := range ranges {
		n += r[1]
	}
	mi.m.opts.Logger.Info("copy's activity log from its time as writer: its regions will be compared by hash",
		"lu", mi.name, "copy", l.node, "ranges", len(ranges), "bytes", n)
	return l.dirty.markCompare(ranges)
}

// recordedState is node's copy state in rec ("" when it has none).
func recordedState(rec cluster.LU, node string) string {
	for _, r := range rec.Replicas {
		if r.NodeID == node {
			return r.State
		}
	}
	return ""
}

// rebuild prepares a new copy (state new): every allocated extent of the
// local volume is recorded dirty for it, then it is recorded out of sync,
// and resync sends those extents. Writes during the scan that land in a
// range already scanned are recorded dirty by the write path (a new copy
// takes no live writes), so nothing is missed. A copy in any other state is
// left alone.
func (mi *Mirror) rebuild(l *copyLink) error {
	if copyState(l.state.Load()) != stNew {
		return nil
	}
	start := time.Now()
	ctx := context.Background()
	var ext []blockdev.Extent
	var allocated int64
	for off, size := int64(0), mi.local.Size(); off < size; {
		var err error
		ext, err = mi.local.Extents(ctx, off, size-off, ext[:0])
		if err != nil {
			return err
		}
		for _, e := range ext {
			if e.Flags&blockdev.ExtentHole == 0 {
				if err := l.dirty.mark(off, e.LengthBytes); err != nil {
					return err
				}
				allocated += e.LengthBytes
			}
			off += e.LengthBytes
		}
		if err := mi.resyncCheckStop(); err != nil {
			return err
		}
	}
	mi.stateMu.Lock()
	defer mi.stateMu.Unlock()
	if copyState(l.state.Load()) != stNew {
		return errResyncStopped
	}
	if err := mi.proposeLocked(l.node, stOutOfSync, false); err != nil {
		return fmt.Errorf("record new copy out of sync: %w", err)
	}
	l.state.Store(int32(stOutOfSync))
	mi.m.opts.Logger.Info("rebuild: allocated extents recorded for the new copy", "lu", mi.name, "copy", l.node,
		"allocated_bytes", allocated, "took", time.Since(start).Round(time.Millisecond))
	return nil
}

func (mi *Mirror) resyncCheckStop() error {
	select {
	case <-mi.stop:
		return errResyncStopped
	default:
		return nil
	}
}

func (mi *Mirror) resyncCheck(l *copyLink) error {
	if err := mi.resyncCheckStop(); err != nil {
		return err
	}
	if copyState(l.state.Load()) != stResyncing {
		return errResyncStopped
	}
	return nil
}

// finishResync records l in sync if nothing is dirty, holding the gate so
// that no operation is between skipping the copy and marking it dirty.
func (mi *Mirror) finishResync(l *copyLink) (bool, error) {
	mi.gate.Lock()
	defer mi.gate.Unlock()
	mi.stateMu.Lock()
	defer mi.stateMu.Unlock()
	if copyState(l.state.Load()) != stResyncing {
		return false, errResyncStopped
	}
	if !l.dirty.empty() {
		return false, nil
	}
	if err := mi.proposeLocked(l.node, stInSync, true); err != nil {
		return false, fmt.Errorf("record copy in sync: %w", err)
	}
	l.state.Store(int32(stInSync))
	return true, nil
}

// resyncRegion sends the dirty blocks of region r to copy l: data as
// writes, holes as write-zeroes (which deallocate on the copy). It holds the
// region's stripe exclusively, so no client write to the region runs
// meanwhile. It returns the data bytes sent.
func (mi *Mirror) resyncRegion(l *copyLink, r uint64) (int64, error) {
	s := &mi.stripes[r%stripeCount]
	s.Lock()
	defer s.Unlock()
	runs := l.dirty.takeRegion(r)
	sent, err := mi.sendRuns(l, runs)
	if err != nil {
		for _, run := range runs {
			_ = l.dirty.mark(run[0], run[1])
		}
		return sent, err
	}
	return sent, l.dirty.doneRegion(r)
}

// sendRuns sends the byte ranges runs ([offset, length]) of the local
// volume to copy l as resync frames and waits for every answer. The caller
// holds the stripes of the ranges exclusively. It returns the data bytes
// sent.
func (mi *Mirror) sendRuns(l *copyLink, runs [][2]int64) (int64, error) {
	c := l.conn.Load()
	if c == nil {
		return 0, fmt.Errorf("%w: stream to %s gone", ErrPeerDown, l.node)
	}
	ctx := context.Background()
	size := mi.local.Size()
	var sent int64
	var ext []blockdev.Extent
	var pending []*call
	wait := func() error {
		var errs []error
		for _, cl := range pending {
			if _, err := c.wait(cl); err != nil {
				errs = append(errs, err)
			}
		}
		pending = pending[:0]
		return errors.Join(errs...)
	}
	send := func() error {
		for _, run := range runs {
			off, end := run[0], min(run[0]+run[1], size)
			for off < end {
				var err error
				ext, err = mi.local.Extents(ctx, off, end-off, ext[:0])
				if err != nil {
					return err
				}
				for _, e := range ext {
					n := min(e.LengthBytes, end-off)
					h := replproto.Header{Flags: replproto.FlagResync, Epoch: mi.epoch.Load(), Offset: uint64(off)}
					if e.Flags&blockdev.ExtentHole != 0 {
						h.Type, h.Length = replproto.TypeZero, uint32(min(n, replproto.LengthMax))
						n = int64(h.Length)
						cl, err := c.start(h, nil, nil)
						if err != nil {
							return err
						}
						pending = append(pending, cl)
					} else {
						n = min(n, resyncChunkBytes)
						buf := mi.m.bufs.Get(int(n))
						if err := mi.local.ReadAt(ctx, buf, off); err != nil {
							mi.m.bufs.Put(buf)
							return err
						}
						h.Type, h.Length = replproto.TypeWrite, uint32(n)
						// start has copied the frame into the send queue when it returns.
						cl, err := c.start(h, buf, nil)
						mi.m.bufs.Put(buf)
						if err != nil {
							return err
						}
						pending = append(pending, cl)
						sent += n
						l.sentResync.Add(float64(n))
					}
					off += n
					if len(pending) >= 16 {
						if err := wait(); err != nil {
							return err
						}
					}
					if off >= end {
						break
					}
				}
			}
		}
		return nil
	}
	err := send()
	return sent, errors.Join(err, wait())
}

// hashResync compares every region of copy l with the local volume by
// SHA-256 and sends the regions that differ (hashRegion), then flushes the
// copy and records that its dirty map is again all it lacks. Copy l is
// resyncing: live writes reach it meanwhile. It returns the data bytes
// sent.
func (mi *Mirror) hashResync(l *copyLink) (int64, error) {
	start := time.Now()
	regions := (mi.local.Size() + mi.regionBytes - 1) / mi.regionBytes
	mi.m.opts.Logger.Info("hash resync starts: the copy's dirty record is not trusted", "lu", mi.name, "copy", l.node,
		"regions", regions, "doubt", mi.store.Doubt())
	var compared, differing, sent int64
	for r := int64(0); r < regions; r++ {
		if err := mi.resyncCheck(l); err != nil {
			return sent, err
		}
		differs, n, err := mi.hashRegion(l, uint64(r))
		compared++
		sent += n
		if differs {
			differing++
		}
		mi.throttle(n)
		if err != nil {
			_ = mi.copyMissed(l, 0, 0, err)
			return sent, err
		}
	}
	if err := mi.resyncCheck(l); err != nil {
		return sent, err
	}
	c := l.conn.Load()
	if c == nil {
		return sent, fmt.Errorf("%w: stream to %s gone", ErrPeerDown, l.node)
	}
	if _, err := c.do(replproto.Header{Type: replproto.TypeFlush, Epoch: mi.epoch.Load()}, nil, nil); err != nil {
		_ = mi.copyMissed(l, 0, 0, err)
		return sent, err
	}
	if err := l.dirty.known(); err != nil {
		return sent, err
	}
	mi.m.opts.Logger.Info(fmt.Sprintf("hash resync done: compared %d regions, sent %d", compared, differing),
		"lu", mi.name, "copy", l.node, "regions_compared", compared, "regions_sent", differing, "sent_bytes", sent,
		"took", time.Since(start).Round(time.Millisecond))
	return sent, nil
}

// errHashMismatch is returned by hashRegion when a copy's region still
// differs from the writer's after it was sent.
var errHashMismatch = errors.New("replication: copy's region differs from the writer's after resync")

// hashRegion compares region r of copy l with the local volume by SHA-256
// and, if they differ, sends the whole region (data as writes, holes as
// write-zeroes) and checks the copy's hash again. It holds the region's
// stripe exclusively, so no client write to the region runs between the
// compare and the send; the region's dirty blocks are cleared, since the
// copy now matches. It returns whether the region differed and the data
// bytes sent.
func (mi *Mirror) hashRegion(l *copyLink, r uint64) (bool, int64, error) {
	s := &mi.stripes[r%stripeCount]
	s.Lock()
	defer s.Unlock()
	off := int64(r) * mi.regionBytes
	n := min(mi.regionBytes, mi.local.Size()-off)
	if n <= 0 {
		return false, 0, nil
	}
	equal, err := mi.regionEqual(l, off, n)
	if err != nil {
		return false, 0, err
	}
	if !equal {
		runs := [][2]int64{{off, n}}
		sent, err := mi.sendRuns(l, runs)
		if err == nil {
			equal, err = mi.regionEqual(l, off, n)
			if err == nil && !equal {
				err = fmt.Errorf("%w: %s, region %d (offset %d)", errHashMismatch, l.node, r, off)
			}
		}
		if err != nil {
			return true, sent, err
		}
		l.dirty.takeRegion(r)
		return true, sent, l.dirty.doneRegion(r)
	}
	l.dirty.takeRegion(r)
	return false, 0, l.dirty.doneRegion(r)
}

// regionEqual reports whether copy l's [off, off+n) has the SHA-256 of the
// local volume's (asked over the stream with a Hash request).
func (mi *Mirror) regionEqual(l *copyLink, off, n int64) (bool, error) {
	c := l.conn.Load()
	if c == nil {
		return false, fmt.Errorf("%w: stream to %s gone", ErrPeerDown, l.node)
	}
	var remote [sha256.Size]byte
	cl, err := c.start(replproto.Header{Type: replproto.TypeHash, Epoch: mi.epoch.Load(), Offset: uint64(off), Length: uint32(n)}, nil, remote[:])
	if err != nil {
		return false, err
	}
	local, localErr := mi.localHash(off, n)
	if _, err := c.wait(cl); err != nil {
		return false, err
	}
	if localErr != nil {
		return false, localErr
	}
	return local == remote, nil
}

// localHash returns the SHA-256 of the local volume's [off, off+n); a
// range wholly unallocated is hashed as zeros without reading it.
func (mi *Mirror) localHash(off, n int64) ([sha256.Size]byte, error) {
	ctx := context.Background()
	ext, err := mi.local.Extents(ctx, off, n, nil)
	if err != nil {
		return [sha256.Size]byte{}, err
	}
	buf := mi.m.bufs.Get(int(n))
	defer mi.m.bufs.Put(buf)
	if len(ext) == 1 && ext[0].LengthBytes >= n && ext[0].Flags&blockdev.ExtentHole != 0 {
		clear(buf)
	} else if err := mi.local.ReadAt(ctx, buf, off); err != nil {
		return [sha256.Size]byte{}, err
	}
	return sha256.Sum256(buf), nil
}

// throttle sleeps long enough to keep a resync at the configured rate,
// and takes the bytes from the node's background budget.
func (mi *Mirror) throttle(sentBytes int64) {
	mi.m.takeBackground(sentBytes, mi.stop)
	rate := mi.m.opts.ResyncBytesPerSecond
	if rate <= 0 || sentBytes <= 0 {
		return
	}
	d := time.Duration(float64(sentBytes) / float64(rate) * float64(time.Second))
	select {
	case <-mi.stop:
	case <-time.After(d):
	}
}
