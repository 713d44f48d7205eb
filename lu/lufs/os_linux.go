package lufs

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// OS returns the FS of the operating system (Linux).
func OS() FS { return osFS{} }

type osFS struct{}

var (
	_ FS           = osFS{}
	_ File         = (*osFile)(nil)
	_ NoWaitReader = (*osFile)(nil)
	_ CacheChecker = (*osFile)(nil)
)

func (osFS) OpenFile(name string, flag int, perm os.FileMode) (File, error) {
	f, err := os.OpenFile(name, flag, perm)
	if err != nil {
		return nil, err
	}
	return &osFile{f: f, fd: int(f.Fd())}, nil
}

func (osFS) Remove(name string) error                     { return os.Remove(name) }
func (osFS) Rename(oldName, newName string) error         { return os.Rename(oldName, newName) }
func (osFS) Stat(name string) (os.FileInfo, error)        { return os.Stat(name) }
func (osFS) MkdirAll(name string, perm os.FileMode) error { return os.MkdirAll(name, perm) }

func (osFS) ReadDir(name string) ([]string, error) {
	entries, err := os.ReadDir(name)
	if err != nil {
		return nil, err
	}
	names := make([]string, 0, len(entries))
	for _, e := range entries {
		names = append(names, e.Name())
	}
	sort.Strings(names)
	return names, nil
}

func (osFS) SyncDir(name string) error {
	d, err := os.Open(name)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

func (osFS) Statfs(path string) (Statfs, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return Statfs{}, &os.PathError{Op: "statfs", Path: path, Err: err}
	}
	bsize := st.Frsize
	if bsize == 0 {
		bsize = st.Bsize
	}
	return Statfs{
		CapacityBytes: int64(st.Blocks) * bsize,
		FreeBytes:     int64(st.Bavail) * bsize,
		ID:            fmt.Sprintf("%x:%x", st.Fsid.Val[0], st.Fsid.Val[1]),
	}, nil
}

// osFile keeps the descriptor so the data path makes one system call per
// operation. The os.File owns it and closes it.
type osFile struct {
	f  *os.File
	fd int // immutable; valid until Close

	// noPwritev2 is set once the kernel refused pwritev2 with RWF_DSYNC;
	// WriteAtSync then falls back to pwrite + fdatasync.
	noPwritev2 atomic.Bool
	// noNoWait is set once the kernel or file system refused RWF_NOWAIT on
	// a read; ReadAtNoWait then answers ErrWouldBlock at once.
	noNoWait atomic.Bool
	// noCachestat is set once the kernel refused cachestat (before 6.5);
	// Cached then answers false at once.
	noCachestat atomic.Bool
}

func (f *osFile) Truncate(size int64) error { return f.f.Truncate(size) }
func (f *osFile) Close() error              { return f.f.Close() }

// ReadAt calls pread on the descriptor directly: the caller's exclusion of
// Close (see the package doc) replaces os.File's per-call reference count.
func (f *osFile) ReadAt(p []byte, off int64) (int, error) {
	done := 0
	for done < len(p) {
		n, err := unix.Pread(f.fd, p[done:], off+int64(done))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return done, f.pathErr("pread", err)
		}
		if n == 0 {
			return done, io.EOF
		}
		done += n
	}
	return done, nil
}

// rawReadMaxBytes bounds the no-wait reads made without telling the Go
// scheduler (RawSyscall): copying this much from the page cache takes a
// few microseconds, less than entering and leaving a blocking system call
// costs the scheduler (which may wake a thread to take the processor).
const rawReadMaxBytes = 128 << 10

// ReadAtNoWait implements NoWaitReader with preadv2(RWF_NOWAIT), which
// copies from the page cache and returns EAGAIN instead of starting I/O.
func (f *osFile) ReadAtNoWait(p []byte, off int64) (int, error) {
	if f.noNoWait.Load() {
		return 0, ErrWouldBlock
	}
	done := 0
	for done < len(p) {
		n, errno := f.preadNoWait(p[done:], off+int64(done))
		switch {
		case errno == unix.EINTR:
			continue
		case errno == unix.EAGAIN:
			return done, ErrWouldBlock
		case errno == unix.EOPNOTSUPP || errno == unix.ENOSYS || errno == unix.EINVAL:
			// A kernel before 4.14 or a file system without no-wait
			// reads: stop trying; ReadAt still works.
			f.noNoWait.Store(true)
			return done, ErrWouldBlock
		case errno != 0:
			return done, f.pathErr("preadv2", errno)
		case n == 0:
			return done, io.EOF
		}
		done += n
	}
	return done, nil
}

// preadNoWait is one preadv2(RWF_NOWAIT) call into p (len(p) > 0). It
// allocates nothing: the iovec lives on the stack.
func (f *osFile) preadNoWait(p []byte, off int64) (int, syscall.Errno) {
	var iov unix.Iovec
	iov.Base = &p[0]
	iov.SetLen(len(p))
	const longBits = unix.SizeofLong * 8
	lo, hi := uintptr(off), uintptr(uint64(off)>>(longBits-1)>>1)
	var n uintptr
	var errno syscall.Errno
	if len(p) <= rawReadMaxBytes {
		n, _, errno = syscall.RawSyscall6(unix.SYS_PREADV2, uintptr(f.fd), uintptr(unsafe.Pointer(&iov)), 1,
			lo, hi, unix.RWF_NOWAIT)
	} else {
		n, _, errno = syscall.Syscall6(unix.SYS_PREADV2, uintptr(f.fd), uintptr(unsafe.Pointer(&iov)), 1,
			lo, hi, unix.RWF_NOWAIT)
	}
	return int(n), errno
}

// Cached implements CacheChecker with cachestat(2), which counts the
// range's pages in the page cache without touching them.
func (f *osFile) Cached(off, length int64) bool {
	if length <= 0 || off < 0 || f.noCachestat.Load() {
		return false
	}
	r := unix.CachestatRange{Off: uint64(off), Len: uint64(length)}
	var st unix.Cachestat_t
	if err := unix.Cachestat(uint(f.fd), &r, &st, 0); err != nil {
		if errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EOPNOTSUPP) {
			f.noCachestat.Store(true)
		}
		return false
	}
	pages := (uint64(off+length)+pageBytes-1)/pageBytes - uint64(off)/pageBytes
	return st.Cache >= pages
}

// pageBytes is the page size cachestat counts in.
var pageBytes = uint64(os.Getpagesize())

// WriteAt calls pwrite on the descriptor directly, until all of p is
// written or an error (ENOSPC after a short write) stops it.
func (f *osFile) WriteAt(p []byte, off int64) (int, error) {
	done := 0
	for done < len(p) {
		n, err := unix.Pwrite(f.fd, p[done:], off+int64(done))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return done, f.pathErr("pwrite", err)
		}
		if n == 0 {
			return done, f.pathErr("pwrite", io.ErrShortWrite)
		}
		done += n
	}
	return done, nil
}

func (f *osFile) WriteAtSync(p []byte, off int64) (int, error) {
	if !f.noPwritev2.Load() {
		done := 0
		for done < len(p) {
			n, err := unix.Pwritev2(f.fd, [][]byte{p[done:]}, off+int64(done), unix.RWF_DSYNC)
			if errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EOPNOTSUPP) || (errors.Is(err, unix.EINVAL) && done == 0) {
				f.noPwritev2.Store(true)
				break
			}
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				return done, f.pathErr("pwritev2", err)
			}
			if n == 0 {
				return done, f.pathErr("pwritev2", io.ErrShortWrite)
			}
			done += n
		}
		if done == len(p) {
			return done, nil
		}
	}
	n, err := f.WriteAt(p, off)
	if err != nil {
		return n, err
	}
	return n, f.Sync()
}

func (f *osFile) Sync() error {
	for {
		err := unix.Fdatasync(f.fd)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return f.pathErr("fdatasync", err)
		}
		return nil
	}
}

func (f *osFile) fallocate(op string, mode uint32, off, length int64) error {
	if length == 0 {
		return nil
	}
	for {
		err := unix.Fallocate(f.fd, mode|unix.FALLOC_FL_KEEP_SIZE, off, length)
		if err == unix.EINTR {
			continue
		}
		if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) {
			return fmt.Errorf("%w: %w", ErrNotSupported, f.pathErr(op, err))
		}
		if err != nil {
			return f.pathErr(op, err)
		}
		return nil
	}
}

func (f *osFile) PunchHole(off, length int64) error {
	return f.fallocate("punch hole", unix.FALLOC_FL_PUNCH_HOLE, off, length)
}

func (f *osFile) ZeroRange(off, length int64) error {
	return f.fallocate("zero range", unix.FALLOC_FL_ZERO_RANGE, off, length)
}

func (f *osFile) seek(off int64, whence int) (int64, error) {
	pos, err := unix.Seek(f.fd, off, whence)
	if err == unix.ENXIO {
		return 0, io.EOF
	}
	if err != nil {
		return 0, f.pathErr("lseek", err)
	}
	return pos, nil
}

func (f *osFile) SeekData(off int64) (int64, error) { return f.seek(off, unix.SEEK_DATA) }

func (f *osFile) SeekHole(off int64) (int64, error) {
	pos, err := f.seek(off, unix.SEEK_HOLE)
	if err == io.EOF {
		// off is at or past the end: the end counts as a hole.
		return off, nil
	}
	return pos, err
}

func (f *osFile) stat() (unix.Stat_t, error) {
	var st unix.Stat_t
	if err := unix.Fstat(f.fd, &st); err != nil {
		return st, f.pathErr("fstat", err)
	}
	return st, nil
}

func (f *osFile) Size() (int64, error) {
	st, err := f.stat()
	return st.Size, err
}

func (f *osFile) AllocatedBytes() (int64, error) {
	st, err := f.stat()
	return st.Blocks * 512, err
}

func (f *osFile) pathErr(op string, err error) error {
	return &os.PathError{Op: op, Path: f.f.Name(), Err: err}
}
