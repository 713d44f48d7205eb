package lufs

import (
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// MemFSOptions configure a MemFS.
type MemFSOptions struct {
	// CapacityBytes limits the pages all files may hold; a write that needs
	// a page beyond it fails with ENOSPC. 0 means 1 TiB.
	CapacityBytes int64
	// Crashable keeps, for every file, the contents as of its last Sync so
	// that CrashClone can drop unsynced changes. It doubles memory use.
	Crashable bool
	// NoPunchHole and NoZeroRange make those calls fail with
	// ErrNotSupported, like file systems that lack them.
	NoPunchHole, NoZeroRange bool
}

// MemFS is a sparse in-memory FS: pages of BlockSizeBytes are allocated on
// first write and freed by PunchHole, so AllocatedBytes, SeekData and
// SeekHole behave like a real sparse file system with 4 KiB blocks.
//
// Directory entries (create, remove) are durable at once: CrashClone keeps
// every file that existed. File contents and sizes are durable only after
// Sync or WriteAtSync.
type MemFS struct {
	opts MemFSOptions // immutable

	usedPages atomic.Int64 // pages held by all files

	mu struct {
		sync.Mutex
		files map[string]*memNode // guarded by mu; cleaned path -> node
		dirs  map[string]bool     // guarded by mu; cleaned paths
	}
}

var (
	_ FS           = (*MemFS)(nil)
	_ File         = (*memFile)(nil)
	_ NoWaitReader = (*memFile)(nil)
)

type page [BlockSizeBytes]byte

// memNode is one file's data. Its fields are guarded by mu, except opens
// and removed, which are guarded by the MemFS mu.
type memNode struct {
	fs *MemFS

	mu         sync.RWMutex
	size       int64           // guarded by mu
	pages      map[int64]*page // guarded by mu; page index -> data
	syncedSize int64           // guarded by mu; Crashable only
	synced     map[int64]*page // guarded by mu; Crashable only: pages as of last sync
	dirty      map[int64]bool  // guarded by mu; Crashable only: pages changed since

	opens   int  // guarded by fs.mu
	removed bool // guarded by fs.mu
}

// NewMemFS returns an empty MemFS holding only the root directory "/".
func NewMemFS(opts MemFSOptions) *MemFS {
	if opts.CapacityBytes <= 0 {
		opts.CapacityBytes = 1 << 40
	}
	m := &MemFS{opts: opts}
	m.mu.files = map[string]*memNode{}
	m.mu.dirs = map[string]bool{"/": true}
	return m
}

func clean(name string) string { return filepath.Clean("/" + name) }

func pathErr(op, path string, err error) error {
	return &os.PathError{Op: op, Path: path, Err: err}
}

func (m *MemFS) newNode() *memNode {
	n := &memNode{fs: m, pages: map[int64]*page{}}
	if m.opts.Crashable {
		n.synced = map[int64]*page{}
		n.dirty = map[int64]bool{}
	}
	return n
}

// OpenFile implements FS.
func (m *MemFS) OpenFile(name string, flag int, _ os.FileMode) (File, error) {
	p := clean(name)
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.mu.dirs[p] {
		return nil, pathErr("open", name, syscall.EISDIR)
	}
	n, ok := m.mu.files[p]
	switch {
	case ok && flag&os.O_CREATE != 0 && flag&os.O_EXCL != 0:
		return nil, pathErr("open", name, syscall.EEXIST)
	case !ok && flag&os.O_CREATE == 0:
		return nil, pathErr("open", name, syscall.ENOENT)
	case !ok:
		if !m.mu.dirs[filepath.Dir(p)] {
			return nil, pathErr("open", name, syscall.ENOENT)
		}
		n = m.newNode()
		m.mu.files[p] = n
	}
	n.opens++
	f := &memFile{n: n, name: p}
	if flag&os.O_TRUNC != 0 {
		if err := f.Truncate(0); err != nil {
			return nil, err
		}
	}
	return f, nil
}

// Rename implements FS. Like a directory entry's creation, it is durable
// at once.
func (m *MemFS) Rename(oldName, newName string) error {
	from, to := clean(oldName), clean(newName)
	m.mu.Lock()
	defer m.mu.Unlock()
	n, ok := m.mu.files[from]
	if !ok {
		return pathErr("rename", oldName, syscall.ENOENT)
	}
	if _, taken := m.mu.files[to]; taken {
		return pathErr("rename", newName, syscall.EEXIST)
	}
	delete(m.mu.files, from)
	m.mu.files[to] = n
	return nil
}

// Remove implements FS.
func (m *MemFS) Remove(name string) error {
	p := clean(name)
	m.mu.Lock()
	defer m.mu.Unlock()
	if n, ok := m.mu.files[p]; ok {
		delete(m.mu.files, p)
		n.removed = true
		if n.opens == 0 {
			n.release()
		}
		return nil
	}
	if m.mu.dirs[p] {
		prefix := p + "/"
		for q := range m.mu.files {
			if strings.HasPrefix(q, prefix) {
				return pathErr("remove", name, syscall.ENOTEMPTY)
			}
		}
		for q := range m.mu.dirs {
			if strings.HasPrefix(q, prefix) {
				return pathErr("remove", name, syscall.ENOTEMPTY)
			}
		}
		delete(m.mu.dirs, p)
		return nil
	}
	return pathErr("remove", name, syscall.ENOENT)
}

// release gives the node's pages back to the file system.
func (n *memNode) release() {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.fs.usedPages.Add(-int64(len(n.pages)))
	n.pages = map[int64]*page{}
}

type memInfo struct {
	name string
	size int64
	dir  bool
}

func (i memInfo) Name() string       { return i.name }
func (i memInfo) Size() int64        { return i.size }
func (i memInfo) ModTime() time.Time { return time.Time{} }
func (i memInfo) IsDir() bool        { return i.dir }
func (i memInfo) Sys() any           { return nil }
func (i memInfo) Mode() fs.FileMode {
	if i.dir {
		return fs.ModeDir | 0o755
	}
	return 0o644
}

// Stat implements FS.
func (m *MemFS) Stat(name string) (os.FileInfo, error) {
	p := clean(name)
	m.mu.Lock()
	n, ok := m.mu.files[p]
	isDir := m.mu.dirs[p]
	m.mu.Unlock()
	switch {
	case isDir:
		return memInfo{name: filepath.Base(p), dir: true}, nil
	case ok:
		n.mu.RLock()
		defer n.mu.RUnlock()
		return memInfo{name: filepath.Base(p), size: n.size}, nil
	}
	return nil, pathErr("stat", name, syscall.ENOENT)
}

// ReadDir implements FS.
func (m *MemFS) ReadDir(name string) ([]string, error) {
	p := clean(name)
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.mu.dirs[p] {
		return nil, pathErr("readdir", name, syscall.ENOENT)
	}
	var names []string
	for q := range m.mu.files {
		if filepath.Dir(q) == p {
			names = append(names, filepath.Base(q))
		}
	}
	for q := range m.mu.dirs {
		if q != "/" && filepath.Dir(q) == p {
			names = append(names, filepath.Base(q))
		}
	}
	sort.Strings(names)
	return names, nil
}

// MkdirAll implements FS.
func (m *MemFS) MkdirAll(name string, _ os.FileMode) error {
	p := clean(name)
	m.mu.Lock()
	defer m.mu.Unlock()
	for q := p; ; q = filepath.Dir(q) {
		if _, ok := m.mu.files[q]; ok {
			return pathErr("mkdir", name, syscall.ENOTDIR)
		}
		if q == "/" {
			break
		}
	}
	for q := p; q != "/"; q = filepath.Dir(q) {
		m.mu.dirs[q] = true
	}
	return nil
}

// SyncDir implements FS. Directory entries are durable at once in a MemFS.
func (m *MemFS) SyncDir(name string) error {
	p := clean(name)
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.mu.dirs[p] {
		return pathErr("fsync", name, syscall.ENOENT)
	}
	return nil
}

// Statfs implements FS: capacity is CapacityBytes, free what pages leave.
func (m *MemFS) Statfs(string) (Statfs, error) {
	capacity := m.opts.CapacityBytes
	return Statfs{
		CapacityBytes: capacity,
		FreeBytes:     max(0, capacity-m.usedPages.Load()*BlockSizeBytes),
		ID:            fmt.Sprintf("memfs-%p", m),
	}, nil
}

// UsedBytes returns the bytes held by all files' pages.
func (m *MemFS) UsedBytes() int64 { return m.usedPages.Load() * BlockSizeBytes }

// CrashClone returns a new MemFS holding what a crash of the node would
// leave: every file's contents as of its last Sync, plus each page changed
// since then kept or dropped (back to its synced contents) by the seeded
// chance, page by page, so an unsynced write never disturbs a neighbouring
// page. The size is the synced or the current size, by chance. m must be
// Crashable; m stays usable.
func (m *MemFS) CrashClone(seed uint64) *MemFS {
	if !m.opts.Crashable {
		panic("lufs: CrashClone of a MemFS that is not Crashable")
	}
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	m.mu.Lock()
	defer m.mu.Unlock()
	c := NewMemFS(m.opts)
	for d := range m.mu.dirs {
		c.mu.dirs[d] = true
	}
	paths := make([]string, 0, len(m.mu.files))
	for p := range m.mu.files {
		paths = append(paths, p)
	}
	sort.Strings(paths) // the seed alone decides the outcome
	for _, p := range paths {
		c.mu.files[p] = m.mu.files[p].crashCopy(c, rng)
	}
	return c
}

func (n *memNode) crashCopy(c *MemFS, rng *rand.Rand) *memNode {
	n.mu.RLock()
	defer n.mu.RUnlock()
	out := c.newNode()
	out.size = n.syncedSize
	if rng.IntN(2) == 0 {
		out.size = n.size
	}
	for i, pg := range n.synced {
		cp := *pg
		out.pages[i] = &cp
	}
	dirty := make([]int64, 0, len(n.dirty))
	for i := range n.dirty {
		dirty = append(dirty, i)
	}
	sort.Slice(dirty, func(a, b int) bool { return dirty[a] < dirty[b] })
	for _, i := range dirty {
		if rng.IntN(2) == 0 {
			continue // dropped: the synced contents stay
		}
		if pg, ok := n.pages[i]; ok {
			cp := *pg
			out.pages[i] = &cp
		} else {
			delete(out.pages, i)
		}
	}
	out.truncateLocked(out.size)
	for i, pg := range out.pages {
		cp := *pg
		out.synced[i] = &cp
	}
	out.syncedSize = out.size
	c.usedPages.Add(int64(len(out.pages)))
	return out
}

// memFile is an open handle on a memNode.
type memFile struct {
	n    *memNode
	name string // immutable
}

func pageRange(off, length int64) (first, last int64) {
	return off / BlockSizeBytes, (off + length - 1) / BlockSizeBytes
}

// markDirtyLocked records that page i changed. n.mu must be held.
func (n *memNode) markDirtyLocked(i int64) {
	if n.dirty != nil {
		n.dirty[i] = true
	}
}

// pageLocked returns page i, allocating it if alloc. n.mu must be held.
func (n *memNode) pageLocked(i int64) (*page, error) {
	if pg, ok := n.pages[i]; ok {
		return pg, nil
	}
	if n.fs.usedPages.Add(1)*BlockSizeBytes > n.fs.opts.CapacityBytes {
		n.fs.usedPages.Add(-1)
		return nil, syscall.ENOSPC
	}
	pg := new(page)
	n.pages[i] = pg
	return pg, nil
}

func (n *memNode) freePageLocked(i int64) {
	if _, ok := n.pages[i]; ok {
		delete(n.pages, i)
		n.fs.usedPages.Add(-1)
		n.markDirtyLocked(i)
	}
}

// truncateLocked cuts pages past size and zeroes the tail of the last one.
func (n *memNode) truncateLocked(size int64) {
	last := (size + BlockSizeBytes - 1) / BlockSizeBytes
	for i := range n.pages {
		if i >= last {
			n.freePageLocked(i)
		}
	}
	if pg, ok := n.pages[size/BlockSizeBytes]; ok && size%BlockSizeBytes != 0 {
		clear(pg[size%BlockSizeBytes:])
		n.markDirtyLocked(size / BlockSizeBytes)
	}
	n.size = size
}

// ReadAtNoWait implements NoWaitReader: a MemFS never waits for a device.
func (f *memFile) ReadAtNoWait(p []byte, off int64) (int, error) { return f.ReadAt(p, off) }

func (f *memFile) ReadAt(p []byte, off int64) (int, error) {
	n := f.n
	n.mu.RLock()
	defer n.mu.RUnlock()
	if off >= n.size {
		return 0, io.EOF
	}
	want := min(int64(len(p)), n.size-off)
	for done := int64(0); done < want; {
		pos := off + done
		in := pos % BlockSizeBytes
		chunk := min(want-done, BlockSizeBytes-in)
		if pg, ok := n.pages[pos/BlockSizeBytes]; ok {
			copy(p[done:done+chunk], pg[in:])
		} else {
			clear(p[done : done+chunk])
		}
		done += chunk
	}
	if want < int64(len(p)) {
		return int(want), io.EOF
	}
	return len(p), nil
}

func (f *memFile) WriteAt(p []byte, off int64) (int, error) {
	n := f.n
	n.mu.Lock()
	defer n.mu.Unlock()
	return f.writeLocked(p, off)
}

func (f *memFile) writeLocked(p []byte, off int64) (int, error) {
	n := f.n
	for done := int64(0); done < int64(len(p)); {
		pos := off + done
		in := pos % BlockSizeBytes
		chunk := min(int64(len(p))-done, BlockSizeBytes-in)
		pg, err := n.pageLocked(pos / BlockSizeBytes)
		if err != nil {
			return int(done), pathErr("write", f.name, err)
		}
		copy(pg[in:in+chunk], p[done:])
		n.markDirtyLocked(pos / BlockSizeBytes)
		done += chunk
		n.size = max(n.size, pos+chunk)
	}
	return len(p), nil
}

func (f *memFile) WriteAtSync(p []byte, off int64) (int, error) {
	n := f.n
	n.mu.Lock()
	defer n.mu.Unlock()
	written, err := f.writeLocked(p, off)
	if err != nil || written == 0 || n.dirty == nil {
		return written, err
	}
	first, last := pageRange(off, int64(written))
	for i := first; i <= last; i++ {
		n.syncPageLocked(i)
	}
	n.syncedSize = max(n.syncedSize, min(n.size, off+int64(written)))
	return written, nil
}

// syncPageLocked makes page i's current contents the synced ones.
func (n *memNode) syncPageLocked(i int64) {
	if pg, ok := n.pages[i]; ok {
		cp := *pg
		n.synced[i] = &cp
	} else {
		delete(n.synced, i)
	}
	delete(n.dirty, i)
}

func (f *memFile) Sync() error {
	n := f.n
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.dirty == nil {
		return nil
	}
	for i := range n.dirty {
		n.syncPageLocked(i)
	}
	n.syncedSize = n.size
	return nil
}

func (f *memFile) Truncate(size int64) error {
	if size < 0 {
		return pathErr("truncate", f.name, syscall.EINVAL)
	}
	n := f.n
	n.mu.Lock()
	defer n.mu.Unlock()
	n.truncateLocked(size)
	return nil
}

func (f *memFile) PunchHole(off, length int64) error {
	if f.n.fs.opts.NoPunchHole {
		return pathErr("punch hole", f.name, ErrNotSupported)
	}
	if off < 0 || length < 0 {
		return pathErr("punch hole", f.name, syscall.EINVAL)
	}
	if length == 0 {
		return nil
	}
	n := f.n
	n.mu.Lock()
	defer n.mu.Unlock()
	end := off + length
	for pos := off; pos < end; {
		i := pos / BlockSizeBytes
		in := pos % BlockSizeBytes
		chunk := min(end-pos, BlockSizeBytes-in)
		if chunk == BlockSizeBytes {
			n.freePageLocked(i)
		} else if pg, ok := n.pages[i]; ok {
			clear(pg[in : in+chunk])
			n.markDirtyLocked(i)
		}
		pos += chunk
	}
	return nil
}

func (f *memFile) ZeroRange(off, length int64) error {
	if f.n.fs.opts.NoZeroRange {
		return pathErr("zero range", f.name, ErrNotSupported)
	}
	if off < 0 || length < 0 {
		return pathErr("zero range", f.name, syscall.EINVAL)
	}
	n := f.n
	n.mu.Lock()
	defer n.mu.Unlock()
	for pos, end := off, off+length; pos < end; {
		in := pos % BlockSizeBytes
		chunk := min(end-pos, BlockSizeBytes-in)
		pg, err := n.pageLocked(pos / BlockSizeBytes)
		if err != nil {
			return pathErr("zero range", f.name, err)
		}
		clear(pg[in : in+chunk])
		n.markDirtyLocked(pos / BlockSizeBytes)
		pos += chunk
	}
	return nil
}

func (f *memFile) SeekData(off int64) (int64, error) {
	n := f.n
	n.mu.RLock()
	defer n.mu.RUnlock()
	if off < 0 {
		return 0, pathErr("lseek", f.name, syscall.EINVAL)
	}
	if off >= n.size {
		return 0, io.EOF
	}
	first := off / BlockSizeBytes
	best := int64(-1)
	for i := range n.pages {
		if i >= first && i*BlockSizeBytes < n.size && (best < 0 || i < best) {
			best = i
		}
	}
	if best < 0 {
		return 0, io.EOF
	}
	return max(off, best*BlockSizeBytes), nil
}

func (f *memFile) SeekHole(off int64) (int64, error) {
	n := f.n
	n.mu.RLock()
	defer n.mu.RUnlock()
	if off < 0 {
		return 0, pathErr("lseek", f.name, syscall.EINVAL)
	}
	if off >= n.size {
		return off, nil
	}
	i := off / BlockSizeBytes
	for {
		if _, ok := n.pages[i]; !ok {
			break
		}
		i++
	}
	return min(max(off, i*BlockSizeBytes), n.size), nil
}

func (f *memFile) Size() (int64, error) {
	f.n.mu.RLock()
	defer f.n.mu.RUnlock()
	return f.n.size, nil
}

func (f *memFile) AllocatedBytes() (int64, error) {
	f.n.mu.RLock()
	defer f.n.mu.RUnlock()
	return int64(len(f.n.pages)) * BlockSizeBytes, nil
}

func (f *memFile) Close() error {
	fs := f.n.fs
	fs.mu.Lock()
	defer fs.mu.Unlock()
	f.n.opens--
	if f.n.opens == 0 && f.n.removed {
		f.n.release()
	}
	return nil
}
