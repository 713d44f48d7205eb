// Package lufs is the file-system seam of package lu: every byte an LU volume
// reads or writes on a node's disks goes through an [FS] and its [File]s, so
// that tests can swap the operating system for a sparse in-memory twin
// ([MemFS]), inject faults ([FaultFS]) or simulate a crash that drops
// unsynced data ([MemFS.CrashClone]).
//
// The seam is modelled on pebble's vfs.FS, narrowed to what thin volumes
// need and widened with the three calls a thin volume cannot live without:
// punching holes, zeroing ranges and finding data and holes (SEEK_DATA and
// SEEK_HOLE).
//
// # Concurrency
//
// All methods of an FS may be called concurrently. ReadAt, WriteAt,
// WriteAtSync, PunchHole, ZeroRange, SeekData, SeekHole, Size, Sync and
// AllocatedBytes of one File may be called concurrently with each other
// (pread/pwrite semantics: there is no file offset). Truncate and Close must
// not run concurrently with other calls on the same File; the caller
// excludes them.
//
// # Durability
//
// WriteAt, PunchHole, ZeroRange and Truncate change the file's contents in
// the page cache only. Sync (fdatasync) makes every change that completed
// before it durable. WriteAtSync is WriteAt plus durability of the bytes it
// wrote (RWF_DSYNC). Creating or removing a file is durable once SyncDir of
// its directory returns.
package lufs

import (
	"errors"
	"io"
	"os"

	"github.com/lupool/lupool/internal/rules"
)

// BlockSizeBytes is the allocation granularity the twins use and the unit
// the lu package punches. Real file systems may use larger blocks.
const BlockSizeBytes = rules.BlockBytes

// Sentinel errors.
var (
	// ErrNotSupported is returned by PunchHole and ZeroRange when the file
	// system cannot do the operation (EOPNOTSUPP); the caller falls back.
	ErrNotSupported = errors.New("lufs: operation not supported by the file system")
	// ErrInjected is returned by FaultFS injectors built by this package.
	ErrInjected = errors.New("lufs: injected error")
	// ErrWouldBlock is returned by NoWaitReader.ReadAtNoWait when the read
	// would have to wait for the storage device (data not in the page
	// cache), and by FaultFS injectors for such reads instead of blocking.
	ErrWouldBlock = errors.New("lufs: read would wait for the device")
)

// NoWaitReader is an optional interface of a File whose reads can be tried
// without waiting for the storage device.
type NoWaitReader interface {
	// ReadAtNoWait is ReadAt that never waits for the device: it returns
	// ErrWouldBlock, having filled an unspecified part of p, when some of
	// the bytes are not in memory (preadv2 with RWF_NOWAIT), and also when
	// the file system cannot tell. Like ReadAt it returns io.EOF when the
	// file ends before p is filled. May be called concurrently with the
	// other data calls of the File.
	ReadAtNoWait(p []byte, off int64) (int, error)
}

// CacheChecker is an optional interface of a File that can tell, without
// reading, whether a range is in the page cache.
type CacheChecker interface {
	// Cached reports whether every page of [off, off+length) is in the
	// page cache (cachestat(2)): false when some page is not, and when it
	// cannot tell. The answer may be stale by the time it is used. May be
	// called concurrently with the other data calls of the File.
	Cached(off, length int64) bool
}

// FS is the small file-system interface lu uses. Paths are OS paths.
type FS interface {
	// OpenFile opens name with os.OpenFile flags (O_RDWR, O_CREATE,
	// O_EXCL). Errors satisfy errors.Is(err, fs.ErrExist / fs.ErrNotExist).
	OpenFile(name string, flag int, perm os.FileMode) (File, error)
	// Remove removes a file.
	Remove(name string) error
	// Rename moves a file to a new name in the same directory, replacing
	// nothing (callers check the new name is free); handles open on it
	// stay valid. SyncDir makes it durable.
	Rename(oldName, newName string) error
	// Stat returns information about a file or directory.
	Stat(name string) (os.FileInfo, error)
	// ReadDir returns the names of the entries of a directory, sorted.
	ReadDir(name string) ([]string, error)
	// MkdirAll creates a directory and its parents.
	MkdirAll(name string, perm os.FileMode) error
	// SyncDir makes the creation and removal of entries in the directory
	// durable.
	SyncDir(name string) error
	// Statfs measures the file system holding path.
	Statfs(path string) (Statfs, error)
}

// Statfs is the capacity of one file system, in bytes.
type Statfs struct {
	// CapacityBytes is the size of the file system.
	CapacityBytes int64
	// FreeBytes is the space still available for file data.
	FreeBytes int64
	// ID identifies the file system (its fsid), so that directories on the
	// same file system are counted once.
	ID string
}

// File is an open file. See the package doc for concurrency and durability.
type File interface {
	io.ReaderAt
	io.WriterAt
	// WriteAtSync is WriteAt whose bytes are durable when it returns
	// (pwritev2 with RWF_DSYNC, or pwrite then fdatasync).
	WriteAtSync(p []byte, off int64) (int, error)
	// Sync makes every completed change durable (fdatasync).
	Sync() error
	// Truncate sets the size; bytes past the old size read as zeros.
	Truncate(size int64) error
	// PunchHole deallocates the whole blocks inside [off, off+length) and
	// zeroes the partial blocks at its edges, keeping the size.
	PunchHole(off, length int64) error
	// ZeroRange makes [off, off+length) read as zeros and stay allocated,
	// without writing buffers, keeping the size. ErrNotSupported if the
	// file system cannot.
	ZeroRange(off, length int64) error
	// SeekData returns the first offset >= off inside data, or io.EOF if
	// there is no data at or after off.
	SeekData(off int64) (int64, error)
	// SeekHole returns the first offset >= off inside a hole; the end of
	// the file counts as a hole.
	SeekHole(off int64) (int64, error)
	// Size returns the file size in bytes.
	Size() (int64, error)
	// AllocatedBytes returns the bytes the file really occupies
	// (st_blocks * 512).
	AllocatedBytes() (int64, error)
	// Close closes the file.
	Close() error
}
