package replication

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/replication/replproto"
)

// errResyncStopped is returned by resync when the mirror closes or the copy
// leaves the resyncing state.
var errResyncStopped = errors.New("replication: resync stopped")

// resync brings copy l from out of sync to in sync: it records the copy
// resyncing (from then on live writes reach it too), sends every dirty
// region from the local volume, flushes the copy, and records it in sync
// once no region is dirty. An interruption leaves the regions not yet sent
// in the dirty map (and on disk), so the next resync resumes there.
func (mi *Mirror) resync(l *copyLink) error {
	mi.stateMu.Lock()
	if copyState(l.state.Load()) != stOutOfSync {
		mi.stateMu.Unlock()
		return nil
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
	for {
		for _, r := range l.dirty.regionList() {
			if err := mi.resyncCheck(l); err != nil {
				return err
			}
			n, err := mi.resyncRegion(l, r)
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
			mi.m.opts.Logger.Info("copy in sync", "lu", mi.name, "copy", l.node, "sent_bytes", sentBytes,
				"took", time.Since(start).Round(time.Millisecond), "epoch", mi.epoch.Load())
			return nil
		}
	}
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
	var sent int64
	err := func() error {
		c := l.conn.Load()
		if c == nil {
			return fmt.Errorf("%w: stream to %s gone", ErrPeerDown, l.node)
		}
		ctx := context.Background()
		size := mi.local.Size()
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
						buf := mi.m.bufs.get(int(n))
						if err := mi.local.ReadAt(ctx, buf, off); err != nil {
							mi.m.bufs.put(buf)
							return err
						}
						h.Type, h.Length = replproto.TypeWrite, uint32(n)
						// start has copied the frame into the send queue when it returns.
						cl, err := c.start(h, buf, nil)
						mi.m.bufs.put(buf)
						if err != nil {
							return err
						}
						pending = append(pending, cl)
						sent += n
						mi.m.metrics.sent.WithLabelValues(mi.name, l.node, "resync").Add(float64(n))
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
		return wait()
	}()
	if err != nil {
		for _, run := range runs {
			_ = l.dirty.mark(run[0], run[1])
		}
		return sent, err
	}
	return sent, l.dirty.doneRegion(r)
}

// throttle sleeps long enough to keep a resync at the configured rate.
func (mi *Mirror) throttle(sentBytes int64) {
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
