package lu

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/lu/lufs"
)

// zeroChunkBytes is the largest zero buffer WriteZeroes writes at once when
// the file system cannot zero a range by itself.
const zeroChunkBytes = 256 << 10

// maxWriteChunkBytes bounds one buffered (non-FUA) write system call.
//
// Linux file systems with large folios (ext4 and XFS on 6.x kernels) size a
// page-cache folio by the write that creates it, and a later small write
// into a folio walks every block of it: on this project's test machine
// (ext4, 6.18) a 4 KiB overwrite cost 7 us of CPU inside a region laid down
// by 1 MiB writes, 2.0 us after 64 KiB writes and 1.6 us after 4 KiB
// writes, while writing 1 GiB sequentially took the same time in 64 KiB
// pieces as in 1 MiB ones. Paging traffic is 4 KiB overwrites of regions
// that image copies and sequential writers laid down in large requests, so
// large writes go to the file in 64 KiB pieces.
// BenchmarkOverwrite4KAfterLargeWrites measures it. A range already all in
// the page cache keeps the folios it has whatever the size of the write,
// so a large write over one (lufs.CacheChecker) goes in one system call:
// 16 pwrites of 64 KiB cost about a quarter more CPU than one of 1 MiB.
const maxWriteChunkBytes = 64 << 10

// FileVolume is a thin volume backed by a sparse file. See the package doc.
type FileVolume struct {
	path string    // immutable
	f    lufs.File // immutable; closed by Close

	// over is set once, when the volume's first snapshot froze its file
	// (Pool.Snapshot): from then on the volume is an Overlay over that
	// snapshot, and every call goes to it. The file f is the snapshot's
	// now (renamed), no longer written through v.
	over atomic.Pointer[Overlay]

	// size mirrors the file size for lock-free Size calls. It changes only
	// with mu held for writing.
	size atomic.Int64

	// mu is held for reading by every data-path call and for writing by
	// Resize and Close.
	mu struct {
		sync.RWMutex
		closed bool // guarded by mu
	}
}

var (
	_ Volume             = (*FileVolume)(nil)
	_ blockdev.Device    = (*FileVolume)(nil)
	_ blockdev.Trimmer   = (*FileVolume)(nil)
	_ blockdev.Zeroer    = (*FileVolume)(nil)
	_ blockdev.Extenter  = (*FileVolume)(nil)
	_ blockdev.TryReader = (*FileVolume)(nil)
)

// CreateFile creates a new sparse-file volume of sizeBytes at path on the OS
// file system (a convenience for tests of other packages). It fails if path
// exists.
func CreateFile(path string, sizeBytes int64) (*FileVolume, error) {
	return createFileVolume(lufs.OS(), path, sizeBytes)
}

// CreateFileFS is CreateFile on fs (tests of other packages use it with a
// lufs.FaultFS).
func CreateFileFS(fs lufs.FS, path string, sizeBytes int64) (*FileVolume, error) {
	return createFileVolume(fs, path, sizeBytes)
}

// OpenFile opens an existing sparse-file volume at path on the OS file
// system; its size is the file's size.
func OpenFile(path string) (*FileVolume, error) {
	return openFileVolume(lufs.OS(), path)
}

func createFileVolume(fs lufs.FS, path string, sizeBytes int64) (*FileVolume, error) {
	if sizeBytes < 0 {
		return nil, fmt.Errorf("%w: %d bytes", ErrInvalidSize, sizeBytes)
	}
	f, err := fs.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		if errors.Is(err, os.ErrExist) {
			return nil, fmt.Errorf("%w: %s: %w", ErrExists, path, err)
		}
		return nil, ioError("create", path, err)
	}
	// The size is metadata a crash could lose: sync it now so that a
	// created volume never comes back shorter.
	if err := f.Truncate(sizeBytes); err != nil {
		_ = f.Close()
		_ = fs.Remove(path)
		return nil, ioError("truncate", path, err)
	}
	if err := f.Sync(); err != nil {
		_ = f.Close()
		_ = fs.Remove(path)
		return nil, ioError("sync", path, err)
	}
	v := &FileVolume{path: path, f: f}
	v.size.Store(sizeBytes)
	return v, nil
}

func openFileVolume(fs lufs.FS, path string) (*FileVolume, error) {
	f, err := fs.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, ioError("open", path, err)
	}
	size, err := f.Size()
	if err != nil {
		_ = f.Close()
		return nil, ioError("stat", path, err)
	}
	v := &FileVolume{path: path, f: f}
	v.size.Store(size)
	return v, nil
}

// Path returns the file's path.
func (v *FileVolume) Path() string { return v.path }

// Kind implements Volume.
func (v *FileVolume) Kind() Kind { return KindFile }

// Size implements blockdev.Device.
func (v *FileVolume) Size() int64 {
	if o := v.over.Load(); o != nil {
		return o.Size()
	}
	return v.size.Load()
}

// Caps implements blockdev.Device. A Flush (fdatasync) covers writes made
// through any handle to the file, so the volume is multi-conn safe.
func (v *FileVolume) Caps() blockdev.Caps {
	if o := v.over.Load(); o != nil {
		return o.Caps()
	}
	return blockdev.Caps{MultiConn: true, BlockSizeBytes: BlockSizeBytes}
}

// begin checks the call under the read lock: v.mu must be read-locked.
func (v *FileVolume) beginLocked(ctx context.Context, off, length int64) error {
	if v.mu.closed {
		return blockdev.ErrShutdown
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	return blockdev.CheckRange(off, length, v.size.Load())
}

// ReadAt implements blockdev.Device; holes read as zeros.
func (v *FileVolume) ReadAt(ctx context.Context, p []byte, off int64) error {
	if o := v.over.Load(); o != nil {
		return o.ReadAt(ctx, p, off)
	}
	v.mu.RLock()
	defer v.mu.RUnlock()
	if err := v.beginLocked(ctx, off, int64(len(p))); err != nil {
		return err
	}
	n, err := v.f.ReadAt(p, off)
	if err == io.EOF {
		// The file is shorter than the volume (never after our own Truncate,
		// but possible after a crash): the missing tail reads as zeros.
		clear(p[n:])
		err = nil
	}
	return ioError("read", v.path, err)
}

// TryReadAt implements blockdev.TryReader: it reads p without waiting for
// the disk (lufs.NoWaitReader: preadv2 with RWF_NOWAIT) and reports false
// when some of the data is not in the page cache, or when the file system
// cannot read without waiting.
func (v *FileVolume) TryReadAt(ctx context.Context, p []byte, off int64) (bool, error) {
	if o := v.over.Load(); o != nil {
		return o.TryReadAt(ctx, p, off)
	}
	nw, ok := v.f.(lufs.NoWaitReader)
	if !ok {
		return false, nil
	}
	v.mu.RLock()
	defer v.mu.RUnlock()
	if err := v.beginLocked(ctx, off, int64(len(p))); err != nil {
		return false, err
	}
	n, err := nw.ReadAtNoWait(p, off)
	switch {
	case errors.Is(err, lufs.ErrWouldBlock):
		return false, nil
	case err == io.EOF:
		clear(p[n:]) // as in ReadAt: a short file reads as zeros
		return true, nil
	case err != nil:
		return false, ioError("read", v.path, err)
	}
	return true, nil
}

// InlineIO reports true: a write of whole blocks without FUA only copies
// into the page cache, so a front end may run it on the goroutine that
// reads requests (server/nbd.InlineDevice). Such a write still waits when
// the kernel throttles dirty pages, as every writer of the file system
// does then. Reads and flushes may wait for the disk: the volume is a
// blockdev.TryReader, on which the NBD engine tries reads and runs
// flushes, FUA writes and partial blocks on other goroutines. Once a
// snapshot made the volume an overlay (copy on write of partial blocks)
// it reports false.
func (v *FileVolume) InlineIO() bool {
	if o := v.over.Load(); o != nil {
		return false
	}
	return true
}

// WriteAt implements blockdev.Device. FUA makes the write durable before it
// returns.
func (v *FileVolume) WriteAt(ctx context.Context, p []byte, off int64, flags blockdev.Flags) error {
	if o := v.over.Load(); o != nil {
		return o.WriteAt(ctx, p, off, flags)
	}
	if err := blockdev.CheckFlags(flags, blockdev.FUA); err != nil {
		return err
	}
	v.mu.RLock()
	defer v.mu.RUnlock()
	if err := v.beginLocked(ctx, off, int64(len(p))); err != nil {
		return err
	}
	var err error
	if flags&blockdev.FUA != 0 {
		// One system call, so that one RWF_DSYNC covers all of it.
		_, err = v.f.WriteAtSync(p, off)
	} else {
		err = v.writeChunked(p, off)
	}
	return ioError("write", v.path, err)
}

// writeChunked writes p at off in pieces of at most maxWriteChunkBytes,
// stopping at the first error, or in one piece when its range is all in
// the page cache.
func (v *FileVolume) writeChunked(p []byte, off int64) error {
	if len(p) > maxWriteChunkBytes {
		if cc, ok := v.f.(lufs.CacheChecker); ok && cc.Cached(off, int64(len(p))) {
			_, err := v.f.WriteAt(p, off)
			return err
		}
	}
	for len(p) > 0 {
		n := min(len(p), maxWriteChunkBytes)
		if _, err := v.f.WriteAt(p[:n], off); err != nil {
			return err
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

// Flush implements blockdev.Device with fdatasync.
func (v *FileVolume) Flush(ctx context.Context) error {
	if o := v.over.Load(); o != nil {
		return o.Flush(ctx)
	}
	v.mu.RLock()
	defer v.mu.RUnlock()
	if err := v.beginLocked(ctx, 0, 0); err != nil {
		return err
	}
	return ioError("flush", v.path, v.f.Sync())
}

// Trim implements blockdev.Trimmer: it punches the whole blocks inside the
// range and leaves partial blocks alone. A file system without hole
// punching makes it a successful no-op (the data simply stays).
func (v *FileVolume) Trim(ctx context.Context, off, length int64, flags blockdev.Flags) error {
	if o := v.over.Load(); o != nil {
		return o.Trim(ctx, off, length, flags)
	}
	if err := blockdev.CheckFlags(flags, blockdev.FUA); err != nil {
		return err
	}
	v.mu.RLock()
	defer v.mu.RUnlock()
	if err := v.beginLocked(ctx, off, length); err != nil {
		return err
	}
	start, end := wholeBlocks(off, length, v.size.Load())
	if end <= start {
		return nil
	}
	if err := v.f.PunchHole(start, end-start); err != nil {
		if errors.Is(err, lufs.ErrNotSupported) {
			return nil
		}
		return ioError("trim", v.path, err)
	}
	return v.syncIf(flags)
}

func (v *FileVolume) syncIf(flags blockdev.Flags) error {
	if flags&blockdev.FUA == 0 {
		return nil
	}
	return ioError("sync", v.path, v.f.Sync())
}

// WriteZeroes implements blockdev.Zeroer. Without NoHole it punches the
// range (whole blocks are freed, partial edge blocks zeroed in place); with
// NoHole it asks the file system to zero the range allocated
// (FALLOC_FL_ZERO_RANGE). Where the file system can do neither it writes
// zero buffers, unless FastZero asks for ErrNotSupported instead.
func (v *FileVolume) WriteZeroes(ctx context.Context, off, length int64, flags blockdev.Flags) error {
	if o := v.over.Load(); o != nil {
		return o.WriteZeroes(ctx, off, length, flags)
	}
	if err := blockdev.CheckFlags(flags, blockdev.AllFlags); err != nil {
		return err
	}
	v.mu.RLock()
	defer v.mu.RUnlock()
	if err := v.beginLocked(ctx, off, length); err != nil {
		return err
	}
	if length == 0 {
		return nil
	}
	var err error
	if flags&blockdev.NoHole != 0 {
		err = v.f.ZeroRange(off, length)
	} else {
		punchEnd := off + length
		if punchEnd == v.size.Load() {
			punchEnd = alignUp(punchEnd) // the partial last block is freed too
		}
		err = v.f.PunchHole(off, punchEnd-off)
	}
	if errors.Is(err, lufs.ErrNotSupported) {
		if flags&blockdev.FastZero != 0 {
			return fmt.Errorf("lu: write zeroes %s: %w", v.path, blockdev.ErrNotSupported)
		}
		err = v.writeZeroBuffers(off, length)
	}
	if err != nil {
		return ioError("write zeroes", v.path, err)
	}
	return v.syncIf(flags)
}

func (v *FileVolume) writeZeroBuffers(off, length int64) error {
	zeros := make([]byte, min(length, zeroChunkBytes))
	for done := int64(0); done < length; {
		chunk := min(length-done, int64(len(zeros)))
		if err := v.writeChunked(zeros[:chunk], off+done); err != nil {
			return err
		}
		done += chunk
	}
	return nil
}

// Extents implements blockdev.Extenter from SEEK_DATA and SEEK_HOLE. Holes
// are reported as ExtentHole|ExtentZero, data as 0.
func (v *FileVolume) Extents(ctx context.Context, off, length int64, dst []blockdev.Extent) ([]blockdev.Extent, error) {
	if o := v.over.Load(); o != nil {
		return o.Extents(ctx, off, length, dst)
	}
	v.mu.RLock()
	defer v.mu.RUnlock()
	if err := v.beginLocked(ctx, off, length); err != nil {
		return dst, err
	}
	end := off + length
	for pos, n := off, 0; pos < end && n < maxExtentsPerCall; n++ {
		data, err := v.f.SeekData(pos)
		if err == io.EOF {
			data = end
		} else if err != nil {
			return dst, ioError("seek data", v.path, err)
		}
		if data > pos {
			next := min(data, end)
			dst = appendExtent(dst, next-pos, blockdev.ExtentHole|blockdev.ExtentZero)
			pos = next
			continue
		}
		hole, err := v.f.SeekHole(pos)
		if err != nil {
			return dst, ioError("seek hole", v.path, err)
		}
		next := min(max(hole, pos+1), end)
		dst = appendExtent(dst, next-pos, 0)
		pos = next
	}
	return dst, nil
}

// appendExtent appends an extent, merging it with the last one when the
// flags match.
func appendExtent(dst []blockdev.Extent, length int64, flags blockdev.ExtentFlags) []blockdev.Extent {
	if n := len(dst); n > 0 && dst[n-1].Flags == flags {
		dst[n-1].LengthBytes += length
		return dst
	}
	return append(dst, blockdev.Extent{LengthBytes: length, Flags: flags})
}

// AllocatedBytes implements Volume from st_blocks; 0 if the file cannot be
// measured or the volume is closed.
func (v *FileVolume) AllocatedBytes() int64 {
	if o := v.over.Load(); o != nil {
		return o.AllocatedBytes()
	}
	v.mu.RLock()
	defer v.mu.RUnlock()
	if v.mu.closed {
		return 0
	}
	n, err := v.f.AllocatedBytes()
	if err != nil {
		return 0
	}
	return n
}

// Resize implements Volume. It waits for I/O in flight.
func (v *FileVolume) Resize(sizeBytes int64) error {
	if o := v.over.Load(); o != nil {
		return o.Resize(sizeBytes)
	}
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
		data, err := v.f.SeekData(sizeBytes)
		if err != nil && err != io.EOF {
			return ioError("seek data", v.path, err)
		}
		if err == nil && data < old {
			return fmt.Errorf("%w: %s: shrinking from %d to %d bytes, data at offset %d",
				ErrShrinkAllocated, v.path, old, sizeBytes, data)
		}
	}
	if err := v.f.Truncate(sizeBytes); err != nil {
		return ioError("resize", v.path, err)
	}
	v.size.Store(sizeBytes)
	return nil
}

// Close implements Volume. It waits for I/O in flight; later calls return
// blockdev.ErrShutdown. Close does not sync: Flush first for durability.
func (v *FileVolume) Close() error {
	if o := v.over.Load(); o != nil {
		return errors.Join(o.Close(), v.closeFile())
	}
	return v.closeFile()
}

// closeFile closes the volume's own file handle, once.
func (v *FileVolume) closeFile() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.mu.closed {
		return nil
	}
	v.mu.closed = true
	return ioError("close", v.path, v.f.Close())
}

// overlay returns the overlay a snapshot made of the volume, or nil.
func (v *FileVolume) overlay() *Overlay { return v.over.Load() }
