package lu

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"syscall"
	"testing"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/lu/lufs"
)

// faultOverlay is a clone of a 64 KiB base holding 0xbb, on a FaultFS over
// a crashable MemFS.
func faultOverlay(t *testing.T) (*Overlay, *lufs.FaultFS, *lufs.MemFS, *FileVolume) {
	t.Helper()
	mem := lufs.NewMemFS(lufs.MemFSOptions{Crashable: true})
	if err := mem.MkdirAll("/p", 0o700); err != nil {
		t.Fatal(err)
	}
	ffs := lufs.NewFaultFS(mem)
	base, err := CreateFileFS(ffs, "/p/base.lu", 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	if err := base.WriteAt(context.Background(), bytes.Repeat([]byte{0xbb}, 64<<10), 0, 0); err != nil {
		t.Fatal(err)
	}
	data, err := CreateFileFS(ffs, "/p/c.lu", 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	o, err := CreateOverlay(OverlayOptions{Data: data, Base: base, BaseName: "base", FS: ffs, MapPath: "/p/c.lumap"})
	if err != nil {
		t.Fatal(err)
	}
	return o, ffs, mem, base
}

// TestOverlayFailedWriteLeavesBlockFromBase: a data write that fails marks
// nothing; the block still reads the base.
func TestOverlayFailedWriteLeavesBlockFromBase(t *testing.T) {
	ctx := context.Background()
	o, ffs, _, _ := faultOverlay(t)
	ffs.SetInjector(func(e lufs.Event) error {
		if e.Op == lufs.OpWrite && strings.HasSuffix(e.Path, "c.lu") {
			return lufs.Errno(syscall.EIO)
		}
		return nil
	})
	if err := o.WriteAt(ctx, []byte{1, 2, 3}, 100, 0); !errors.Is(err, blockdev.ErrIO) {
		t.Fatalf("write with a failing data file: %v, want ErrIO", err)
	}
	ffs.SetInjector(nil)
	got := make([]byte, 4096)
	if err := o.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, bytes.Repeat([]byte{0xbb}, 4096)) {
		t.Fatalf("block after a failed write does not read the base: %v", err)
	}
	if s := o.mu.states.get(0); s != stateBase {
		t.Fatalf("block 0 state %d after a failed write, want base", s)
	}
}

// TestOverlayFailedMapWriteIsRetried: a Flush whose map write fails
// reports it, and the next Flush writes the map; a crash after that keeps
// the write.
func TestOverlayFailedMapWriteIsRetried(t *testing.T) {
	ctx := context.Background()
	o, ffs, mem, base := faultOverlay(t)
	if err := o.WriteAt(ctx, []byte("new"), 8192, 0); err != nil {
		t.Fatal(err)
	}
	ffs.SetInjector(func(e lufs.Event) error {
		if e.Op == lufs.OpSync && strings.Contains(e.Path, ".lumap.") {
			return lufs.Errno(syscall.EIO)
		}
		return nil
	})
	if err := o.Flush(ctx); !errors.Is(err, blockdev.ErrIO) {
		t.Fatalf("flush with a failing map: %v, want ErrIO", err)
	}
	ffs.SetInjector(nil)
	if err := o.Flush(ctx); err != nil {
		t.Fatalf("flush after the fault: %v", err)
	}
	crashed := mem.CrashClone(1)
	data, err := openFileVolume(crashed, "/p/c.lu")
	if err != nil {
		t.Fatal(err)
	}
	o2, err := OpenOverlay(OverlayOptions{Data: data, Base: base, BaseName: "base", FS: crashed, MapPath: "/p/c.lumap"})
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4096)
	if err := o2.ReadAt(ctx, got, 8192); err != nil {
		t.Fatal(err)
	}
	want := bytes.Repeat([]byte{0xbb}, 4096)
	copy(want, "new")
	if !bytes.Equal(got, want) {
		t.Fatalf("after a retried flush and a crash the block reads %q..., want %q...", got[:8], want[:8])
	}
	if _, err := OpenOverlay(OverlayOptions{Data: data, Base: base, BaseName: "other", FS: crashed, MapPath: "/p/c.lumap"}); !errors.Is(err, ErrCorruptMap) {
		t.Fatalf("open naming the wrong base: %v, want ErrCorruptMap", err)
	}
}
