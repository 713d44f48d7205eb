package lu

import (
	"bytes"
	"context"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/lu/lufs"
)

// TestDataPathNoSharedLock holds one write to volume a inside the file
// system and checks that, meanwhile, a write and a read elsewhere in a, I/O
// on another volume b, and the pool's own calls (Status, Create, Get) all
// complete: non-overlapping I/O on one LU runs in parallel and no pool-wide
// lock is held on the data path.
func TestDataPathNoSharedLock(t *testing.T) {
	ctx := context.Background()
	p, ffs := openFaultPool(t)
	a, err := p.Create("a", 1<<20, KindFile)
	if err != nil {
		t.Fatal(err)
	}
	b, err := p.Create("b", 1<<20, KindFile)
	if err != nil {
		t.Fatal(err)
	}
	held, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	ffs.SetInjector(func(e lufs.Event) error {
		if e.Op == lufs.OpWrite && strings.HasSuffix(e.Path, "/a.lu") && e.Off == 0 {
			once.Do(func() { close(held) })
			<-release
		}
		return nil
	})
	blocked := make(chan error, 1)
	go func() { blocked <- a.WriteAt(ctx, bytes.Repeat([]byte{1}, BlockSizeBytes), 0, 0) }()
	select {
	case <-held:
	case <-time.After(10 * time.Second):
		t.Fatal("the first write never reached the file system")
	}
	defer func() {
		select {
		case <-release:
		default:
			close(release)
		}
	}()

	others := []struct {
		name string
		run  func() error
	}{
		{"write elsewhere in a", func() error { return a.WriteAt(ctx, []byte{2}, 1<<19, blockdev.FUA) }},
		{"read elsewhere in a", func() error { return a.ReadAt(ctx, make([]byte, 100), 1<<19) }},
		{"extents of a", func() error { _, err := a.Extents(ctx, 0, 1<<20, nil); return err }},
		{"write b", func() error { return b.WriteAt(ctx, []byte{3}, 0, blockdev.FUA) }},
		{"flush b", func() error { return b.Flush(ctx) }},
		{"pool status", func() error { p.Status(); return nil }},
		{"pool create c", func() error { _, err := p.Create("c", 1<<30, KindFile); return err }},
		{"pool get a", func() error { p.Get("a"); return nil }},
	}
	for _, o := range others {
		done := make(chan error, 1)
		go func() { done <- o.run() }()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("%s while a write to a is held: %v", o.name, err)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("%s waits for an unrelated write held in the file system: a shared lock on the data path", o.name)
		}
	}
	close(release)
	if err := <-blocked; err != nil {
		t.Fatalf("held write: %v", err)
	}
}

// TestDataPathCalls records every file-system call that I/O on an already
// allocated block makes: one pwrite (or pread) and nothing else, so no
// metadata write (no truncate, stat, allocation, directory or sync call)
// sits on that path; FUA adds only the data sync.
func TestDataPathCalls(t *testing.T) {
	ctx := context.Background()
	p, ffs := openFaultPool(t)
	v, err := p.Create("v", 1<<20, KindFile)
	if err != nil {
		t.Fatal(err)
	}
	block := bytes.Repeat([]byte{9}, BlockSizeBytes)
	if err := v.WriteAt(ctx, block, 8*BlockSizeBytes, 0); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var ops []lufs.Op
	ffs.SetInjector(func(e lufs.Event) error {
		mu.Lock()
		ops = append(ops, e.Op)
		mu.Unlock()
		return nil
	})
	trace := func(what string, run func() error, allowed ...[]lufs.Op) {
		t.Helper()
		mu.Lock()
		ops = nil
		mu.Unlock()
		if err := run(); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		mu.Lock()
		got := slices.Clone(ops)
		mu.Unlock()
		for _, want := range allowed {
			if slices.Equal(got, want) {
				return
			}
		}
		t.Errorf("%s made the file-system calls %v; want one of %v", what, got, allowed)
	}
	write, read, sync := lufs.OpWrite, lufs.OpRead, lufs.OpSync
	for i := range 3 {
		off := int64(8*BlockSizeBytes + i*100)
		trace("overwrite of an allocated block",
			func() error { return v.WriteAt(ctx, block[:1000], off, 0) }, []lufs.Op{write})
		trace("FUA overwrite of an allocated block",
			func() error { return v.WriteAt(ctx, block[:1000], off, blockdev.FUA) },
			[]lufs.Op{write}, []lufs.Op{write, sync}) // pwritev2(RWF_DSYNC), or pwrite + fdatasync
		trace("read of an allocated block",
			func() error { return v.ReadAt(ctx, make([]byte, 1000), off) }, []lufs.Op{read})
	}
}

// openFaultPool opens a pool on a fault-injecting memory FS, closed when
// the test ends.
func openFaultPool(t *testing.T) (*Pool, *lufs.FaultFS) {
	t.Helper()
	ffs := lufs.NewFaultFS(lufs.NewMemFS(lufs.MemFSOptions{}))
	p, err := OpenPool(PoolOptions{Dirs: []string{"/d"}, FS: ffs, OvercommitRatio: 1e6})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p, ffs
}
