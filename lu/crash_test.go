package lu

import (
	"bytes"
	"context"
	"math/rand/v2"
	"testing"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/internal/testseed"
	"github.com/lupool/lupool/lu/lufs"
)

// crashModel remembers, for every block, each contents it may have after a
// crash: the last one guaranteed durable and every later one.
type crashModel struct {
	cur     []byte
	history [][][]byte // per block: allowed contents, oldest (durable) first
}

func newCrashModel(size int64) *crashModel {
	m := &crashModel{cur: make([]byte, size), history: make([][][]byte, size/BlockSizeBytes)}
	for b := range m.history {
		m.history[b] = [][]byte{make([]byte, BlockSizeBytes)}
	}
	return m
}

func (m *crashModel) block(b int64) []byte {
	return bytes.Clone(m.cur[b*BlockSizeBytes : (b+1)*BlockSizeBytes])
}

// changed records new contents of [off, off+length); durable says they are
// guaranteed to survive.
func (m *crashModel) changed(off, length int64, durable bool) {
	for b := off / BlockSizeBytes; b*BlockSizeBytes < off+length; b++ {
		if durable {
			m.history[b] = [][]byte{m.block(b)}
		} else {
			m.history[b] = append(m.history[b], m.block(b))
		}
	}
}

func (m *crashModel) flush() {
	for b := range m.history {
		m.history[b] = [][]byte{m.block(int64(b))}
	}
}

// TestCrash drives a FileVolume on a crashable MemFS, crashes it at a
// random point, and checks that every write acknowledged with FUA or before
// a completed Flush survived, and that every block holds one of the
// contents it had since (unsynced writes may vanish, never tear a
// neighbour).
func TestCrash(t *testing.T) {
	rounds := 30
	if testing.Short() {
		rounds = 8
	}
	seed := testseed.Seed(t, "./lu/")
	for r := range rounds {
		crashRound(t, seed+uint64(r))
	}
}

func crashRound(t *testing.T, seed uint64) {
	const size = 64 * BlockSizeBytes
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(seed, 3))
	fs := lufs.NewMemFS(lufs.MemFSOptions{Crashable: true})
	v, err := createFileVolume(fs, "/v.lu", size)
	if err != nil {
		t.Fatal(err)
	}
	m := newCrashModel(size)
	ops := 50 + rng.IntN(150)
	for range ops {
		switch op := rng.IntN(10); {
		case op < 5: // unaligned write, not durable
			off := rng.Int64N(size)
			p := make([]byte, 1+rng.Int64N(min(3*BlockSizeBytes, size-off)))
			for i := range p {
				p[i] = byte(rng.IntN(256))
			}
			if err := v.WriteAt(ctx, p, off, 0); err != nil {
				t.Fatal(err)
			}
			copy(m.cur[off:], p)
			m.changed(off, int64(len(p)), false)
		case op < 7: // whole-block FUA write: durable on return
			first := rng.Int64N(size / BlockSizeBytes)
			n := 1 + rng.Int64N(min(4, size/BlockSizeBytes-first))
			p := make([]byte, n*BlockSizeBytes)
			for i := range p {
				p[i] = byte(rng.IntN(256))
			}
			off := first * BlockSizeBytes
			if err := v.WriteAt(ctx, p, off, blockdev.FUA); err != nil {
				t.Fatal(err)
			}
			copy(m.cur[off:], p)
			m.changed(off, int64(len(p)), true)
		case op < 8: // trim of whole blocks, FUA or not
			first := rng.Int64N(size / BlockSizeBytes)
			n := 1 + rng.Int64N(min(4, size/BlockSizeBytes-first))
			fua := rng.IntN(2) == 0
			var flags blockdev.Flags
			if fua {
				flags = blockdev.FUA
			}
			off := first * BlockSizeBytes
			if err := v.Trim(ctx, off, n*BlockSizeBytes, flags); err != nil {
				t.Fatal(err)
			}
			clear(m.cur[off : off+n*BlockSizeBytes])
			m.changed(off, n*BlockSizeBytes, fua)
		default:
			if err := v.Flush(ctx); err != nil {
				t.Fatal(err)
			}
			m.flush()
		}
	}
	after := fs.CrashClone(seed)
	w, err := openFileVolume(after, "/v.lu")
	if err != nil {
		t.Fatalf("seed %d: reopen after crash: %v", seed, err)
	}
	defer w.Close()
	if w.Size() != size {
		t.Fatalf("seed %d: size %d after crash, want %d", seed, w.Size(), size)
	}
	got := make([]byte, size)
	if err := w.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	survived := 0
	for b := range m.history {
		blk := got[b*BlockSizeBytes : (b+1)*BlockSizeBytes]
		ok := false
		for _, h := range m.history[b] {
			ok = ok || bytes.Equal(blk, h)
		}
		if !ok {
			t.Fatalf("seed %d: block %d after crash matches none of its %d allowed versions (the first is durable)",
				seed, b, len(m.history[b]))
		}
		if bytes.Equal(blk, m.block(int64(b))) {
			survived++
		}
	}
	_ = v.Close()
	t.Logf("seed %d: %d ops, %d/%d blocks hold their latest contents", seed, ops, survived, len(m.history))
}

// TestCrashDropsUnsynced checks that the crash twin really drops: a write
// that was never synced must be lost in some crash outcome, and a FUA write
// in none.
func TestCrashDropsUnsynced(t *testing.T) {
	ctx := context.Background()
	fs := lufs.NewMemFS(lufs.MemFSOptions{Crashable: true})
	v, err := createFileVolume(fs, "/v.lu", 2*BlockSizeBytes)
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	durable, volatile := bytes.Repeat([]byte{1}, BlockSizeBytes), bytes.Repeat([]byte{2}, BlockSizeBytes)
	if err := v.WriteAt(ctx, durable, 0, blockdev.FUA); err != nil {
		t.Fatal(err)
	}
	if err := v.WriteAt(ctx, volatile, BlockSizeBytes, 0); err != nil {
		t.Fatal(err)
	}
	lost := 0
	for seed := range uint64(32) {
		w, err := openFileVolume(fs.CrashClone(seed), "/v.lu")
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, 2*BlockSizeBytes)
		if err := w.ReadAt(ctx, got, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got[:BlockSizeBytes], durable) {
			t.Fatalf("seed %d: FUA write lost", seed)
		}
		if !bytes.Equal(got[BlockSizeBytes:], volatile) {
			lost++
		}
		_ = w.Close()
	}
	if lost == 0 || lost == 32 {
		t.Fatalf("unsynced write lost in %d of 32 crashes; want some but not all", lost)
	}
}
