package raftpebble

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/hashicorp/raft"

	"github.com/lupool/lupool/internal/testseed"
)

func openDB(t *testing.T, fs vfs.FS) *pebble.DB {
	t.Helper()
	db, err := pebble.Open("db", &pebble.Options{FS: fs, Logger: quietLogger{t}})
	if err != nil {
		t.Fatalf("pebble.Open: %v", err)
	}
	return db
}

// quietLogger keeps Pebble's informational lines out of test output.
type quietLogger struct{ t *testing.T }

func (quietLogger) Infof(string, ...any)           {}
func (l quietLogger) Errorf(f string, args ...any) { l.t.Logf("pebble: "+f, args...) }
func (l quietLogger) Fatalf(f string, args ...any) { l.t.Fatalf("pebble: "+f, args...) }

func newStore(t *testing.T, db *pebble.DB) *Store {
	t.Helper()
	s, err := New(db)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func makeLog(rng *rand.Rand, index, term uint64) *raft.Log {
	l := &raft.Log{Index: index, Term: term, Type: raft.LogType(rng.IntN(6))}
	if rng.IntN(4) > 0 {
		l.Data = make([]byte, rng.IntN(300)+1)
		for i := range l.Data {
			l.Data[i] = byte(rng.Uint32())
		}
	}
	if rng.IntN(4) == 0 {
		l.Extensions = []byte(fmt.Sprintf("ext-%d", index))
	}
	if rng.IntN(3) > 0 {
		l.AppendedAt = time.Unix(1_700_000_000+int64(index), int64(rng.IntN(1e9)))
	}
	return l
}

func sameLog(a, b raft.Log) bool {
	return a.Index == b.Index && a.Term == b.Term && a.Type == b.Type &&
		bytes.Equal(a.Data, b.Data) && bytes.Equal(a.Extensions, b.Extensions) &&
		a.AppendedAt.Equal(b.AppendedAt)
}

// compareStores checks that got answers every LogStore read exactly like the
// reference raft.InmemStore.
func compareStores(t *testing.T, step int, got *Store, want *raft.InmemStore) {
	t.Helper()
	gf, err := got.FirstIndex()
	if err != nil {
		t.Fatalf("step %d: FirstIndex: %v", step, err)
	}
	gl, err := got.LastIndex()
	if err != nil {
		t.Fatalf("step %d: LastIndex: %v", step, err)
	}
	wf, _ := want.FirstIndex()
	wl, _ := want.LastIndex()
	if gf != wf || gl != wl {
		t.Fatalf("step %d: first/last = %d/%d, reference %d/%d", step, gf, gl, wf, wl)
	}
	lo := wf
	if lo > 2 {
		lo -= 2
	}
	for i := lo; i <= wl+2; i++ {
		var g, w raft.Log
		gerr := got.GetLog(i, &g)
		werr := want.GetLog(i, &w)
		if (gerr == nil) != (werr == nil) {
			t.Fatalf("step %d: GetLog(%d) err = %v, reference %v", step, i, gerr, werr)
		}
		if werr != nil {
			if !errors.Is(gerr, raft.ErrLogNotFound) {
				t.Fatalf("step %d: GetLog(%d) = %v, want ErrLogNotFound", step, i, gerr)
			}
			continue
		}
		if !sameLog(g, w) {
			t.Fatalf("step %d: GetLog(%d) = %+v, reference %+v", step, i, g, w)
		}
	}
}

// TestRandomizedAgainstInmem runs the same raft-shaped operations (appends,
// suffix truncation on conflict, prefix compaction, a gap after a snapshot
// install, stable keys, restarts) on a Store and raft.InmemStore and
// compares every read.
func TestRandomizedAgainstInmem(t *testing.T) {
	seed := testseed.Seed(t, "./cluster/raftpebble/")
	rng := rand.New(rand.NewPCG(seed, 0))
	steps := 3000
	if testing.Short() {
		steps = 600
	}
	fs := vfs.NewMem()
	db := openDB(t, fs)
	defer func() { db.Close() }()
	got := newStore(t, db)
	want := raft.NewInmemStore()
	stableWant := map[string][]byte{}
	uintWant := map[string]uint64{}
	var term uint64 = 1

	for step := 0; step < steps; step++ {
		first, _ := want.FirstIndex()
		last, _ := want.LastIndex()
		switch op := rng.IntN(100); {
		case op < 45: // append a batch after last
			if rng.IntN(10) == 0 {
				term++
			}
			n := rng.IntN(8) + 1
			var batch []*raft.Log
			for i := 0; i < n; i++ {
				batch = append(batch, makeLog(rng, last+1+uint64(i), term))
			}
			if err := got.StoreLogs(batch); err != nil {
				t.Fatalf("step %d: StoreLogs: %v", step, err)
			}
			_ = want.StoreLogs(batch)
		case op < 55 && last > 0: // conflict: truncate a suffix
			from := first + uint64(rng.IntN(int(last-first+1)))
			if err := got.DeleteRange(from, last); err != nil {
				t.Fatal(err)
			}
			_ = want.DeleteRange(from, last)
		case op < 65 && last > 0: // compaction: delete a prefix
			to := first + uint64(rng.IntN(int(last-first+1)))
			if err := got.DeleteRange(first, to); err != nil {
				t.Fatal(err)
			}
			_ = want.DeleteRange(first, to)
		case op < 68: // snapshot install: drop everything, continue after a gap
			if last > 0 {
				if err := got.DeleteRange(first, last); err != nil {
					t.Fatal(err)
				}
				_ = want.DeleteRange(first, last)
			}
			term++
			l := makeLog(rng, last+uint64(rng.IntN(50))+2, term)
			if err := got.StoreLog(l); err != nil {
				t.Fatal(err)
			}
			_ = want.StoreLog(l)
		case op < 80: // stable store
			key := fmt.Sprintf("k%d", rng.IntN(5))
			if rng.IntN(2) == 0 {
				v := []byte(fmt.Sprintf("v%d", rng.Uint32()))
				if err := got.Set([]byte(key), v); err != nil {
					t.Fatal(err)
				}
				stableWant[key] = v
			} else {
				v := rng.Uint64()
				if err := got.SetUint64([]byte("u"+key), v); err != nil {
					t.Fatal(err)
				}
				uintWant["u"+key] = v
			}
		case op < 83: // restart
			if err := db.Close(); err != nil {
				t.Fatal(err)
			}
			db = openDB(t, fs)
			got = newStore(t, db)
		default:
		}
		compareStores(t, step, got, want)
		for k, v := range stableWant {
			g, err := got.Get([]byte(k))
			if err != nil || !bytes.Equal(g, v) {
				t.Fatalf("step %d: Get(%s) = %q, %v; want %q", step, k, g, err, v)
			}
		}
		for k, v := range uintWant {
			g, err := got.GetUint64([]byte(k))
			if err != nil || g != v {
				t.Fatalf("step %d: GetUint64(%s) = %d, %v; want %d", step, k, g, err, v)
			}
		}
	}
}

func TestStableNotFound(t *testing.T) {
	db := openDB(t, vfs.NewMem())
	defer db.Close()
	s := newStore(t, db)
	if _, err := s.Get([]byte("CurrentTerm")); err == nil || err.Error() != "not found" {
		t.Fatalf("Get of a missing key: %v, want exactly \"not found\"", err)
	}
	v, err := s.GetUint64([]byte("CurrentTerm"))
	if err == nil || err.Error() != "not found" || v != 0 {
		t.Fatalf("GetUint64 of a missing key: %d, %v", v, err)
	}
	if !errors.Is(err, ErrKeyNotFound) {
		t.Fatalf("GetUint64: %v is not ErrKeyNotFound", err)
	}
	// raft's own check must see a fresh store as empty.
	snaps := raft.NewInmemSnapshotStore()
	has, err := raft.HasExistingState(s, s, snaps)
	if err != nil || has {
		t.Fatalf("HasExistingState on a fresh store = %v, %v", has, err)
	}
	if err := s.SetUint64([]byte("CurrentTerm"), 3); err != nil {
		t.Fatal(err)
	}
	has, err = raft.HasExistingState(s, s, snaps)
	if err != nil || !has {
		t.Fatalf("HasExistingState after a term = %v, %v", has, err)
	}
	// A non-uint64 value under a key read as uint64 is an error, not garbage.
	if err := s.Set([]byte("odd"), []byte("abc")); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetUint64([]byte("odd")); err == nil {
		t.Fatal("GetUint64 of a 3-byte value succeeded")
	}
	// An empty value is present, not missing.
	if err := s.Set([]byte("empty"), nil); err != nil {
		t.Fatal(err)
	}
	if v, err := s.Get([]byte("empty")); err != nil || len(v) != 0 {
		t.Fatalf("Get(empty) = %q, %v", v, err)
	}
}

func TestDeleteRangeEdges(t *testing.T) {
	db := openDB(t, vfs.NewMem())
	defer db.Close()
	s := newStore(t, db)
	rng := rand.New(rand.NewPCG(1, 2))
	var batch []*raft.Log
	for i := uint64(1); i <= 10; i++ {
		batch = append(batch, makeLog(rng, i, 1))
	}
	if err := s.StoreLogs(batch); err != nil {
		t.Fatal(err)
	}
	check := func(wantFirst, wantLast uint64) {
		t.Helper()
		f, err1 := s.FirstIndex()
		l, err2 := s.LastIndex()
		if err1 != nil || err2 != nil || f != wantFirst || l != wantLast {
			t.Fatalf("first/last = %d/%d (%v, %v), want %d/%d", f, l, err1, err2, wantFirst, wantLast)
		}
	}
	check(1, 10)
	if err := s.DeleteRange(1, 3); err != nil { // compaction
		t.Fatal(err)
	}
	check(4, 10)
	if err := s.DeleteRange(8, 10); err != nil { // conflict truncation
		t.Fatal(err)
	}
	check(4, 7)
	if err := s.DeleteRange(5, 2); err != nil { // empty range: no-op
		t.Fatal(err)
	}
	check(4, 7)
	if err := s.DeleteRange(0, 1<<64-1); err != nil { // everything, max index
		t.Fatal(err)
	}
	check(0, 0)
	var l raft.Log
	if err := s.GetLog(5, &l); !errors.Is(err, raft.ErrLogNotFound) {
		t.Fatalf("GetLog after delete: %v", err)
	}
	// The largest index round-trips.
	big := makeLog(rng, 1<<64-1, 9)
	if err := s.StoreLog(big); err != nil {
		t.Fatal(err)
	}
	check(1<<64-1, 1<<64-1)
	if err := s.GetLog(1<<64-1, &l); err != nil || !sameLog(l, *big) {
		t.Fatalf("GetLog(max) = %+v, %v", l, err)
	}
}

// TestCrashKeepsAcknowledged appends, compacts and sets the term, and after
// each acknowledged call takes a crash image of the file system (unsynced
// data kept by chance). Every acknowledged change must be in the image.
func TestCrashKeepsAcknowledged(t *testing.T) {
	seed := testseed.Seed(t, "./cluster/raftpebble/")
	rng := rand.New(rand.NewPCG(seed, 7))
	fs := vfs.NewCrashableMem()
	db := openDB(t, fs)
	s := newStore(t, db)
	want := raft.NewInmemStore()
	var term uint64
	crashCheck := func(what string) {
		t.Helper()
		crashed := fs.CrashClone(vfs.CrashCloneCfg{UnsyncedDataPercent: rng.IntN(50), RNG: rng})
		cdb := openDB(t, crashed)
		defer func() {
			if err := cdb.Close(); err != nil {
				t.Fatal(err)
			}
		}()
		compareStores(t, int(term), newStore(t, cdb), want)
		if term == 0 {
			return
		}
		if v, err := newStore(t, cdb).GetUint64([]byte("CurrentTerm")); err != nil || v != term {
			t.Fatalf("after %s: CurrentTerm after crash = %d, %v; want %d", what, v, err, term)
		}
	}
	rounds := 30
	if testing.Short() {
		rounds = 10
	}
	for round := 0; round < rounds; round++ {
		last, _ := want.LastIndex()
		var batch []*raft.Log
		for i := 0; i < rng.IntN(5)+1; i++ {
			batch = append(batch, makeLog(rng, last+1+uint64(i), term))
		}
		if err := s.StoreLogs(batch); err != nil {
			t.Fatal(err)
		}
		_ = want.StoreLogs(batch)
		crashCheck("StoreLogs")

		first, _ := want.FirstIndex()
		last, _ = want.LastIndex()
		if rng.IntN(3) == 0 { // compaction
			to := first + uint64(rng.IntN(int(last-first+1)))
			if err := s.DeleteRange(first, to); err != nil {
				t.Fatal(err)
			}
			_ = want.DeleteRange(first, to)
			crashCheck("DeleteRange")
		}
		// A write that is never synced: it may or may not survive, but it
		// must not damage what was synced.
		_ = db.Set([]byte("other/unsynced"), []byte("x"), pebble.NoSync)
		term++
		if err := s.SetUint64([]byte("CurrentTerm"), term); err != nil {
			t.Fatal(err)
		}
		crashCheck("SetUint64")
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestCorruptEntry(t *testing.T) {
	db := openDB(t, vfs.NewMem())
	defer db.Close()
	s := newStore(t, db)
	rng := rand.New(rand.NewPCG(3, 4))
	l := makeLog(rng, 7, 2)
	l.Data = []byte("payload")
	if err := s.StoreLog(l); err != nil {
		t.Fatal(err)
	}
	val, closer, err := db.Get(logKey(7))
	if err != nil {
		t.Fatal(err)
	}
	good := bytes.Clone(val)
	closer.Close()
	for i := range good {
		bad := bytes.Clone(good)
		bad[i] ^= 0x40
		if err := db.Set(logKey(7), bad, pebble.Sync); err != nil {
			t.Fatal(err)
		}
		var out raft.Log
		if err := s.GetLog(7, &out); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("flipped byte %d: GetLog = %v, want ErrCorrupt", i, err)
		}
	}
	for _, bad := range [][]byte{nil, {1}, good[:len(good)-1]} {
		if err := db.Set(logKey(7), bad, pebble.Sync); err != nil {
			t.Fatal(err)
		}
		var out raft.Log
		if err := s.GetLog(7, &out); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("value %x: GetLog = %v, want ErrCorrupt", bad, err)
		}
	}
	// A foreign key in the log range makes FirstIndex fail loudly.
	if err := db.Set([]byte(logPrefix+"\x00"), nil, pebble.Sync); err != nil {
		t.Fatal(err)
	}
	if _, err := s.FirstIndex(); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("FirstIndex with a malformed key: %v", err)
	}
}

func TestKeysStayUnderPrefix(t *testing.T) {
	db := openDB(t, vfs.NewMem())
	defer db.Close()
	s := newStore(t, db)
	if err := db.Set([]byte("meta/x"), []byte("1"), pebble.Sync); err != nil {
		t.Fatal(err)
	}
	if err := db.Set([]byte("raft/lof"), []byte("1"), pebble.Sync); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(5, 6))
	for i := uint64(1); i <= 5; i++ {
		if err := s.StoreLog(makeLog(rng, i, 1)); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.DeleteRange(0, 1<<64-1); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"meta/x", "raft/lof"} {
		if _, c, err := db.Get([]byte(k)); err != nil {
			t.Fatalf("%s was deleted by a log DeleteRange: %v", k, err)
		} else {
			c.Close()
		}
	}
	if got := binary.BigEndian.Uint64(logKey(258)[len(logPrefix):]); got != 258 {
		t.Fatalf("logKey round trip = %d", got)
	}
}
