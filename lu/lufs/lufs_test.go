package lufs

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

type fileOp struct {
	name string
	run  func(f File) error
}

func fill(b byte, n int) []byte { return bytes.Repeat([]byte{b}, n) }

// conformanceOps exercise the sparse-file calls whose exact semantics the
// lu package relies on.
var conformanceOps = []fileOp{
	{"grow", func(f File) error { return f.Truncate(40000) }},
	{"write unaligned", func(f File) error { _, err := f.WriteAt(fill(1, 10000), 3000); return err }},
	{"write far", func(f File) error { _, err := f.WriteAt(fill(2, 5000), 30000); return err }},
	{"punch partial", func(f File) error { return f.PunchHole(3500, 100) }},
	{"punch whole blocks", func(f File) error { return f.PunchHole(4096, 4096) }},
	{"punch unaligned span", func(f File) error { return f.PunchHole(29000, 4096*2) }},
	{"write sync", func(f File) error { _, err := f.WriteAtSync(fill(3, 4096), 16384); return err }},
	{"sync", func(f File) error { return f.Sync() }},
	{"shrink unaligned", func(f File) error { return f.Truncate(33000) }},
	{"grow again", func(f File) error { return f.Truncate(50000) }},
	{"punch past end", func(f File) error { return f.PunchHole(32768, 20000) }},
}

type fsCase struct {
	name       string
	fs         FS
	dir        string
	exactAlloc bool // st_blocks must equal MemFS's pages
}

func mountTmpfs(t *testing.T) (string, bool) {
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", dir).CombinedOutput(); err != nil {
		t.Logf("no tmpfs (needs root): %v: %s", err, out)
		return "", false
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount: %v: %s", err, out)
		}
	})
	return dir, true
}

// TestConformance runs the same calls on MemFS and on real file systems and
// compares contents, SEEK_DATA/SEEK_HOLE and (on tmpfs) allocation.
func TestConformance(t *testing.T) {
	cases := []fsCase{{name: "os-tempdir", fs: OS(), dir: t.TempDir()}}
	if dir, ok := mountTmpfs(t); ok {
		cases = append(cases, fsCase{name: "os-tmpfs", fs: OS(), dir: dir, exactAlloc: true})
	} else {
		t.Log("tmpfs mount refused (not root): contents only, allocation is not checked block for block")
	}
	ref := NewMemFS(MemFSOptions{})
	rf, err := ref.OpenFile("/f", os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	files := make([]File, len(cases))
	for i, c := range cases {
		files[i], err = c.fs.OpenFile(filepath.Join(c.dir, "f"), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		defer files[i].Close()
	}
	for _, op := range conformanceOps {
		if err := op.run(rf); err != nil {
			t.Fatalf("memfs %s: %v", op.name, err)
		}
		want := snapshot(t, rf)
		for i, c := range cases {
			if err := op.run(files[i]); err != nil {
				t.Fatalf("%s %s: %v", c.name, op.name, err)
			}
			got := snapshot(t, files[i])
			if !bytes.Equal(got.data, want.data) {
				t.Fatalf("%s after %s: contents differ from MemFS", c.name, op.name)
			}
			if c.exactAlloc && (got.allocated != want.allocated || got.seeks != want.seeks) {
				t.Fatalf("%s after %s: allocated %d seeks %q; MemFS %d %q", c.name, op.name,
					got.allocated, got.seeks, want.allocated, want.seeks)
			}
		}
	}
}

type fileState struct {
	data      []byte
	allocated int64
	seeks     string
}

func snapshot(t *testing.T, f File) fileState {
	t.Helper()
	size, err := f.Size()
	if err != nil {
		t.Fatal(err)
	}
	st := fileState{data: make([]byte, size)}
	if n, err := f.ReadAt(st.data, 0); err != nil && !(err == io.EOF && int64(n) == size) {
		t.Fatalf("read %d of %d: %v", n, size, err)
	}
	if st.allocated, err = f.AllocatedBytes(); err != nil {
		t.Fatal(err)
	}
	var seeks strings.Builder
	for off := int64(0); off < size+5000; off += 1000 {
		d, err := f.SeekData(off)
		if err == io.EOF {
			d = -1
		} else if err != nil {
			t.Fatal(err)
		}
		h, err := f.SeekHole(off)
		if err != nil {
			t.Fatal(err)
		}
		if off >= size {
			h = -1 // past the end, Linux says ENXIO; MemFS returns off
		}
		fmt.Fprintf(&seeks, "%d:%d/%d ", off, d, h)
	}
	st.seeks = seeks.String()
	return st
}

func TestMemFSCapacity(t *testing.T) {
	m := NewMemFS(MemFSOptions{CapacityBytes: 3 * BlockSizeBytes})
	f, err := m.OpenFile("/f", os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	n, err := f.WriteAt(fill(1, 4*BlockSizeBytes), 0)
	if !errors.Is(err, syscall.ENOSPC) || n != 3*BlockSizeBytes {
		t.Fatalf("write beyond capacity: %d, %v", n, err)
	}
	if st, _ := m.Statfs("/"); st.FreeBytes != 0 || st.CapacityBytes != 3*BlockSizeBytes {
		t.Fatalf("statfs %+v", st)
	}
	if err := f.PunchHole(0, BlockSizeBytes); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(fill(2, 100), 5*BlockSizeBytes); err != nil {
		t.Fatalf("write after punch: %v", err)
	}
	// A removed file keeps its pages until its last handle closes.
	if err := m.Remove("/f"); err != nil {
		t.Fatal(err)
	}
	if m.UsedBytes() != 3*BlockSizeBytes {
		t.Fatalf("used %d after remove with an open handle", m.UsedBytes())
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if m.UsedBytes() != 0 {
		t.Fatalf("used %d after the last close", m.UsedBytes())
	}
}

func TestMemFSNamespace(t *testing.T) {
	m := NewMemFS(MemFSOptions{})
	if _, err := m.OpenFile("/a/f", os.O_RDWR|os.O_CREATE, 0o600); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("create in a missing dir: %v", err)
	}
	if err := m.MkdirAll("/a/b", 0o700); err != nil {
		t.Fatal(err)
	}
	f, err := m.OpenFile("/a/f", os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	_ = f.Close()
	if _, err := m.OpenFile("/a/f", os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600); !errors.Is(err, fs.ErrExist) {
		t.Fatalf("O_EXCL on an existing file: %v", err)
	}
	names, err := m.ReadDir("/a")
	if err != nil || len(names) != 2 || names[0] != "b" || names[1] != "f" {
		t.Fatalf("ReadDir = %v, %v", names, err)
	}
	if fi, err := m.Stat("/a/b"); err != nil || !fi.IsDir() {
		t.Fatalf("Stat dir: %v %v", fi, err)
	}
	if err := m.Remove("/a"); !errors.Is(err, syscall.ENOTEMPTY) {
		t.Fatalf("remove non-empty dir: %v", err)
	}
	if err := m.Remove("/a/f"); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Stat("/a/f"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("stat removed: %v", err)
	}
}

func TestFaultFSShortWrite(t *testing.T) {
	ffs := NewFaultFS(NewMemFS(MemFSOptions{}))
	f, err := ffs.OpenFile("/f", os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ffs.SetInjector(func(e Event) error {
		if e.Op == OpWrite && e.Off == 100 {
			return &ShortWrite{Bytes: 3, Err: Errno(syscall.EIO)}
		}
		return nil
	})
	if _, err := f.WriteAt([]byte("ok"), 0); err != nil {
		t.Fatalf("write elsewhere: %v", err)
	}
	n, err := f.WriteAt([]byte("abcdef"), 100)
	if n != 3 || !errors.Is(err, syscall.EIO) || !errors.Is(err, ErrInjected) {
		t.Fatalf("short write: %d, %v", n, err)
	}
	got := make([]byte, 6)
	if _, err := f.ReadAt(got, 100); err != nil && err != io.EOF {
		t.Fatal(err)
	}
	if string(got[:3]) != "abc" || got[3] != 0 {
		t.Fatalf("short write landed %q", got)
	}
}

// TestReadAtNoWait checks the no-wait read of the OS file: cached data and
// holes read as with ReadAt, data evicted from the page cache is refused
// with ErrWouldBlock instead of being waited for, and the end of the file
// is io.EOF.
func TestReadAtNoWait(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f")
	f, err := OS().OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	nw := f.(NoWaitReader)
	const size = 1 << 20
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(fill(7, 3*4096), 8192); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4*4096)
	if n, err := nw.ReadAtNoWait(got, 4096); err != nil || n != len(got) {
		t.Fatalf("cached read: %d, %v", n, err)
	}
	want := append(make([]byte, 4096), fill(7, 3*4096)...)
	if !bytes.Equal(got, want) {
		t.Fatal("cached read: wrong data")
	}
	if n, err := nw.ReadAtNoWait(got, size-4096); n != 4096 || err != io.EOF {
		t.Fatalf("read across the end: %d, %v; want 4096, EOF", n, err)
	}
	// Evict the written pages: a no-wait read must not wait for the disk.
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	osf := f.(*osFile)
	if err := unixFadviseDontNeed(osf.fd); err != nil {
		t.Skipf("fadvise: %v", err)
	}
	if _, err := nw.ReadAtNoWait(got[:4096], 8192); !errors.Is(err, ErrWouldBlock) {
		// The page cache may have kept the pages; say so rather than fail.
		t.Logf("read after eviction: %v (pages not evicted?)", err)
	}
	if _, err := f.ReadAt(got[:4096], 8192); err != nil || !bytes.Equal(got[:4096], fill(7, 4096)) {
		t.Fatalf("ReadAt after eviction: %v", err)
	}
}

// TestBlockInjector checks that Block holds matching calls until the gate
// closes and answers no-wait reads with ErrWouldBlock meanwhile.
func TestBlockInjector(t *testing.T) {
	ffs := NewFaultFS(NewMemFS(MemFSOptions{}))
	f, err := ffs.OpenFile("/f", os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(fill(9, 8192), 0); err != nil {
		t.Fatal(err)
	}
	gate := make(chan struct{})
	ffs.SetInjector(Block(gate, func(e Event) bool { return e.Off == 4096 }, OpRead))
	nw := f.(NoWaitReader)
	buf := make([]byte, 4096)
	if _, err := nw.ReadAtNoWait(buf, 0); err != nil {
		t.Fatalf("unmatched no-wait read: %v", err)
	}
	if _, err := nw.ReadAtNoWait(buf, 4096); !errors.Is(err, ErrWouldBlock) {
		t.Fatalf("blocked no-wait read: %v, want ErrWouldBlock", err)
	}
	done := make(chan error, 1)
	go func() { _, err := f.ReadAt(buf, 4096); done <- err }()
	select {
	case err := <-done:
		t.Fatalf("ReadAt returned (%v) before the gate closed", err)
	default:
	}
	close(gate)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if _, err := nw.ReadAtNoWait(buf, 4096); err != nil || !bytes.Equal(buf, fill(9, 4096)) {
		t.Fatalf("no-wait read after the gate: %v", err)
	}
}
