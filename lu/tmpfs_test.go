package lu

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/internal/realclient"
	"github.com/lupool/lupool/internal/testseed"
)

// TestAccountingTmpfs: a 1 TiB LU on a small real tmpfs; 64 MiB written
// shows 64 MiB allocated in the LU, the directory and the pool; trimming
// 32 MiB gives 32 MiB back; deleting the LU gives everything back.
func TestAccountingTmpfs(t *testing.T) {
	const (
		tib       = int64(1) << 40
		mib       = int64(1) << 20
		writes    = 64
		tolerance = writes * BlockSizeBytes // one block per write
	)
	ctx := context.Background()
	small, big := realclient.MountTmpfs(t, "16m"), realclient.MountTmpfs(t, "160m")
	p, err := OpenPool(PoolOptions{Dirs: []string{small, big}, OvercommitRatio: 1e6})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	before := p.Status()
	v, err := p.Create("big-lu", tib, KindFile)
	if err != nil {
		t.Fatal(err)
	}
	if fv := v.(*FileVolume); !strings.HasPrefix(fv.Path(), big+"/") {
		t.Fatalf("volume placed in %s, want the directory with the most free space %s", fv.Path(), big)
	}
	rng := rand.New(rand.NewPCG(uint64(testseed.Seed(t, "./lu/")), 2))
	offsets := make([]int64, writes)
	buf := bytes.Repeat([]byte{0xa5}, int(mib))
	for i := range offsets {
		// Distinct MiB slots spread over the whole TiB.
		offsets[i] = (int64(i)*(tib/mib/writes) + rng.Int64N(tib/mib/writes)) * mib
		if err := v.WriteAt(ctx, buf, offsets[i], 0); err != nil {
			t.Fatal(err)
		}
	}
	within := func(what string, got, want int64) {
		t.Helper()
		if got < want-tolerance || got > want+tolerance {
			t.Errorf("%s = %d bytes, want %d ± %d", what, got, want, tolerance)
		}
	}
	st := p.Status()
	within("LU allocated after 64 MiB", v.AllocatedBytes(), 64*mib)
	within("pool allocated after 64 MiB", st.AllocatedBytes, 64*mib)
	within("big dir allocated after 64 MiB", st.Dirs[1].AllocatedBytes, 64*mib)
	within("big dir used (statfs) after 64 MiB", before.Dirs[1].FreeBytes-st.Dirs[1].FreeBytes, 64*mib)
	if st.ProvisionedBytes != tib || st.Dirs[1].Volumes != 1 || st.Dirs[0].Volumes != 0 {
		t.Errorf("provisioned %d, volumes %d/%d", st.ProvisionedBytes, st.Dirs[0].Volumes, st.Dirs[1].Volumes)
	}
	for _, off := range offsets[:writes/2] {
		if err := v.Trim(ctx, off, mib, 0); err != nil {
			t.Fatal(err)
		}
	}
	st = p.Status()
	within("LU allocated after trimming 32 MiB", v.AllocatedBytes(), 32*mib)
	within("pool allocated after trimming 32 MiB", st.AllocatedBytes, 32*mib)
	within("big dir used (statfs) after trim", before.Dirs[1].FreeBytes-st.Dirs[1].FreeBytes, 32*mib)
	if err := p.Delete("big-lu"); err != nil {
		t.Fatal(err)
	}
	st = p.Status()
	if st.AllocatedBytes != 0 || st.ProvisionedBytes != 0 || st.Dirs[1].FreeBytes != before.Dirs[1].FreeBytes {
		t.Errorf("after delete: allocated %d, provisioned %d, free %d (was %d)",
			st.AllocatedBytes, st.ProvisionedBytes, st.Dirs[1].FreeBytes, before.Dirs[1].FreeBytes)
	}
}

// TestFullDiskTmpfs fills a real 16 MiB tmpfs through one LU.
func TestFullDiskTmpfs(t *testing.T) {
	const mib = 1 << 20
	ctx := context.Background()
	dir := realclient.MountTmpfs(t, "16m")
	var mu sync.Mutex
	var levels []PoolLevel
	p, err := OpenPool(PoolOptions{Dirs: []string{dir}, OvercommitRatio: 100,
		OnThreshold: func(l PoolLevel) { mu.Lock(); levels = append(levels, l); mu.Unlock() }})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	a, err := p.Create("a", 64*mib, KindFile)
	if err != nil {
		t.Fatal(err)
	}
	b, err := p.Create("b", 64*mib, KindFile)
	if err != nil {
		t.Fatal(err)
	}
	pattern := func(seed byte, n int) []byte {
		out := make([]byte, n)
		for i := range out {
			out[i] = seed + byte(i/4096)
		}
		return out
	}
	bData := pattern(1, 2*mib)
	if err := b.WriteAt(ctx, bData, 0, 0); err != nil {
		t.Fatal(err)
	}
	// Fill a with 1 MiB writes until the file system refuses.
	var acked []int64 // offsets of acknowledged MiB writes to a
	var full error
	for off := int64(0); off < 64*mib; off += mib {
		err := a.WriteAt(ctx, pattern(byte(off/mib)+50, mib), off, 0)
		if err != nil {
			full = err
			break
		}
		acked = append(acked, off)
	}
	if full == nil {
		t.Fatal("64 MiB fitted in a 16 MiB tmpfs")
	}
	if !errors.Is(full, blockdev.ErrNoSpace) || !errors.Is(full, syscall.ENOSPC) {
		t.Fatalf("full disk error %v must match blockdev.ErrNoSpace and syscall.ENOSPC", full)
	}
	failedOff := int64(len(acked)) * mib
	t.Logf("%d MiB acknowledged before %v", len(acked), full)
	if p.CheckThresholds() != LevelCritical {
		t.Errorf("full disk not reported critical: %+v", p.Status())
	}
	checkA := func(skip func(off int64) bool) {
		t.Helper()
		got := make([]byte, mib)
		for _, off := range acked {
			if skip(off) {
				continue
			}
			if err := a.ReadAt(ctx, got, off); err != nil || !bytes.Equal(got, pattern(byte(off/mib)+50, mib)) {
				t.Fatalf("acknowledged MiB at %d lost or damaged: %v", off, err)
			}
		}
	}
	checkA(func(int64) bool { return false })
	// The other LU still reads, and overwrites its allocated blocks.
	got := make([]byte, len(bData))
	if err := b.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, bData) {
		t.Fatalf("b damaged by a's full disk: %v", err)
	}
	bData = pattern(9, 2*mib)
	if err := b.WriteAt(ctx, bData, 0, blockdev.FUA); err != nil {
		t.Fatalf("b overwrite on a full disk: %v", err)
	}
	if err := b.WriteAt(ctx, pattern(3, mib), 8*mib, 0); !errors.Is(err, blockdev.ErrNoSpace) {
		t.Fatalf("b new write on a full disk: %v, want ErrNoSpace", err)
	}
	// Trim gives space back; both LUs write again.
	if err := a.Trim(ctx, 0, 4*mib, 0); err != nil {
		t.Fatal(err)
	}
	if err := a.WriteAt(ctx, pattern(77, mib), failedOff, 0); err != nil {
		t.Fatalf("a write after trim: %v", err)
	}
	if err := b.WriteAt(ctx, pattern(3, mib), 8*mib, 0); err != nil {
		t.Fatalf("b write after trim: %v", err)
	}
	checkA(func(off int64) bool { return off < 4*mib || off == failedOff })
	if err := b.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, bData) {
		t.Fatalf("b lost its FUA overwrite: %v", err)
	}
	// Deleting an LU frees its space too.
	if err := p.Delete("a"); err != nil {
		t.Fatal(err)
	}
	if err := b.WriteAt(ctx, pattern(4, 8*mib), 16*mib, 0); err != nil {
		t.Fatalf("b write after deleting a: %v", err)
	}
	if l := p.CheckThresholds(); l == LevelCritical {
		t.Errorf("still critical after delete: %+v", p.Status())
	}
	mu.Lock()
	defer mu.Unlock()
	if !slices.Contains(levels, LevelCritical) {
		t.Errorf("OnThreshold never saw critical: %v", levels)
	}
}

// TestCreateDeleteHugeTmpfs: a 1 PiB LU on a 16 MiB disk costs nothing to
// create or delete.
func TestCreateDeleteHugeTmpfs(t *testing.T) {
	dir := realclient.MountTmpfs(t, "16m")
	v, err := CreateFile(filepath.Join(dir, "pib.lu"), 1<<50)
	if err != nil {
		t.Fatal(err)
	}
	if v.Size() != 1<<50 || v.AllocatedBytes() != 0 {
		t.Fatalf("size %d allocated %d", v.Size(), v.AllocatedBytes())
	}
	ctx := context.Background()
	if err := v.WriteAt(ctx, []byte("end"), 1<<50-3, blockdev.FUA); err != nil {
		t.Fatal(err)
	}
	ext, err := v.Extents(ctx, 0, 1<<50, nil)
	if err != nil || len(ext) != 2 || ext[0].Flags != blockdev.ExtentHole|blockdev.ExtentZero || ext[1].Flags != 0 {
		t.Fatalf("extents %v, %v", ext, err)
	}
	if err := v.Resize(1 << 40); !errors.Is(err, ErrShrinkAllocated) {
		t.Fatalf("shrink over data: %v", err)
	}
	if err := v.Trim(ctx, 1<<50-4096, 4096, 0); err != nil {
		t.Fatal(err)
	}
	if err := v.Resize(1 << 40); err != nil {
		t.Fatalf("shrink after trim: %v", err)
	}
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
}
