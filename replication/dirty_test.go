package replication

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/lupool/lupool/internal/testseed"
)

// flipIn flips one bit of the first byte of the first file in dir whose
// name contains nameHas and whose bytes contain what (nil: the file's first
// byte); it returns the file.
func flipIn(t *testing.T, fs vfs.FS, dir, nameHas string, what []byte) string {
	t.Helper()
	ls, err := fs.List(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range ls {
		if !strings.Contains(name, nameHas) {
			continue
		}
		path := fs.PathJoin(dir, name)
		f, err := fs.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		i := bytes.Index(b, what)
		if i < 0 || len(b) == 0 {
			continue
		}
		b[i] ^= 0x04
		w, err := fs.Create(path, vfs.WriteCategoryUnspecified)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write(b); err != nil {
			t.Fatal(err)
		}
		if err := errors.Join(w.Sync(), w.Close()); err != nil {
			t.Fatal(err)
		}
		return name
	}
	t.Fatalf("no file *%s* in %s holds %q", nameHas, dir, what)
	return ""
}

func openStore(t *testing.T, fs vfs.FS, expectExisting bool) *DirtyStore {
	t.Helper()
	s, err := OpenDirtyStoreOptions("d", DirtyStoreOptions{FS: fs, ExpectExisting: expectExisting})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// markRegions records regions 0..n-1 of (luName, node) with 64 KiB regions.
func markRegions(t *testing.T, s *DirtyStore, luName, node string, n int) {
	t.Helper()
	d, err := newDirtyMap(s, luName, node, 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < n; i++ {
		if err := d.mark(int64(i)*64<<10, 4096); err != nil {
			t.Fatal(err)
		}
	}
}

// TestDirtyRecordChecksum: every single-bit flip of a record's key or value
// is caught.
func TestDirtyRecordChecksum(t *testing.T) {
	key := dirtyKey("lu", "n2", 7)
	val := encodeRecord(key, nil)
	if len(val) != recordOverheadBytes || val[0] != dirtyRecordVersion {
		t.Fatalf("dirty record value %x: want version %d and a crc, %d bytes", val, dirtyRecordVersion, recordOverheadBytes)
	}
	if p, err := decodeRecord(key, val); err != nil || len(p) != 0 {
		t.Fatalf("intact record: payload %q, %v", p, err)
	}
	if err := checkKey(key); err != nil {
		t.Fatalf("intact key: %v", err)
	}
	for i := range 8 * (len(key) + len(val)) {
		k, v := bytes.Clone(key), bytes.Clone(val)
		if i < 8*len(k) {
			k[i/8] ^= 1 << (i % 8)
		} else {
			j := i - 8*len(k)
			v[j/8] ^= 1 << (j % 8)
		}
		if _, err := decodeRecord(k, v); !errors.Is(err, ErrDirtyCorrupt) {
			t.Fatalf("bit %d flipped: %v, want ErrDirtyCorrupt", i, err)
		}
	}
	if _, err := decodeRecord(key, nil); !errors.Is(err, ErrDirtyCorrupt) {
		t.Fatalf("empty value (the format before checksums): %v, want ErrDirtyCorrupt", err)
	}
	for _, bad := range []string{"dirty/lu\x00n2\x00\x00\x00", "dirty/\x00n2\x00" + "12345678", "dirty/lu\x00n2" + "12345678", "unknown/lu", "unknown/lu\x00", "dirtx/lu\x00n2\x00" + "12345678"} {
		if err := checkKey([]byte(bad)); !errors.Is(err, ErrDirtyCorrupt) {
			t.Errorf("key %q: %v, want ErrDirtyCorrupt", bad, err)
		}
	}
	if err := checkKey(unknownKey("lu", "n2")); err != nil {
		t.Errorf("unknown key: %v", err)
	}
}

// TestDirtyStoreCleanClose: a store closed cleanly reopens trusted, with
// its regions.
func TestDirtyStoreCleanClose(t *testing.T) {
	fs := vfs.NewMem()
	s := openStore(t, fs, false)
	if err := s.Doubt(); err != nil {
		t.Fatalf("fresh store on a first start: %v", err)
	}
	markRegions(t, s, "lu", "n2", 3)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); !errors.Is(err, ErrDirtyStoreClosed) {
		t.Fatalf("second Close: %v, want ErrDirtyStoreClosed", err)
	}
	s = openStore(t, fs, true)
	defer s.Close()
	if err := s.Doubt(); err != nil {
		t.Fatalf("after a clean close: %v", err)
	}
	d, err := newDirtyMap(s, "lu", "n2", 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	if got := d.regionList(); len(got) != 3 || d.isUnknown() {
		t.Fatalf("regions after a clean close %v (unknown %v), want [0 1 2]", got, d.isUnknown())
	}
}

// TestDirtyStoreFlippedByte: a flipped byte in a record on disk puts the
// store in doubt, and load reports it instead of skipping it.
func TestDirtyStoreFlippedByte(t *testing.T) {
	fs := vfs.NewMem()
	s := openStore(t, fs, false)
	markRegions(t, s, "lu-flip", "n2", 6)
	markRegions(t, s, "other", "n2", 1)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	file := flipIn(t, fs, "d", ".sst", []byte("lu-flip"))
	s = openStore(t, fs, true)
	if err := s.Doubt(); err == nil {
		t.Fatalf("store with a flipped byte in %s is trusted", file)
	}
	// A store Pebble cannot read through is moved aside: none of its
	// records is used, and a fresh store starts in doubt.
	if _, err := fs.Stat("d.corrupt"); err != nil {
		t.Fatalf("the corrupt store was not moved aside: %v", err)
	}
	if got, err := s.load("lu-flip", "n2"); err != nil || len(got) != 0 {
		t.Fatalf("records of the corrupt store: %v, %v; want none", got, err)
	}
	d, err := newDirtyMap(s, "lu-flip", "n2", 64<<10)
	if err != nil || !d.isUnknown() || d.empty() {
		t.Fatalf("dirty map over a store in doubt: %v, unknown %v, want unknown", err, d != nil && d.isUnknown())
	}
	// Once every copy in doubt is marked unknown, the store can be trusted
	// again, and a clean restart keeps the unknown mark, not the doubt.
	if err := s.Trust(); err != nil {
		t.Fatalf("Trust after moving the corrupt store aside: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, fs, true)
	defer s.Close()
	if err := s.Doubt(); err != nil {
		t.Fatalf("after Trust and a clean close: %v", err)
	}
}

// TestDirtyStoreBadRecord: records Pebble stores intact but that fail our
// own check (a bad checksum, a key of the wrong length under the prefix,
// the empty values of the format before checksums) are reported, not
// skipped.
func TestDirtyStoreBadRecord(t *testing.T) {
	for name, put := range map[string]func(*pebble.DB) error{
		"checksum": func(db *pebble.DB) error {
			k := dirtyKey("lu", "n2", 4)
			v := encodeRecord(k, nil)
			v[len(v)-1] ^= 1
			return db.Set(k, v, pebble.Sync)
		},
		"short key": func(db *pebble.DB) error {
			k := append(dirtyKeyPrefix("lu", "n2"), 0, 0, 4)
			return db.Set(k, encodeRecord(k, nil), pebble.Sync)
		},
		"old format": func(db *pebble.DB) error {
			return db.Set(dirtyKey("lu", "n2", 4), nil, pebble.Sync)
		},
	} {
		t.Run(name, func(t *testing.T) {
			fs := vfs.NewMem()
			s := openStore(t, fs, false)
			markRegions(t, s, "lu", "n2", 2)
			if err := put(s.db); err != nil {
				t.Fatal(err)
			}
			if _, err := s.load("lu", "n2"); !errors.Is(err, ErrDirtyCorrupt) {
				t.Fatalf("load: %v, want ErrDirtyCorrupt", err)
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			s = openStore(t, fs, true)
			defer s.Close()
			if err := s.Doubt(); err == nil || !strings.Contains(err.Error(), "fail their check") {
				t.Fatalf("doubt after a bad record: %v", err)
			}
		})
	}
}

// TestDirtyStoreUncleanClose: a store dropped without Close (a crash) is
// not in doubt but Crashed: every record synced before the crash is there,
// whatever of its unsynced writes survived.
func TestDirtyStoreUncleanClose(t *testing.T) {
	fs := vfs.NewCrashableMem()
	s := openStore(t, fs, false)
	markRegions(t, s, "lu", "n2", 3)
	seed := testseed.Seed(t, "./replication/")
	crashed := fs.CrashClone(vfs.CrashCloneCfg{UnsyncedDataPercent: 50, RNG: rand.New(rand.NewPCG(seed, 0))})
	s2 := openStore(t, crashed, true)
	defer s2.Close()
	if err := s2.Doubt(); err != nil || !s2.Crashed() {
		t.Fatalf("after a crash: doubt %v, crashed %v; want no doubt, crashed", err, s2.Crashed())
	}
	d, err := newDirtyMap(s2, "lu", "n2", 64<<10)
	if err != nil || d.isUnknown() || len(d.regionList()) != 3 {
		t.Fatalf("dirty map after a crash: %v, unknown %v, regions %v; want the 3 regions synced before it", err, err == nil && d.isUnknown(), d.regionList())
	}
	if err := s.Close(); err != nil { // the original, on the uncrashed FS
		t.Fatal(err)
	}
}

// TestDirtyStoreUncleanCloseOldVersion: a store a version without the
// activity log left open (state "open") is in doubt: nothing says which
// writes were in flight.
func TestDirtyStoreUncleanCloseOldVersion(t *testing.T) {
	fs := vfs.NewCrashableMem()
	s := openStore(t, fs, false)
	markRegions(t, s, "lu", "n2", 3)
	if err := s.setState(stateOpen); err != nil {
		t.Fatal(err)
	}
	crashed := fs.CrashClone(vfs.CrashCloneCfg{})
	s2 := openStore(t, crashed, true)
	defer s2.Close()
	if err := s2.Doubt(); err == nil || !strings.Contains(err.Error(), "not closed cleanly") || s2.Crashed() {
		t.Fatalf("after a crash of an old version: %v (crashed %v), want doubt (not closed cleanly)", err, s2.Crashed())
	}
	d, err := newDirtyMap(s2, "lu", "n2", 64<<10)
	if err != nil || !d.isUnknown() {
		t.Fatalf("dirty map after a crash: %v, unknown %v, want unknown", err, err == nil && d.isUnknown())
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestDirtyStoreWitnessAhead: a witness ahead of the store (its own
// number is behind) means the store lost synced records and is in
// doubt (TestDirtyStoreCorruptLog shows how it happens).
func TestDirtyStoreWitnessAhead(t *testing.T) {
	fs := vfs.NewMem()
	s := openStore(t, fs, false)
	markRegions(t, s, "lu", "n2", 2)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	f, err := fs.OpenReadWrite("d.seq", vfs.WriteCategoryUnspecified)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{0, 0, 0, 0, 0, 1, 0, 0}, 0); err != nil {
		t.Fatal(err)
	}
	f.Close()
	s = openStore(t, fs, true)
	defer s.Close()
	if err := s.Doubt(); err == nil || !strings.Contains(err.Error(), "records synced before the stop are missing") {
		t.Fatalf("store behind its witness: %v, want doubt", err)
	}
}

// TestDirtyStoreMissing: a missing store is fresh on a first start and in
// doubt on any later one.
func TestDirtyStoreMissing(t *testing.T) {
	s := openStore(t, vfs.NewMem(), true)
	defer s.Close()
	if err := s.Doubt(); err == nil || !strings.Contains(err.Error(), "missing or empty") {
		t.Fatalf("missing store on a later start: %v, want doubt", err)
	}
	fresh := openStore(t, vfs.NewMem(), false)
	defer fresh.Close()
	if err := fresh.Doubt(); err != nil {
		t.Fatalf("missing store on a first start: %v", err)
	}
}

// TestDirtyStoreCorruptLog: a flipped byte in the log of a store that was
// not closed cleanly (Pebble replays the log up to the first bad record and
// stops there, silently, dropping synced records) leaves the store in
// doubt: the store's batch number is behind its witness's.
func TestDirtyStoreCorruptLog(t *testing.T) {
	fs := vfs.NewCrashableMem()
	s := openStore(t, fs, false)
	markRegions(t, s, "lu-flip", "n2", 1)
	markRegions(t, s, "other", "n2", 4)
	crashed := fs.CrashClone(vfs.CrashCloneCfg{}) // synced data only
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	flipIn(t, crashed, "d", ".log", []byte("lu-flip"))
	s = openStore(t, crashed, true)
	defer s.Close()
	if err := s.Doubt(); err == nil {
		t.Fatal("store with a corrupt log record is trusted")
	}
}

// TestDirtyStoreUnopenable: a store Pebble cannot open for corruption (a
// malformed manifest) is moved aside and replaced by a fresh one, in doubt.
func TestDirtyStoreUnopenable(t *testing.T) {
	fs := vfs.NewMem()
	s := openStore(t, fs, false)
	markRegions(t, s, "lu", "n2", 2)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	flipIn(t, fs, "d", "MANIFEST", nil)
	s = openStore(t, fs, true)
	defer s.Close()
	if err := s.Doubt(); err == nil || !strings.Contains(err.Error(), "moved aside") {
		t.Fatalf("store with a malformed manifest: %v, want doubt (moved aside)", err)
	}
	if _, err := fs.Stat("d.corrupt"); err != nil {
		t.Fatalf("the corrupt store was not kept aside: %v", err)
	}
	if got, err := s.load("lu", "n2"); err != nil || len(got) != 0 {
		t.Fatalf("fresh store after moving aside holds %v (%v)", got, err)
	}
}

// TestDirtyStoreCorruptManifest: a flipped byte in the manifest never
// leaves a trusted store that lost records.
func TestDirtyStoreCorruptManifest(t *testing.T) {
	fs := vfs.NewMem()
	s := openStore(t, fs, false)
	markRegions(t, s, "lu-flip", "n2", 2)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	flipIn(t, fs, "d", "MANIFEST", []byte("lu-flip"))
	s = openStore(t, fs, true)
	defer s.Close()
	if s.Doubt() != nil {
		return
	}
	if got, err := s.load("lu-flip", "n2"); err != nil || len(got) != 2 {
		t.Fatalf("trusted store after a manifest flip holds %v (%v), want 2 regions", got, err)
	}
}

// TestDirtyStoreDoubtPersists: a doubt survives clean restarts until Trust,
// which drops the bad records; an unknown mark survives until known.
func TestDirtyStoreDoubtPersists(t *testing.T) {
	fs := vfs.NewMem()
	s := openStore(t, fs, false)
	markRegions(t, s, "lu", "n2", 2)
	k := dirtyKey("lu", "n3", 1)
	if err := s.db.Set(k, []byte{dirtyRecordVersion, 0, 0, 0, 0}, pebble.Sync); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, fs, true)
	if s.Doubt() == nil {
		t.Fatal("bad record trusted")
	}
	d, err := newDirtyMap(s, "lu", "n2", 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	if unknown, err := d.settleStart(true); err != nil || !unknown {
		t.Fatalf("settleStart of a copy not in sync: %v %v, want unknown", unknown, err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, fs, true)
	if err := s.Doubt(); err == nil || !strings.Contains(err.Error(), "earlier start") {
		t.Fatalf("doubt after a clean restart without Trust: %v", err)
	}
	if err := s.Trust(); err != nil {
		t.Fatal(err)
	}
	if err := s.Doubt(); err != nil {
		t.Fatalf("after Trust: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, fs, true)
	defer s.Close()
	if err := s.Doubt(); err != nil {
		t.Fatalf("reopened after Trust: %v", err)
	}
	if _, err := s.load("lu", "n3"); err != nil {
		t.Fatalf("Trust left the bad record: %v", err)
	}
	d, err = newDirtyMap(s, "lu", "n2", 64<<10)
	if err != nil || !d.isUnknown() || len(d.regionList()) != 0 {
		t.Fatalf("copy marked unknown, after Trust: %v, unknown %v, regions %v", err, d.isUnknown(), d.regionList())
	}
	if err := d.known(); err != nil {
		t.Fatal(err)
	}
	if d, _ := newDirtyMap(s, "lu", "n2", 64<<10); d.isUnknown() {
		t.Fatal("unknown mark survives known")
	}
}
