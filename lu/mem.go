package lu

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/lupool/lupool/blockdev"
)

// memShardCount spreads the page directory over this many independently
// locked shards so that I/O on different chunks runs in parallel.
const memShardCount = 64

// memChunkPages consecutive pages make one chunk, the unit of the page
// directory: an array of page pointers allocated with the chunk's first page
// and freed with its last. Finding a page takes one lookup in a small map of
// chunks, which stays in the CPU cache, and an array index; a map holding
// every page missed the cache on most random accesses. A chunk costs 512
// bytes, at most an eighth of a page per held page (one page alone in its
// chunk) and 1/512 of the data when the chunk is full.
const memChunkPages = 64

type memPage [BlockSizeBytes]byte

// memBudget caps the pages that all memory volumes of a pool may hold, so
// that a full pool fails writes with ENOSPC instead of the process running
// out of memory. A nil *memBudget is unlimited.
type memBudget struct {
	limitPages int64        // immutable
	usedPages  atomic.Int64 // pages held by every volume sharing the budget
}

// take reserves one page; false when the budget is spent.
func (b *memBudget) take() bool {
	if b == nil {
		return true
	}
	if b.usedPages.Add(1) > b.limitPages {
		b.usedPages.Add(-1)
		return false
	}
	return true
}

func (b *memBudget) give(pages int64) {
	if b != nil {
		b.usedPages.Add(-pages)
	}
}

// errMemoryFull is wrapped by writes refused by the memory budget.
func errMemoryFull(op string) error {
	return fmt.Errorf("lu: memory volume %s: memory limit of the pool reached: %w: %w",
		op, blockdev.ErrNoSpace, syscall.ENOSPC)
}

// memChunk holds the pages of one chunk; nil entries are holes.
type memChunk struct {
	pages [memChunkPages]*memPage
	held  int // non-nil entries in pages; never 0 in a shard's map
}

type memShard struct {
	mu sync.Mutex
	// chunks maps a chunk index (page index / memChunkPages) to its pages.
	// Guarded by mu, as are the pages' contents.
	chunks map[int64]*memChunk
}

// lookupLocked returns page index, or nil for a hole. s.mu must be held.
func (s *memShard) lookupLocked(index int64) *memPage {
	if ch := s.chunks[index/memChunkPages]; ch != nil {
		return ch.pages[index%memChunkPages]
	}
	return nil
}

// forEachLocked calls fn for every held page with first <= index < end.
// fn may drop the page it is given. s.mu must be held.
func (s *memShard) forEachLocked(first, end int64, fn func(index int64)) {
	for ci, ch := range s.chunks {
		base := ci * memChunkPages
		if base >= end || base+memChunkPages <= first {
			continue
		}
		for i := range ch.pages {
			if index := base + int64(i); ch.pages[i] != nil && index >= first && index < end {
				fn(index)
			}
		}
	}
}

// MemVolume is a sparse in-memory volume: 4 KiB pages are allocated on the
// first write that touches them and freed by Trim and WriteZeroes. Its
// trim, zero and allocation semantics are those of FileVolume (and of
// blockdevtest.Mem). Nothing survives the process; see the package doc.
// Volumes made by a Pool with MemoryLimitBytes share that budget: a write
// that needs a page beyond it fails with blockdev.ErrNoSpace and
// syscall.ENOSPC, exactly like a full disk.
type MemVolume struct {
	// size changes only with mu held for writing.
	size      atomic.Int64
	heldPages atomic.Int64 // pages allocated in all shards
	budget    *memBudget   // immutable; nil means unlimited

	shards [memShardCount]memShard

	// mu is held for reading by every data-path call and for writing by
	// Resize and Close.
	mu struct {
		sync.RWMutex
		closed bool // guarded by mu
	}
}

var (
	_ Volume             = (*MemVolume)(nil)
	_ blockdev.Device    = (*MemVolume)(nil)
	_ blockdev.Trimmer   = (*MemVolume)(nil)
	_ blockdev.Zeroer    = (*MemVolume)(nil)
	_ blockdev.Extenter  = (*MemVolume)(nil)
	_ blockdev.TryReader = (*MemVolume)(nil)
)

// NewMemVolume returns an empty (all holes) memory volume of sizeBytes,
// with no memory limit. A negative size is treated as 0.
func NewMemVolume(sizeBytes int64) *MemVolume { return newMemVolume(sizeBytes, nil) }

func newMemVolume(sizeBytes int64, budget *memBudget) *MemVolume {
	v := &MemVolume{budget: budget}
	v.size.Store(max(0, sizeBytes))
	for i := range v.shards {
		v.shards[i].chunks = map[int64]*memChunk{}
	}
	return v
}

// shard returns the shard of page index's chunk.
func (v *MemVolume) shard(index int64) *memShard {
	return &v.shards[(index/memChunkPages)%memShardCount]
}

// Kind implements Volume.
func (v *MemVolume) Kind() Kind { return KindMemory }

// Size implements blockdev.Device.
func (v *MemVolume) Size() int64 { return v.size.Load() }

// Caps implements blockdev.Device.
func (v *MemVolume) Caps() blockdev.Caps {
	return blockdev.Caps{MultiConn: true, Volatile: true, BlockSizeBytes: BlockSizeBytes}
}

// InlineIO reports that ReadAt, WriteAt and Flush never block: they copy
// memory under short locks (a Resize or Close in progress is the only
// wait). Front ends may run them on the goroutine that received the request
// (server/nbd.InlineDevice).
func (v *MemVolume) InlineIO() bool { return true }

// AllocatedBytes implements Volume: the pages held.
func (v *MemVolume) AllocatedBytes() int64 { return v.heldPages.Load() * BlockSizeBytes }

func (v *MemVolume) beginLocked(ctx context.Context, off, length int64) error {
	if v.mu.closed {
		return blockdev.ErrShutdown
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	return blockdev.CheckRange(off, length, v.size.Load())
}

// forChunks calls fn for each piece of [off, off+length) inside one page.
func forChunks(off, length int64, fn func(index, in, chunk, done int64)) {
	for done := int64(0); done < length; {
		pos := off + done
		in := pos % BlockSizeBytes
		chunk := min(length-done, BlockSizeBytes-in)
		fn(pos/BlockSizeBytes, in, chunk, done)
		done += chunk
	}
}

// ReadAt implements blockdev.Device.
func (v *MemVolume) ReadAt(ctx context.Context, p []byte, off int64) error {
	v.mu.RLock()
	defer v.mu.RUnlock()
	if err := v.beginLocked(ctx, off, int64(len(p))); err != nil {
		return err
	}
	forChunks(off, int64(len(p)), func(index, in, chunk, done int64) {
		s := v.shard(index)
		s.mu.Lock()
		if pg := s.lookupLocked(index); pg != nil {
			copy(p[done:done+chunk], pg[in:])
		} else {
			clear(p[done : done+chunk])
		}
		s.mu.Unlock()
	})
	return nil
}

// TryReadAt implements blockdev.TryReader: a memory volume never waits, so
// it is ReadAt. (Front ends that run writes inline only on a TryReader
// whose reads are tried see a memory volume as such a device too.)
func (v *MemVolume) TryReadAt(ctx context.Context, p []byte, off int64) (bool, error) {
	if err := v.ReadAt(ctx, p, off); err != nil {
		return false, err
	}
	return true, nil
}

// pageLocked returns page index, allocating it; nil when the memory
// budget is spent. s.mu must be held.
func (v *MemVolume) pageLocked(s *memShard, index int64) *memPage {
	ci, i := index/memChunkPages, index%memChunkPages
	ch := s.chunks[ci]
	if ch != nil && ch.pages[i] != nil {
		return ch.pages[i]
	}
	if !v.budget.take() {
		return nil
	}
	if ch == nil {
		ch = new(memChunk)
		s.chunks[ci] = ch
	}
	pg := new(memPage)
	ch.pages[i] = pg
	ch.held++
	v.heldPages.Add(1)
	return pg
}

// dropLocked frees page index if held, and its chunk with its last page.
// s.mu must be held.
func (v *MemVolume) dropLocked(s *memShard, index int64) {
	ci, i := index/memChunkPages, index%memChunkPages
	ch := s.chunks[ci]
	if ch == nil || ch.pages[i] == nil {
		return
	}
	ch.pages[i] = nil
	ch.held--
	if ch.held == 0 {
		delete(s.chunks, ci)
	}
	v.heldPages.Add(-1)
	v.budget.give(1)
}

// WriteAt implements blockdev.Device. FUA only orders.
func (v *MemVolume) WriteAt(ctx context.Context, p []byte, off int64, flags blockdev.Flags) error {
	if err := blockdev.CheckFlags(flags, blockdev.FUA); err != nil {
		return err
	}
	v.mu.RLock()
	defer v.mu.RUnlock()
	if err := v.beginLocked(ctx, off, int64(len(p))); err != nil {
		return err
	}
	full := false
	forChunks(off, int64(len(p)), func(index, in, chunk, done int64) {
		if full {
			return
		}
		s := v.shard(index)
		s.mu.Lock()
		if pg := v.pageLocked(s, index); pg != nil {
			copy(pg[in:in+chunk], p[done:])
		} else {
			full = true
		}
		s.mu.Unlock()
	})
	if full {
		return errMemoryFull("write")
	}
	return nil
}

// Flush implements blockdev.Device: a memory volume has nothing to make
// durable; it only checks that the volume is open.
func (v *MemVolume) Flush(ctx context.Context) error {
	v.mu.RLock()
	defer v.mu.RUnlock()
	return v.beginLocked(ctx, 0, 0)
}

// Trim implements blockdev.Trimmer: the whole pages inside the range are
// freed; partial pages keep their data.
func (v *MemVolume) Trim(ctx context.Context, off, length int64, flags blockdev.Flags) error {
	if err := blockdev.CheckFlags(flags, blockdev.FUA); err != nil {
		return err
	}
	v.mu.RLock()
	defer v.mu.RUnlock()
	if err := v.beginLocked(ctx, off, length); err != nil {
		return err
	}
	start, end := wholeBlocks(off, length, v.size.Load())
	v.freePages(start/BlockSizeBytes, end/BlockSizeBytes)
	return nil
}

// freePages frees the pages with first <= index < end, visiting either the
// indexes or the held pages, whichever is fewer.
func (v *MemVolume) freePages(first, end int64) {
	if end <= first {
		return
	}
	if end-first <= max(64, v.heldPages.Load()) {
		for i := first; i < end; i++ {
			s := v.shard(i)
			s.mu.Lock()
			v.dropLocked(s, i)
			s.mu.Unlock()
		}
		return
	}
	for i := range v.shards {
		s := &v.shards[i]
		s.mu.Lock()
		s.forEachLocked(first, end, func(index int64) { v.dropLocked(s, index) })
		s.mu.Unlock()
	}
}

// zeroHeld zeroes [off, off+length) in the pages that are held, leaving
// holes alone. The range is expected to be small (partial edge blocks).
func (v *MemVolume) zeroHeld(off, length int64) {
	forChunks(off, length, func(index, in, chunk, _ int64) {
		s := v.shard(index)
		s.mu.Lock()
		if pg := s.lookupLocked(index); pg != nil {
			clear(pg[in : in+chunk])
		}
		s.mu.Unlock()
	})
}

// WriteZeroes implements blockdev.Zeroer. Without NoHole the whole pages
// inside the range are freed and the partial edge pages zeroed; with NoHole
// every page touched is allocated and zeroed. Zeroing memory is always
// fast, so FastZero never fails.
func (v *MemVolume) WriteZeroes(ctx context.Context, off, length int64, flags blockdev.Flags) error {
	if err := blockdev.CheckFlags(flags, blockdev.AllFlags); err != nil {
		return err
	}
	v.mu.RLock()
	defer v.mu.RUnlock()
	if err := v.beginLocked(ctx, off, length); err != nil {
		return err
	}
	if flags&blockdev.NoHole != 0 {
		full := false
		forChunks(off, length, func(index, in, chunk, _ int64) {
			if full {
				return
			}
			s := v.shard(index)
			s.mu.Lock()
			if pg := v.pageLocked(s, index); pg != nil {
				clear(pg[in : in+chunk])
			} else {
				full = true
			}
			s.mu.Unlock()
		})
		if full {
			return errMemoryFull("write zeroes")
		}
		return nil
	}
	end := off + length
	start, wholeEnd := wholeBlocks(off, length, v.size.Load())
	if wholeEnd <= start {
		v.zeroHeld(off, length)
		return nil
	}
	v.zeroHeld(off, start-off)
	v.freePages(start/BlockSizeBytes, wholeEnd/BlockSizeBytes)
	if wholeEnd < end {
		v.zeroHeld(wholeEnd, end-wholeEnd)
	}
	return nil
}

// heldIndexes returns the sorted indexes of held pages with first <= index
// < end.
func (v *MemVolume) heldIndexes(first, end int64) []int64 {
	var out []int64
	for i := range v.shards {
		s := &v.shards[i]
		s.mu.Lock()
		s.forEachLocked(first, end, func(index int64) { out = append(out, index) })
		s.mu.Unlock()
	}
	sort.Slice(out, func(a, b int) bool { return out[a] < out[b] })
	return out
}

func (v *MemVolume) held(index int64) bool {
	s := v.shard(index)
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lookupLocked(index) != nil
}

// Extents implements blockdev.Extenter: held pages are data (0), the rest
// holes (ExtentHole|ExtentZero).
func (v *MemVolume) Extents(ctx context.Context, off, length int64, dst []blockdev.Extent) ([]blockdev.Extent, error) {
	v.mu.RLock()
	defer v.mu.RUnlock()
	if err := v.beginLocked(ctx, off, length); err != nil {
		return dst, err
	}
	if length == 0 {
		return dst, nil
	}
	end := off + length
	first, last := off/BlockSizeBytes, (end-1)/BlockSizeBytes
	const hole = blockdev.ExtentHole | blockdev.ExtentZero
	if last-first < max(256, 4*v.heldPages.Load()) {
		for i := first; i <= last; i++ {
			from, to := max(off, i*BlockSizeBytes), min(end, (i+1)*BlockSizeBytes)
			var f blockdev.ExtentFlags = hole
			if v.held(i) {
				f = 0
			}
			dst = appendExtent(dst, to-from, f)
		}
		return dst, nil
	}
	pos := off
	for _, i := range v.heldIndexes(first, last+1) {
		from, to := max(off, i*BlockSizeBytes), min(end, (i+1)*BlockSizeBytes)
		if from > pos {
			dst = appendExtent(dst, from-pos, hole)
		}
		dst = appendExtent(dst, to-from, 0)
		pos = to
	}
	if pos < end {
		dst = appendExtent(dst, end-pos, hole)
	}
	return dst, nil
}

// Resize implements Volume.
func (v *MemVolume) Resize(sizeBytes int64) error {
	if sizeBytes < 0 {
		return fmt.Errorf("%w: %d bytes", ErrInvalidSize, sizeBytes)
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.mu.closed {
		return blockdev.ErrShutdown
	}
	old := v.size.Load()
	if sizeBytes < old {
		first, end := sizeBytes/BlockSizeBytes, (old+BlockSizeBytes-1)/BlockSizeBytes
		if held := v.heldIndexes(first, end); len(held) > 0 {
			return fmt.Errorf("%w: memory volume: shrinking from %d to %d bytes, data at offset %d",
				ErrShrinkAllocated, old, sizeBytes, max(sizeBytes, held[0]*BlockSizeBytes))
		}
	}
	v.size.Store(sizeBytes)
	return nil
}

// Close implements Volume: the pages are dropped.
func (v *MemVolume) Close() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.mu.closed {
		return nil
	}
	v.mu.closed = true
	for i := range v.shards {
		s := &v.shards[i]
		s.mu.Lock()
		held := int64(0)
		for _, ch := range s.chunks {
			held += int64(ch.held)
		}
		v.heldPages.Add(-held)
		v.budget.give(held)
		s.chunks = map[int64]*memChunk{}
		s.mu.Unlock()
	}
	return nil
}
