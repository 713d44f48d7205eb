package lu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/internal/testseed"
	"github.com/lupool/lupool/lu/lufs"
)

// overlayRun drives an overlay over a random base and a flat model with
// the same random operations (reads, writes, trims, zeroes, flushes,
// snapshots, rollbacks, merges, flatten, reopen, crash) and checks that
// they agree.
type overlayRun struct {
	t      *testing.T
	rng    *rand.Rand
	fs     *lufs.MemFS
	base   Base
	o      *Overlay
	model  []byte
	snaps  []*overlaySnap // every snapshot taken, oldest first
	layers int            // files created, for unique names
	counts map[string]int
	noise  []byte
}

type overlaySnap struct {
	name  string
	layer *Overlay
	want  []byte
}

func newOverlayRun(t *testing.T, seed uint64, sizeBytes int64) *overlayRun {
	r := &overlayRun{
		t: t, rng: rand.New(rand.NewPCG(seed, seed+1)), counts: map[string]int{},
		fs: lufs.NewMemFS(lufs.MemFSOptions{Crashable: true}),
	}
	if err := r.fs.MkdirAll("/p", 0o700); err != nil {
		t.Fatal(err)
	}
	r.noise = make([]byte, 256<<10)
	for i := range r.noise {
		r.noise[i] = byte(r.rng.IntN(255) + 1)
	}
	// The base: a few data runs and holes, a size that need not be a whole
	// number of blocks.
	base, err := CreateFileFS(r.fs, "/p/base.lu", sizeBytes-512*int64(r.rng.IntN(4)))
	if err != nil {
		t.Fatal(err)
	}
	for range 8 {
		off, length := r.randRange(base.Size())
		if err := base.WriteAt(context.Background(), r.noise[:length], off, 0); err != nil {
			t.Fatal(err)
		}
	}
	r.base = base
	r.model = make([]byte, sizeBytes)
	if err := base.ReadAt(context.Background(), r.model[:base.Size()], 0); err != nil {
		t.Fatal(err)
	}
	r.o, err = CreateOverlay(OverlayOptions{Data: r.newData(sizeBytes), Base: base, BaseName: "base", FS: r.fs, MapPath: "/p/top0.lumap"})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func (r *overlayRun) newData(sizeBytes int64) *FileVolume {
	r.layers++
	v, err := CreateFileFS(r.fs, fmt.Sprintf("/p/layer%d.lu", r.layers), sizeBytes)
	if err != nil {
		r.t.Fatal(err)
	}
	return v
}

func (r *overlayRun) randRange(size int64) (off, length int64) {
	switch r.rng.IntN(4) {
	case 0: // whole blocks
		off = r.rng.Int64N(blocksOf(size)) * BlockSizeBytes
		length = (1 + r.rng.Int64N(16)) * BlockSizeBytes
	case 1: // to the end
		off = r.rng.Int64N(size)
		length = size - off
	default:
		off = r.rng.Int64N(size)
		length = 1 + r.rng.Int64N(40<<10)
	}
	off = min(off, size)
	return off, min(length, size-off, int64(len(r.noise)))
}

func (r *overlayRun) step(i int) {
	ctx := context.Background()
	size := int64(len(r.model))
	if got := r.o.Size(); got != size {
		r.t.Fatalf("op %d: size %d, model %d", i, got, size)
	}
	off, length := r.randRange(size)
	var fua blockdev.Flags
	if r.rng.IntN(4) == 0 {
		fua = blockdev.FUA
	}
	op := r.rng.IntN(100)
	switch {
	case op < 25:
		r.counts["read"]++
		got := make([]byte, length)
		if r.rng.IntN(2) == 0 {
			// MemFS reads never wait: TryReadAt must answer every time.
			done, err := r.o.TryReadAt(ctx, got, off)
			r.must(i, "try read", err)
			if !done {
				r.t.Fatalf("op %d: TryReadAt [%d,+%d) declined on MemFS", i, off, length)
			}
			r.counts["try-read"]++
		} else {
			r.must(i, "read", r.o.ReadAt(ctx, got, off))
		}
		if !bytes.Equal(got, r.model[off:off+length]) {
			r.t.Fatalf("op %d: read [%d,+%d) differs from the model at byte %d", i, off, length, off+int64(firstDiff(got, r.model[off:off+length])))
		}
	case op < 50:
		r.counts["write"]++
		p := r.noise[r.rng.Int64N(int64(len(r.noise))-length+1):][:length]
		r.must(i, "write", r.o.WriteAt(ctx, p, off, fua))
		copy(r.model[off:], p)
	case op < 60:
		r.counts["trim"]++
		r.must(i, "trim", r.o.Trim(ctx, off, length, fua))
		if start, end := wholeBlocks(off, length, size); end > start {
			clear(r.model[start:min(end, size)])
		}
	case op < 70:
		r.counts["zero"]++
		flags := fua
		if r.rng.IntN(3) == 0 {
			flags |= blockdev.NoHole
		}
		if r.rng.IntN(4) == 0 {
			flags |= blockdev.FastZero
		}
		err := r.o.WriteZeroes(ctx, off, length, flags)
		if flags&blockdev.FastZero != 0 && errors.Is(err, blockdev.ErrNotSupported) {
			r.counts["zero-fast-refused"]++
			return // refused untouched: the model stays too
		}
		r.must(i, "write zeroes", err)
		clear(r.model[off : off+length])
	case op < 73:
		r.resize(i)
	case op < 76:
		r.counts["flush"]++
		r.must(i, "flush", r.o.Flush(ctx))
	case op < 82:
		r.snapshot(i)
	case op < 86:
		r.rollback(i)
	case op < 88:
		r.counts["merge"]++
		err := r.o.MergeBase(ctx)
		if errors.Is(err, ErrNotMergeable) {
			r.counts["merge-plain"]++
			return
		}
		r.must(i, "merge", err)
	case op < 89:
		r.counts["flatten"]++
		r.must(i, "flatten", r.o.Flatten(ctx))
		if d := r.o.Depth(); d != 1 {
			r.t.Fatalf("op %d: depth %d after flatten", i, d)
		}
	case op < 92:
		r.reopen(i)
	case op < 94:
		r.crash(i)
	default:
		r.check(fmt.Sprintf("op %d", i))
	}
}

// resize grows (always allowed; the new tail reads zeros) or shrinks
// (allowed, or refused untouched when a cut block was written here).
func (r *overlayRun) resize(i int) {
	old := int64(len(r.model))
	next := (128<<10 + r.rng.Int64N(256<<10)) / 512 * 512
	err := r.o.Resize(next)
	if errors.Is(err, ErrShrinkAllocated) && next < old {
		r.counts["resize-refused"]++
		return
	}
	r.must(i, "resize", err)
	r.counts["resize"]++
	if next < old {
		r.model = r.model[:next]
	} else {
		r.model = append(r.model, make([]byte, next-old)...)
	}
}

func (r *overlayRun) must(i int, what string, err error) {
	r.t.Helper()
	if err != nil {
		r.t.Fatalf("op %d: %s: %v", i, what, err)
	}
}

func (r *overlayRun) snapshot(i int) {
	name := fmt.Sprintf("snap%d", len(r.snaps))
	next := OverlayOptions{Data: r.newData(int64(len(r.model))), BaseName: name, FS: r.fs, MapPath: fmt.Sprintf("/p/top%d.lumap", r.layers)}
	depth := r.o.Depth()
	frozen, err := r.o.Snapshot(context.Background(), next)
	if depth+1 > MaxChainDepth {
		if !errors.Is(err, ErrChainTooDeep) {
			r.t.Fatalf("op %d: snapshot at depth %d: %v, want ErrChainTooDeep", i, depth, err)
		}
		r.counts["snapshot-too-deep"]++
		_ = next.Data.Close()
		return
	}
	r.must(i, "snapshot", err)
	r.counts["snapshot"]++
	if !frozen.Frozen() || !frozen.Caps().ReadOnly {
		r.t.Fatalf("op %d: snapshot layer is writable", i)
	}
	if err := frozen.WriteAt(context.Background(), []byte{1}, 0, 0); !errors.Is(err, blockdev.ErrReadOnly) {
		r.t.Fatalf("op %d: write to a snapshot: %v, want ErrReadOnly", i, err)
	}
	r.snaps = append(r.snaps, &overlaySnap{name: name, layer: frozen, want: bytes.Clone(r.model)})
}

// rollback goes back to a random snapshot still in the chain.
func (r *overlayRun) rollback(i int) {
	var inChain []*overlaySnap
	for _, s := range r.snaps {
		r.o.mu.RLock()
		ok := r.o.inChainLocked(s.layer)
		r.o.mu.RUnlock()
		if ok {
			inChain = append(inChain, s)
		}
	}
	if len(inChain) == 0 {
		if len(r.snaps) > 0 {
			err := r.o.Rollback(context.Background(), r.snaps[0].layer, r.snaps[0].name)
			if !errors.Is(err, ErrNotInChain) {
				r.t.Fatalf("op %d: rollback to a merged-away snapshot: %v, want ErrNotInChain", i, err)
			}
			r.counts["rollback-refused"]++
		}
		return
	}
	s := inChain[r.rng.IntN(len(inChain))]
	r.must(i, "rollback", r.o.Rollback(context.Background(), s.layer, s.name))
	r.counts["rollback"]++
	r.model = bytes.Clone(s.want)
}

// reopen flushes, closes the top overlay and opens it again from its map.
func (r *overlayRun) reopen(i int) {
	r.counts["reopen"]++
	ctx := context.Background()
	r.must(i, "flush", r.o.Flush(ctx))
	r.o = r.reopenFrom(i, r.fs)
}

func (r *overlayRun) reopenFrom(i int, fs lufs.FS) *Overlay {
	r.o.mu.RLock()
	dataPath := r.o.mu.data.(*FileVolume).Path()
	mapPath := r.o.mu.mapFile.path
	base := r.o.mu.base
	r.o.mu.RUnlock()
	if fs == lufs.FS(r.fs) {
		r.must(i, "close", r.o.Close())
	}
	data, err := openFileVolume(fs, dataPath)
	r.must(i, "open data", err)
	name, err := OverlayBaseName(fs, mapPath)
	r.must(i, "base name", err)
	o, err := OpenOverlay(OverlayOptions{Data: data, Base: base, BaseName: name, FS: fs, MapPath: mapPath})
	r.must(i, "reopen", err)
	return o
}

// crash flushes, then writes more without flushing, and checks that the
// state a crash leaves reads the flushed content or, block by block, a
// later one. The run then goes on with the live overlay.
func (r *overlayRun) crash(i int) {
	r.counts["crash"]++
	ctx := context.Background()
	r.must(i, "flush", r.o.Flush(ctx))
	flushed := bytes.Clone(r.model)
	for range 1 + r.rng.IntN(6) {
		off, length := r.randRange(int64(len(r.model)))
		p := r.noise[r.rng.Int64N(int64(len(r.noise))-length+1):][:length]
		r.must(i, "write", r.o.WriteAt(ctx, p, off, 0))
		copy(r.model[off:], p)
		if r.rng.IntN(2) == 0 {
			off, length = r.randRange(int64(len(r.model)))
			r.must(i, "zero", r.o.WriteZeroes(ctx, off, length, 0))
			clear(r.model[off : off+length])
		}
	}
	crashed := r.fs.CrashClone(r.rng.Uint64())
	o := r.reopenFrom(i, crashed)
	defer o.Close()
	got := make([]byte, len(r.model))
	r.must(i, "read after crash", o.ReadAt(ctx, got, 0))
	for b := int64(0); b < blocksOf(int64(len(got))); b++ {
		lo, hi := b*BlockSizeBytes, min((b+1)*BlockSizeBytes, int64(len(got)))
		// Each 512-byte sector reads its flushed or its latest content
		// (the unflushed writes here never overlap a sector twice with
		// different data that both survive, so this is exact enough).
		for s := lo; s < hi; s += 512 {
			e := min(s+512, hi)
			if !bytes.Equal(got[s:e], flushed[s:e]) && !bytes.Equal(got[s:e], r.model[s:e]) {
				r.t.Fatalf("op %d: after a crash, bytes [%d,%d) read neither the flushed nor the latest content", i, s, e)
			}
		}
	}
	// What Flush made durable must be there whole: flush the live one and
	// crash again.
	r.must(i, "flush", r.o.Flush(ctx))
	o2 := r.reopenFrom(i, r.fs.CrashClone(r.rng.Uint64()))
	defer o2.Close()
	r.must(i, "read after crash", o2.ReadAt(ctx, got, 0))
	if !bytes.Equal(got, r.model) {
		r.t.Fatalf("op %d: after flush and crash, content differs from the model at byte %d", i, firstDiff(got, r.model))
	}
}

func isZero(p []byte) bool {
	for _, c := range p {
		if c != 0 {
			return false
		}
	}
	return true
}

// check compares everything: the overlay, every snapshot, and the
// allocation report (a block reported as reading zeros must be zeros).
func (r *overlayRun) check(where string) {
	r.t.Helper()
	r.counts["check"]++
	ctx := context.Background()
	got := make([]byte, len(r.model))
	if err := r.o.ReadAt(ctx, got, 0); err != nil {
		r.t.Fatalf("%s: read all: %v", where, err)
	}
	if !bytes.Equal(got, r.model) {
		r.t.Fatalf("%s: content differs from the model at byte %d", where, firstDiff(got, r.model))
	}
	checkZeroExtents(r.t, where, r.o, got)
	r.checkRebuild(where, got)
	for _, s := range r.snaps {
		snapGot := make([]byte, s.layer.Size())
		if err := s.layer.ReadAt(ctx, snapGot, 0); err != nil {
			r.t.Fatalf("%s: read snapshot %s: %v", where, s.name, err)
		}
		if !bytes.Equal(snapGot, s.want) {
			r.t.Fatalf("%s: snapshot %s changed at byte %d", where, s.name, firstDiff(snapGot, s.want))
		}
	}
}

// checkRebuild builds a copy the way replication rebuilds one: a fresh
// overlay over the same base, sent only what Extents does not call a hole.
// It must read what the overlay reads.
func (r *overlayRun) checkRebuild(where string, want []byte) {
	r.t.Helper()
	ctx := context.Background()
	r.o.mu.RLock()
	base := r.o.mu.base
	r.o.mu.RUnlock()
	size := int64(len(want))
	cp, err := CreateOverlay(OverlayOptions{Data: NewMemVolume(size), Base: base})
	if err != nil {
		r.t.Fatal(err)
	}
	defer cp.Close()
	var ext []blockdev.Extent
	for pos := int64(0); pos < size; {
		if ext, err = r.o.Extents(ctx, pos, size-pos, ext[:0]); err != nil {
			r.t.Fatal(err)
		}
		for _, e := range ext {
			if e.Flags&blockdev.ExtentHole == 0 {
				if err := cp.WriteAt(ctx, want[pos:pos+e.LengthBytes], pos, 0); err != nil {
					r.t.Fatal(err)
				}
			}
			pos += e.LengthBytes
		}
	}
	got := make([]byte, size)
	if err := cp.ReadAt(ctx, got, 0); err != nil {
		r.t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		r.t.Fatalf("%s: a copy rebuilt from the extents differs at byte %d", where, firstDiff(got, want))
	}
}

// checkZeroExtents fails when an extent flagged zero does not read zeros.
func checkZeroExtents(t *testing.T, where string, d blockdev.Extenter, content []byte) {
	t.Helper()
	var ext []blockdev.Extent
	for pos := int64(0); pos < int64(len(content)); {
		var err error
		ext, err = d.Extents(context.Background(), pos, int64(len(content))-pos, ext[:0])
		if err != nil || len(ext) == 0 {
			t.Fatalf("%s: extents at %d: %v (%d extents)", where, pos, err, len(ext))
		}
		for _, e := range ext {
			if e.LengthBytes <= 0 || pos+e.LengthBytes > int64(len(content)) {
				t.Fatalf("%s: extent [%d,+%d) outside the device", where, pos, e.LengthBytes)
			}
			if e.Flags&blockdev.ExtentZero != 0 && !isZero(content[pos:pos+e.LengthBytes]) {
				t.Fatalf("%s: extent [%d,+%d) reported zero holds data", where, pos, e.LengthBytes)
			}
			pos += e.LengthBytes
		}
	}
}

func TestOverlayModel(t *testing.T) {
	seed := testseed.Seed(t, "./lu/")
	ops := 1500
	if raceEnabled || testing.Short() {
		ops = 250 // about 10 s under -race on a loaded 2-core machine
	}
	for run := range 4 {
		r := newOverlayRun(t, seed+uint64(run), 256<<10+int64(run)*512)
		for i := range ops {
			r.step(i)
		}
		r.check("end")
		t.Logf("run %d: %v", run, r.counts)
	}
}

// TestOverlayChainDepthLimit: snapshots stack up to MaxChainDepth layers
// and no further; a clone of the deepest layer is refused too.
func TestOverlayChainDepthLimit(t *testing.T) {
	ctx := context.Background()
	base := NewMemVolume(64 << 10)
	o, err := CreateOverlay(OverlayOptions{Data: NewMemVolume(64 << 10), Base: base})
	if err != nil {
		t.Fatal(err)
	}
	if d := o.Depth(); d != 2 {
		t.Fatalf("clone of a plain volume: depth %d, want 2", d)
	}
	var top *Overlay
	for o.Depth() < MaxChainDepth {
		if err := o.WriteAt(ctx, []byte{byte(o.Depth())}, int64(o.Depth())*BlockSizeBytes, 0); err != nil {
			t.Fatal(err)
		}
		if top, err = o.Snapshot(ctx, OverlayOptions{Data: NewMemVolume(64 << 10), BaseName: "s"}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := o.Snapshot(ctx, OverlayOptions{Data: NewMemVolume(64 << 10), BaseName: "s"}); !errors.Is(err, ErrChainTooDeep) {
		t.Fatalf("snapshot at depth %d: %v, want ErrChainTooDeep", o.Depth(), err)
	}
	if _, err := CreateOverlay(OverlayOptions{Data: NewMemVolume(64 << 10), Base: o}); !errors.Is(err, ErrChainTooDeep) {
		t.Fatalf("clone at depth %d: %v, want ErrChainTooDeep", o.Depth(), err)
	}
	// Every layer's write is still visible through the whole chain.
	for d := 2; d < MaxChainDepth; d++ {
		b := make([]byte, 1)
		if err := o.ReadAt(ctx, b, int64(d)*BlockSizeBytes); err != nil || b[0] != byte(d) {
			t.Fatalf("layer %d's write reads %v, %v", d, b, err)
		}
	}
	if err := o.Flatten(ctx); err != nil {
		t.Fatal(err)
	}
	if d := o.Depth(); d != 1 {
		t.Fatalf("depth %d after flatten", d)
	}
	_ = top
}
