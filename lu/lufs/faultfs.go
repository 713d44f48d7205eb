package lufs

import (
	"errors"
	"fmt"
	"os"
	"sync/atomic"
)

// Op names an FS or File operation for fault injection. The set is closed:
// every call of FaultFS and its files asks the injector with one of these.
type Op int

// Operations that FaultFS can fail.
const (
	OpOpen Op = iota
	OpRemove
	OpStat
	OpReadDir
	OpMkdirAll
	OpSyncDir
	OpStatfs
	OpRead
	OpWrite // WriteAt and WriteAtSync
	OpSync
	OpTruncate
	OpPunchHole
	OpZeroRange
	OpSeek // SeekData and SeekHole
	OpFileStat
	OpClose
	OpRename
	numOps
)

var opNames = [numOps]string{"open", "remove", "stat", "readdir", "mkdirall", "syncdir", "statfs",
	"read", "write", "sync", "truncate", "punchhole", "zerorange", "seek", "filestat", "close", "rename"}

func (o Op) String() string {
	if o >= 0 && o < numOps {
		return opNames[o]
	}
	return fmt.Sprintf("op(%d)", int(o))
}

// Event describes one call, for an Injector.
type Event struct {
	Op     Op
	Path   string
	Off    int64 // file operations only
	Length int64 // file operations only
	// NoWait marks a read that must not wait (NoWaitReader.ReadAtNoWait):
	// an injector that would block such a read returns ErrWouldBlock
	// instead, the way the kernel answers a read of uncached data.
	NoWait bool
}

// Injector decides the fault for one call: nil lets the call run; an error
// is returned instead of running the call, except a *ShortWrite on OpWrite,
// which lets the first Bytes bytes land and then returns its Err.
type Injector func(Event) error

// ShortWrite is an injected partial write: the first Bytes bytes are
// written, then Err is returned.
type ShortWrite struct {
	Bytes int
	Err   error
}

func (s *ShortWrite) Error() string {
	return fmt.Sprintf("lufs: short write of %d bytes: %v", s.Bytes, s.Err)
}

func (s *ShortWrite) Unwrap() error { return s.Err }

// OnOps returns an Injector that fails every call of the given ops with err.
func OnOps(err error, ops ...Op) Injector {
	var set [numOps]bool
	for _, o := range ops {
		set[o] = true
	}
	return func(e Event) error {
		if set[e.Op] {
			return err
		}
		return nil
	}
}

// Nth returns an Injector that lets inner decide only on the n-th call
// (counting from 1) for which inner would fail, and passes every other.
func Nth(n int64, inner Injector) Injector {
	var count atomic.Int64
	return func(e Event) error {
		err := inner(e)
		if err == nil {
			return nil
		}
		if count.Add(1) == n {
			return err
		}
		return nil
	}
}

// Block returns an Injector that holds every call of ops that match
// (match nil: every call of ops) until gate is closed, the way a read of
// a slow disk blocks. A read that must not wait (Event.NoWait) gets
// ErrWouldBlock instead while the gate is open. Other calls pass.
func Block(gate <-chan struct{}, match func(Event) bool, ops ...Op) Injector {
	var set [numOps]bool
	for _, o := range ops {
		set[o] = true
	}
	return func(e Event) error {
		if !set[e.Op] || (match != nil && !match(e)) {
			return nil
		}
		if e.NoWait {
			select {
			case <-gate:
				return nil
			default:
				return ErrWouldBlock
			}
		}
		<-gate
		return nil
	}
}

// Errno wraps an errno as an injected error matching both ErrInjected and
// the errno (errors.Is), the way a real file system returns it.
func Errno(errno error) error { return fmt.Errorf("%w: %w", ErrInjected, errno) }

// FaultFS wraps an FS and asks its injector before every call.
type FaultFS struct {
	inner    FS
	injector atomic.Pointer[Injector]
}

var (
	_ FS           = (*FaultFS)(nil)
	_ File         = (*faultFile)(nil)
	_ NoWaitReader = (*faultFile)(nil)
)

// NewFaultFS wraps inner with no injector installed.
func NewFaultFS(inner FS) *FaultFS { return &FaultFS{inner: inner} }

// SetInjector installs inj; nil removes it. Safe to call at any time.
func (f *FaultFS) SetInjector(inj Injector) {
	if inj == nil {
		f.injector.Store(nil)
		return
	}
	f.injector.Store(&inj)
}

func (f *FaultFS) maybe(e Event) error {
	inj := f.injector.Load()
	if inj == nil {
		return nil
	}
	return (*inj)(e)
}

func (f *FaultFS) OpenFile(name string, flag int, perm os.FileMode) (File, error) {
	if err := f.maybe(Event{Op: OpOpen, Path: name}); err != nil {
		return nil, err
	}
	file, err := f.inner.OpenFile(name, flag, perm)
	if err != nil {
		return nil, err
	}
	return &faultFile{fs: f, inner: file, name: name}, nil
}

func (f *FaultFS) Remove(name string) error {
	if err := f.maybe(Event{Op: OpRemove, Path: name}); err != nil {
		return err
	}
	return f.inner.Remove(name)
}

// Rename implements FS.
func (f *FaultFS) Rename(oldName, newName string) error {
	if err := f.maybe(Event{Op: OpRename, Path: oldName}); err != nil {
		return err
	}
	return f.inner.Rename(oldName, newName)
}

func (f *FaultFS) Stat(name string) (os.FileInfo, error) {
	if err := f.maybe(Event{Op: OpStat, Path: name}); err != nil {
		return nil, err
	}
	return f.inner.Stat(name)
}

func (f *FaultFS) ReadDir(name string) ([]string, error) {
	if err := f.maybe(Event{Op: OpReadDir, Path: name}); err != nil {
		return nil, err
	}
	return f.inner.ReadDir(name)
}

func (f *FaultFS) MkdirAll(name string, perm os.FileMode) error {
	if err := f.maybe(Event{Op: OpMkdirAll, Path: name}); err != nil {
		return err
	}
	return f.inner.MkdirAll(name, perm)
}

func (f *FaultFS) SyncDir(name string) error {
	if err := f.maybe(Event{Op: OpSyncDir, Path: name}); err != nil {
		return err
	}
	return f.inner.SyncDir(name)
}

func (f *FaultFS) Statfs(path string) (Statfs, error) {
	if err := f.maybe(Event{Op: OpStatfs, Path: path}); err != nil {
		return Statfs{}, err
	}
	return f.inner.Statfs(path)
}

type faultFile struct {
	fs    *FaultFS
	inner File
	name  string // immutable
}

func (f *faultFile) ev(op Op, off, length int64) error {
	return f.fs.maybe(Event{Op: op, Path: f.name, Off: off, Length: length})
}

func (f *faultFile) ReadAt(p []byte, off int64) (int, error) {
	if err := f.ev(OpRead, off, int64(len(p))); err != nil {
		return 0, err
	}
	return f.inner.ReadAt(p, off)
}

// ReadAtNoWait implements NoWaitReader: the injector sees an OpRead event
// with NoWait set; the inner file is read without waiting when it can be,
// and otherwise the read would block (ErrWouldBlock).
func (f *faultFile) ReadAtNoWait(p []byte, off int64) (int, error) {
	if err := f.fs.maybe(Event{Op: OpRead, Path: f.name, Off: off, Length: int64(len(p)), NoWait: true}); err != nil {
		return 0, err
	}
	if nw, ok := f.inner.(NoWaitReader); ok {
		return nw.ReadAtNoWait(p, off)
	}
	return 0, ErrWouldBlock
}

func (f *faultFile) write(p []byte, off int64, sync bool) (int, error) {
	write := f.inner.WriteAt
	if sync {
		write = f.inner.WriteAtSync
	}
	if err := f.ev(OpWrite, off, int64(len(p))); err != nil {
		var short *ShortWrite
		if errors.As(err, &short) {
			n, werr := write(p[:min(short.Bytes, len(p))], off)
			if werr != nil {
				return n, werr
			}
			return n, short.Err
		}
		return 0, err
	}
	return write(p, off)
}

func (f *faultFile) WriteAt(p []byte, off int64) (int, error) { return f.write(p, off, false) }

func (f *faultFile) WriteAtSync(p []byte, off int64) (int, error) { return f.write(p, off, true) }

func (f *faultFile) Sync() error {
	if err := f.ev(OpSync, 0, 0); err != nil {
		return err
	}
	return f.inner.Sync()
}

func (f *faultFile) Truncate(size int64) error {
	if err := f.ev(OpTruncate, size, 0); err != nil {
		return err
	}
	return f.inner.Truncate(size)
}

func (f *faultFile) PunchHole(off, length int64) error {
	if err := f.ev(OpPunchHole, off, length); err != nil {
		return err
	}
	return f.inner.PunchHole(off, length)
}

func (f *faultFile) ZeroRange(off, length int64) error {
	if err := f.ev(OpZeroRange, off, length); err != nil {
		return err
	}
	return f.inner.ZeroRange(off, length)
}

func (f *faultFile) SeekData(off int64) (int64, error) {
	if err := f.ev(OpSeek, off, 0); err != nil {
		return 0, err
	}
	return f.inner.SeekData(off)
}

func (f *faultFile) SeekHole(off int64) (int64, error) {
	if err := f.ev(OpSeek, off, 0); err != nil {
		return 0, err
	}
	return f.inner.SeekHole(off)
}

func (f *faultFile) Size() (int64, error) {
	if err := f.ev(OpFileStat, 0, 0); err != nil {
		return 0, err
	}
	return f.inner.Size()
}

func (f *faultFile) AllocatedBytes() (int64, error) {
	if err := f.ev(OpFileStat, 0, 0); err != nil {
		return 0, err
	}
	return f.inner.AllocatedBytes()
}

func (f *faultFile) Close() error {
	if err := f.ev(OpClose, 0, 0); err != nil {
		_ = f.inner.Close() // the descriptor is released whatever the injector says
		return err
	}
	return f.inner.Close()
}
