package lu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
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

// TestOverlayMapWriteCutBeforeHeader: a map write whose pages landed but
// whose header did not leaves the slot with pages newer than its header.
// The other slot is used; if it is unusable too, the overlay refuses to
// open rather than read the mix. After the fault, the next Flush writes
// the slot whole.
func TestOverlayMapWriteCutBeforeHeader(t *testing.T) {
	ctx := context.Background()
	o, ffs, mem, base := faultOverlay(t)
	block := func(i int) {
		if err := o.WriteAt(ctx, []byte{byte(i + 1)}, int64(i)*4096, 0); err != nil {
			t.Fatal(err)
		}
	}
	block(0)
	if err := o.Flush(ctx); err != nil { // generation 2, slot 1
		t.Fatal(err)
	}
	block(1)
	if err := o.Flush(ctx); err != nil { // generation 3, slot 0
		t.Fatal(err)
	}
	block(2)
	ffs.SetInjector(func(e lufs.Event) error {
		if e.Op == lufs.OpWrite && e.Off == 0 && strings.Contains(e.Path, ".lumap.") {
			return lufs.Errno(syscall.EIO)
		}
		return nil
	})
	if err := o.Flush(ctx); !errors.Is(err, blockdev.ErrIO) {
		t.Fatalf("flush with the header write failing: %v, want ErrIO", err)
	}
	ffs.SetInjector(nil)
	reopen := func(fs lufs.FS) (*Overlay, error) {
		data, err := openFileVolume(fs, "/p/c.lu")
		if err != nil {
			t.Fatal(err)
		}
		return OpenOverlay(OverlayOptions{Data: data, Base: base, BaseName: "base", FS: fs, MapPath: "/p/c.lumap"})
	}
	states := func(o *Overlay) []blockState {
		return []blockState{o.mu.states.get(0), o.mu.states.get(1), o.mu.states.get(2)}
	}
	o2, err := reopen(mem.CrashClone(1))
	if err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(states(o2)); got != fmt.Sprint([]blockState{stateData, stateData, stateBase}) {
		t.Fatalf("after the cut write: states %s, want the generation-3 map", got)
	}
	// Slot 0 (generation 3) unusable: slot 1 holds generation-4 pages under
	// a generation-2 header, and must not be used.
	crashed := mem.CrashClone(2)
	f, err := crashed.OpenFile("/p/c.lumap.0", os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("XXXX"), 16); err != nil {
		t.Fatal(err)
	}
	_ = f.Close()
	if _, err := reopen(crashed); !errors.Is(err, ErrCorruptMap) || !strings.Contains(err.Error(), "torn") {
		t.Fatalf("open with only the cut slot left: %v, want ErrCorruptMap naming the torn write", err)
	}
	// The next Flush rewrites the cut slot whole and succeeds.
	if err := o.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	o3, err := reopen(mem.CrashClone(3))
	if err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(states(o3)); got != fmt.Sprint([]blockState{stateData, stateData, stateData}) {
		t.Fatalf("after the retried flush: states %s, want all written", got)
	}
}

// TestOverlayMapWritesOnlyChangedPages: after the first whole write of
// each slot, a Flush writes the header and only the map pages changed
// since that slot was last written.
func TestOverlayMapWritesOnlyChangedPages(t *testing.T) {
	ctx := context.Background()
	mem := lufs.NewMemFS(lufs.MemFSOptions{})
	if err := mem.MkdirAll("/p", 0o700); err != nil {
		t.Fatal(err)
	}
	ffs := lufs.NewFaultFS(mem)
	const size = 1 << 30 // 262144 blocks: 17 map pages
	data, err := CreateFileFS(ffs, "/p/c.lu", size)
	if err != nil {
		t.Fatal(err)
	}
	o, err := CreateOverlay(OverlayOptions{Data: data, FS: ffs, MapPath: "/p/c.lumap"})
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	var written []int64 // map pages written by the last flush (0 = header)
	ffs.SetInjector(func(e lufs.Event) error {
		if e.Op == lufs.OpWrite && strings.Contains(e.Path, ".lumap.") {
			for p := e.Off / mapPageBytes; p < (e.Off+e.Length)/mapPageBytes; p++ {
				written = append(written, p)
			}
		}
		return nil
	})
	flushAfterWriteInPage := func(page int64) []int64 {
		t.Helper()
		written = nil
		if err := o.WriteAt(ctx, []byte{1}, page*blocksPerPage*BlockSizeBytes, 0); err != nil {
			t.Fatal(err)
		}
		if err := o.Flush(ctx); err != nil {
			t.Fatal(err)
		}
		return written
	}
	if got := flushAfterWriteInPage(0); len(got) != 18 {
		t.Fatalf("first write of slot 1 wrote %d pages, want all 18 (header and 17)", len(got))
	}
	// Slot 0 was last written at creation: page 0 (state page 1 on disk)
	// and page 5 changed since.
	if got := fmt.Sprint(flushAfterWriteInPage(5)); got != "[1 6 0]" {
		t.Fatalf("second flush wrote pages %s, want [1 6 0]", got)
	}
	if got := fmt.Sprint(flushAfterWriteInPage(9)); got != "[6 10 0]" {
		t.Fatalf("third flush wrote pages %s, want [6 10 0]", got)
	}
	written = nil
	if err := o.WriteAt(ctx, []byte{2}, 0, 0); err != nil { // an overwrite: no state change
		t.Fatal(err)
	}
	if err := o.Flush(ctx); err != nil || len(written) != 0 {
		t.Fatalf("flush after an overwrite wrote map pages %v (%v)", written, err)
	}
}
