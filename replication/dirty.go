package replication

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"sort"
	"sync"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
)

// Dirty-region tracking.
//
// While a copy of an LU is not in sync, the writer records which parts of
// the LU changed without reaching that copy, so that a resync sends only
// those. The record has two levels:
//
//   - regions of RegionBytes (default 1 MiB), each kept as one key in a
//     Pebble store on the writer's disk, written with Sync before the write
//     that dirtied the region is acknowledged: a writer restart keeps them;
//   - inside a region, a mask of 4 KiB blocks kept in memory only: a resync
//     without a restart in between sends exactly the blocks written. After
//     a restart every block of a recorded region counts as dirty.
//
// Key layout (part of the on-disk format):
//
//	"dirty/" + LU name + "\x00" + copy node id + "\x00" + region index (8, big-endian) -> empty
const (
	dirtyBlockBytes  = 4096
	dirtyPrefix      = "dirty/"
	defaultRegionLen = 1 << 20
	// regionBytesMax bounds the region size so that one region's mask of
	// 4 KiB blocks stays a small fixed array.
	regionBytesMax = 4 << 20
	maskWords      = regionBytesMax / dirtyBlockBytes / 64
)

// ErrDirtyStoreClosed is returned by DirtyStore methods after Close.
var ErrDirtyStoreClosed = errors.New("replication: dirty-region store closed")

// DirtyStore persists dirty regions for every (LU, copy) pair of the
// writer node. Safe for concurrent use.
type DirtyStore struct {
	db *pebble.DB
}

// OpenDirtyStore opens (creating if needed) the store in dir on fs (nil
// means the OS file system).
func OpenDirtyStore(dir string, fs vfs.FS) (*DirtyStore, error) {
	if fs == nil {
		fs = vfs.Default
	}
	db, err := pebble.Open(dir, &pebble.Options{FS: fs, Logger: quietPebbleLogger{}})
	if err != nil {
		return nil, fmt.Errorf("replication: open dirty-region store %s: %w", dir, err)
	}
	return &DirtyStore{db: db}, nil
}

// Close closes the store.
func (s *DirtyStore) Close() error { return s.db.Close() }

func dirtyKeyPrefix(luName, node string) []byte {
	return []byte(dirtyPrefix + luName + "\x00" + node + "\x00")
}

func dirtyKey(luName, node string, region uint64) []byte {
	k := dirtyKeyPrefix(luName, node)
	return binary.BigEndian.AppendUint64(k, region)
}

// load returns the recorded regions of (luName, node) in ascending order.
func (s *DirtyStore) load(luName, node string) ([]uint64, error) {
	prefix := dirtyKeyPrefix(luName, node)
	upper := append(append([]byte(nil), prefix[:len(prefix)-1]...), 1)
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: prefix, UpperBound: upper})
	if err != nil {
		return nil, err
	}
	var out []uint64
	for it.First(); it.Valid(); it.Next() {
		k := it.Key()
		if len(k) != len(prefix)+8 {
			continue
		}
		out = append(out, binary.BigEndian.Uint64(k[len(prefix):]))
	}
	return out, errors.Join(it.Error(), it.Close())
}

// mark records regions durably (one synced batch).
func (s *DirtyStore) mark(luName, node string, regions []uint64) error {
	b := s.db.NewBatch()
	for _, r := range regions {
		if err := b.Set(dirtyKey(luName, node, r), nil, nil); err != nil {
			return err
		}
	}
	return b.Commit(pebble.Sync)
}

// clear forgets one region. Not synced: after a crash the region is sent
// again, which is harmless.
func (s *DirtyStore) clear(luName, node string, region uint64) error {
	return s.db.Delete(dirtyKey(luName, node, region), pebble.NoSync)
}

// drop forgets every region of (luName, node).
func (s *DirtyStore) drop(luName, node string) error {
	prefix := dirtyKeyPrefix(luName, node)
	upper := append(append([]byte(nil), prefix[:len(prefix)-1]...), 1)
	return s.db.DeleteRange(prefix, upper, pebble.Sync)
}

type quietPebbleLogger struct{}

func (quietPebbleLogger) Infof(string, ...interface{})  {}
func (quietPebbleLogger) Errorf(string, ...interface{}) {}
func (quietPebbleLogger) Fatalf(format string, args ...interface{}) {
	panic(fmt.Sprintf("pebble: "+format, args...))
}

// dirtyMap is the dirty record of one copy of one LU on the writer.
type dirtyMap struct {
	store       *DirtyStore // nil: memory only (tests, memory LUs)
	luName      string
	node        string
	regionBytes int64

	mu struct {
		sync.Mutex
		// regions maps a region index to its mask of dirty 4 KiB blocks;
		// a region is present iff it is recorded in the store. Guarded by mu.
		regions map[uint64]*[maskWords]uint64
	}
}

func newDirtyMap(store *DirtyStore, luName, node string, regionBytes int64) (*dirtyMap, error) {
	if regionBytes <= 0 || regionBytes > regionBytesMax || regionBytes%dirtyBlockBytes != 0 {
		return nil, fmt.Errorf("replication: dirty region size %d: use a multiple of 4096 up to %d", regionBytes, regionBytesMax)
	}
	d := &dirtyMap{store: store, luName: luName, node: node, regionBytes: regionBytes}
	d.mu.regions = map[uint64]*[maskWords]uint64{}
	if store != nil {
		recorded, err := store.load(luName, node)
		if err != nil {
			return nil, err
		}
		for _, r := range recorded {
			d.mu.regions[r] = d.fullMask()
		}
	}
	return d, nil
}

func (d *dirtyMap) blocksPerRegion() int64 { return d.regionBytes / dirtyBlockBytes }

func (d *dirtyMap) fullMask() *[maskWords]uint64 {
	var m [maskWords]uint64
	n := d.blocksPerRegion()
	for i := int64(0); i < n; i++ {
		m[i/64] |= 1 << (i % 64)
	}
	return &m
}

// mark records [off, off+length) as dirty; it returns once every newly
// dirtied region is durable in the store. Marking is serialized so that a
// second write into a region being recorded cannot be acknowledged before
// the record is durable.
func (d *dirtyMap) mark(off, length int64) error {
	if length <= 0 {
		return nil
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	first, last := off/dirtyBlockBytes, (off+length-1)/dirtyBlockBytes
	bpr := d.blocksPerRegion()
	var fresh []uint64
	for r := first / bpr; r <= last/bpr; r++ {
		if _, ok := d.mu.regions[uint64(r)]; !ok {
			fresh = append(fresh, uint64(r))
		}
	}
	if len(fresh) > 0 && d.store != nil {
		if err := d.store.mark(d.luName, d.node, fresh); err != nil {
			return fmt.Errorf("replication: record dirty regions of %s for %s: %w", d.luName, d.node, err)
		}
	}
	for b := first; b <= last; b++ {
		r := uint64(b / bpr)
		m := d.mu.regions[r]
		if m == nil {
			m = new([maskWords]uint64)
			d.mu.regions[r] = m
		}
		i := b % bpr
		m[i/64] |= 1 << (i % 64)
	}
	return nil
}

// regionList returns the dirty regions in ascending order.
func (d *dirtyMap) regionList() []uint64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make([]uint64, 0, len(d.mu.regions))
	for r := range d.mu.regions {
		out = append(out, r)
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

// takeRegion returns the dirty block runs of region r as byte ranges
// (relative to the LU) and clears them in memory; the caller sends them and
// then calls doneRegion, or markRuns again if sending failed.
func (d *dirtyMap) takeRegion(r uint64) [][2]int64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	m := d.mu.regions[r]
	if m == nil {
		return nil
	}
	var runs [][2]int64
	bpr := d.blocksPerRegion()
	base := int64(r) * d.regionBytes
	for i := int64(0); i < bpr; {
		if m[i/64]&(1<<(i%64)) == 0 {
			i++
			continue
		}
		j := i
		for j < bpr && m[j/64]&(1<<(j%64)) != 0 {
			j++
		}
		runs = append(runs, [2]int64{base + i*dirtyBlockBytes, (j - i) * dirtyBlockBytes})
		i = j
	}
	*m = [maskWords]uint64{}
	return runs
}

// doneRegion forgets region r if no block of it was dirtied again since
// takeRegion.
func (d *dirtyMap) doneRegion(r uint64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	m := d.mu.regions[r]
	if m == nil {
		return nil
	}
	for _, w := range m {
		if w != 0 {
			return nil
		}
	}
	delete(d.mu.regions, r)
	if d.store != nil {
		return d.store.clear(d.luName, d.node, r)
	}
	return nil
}

// dirtyBytes is the number of dirty bytes known in memory.
func (d *dirtyMap) dirtyBytes() int64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	var n int64
	for _, m := range d.mu.regions {
		for _, w := range m {
			n += int64(bits.OnesCount64(w))
		}
	}
	return n * dirtyBlockBytes
}

// empty reports whether no region is dirty.
func (d *dirtyMap) empty() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.mu.regions) == 0
}

// reset forgets everything (the copy was dropped or rebuilt from scratch).
func (d *dirtyMap) reset() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.mu.regions = map[uint64]*[maskWords]uint64{}
	if d.store != nil {
		return d.store.drop(d.luName, d.node)
	}
	return nil
}
