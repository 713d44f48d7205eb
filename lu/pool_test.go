package lu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/lu/lufs"
)

func openMemPool(t *testing.T, fs lufs.FS, mutate func(*PoolOptions)) *Pool {
	t.Helper()
	opts := PoolOptions{Dirs: []string{"/d0", "/d1"}, FS: fs}
	if mutate != nil {
		mutate(&opts)
	}
	p, err := OpenPool(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Close() })
	return p
}

func TestValidateName(t *testing.T) {
	good := []string{"a", "lu-1", "A.b_c-9", strings.Repeat("x", 128), "..."}
	bad := []string{"", ".", "..", "a/b", "a b", "é", strings.Repeat("x", 129), "a\x00"}
	for _, n := range good {
		if err := ValidateName(n); err != nil {
			t.Errorf("ValidateName(%q) = %v, want nil", n, err)
		}
	}
	for _, n := range bad {
		if err := ValidateName(n); !errors.Is(err, ErrInvalidName) {
			t.Errorf("ValidateName(%q) = %v, want ErrInvalidName", n, err)
		}
	}
}

func TestPoolOptionsValidate(t *testing.T) {
	cases := map[string]PoolOptions{
		"no dirs":       {},
		"ratio":         {Dirs: []string{"/a"}, OvercommitRatio: -1},
		"warn":          {Dirs: []string{"/a"}, WarnPercent: 120},
		"critical<warn": {Dirs: []string{"/a"}, WarnPercent: 90, CriticalPercent: 80},
		"duplicate":     {Dirs: []string{"/a", "/a/"}},
	}
	for name, o := range cases {
		o.EnsureDefaults()
		if err := o.Validate(); err == nil {
			t.Errorf("%s: Validate accepted %+v", name, o)
		}
	}
	o := PoolOptions{Dirs: []string{"/a"}}
	o.EnsureDefaults()
	if err := o.Validate(); err != nil || o.OvercommitRatio != 4 || o.WarnPercent != 80 || o.CriticalPercent != 90 {
		t.Fatalf("defaults: %+v, %v", o, err)
	}
}

func TestPoolCreateGetDelete(t *testing.T) {
	ctx := context.Background()
	p := openMemPool(t, lufs.NewMemFS(lufs.MemFSOptions{}), nil)
	v, err := p.Create("vm1", 1<<30, KindFile)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Create("vm1", 1<<20, KindMemory); !errors.Is(err, ErrExists) {
		t.Fatalf("duplicate create: %v, want ErrExists", err)
	}
	if _, err := p.Create("bad/name", 1, KindFile); !errors.Is(err, ErrInvalidName) {
		t.Fatalf("bad name: %v", err)
	}
	if _, err := p.Create("m1", 1<<20, KindMemory); err != nil {
		t.Fatal(err)
	}
	if got := p.Names(); fmt.Sprint(got) != "[m1 vm1]" {
		t.Fatalf("Names = %v", got)
	}
	got, ok := p.Get("vm1")
	if !ok || got != v || got.Kind() != KindFile || got.Size() != 1<<30 {
		t.Fatalf("Get(vm1) = %v, %v", got, ok)
	}
	if err := v.WriteAt(ctx, []byte("hello"), 0, 0); err != nil {
		t.Fatal(err)
	}
	if err := p.Delete("vm1"); err != nil {
		t.Fatal(err)
	}
	if err := v.WriteAt(ctx, []byte("x"), 0, 0); !errors.Is(err, blockdev.ErrShutdown) {
		t.Fatalf("write after delete: %v, want ErrShutdown", err)
	}
	if _, ok := p.Get("vm1"); ok {
		t.Fatal("vm1 still there after Delete")
	}
	if err := p.Delete("vm1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("second delete: %v, want ErrNotFound", err)
	}
	if err := p.Resize("nope", 1); !errors.Is(err, ErrNotFound) {
		t.Fatalf("resize unknown: %v", err)
	}
}

func TestPoolOvercommit(t *testing.T) {
	fs := lufs.NewMemFS(lufs.MemFSOptions{CapacityBytes: 1 << 30})
	p := openMemPool(t, fs, func(o *PoolOptions) { o.Dirs = []string{"/d"}; o.OvercommitRatio = 2 })
	if _, err := p.Create("a", 3<<29, KindFile); err != nil { // 1.5 GiB of 2 GiB
		t.Fatal(err)
	}
	_, err := p.Create("b", 1<<30, KindFile)
	if !errors.Is(err, ErrOvercommit) {
		t.Fatalf("create beyond the limit: %v, want ErrOvercommit", err)
	}
	for _, n := range []string{"2684354560", "1073741824", "limit 2"} {
		if !strings.Contains(err.Error(), n) {
			t.Errorf("overcommit message %q does not name %s", err, n)
		}
	}
	// Memory volumes use RAM and are not limited by the disks.
	if _, err := p.Create("m", 10<<30, KindMemory); err != nil {
		t.Fatalf("memory volume: %v", err)
	}
	if err := p.Resize("a", 5<<29); !errors.Is(err, ErrOvercommit) {
		t.Fatalf("grow beyond the limit: %v", err)
	}
	if err := p.Resize("a", 1<<29); err != nil {
		t.Fatalf("shrink: %v", err)
	}
	if _, err := p.Create("b", 1<<30, KindFile); err != nil {
		t.Fatalf("create after shrink: %v", err)
	}
	st := p.Status()
	if st.ProvisionedBytes != 3<<29 || st.MemoryProvisionedBytes != 10<<30 || st.OvercommitRatio != 1.5 {
		t.Fatalf("status %+v", st)
	}
}

func TestPoolReopen(t *testing.T) {
	ctx := context.Background()
	fs := lufs.NewMemFS(lufs.MemFSOptions{})
	p := openMemPool(t, fs, nil)
	want := map[string][]byte{}
	for i := range 5 {
		name := fmt.Sprintf("lu%d", i)
		v, err := p.Create(name, int64(1<<20+i), KindFile)
		if err != nil {
			t.Fatal(err)
		}
		want[name] = bytes.Repeat([]byte{byte(i + 1)}, 1000+i)
		if err := v.WriteAt(ctx, want[name], int64(i*4096), 0); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := p.Create("mem", 1<<20, KindMemory); err != nil {
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Create("x", 1, KindFile); !errors.Is(err, ErrPoolClosed) {
		t.Fatalf("create after close: %v", err)
	}
	q := openMemPool(t, fs, nil)
	if got := q.Names(); fmt.Sprint(got) != "[lu0 lu1 lu2 lu3 lu4]" {
		t.Fatalf("reopened names %v", got)
	}
	for i := range 5 {
		name := fmt.Sprintf("lu%d", i)
		v, _ := q.Get(name)
		if v.Size() != int64(1<<20+i) {
			t.Fatalf("%s size %d", name, v.Size())
		}
		got := make([]byte, len(want[name]))
		if err := v.ReadAt(ctx, got, int64(i*4096)); err != nil || !bytes.Equal(got, want[name]) {
			t.Fatalf("%s data lost across reopen: %v", name, err)
		}
	}
	// The same name in two directories is refused rather than guessed.
	f, err := fs.OpenFile("/d1/lu0.lu", os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	_ = f.Close()
	if _, err := OpenPool(PoolOptions{Dirs: []string{"/d0", "/d1"}, FS: fs}); err == nil || !strings.Contains(err.Error(), "lu0") {
		t.Fatalf("duplicate volume across dirs: %v", err)
	}
}

func TestPoolThresholds(t *testing.T) {
	ctx := context.Background()
	fs := lufs.NewMemFS(lufs.MemFSOptions{CapacityBytes: 100 * BlockSizeBytes})
	var levels []PoolLevel
	p := openMemPool(t, fs, func(o *PoolOptions) {
		o.Dirs = []string{"/d"}
		o.OnThreshold = func(l PoolLevel) { levels = append(levels, l) }
	})
	v, err := p.Create("a", 400*BlockSizeBytes, KindFile)
	if err != nil {
		t.Fatal(err)
	}
	write := func(blocks int64) {
		if err := v.WriteAt(ctx, make([]byte, blocks*BlockSizeBytes), 0, 0); err != nil {
			t.Fatal(err)
		}
	}
	write(79)
	if l := p.CheckThresholds(); l != LevelOK {
		t.Fatalf("79%% used: level %s", l)
	}
	write(85)
	if st := p.Status(); st.Level != LevelWarn || st.Dirs[0].Level != LevelWarn {
		t.Fatalf("85%% used: %+v", st)
	}
	write(95)
	if l := p.CheckThresholds(); l != LevelCritical {
		t.Fatalf("95%% used: level %s", l)
	}
	if err := v.Trim(ctx, 0, 95*BlockSizeBytes, 0); err != nil {
		t.Fatal(err)
	}
	if l := p.CheckThresholds(); l != LevelOK {
		t.Fatalf("after trim: level %s", l)
	}
	if fmt.Sprint(levels) != "[warn critical ok]" {
		t.Fatalf("OnThreshold saw %v", levels)
	}
}

func TestPoolMemoryAccounting(t *testing.T) {
	ctx := context.Background()
	p := openMemPool(t, lufs.NewMemFS(lufs.MemFSOptions{}), nil)
	m, err := p.Create("m", 1<<30, KindMemory)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.WriteAt(ctx, make([]byte, 10*BlockSizeBytes+1), 5, 0); err != nil {
		t.Fatal(err)
	}
	st := p.Status()
	if st.MemoryAllocatedBytes != 11*BlockSizeBytes || st.AllocatedBytes != 0 || st.ProvisionedBytes != 0 {
		t.Fatalf("status %+v", st)
	}
	if err := p.Delete("m"); err != nil {
		t.Fatal(err)
	}
	if st := p.Status(); st.MemoryAllocatedBytes != 0 || st.MemoryProvisionedBytes != 0 {
		t.Fatalf("after delete %+v", st)
	}
}

// TestPoolConcurrent runs creates, deletes, status and I/O together under
// the race detector; each goroutine checks its own volume's data.
func TestPoolConcurrent(t *testing.T) {
	ctx := context.Background()
	p := openMemPool(t, lufs.NewMemFS(lufs.MemFSOptions{}), nil)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := range 8 {
		wg.Go(func() {
			kind := KindFile
			if g%2 == 1 {
				kind = KindMemory
			}
			for i := range 20 {
				name := fmt.Sprintf("g%d-%d", g, i)
				v, err := p.Create(name, 1<<20, kind)
				if err != nil {
					errs <- err
					return
				}
				data := bytes.Repeat([]byte{byte(g), byte(i)}, 3000)
				got := make([]byte, len(data))
				if err := v.WriteAt(ctx, data, int64(i*100), 0); err != nil {
					errs <- err
					return
				}
				_ = p.Status()
				if err := v.ReadAt(ctx, got, int64(i*100)); err != nil || !bytes.Equal(got, data) {
					errs <- fmt.Errorf("%s: read back: %v", name, err)
					return
				}
				if err := p.Delete(name); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if n := len(p.Names()); n != 0 {
		t.Fatalf("%d volumes left", n)
	}
}

// TestPoolCloseFlushes: a clean shutdown makes every completed write
// durable, whatever a crash right after would drop.
func TestPoolCloseFlushes(t *testing.T) {
	ctx := context.Background()
	fs := lufs.NewMemFS(lufs.MemFSOptions{Crashable: true})
	p := openMemPool(t, fs, nil)
	v, err := p.Create("a", 1<<20, KindFile)
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte{42}, 64*BlockSizeBytes)
	if err := v.WriteAt(ctx, data, 0, 0); err != nil {
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	for seed := range uint64(8) {
		q, err := OpenPool(PoolOptions{Dirs: []string{"/d0", "/d1"}, FS: fs.CrashClone(seed)})
		if err != nil {
			t.Fatal(err)
		}
		w, ok := q.Get("a")
		got := make([]byte, len(data))
		if !ok {
			t.Fatalf("seed %d: volume lost", seed)
		}
		if err := w.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, data) {
			t.Fatalf("seed %d: unflushed data lost despite a clean Close (%v)", seed, err)
		}
		_ = q.Close()
	}
}

// TestPoolMemoryLimit: memory volumes share the pool's memory budget and
// fail writes beyond it with ENOSPC, recovering after trim or delete.
func TestPoolMemoryLimit(t *testing.T) {
	ctx := context.Background()
	p := openMemPool(t, lufs.NewMemFS(lufs.MemFSOptions{}), func(o *PoolOptions) {
		o.MemoryLimitBytes = 10 * BlockSizeBytes
	})
	a, err := p.Create("a", 1<<30, KindMemory)
	if err != nil {
		t.Fatal(err)
	}
	b, err := p.Create("b", 1<<30, KindMemory)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.WriteAt(ctx, make([]byte, 6*BlockSizeBytes), 0, 0); err != nil {
		t.Fatal(err)
	}
	err = b.WriteAt(ctx, make([]byte, 6*BlockSizeBytes), 0, 0)
	if !errors.Is(err, blockdev.ErrNoSpace) || !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("write beyond the memory limit: %v", err)
	}
	if err := b.WriteZeroes(ctx, 1<<20, 6*BlockSizeBytes, blockdev.NoHole); !errors.Is(err, blockdev.ErrNoSpace) {
		t.Fatalf("NoHole zero beyond the memory limit: %v", err)
	}
	if err := a.Trim(ctx, 0, 4*BlockSizeBytes, 0); err != nil {
		t.Fatal(err)
	}
	if err := b.WriteAt(ctx, make([]byte, 6*BlockSizeBytes), 0, 0); err != nil {
		t.Fatalf("write after trim: %v", err)
	}
	if err := p.Delete("a"); err != nil {
		t.Fatal(err)
	}
	if err := b.WriteAt(ctx, make([]byte, 4*BlockSizeBytes), 1<<20, 0); err != nil {
		t.Fatalf("write after delete: %v", err)
	}
	if st := p.Status(); st.MemoryAllocatedBytes != 10*BlockSizeBytes || st.MemoryLimitBytes != 10*BlockSizeBytes {
		t.Fatalf("status %+v", st)
	}
}

// TestPoolReserve: reservations count against the overcommit limit, so two
// creates racing each other cannot both pass; Create takes its own
// reservation over, Release and expiry give the room back.
func TestPoolReserve(t *testing.T) {
	fs := lufs.NewMemFS(lufs.MemFSOptions{CapacityBytes: 1 << 30})
	p := openMemPool(t, fs, func(o *PoolOptions) { o.Dirs = []string{"/d"}; o.OvercommitRatio = 1 })
	if err := p.Reserve("a", 600<<20, KindFile, time.Minute); err != nil {
		t.Fatal(err)
	}
	if err := p.Reserve("b", 600<<20, KindFile, time.Minute); !errors.Is(err, ErrOvercommit) {
		t.Fatalf("second reservation past the limit: %v, want ErrOvercommit", err)
	}
	if err := p.Reserve("m", 10<<30, KindMemory, time.Minute); err != nil {
		t.Fatalf("memory volumes need no room on disk: %v", err)
	}
	// a's own reservation does not count against it.
	if _, err := p.Create("a", 600<<20, KindFile); err != nil {
		t.Fatalf("create with its own reservation: %v", err)
	}
	if _, err := p.Create("b", 600<<20, KindFile); !errors.Is(err, ErrOvercommit) {
		t.Fatalf("create past the limit after a: %v", err)
	}
	if err := p.Reserve("c", 300<<20, KindFile, time.Minute); err != nil {
		t.Fatal(err)
	}
	p.Release("c")
	if err := p.Reserve("d", 400<<20, KindFile, time.Nanosecond); err != nil {
		t.Fatalf("after release: %v", err)
	}
	time.Sleep(time.Millisecond)
	if err := p.Reserve("e", 400<<20, KindFile, time.Minute); err != nil {
		t.Fatalf("an expired reservation still holds room: %v", err)
	}
}

// TestPoolMemoryBudget: the sizes of memory volumes and of memory
// reservations may not pass the memory budget; a refusal changes nothing;
// delete, release and expiry give the room back; file volumes do not count.
func TestPoolMemoryBudget(t *testing.T) {
	p := openMemPool(t, lufs.NewMemFS(lufs.MemFSOptions{CapacityBytes: 1 << 30}), func(o *PoolOptions) {
		o.MemoryBudgetBytes = 100 << 20
	})
	if _, err := p.Create("a", 60<<20, KindMemory); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Create("f", 500<<20, KindFile); err != nil {
		t.Fatalf("file volumes do not draw on the memory budget: %v", err)
	}
	var be *MemoryBudgetError
	_, err := p.Create("b", 41<<20, KindMemory)
	if !errors.Is(err, ErrMemoryBudget) || !errors.Is(err, syscall.ENOSPC) || !errors.As(err, &be) ||
		be.UsedBytes != 60<<20 || be.LimitBytes != 100<<20 {
		t.Fatalf("create past the budget: %v", err)
	}
	if _, ok := p.Get("b"); ok {
		t.Fatal("a refused create left a volume")
	}
	if err := p.Reserve("r", 40<<20, KindMemory, time.Minute); err != nil {
		t.Fatalf("reservation within the budget: %v", err)
	}
	st := p.Status()
	if st.MemoryBudgetBytes != 100<<20 || st.MemoryReservedBytes != 40<<20 || st.MemoryFreeBytes != 0 ||
		st.MemoryProvisionedBytes != 60<<20 {
		t.Fatalf("status with a reservation: %+v", st)
	}
	if err := p.Reserve("s", 1<<20, KindMemory, time.Minute); !errors.Is(err, ErrMemoryBudget) {
		t.Fatalf("reservation past the budget: %v", err)
	}
	if err := p.Resize("a", 61<<20); !errors.Is(err, ErrMemoryBudget) {
		t.Fatalf("grow past the budget: %v", err)
	}
	if v, _ := p.Get("a"); v.Size() != 60<<20 {
		t.Fatalf("a refused grow changed the size to %d", v.Size())
	}
	// r's own reservation is taken over by its create.
	if _, err := p.Create("r", 40<<20, KindMemory); err != nil {
		t.Fatalf("create with its own reservation: %v", err)
	}
	if err := p.Delete("a"); err != nil {
		t.Fatal(err)
	}
	if st := p.Status(); st.MemoryFreeBytes != 60<<20 || st.MemoryReservedBytes != 0 {
		t.Fatalf("delete did not free the budget: %+v", st)
	}
	if err := p.Reserve("t", 60<<20, KindMemory, time.Minute); err != nil {
		t.Fatalf("after delete: %v", err)
	}
	p.Release("t")
	if err := p.Reserve("u", 60<<20, KindMemory, time.Nanosecond); err != nil {
		t.Fatalf("after release: %v", err)
	}
	time.Sleep(time.Millisecond)
	if _, err := p.Create("v", 60<<20, KindMemory); err != nil {
		t.Fatalf("a lapsed reservation still holds the budget: %v", err)
	}
}
