package lu

import (
	"bytes"
	"context"
	"errors"
	"syscall"
	"testing"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/lu/lufs"
)

func faultVolume(t *testing.T) (*FileVolume, *lufs.FaultFS) {
	t.Helper()
	ffs := lufs.NewFaultFS(lufs.NewMemFS(lufs.MemFSOptions{}))
	v, err := createFileVolume(ffs, "/v.lu", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = v.Close() })
	return v, ffs
}

func TestFaultErrorsMapped(t *testing.T) {
	ctx := context.Background()
	data := bytes.Repeat([]byte{5}, 3*BlockSizeBytes)
	cases := []struct {
		name     string
		op       lufs.Op
		errno    syscall.Errno
		sentinel error
		run      func(v *FileVolume) error
	}{
		{"read EIO", lufs.OpRead, syscall.EIO, blockdev.ErrIO,
			func(v *FileVolume) error { return v.ReadAt(ctx, make([]byte, 10), 0) }},
		{"write EIO", lufs.OpWrite, syscall.EIO, blockdev.ErrIO,
			func(v *FileVolume) error { return v.WriteAt(ctx, data, 8192, 0) }},
		{"write ENOSPC", lufs.OpWrite, syscall.ENOSPC, blockdev.ErrNoSpace,
			func(v *FileVolume) error { return v.WriteAt(ctx, data, 8192, 0) }},
		{"FUA write ENOSPC", lufs.OpWrite, syscall.ENOSPC, blockdev.ErrNoSpace,
			func(v *FileVolume) error { return v.WriteAt(ctx, data, 8192, blockdev.FUA) }},
		{"flush EIO", lufs.OpSync, syscall.EIO, blockdev.ErrIO,
			func(v *FileVolume) error { return v.Flush(ctx) }},
		{"trim EIO", lufs.OpPunchHole, syscall.EIO, blockdev.ErrIO,
			func(v *FileVolume) error { return v.Trim(ctx, 0, 1<<20, 0) }},
		{"zero ENOSPC", lufs.OpZeroRange, syscall.ENOSPC, blockdev.ErrNoSpace,
			func(v *FileVolume) error { return v.WriteZeroes(ctx, 0, 1<<20, blockdev.NoHole) }},
		{"extents EIO", lufs.OpSeek, syscall.EIO, blockdev.ErrIO,
			func(v *FileVolume) error { _, err := v.Extents(ctx, 0, 1<<20, nil); return err }},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			v, ffs := faultVolume(t)
			if err := v.WriteAt(ctx, data, 0, 0); err != nil {
				t.Fatal(err)
			}
			ffs.SetInjector(lufs.OnOps(lufs.Errno(c.errno), c.op))
			err := c.run(v)
			if !errors.Is(err, c.sentinel) || !errors.Is(err, c.errno) {
				t.Fatalf("got %v; want an error matching %v and %v", err, c.sentinel, c.errno)
			}
			// The volume stays usable and the data acknowledged before is
			// intact once the fault clears.
			ffs.SetInjector(nil)
			got := make([]byte, len(data))
			if err := v.ReadAt(ctx, got, 0); err != nil {
				t.Fatal(err)
			}
			if c.op != lufs.OpPunchHole && c.op != lufs.OpZeroRange && !bytes.Equal(got, data) {
				t.Fatalf("acknowledged data damaged at byte %d", firstDiff(got, data))
			}
			if err := c.run(v); err != nil {
				t.Fatalf("after the fault cleared: %v", err)
			}
		})
	}
}

// TestFaultShortWrite: a write that lands partly and then hits ENOSPC
// reports ErrNoSpace; only its own range may have changed.
func TestFaultShortWrite(t *testing.T) {
	ctx := context.Background()
	v, ffs := faultVolume(t)
	old := bytes.Repeat([]byte{1}, 4*BlockSizeBytes)
	if err := v.WriteAt(ctx, old, 0, 0); err != nil {
		t.Fatal(err)
	}
	ffs.SetInjector(lufs.OnOps(&lufs.ShortWrite{Bytes: 1000, Err: lufs.Errno(syscall.ENOSPC)}, lufs.OpWrite))
	p := bytes.Repeat([]byte{2}, 2*BlockSizeBytes)
	err := v.WriteAt(ctx, p, BlockSizeBytes, 0)
	if !errors.Is(err, blockdev.ErrNoSpace) || !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("short write: %v", err)
	}
	ffs.SetInjector(nil)
	got := make([]byte, len(old))
	if err := v.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	want := bytes.Clone(old)
	copy(want[BlockSizeBytes:], p[:1000])
	if !bytes.Equal(got, want) {
		t.Fatalf("neighbouring data changed at byte %d", firstDiff(got, want))
	}
}

// TestLargeWriteChunked: a buffered write larger than maxWriteChunkBytes
// reaches the file in pieces no larger than that, in order, covering it
// exactly; a FUA write stays one call; a failure in the middle stops the
// rest and is reported.
func TestLargeWriteChunked(t *testing.T) {
	ctx := context.Background()
	v, ffs := faultVolume(t)
	var writes []lufs.Event
	ffs.SetInjector(func(e lufs.Event) error {
		if e.Op == lufs.OpWrite {
			writes = append(writes, e)
		}
		return nil
	})
	p := make([]byte, 3*maxWriteChunkBytes+BlockSizeBytes+7)
	for i := range p {
		p[i] = byte(i * 7)
	}
	const base = 3*BlockSizeBytes + 5
	if err := v.WriteAt(ctx, p, base, 0); err != nil {
		t.Fatal(err)
	}
	if len(writes) != 4 {
		t.Fatalf("%d write calls for %d bytes, want 4: %+v", len(writes), len(p), writes)
	}
	next := int64(base)
	for _, w := range writes {
		if w.Off != next || w.Length > maxWriteChunkBytes {
			t.Fatalf("write call %+v: want offset %d and at most %d bytes", w, next, maxWriteChunkBytes)
		}
		next += w.Length
	}
	if next != base+int64(len(p)) {
		t.Fatalf("calls end at %d, want %d", next, base+int64(len(p)))
	}
	got := make([]byte, len(p))
	if err := v.ReadAt(ctx, got, base); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, p) {
		t.Fatalf("read back differs at byte %d", firstDiff(got, p))
	}

	writes = nil
	if err := v.WriteAt(ctx, p, 0, blockdev.FUA); err != nil {
		t.Fatal(err)
	}
	if len(writes) != 1 || writes[0].Length != int64(len(p)) {
		t.Fatalf("FUA write made calls %+v, want one of %d bytes", writes, len(p))
	}

	calls := 0
	ffs.SetInjector(func(e lufs.Event) error {
		if e.Op != lufs.OpWrite {
			return nil
		}
		if calls++; calls == 2 {
			return lufs.Errno(syscall.EIO)
		}
		return nil
	})
	if err := v.WriteAt(ctx, p, 0, 0); !errors.Is(err, blockdev.ErrIO) {
		t.Fatalf("second piece failing: got %v, want ErrIO", err)
	}
	if calls != 2 {
		t.Fatalf("%d write calls after the second failed, want the write to stop there", calls)
	}
}

// TestFaultNth fails only the third write.
func TestFaultNth(t *testing.T) {
	ctx := context.Background()
	v, ffs := faultVolume(t)
	ffs.SetInjector(lufs.Nth(3, lufs.OnOps(lufs.Errno(syscall.EIO), lufs.OpWrite)))
	var failed []int
	for i := range 5 {
		if err := v.WriteAt(ctx, []byte{byte(i)}, int64(i), 0); err != nil {
			if !errors.Is(err, lufs.ErrInjected) {
				t.Fatalf("write %d: %v", i, err)
			}
			failed = append(failed, i)
		}
	}
	if len(failed) != 1 || failed[0] != 2 {
		t.Fatalf("failed writes %v, want [2]", failed)
	}
}

func TestFaultPool(t *testing.T) {
	ffs := lufs.NewFaultFS(lufs.NewMemFS(lufs.MemFSOptions{}))
	p, err := OpenPool(PoolOptions{Dirs: []string{"/d"}, FS: ffs})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ffs.SetInjector(lufs.OnOps(lufs.Errno(syscall.EIO), lufs.OpSyncDir))
	if _, err := p.Create("a", 1<<20, KindFile); !errors.Is(err, syscall.EIO) {
		t.Fatalf("create with a failing directory sync: %v", err)
	}
	ffs.SetInjector(nil)
	if names := p.Names(); len(names) != 0 {
		t.Fatalf("failed create left %v", names)
	}
	if _, err := p.Create("a", 1<<20, KindFile); err != nil {
		t.Fatalf("create after the fault cleared (leftover file?): %v", err)
	}
	ffs.SetInjector(lufs.OnOps(lufs.Errno(syscall.EIO), lufs.OpReadDir))
	if _, err := OpenPool(PoolOptions{Dirs: []string{"/d"}, FS: ffs}); !errors.Is(err, syscall.EIO) {
		t.Fatalf("open with a failing readdir: %v", err)
	}
}

// TestClosedVolume: every call after Close returns ErrShutdown.
func TestClosedVolume(t *testing.T) {
	ctx := context.Background()
	for _, v := range []Volume{NewMemVolume(1 << 20), func() Volume { v, _ := faultVolume(t); return v }()} {
		if err := v.Close(); err != nil {
			t.Fatal(err)
		}
		errs := []error{
			v.ReadAt(ctx, make([]byte, 1), 0),
			v.WriteAt(ctx, []byte{1}, 0, 0),
			v.Flush(ctx),
			v.Trim(ctx, 0, 4096, 0),
			v.WriteZeroes(ctx, 0, 4096, 0),
			v.Resize(1),
		}
		_, err := v.Extents(ctx, 0, 1, nil)
		errs = append(errs, err)
		for i, err := range errs {
			if !errors.Is(err, blockdev.ErrShutdown) {
				t.Errorf("%s call %d after Close: %v", v.Kind(), i, err)
			}
		}
	}
}

// TestBadRequests: ranges and flags are checked.
func TestBadRequests(t *testing.T) {
	ctx := context.Background()
	v, _ := faultVolume(t)
	for _, vol := range []Volume{NewMemVolume(1 << 20), v} {
		if err := vol.WriteAt(ctx, []byte{1}, 1<<20, 0); !errors.Is(err, blockdev.ErrOutOfRange) {
			t.Errorf("%s: write past end: %v", vol.Kind(), err)
		}
		if err := vol.ReadAt(ctx, make([]byte, 2), -1); !errors.Is(err, blockdev.ErrInvalid) {
			t.Errorf("%s: negative offset: %v", vol.Kind(), err)
		}
		if err := vol.WriteAt(ctx, []byte{1}, 0, blockdev.NoHole); !errors.Is(err, blockdev.ErrInvalid) {
			t.Errorf("%s: NoHole on write: %v", vol.Kind(), err)
		}
		if err := vol.Trim(ctx, 0, 1<<21, 0); !errors.Is(err, blockdev.ErrOutOfRange) {
			t.Errorf("%s: trim past end: %v", vol.Kind(), err)
		}
		if err := vol.Resize(-1); !errors.Is(err, ErrInvalidSize) {
			t.Errorf("%s: negative resize: %v", vol.Kind(), err)
		}
	}
}

// TestTryReadAtNeverWaits pins FileVolume.TryReadAt: it answers from
// memory, reports false instead of waiting for a read the disk holds, and
// maps a failed read like ReadAt.
func TestTryReadAtNeverWaits(t *testing.T) {
	ctx := context.Background()
	v, ffs := faultVolume(t)
	data := bytes.Repeat([]byte{7}, 2*BlockSizeBytes)
	if err := v.WriteAt(ctx, data, 0, 0); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, BlockSizeBytes)
	if ok, err := v.TryReadAt(ctx, got, 0); !ok || err != nil || !bytes.Equal(got, data[:BlockSizeBytes]) {
		t.Fatalf("TryReadAt from memory: %v, %v", ok, err)
	}
	gate := make(chan struct{})
	defer close(gate)
	ffs.SetInjector(lufs.Block(gate, func(e lufs.Event) bool { return e.Off == BlockSizeBytes }, lufs.OpRead))
	if ok, err := v.TryReadAt(ctx, got, BlockSizeBytes); ok || err != nil {
		t.Fatalf("TryReadAt of a held read: %v, %v; want false, nil", ok, err)
	}
	if ok, err := v.TryReadAt(ctx, got, 0); !ok || err != nil {
		t.Fatalf("TryReadAt beside a held read: %v, %v", ok, err)
	}
	ffs.SetInjector(lufs.OnOps(lufs.Errno(syscall.EIO), lufs.OpRead))
	if ok, err := v.TryReadAt(ctx, got, 0); ok || !errors.Is(err, blockdev.ErrIO) {
		t.Fatalf("TryReadAt with EIO: %v, %v; want false, ErrIO", ok, err)
	}
}
