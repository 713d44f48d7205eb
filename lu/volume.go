// Package lu is one node's storage: a pool of data directories (one per
// disk) and the thin LU volumes in them. It knows nothing of the network or
// the cluster; the NBD engine serves its volumes through the blockdev
// interfaces.
//
// # Volumes
//
// A [FileVolume] is a sparse file <dir>/<name>.lu. The file system allocates
// a block on the first write to it; Trim punches holes
// (FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE) for the whole 4 KiB blocks
// inside the range and leaves partial blocks alone; WriteZeroes punches too
// (partial edge blocks are zeroed in place) unless NoHole asks for the range
// to stay allocated, then it uses FALLOC_FL_ZERO_RANGE or writes zeros;
// Extents come from SEEK_DATA/SEEK_HOLE; AllocatedBytes from st_blocks.
// Creating or deleting a volume costs a few system calls whatever its size.
//
// A [MemVolume] keeps 4 KiB pages in memory, allocated on first write and
// freed by Trim, with exactly the same trim and zero semantics.
//
// # Overlays
//
// An [Overlay] holds only what was written over a read-only base (an
// imported image volume, or a frozen overlay: a snapshot). Its data volume
// (a sparse FileVolume, like any LU) has the overlay's size; its map keeps
// 2 bits per 4 KiB block:
//
//	0 base  the block reads from the base (zeros without one or past its end)
//	1 data  written here: it reads from the data volume
//	2 zero  trimmed or zeroed here: it reads zeros whatever the base holds
//
// A write to blocks already "data" goes straight to the data volume (one
// atomic load per block, no lock beyond the volume's own). Any other write
// takes the blocks' stripe locks, completes a partial edge block from what
// it reads now (copy on write), writes, then marks the blocks "data". Trim
// marks its whole blocks "zero" first, then frees them in the data volume;
// WriteZeroes does the same (NoHole zeroes them in place and marks them
// "data"). Extents report "data" blocks as data, "zero" blocks as zero
// but allocated (they hide the base, like a zero cluster of a qcow2
// overlay: whoever skips holes, a copy's rebuild, must still carry them),
// and "base" blocks with the base's own extents. A chain
// of overlays is at most [MaxChainDepth] deep.
//
// Snapshot freezes the current layer (drains in-flight calls, flushes)
// and puts a new empty layer on top; Rollback empties the top layer and
// reads from an older layer; MergeBase folds the base layer into the
// overlay and links past it; Flatten merges every layer and copies the
// image's data blocks in, while writes go on, then cuts the link.
//
// The map lives in two slot files, <map>.0 and <map>.1, written in turn.
// A slot is a header page and state pages of 16336 blocks each (byte
// widths; little endian; part of the on-disk format; the byte offsets are
// in overlaymap.go):
//
//	header page, 4096 bytes:
//	+--------+-------+-------+-------+------------+-----------+---------+----------+--------+---------+
//	| magic  |version| flags | block | generation | size      | name len| basename | crc32c | ignored |
//	| 8      | 2 (1) | 2     | 4     | 8          | 8 (bytes) | 2 (<256)| L        | 4      |         |
//	+--------+-------+-------+-------+------------+-----------+---------+----------+--------+---------+
//	state page i, 4096 bytes, at 4096*(i+1):
//	+-----------------+------------------------------------------+--------+
//	| page generation | states of blocks [16336*i, 16336*(i+1))  | crc32c |
//	| 8 (<= header's) | 4084: 2 bits each, 4 blocks per byte     | 4      |
//	+-----------------+------------------------------------------+--------+
//	magic "LUPOVMAP"; flags bit 0 = frozen snapshot; block = 4096; each
//	CRC-32C (Castagnoli) covers its part before it; state 3 and states
//	past the last block are invalid.
//
// A map write goes to the older slot: the state pages changed since that
// slot was last written, synced, then its header with the next generation,
// synced. On open the valid slot with the higher generation wins; a slot
// that fails any check (a checksum, a state, a page newer than its header:
// a write cut before its header) is never used, and when neither is valid
// the overlay does not open (ErrCorruptMap). A map write costs the pages
// changed, 4 KiB per 64 MiB of volume touched, whatever the clone's size;
// a Flush after overwrites only writes no map.
//
// Crash rules. The map on disk changes only in Flush (and in WriteAt,
// Trim or WriteZeroes carrying FUA that changed a block's state, and in
// Snapshot, Rollback, MergeBase and Flatten, which end with one): the map
// is encoded first, then the data volume is flushed, then the map is
// written to the other slot and synced. A block is marked "data" only
// after its data reached the data volume, so a durable map never points
// at data that is not durable. After a node crash every block reads what
// it held at the last completed Flush, or what a later (unflushed) write,
// trim or zeroing put there: an unflushed change to "zero" may come back
// as the old data, an unflushed first write as the base's data.
//
// # Durability
//
// FileVolume: a WriteAt, Trim or WriteZeroes that returns nil has reached
// the kernel page cache: every later read sees it, a process crash keeps
// it, a node crash (power loss, kernel panic) may lose it. It is on disk
// when the call carried blockdev.FUA (the write uses pwritev2 with
// RWF_DSYNC, or pwrite then fdatasync; Trim and WriteZeroes are followed by
// fdatasync) or once a later Flush (fdatasync of the file) has returned nil.
// A Resize is on disk after the next Flush. A freshly created volume's
// directory entry is synced by Pool.Create before it returns.
//
// MemVolume: nothing survives the process. Caps report Volatile; Flush and
// FUA only order (every completed write is already visible to every reader)
// and always succeed.
//
// # Full disk
//
// A write the file system refuses with ENOSPC returns an error matching both
// blockdev.ErrNoSpace and syscall.ENOSPC. Part of that one write may have
// landed (the blockdev contract allows it); everything acknowledged before
// is intact, the volume stays usable, and writes succeed again once Trim or
// a deleted LU frees space. Other failures of the file system come back
// matching blockdev.ErrIO and the original errno.
//
// # Concurrency
//
// Every method may be called from many goroutines. The data path of a
// FileVolume takes a read lock of its own volume and makes one system call
// for a read or a write: non-overlapping I/O runs in parallel, and there is
// no pool-wide lock and no metadata write on the data path of an allocated
// block. Resize and Close take the volume's write lock and wait for I/O in
// flight.
package lu

import (
	"errors"
	"fmt"
	"github.com/lupool/lupool/internal/rules"
	"syscall"

	"github.com/lupool/lupool/blockdev"
)

// Kind says where a volume keeps its data.
type Kind string

// Volume kinds.
const (
	// KindFile volumes are sparse files in a pool data directory.
	KindFile Kind = "file"
	// KindMemory volumes live in memory and vanish with the process.
	KindMemory Kind = "memory"
)

// BlockSizeBytes is the allocation unit of every volume: the unit Trim frees
// and MemVolume allocates (rules.BlockBytes).
const BlockSizeBytes = rules.BlockBytes

// maxExtentsPerCall bounds one Extents call; the caller asks again for the
// rest.
const maxExtentsPerCall = 1024

// Volume is what the pool hands out; FileVolume and MemVolume implement it.
type Volume interface {
	blockdev.Device
	blockdev.Trimmer
	blockdev.Zeroer
	blockdev.Extenter
	// Kind says where the volume keeps its data.
	Kind() Kind
	// AllocatedBytes is the space the data really holds: st_blocks for a
	// FileVolume, pages held for a MemVolume.
	AllocatedBytes() int64
	// Resize grows the volume online, or shrinks it when the cut tail holds
	// no allocated block (else ErrShrinkAllocated).
	Resize(sizeBytes int64) error
	// Close releases the volume; later calls return blockdev.ErrShutdown.
	Close() error
}

// Sentinel errors.
var (
	// ErrShrinkAllocated is returned by Resize when the tail that a shrink
	// would cut off holds allocated data; trim it first.
	ErrShrinkAllocated = errors.New("lu: shrink would cut off allocated data")
	// ErrExists is returned by Pool.Create when the name is taken.
	ErrExists = errors.New("lu: volume already exists")
	// ErrNotFound is returned by Pool.Resize and Pool.Delete for an unknown
	// name.
	ErrNotFound = errors.New("lu: no such volume")
	// ErrInvalidName is returned by Pool.Create for a name that is not 1-128
	// characters of [A-Za-z0-9._-], or is "." or "..".
	ErrInvalidName = errors.New("lu: invalid volume name")
	// ErrOvercommit is returned by Pool.Create and Pool.Resize when the
	// provisioned file-volume bytes would exceed OvercommitRatio times the
	// capacity; the message names the numbers.
	ErrOvercommit = errors.New("lu: pool overcommit limit reached")
	// ErrMemoryBudget is returned by Reserve, Create and Resize when the
	// memory volumes' sizes would exceed the pool's MemoryLimitBytes.
	ErrMemoryBudget = errors.New("lu: memory budget of the node reached")
	// ErrInvalidSize is returned for a negative volume size.
	ErrInvalidSize = errors.New("lu: invalid volume size")
	// ErrPoolClosed is returned by every Pool call after Close.
	ErrPoolClosed = errors.New("lu: pool closed")
)

// ioError maps an error of the file system to the blockdev sentinels,
// keeping the original (errno) in the chain.
// Its nil fast path is inlined on the data path.
func ioError(op, path string, err error) error {
	if err == nil {
		return nil
	}
	return mapIOError(op, path, err)
}

func mapIOError(op, path string, err error) error {
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return fmt.Errorf("lu: %s %s: %w: %w", op, path, blockdev.ErrNoSpace, err)
	}
	return fmt.Errorf("lu: %s %s: %w: %w", op, path, blockdev.ErrIO, err)
}

func alignUp(x int64) int64   { return (x + BlockSizeBytes - 1) / BlockSizeBytes * BlockSizeBytes }
func alignDown(x int64) int64 { return x / BlockSizeBytes * BlockSizeBytes }

// wholeBlocks returns the whole-block span inside [off, off+length) of a
// device of size bytes: a range that ends at the device's end also covers
// the partial last block.
func wholeBlocks(off, length, size int64) (start, end int64) {
	start, end = alignUp(off), alignDown(off+length)
	if off+length == size {
		end = alignUp(size)
	}
	return start, end
}
