package lu

import (
	"context"
	"fmt"

	"github.com/lupool/lupool/blockdev"
)

// pullChunkBlocks is how many blocks Flatten and MergeBase copy under one
// set of block locks; writes to other blocks go on meanwhile.
const pullChunkBlocks = 64

// Snapshot freezes the overlay's current content at a flush point and
// returns it as a read-only layer, in time independent of how much was
// written (no data moves; the new layer's empty map, 64 KiB per GiB, is
// allocated and written): in-flight operations drain (the overlay's write lock), the data
// and map are flushed, the current layer (data volume, map, base) becomes
// the frozen snapshot, and next (an empty data volume of the same size, a
// new map path, BaseName naming the snapshot) becomes the overlay, reading
// every block from the snapshot. next.Base is ignored. On error nothing
// changed. The snapshot's map is written with the frozen flag. The caller
// owns the returned layer and keeps it open while any overlay reads from
// it (closing it makes their reads of it fail with ErrShutdown).
func (o *Overlay) Snapshot(ctx context.Context, next OverlayOptions) (*Overlay, error) {
	if next.Data == nil || len(next.BaseName) > mapBaseNameMax {
		return nil, fmt.Errorf("%w: snapshot needs a data volume and a base name of at most %d bytes", blockdev.ErrInvalid, mapBaseNameMax)
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if err := o.beginLocked(ctx, 0, 0, true); err != nil {
		return nil, err
	}
	if next.Data.Size() != o.mu.data.Size() {
		return nil, fmt.Errorf("%w: snapshot data volume of %d bytes, overlay has %d", blockdev.ErrInvalid, next.Data.Size(), o.mu.data.Size())
	}
	if o.mu.depth+1 > MaxChainDepth {
		return nil, fmt.Errorf("%w: %d layers, at most %d", ErrChainTooDeep, o.mu.depth+1, MaxChainDepth)
	}
	if err := o.persistLocked(ctx); err != nil {
		return nil, err
	}
	frozen := &Overlay{}
	frozen.mu.data, frozen.mu.base, frozen.mu.baseName = o.mu.data, o.mu.base, o.mu.baseName
	frozen.mu.states, frozen.mu.mapFile, frozen.mu.depth = o.mu.states, o.mu.mapFile, o.mu.depth
	frozen.mu.frozen = true

	states := newStateMap(blocksOf(next.Data.Size()))
	var mf *mapFile
	if next.FS != nil {
		h := mapHeader{sizeBytes: next.Data.Size(), baseName: next.BaseName}
		var err error
		if mf, err = createMapFile(next.FS, next.MapPath, h, states); err != nil {
			return nil, err
		}
	}
	// The new layer's map is durable; now mark the old one frozen. A crash
	// between the two leaves an unfrozen old layer under a valid new one:
	// it is only read from, so reopening it frozen is safe.
	if frozen.mu.mapFile != nil {
		if err := frozen.mu.mapFile.write(frozen.headerLocked(), frozen.mu.states); err != nil {
			if mf != nil {
				_ = mf.remove()
			}
			return nil, err
		}
	}
	o.mu.data, o.mu.base, o.mu.baseName = next.Data, frozen, next.BaseName
	o.mu.states, o.mu.mapFile, o.mu.depth = states, mf, frozen.mu.depth+1
	o.flushMu.Lock()
	o.persistedGen = o.gen.Add(1)
	o.flushMu.Unlock()
	return frozen, nil
}

// Rollback makes the overlay read exactly what snap holds: the blocks
// written here since are discarded (trimmed from the data volume), the
// size becomes snap's, and every block reads from snap, which must be the
// overlay's base or a layer below it (else ErrNotInChain); baseName names
// it in the map. The new map is durable when Rollback returns. Layers
// between the overlay and snap are left as they are.
func (o *Overlay) Rollback(ctx context.Context, snap Base, baseName string) error {
	if len(baseName) > mapBaseNameMax {
		return fmt.Errorf("%w: base name of %d bytes", blockdev.ErrInvalid, len(baseName))
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if err := o.beginLocked(ctx, 0, 0, true); err != nil {
		return err
	}
	if !o.inChainLocked(snap) {
		return ErrNotInChain
	}
	// The new map goes to disk first: from then on every block reads from
	// snap, and what the data volume still holds is never read (a block
	// written later is written whole, copy on write). Then the data is
	// freed and sized.
	states := newStateMap(blocksOf(snap.Size()))
	if mf := o.mu.mapFile; mf != nil {
		o.flushMu.Lock()
		err := mf.write(mapHeader{sizeBytes: snap.Size(), baseName: baseName}, states)
		o.flushMu.Unlock()
		if err != nil {
			return err
		}
	}
	o.mu.base, o.mu.baseName, o.mu.depth = snap, baseName, baseDepth(snap)+1
	o.mu.states = states
	o.flushMu.Lock()
	o.persistedGen = o.gen.Add(1)
	o.flushMu.Unlock()
	if err := o.mu.data.Trim(ctx, 0, o.mu.data.Size(), 0); err != nil {
		return err
	}
	return o.mu.data.Resize(snap.Size())
}

func (o *Overlay) inChainLocked(snap Base) bool {
	for b := o.mu.base; b != nil; {
		if b == snap {
			return true
		}
		next, ok := b.(*Overlay)
		if !ok {
			return false
		}
		next.mu.RLock()
		b = next.mu.base
		next.mu.RUnlock()
	}
	return false
}

// MergeBase removes the overlay's base layer from its chain while writes
// go on: blocks the base layer wrote or zeroed, and this overlay did not,
// are copied (or marked zero) here, then the overlay links to the base's
// own base. The base must be an *Overlay (a snapshot), else
// ErrNotMergeable; it is not changed, and the caller deletes it when
// nothing else reads it. The new link is durable when MergeBase returns.
func (o *Overlay) MergeBase(ctx context.Context) error {
	o.mu.RLock()
	layer, ok := o.mu.base.(*Overlay)
	o.mu.RUnlock()
	if !ok {
		return ErrNotMergeable
	}
	// A frozen layer's fields change only when it is closed.
	layer.mu.RLock()
	closed, below, belowName := layer.mu.closed, layer.mu.base, layer.mu.baseName
	layer.mu.RUnlock()
	if closed {
		return blockdev.ErrShutdown
	}
	err := o.pull(ctx, layer, func(ctx context.Context, first, last int64) error {
		return o.mergeRunLocked(ctx, layer, first, last)
	})
	if err != nil {
		return err
	}
	return o.relink(ctx, layer, below, belowName)
}

// mergeRunLocked copies blocks [first, last), which read from layer, out
// of layer. o.mu (read) and the blocks' locks are held.
func (o *Overlay) mergeRunLocked(ctx context.Context, layer *Overlay, first, last int64) error {
	layer.mu.RLock()
	defer layer.mu.RUnlock()
	if layer.mu.closed {
		return blockdev.ErrShutdown
	}
	for b := first; b < last; {
		var s blockState
		n := last - b
		if b < layer.mu.states.blocks {
			s, n = layer.mu.states.run(b, min(last, layer.mu.states.blocks))
		} else {
			s = stateZero // past the layer's end it reads zeros
		}
		switch s {
		case stateZero:
			o.setStates(b, b+n, stateZero)
		case stateData:
			off := b * BlockSizeBytes
			end := min((b+n)*BlockSizeBytes, o.mu.data.Size(), layer.mu.data.Size())
			buf := make([]byte, end-off)
			if err := layer.mu.data.ReadAt(ctx, buf, off); err != nil {
				return err
			}
			if err := o.mu.data.WriteAt(ctx, buf, off, 0); err != nil {
				return err
			}
			o.setStates(b, b+n, stateData)
		}
		b += n
	}
	return nil
}

// Flatten makes the overlay independent of every layer below it while
// writes go on: overlay layers are merged one by one (MergeBase), then the
// plain base's data blocks are copied in and its holes marked zero, and
// the link is cut. The overlay then reads nothing from a base; the caller
// may delete the base once nothing else reads it.
func (o *Overlay) Flatten(ctx context.Context) error {
	for {
		o.mu.RLock()
		base := o.mu.base
		o.mu.RUnlock()
		if base == nil {
			return nil
		}
		if _, ok := base.(*Overlay); ok {
			if err := o.MergeBase(ctx); err != nil {
				return err
			}
			continue
		}
		err := o.pull(ctx, base, func(ctx context.Context, first, last int64) error {
			return o.copyBaseRunLocked(ctx, base, first, last)
		})
		if err != nil {
			return err
		}
		if err := o.relink(ctx, base, nil, ""); err != nil {
			return err
		}
	}
}

// copyBaseRunLocked copies the data blocks of base inside blocks [first,
// last) and marks the blocks the base holds as holes zero.
func (o *Overlay) copyBaseRunLocked(ctx context.Context, base Base, first, last int64) error {
	off, end := first*BlockSizeBytes, min(last*BlockSizeBytes, o.mu.data.Size())
	baseEnd := min(end, base.Size())
	dataBlocks := make([]bool, last-first)
	var ext []blockdev.Extent
	for pos := off; pos < baseEnd; {
		var err error
		if ext, err = base.Extents(ctx, pos, baseEnd-pos, ext[:0]); err != nil {
			return err
		}
		if len(ext) == 0 {
			return fmt.Errorf("lu: base returned no extent at %d: %w", pos, blockdev.ErrIO)
		}
		for _, e := range ext {
			l := min(e.LengthBytes, baseEnd-pos)
			if l <= 0 {
				break
			}
			if e.Flags&blockdev.ExtentZero == 0 {
				for b := pos / BlockSizeBytes; b < blocksOf(pos+l); b++ {
					dataBlocks[b-first] = true
				}
			}
			pos += l
		}
	}
	for i := int64(0); i < int64(len(dataBlocks)); {
		j := i + 1
		for j < int64(len(dataBlocks)) && dataBlocks[j] == dataBlocks[i] {
			j++
		}
		b0, b1 := first+i, first+j
		if !dataBlocks[i] {
			o.setStates(b0, b1, stateZero)
		} else {
			lo, hi := b0*BlockSizeBytes, min(b1*BlockSizeBytes, end)
			buf := make([]byte, hi-lo)
			if err := o.readBaseLocked(ctx, buf, lo); err != nil {
				return err
			}
			if err := o.mu.data.WriteAt(ctx, buf, lo, 0); err != nil {
				return err
			}
			o.setStates(b0, b1, stateData)
		}
		i = j
	}
	return nil
}

// pull walks the overlay in chunks and calls run for each run of blocks
// that still read from base, with o.mu read-locked and the run's block
// locks held, so writes to other chunks go on. It stops with ErrNotInChain
// when the overlay's base is no longer base (a snapshot or rollback came
// between two chunks): what was copied so far is right (it was the
// content then), what follows would not be.
func (o *Overlay) pull(ctx context.Context, base Base, run func(ctx context.Context, first, last int64) error) error {
	for chunk := int64(0); ; chunk += pullChunkBlocks {
		done, err := o.pullChunk(ctx, base, chunk, run)
		if err != nil || done {
			return err
		}
	}
}

func (o *Overlay) pullChunk(ctx context.Context, base Base, chunk int64, run func(ctx context.Context, first, last int64) error) (bool, error) {
	o.mu.RLock()
	defer o.mu.RUnlock()
	// Not a write: a frozen layer (a snapshot) may merge its base too, as
	// that leaves what it reads unchanged.
	if err := o.beginLocked(ctx, 0, 0, false); err != nil {
		return false, err
	}
	if o.mu.base != base {
		return false, fmt.Errorf("lu: the overlay's base changed during the merge: %w", ErrNotInChain)
	}
	blocks := o.mu.states.blocks
	if chunk >= blocks {
		return true, nil
	}
	last := min(chunk+pullChunkBlocks, blocks)
	unlock := o.lockBlocks(chunk, last)
	defer unlock()
	for b := chunk; b < last; {
		s, n := o.mu.states.run(b, last)
		if s == stateBase {
			if err := run(ctx, b, b+n); err != nil {
				return false, err
			}
		}
		b += n
	}
	return false, nil
}

// relink replaces the base old with next once no block reads from the
// base any more (a block could: a rollback or resize between the pull and
// now); the new map is durable when it returns.
func (o *Overlay) relink(ctx context.Context, old, next Base, nextName string) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	if err := o.beginLocked(ctx, 0, 0, false); err != nil { // see pullChunk
		return err
	}
	if o.mu.base != old {
		return fmt.Errorf("lu: the overlay's base changed during the merge: %w", ErrNotInChain)
	}
	if !o.allStateNot(0, o.mu.states.blocks, stateBase) && next == nil {
		return fmt.Errorf("lu: flatten: blocks still read from the base (changed meanwhile); run it again: %w", blockdev.ErrIO)
	}
	o.mu.base, o.mu.baseName, o.mu.depth = next, nextName, baseDepth(next)+1
	o.gen.Add(1)
	return o.persistLocked(ctx)
}
