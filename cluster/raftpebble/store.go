// Package raftpebble stores a hashicorp/raft log and stable store in Pebble.
//
// A Store lives beside other data in one *pebble.DB: every key it writes
// starts with "raft/", so the caller may keep its own keys under other
// prefixes (lupool keeps the metadata state machine in the same instance,
// under "meta/", which gives one write-ahead log and one fsync per batch).
//
// # Key layout (part of the on-disk format; frozen)
//
//	"raft/log/"    + index (8 bytes, big-endian)  -> encoded raft.Log
//	"raft/stable/" + key (raw bytes)              -> value (raw bytes)
//
// Big-endian keys sort in index order, so FirstIndex and LastIndex are one
// seek each, and DeleteRange is a single Pebble range tombstone.
//
// # Log entry encoding (part of the on-disk format; frozen)
//
//	+---------+------+------------+------------------+-----------+------+-----------+------+--------+
//	| version | type | term       | appended_at      | data_len  | data | ext_len   | ext  | crc32c |
//	| 1 byte  | 1 B  | uvarint    | varint unix nano | uvarint   | ...  | uvarint   | ...  | 4 B BE |
//	+---------+------+------------+------------------+-----------+------+-----------+------+--------+
//
// version is 1. appended_at 0 means the zero time. crc32c (Castagnoli)
// covers every byte before it; a mismatch is reported as ErrCorrupt. The
// index is not repeated in the value: it is the key.
//
// # Durability
//
// StoreLog, StoreLogs, DeleteRange, Set and SetUint64 commit with
// pebble.Sync: when they return nil the change survives a crash of the
// process or the machine. A batch is atomic: after a crash either every
// entry of a StoreLogs call is present or none is.
//
// # Concurrency
//
// All methods are safe for concurrent use (Pebble is); raft calls them from
// several goroutines.
package raftpebble

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"math"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/hashicorp/raft"
)

// Key prefixes. Part of the on-disk format.
const (
	logPrefix    = "raft/log/"
	stablePrefix = "raft/stable/"
	// logVersion is the first byte of every encoded log entry.
	logVersion = 1
	// crcBytes is the size of the trailing checksum.
	crcBytes = 4
	// headerBytesMin is version + type + the smallest varints (term,
	// appended_at, data_len, ext_len: 1 byte each) + crc.
	headerBytesMin = 2 + 4 + crcBytes
)

var (
	// ErrKeyNotFound is returned by Get and GetUint64 when the key was never
	// set. Its text is exactly "not found" without the package prefix,
	// because hashicorp/raft compares err.Error() with that string (the
	// convention of raft-boltdb and raft.InmemStore).
	ErrKeyNotFound = errors.New("not found")

	// ErrCorrupt is returned by GetLog, FirstIndex-adjacent reads and
	// iteration when a stored log entry fails its checksum or cannot be
	// decoded.
	ErrCorrupt = errors.New("raftpebble: corrupt log entry")
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Store is a raft.LogStore and raft.StableStore backed by Pebble.
type Store struct {
	db *pebble.DB // immutable; never nil; not owned (the caller closes it)
}

var (
	_ raft.LogStore    = (*Store)(nil)
	_ raft.StableStore = (*Store)(nil)
)

// New returns a Store that keeps its keys in db under the "raft/" prefix.
// The Store does not own db: the caller closes db after raft has shut down.
func New(db *pebble.DB) (*Store, error) {
	if db == nil {
		return nil, errors.New("raftpebble: New: nil db")
	}
	return &Store{db: db}, nil
}

func logKey(index uint64) []byte {
	k := make([]byte, len(logPrefix)+8)
	copy(k, logPrefix)
	binary.BigEndian.PutUint64(k[len(logPrefix):], index)
	return k
}

// logKeyEnd is the exclusive upper bound of all log keys.
func logKeyEnd() []byte {
	k := []byte(logPrefix)
	k[len(k)-1]++ // "raft/log/" -> "raft/log0"
	return k
}

func indexOfKey(k []byte) (uint64, error) {
	if len(k) != len(logPrefix)+8 || !bytes.HasPrefix(k, []byte(logPrefix)) {
		return 0, fmt.Errorf("%w: bad log key %q", ErrCorrupt, k)
	}
	return binary.BigEndian.Uint64(k[len(logPrefix):]), nil
}

func stableKey(key []byte) []byte {
	k := make([]byte, 0, len(stablePrefix)+len(key))
	k = append(k, stablePrefix...)
	return append(k, key...)
}

// encodeLog appends the encoding of l (without its index) to dst.
func encodeLog(dst []byte, l *raft.Log) []byte {
	start := len(dst)
	dst = append(dst, logVersion, byte(l.Type))
	dst = binary.AppendUvarint(dst, l.Term)
	var appendedAtNanos int64
	if !l.AppendedAt.IsZero() {
		appendedAtNanos = l.AppendedAt.UnixNano()
	}
	dst = binary.AppendVarint(dst, appendedAtNanos)
	dst = binary.AppendUvarint(dst, uint64(len(l.Data)))
	dst = append(dst, l.Data...)
	dst = binary.AppendUvarint(dst, uint64(len(l.Extensions)))
	dst = append(dst, l.Extensions...)
	sum := crc32.Checksum(dst[start:], castagnoli)
	return binary.BigEndian.AppendUint32(dst, sum)
}

// decodeLog fills l from buf. The slices in l do not alias buf.
func decodeLog(index uint64, buf []byte, l *raft.Log) error {
	if len(buf) < headerBytesMin {
		return fmt.Errorf("%w: index %d: %d bytes is too short", ErrCorrupt, index, len(buf))
	}
	body, tail := buf[:len(buf)-crcBytes], buf[len(buf)-crcBytes:]
	if got, want := crc32.Checksum(body, castagnoli), binary.BigEndian.Uint32(tail); got != want {
		return fmt.Errorf("%w: index %d: checksum %08x, stored %08x", ErrCorrupt, index, got, want)
	}
	if body[0] != logVersion {
		return fmt.Errorf("%w: index %d: unknown version %d", ErrCorrupt, index, body[0])
	}
	out := raft.Log{Index: index, Type: raft.LogType(body[1])}
	r := body[2:]
	var n int
	if out.Term, n = binary.Uvarint(r); n <= 0 {
		return fmt.Errorf("%w: index %d: bad term", ErrCorrupt, index)
	}
	r = r[n:]
	appendedAtNanos, n := binary.Varint(r)
	if n <= 0 {
		return fmt.Errorf("%w: index %d: bad appended_at", ErrCorrupt, index)
	}
	r = r[n:]
	if appendedAtNanos != 0 {
		out.AppendedAt = time.Unix(0, appendedAtNanos)
	}
	var err error
	if out.Data, r, err = readBytes(r); err != nil {
		return fmt.Errorf("%w: index %d: data: %v", ErrCorrupt, index, err)
	}
	if out.Extensions, r, err = readBytes(r); err != nil {
		return fmt.Errorf("%w: index %d: extensions: %v", ErrCorrupt, index, err)
	}
	if len(r) != 0 {
		return fmt.Errorf("%w: index %d: %d trailing bytes", ErrCorrupt, index, len(r))
	}
	*l = out
	return nil
}

// readBytes reads a uvarint length and that many bytes, copying them.
func readBytes(r []byte) (val, rest []byte, err error) {
	n, w := binary.Uvarint(r)
	if w <= 0 {
		return nil, nil, errors.New("bad length")
	}
	r = r[w:]
	if n > uint64(len(r)) {
		return nil, nil, fmt.Errorf("length %d exceeds %d remaining bytes", n, len(r))
	}
	if n == 0 {
		return nil, r, nil
	}
	return bytes.Clone(r[:n]), r[n:], nil
}

// FirstIndex returns the lowest stored index, or 0 when the log is empty.
func (s *Store) FirstIndex() (uint64, error) {
	return s.edgeIndex(true)
}

// LastIndex returns the highest stored index, or 0 when the log is empty.
func (s *Store) LastIndex() (uint64, error) {
	return s.edgeIndex(false)
}

func (s *Store) edgeIndex(first bool) (uint64, error) {
	it, err := s.db.NewIter(&pebble.IterOptions{
		LowerBound: []byte(logPrefix),
		UpperBound: logKeyEnd(),
	})
	if err != nil {
		return 0, fmt.Errorf("raftpebble: new iterator: %w", err)
	}
	var ok bool
	if first {
		ok = it.First()
	} else {
		ok = it.Last()
	}
	var index uint64
	if ok {
		index, err = indexOfKey(it.Key())
	}
	if cerr := it.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("raftpebble: iterator: %w", cerr)
	}
	if err != nil {
		return 0, err
	}
	return index, nil
}

// GetLog reads the entry at index into l. It returns raft.ErrLogNotFound
// when there is no entry at index, and ErrCorrupt (wrapped) when the
// stored entry is damaged.
func (s *Store) GetLog(index uint64, l *raft.Log) error {
	val, closer, err := s.db.Get(logKey(index))
	if errors.Is(err, pebble.ErrNotFound) {
		return raft.ErrLogNotFound
	}
	if err != nil {
		return fmt.Errorf("raftpebble: get log %d: %w", index, err)
	}
	defer closer.Close()
	return decodeLog(index, val, l)
}

// StoreLog stores one entry durably.
func (s *Store) StoreLog(l *raft.Log) error {
	return s.StoreLogs([]*raft.Log{l})
}

// StoreLogs stores entries atomically and durably, overwriting entries at
// the same indexes. Entries need not be contiguous with the stored log.
func (s *Store) StoreLogs(logs []*raft.Log) error {
	if len(logs) == 0 {
		return nil
	}
	b := s.db.NewBatch()
	defer b.Close()
	var buf []byte
	for _, l := range logs {
		if l == nil {
			return errors.New("raftpebble: StoreLogs: nil entry")
		}
		buf = encodeLog(buf[:0], l)
		if err := b.Set(logKey(l.Index), buf, nil); err != nil {
			return fmt.Errorf("raftpebble: batch set %d: %w", l.Index, err)
		}
	}
	if err := b.Commit(pebble.Sync); err != nil {
		return fmt.Errorf("raftpebble: store %d logs at %d: %w", len(logs), logs[0].Index, err)
	}
	return nil
}

// DeleteRange deletes entries min through max inclusive, durably, with a
// single range tombstone. It is not an error if some or all are absent.
func (s *Store) DeleteRange(min, max uint64) error {
	if min > max {
		return nil
	}
	end := logKeyEnd()
	if max < math.MaxUint64 {
		end = logKey(max + 1)
	}
	if err := s.db.DeleteRange(logKey(min), end, pebble.Sync); err != nil {
		return fmt.Errorf("raftpebble: delete range [%d, %d]: %w", min, max, err)
	}
	return nil
}

// Set stores val under key durably.
func (s *Store) Set(key, val []byte) error {
	if err := s.db.Set(stableKey(key), val, pebble.Sync); err != nil {
		return fmt.Errorf("raftpebble: set %q: %w", key, err)
	}
	return nil
}

// Get returns a copy of the value stored under key, or ErrKeyNotFound.
func (s *Store) Get(key []byte) ([]byte, error) {
	val, closer, err := s.db.Get(stableKey(key))
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, ErrKeyNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("raftpebble: get %q: %w", key, err)
	}
	defer closer.Close()
	out := make([]byte, len(val))
	copy(out, val)
	return out, nil
}

// SetUint64 stores val (8 bytes, big-endian) under key durably.
func (s *Store) SetUint64(key []byte, val uint64) error {
	return s.Set(key, binary.BigEndian.AppendUint64(nil, val))
}

// GetUint64 returns the value stored by SetUint64, or 0 and
// ErrKeyNotFound when key was never set.
func (s *Store) GetUint64(key []byte) (uint64, error) {
	val, err := s.Get(key)
	if err != nil {
		return 0, err
	}
	if len(val) != 8 {
		return 0, fmt.Errorf("raftpebble: key %q holds %d bytes, not a uint64", key, len(val))
	}
	return binary.BigEndian.Uint64(val), nil
}
