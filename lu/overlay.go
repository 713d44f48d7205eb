package lu

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/lu/lufs"
)

// MaxChainDepth bounds how many overlays may stack on one base volume (a
// clone of a snapshot of a clone ...). Every read of a block nobody wrote
// walks the chain, so it stays short.
const MaxChainDepth = 16

// overlayStripes is the number of block locks that serialize changes of a
// block's state (copy-on-write of a partial block, trim, flatten).
const overlayStripes = 64

// Overlay errors.
var (
	// ErrChainTooDeep is returned by NewOverlay, CreateOverlay and
	// Overlay.Snapshot when the chain would exceed MaxChainDepth.
	ErrChainTooDeep = errors.New("lu: overlay chain too deep")
	// ErrNotInChain is returned by Overlay.Rollback for a snapshot that is
	// not below the overlay.
	ErrNotInChain = errors.New("lu: snapshot is not in the overlay's chain")
	// ErrNotMergeable is returned by Overlay.MergeBase when the base is not
	// an overlay layer.
	ErrNotMergeable = errors.New("lu: base is not an overlay layer")
)

// Base is what an overlay reads unwritten blocks from: a read-only image
// volume or a frozen overlay (a snapshot). The overlay never writes it.
type Base interface {
	blockdev.Device
	blockdev.Extenter
}

// OverlayOptions describe one overlay layer.
type OverlayOptions struct {
	// Data holds the blocks written here; its size is the overlay's size.
	// Required. The overlay owns it and closes it.
	Data Volume
	// Base is read for blocks not written here; nil reads zeros. Blocks
	// past Base's size read zeros. The overlay does not own it.
	Base Base
	// BaseName is recorded in the map so that whoever reopens the overlay
	// can find its base again; at most 255 bytes. Opaque to lu.
	BaseName string
	// FS and MapPath keep the map durable (slot files MapPath.0 and .1).
	// A nil FS keeps the map in memory only (a volatile overlay over a
	// MemVolume).
	FS      lufs.FS
	MapPath string
}

// Overlay is a volume that holds only what was written over a read-only
// base. See the package doc, "Overlays".
type Overlay struct {
	// gen counts state changes; Flush persists the map when it moved.
	gen atomic.Uint64

	mu struct {
		sync.RWMutex // read: data path; write: snapshot, rollback, relink, resize, close
		closed       bool
		frozen       bool      // read-only snapshot layer
		data         Volume    // guarded by mu
		base         Base      // guarded by mu; nil = zeros
		baseName     string    // guarded by mu
		states       *stateMap // guarded by mu (the pointer; entries are atomic)
		mapFile      *mapFile  // guarded by mu; nil = volatile
		depth        int       // guarded by mu: layers from here to the bottom, this one included
	}

	// flushMu serializes Flush's map writes. Taken after mu (read).
	flushMu      sync.Mutex
	persistedGen uint64 // guarded by flushMu
	blockLocks   [overlayStripes]sync.Mutex
}

var (
	_ Volume             = (*Overlay)(nil)
	_ Base               = (*Overlay)(nil)
	_ blockdev.Trimmer   = (*Overlay)(nil)
	_ blockdev.Zeroer    = (*Overlay)(nil)
	_ blockdev.Extenter  = (*Overlay)(nil)
	_ blockdev.TryReader = (*Overlay)(nil)
)

func baseDepth(b Base) int {
	if o, ok := b.(*Overlay); ok {
		return o.Depth()
	}
	if b == nil {
		return 0
	}
	return 1
}

// CreateOverlay makes a new, empty overlay: every block reads from the
// base. With an FS it creates the map's slot files (failing if they exist)
// and makes them durable before it returns.
func CreateOverlay(opts OverlayOptions) (*Overlay, error) {
	if err := checkOverlayOptions(opts); err != nil {
		return nil, err
	}
	states := newStateMap(blocksOf(opts.Data.Size()))
	return newOverlay(opts, states, 0, nil, true)
}

// OpenOverlay reopens an overlay whose map is at opts.MapPath; the caller
// opens the data volume and the base named by OverlayBaseName. It fails
// with ErrCorruptMap when no slot holds a valid map.
func OpenOverlay(opts OverlayOptions) (*Overlay, error) {
	if err := checkOverlayOptions(opts); err != nil {
		return nil, err
	}
	if opts.FS == nil {
		return nil, fmt.Errorf("%w: OpenOverlay needs an FS", blockdev.ErrInvalid)
	}
	mf, h, states, err := openMapFile(opts.FS, opts.MapPath)
	if err != nil {
		return nil, err
	}
	if size := opts.Data.Size(); h.sizeBytes != size {
		// A resize or rollback whose data change never completed: the map
		// is the truth; bring the data volume to its size (a tail past it
		// is never read; free it so the shrink is allowed).
		var err error
		if size > h.sizeBytes {
			err = opts.Data.WriteZeroes(context.Background(), h.sizeBytes, size-h.sizeBytes, 0)
		}
		if err == nil {
			err = opts.Data.Resize(h.sizeBytes)
		}
		if err != nil {
			_ = mf.close()
			return nil, err
		}
	}
	if h.baseName != opts.BaseName {
		_ = mf.close()
		return nil, fmt.Errorf("%w: map %s names base %q, opened with %q", ErrCorruptMap, opts.MapPath, h.baseName, opts.BaseName)
	}
	return newOverlay(opts, states, h.flags, mf, false)
}

// OverlayBaseName reads the base name recorded in the map at path, so a
// caller can open the base before OpenOverlay.
func OverlayBaseName(fs lufs.FS, path string) (string, error) {
	mf, h, _, err := openMapFile(fs, path)
	if err != nil {
		return "", err
	}
	_ = mf.close()
	return h.baseName, nil
}

func checkOverlayOptions(opts OverlayOptions) error {
	if opts.Data == nil {
		return fmt.Errorf("%w: overlay without a data volume", blockdev.ErrInvalid)
	}
	if len(opts.BaseName) > mapBaseNameMax {
		return fmt.Errorf("%w: base name of %d bytes", blockdev.ErrInvalid, len(opts.BaseName))
	}
	if d := baseDepth(opts.Base) + 1; d > MaxChainDepth {
		return fmt.Errorf("%w: %d layers, at most %d", ErrChainTooDeep, d, MaxChainDepth)
	}
	return nil
}

func newOverlay(opts OverlayOptions, states *stateMap, flags uint16, mf *mapFile, create bool) (*Overlay, error) {
	o := &Overlay{}
	o.mu.data, o.mu.base, o.mu.baseName = opts.Data, opts.Base, opts.BaseName
	o.mu.states, o.mu.depth = states, baseDepth(opts.Base)+1
	o.mu.frozen = flags&mapFlagFrozen != 0
	o.mu.mapFile = mf
	if create && opts.FS != nil {
		var err error
		o.mu.mapFile, err = createMapFile(opts.FS, opts.MapPath, o.headerLocked(), states)
		if err != nil {
			return nil, err
		}
	}
	return o, nil
}

func blocksOf(sizeBytes int64) int64 { return (sizeBytes + BlockSizeBytes - 1) / BlockSizeBytes }

// headerLocked: o.mu must be held.
func (o *Overlay) headerLocked() mapHeader {
	h := mapHeader{sizeBytes: o.mu.data.Size(), baseName: o.mu.baseName}
	if o.mu.frozen {
		h.flags |= mapFlagFrozen
	}
	return h
}

// Depth returns the number of layers from this overlay down, itself
// included (a clone of a plain image has depth 2: the clone and the image).
func (o *Overlay) Depth() int {
	o.mu.RLock()
	defer o.mu.RUnlock()
	return o.mu.depth
}

// BaseName returns the name of the base recorded in the map.
func (o *Overlay) BaseName() string {
	o.mu.RLock()
	defer o.mu.RUnlock()
	return o.mu.baseName
}

// Frozen reports whether the overlay is a read-only snapshot layer.
func (o *Overlay) Frozen() bool {
	o.mu.RLock()
	defer o.mu.RUnlock()
	return o.mu.frozen
}

// Kind implements Volume: the kind of the data volume.
func (o *Overlay) Kind() Kind {
	o.mu.RLock()
	defer o.mu.RUnlock()
	return o.mu.data.Kind()
}

// Size implements blockdev.Device.
func (o *Overlay) Size() int64 {
	o.mu.RLock()
	defer o.mu.RUnlock()
	return o.mu.data.Size()
}

// Caps implements blockdev.Device.
func (o *Overlay) Caps() blockdev.Caps {
	o.mu.RLock()
	defer o.mu.RUnlock()
	c := o.mu.data.Caps()
	c.ReadOnly = o.mu.frozen
	return c
}

// AllocatedBytes implements Volume: the overlay's own blocks only; the
// base's are counted by whoever owns the base.
func (o *Overlay) AllocatedBytes() int64 {
	o.mu.RLock()
	defer o.mu.RUnlock()
	if o.mu.closed {
		return 0
	}
	return o.mu.data.AllocatedBytes()
}

func (o *Overlay) beginLocked(ctx context.Context, off, length int64, write bool) error {
	if o.mu.closed {
		return blockdev.ErrShutdown
	}
	if write && o.mu.frozen {
		return blockdev.ErrReadOnly
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	return blockdev.CheckRange(off, length, o.mu.data.Size())
}

// ReadAt implements blockdev.Device.
func (o *Overlay) ReadAt(ctx context.Context, p []byte, off int64) error {
	o.mu.RLock()
	defer o.mu.RUnlock()
	if err := o.beginLocked(ctx, off, int64(len(p)), false); err != nil {
		return err
	}
	return o.readLocked(ctx, p, off)
}

// readLocked reads p at off run by run of equal block state.
func (o *Overlay) readLocked(ctx context.Context, p []byte, off int64) error {
	end := off + int64(len(p))
	for pos := off; pos < end; {
		b := pos / BlockSizeBytes
		s, n := o.mu.states.run(b, blocksOf(end))
		next := min((b+n)*BlockSizeBytes, end)
		chunk := p[pos-off : next-off]
		var err error
		switch s {
		case stateData:
			err = o.mu.data.ReadAt(ctx, chunk, pos)
		case stateZero:
			clear(chunk)
		default:
			err = o.readBaseLocked(ctx, chunk, pos)
		}
		if err != nil {
			return err
		}
		pos = next
	}
	return nil
}

// readBaseLocked reads from the base, zeros past its end or without one.
func (o *Overlay) readBaseLocked(ctx context.Context, p []byte, off int64) error {
	base := o.mu.base
	if base == nil {
		clear(p)
		return nil
	}
	baseSize := base.Size()
	n := int64(len(p))
	if off >= baseSize {
		clear(p)
		return nil
	}
	if off+n > baseSize {
		clear(p[baseSize-off:])
		p = p[:baseSize-off]
	}
	return base.ReadAt(ctx, p, off)
}

// lockBlocks takes the stripe locks of blocks [first, end) in ascending
// order and returns the function that releases them.
func (o *Overlay) lockBlocks(first, end int64) func() {
	var mask uint64
	for b := first; b < end && mask != 1<<overlayStripes-1; b++ {
		mask |= 1 << uint(b%overlayStripes)
	}
	for i := 0; i < overlayStripes; i++ {
		if mask&(1<<uint(i)) != 0 {
			o.blockLocks[i].Lock()
		}
	}
	return func() {
		for i := overlayStripes - 1; i >= 0; i-- {
			if mask&(1<<uint(i)) != 0 {
				o.blockLocks[i].Unlock()
			}
		}
	}
}

func (o *Overlay) allState(first, end int64, s blockState) bool {
	st, n := o.mu.states.run(first, end)
	return st == s && first+n >= end
}

// setStates marks blocks [first, end) s and counts the change.
func (o *Overlay) setStates(first, end int64, s blockState) bool {
	changed := false
	for b := first; b < end; b++ {
		if o.mu.states.get(b) != s {
			o.mu.states.set(b, s)
			changed = true
		}
	}
	if changed {
		o.gen.Add(1)
	}
	return changed
}

// WriteAt implements blockdev.Device. A write that covers only blocks
// already written here goes straight to the data volume; otherwise the
// partial edge blocks are filled from below first (copy on write) under
// the blocks' locks, and the blocks are marked written after the data
// landed. With FUA, a write that changed the map also makes the map
// durable before it returns.
func (o *Overlay) WriteAt(ctx context.Context, p []byte, off int64, flags blockdev.Flags) error {
	if err := blockdev.CheckFlags(flags, blockdev.FUA); err != nil {
		return err
	}
	o.mu.RLock()
	defer o.mu.RUnlock()
	if err := o.beginLocked(ctx, off, int64(len(p)), true); err != nil {
		return err
	}
	if len(p) == 0 {
		return nil
	}
	end := off + int64(len(p))
	first, last := off/BlockSizeBytes, blocksOf(end)
	if o.allState(first, last, stateData) {
		return o.mu.data.WriteAt(ctx, p, off, flags)
	}
	unlock := o.lockBlocks(first, last)
	changed, err := o.writeSlowLocked(ctx, p, off, flags&blockdev.FUA)
	unlock()
	if err != nil || !changed || flags&blockdev.FUA == 0 {
		return err
	}
	return o.persistLocked(ctx)
}

// writeSlowLocked writes p at off with the blocks' locks held: partial
// edge blocks not written here are first completed from their current
// content.
func (o *Overlay) writeSlowLocked(ctx context.Context, p []byte, off int64, flags blockdev.Flags) (bool, error) {
	end := off + int64(len(p))
	first, last := off/BlockSizeBytes, blocksOf(end)
	size := o.mu.data.Size()
	lo, hi := off, end
	if off%BlockSizeBytes != 0 && o.mu.states.get(first) != stateData {
		lo = first * BlockSizeBytes
	}
	if end%BlockSizeBytes != 0 && o.mu.states.get(last-1) != stateData {
		hi = min(last*BlockSizeBytes, size)
	}
	buf := p
	if lo != off || hi != end {
		buf = make([]byte, hi-lo)
		if lo != off {
			if err := o.readLocked(ctx, buf[:min(BlockSizeBytes, hi-lo)], lo); err != nil {
				return false, err
			}
		}
		if hi != end {
			tail := max(alignDown(hi-1), lo)
			if err := o.readLocked(ctx, buf[tail-lo:], tail); err != nil {
				return false, err
			}
		}
		copy(buf[off-lo:], p)
	}
	if err := o.mu.data.WriteAt(ctx, buf, lo, flags); err != nil {
		return false, err
	}
	return o.setStates(first, last, stateData), nil
}

// Trim implements blockdev.Trimmer: the whole blocks inside the range read
// as zeros afterwards (not the base's data) and are freed in the data
// volume; partial blocks are left alone.
func (o *Overlay) Trim(ctx context.Context, off, length int64, flags blockdev.Flags) error {
	if err := blockdev.CheckFlags(flags, blockdev.FUA); err != nil {
		return err
	}
	o.mu.RLock()
	defer o.mu.RUnlock()
	if err := o.beginLocked(ctx, off, length, true); err != nil {
		return err
	}
	start, end := wholeBlocks(off, length, o.mu.data.Size())
	if end <= start {
		return nil
	}
	return o.zeroBlocksLocked(ctx, start/BlockSizeBytes, blocksOf(end), flags)
}

// zeroBlocksLocked marks blocks [first, last) zero, then frees them in the
// data volume (a reader that sees the zero state reads zeros whatever the
// data volume still holds).
func (o *Overlay) zeroBlocksLocked(ctx context.Context, first, last int64, flags blockdev.Flags) error {
	unlock := o.lockBlocks(first, last)
	hadData := !o.allStateNot(first, last, stateData)
	changed := o.setStates(first, last, stateZero)
	var err error
	if hadData {
		start, end := first*BlockSizeBytes, min(last*BlockSizeBytes, o.mu.data.Size())
		err = o.mu.data.Trim(ctx, start, end-start, 0)
	}
	unlock()
	if err != nil {
		return err
	}
	if flags&blockdev.FUA != 0 && (changed || hadData) {
		return o.persistLocked(ctx)
	}
	return nil
}

// allStateNot reports whether no block of [first, last) is in state s.
func (o *Overlay) allStateNot(first, last int64, s blockState) bool {
	for b := first; b < last; {
		st, n := o.mu.states.run(b, last)
		if st == s {
			return false
		}
		b += n
	}
	return true
}

// WriteZeroes implements blockdev.Zeroer. Whole blocks are marked zero (and
// freed) unless NoHole asks them to stay allocated, then they are zeroed in
// the data volume and marked written; partial edge blocks are written with
// zeros, copy on write.
func (o *Overlay) WriteZeroes(ctx context.Context, off, length int64, flags blockdev.Flags) error {
	if err := blockdev.CheckFlags(flags, blockdev.AllFlags); err != nil {
		return err
	}
	o.mu.RLock()
	defer o.mu.RUnlock()
	if err := o.beginLocked(ctx, off, length, true); err != nil {
		return err
	}
	if length == 0 {
		return nil
	}
	end := off + length
	start, stop := wholeBlocks(off, length, o.mu.data.Size())
	if stop <= start {
		start, stop = end, end // no whole block: all of it is edge
	}
	fua := flags & blockdev.FUA
	if flags&(blockdev.NoHole|blockdev.FastZero) == blockdev.NoHole|blockdev.FastZero {
		// Fast zeroing that stays allocated rests on the data volume: ask
		// it first, before anything is touched; edges would be written
		// with buffers, which is not fast.
		if stop <= start || off < start || stop < end {
			return fmt.Errorf("lu: overlay write zeroes: %w", blockdev.ErrNotSupported)
		}
	}
	for _, edge := range [][2]int64{{off, start}, {stop, end}} {
		if edge[1] > edge[0] {
			zeros := make([]byte, edge[1]-edge[0])
			if err := o.writeLockedRange(ctx, zeros, edge[0]); err != nil {
				return err
			}
		}
	}
	if stop > start {
		first, last := start/BlockSizeBytes, blocksOf(stop)
		if flags&blockdev.NoHole != 0 {
			unlock := o.lockBlocks(first, last)
			err := o.mu.data.WriteZeroes(ctx, start, min(stop, o.mu.data.Size())-start, flags&(blockdev.NoHole|blockdev.FastZero))
			if err == nil {
				o.setStates(first, last, stateData)
			}
			unlock()
			if err != nil {
				return err
			}
		} else if err := o.zeroBlocksLocked(ctx, first, last, 0); err != nil {
			return err
		}
	}
	if fua != 0 {
		return o.persistLocked(ctx)
	}
	return nil
}

// writeLockedRange is WriteAt's body for callers already holding mu.
func (o *Overlay) writeLockedRange(ctx context.Context, p []byte, off int64) error {
	end := off + int64(len(p))
	first, last := off/BlockSizeBytes, blocksOf(end)
	if o.allState(first, last, stateData) {
		return o.mu.data.WriteAt(ctx, p, off, 0)
	}
	unlock := o.lockBlocks(first, last)
	defer unlock()
	_, err := o.writeSlowLocked(ctx, p, off, 0)
	return err
}

// Flush implements blockdev.Device. Crash rule: the map is encoded first,
// then the data volume is flushed, then the map is written and synced. A
// block marked written in the persisted map had its data written before
// the encoding, so the data flush that follows covers it: a durable map
// never points at data that is not durable. A block marked zero needs no
// data. Flush skips the map write when no state changed since the last.
func (o *Overlay) Flush(ctx context.Context) error {
	o.mu.RLock()
	defer o.mu.RUnlock()
	if err := o.beginLocked(ctx, 0, 0, false); err != nil {
		return err
	}
	return o.persistLocked(ctx)
}

// persistLocked flushes the data volume and writes the map if it changed.
// o.mu must be held (read or write).
func (o *Overlay) persistLocked(ctx context.Context) error {
	o.flushMu.Lock()
	defer o.flushMu.Unlock()
	gen := o.gen.Load()
	var mw *mapWrite
	if o.mu.mapFile != nil && gen != o.persistedGen {
		mw = o.mu.mapFile.prepare(o.headerLocked(), o.mu.states, false)
	}
	if err := o.mu.data.Flush(ctx); err != nil {
		return err
	}
	if mw == nil {
		return nil
	}
	if err := o.mu.mapFile.commit(mw); err != nil {
		return err
	}
	o.persistedGen = gen
	return nil
}

// Extents implements blockdev.Extenter. Blocks written here are data,
// blocks trimmed or zeroed here are zero but not holes (they hide the
// base's data), and blocks from the base report the base's own allocation
// (holes past its end).
func (o *Overlay) Extents(ctx context.Context, off, length int64, dst []blockdev.Extent) ([]blockdev.Extent, error) {
	o.mu.RLock()
	defer o.mu.RUnlock()
	if err := o.beginLocked(ctx, off, length, false); err != nil {
		return dst, err
	}
	end := off + length
	for pos, calls := off, 0; pos < end && calls < maxExtentsPerCall; calls++ {
		b := pos / BlockSizeBytes
		s, n := o.mu.states.run(b, blocksOf(end))
		next := min((b+n)*BlockSizeBytes, end)
		switch s {
		case stateData:
			dst = appendExtent(dst, next-pos, 0)
		case stateZero:
			// Zero, not a hole: the block masks the base (like a zero
			// cluster of a qcow2 overlay), so a consumer that skips holes,
			// a copy's rebuild in particular, must still carry it.
			dst = appendExtent(dst, next-pos, blockdev.ExtentZero)
		default:
			var err error
			if dst, err = o.baseExtentsLocked(ctx, pos, next, dst); err != nil {
				return dst, err
			}
		}
		pos = next
	}
	return dst, nil
}

func (o *Overlay) baseExtentsLocked(ctx context.Context, pos, next int64, dst []blockdev.Extent) ([]blockdev.Extent, error) {
	base := o.mu.base
	baseEnd := int64(0)
	if base != nil {
		baseEnd = min(base.Size(), next)
	}
	var scratch []blockdev.Extent
	for pos < baseEnd {
		var err error
		scratch, err = base.Extents(ctx, pos, baseEnd-pos, scratch[:0])
		if err != nil {
			return dst, err
		}
		if len(scratch) == 0 {
			return dst, fmt.Errorf("lu: base returned no extent at %d: %w", pos, blockdev.ErrIO)
		}
		for _, e := range scratch {
			l := min(e.LengthBytes, baseEnd-pos)
			if l <= 0 {
				break
			}
			dst = appendExtent(dst, l, e.Flags)
			pos += l
		}
	}
	if pos < next {
		dst = appendExtent(dst, next-pos, blockdev.ExtentHole|blockdev.ExtentZero)
	}
	return dst, nil
}

// Resize implements Volume. Growing adds blocks that read as zeros (never
// the base's data, even where the base is larger); shrinking is refused
// when a cut block was written here.
func (o *Overlay) Resize(sizeBytes int64) error {
	if sizeBytes < 0 {
		return fmt.Errorf("%w: %d bytes", ErrInvalidSize, sizeBytes)
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.mu.closed {
		return blockdev.ErrShutdown
	}
	if o.mu.frozen {
		return blockdev.ErrReadOnly
	}
	old := o.mu.data.Size()
	oldBlocks, newBlocks := blocksOf(old), blocksOf(sizeBytes)
	if sizeBytes < old && !o.allStateNot(newBlocks, oldBlocks, stateData) {
		return fmt.Errorf("%w: overlay shrinking from %d to %d bytes", ErrShrinkAllocated, old, sizeBytes)
	}
	var head []byte // the old partial last block, when it reads from the base
	last := oldBlocks - 1
	if sizeBytes > old && old%BlockSizeBytes != 0 && o.mu.states.get(last) == stateBase {
		head = make([]byte, old-last*BlockSizeBytes)
		if err := o.readBaseLocked(context.Background(), head, last*BlockSizeBytes); err != nil {
			return err
		}
	}
	if err := o.mu.data.Resize(sizeBytes); err != nil {
		return err
	}
	o.mu.states = o.mu.states.resized(newBlocks, stateZero)
	if o.mu.mapFile != nil {
		o.mu.mapFile.forceFull()
	}
	if head != nil {
		// The grown tail of the old last block must read zeros, not the
		// base: the block's head comes in and the block is ours.
		if err := o.mu.data.WriteAt(context.Background(), head, last*BlockSizeBytes, 0); err != nil {
			return err
		}
		o.mu.states.set(last, stateData)
	}
	o.gen.Add(1)
	// The size is in the map: make it durable now, so a reopened overlay
	// never disagrees with its data volume.
	return o.persistLocked(context.Background())
}

// Close implements Volume: it closes the data volume and the map (without
// flushing; Flush first for durability). The base is not closed.
func (o *Overlay) Close() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.mu.closed {
		return nil
	}
	o.mu.closed = true
	err := o.mu.data.Close()
	if o.mu.mapFile != nil {
		err = errors.Join(err, o.mu.mapFile.close())
	}
	return err
}

// TryReadAt implements blockdev.TryReader: it reads p without waiting for
// a disk when every layer it touches can (FileVolume's page-cache read),
// and reports false, as the interface allows, when any of them cannot.
func (o *Overlay) TryReadAt(ctx context.Context, p []byte, off int64) (bool, error) {
	o.mu.RLock()
	defer o.mu.RUnlock()
	if err := o.beginLocked(ctx, off, int64(len(p)), false); err != nil {
		return false, err
	}
	end := off + int64(len(p))
	for pos := off; pos < end; {
		b := pos / BlockSizeBytes
		s, n := o.mu.states.run(b, blocksOf(end))
		next := min((b+n)*BlockSizeBytes, end)
		chunk := p[pos-off : next-off]
		var dev blockdev.Device
		switch s {
		case stateZero:
			clear(chunk)
			pos = next
			continue
		case stateData:
			dev = o.mu.data
		default:
			dev = o.mu.base
			if dev == nil || pos >= dev.Size() {
				clear(chunk)
				pos = next
				continue
			}
			if next > dev.Size() {
				clear(chunk[dev.Size()-pos:])
				chunk = chunk[:dev.Size()-pos]
			}
		}
		tr, ok := dev.(blockdev.TryReader)
		if !ok {
			return false, nil
		}
		if done, err := tr.TryReadAt(ctx, chunk, pos); !done || err != nil {
			return done, err
		}
		pos = next
	}
	return true, nil
}
