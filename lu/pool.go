package lu

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/lupool/lupool/internal/rules"
	"github.com/lupool/lupool/lu/lufs"
)

// volumeFileSuffix names a volume's file: <dir>/<name>.lu.
const volumeFileSuffix = ".lu"

// PoolLevel is the pool's usage level against its thresholds.
type PoolLevel string

// Usage levels.
const (
	LevelOK       PoolLevel = "ok"
	LevelWarn     PoolLevel = "warn"
	LevelCritical PoolLevel = "critical"
)

// PoolOptions configure a Pool. Call EnsureDefaults, then Validate (OpenPool
// does both).
type PoolOptions struct {
	// Dirs are the data directories, typically one per disk. Required;
	// created if missing.
	Dirs []string
	// FS is the file-system seam; nil means the operating system.
	FS lufs.FS
	// OvercommitRatio limits provisioned file-volume bytes to this many
	// times the capacity of all directories.
	OvercommitRatio float64
	// WarnPercent and CriticalPercent are the usage thresholds (used bytes
	// of the fullest directory's file system, in percent of its capacity).
	WarnPercent, CriticalPercent float64
	// OnThreshold, if set, is called with the new level whenever the level
	// seen by Status or CheckThresholds (which Create, Resize and Delete
	// call) changes.
	// It runs on the caller's goroutine with no pool lock held.
	OnThreshold func(PoolLevel)
	// MemoryLimitBytes caps the RAM that all memory volumes may hold
	// (allocated pages, not sizes); a write beyond it fails with ENOSPC.
	// 0 means no limit.
	MemoryLimitBytes int64
	// MemoryBudgetBytes is the node's memory budget: the sizes of all
	// memory volumes, and of the memory volumes reserved, may not add up
	// to more (Reserve, Create and Resize fail with a MemoryBudgetError).
	// Memory volumes are not overcommitted: a paging device whose writes
	// fail kills its VM. 0 means no budget.
	MemoryBudgetBytes int64
	// Logger receives pool events; nil discards them.
	Logger *slog.Logger
}

// EnsureDefaults fills the zero fields.
func (o *PoolOptions) EnsureDefaults() {
	if o.FS == nil {
		o.FS = lufs.OS()
	}
	if o.OvercommitRatio == 0 {
		// Most paging and VM space is never written; 4x is the usual
		// starting point of thin pools and leaves the thresholds time to warn.
		o.OvercommitRatio = 4
	}
	if o.WarnPercent == 0 {
		o.WarnPercent = 80
	}
	if o.CriticalPercent == 0 {
		// Leaves ~10% for the writes in flight while an operator reacts.
		o.CriticalPercent = 90
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
}

// Validate reports a configuration that cannot work.
func (o *PoolOptions) Validate() error {
	switch {
	case len(o.Dirs) == 0:
		return errors.New("lu: pool options: no data directories")
	case o.MemoryLimitBytes < 0:
		return fmt.Errorf("lu: pool options: memory limit %d bytes must be >= 0", o.MemoryLimitBytes)
	case o.MemoryBudgetBytes < 0:
		return fmt.Errorf("lu: pool options: memory budget %d bytes must be >= 0", o.MemoryBudgetBytes)
	case o.OvercommitRatio <= 0:
		return fmt.Errorf("lu: pool options: overcommit ratio %g must be > 0", o.OvercommitRatio)
	case o.WarnPercent <= 0 || o.WarnPercent > 100:
		return fmt.Errorf("lu: pool options: warn threshold %g%% must be in (0, 100]", o.WarnPercent)
	case o.CriticalPercent < o.WarnPercent || o.CriticalPercent > 100:
		return fmt.Errorf("lu: pool options: critical threshold %g%% must be in [warn %g%%, 100]",
			o.CriticalPercent, o.WarnPercent)
	}
	seen := map[string]bool{}
	for _, d := range o.Dirs {
		c := filepath.Clean(d)
		if d == "" || seen[c] {
			return fmt.Errorf("lu: pool options: empty or duplicate data directory %q", d)
		}
		seen[c] = true
	}
	return nil
}

// DirStatus is one data directory's share of the pool.
type DirStatus struct {
	Path             string
	CapacityBytes    int64 // size of the file system holding the directory
	FreeBytes        int64 // space still available on it
	AllocatedBytes   int64 // blocks held by this directory's volumes
	ProvisionedBytes int64 // sum of this directory's volume sizes
	Volumes          int
	Level            PoolLevel
}

// PoolStatus is the pool's accounting.
//
// Memory volumes use RAM, not disk: they are counted in MemoryAllocatedBytes
// and MemoryProvisionedBytes only, and are excluded from the disk figures,
// the overcommit ratio and the thresholds, which all measure the disks.
type PoolStatus struct {
	CapacityBytes    int64 // sum over distinct file systems
	FreeBytes        int64 // sum over distinct file systems
	AllocatedBytes   int64 // file volumes' allocated bytes (st_blocks)
	ProvisionedBytes int64 // file volumes' sizes
	// OvercommitRatio is ProvisionedBytes / CapacityBytes.
	OvercommitRatio float64
	// Level is the worst directory's level: one full disk fails the writes
	// of every volume on it.
	Level                  PoolLevel
	Dirs                   []DirStatus
	MemoryAllocatedBytes   int64
	MemoryProvisionedBytes int64
	MemoryLimitBytes       int64 // 0: no limit
	// MemoryBudgetBytes is the memory budget (0: none);
	// MemoryReservedBytes are memory volumes reserved but not created
	// yet; MemoryFreeBytes is what the budget still takes (0 without one).
	MemoryBudgetBytes   int64
	MemoryReservedBytes int64
	MemoryFreeBytes     int64
	Volumes             int
}

// poolEntry is one volume of the pool.
type poolEntry struct {
	vol Volume // immutable
	dir int    // immutable; index in Dirs, or -1 for a memory volume
	// snapshot marks a snapshot (LU@SNAP, snapshot.go): read-only, so it
	// provisions only what it holds, not its size.
	snapshot bool // immutable
}

// provisionedBytes is what the volume counts against the overcommit
// limit: its size, or for a snapshot, which never grows, its allocation.
func (e poolEntry) provisionedBytes() int64 {
	if e.snapshot {
		return e.vol.AllocatedBytes()
	}
	return e.vol.Size()
}

// Pool is one node's storage: data directories and the volumes in them. It
// is safe for concurrent use. Its lock guards the name table only; volumes'
// I/O never takes it.
type Pool struct {
	opts   PoolOptions // immutable after OpenPool
	dirs   []string    // immutable; cleaned opts.Dirs
	memory *memBudget  // immutable; shared by the memory volumes, nil = unlimited

	mu struct {
		sync.Mutex
		vols   map[string]poolEntry // guarded by mu
		level  PoolLevel            // guarded by mu; last level reported
		closed bool                 // guarded by mu
		// reserved holds provisioned bytes for file volumes about to be
		// created (Reserve); guarded by mu.
		reserved map[string]reservation
	}
}

// reservation is provisioned room held for a volume not yet created.
type reservation struct {
	sizeBytes int64
	memory    bool // a memory volume's: counts against the memory budget
	expires   time.Time
}

// OpenPool opens (creating if needed) the data directories and rediscovers
// the file volumes in them.
func OpenPool(opts PoolOptions) (*Pool, error) {
	opts.EnsureDefaults()
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	p := &Pool{opts: opts}
	if opts.MemoryLimitBytes > 0 {
		p.memory = &memBudget{limitPages: opts.MemoryLimitBytes / BlockSizeBytes}
	}
	p.mu.vols = map[string]poolEntry{}
	p.mu.reserved = map[string]reservation{}
	p.mu.level = LevelOK
	for _, d := range opts.Dirs {
		p.dirs = append(p.dirs, filepath.Clean(d))
	}
	var clones []pendingClone
	for i, dir := range p.dirs {
		found, err := p.openDir(i, dir)
		if err != nil {
			_ = p.Close()
			return nil, err
		}
		clones = append(clones, found...)
	}
	if err := p.openClones(clones); err != nil {
		_ = p.Close()
		return nil, err
	}
	p.opts.Logger.Info("lu: pool opened", "dirs", p.dirs, "volumes", len(p.mu.vols))
	return p, nil
}

// openDir opens the plain volumes of directory i and returns the clones
// found there, which openClones opens once their bases are open.
func (p *Pool) openDir(i int, dir string) ([]pendingClone, error) {
	fs := p.opts.FS
	if err := fs.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("lu: pool: create data directory: %w", err)
	}
	names, err := fs.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("lu: pool: list data directory: %w", err)
	}
	if changed, err := p.recoverIntents(i, names); err != nil {
		return nil, err
	} else if changed {
		if names, err = fs.ReadDir(dir); err != nil {
			return nil, fmt.Errorf("lu: pool: list data directory: %w", err)
		}
	}
	present := make(map[string]bool, len(names))
	for _, file := range names {
		present[file] = true
	}
	var clones []pendingClone
	for _, file := range names {
		stem, ok := strings.CutSuffix(file, volumeFileSuffix)
		name := nameOfFile(stem)
		if !ok || ValidateName(name) != nil || fileNameOf(name) != stem {
			continue
		}
		if prev, dup := p.mu.vols[name]; dup {
			return nil, fmt.Errorf("lu: pool: volume %q found in both %s and %s; remove one", name,
				p.dirs[prev.dir], dir)
		}
		if isClone(present, name) {
			clones = append(clones, pendingClone{name: name, dataPath: filepath.Join(dir, file), mapPath: p.mapPath(i, name), dir: i})
			continue
		}
		v, err := openFileVolume(fs, filepath.Join(dir, file))
		if err != nil {
			return nil, fmt.Errorf("lu: pool: reopen volume %q: %w", name, err)
		}
		p.mu.vols[name] = poolEntry{vol: v, dir: i, snapshot: isSnapshotName(name)}
	}
	return clones, nil
}

// ValidateName returns ErrInvalidName unless name passes the LU name rule
// (rules.LUName: 1-128 characters of [A-Za-z0-9._-], not "." or "..", or
// an image's disk IMAGE/N).
func ValidateName(name string) error {
	if err := rules.LUName(name); err != nil {
		return fmt.Errorf("%w: %q: %w", ErrInvalidName, name, err)
	}
	return nil
}

// Create makes a new volume. A file volume goes into the directory with
// the most free space and is refused with ErrOvercommit when the pool's
// provisioned file-volume bytes would exceed OvercommitRatio times its
// capacity. Memory volumes are not limited by the disks.
func (p *Pool) Create(name string, sizeBytes int64, kind Kind) (Volume, error) {
	if err := ValidateName(name); err != nil {
		return nil, err
	}
	if sizeBytes < 0 {
		return nil, fmt.Errorf("%w: %q: %d bytes", ErrInvalidSize, name, sizeBytes)
	}
	if kind != KindFile && kind != KindMemory {
		return nil, fmt.Errorf("lu: create %q: unknown volume kind %q", name, kind)
	}
	v, err := p.create(name, sizeBytes, kind)
	if err != nil {
		return nil, err
	}
	p.opts.Logger.Info("lu: volume created", "name", name, "size_bytes", sizeBytes, "kind", kind)
	p.CheckThresholds()
	return v, nil
}

// Reserve holds room under the overcommit limit for a file volume of
// sizeBytes that is about to be created under name (its LU is being
// recorded in the metadata; the volume is created when the record is
// applied). It fails with ErrOvercommit, naming the numbers, when the
// volumes and every other reservation leave no room, so that creates racing
// each other cannot all pass the check. Create(name) takes the room over;
// Release(name) gives it back; otherwise it lapses after ttl. A memory
// volume reserves room in the memory budget instead (ErrMemoryBudget when
// there is none).
func (p *Pool) Reserve(name string, sizeBytes int64, kind Kind, ttl time.Duration) error {
	if kind != KindFile && kind != KindMemory {
		return fmt.Errorf("lu: reserve %q: unknown volume kind %q", name, kind)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.mu.closed {
		return ErrPoolClosed
	}
	delete(p.mu.reserved, name)
	if kind == KindMemory {
		if err := p.checkMemoryLocked(name, sizeBytes); err != nil {
			return err
		}
		p.mu.reserved[name] = reservation{sizeBytes: sizeBytes, memory: true, expires: time.Now().Add(ttl)}
		return nil
	}
	stats, err := p.statfsAll()
	if err != nil {
		return err
	}
	if err := p.checkOvercommitLocked(stats, name, sizeBytes); err != nil {
		return err
	}
	p.mu.reserved[name] = reservation{sizeBytes: sizeBytes, expires: time.Now().Add(ttl)}
	return nil
}

// Release gives back the room Reserve held for name, if any.
func (p *Pool) Release(name string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.mu.reserved, name)
}

func (p *Pool) create(name string, sizeBytes int64, kind Kind) (Volume, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.mu.closed {
		return nil, ErrPoolClosed
	}
	delete(p.mu.reserved, name) // the volume takes the reserved room over
	if _, ok := p.mu.vols[name]; ok {
		return nil, fmt.Errorf("%w: %q", ErrExists, name)
	}
	if kind == KindMemory {
		if err := p.checkMemoryLocked(name, sizeBytes); err != nil {
			return nil, err
		}
		v := newMemVolume(sizeBytes, p.memory)
		p.mu.vols[name] = poolEntry{vol: v, dir: -1}
		return v, nil
	}
	stats, err := p.statfsAll()
	if err != nil {
		return nil, err
	}
	if err := p.checkOvercommitLocked(stats, name, sizeBytes); err != nil {
		return nil, err
	}
	best := 0
	for i := range stats {
		if stats[i].FreeBytes > stats[best].FreeBytes {
			best = i
		}
	}
	v, err := createFileVolume(p.opts.FS, p.volumePath(best, name), sizeBytes)
	if err != nil {
		return nil, err
	}
	if err := p.opts.FS.SyncDir(p.dirs[best]); err != nil {
		_ = v.Close()
		_ = p.opts.FS.Remove(v.path)
		return nil, ioError("sync directory", p.dirs[best], err)
	}
	p.mu.vols[name] = poolEntry{vol: v, dir: best}
	return v, nil
}

// totalCapacity sums capacity and free bytes over distinct file systems.
func totalCapacity(stats []lufs.Statfs) (capacityBytes, freeBytes int64) {
	seen := map[string]bool{}
	for _, st := range stats {
		if st.ID != "" && seen[st.ID] {
			continue
		}
		seen[st.ID] = true
		capacityBytes += st.CapacityBytes
		freeBytes += st.FreeBytes
	}
	return capacityBytes, freeBytes
}

func (p *Pool) volumePath(dir int, name string) string {
	return filepath.Join(p.dirs[dir], fileNameOf(name)+volumeFileSuffix)
}

// imageSlashInFile stands for the slash of an image LU's name (IMAGE/N) in
// its file names: IMAGE@N.lu. snapshotAtInFile stands for the @ of a
// snapshot's name (LU@SNAP, rules.SplitSnapshotLU) in its file names:
// LU+SNAP.lu, so that snapshot S of LU L never shares a file with disk S
// of an image L. No LU name holds '+', and only snapshot names hold '@', so
// the mapping is one to one. Part of the on-disk format.
const (
	imageSlashInFile = "@"
	snapshotAtInFile = "+"
)

// fileNameOf returns the file name stem of volume name.
func fileNameOf(name string) string {
	return strings.ReplaceAll(strings.ReplaceAll(name, "@", snapshotAtInFile), "/", imageSlashInFile)
}

// nameOfFile is fileNameOf's inverse.
func nameOfFile(stem string) string {
	return strings.ReplaceAll(strings.ReplaceAll(stem, imageSlashInFile, "/"), snapshotAtInFile, "@")
}

func (p *Pool) statfsAll() ([]lufs.Statfs, error) {
	out := make([]lufs.Statfs, len(p.dirs))
	for i, d := range p.dirs {
		st, err := p.opts.FS.Statfs(d)
		if err != nil {
			return nil, fmt.Errorf("lu: pool: statfs %s: %w", d, err)
		}
		out[i] = st
	}
	return out, nil
}

// checkOvercommitLocked refuses growing the provisioned file-volume bytes by
// addBytes beyond the limit. Directories on one file system count once.
// p.mu must be held.
func (p *Pool) checkOvercommitLocked(stats []lufs.Statfs, name string, addBytes int64) error {
	if addBytes <= 0 {
		return nil
	}
	capacity, _ := totalCapacity(stats)
	var provisioned int64
	for _, e := range p.mu.vols {
		if e.dir >= 0 {
			provisioned += e.provisionedBytes()
		}
	}
	now := time.Now()
	for other, r := range p.mu.reserved {
		switch {
		case now.After(r.expires):
			delete(p.mu.reserved, other)
		case other != name && !r.memory:
			provisioned += r.sizeBytes
		}
	}
	if err := rules.Overcommit(provisioned, addBytes, capacity, p.opts.OvercommitRatio); err != nil {
		return fmt.Errorf("%w: %q: %w", ErrOvercommit, name, err)
	}
	return nil
}

// checkMemoryLocked refuses growing the memory volumes' sizes by addBytes
// beyond the memory budget (MemoryBudgetBytes; 0 is none). A
// reservation of name itself is not counted (it is being taken over).
// p.mu must be held.
func (p *Pool) checkMemoryLocked(name string, addBytes int64) error {
	if p.opts.MemoryBudgetBytes == 0 || addBytes <= 0 {
		return nil
	}
	used := p.memoryUsedLocked(name)
	if used+addBytes > p.opts.MemoryBudgetBytes {
		return &MemoryBudgetError{Name: name, UsedBytes: used, AddBytes: addBytes, LimitBytes: p.opts.MemoryBudgetBytes}
	}
	return nil
}

// memoryUsedLocked sums the sizes of the memory volumes and of the
// memory reservations other than except's, dropping lapsed reservations.
// p.mu must be held.
func (p *Pool) memoryUsedLocked(except string) int64 {
	var used int64
	for _, e := range p.mu.vols {
		if e.dir < 0 {
			used += e.vol.Size()
		}
	}
	now := time.Now()
	for other, r := range p.mu.reserved {
		switch {
		case now.After(r.expires):
			delete(p.mu.reserved, other)
		case other != except && r.memory:
			used += r.sizeBytes
		}
	}
	return used
}

// MemoryBudgetError says by how much a memory volume would overrun the
// node's memory budget. It matches ErrMemoryBudget and ENOSPC.
type MemoryBudgetError struct {
	Name       string
	UsedBytes  int64 // memory volumes and reservations already held
	AddBytes   int64 // what the refused call asked for
	LimitBytes int64 // the budget
}

func (e *MemoryBudgetError) Error() string {
	return fmt.Sprintf("lu: memory budget of the node reached: %q needs %d bytes, %d of %d are taken (%d free)",
		e.Name, e.AddBytes, e.UsedBytes, e.LimitBytes, max(e.LimitBytes-e.UsedBytes, 0))
}

// Is makes a MemoryBudgetError match ErrMemoryBudget and syscall.ENOSPC.
func (e *MemoryBudgetError) Is(target error) bool {
	return target == ErrMemoryBudget || target == syscall.ENOSPC
}

// Get returns the named volume.
func (p *Pool) Get(name string) (Volume, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	e, ok := p.mu.vols[name]
	return e.vol, ok
}

// Names returns the volumes' names, sorted.
func (p *Pool) Names() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	names := make([]string, 0, len(p.mu.vols))
	for n := range p.mu.vols {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// Resize changes a volume's size online. Growing a file volume is checked
// against the overcommit limit; shrinking fails with ErrShrinkAllocated
// when the cut tail holds data.
func (p *Pool) Resize(name string, sizeBytes int64) error {
	if err := p.resize(name, sizeBytes); err != nil {
		return err
	}
	p.opts.Logger.Info("lu: volume resized", "name", name, "size_bytes", sizeBytes)
	p.CheckThresholds()
	return nil
}

func (p *Pool) resize(name string, sizeBytes int64) error {
	// The pool lock is held across the resize so that two grows cannot both
	// pass the overcommit check; I/O of other volumes does not take it.
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.mu.closed {
		return ErrPoolClosed
	}
	e, ok := p.mu.vols[name]
	if !ok {
		return fmt.Errorf("%w: %q", ErrNotFound, name)
	}
	if grow := sizeBytes - e.vol.Size(); grow > 0 && e.dir < 0 {
		if err := p.checkMemoryLocked(name, grow); err != nil {
			return err
		}
	}
	if grow := sizeBytes - e.vol.Size(); grow > 0 && e.dir >= 0 {
		stats, err := p.statfsAll()
		if err != nil {
			return err
		}
		if err := p.checkOvercommitLocked(stats, name, grow); err != nil {
			return err
		}
	}
	return e.vol.Resize(sizeBytes)
}

// Delete closes the volume (waiting for its I/O in flight; later I/O returns
// blockdev.ErrShutdown) and removes its files. A volume that linked clones
// read from is refused with ErrHasClones and left as it is.
func (p *Pool) Delete(name string) error {
	p.mu.Lock()
	if p.mu.closed {
		p.mu.Unlock()
		return ErrPoolClosed
	}
	e, ok := p.mu.vols[name]
	if !ok {
		p.mu.Unlock()
		return fmt.Errorf("%w: %q", ErrNotFound, name)
	}
	if clones := p.clonesOfLocked(e.vol); len(clones) > 0 {
		p.mu.Unlock()
		return fmt.Errorf("%w: %q is the base of %s", ErrHasClones, name, strings.Join(clones, ", "))
	}
	delete(p.mu.vols, name)
	p.mu.Unlock()
	err := e.vol.Close()
	if o := overlayOf(e.vol); o != nil {
		err = errors.Join(err, p.removeOverlayFiles(o, e.dir))
	} else if fv, ok := e.vol.(*FileVolume); ok {
		if rerr := p.opts.FS.Remove(fv.path); rerr != nil {
			return ioError("remove", fv.path, rerr)
		}
		if serr := p.opts.FS.SyncDir(p.dirs[e.dir]); serr != nil {
			err = errors.Join(err, ioError("sync directory", p.dirs[e.dir], serr))
		}
	}
	p.opts.Logger.Info("lu: volume deleted", "name", name)
	p.CheckThresholds()
	return err
}

// Status measures the pool and reports the level change, if any, to
// OnThreshold.
func (p *Pool) Status() PoolStatus {
	p.mu.Lock()
	entries := make([]poolEntry, 0, len(p.mu.vols))
	for _, e := range p.mu.vols {
		entries = append(entries, e)
	}
	memoryUsed := p.memoryUsedLocked("")
	p.mu.Unlock()

	st := PoolStatus{Dirs: make([]DirStatus, len(p.dirs)), Level: LevelOK, Volumes: len(entries),
		MemoryLimitBytes: p.opts.MemoryLimitBytes}
	stats := p.statfsBestEffort()
	for i, d := range p.dirs {
		ds := &st.Dirs[i]
		ds.Path = d
		ds.CapacityBytes, ds.FreeBytes = stats[i].CapacityBytes, stats[i].FreeBytes
	}
	for _, e := range entries {
		if e.dir < 0 {
			st.MemoryAllocatedBytes += e.vol.AllocatedBytes()
			st.MemoryProvisionedBytes += e.vol.Size()
			continue
		}
		ds := &st.Dirs[e.dir]
		ds.AllocatedBytes += e.vol.AllocatedBytes()
		ds.ProvisionedBytes += e.provisionedBytes()
		ds.Volumes++
	}
	for i := range st.Dirs {
		ds := &st.Dirs[i]
		ds.Level = p.level(ds.CapacityBytes, ds.FreeBytes)
		st.AllocatedBytes += ds.AllocatedBytes
		st.ProvisionedBytes += ds.ProvisionedBytes
		st.Level = worse(st.Level, ds.Level)
	}
	st.MemoryReservedBytes = memoryUsed - st.MemoryProvisionedBytes
	if st.MemoryBudgetBytes = p.opts.MemoryBudgetBytes; st.MemoryBudgetBytes > 0 {
		st.MemoryFreeBytes = max(st.MemoryBudgetBytes-memoryUsed, 0)
	}
	st.CapacityBytes, st.FreeBytes = totalCapacity(stats)
	if st.CapacityBytes > 0 {
		st.OvercommitRatio = float64(st.ProvisionedBytes) / float64(st.CapacityBytes)
	}
	p.noteLevel(st.Level)
	return st
}

// statfsBestEffort measures every directory, logging failures (a failed
// directory reports zeros).
func (p *Pool) statfsBestEffort() []lufs.Statfs {
	stats := make([]lufs.Statfs, len(p.dirs))
	for i, d := range p.dirs {
		st, err := p.opts.FS.Statfs(d)
		if err != nil {
			p.opts.Logger.Warn("lu: statfs failed", "dir", d, "err", err)
		}
		stats[i] = st
	}
	return stats
}

// CheckThresholds measures the directories (statfs only, cheap) and
// reports a level change to OnThreshold. The daemon calls it periodically;
// Create, Resize and Delete call it too.
func (p *Pool) CheckThresholds() PoolLevel {
	level := LevelOK
	for _, st := range p.statfsBestEffort() {
		level = worse(level, p.level(st.CapacityBytes, st.FreeBytes))
	}
	p.noteLevel(level)
	return level
}

func (p *Pool) level(capacity, free int64) PoolLevel {
	if capacity <= 0 {
		return LevelOK
	}
	used := 100 * float64(capacity-free) / float64(capacity)
	switch {
	case used >= p.opts.CriticalPercent:
		return LevelCritical
	case used >= p.opts.WarnPercent:
		return LevelWarn
	}
	return LevelOK
}

func worse(a, b PoolLevel) PoolLevel {
	rank := map[PoolLevel]int{LevelOK: 0, LevelWarn: 1, LevelCritical: 2}
	if rank[b] > rank[a] {
		return b
	}
	return a
}

// noteLevel records the level and calls OnThreshold outside the lock when
// it changed.
func (p *Pool) noteLevel(level PoolLevel) {
	p.mu.Lock()
	changed := p.mu.level != level
	old := p.mu.level
	p.mu.level = level
	p.mu.Unlock()
	if !changed {
		return
	}
	p.opts.Logger.Warn("lu: pool usage level changed", "from", old, "to", level)
	if p.opts.OnThreshold != nil {
		p.opts.OnThreshold(level)
	}
}

// Close flushes and closes every volume (I/O still in flight is waited
// for; later I/O returns blockdev.ErrShutdown). Later Pool calls return
// ErrPoolClosed; the files stay for the next OpenPool.
func (p *Pool) Close() error {
	p.mu.Lock()
	if p.mu.closed {
		p.mu.Unlock()
		return nil
	}
	p.mu.closed = true
	vols := p.mu.vols
	p.mu.vols = map[string]poolEntry{}
	p.mu.Unlock()
	var errs []error
	for _, e := range vols {
		errs = append(errs, e.vol.Flush(context.Background()), e.vol.Close())
	}
	return errors.Join(errs...)
}
