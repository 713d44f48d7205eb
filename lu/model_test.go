package lu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"testing"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/blockdev/blockdevtest"
	"github.com/lupool/lupool/internal/realclient"
	"github.com/lupool/lupool/internal/testseed"
	"github.com/lupool/lupool/lu/lufs"
)

// modelRun drives a volume and the flat reference model with the same
// random operations and checks that they agree.
type modelRun struct {
	t     *testing.T
	rng   *rand.Rand
	vol   Volume
	model *blockdevtest.Mem
	// exactAlloc: the volume's allocation must equal the model's block by
	// block (MemVolume, MemFS); real file systems may differ (ext4 reports
	// FALLOC_FL_ZERO_RANGE extents as holes), so only data is compared.
	exactAlloc bool
	baseSize   int64
	counts     map[string]int
	noise      []byte // random non-zero bytes that writes copy from
}

func (m *modelRun) randRange(size int64) (off, length int64) {
	if size == 0 {
		return 0, 0
	}
	switch m.rng.IntN(4) {
	case 0: // block aligned
		blocks := (size + BlockSizeBytes - 1) / BlockSizeBytes
		off = m.rng.Int64N(blocks) * BlockSizeBytes
		length = (1 + m.rng.Int64N(16)) * BlockSizeBytes
	case 1: // up to the end of the device
		off = m.rng.Int64N(size)
		length = size - off
	default:
		off = m.rng.Int64N(size)
		length = m.rng.Int64N(64 << 10)
	}
	off = min(off, size)
	return off, min(length, size-off)
}

func (m *modelRun) step(i int) {
	ctx := context.Background()
	size := m.model.Size()
	if got := m.vol.Size(); got != size {
		m.t.Fatalf("op %d: size %d, model %d", i, got, size)
	}
	op := m.rng.IntN(100)
	off, length := m.randRange(size)
	var fua blockdev.Flags
	if m.rng.IntN(4) == 0 {
		fua = blockdev.FUA
	}
	switch {
	case op < 25:
		m.counts["read"]++
		got, want := make([]byte, length), make([]byte, length)
		if err := m.vol.ReadAt(ctx, got, off); err != nil {
			m.t.Fatalf("op %d: read [%d,+%d): %v", i, off, length, err)
		}
		if err := m.model.ReadAt(ctx, want, off); err != nil {
			m.t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			m.t.Fatalf("op %d: read [%d,+%d) differs from the model at byte %d", i, off, length, firstDiff(got, want))
		}
	case op < 55:
		m.counts["write"]++
		start := m.rng.Int64N(int64(len(m.noise)) - length + 1)
		p := bytes.Clone(m.noise[start : start+length])
		m.must(i, "write", m.vol.WriteAt(ctx, p, off, fua), m.model.WriteAt(ctx, p, off, fua))
	case op < 68:
		m.counts["trim"]++
		m.must(i, "trim", m.vol.Trim(ctx, off, length, fua), m.model.Trim(ctx, off, length, fua))
	case op < 83:
		m.counts["zero"]++
		flags := fua
		if m.rng.IntN(2) == 0 {
			flags |= blockdev.NoHole
		}
		if m.rng.IntN(3) == 0 {
			flags |= blockdev.FastZero
		}
		err := m.vol.WriteZeroes(ctx, off, length, flags)
		if flags&blockdev.FastZero != 0 && errors.Is(err, blockdev.ErrNotSupported) {
			m.counts["zero-fast-refused"]++
			return // refused without touching the range: the model stays too
		}
		m.must(i, "write zeroes", err, m.model.WriteZeroes(ctx, off, length, flags))
	case op < 90:
		m.counts["flush"]++
		m.must(i, "flush", m.vol.Flush(ctx), m.model.Flush(ctx))
	case op < 97:
		m.resize(i)
	default:
		m.check(fmt.Sprintf("op %d", i))
	}
}

func (m *modelRun) resize(i int) {
	old := m.model.Size()
	next := m.baseSize/2 + m.rng.Int64N(m.baseSize)
	if m.rng.IntN(2) == 0 {
		next = alignDown(next)
	}
	err := m.vol.Resize(next)
	if errors.Is(err, ErrShrinkAllocated) {
		m.counts["resize-refused"]++
		if next >= old {
			m.t.Fatalf("op %d: grow %d -> %d refused: %v", i, old, next, err)
		}
		if m.exactAlloc && !m.modelHasData(next, old) {
			m.t.Fatalf("op %d: shrink %d -> %d refused but the model's tail is unallocated: %v", i, old, next, err)
		}
		return
	}
	if err != nil {
		m.t.Fatalf("op %d: resize %d -> %d: %v", i, old, next, err)
	}
	if m.exactAlloc && next < old && m.modelHasData(next, old) {
		m.t.Fatalf("op %d: shrink %d -> %d accepted over allocated blocks", i, old, next)
	}
	m.counts["resize"]++
	m.model.Resize(next)
}

func (m *modelRun) modelHasData(from, to int64) bool {
	ext, err := m.model.Extents(context.Background(), from, to-from, nil)
	if err != nil {
		m.t.Fatal(err)
	}
	for _, e := range ext {
		if e.Flags&blockdev.ExtentHole == 0 {
			return true
		}
	}
	return false
}

func (m *modelRun) must(i int, what string, got, want error) {
	m.t.Helper()
	if want != nil {
		m.t.Fatalf("op %d: model %s: %v", i, what, want)
	}
	if got != nil {
		m.t.Fatalf("op %d: %s: %v", i, what, got)
	}
}

// check compares the whole contents and, when exact, the allocation.
func (m *modelRun) check(where string) {
	m.t.Helper()
	m.counts["check"]++
	size := m.model.Size()
	got := make([]byte, size)
	if err := m.vol.ReadAt(context.Background(), got, 0); err != nil {
		m.t.Fatalf("%s: read all: %v", where, err)
	}
	want := m.model.Bytes()
	if !bytes.Equal(got, want) {
		m.t.Fatalf("%s: contents differ from the model at byte %d", where, firstDiff(got, want))
	}
	if !m.exactAlloc {
		return
	}
	va, ma := allocationMap(m.t, m.vol, size), allocationMap(m.t, m.model, size)
	held := int64(0)
	for b := range ma {
		if va[b] != ma[b] {
			m.t.Fatalf("%s: block %d allocated=%v, model %v", where, b, va[b], ma[b])
		}
		if ma[b] {
			held++
		}
	}
	if got := m.vol.AllocatedBytes(); got != held*BlockSizeBytes {
		m.t.Fatalf("%s: AllocatedBytes %d, model holds %d blocks", where, got, held)
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

func runModel(t *testing.T, vol Volume, exactAlloc bool) {
	seed := testseed.Seed(t, "./lu/")
	ops := 1500
	if testing.Short() {
		ops = 300
	}
	size := vol.Size()
	m := &modelRun{
		t: t, rng: rand.New(rand.NewPCG(seed, 1)), vol: vol,
		model:      blockdevtest.NewMem(size, blockdev.Caps{}),
		exactAlloc: exactAlloc, baseSize: size, counts: map[string]int{},
	}
	m.noise = make([]byte, 2*m.baseSize)
	for j := range m.noise {
		m.noise[j] = byte(m.rng.IntN(255) + 1)
	}
	for i := range ops {
		m.step(i)
	}
	m.check("end")
	t.Logf("ops: %v", m.counts)
}

// Unaligned sizes exercise the partial last block; aligned ones the common
// case.
var modelSizes = []int64{1 << 20, 1<<20 + 1000}

func TestModelMemVolume(t *testing.T) {
	for _, size := range modelSizes {
		t.Run(fmt.Sprint(size), func(t *testing.T) {
			v := NewMemVolume(size)
			defer v.Close()
			runModel(t, v, true)
		})
	}
}

func TestModelFileVolumeMemFS(t *testing.T) {
	cases := map[string]lufs.MemFSOptions{
		"full":        {},
		"nopunch":     {NoPunchHole: true},
		"nozerorange": {NoZeroRange: true},
	}
	for name, opts := range cases {
		for _, size := range modelSizes {
			t.Run(fmt.Sprintf("%s/%d", name, size), func(t *testing.T) {
				v, err := createFileVolume(lufs.NewMemFS(opts), "/v.lu", size)
				if err != nil {
					t.Fatal(err)
				}
				defer v.Close()
				// Without hole punching, Trim keeps data (allowed) where the
				// model zeroes it, so only full-featured runs go here.
				if opts.NoPunchHole {
					runNoPunch(t, v)
					return
				}
				runModel(t, v, true)
			})
		}
	}
}

// runNoPunch checks the fallbacks of a file system without hole punching:
// WriteZeroes writes zeros (or refuses with FastZero), Trim is a no-op.
func runNoPunch(t *testing.T, v *FileVolume) {
	ctx := context.Background()
	p := bytes.Repeat([]byte{7}, 3*BlockSizeBytes)
	if err := v.WriteAt(ctx, p, 0, 0); err != nil {
		t.Fatal(err)
	}
	if err := v.WriteZeroes(ctx, 100, 2*BlockSizeBytes, blockdev.FastZero); !errors.Is(err, blockdev.ErrNotSupported) {
		t.Fatalf("FastZero without punch: %v, want ErrNotSupported", err)
	}
	if err := v.Trim(ctx, 0, BlockSizeBytes, 0); err != nil {
		t.Fatalf("trim without punch: %v", err)
	}
	if err := v.WriteZeroes(ctx, 100, 2*BlockSizeBytes, 0); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(p))
	if err := v.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	want := bytes.Clone(p)
	clear(want[100 : 100+2*BlockSizeBytes])
	if !bytes.Equal(got, want) {
		t.Fatalf("contents differ at byte %d", firstDiff(got, want))
	}
}

func TestModelFileVolumeOS(t *testing.T) {
	for _, size := range modelSizes {
		t.Run(fmt.Sprint(size), func(t *testing.T) {
			v, err := CreateFile(filepath.Join(t.TempDir(), "v.lu"), size)
			if err != nil {
				t.Fatal(err)
			}
			defer v.Close()
			runModel(t, v, false)
		})
	}
}

func TestModelFileVolumeTmpfs(t *testing.T) {
	dir := realclient.MountTmpfs(t, "16m")
	for _, size := range modelSizes {
		t.Run(fmt.Sprint(size), func(t *testing.T) {
			v, err := CreateFile(filepath.Join(dir, fmt.Sprintf("v%d.lu", size)), size)
			if err != nil {
				t.Fatal(err)
			}
			defer v.Close()
			// tmpfs has 4 KiB pages, punches and seeks exactly: the
			// allocation must match the model block for block.
			runModel(t, v, true)
		})
	}
}
