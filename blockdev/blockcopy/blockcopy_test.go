package blockcopy

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"testing"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/blockdev/blockdevtest"
	"github.com/lupool/lupool/internal/testseed"
)

// source builds a random device: data runs, holes, and allocated runs of
// zeros, with a size that need not be a whole number of blocks. It returns
// the device and how many bytes of non-zero blocks it holds.
func source(t *testing.T, rng *rand.Rand, size int64) (*blockdevtest.Mem, int64) {
	t.Helper()
	ctx := context.Background()
	m := blockdevtest.NewMem(size, blockdev.Caps{})
	for range 20 {
		off := rng.Int64N(size)
		n := min(rng.Int64N(200<<10)+1, size-off)
		p := make([]byte, n)
		switch rng.IntN(3) {
		case 0: // data
			for i := range p {
				p[i] = byte(rng.IntN(255) + 1)
			}
			if err := m.WriteAt(ctx, p, off, 0); err != nil {
				t.Fatal(err)
			}
		case 1: // allocated zeros
			if err := m.WriteZeroes(ctx, off, n, blockdev.NoHole); err != nil {
				t.Fatal(err)
			}
		default: // a hole
			if err := m.Trim(ctx, off, n, 0); err != nil {
				t.Fatal(err)
			}
		}
	}
	data := int64(0)
	b := m.Bytes()
	for i := int64(0); i < size; i += BlockBytes {
		blk := b[i:min(i+BlockBytes, size)]
		if !allZero(blk) {
			data += int64(len(blk))
		}
	}
	return m, data
}

func TestCopySparseAndChecked(t *testing.T) {
	seed := testseed.Seed(t, "./blockdev/blockcopy/")
	rng := rand.New(rand.NewPCG(seed, 7))
	ctx := context.Background()
	for run := range 8 {
		size := 1<<20 + rng.Int64N(1<<20)/512*512
		src, dataBytes := source(t, rng, size)
		dst := blockdevtest.NewMem(size+rng.Int64N(2)*BlockBytes, blockdev.Caps{})
		var progress []int64
		st, err := Copy(ctx, dst, src, Options{ChunkBytes: BlockBytes * (1 + rng.IntN(64)), Progress: func(done, _ int64) { progress = append(progress, done) }})
		if err != nil {
			t.Fatal(err)
		}
		if st.SentBytes != dataBytes {
			t.Fatalf("run %d: sent %d bytes, the source holds %d bytes of non-zero blocks", run, st.SentBytes, dataBytes)
		}
		if st.SentBytes+st.ZeroBytes+st.HoleBytes != size {
			t.Fatalf("run %d: sent %d + zero %d + hole %d != size %d", run, st.SentBytes, st.ZeroBytes, st.HoleBytes, size)
		}
		if !bytes.Equal(dst.Bytes()[:size], src.Bytes()) {
			t.Fatalf("run %d: copy differs from the source", run)
		}
		if len(progress) == 0 || progress[len(progress)-1] != size {
			t.Fatalf("run %d: progress %v does not end at %d", run, progress, size)
		}
		if dst.Flushes() == 0 {
			t.Fatalf("run %d: destination never flushed", run)
		}
		if err := Verify(ctx, dst, st); err != nil {
			t.Fatalf("run %d: %v", run, err)
		}
		// The hash does not depend on how zeros are stored: a hole-less
		// device (no Extenter) with the same bytes hashes the same.
		if h, err := Hash(ctx, plainDevice{dst}, size); err != nil || h != st.Hash {
			t.Fatalf("run %d: hash without extents %x, %v; want %x", run, h[:8], err, st.Hash[:8])
		}
		// One flipped byte in the copy is caught.
		off := rng.Int64N(size)
		if err := dst.WriteAt(ctx, []byte{dst.Bytes()[off] ^ 0x40}, off, 0); err != nil {
			t.Fatal(err)
		}
		if err := Verify(ctx, dst, st); !errors.Is(err, ErrMismatch) {
			t.Fatalf("run %d: verify of a corrupted copy: %v, want ErrMismatch", run, err)
		}
	}
}

// plainDevice hides the Extenter of its device.
type plainDevice struct{ blockdev.Device }

// TestCopyResume: a copy that fails midway, resumed from its last reported
// chunk, completes with the same hash and content, sending only the rest.
func TestCopyResume(t *testing.T) {
	seed := testseed.Seed(t, "./blockdev/blockcopy/")
	rng := rand.New(rand.NewPCG(seed, 9))
	ctx := context.Background()
	const size = 2 << 20
	src, _ := source(t, rng, size)
	// Data in both halves, whatever the random source holds: the copy
	// fails in the second half, and the resumed one skips the first.
	for _, off := range []int64{0, size * 3 / 4} {
		if err := src.WriteAt(ctx, bytes.Repeat([]byte{7}, 64<<10), off, 0); err != nil {
			t.Fatal(err)
		}
	}
	full, err := Copy(ctx, blockdevtest.NewMem(size, blockdev.Caps{}), src, Options{})
	if err != nil {
		t.Fatal(err)
	}
	dst := blockdevtest.NewMem(size, blockdev.Caps{})
	writes := 0
	dst.SetFault(func(op blockdevtest.Op, off, _ int64) error {
		if op == blockdevtest.OpWrite && off >= size/2 {
			writes++
			return blockdev.ErrIO
		}
		return nil
	})
	var done int64
	_, err = Copy(ctx, dst, src, Options{ChunkBytes: 64 << 10, Progress: func(d, _ int64) { done = d }})
	if !errors.Is(err, blockdev.ErrIO) {
		t.Fatalf("copy into a failing destination: %v, want ErrIO", err)
	}
	if writes == 0 || done >= size {
		t.Fatalf("the fault did not stop the copy (writes %d, done %d)", writes, done)
	}
	dst.SetFault(nil)
	st, err := Copy(ctx, dst, src, Options{ChunkBytes: 64 << 10, StartBytes: done})
	if err != nil {
		t.Fatal(err)
	}
	if st.Hash != full.Hash {
		t.Fatal("resumed copy's hash differs from a whole copy's")
	}
	if st.SentBytes >= full.SentBytes {
		t.Fatalf("resume sent %d bytes, a whole copy %d: the prefix was sent again", st.SentBytes, full.SentBytes)
	}
	if !bytes.Equal(dst.Bytes(), src.Bytes()) {
		t.Fatal("resumed copy differs from the source")
	}
}

func TestCopyBadInput(t *testing.T) {
	ctx := context.Background()
	src := blockdevtest.NewMem(1<<20, blockdev.Caps{})
	if err := src.WriteAt(ctx, []byte{1}, 0, 0); err != nil {
		t.Fatal(err)
	}
	dst := blockdevtest.NewMem(1<<20, blockdev.Caps{})
	for name, c := range map[string]struct {
		dst  blockdev.Device
		opts Options
	}{
		"small dst":   {blockdevtest.NewMem(4096, blockdev.Caps{}), Options{}},
		"odd chunk":   {dst, Options{ChunkBytes: 5000}},
		"huge chunk":  {dst, Options{ChunkBytes: MaxChunkBytes * 2}},
		"odd start":   {dst, Options{StartBytes: 100}},
		"start > end": {dst, Options{StartBytes: 2 << 20}},
	} {
		if _, err := Copy(ctx, c.dst, src, c.opts); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if !allZero(dst.Bytes()) {
		t.Fatal("a refused copy wrote")
	}
}
