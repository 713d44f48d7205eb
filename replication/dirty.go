package replication

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"github.com/lupool/lupool/internal/rules"
	"hash/crc32"
	"io"
	"math/bits"
	"sort"
	"strings"
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
// # On-disk format
//
// Keys (part of the on-disk format):
//
//	"dirty/" + LU name + "\x00" + copy node id + "\x00" + region index (8, big-endian)
//	"unknown/" + LU name + "\x00" + copy node id
//	"writer/" + LU name
//	"active/" + LU name + "\x00" + region index (8, big-endian)
//	"meta/state"
//	"meta/seq"
//
// A dirty key records a region the copy lacks. An unknown key says the
// copy's dirty record was not trusted (the store was in doubt) and the copy
// must be compared region by region by hash before it is in sync; it is
// deleted once that compare is done. A writer key says this node keeps the
// LU's records as its writer: a node that becomes the writer of an LU
// (promoted by a failover, or moved to) finds none and knows that it has no
// record of what its copies lack, so it compares every copy that is not in
// sync by hashes, except the old writer, whose record starts empty at the
// promotion and which resync asks for its activity log; a node that stops
// being the writer drops the LU's records and the key (not its activity
// log, which it keeps for the new writer). An active key is an activity-log entry (actlog.go):
// a region of the LU that may have had a write in flight when this node
// last wrote it, recorded with Sync before that write was issued. The
// state key is the shutdown marker.
//
// Every value (part of the on-disk format) is
//
//	+-------------+-------------+-------------------------+
//	| version (1) | payload (n) | crc32c (4, big-endian)  |
//	+-------------+-------------+-------------------------+
//
// where version is dirtyRecordVersion (1) and crc32c (Castagnoli) covers
// key || version || payload. Dirty, unknown and writer values have an
// empty payload (5 bytes in all); an active value's payload is the region
// size in bytes (8, big-endian); the state's payload is "open, logged",
// "clean" or "doubt: " + the reason the store is in doubt ("open" alone
// was written before the activity log existed); the seq value's payload
// is the number of the last synced batch (8, big-endian).
//
// Every batch written with Sync carries the next number in "meta/seq";
// once it is durable, the number is written (8 bytes, big-endian, at
// offset 0) and synced to the witness file dir + ".seq" beside the store.
// Pebble replays its log up to the first bad record and silently drops the
// rest, synced records included: a store whose number is below its
// witness's lost records and is in doubt.
//
// # Doubt
//
// A store whose records cannot all be trusted is in doubt (Doubt): a record
// fails its checksum or Pebble reports corruption; the store was not closed
// cleanly by a version that kept no activity log (state "open": nothing
// then says which writes were in flight at the crash); the state is
// missing in a store that has records; the store is missing or empty
// although the caller expected it (DirtyStoreOptions.ExpectExisting); or an
// earlier start was in doubt and Trust was not called since (state
// "doubt: ..."). A Pebble store that does not open for corruption is moved
// aside to dir + ".corrupt" and a fresh one is created, in doubt. While in
// doubt the writer trusts no dirty record: every copy not in sync is marked
// unknown and resynced by region hashes, and so is every copy in sync.
// Close keeps the doubt on disk until Trust.
//
// # Crash
//
// A store not closed cleanly whose state is "open, logged" is not in doubt
// but Crashed: every record the previous run relied on was written with
// Sync before the write it covers was acknowledged (dirty, unknown,
// writer) or issued (active), so a crash, even of the machine, keeps them;
// what a crash may lose (Pebble silently drops a torn record at the tail
// of its log) are unsynced deletes, which only make a resync send or
// compare a region again. The writer of each LU then takes the LU's
// activity-log regions as regions every other copy may lack (actlog.go).
//
// Close writes the state "clean", flushes the log into a table (whose
// blocks Pebble checksums on every read) and closes; open reads the state,
// verifies every record, and records "open, logged" (or the doubt), synced,
// before it returns.
const (
	dirtyBlockBytes = rules.BlockBytes
	dirtyPrefix     = "dirty/"
	unknownPrefix   = "unknown/"
	writerPrefix    = "writer/"
	activePrefix    = "active/"
	stateKey        = "meta/state"
	seqKey          = "meta/seq"
	// seqFileSuffix names the witness file beside the store: dir + suffix.
	seqFileSuffix    = ".seq"
	defaultRegionLen = rules.DirtyRegionBytesDefault
	// regionBytesMax bounds the region size so that one region's mask of
	// 4 KiB blocks stays a small fixed array.
	regionBytesMax = rules.DirtyRegionBytesMax
	maskWords      = regionBytesMax / dirtyBlockBytes / 64

	// dirtyRecordVersion is the version byte of every value. Part of the
	// on-disk format.
	dirtyRecordVersion = 1
	// recordOverheadBytes is a value's size beyond its payload: version
	// and crc32c.
	recordOverheadBytes = 1 + 4

	// stateOpen is the state an older version recorded while open.
	stateOpen       = "open"
	stateOpenLogged = "open, logged"
	stateClean      = "clean"
	stateDoubt      = "doubt: "
)

var (
	// ErrDirtyStoreClosed is returned by DirtyStore methods after Close.
	ErrDirtyStoreClosed = errors.New("replication: dirty-region store closed")
	// ErrDirtyCorrupt is returned (wrapped) when a dirty-region record does
	// not check out: its key has the wrong shape, its value fails its
	// checksum, or Pebble reports corruption reading it. Such a record is
	// never skipped; the store is then in doubt.
	ErrDirtyCorrupt = errors.New("replication: dirty-region store corrupt")
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// encodeRecord returns the value stored under key for payload.
func encodeRecord(key, payload []byte) []byte {
	v := make([]byte, 0, len(payload)+recordOverheadBytes)
	v = append(v, dirtyRecordVersion)
	v = append(v, payload...)
	crc := crc32.Update(crc32.Checksum(key, castagnoli), castagnoli, v)
	return binary.BigEndian.AppendUint32(v, crc)
}

// decodeRecord checks value against key and returns its payload (aliasing
// value), or an error wrapping ErrDirtyCorrupt.
func decodeRecord(key, value []byte) ([]byte, error) {
	if len(value) < recordOverheadBytes {
		return nil, fmt.Errorf("%w: key %q: value of %d bytes, want at least %d", ErrDirtyCorrupt, key, len(value), recordOverheadBytes)
	}
	body, sum := value[:len(value)-4], binary.BigEndian.Uint32(value[len(value)-4:])
	if body[0] != dirtyRecordVersion {
		return nil, fmt.Errorf("%w: key %q: record version %d, want %d", ErrDirtyCorrupt, key, body[0], dirtyRecordVersion)
	}
	if crc := crc32.Update(crc32.Checksum(key, castagnoli), castagnoli, body); crc != sum {
		return nil, fmt.Errorf("%w: key %q: checksum %08x, recorded %08x", ErrDirtyCorrupt, key, crc, sum)
	}
	return body[1:], nil
}

// checkKey reports whether key has the shape of one of the store's keys.
func checkKey(key []byte) error {
	k := string(key)
	switch {
	case k == stateKey, k == seqKey:
		return nil
	case strings.HasPrefix(k, dirtyPrefix):
		// LU + NUL + node + NUL + region index (8 bytes of any value); LU
		// and node are non-empty and NUL-free.
		if rest := k[len(dirtyPrefix):]; len(rest) > 8 {
			if parts := strings.Split(rest[:len(rest)-8], "\x00"); len(parts) == 3 && parts[0] != "" && parts[1] != "" && parts[2] == "" {
				return nil
			}
		}
	case strings.HasPrefix(k, activePrefix):
		// LU + NUL + region index (8 bytes of any value).
		if rest := k[len(activePrefix):]; len(rest) > 9 {
			if lu := rest[:len(rest)-8]; strings.HasSuffix(lu, "\x00") && len(lu) > 1 && !strings.Contains(lu[:len(lu)-1], "\x00") {
				return nil
			}
		}
	case strings.HasPrefix(k, writerPrefix):
		if rest := k[len(writerPrefix):]; rest != "" && !strings.Contains(rest, "\x00") {
			return nil
		}
	case strings.HasPrefix(k, unknownPrefix):
		if parts := strings.Split(k[len(unknownPrefix):], "\x00"); len(parts) == 2 && parts[0] != "" && parts[1] != "" {
			return nil
		}
	}
	return fmt.Errorf("%w: key %q has no known shape", ErrDirtyCorrupt, key)
}

// markCorrupt wraps a Pebble corruption error as ErrDirtyCorrupt.
func markCorrupt(err error) error {
	if err != nil && pebble.IsCorruptionError(err) && !errors.Is(err, ErrDirtyCorrupt) {
		return fmt.Errorf("%w: %w", ErrDirtyCorrupt, err)
	}
	return err
}

// DirtyStoreOptions configure OpenDirtyStoreOptions.
type DirtyStoreOptions struct {
	// FS is where the store lives; nil means the OS file system.
	FS vfs.FS
	// ExpectExisting says this is not the node's first start with its data
	// directory: a missing or empty store then lost its records and is in
	// doubt. False creates a missing store as a fresh, trusted one.
	ExpectExisting bool
}

// DirtyStore persists dirty regions for every (LU, copy) pair of the
// writer node. Safe for concurrent use.
type DirtyStore struct {
	db  *pebble.DB
	dir string

	mu struct {
		sync.RWMutex
		// closed is set by Close; every operation checks it with mu held
		// shared. Guarded by mu.
		closed bool
		// doubt is why the store is not trusted (nil: trusted); decided
		// at open, cleared by Trust. Guarded by mu.
		doubt error
	}
	// crashed says the previous run did not close the store, which was
	// not in doubt otherwise (see Crashed). Set at open.
	crashed bool

	// seq numbers the synced batches (commitSynced); seqFile is the
	// witness file that holds the last number, written after the batch.
	seqMu   sync.Mutex
	seq     uint64
	seqFile vfs.File
}

// commitSynced commits b with Sync, numbered: the batch carries the next
// sequence number (seqKey), and once it is durable the witness file beside
// the store is overwritten with that number and synced too. At open, a
// store whose number is below its witness's lost synced records (Pebble
// drops a corrupt record at the tail of its log, and everything after it,
// without an error): it is in doubt.
func (s *DirtyStore) commitSynced(b *pebble.Batch) error {
	s.seqMu.Lock()
	defer s.seqMu.Unlock()
	next := s.seq + 1
	k := []byte(seqKey)
	if err := b.Set(k, encodeRecord(k, binary.BigEndian.AppendUint64(nil, next)), nil); err != nil {
		return errors.Join(err, b.Close())
	}
	if err := b.Commit(pebble.Sync); err != nil {
		return err
	}
	s.seq = next
	if s.seqFile == nil {
		return nil
	}
	var w [8]byte
	binary.BigEndian.PutUint64(w[:], next)
	if _, err := s.seqFile.WriteAt(w[:], 0); err != nil {
		return fmt.Errorf("replication: write the dirty-region store's witness: %w", err)
	}
	if err := s.seqFile.Sync(); err != nil {
		return fmt.Errorf("replication: sync the dirty-region store's witness: %w", err)
	}
	return nil
}

// openWitness opens (creating) the witness file at path and returns the
// number it holds (0 for a new or short file).
func openWitness(fs vfs.FS, path string) (vfs.File, uint64, error) {
	_, statErr := fs.Stat(path)
	f, err := fs.OpenReadWrite(path, vfs.WriteCategoryUnspecified)
	if err != nil {
		return nil, 0, err
	}
	if statErr != nil {
		// A new file: its directory entry must survive a crash too.
		d, err := fs.OpenDir(fs.PathDir(path))
		if err == nil {
			err = errors.Join(d.Sync(), d.Close())
		}
		if err != nil {
			return nil, 0, errors.Join(err, f.Close())
		}
	}
	var b [8]byte
	if n, err := f.ReadAt(b[:], 0); n < len(b) {
		if err != nil && !errors.Is(err, io.EOF) {
			return nil, 0, errors.Join(err, f.Close())
		}
		return f, 0, nil
	}
	return f, binary.BigEndian.Uint64(b[:]), nil
}

// storedSeq returns the sequence number recorded in the store (0: none).
func (s *DirtyStore) storedSeq() (uint64, error) {
	k := []byte(seqKey)
	v, closer, err := s.db.Get(k)
	if errors.Is(err, pebble.ErrNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, markCorrupt(err)
	}
	defer closer.Close()
	payload, err := decodeRecord(k, v)
	if err != nil || len(payload) != 8 {
		return 0, fmt.Errorf("%w: sequence record", ErrDirtyCorrupt)
	}
	return binary.BigEndian.Uint64(payload), nil
}

// OpenDirtyStore opens (creating if needed) the store in dir on fs (nil
// means the OS file system), as a first start would: a missing store is
// created fresh and trusted. OpenDirtyStoreOptions with ExpectExisting is
// the call for a node that started before.
func OpenDirtyStore(dir string, fs vfs.FS) (*DirtyStore, error) {
	return OpenDirtyStoreOptions(dir, DirtyStoreOptions{FS: fs})
}

// OpenDirtyStoreOptions opens (creating if needed) the store in dir,
// verifies every record and the shutdown marker, and decides whether the
// store is in doubt (see Doubt). A store that Pebble cannot open for
// corruption is moved aside to dir + ".corrupt" (replacing an older one)
// and created afresh, in doubt. It returns an error only when the store
// cannot be opened, read or written at all (not for corruption).
func OpenDirtyStoreOptions(dir string, opts DirtyStoreOptions) (*DirtyStore, error) {
	fs := opts.FS
	if fs == nil {
		fs = vfs.Default
	}
	var doubts []string
	moveAside := func(cause error) error {
		aside := dir + ".corrupt"
		if rmErr := fs.RemoveAll(aside); rmErr != nil {
			return fmt.Errorf("replication: dirty-region store %s is corrupt (%v) and %s cannot be removed to move it aside: %w", dir, cause, aside, rmErr)
		}
		if mvErr := fs.Rename(dir, aside); mvErr != nil {
			return fmt.Errorf("replication: dirty-region store %s is corrupt (%v) and cannot be moved aside to %s: %w", dir, cause, aside, mvErr)
		}
		doubts = append(doubts, fmt.Sprintf("store corrupt (%v), moved aside to %s", cause, aside))
		return nil
	}
	db, err := openPebble(dir, fs)
	if err != nil && pebble.IsCorruptionError(err) {
		if err := moveAside(err); err != nil {
			return nil, err
		}
		db, err = openPebble(dir, fs)
	}
	if err != nil {
		return nil, fmt.Errorf("replication: open dirty-region store %s: %w", dir, err)
	}
	s := &DirtyStore{db: db, dir: dir}
	why, crashed, err := s.check(opts.ExpectExisting && len(doubts) == 0)
	if err != nil && pebble.IsCorruptionError(err) {
		// A store that opens but cannot be read through would stay in
		// doubt at every start (Trust cannot read it either): start a
		// fresh one; the doubt makes every Mirror mark its copies that
		// are not in sync unknown in it again.
		if cerr := db.Close(); cerr != nil && !pebble.IsCorruptionError(cerr) {
			return nil, fmt.Errorf("replication: close corrupt dirty-region store %s: %w", dir, cerr)
		}
		if err := moveAside(err); err != nil {
			return nil, err
		}
		if db, err = openPebble(dir, fs); err != nil {
			return nil, fmt.Errorf("replication: open dirty-region store %s: %w", dir, err)
		}
		s = &DirtyStore{db: db, dir: dir}
		why, crashed, err = s.check(false)
	}
	if err != nil {
		return nil, errors.Join(fmt.Errorf("replication: check dirty-region store %s: %w", dir, err), db.Close())
	}
	if why != "" {
		doubts = append(doubts, why)
	}
	witness, witnessed, err := openWitness(fs, dir+seqFileSuffix)
	if err != nil {
		return nil, errors.Join(fmt.Errorf("replication: open the witness of dirty-region store %s: %w", dir, err), db.Close())
	}
	s.seqFile = witness
	stored, err := s.storedSeq()
	if err != nil {
		doubts = append(doubts, fmt.Sprintf("sequence record unreadable (%v)", err))
	} else if stored < witnessed {
		doubts = append(doubts, fmt.Sprintf("records synced before the stop are missing (store at batch %d, its witness at %d)", stored, witnessed))
	}
	s.seq = max(stored, witnessed)
	state := stateOpenLogged
	s.crashed = crashed && len(doubts) == 0
	if len(doubts) > 0 {
		s.mu.doubt = fmt.Errorf("replication: dirty-region store %s in doubt: %s", dir, strings.Join(doubts, "; "))
		state = stateDoubt + strings.Join(doubts, "; ")
	}
	if err := s.setState(state); err != nil {
		return nil, errors.Join(fmt.Errorf("replication: record dirty-region store %s %s: %w", dir, state, err), db.Close(), witness.Close())
	}
	return s, nil
}

func openPebble(dir string, fs vfs.FS) (*pebble.DB, error) {
	return pebble.Open(dir, &pebble.Options{FS: fs, Logger: quietPebbleLogger{},
		// Pebble's default reports on-disk corruption through
		// Logger.Fatalf; the read that found it returns the error too,
		// and that is where the store handles it (doubt, ErrDirtyCorrupt).
		EventListener: &pebble.EventListener{DataCorruption: func(pebble.DataCorruptionInfo) {}}})
}

// check reads the state and verifies every record; it returns why the
// store is in doubt ("" when it is trusted) and whether the previous run
// crashed with an activity log, or an error other than corruption.
func (s *DirtyStore) check(expectExisting bool) (string, bool, error) {
	it, err := s.db.NewIter(nil)
	if err != nil {
		return "", false, err
	}
	var records, bad int
	var firstBad error
	state, haveState, crashed := "", false, false
	for it.First(); it.Valid(); it.Next() {
		records++
		k := it.Key()
		err := checkKey(k)
		var payload []byte
		if err == nil {
			payload, err = decodeRecord(k, it.Value())
		}
		if err != nil {
			bad++
			if firstBad == nil {
				firstBad = err
			}
			continue
		}
		if string(k) == stateKey {
			state, haveState = string(payload), true
		}
	}
	iterErr := errors.Join(it.Error(), it.Close())
	var why []string
	if iterErr != nil {
		// Corruption Pebble finds while reading (a block checksum) is
		// returned as an error: the caller starts a fresh store.
		return "", false, iterErr
	}
	if bad > 0 {
		why = append(why, fmt.Sprintf("%d of %d records fail their check (first: %v)", bad, records, firstBad))
	}
	switch {
	case records == 0 && iterErr == nil:
		if expectExisting {
			why = append(why, "store missing or empty on a node that started before")
		}
	case !haveState:
		why = append(why, "no shutdown marker")
	case state == stateOpen:
		why = append(why, "not closed cleanly, by a version without an activity log")
	case state == stateOpenLogged:
		crashed = true
	case strings.HasPrefix(state, stateDoubt):
		why = append(why, "still in doubt from an earlier start ("+strings.TrimPrefix(state, stateDoubt)+")")
	case state != stateClean:
		why = append(why, fmt.Sprintf("unknown shutdown marker %q", state))
	}
	return strings.Join(why, "; "), crashed, nil
}

func (s *DirtyStore) setState(state string) error {
	k := []byte(stateKey)
	b := s.db.NewBatch()
	if err := b.Set(k, encodeRecord(k, []byte(state)), nil); err != nil {
		return errors.Join(err, b.Close())
	}
	return s.commitSynced(b)
}

// Doubt returns nil when the store's records can be trusted, else why not
// (decided at open; see the Dirty-region tracking notes). Safe for
// concurrent use; a nil store (dirty regions kept in memory only) is
// trusted.
func (s *DirtyStore) Doubt() error {
	if s == nil {
		return nil
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.mu.doubt
}

// Crashed reports whether the previous run stopped without closing the
// store (a crash, kill -9) while the store was otherwise trusted: its
// records hold, and every region with a write in flight then is in the
// activity log. False for a nil store.
func (s *DirtyStore) Crashed() bool { return s != nil && s.crashed }

// Trust ends a doubt: the caller has marked every copy not in sync of
// every LU this node writes unknown (each Mirror does so when it is
// created while the store is in doubt), so the old records are no longer
// needed. It deletes every record that fails its check and records the
// store open. Until Trust, the doubt survives restarts. It returns an error
// wrapping ErrDirtyCorrupt when the store cannot be read through (the doubt
// then stays), or ErrDirtyStoreClosed after Close.
func (s *DirtyStore) Trust() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.mu.closed {
		return ErrDirtyStoreClosed
	}
	if s.mu.doubt == nil {
		return nil
	}
	it, err := s.db.NewIter(nil)
	if err != nil {
		return err
	}
	b := s.db.NewBatch()
	for it.First(); it.Valid(); it.Next() {
		k := it.Key()
		err := checkKey(k)
		if err == nil {
			_, err = decodeRecord(k, it.Value())
		}
		if err != nil {
			if err := b.Delete(k, nil); err != nil {
				return errors.Join(err, it.Close(), b.Close())
			}
		}
	}
	if err := errors.Join(it.Error(), it.Close()); err != nil {
		return errors.Join(markCorrupt(err), b.Close())
	}
	k := []byte(stateKey)
	if err := b.Set(k, encodeRecord(k, []byte(stateOpenLogged)), nil); err != nil {
		return errors.Join(err, b.Close())
	}
	if err := s.commitSynced(b); err != nil {
		return err
	}
	s.mu.doubt = nil
	return nil
}

// Close records a clean shutdown (unless the store is in doubt: the doubt
// is kept), flushes and closes the store. Operations must have ended; a
// second Close returns ErrDirtyStoreClosed.
func (s *DirtyStore) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.mu.closed {
		return ErrDirtyStoreClosed
	}
	s.mu.closed = true
	var err error
	if s.mu.doubt == nil {
		err = s.setState(stateClean)
	}
	if err == nil {
		err = s.db.Flush()
	}
	err = errors.Join(err, s.db.Close())
	if s.seqFile != nil {
		err = errors.Join(err, s.seqFile.Close())
	}
	return err
}

// use takes the store for one operation; the returned func ends it.
func (s *DirtyStore) use() (func(), error) {
	s.mu.RLock()
	if s.mu.closed {
		s.mu.RUnlock()
		return nil, ErrDirtyStoreClosed
	}
	return s.mu.RUnlock, nil
}

func dirtyKeyPrefix(luName, node string) []byte {
	return []byte(dirtyPrefix + luName + "\x00" + node + "\x00")
}

func dirtyKey(luName, node string, region uint64) []byte {
	k := dirtyKeyPrefix(luName, node)
	return binary.BigEndian.AppendUint64(k, region)
}

func unknownKey(luName, node string) []byte {
	return []byte(unknownPrefix + luName + "\x00" + node)
}

// prefixEnd is the smallest key above every key starting with prefix
// (whose last byte is 0).
func prefixEnd(prefix []byte) []byte {
	return append(bytes.Clone(prefix[:len(prefix)-1]), 1)
}

// load returns the recorded regions of (luName, node) in ascending order.
// A record that does not check out is reported as an error wrapping
// ErrDirtyCorrupt, never skipped.
func (s *DirtyStore) load(luName, node string) ([]uint64, error) {
	done, err := s.use()
	if err != nil {
		return nil, err
	}
	defer done()
	prefix := dirtyKeyPrefix(luName, node)
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: prefix, UpperBound: prefixEnd(prefix)})
	if err != nil {
		return nil, err
	}
	var out []uint64
	for it.First(); it.Valid(); it.Next() {
		k := it.Key()
		if len(k) != len(prefix)+8 {
			err = fmt.Errorf("%w: key %q of %s/%s: %d bytes, want %d", ErrDirtyCorrupt, k, luName, node, len(k), len(prefix)+8)
			break
		}
		if _, err = decodeRecord(k, it.Value()); err != nil {
			break
		}
		out = append(out, binary.BigEndian.Uint64(k[len(prefix):]))
	}
	if err = errors.Join(err, markCorrupt(it.Error()), it.Close()); err != nil {
		return nil, err
	}
	return out, nil
}

// mark records regions durably (one synced batch).
func (s *DirtyStore) mark(luName, node string, regions []uint64) error {
	return s.setRegions(regions, func(r uint64) []byte { return dirtyKey(luName, node, r) }, nil)
}

// setRegions records the key of each region, each value with payload, in
// one synced batch.
func (s *DirtyStore) setRegions(regions []uint64, key func(uint64) []byte, payload []byte) error {
	done, err := s.use()
	if err != nil {
		return err
	}
	defer done()
	b := s.db.NewBatch()
	for _, r := range regions {
		k := key(r)
		if err := b.Set(k, encodeRecord(k, payload), nil); err != nil {
			return errors.Join(err, b.Close())
		}
	}
	return s.commitSynced(b)
}

// clear forgets one region. Not synced: after a crash the region is sent
// again, which is harmless.
func (s *DirtyStore) clear(luName, node string, region uint64) error {
	done, err := s.use()
	if err != nil {
		return err
	}
	defer done()
	return s.db.Delete(dirtyKey(luName, node, region), pebble.NoSync)
}

// drop forgets every region of (luName, node), and its unknown mark.
func (s *DirtyStore) drop(luName, node string) error {
	return s.replace(luName, node, false)
}

// markUnknown durably replaces the record of (luName, node) by an unknown
// mark: the copy must be compared by hashes.
func (s *DirtyStore) markUnknown(luName, node string) error {
	return s.replace(luName, node, true)
}

func (s *DirtyStore) replace(luName, node string, unknown bool) error {
	done, err := s.use()
	if err != nil {
		return err
	}
	defer done()
	prefix := dirtyKeyPrefix(luName, node)
	b := s.db.NewBatch()
	err = b.DeleteRange(prefix, prefixEnd(prefix), nil)
	if k := unknownKey(luName, node); err == nil && unknown {
		err = b.Set(k, encodeRecord(k, nil), nil)
	} else if err == nil {
		err = b.Delete(k, nil)
	}
	if err != nil {
		return errors.Join(err, b.Close())
	}
	return s.commitSynced(b)
}

// isWriter reports whether this node keeps the records of luName as its
// writer (a writer key). A key that fails its check counts as absent.
func (s *DirtyStore) isWriter(luName string) (bool, error) {
	done, err := s.use()
	if err != nil {
		return false, err
	}
	defer done()
	k := []byte(writerPrefix + luName)
	v, closer, err := s.db.Get(k)
	if errors.Is(err, pebble.ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, markCorrupt(err)
	}
	defer closer.Close()
	_, err = decodeRecord(k, v)
	return err == nil, nil
}

// setWriter records, synced, that this node keeps luName's records.
func (s *DirtyStore) setWriter(luName string) error {
	done, err := s.use()
	if err != nil {
		return err
	}
	defer done()
	k := []byte(writerPrefix + luName)
	b := s.db.NewBatch()
	if err := b.Set(k, encodeRecord(k, nil), nil); err != nil {
		return errors.Join(err, b.Close())
	}
	return s.commitSynced(b)
}

// dropLU forgets every record of luName (all copies, unknown marks and
// the writer key), synced: this node is not its writer (any more).
func (s *DirtyStore) dropLU(luName string) error {
	done, err := s.use()
	if err != nil {
		return err
	}
	defer done()
	b := s.db.NewBatch()
	for _, prefix := range [][]byte{[]byte(dirtyPrefix + luName + "\x00"), []byte(unknownPrefix + luName + "\x00")} {
		if err := b.DeleteRange(prefix, prefixEnd(prefix), nil); err != nil {
			return errors.Join(err, b.Close())
		}
	}
	if err := b.Delete([]byte(writerPrefix+luName), nil); err != nil {
		return errors.Join(err, b.Close())
	}
	return s.commitSynced(b)
}

// clearUnknown deletes the unknown mark of (luName, node), synced.
func (s *DirtyStore) clearUnknown(luName, node string) error {
	done, err := s.use()
	if err != nil {
		return err
	}
	defer done()
	b := s.db.NewBatch()
	if err := b.Delete(unknownKey(luName, node), nil); err != nil {
		return errors.Join(err, b.Close())
	}
	return s.commitSynced(b)
}

// isUnknown reports whether (luName, node) carries an unknown mark. A mark
// that fails its check counts as present.
func (s *DirtyStore) isUnknown(luName, node string) (bool, error) {
	done, err := s.use()
	if err != nil {
		return false, err
	}
	defer done()
	_, closer, err := s.db.Get(unknownKey(luName, node))
	if errors.Is(err, pebble.ErrNotFound) {
		return false, nil
	}
	if err != nil {
		if pebble.IsCorruptionError(err) {
			return true, nil
		}
		return false, err
	}
	defer closer.Close()
	return true, nil
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
		// unknown says the record cannot be trusted: the copy may lack any
		// part of the LU and is compared by region hashes before it is in
		// sync. Guarded by mu.
		unknown bool
		// compare are regions recorded from an activity log: the copy
		// may or may not differ there, so resync compares each by hash
		// before it sends it. Memory only (after a restart the region
		// is sent). Guarded by mu.
		compare map[uint64]bool
	}
}

func newDirtyMap(store *DirtyStore, luName, node string, regionBytes int64) (*dirtyMap, error) {
	if err := rules.DirtyRegion(regionBytes); err != nil {
		return nil, fmt.Errorf("replication: dirty region size %d: %w", regionBytes, err)
	}
	d := &dirtyMap{store: store, luName: luName, node: node, regionBytes: regionBytes}
	d.mu.regions = map[uint64]*[maskWords]uint64{}
	if store == nil {
		return d, nil
	}
	if store.Doubt() != nil {
		d.mu.unknown = true
		return d, nil
	}
	unknown, err := store.isUnknown(luName, node)
	if err != nil {
		return nil, err
	}
	if unknown {
		d.mu.unknown = true
		return d, nil
	}
	recorded, err := store.load(luName, node)
	if errors.Is(err, ErrDirtyCorrupt) {
		d.mu.unknown = true
		return d, nil
	}
	if err != nil {
		return nil, err
	}
	for _, r := range recorded {
		d.mu.regions[r] = d.fullMask()
	}
	return d, nil
}

// settleStart applies the copy's recorded state to a map just built: a copy
// that may lack data (mayLack: not in sync, not new) keeps an untrusted
// record as unknown, made durable (the regions recorded are dropped: the
// hash compare covers them); any other copy needs no record of the past,
// so an untrusted one is dropped. It returns whether the copy is unknown.
func (d *dirtyMap) settleStart(mayLack bool) (bool, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.mu.unknown {
		return false, nil
	}
	d.mu.regions = map[uint64]*[maskWords]uint64{}
	d.mu.unknown = mayLack
	if d.store == nil {
		return mayLack, nil
	}
	var err error
	if mayLack {
		err = d.store.markUnknown(d.luName, d.node)
	} else {
		err = d.store.drop(d.luName, d.node)
	}
	if err != nil {
		return mayLack, fmt.Errorf("replication: record the untrusted dirty regions of %s for %s: %w", d.luName, d.node, err)
	}
	return mayLack, nil
}

// isUnknown reports whether the copy must be compared by region hashes.
func (d *dirtyMap) isUnknown() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.mu.unknown
}

// known records that the copy was compared by hashes: from now on the
// regions in the map are all it lacks.
func (d *dirtyMap) known() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.mu.unknown {
		return nil
	}
	if d.store != nil {
		if err := d.store.clearUnknown(d.luName, d.node); err != nil {
			return fmt.Errorf("replication: record the hash compare of %s for %s: %w", d.luName, d.node, err)
		}
	}
	d.mu.unknown = false
	return nil
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

// markCompare records the regions of ranges ([offset, length] pairs) dirty
// and to be compared by hash before they are sent (regions an activity log
// named: the copy may differ there); it returns once they are durable.
func (d *dirtyMap) markCompare(ranges [][2]int64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	var fresh []uint64
	add := map[uint64]bool{}
	for _, rg := range ranges {
		if rg[1] <= 0 {
			continue
		}
		for r := rg[0] / d.regionBytes; r <= (rg[0]+rg[1]-1)/d.regionBytes; r++ {
			if add[uint64(r)] {
				continue
			}
			add[uint64(r)] = true
			if _, ok := d.mu.regions[uint64(r)]; !ok {
				fresh = append(fresh, uint64(r))
			}
		}
	}
	if len(fresh) > 0 && d.store != nil {
		if err := d.store.mark(d.luName, d.node, fresh); err != nil {
			return fmt.Errorf("replication: record activity-log regions of %s for %s: %w", d.luName, d.node, err)
		}
	}
	if d.mu.compare == nil {
		d.mu.compare = map[uint64]bool{}
	}
	for r := range add {
		d.mu.regions[r] = d.fullMask()
		d.mu.compare[r] = true
	}
	return nil
}

// toCompare reports whether region r is to be compared by hash before it
// is sent (markCompare).
func (d *dirtyMap) toCompare(r uint64) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.mu.compare[r]
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
	delete(d.mu.compare, r)
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

// empty reports whether no region is dirty and the record is trusted.
func (d *dirtyMap) empty() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.mu.regions) == 0 && !d.mu.unknown
}

// reset forgets everything (the copy was dropped or rebuilt from scratch).
// setUnknown records, durably, that nothing is known of what the copy
// lacks: it is compared by region hashes before it is in sync again.
func (d *dirtyMap) setUnknown() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.mu.regions = map[uint64]*[maskWords]uint64{}
	d.mu.compare = nil
	d.mu.unknown = true
	if d.store != nil {
		return d.store.markUnknown(d.luName, d.node)
	}
	return nil
}

func (d *dirtyMap) reset() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.mu.regions = map[uint64]*[maskWords]uint64{}
	d.mu.compare = nil
	d.mu.unknown = false
	if d.store != nil {
		return d.store.drop(d.luName, d.node)
	}
	return nil
}
