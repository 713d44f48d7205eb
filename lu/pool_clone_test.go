package lu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/lu/lufs"
)

func readAll(t *testing.T, v Volume) []byte {
	t.Helper()
	b := make([]byte, v.Size())
	if err := v.ReadAt(context.Background(), b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestPoolClones walks a linked clone's life in a pool: clone, isolation,
// trim reading zeros, accounting, refusal to delete the base, reopen,
// flatten, base deletion, reopen again.
func TestPoolClones(t *testing.T) {
	ctx := context.Background()
	fs := lufs.NewMemFS(lufs.MemFSOptions{})
	opts := PoolOptions{Dirs: []string{"/d0", "/d1"}, FS: fs}
	p, err := OpenPool(opts)
	if err != nil {
		t.Fatal(err)
	}
	const size = 1 << 20
	img, err := p.Create("img", size, KindFile)
	if err != nil {
		t.Fatal(err)
	}
	imgData := bytes.Repeat([]byte("image!!!"), 256<<10/8)
	if err := img.WriteAt(ctx, imgData, 0, 0); err != nil { // 256 KiB of data, the rest holes
		t.Fatal(err)
	}
	want := readAll(t, img)

	if _, err := p.CreateClone("c1", "nope", 0); !errors.Is(err, ErrNotFound) {
		t.Fatalf("clone of a missing base: %v, want ErrNotFound", err)
	}
	if _, err := p.CreateClone("c1", "img", size/2); !errors.Is(err, ErrCloneBase) {
		t.Fatalf("clone smaller than its base: %v, want ErrCloneBase", err)
	}
	if _, err := p.CreateClone("img", "img", 0); !errors.Is(err, ErrExists) {
		t.Fatalf("clone over an existing name: %v, want ErrExists", err)
	}
	c1, err := p.CreateClone("c1", "img", 0)
	if err != nil {
		t.Fatal(err)
	}
	c2, err := p.CreateClone("c2", "img", 2*size)
	if err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, c1); !bytes.Equal(got, want) {
		t.Fatalf("fresh clone differs from its image at byte %d", firstDiff(got, want))
	}
	if got := readAll(t, c2)[size:]; !isZero(got) {
		t.Fatal("clone's tail past the image does not read zeros")
	}
	// Writes and a trim in c1 change neither the image nor c2.
	if err := c1.WriteAt(ctx, []byte("clone one"), 4096+100, 0); err != nil {
		t.Fatal(err)
	}
	if err := c1.Trim(ctx, 64<<10, 64<<10, 0); err != nil {
		t.Fatal(err)
	}
	c1Want := bytes.Clone(want)
	copy(c1Want[4096+100:], "clone one")
	clear(c1Want[64<<10 : 128<<10])
	if got := readAll(t, c1); !bytes.Equal(got, c1Want) {
		t.Fatalf("clone differs from its model at byte %d", firstDiff(got, c1Want))
	}
	if got := readAll(t, img); !bytes.Equal(got, want) {
		t.Fatal("a write to a clone changed the image")
	}
	// Block status: the image's data, the clone's own write, the trimmed
	// range (zero, not a hole: it hides the image's data), the image's
	// holes.
	ext, err := c1.Extents(ctx, 0, size, nil)
	if err != nil {
		t.Fatal(err)
	}
	wantExt := []blockdev.Extent{
		{LengthBytes: 64 << 10, Flags: 0},
		{LengthBytes: 64 << 10, Flags: blockdev.ExtentZero},
		{LengthBytes: 128 << 10, Flags: 0},
		{LengthBytes: size - 256<<10, Flags: blockdev.ExtentHole | blockdev.ExtentZero},
	}
	if fmt.Sprint(ext) != fmt.Sprint(wantExt) {
		t.Fatalf("clone extents %v, want %v", ext, wantExt)
	}
	if got := readAll(t, c2)[:size]; !bytes.Equal(got, want) {
		t.Fatal("a write to one clone changed another")
	}
	// Accounting: the image's blocks once, each clone's own blocks apart.
	st := p.Status()
	if got := c1.AllocatedBytes(); got != BlockSizeBytes {
		t.Fatalf("clone allocates %d bytes, want one block", got)
	}
	if want := img.AllocatedBytes() + c1.AllocatedBytes() + c2.AllocatedBytes(); st.AllocatedBytes != want || want != 256<<10+BlockSizeBytes {
		t.Fatalf("pool allocated %d bytes, want %d (256 KiB image + 4 KiB clone)", st.AllocatedBytes, want)
	}
	if err := p.Delete("img"); !errors.Is(err, ErrHasClones) {
		t.Fatalf("delete of an image with clones: %v, want ErrHasClones", err)
	}
	if got := p.Clones("img"); len(got) != 2 || got[0] != "c1" || got[1] != "c2" {
		t.Fatalf("clones of img: %v", got)
	}
	for _, v := range []Volume{c1, c2} {
		if err := v.Flush(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}

	// Reopen: the clones come back linked to their image.
	if p, err = OpenPool(opts); err != nil {
		t.Fatal(err)
	}
	c1v, _ := p.Get("c1")
	if got := readAll(t, c1v); !bytes.Equal(got, c1Want) {
		t.Fatalf("reopened clone differs at byte %d", firstDiff(got, c1Want))
	}
	if err := c1v.(*Overlay).Flatten(ctx); err != nil {
		t.Fatal(err)
	}
	if err := p.Delete("c2"); err != nil {
		t.Fatal(err)
	}
	if err := p.Delete("img"); err != nil {
		t.Fatalf("delete of the image after flatten: %v", err)
	}
	for _, f := range []string{"c2.lu", "c2.lumap.0", "c2.lumap.1", "img.lu"} {
		for _, d := range opts.Dirs {
			if _, err := fs.Stat(d + "/" + f); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("%s/%s left after delete: %v", d, f, err)
			}
		}
	}
	if got := readAll(t, c1v); !bytes.Equal(got, c1Want) {
		t.Fatalf("flattened clone differs at byte %d", firstDiff(got, c1Want))
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if p, err = OpenPool(opts); err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	c1v, _ = p.Get("c1")
	if got := readAll(t, c1v); !bytes.Equal(got, c1Want) {
		t.Fatalf("flattened clone after reopen differs at byte %d", firstDiff(got, c1Want))
	}
}

// TestPoolCloneMissingBaseOrCorruptMap: a clone whose base is gone, or
// whose map is corrupt, fails OpenPool and is never served.
func TestPoolCloneMissingBaseOrCorruptMap(t *testing.T) {
	fs := lufs.NewMemFS(lufs.MemFSOptions{})
	opts := PoolOptions{Dirs: []string{"/d0"}, FS: fs}
	p, err := OpenPool(opts)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Create("img", 1<<20, KindFile); err != nil {
		t.Fatal(err)
	}
	if _, err := p.CreateClone("c", "img", 0); err != nil {
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	for _, slot := range []string{"/d0/c.lumap.0", "/d0/c.lumap.1"} {
		f, err := fs.OpenFile(slot, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteAt([]byte("garbage"), 20); err != nil {
			t.Fatal(err)
		}
		_ = f.Close()
	}
	if _, err := OpenPool(opts); !errors.Is(err, ErrCorruptMap) {
		t.Fatalf("open with a corrupt clone map: %v, want ErrCorruptMap", err)
	}
	opts = PoolOptions{Dirs: []string{"/e0"}, FS: fs}
	if p, err = OpenPool(opts); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Create("img", 1<<20, KindFile); err != nil {
		t.Fatal(err)
	}
	if _, err := p.CreateClone("c", "img", 0); err != nil {
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if err := fs.Remove("/e0/img.lu"); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenPool(opts); err == nil || !strings.Contains(err.Error(), "base volume missing") {
		t.Fatalf("a pool with a clone whose base is gone: %v", err)
	}
}

// TestPoolImageLUNames: an image's disk IMAGE/N is a file IMAGE@N.lu in
// a data directory (never a subdirectory), its clone's map names it, and
// both are found again by name when the pool reopens. Other slashes are
// refused.
func TestPoolImageLUNames(t *testing.T) {
	ctx := context.Background()
	fs := lufs.NewMemFS(lufs.MemFSOptions{})
	opts := PoolOptions{Dirs: []string{"/d0"}, FS: fs}
	p, err := OpenPool(opts)
	if err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{"a/b", "deb/01", "deb/x/0", "../0"} {
		if _, err := p.Create(bad, 1<<20, KindFile); !errors.Is(err, ErrInvalidName) {
			t.Errorf("Create(%q) = %v, want ErrInvalidName", bad, err)
		}
	}
	img, err := p.Create("deb/0", 1<<20, KindFile)
	if err != nil {
		t.Fatal(err)
	}
	if err := img.WriteAt(ctx, bytes.Repeat([]byte{7}, 4096), 8192, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := p.CreateClone("vm1", "deb/0", 0); err != nil {
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	names, err := fs.ReadDir("/d0")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(strings.Join(names, " "), "deb@0.lu") {
		t.Fatalf("directory holds %v, want deb@0.lu", names)
	}
	p, err = OpenPool(opts)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if got := strings.Join(p.Names(), " "); got != "deb/0 vm1" {
		t.Fatalf("reopened pool holds %q", got)
	}
	vm1, _ := p.Get("vm1")
	if b := readAll(t, vm1); b[8192] != 7 || b[0] != 0 {
		t.Fatal("the reopened clone does not read its image")
	}
	if got := p.Clones("deb/0"); len(got) != 1 || got[0] != "vm1" {
		t.Fatalf("clones of deb/0: %v", got)
	}
}
