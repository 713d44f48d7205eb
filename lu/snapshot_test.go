package lu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"testing"

	"github.com/lupool/lupool/lu/lufs"
)

// TestPoolSnapshots walks an LU's snapshots through a pool: the first
// snapshot of a plain volume (which becomes an overlay in place), a second
// one of the overlay, rollback to the first (the second stays), reopen,
// refusals, and deletes that merge the chain.
func TestPoolSnapshots(t *testing.T) {
	ctx := context.Background()
	fs := lufs.NewMemFS(lufs.MemFSOptions{})
	opts := PoolOptions{Dirs: []string{"/d0"}, FS: fs}
	p, err := OpenPool(opts)
	if err != nil {
		t.Fatal(err)
	}
	const size = 1 << 20
	v, err := p.Create("vm", size, KindFile)
	if err != nil {
		t.Fatal(err)
	}
	fill := func(pattern string, off int64) {
		t.Helper()
		if err := v.WriteAt(ctx, bytes.Repeat([]byte(pattern), 64<<10/len(pattern)), off, 0); err != nil {
			t.Fatal(err)
		}
	}
	fill("AAAAAAAA", 0)
	fill("aaaaaaaa", 512<<10)
	atS1 := readAll(t, v)

	for _, bad := range []string{"", "a/b", "x@y", string(bytes.Repeat([]byte("s"), 127))} {
		if _, err := p.Snapshot(ctx, "vm", bad); !errors.Is(err, ErrInvalidName) {
			t.Fatalf("snapshot named %q: %v, want ErrInvalidName", bad, err)
		}
	}
	if _, err := p.Snapshot(ctx, "nope", "s1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("snapshot of a missing volume: %v, want ErrNotFound", err)
	}
	s1, err := p.Snapshot(ctx, "vm", "s1")
	if err != nil {
		t.Fatal(err)
	}
	if got, ok := p.Get("vm"); !ok || got != v {
		t.Fatal("the LU's volume value changed with its first snapshot")
	}
	if _, err := p.Snapshot(ctx, "vm", "s1"); !errors.Is(err, ErrExists) {
		t.Fatalf("second snapshot named s1: %v, want ErrExists", err)
	}
	fill("BBBBBBBB", 0)
	fill("bbbbbbbb", 256<<10)
	atS2 := readAll(t, v)
	if !bytes.Equal(readAll(t, s1), atS1) {
		t.Fatal("s1 changed with writes to the LU")
	}
	// Space is counted once: the LU's own layer holds only what was
	// written since the snapshot (128 KiB), the snapshot the rest.
	if a := v.AllocatedBytes(); a < 128<<10 || a > 192<<10 {
		t.Fatalf("LU allocates %d bytes of its own after 128 KiB of new writes", a)
	}
	if a := s1.AllocatedBytes(); a < 128<<10 || a > 192<<10 {
		t.Fatalf("s1 allocates %d bytes, holding 128 KiB", a)
	}
	// The pool counts each block once, and a snapshot provisions what it
	// holds, not its size.
	st := p.Status()
	if want := v.AllocatedBytes() + s1.AllocatedBytes(); st.AllocatedBytes != want {
		t.Fatalf("pool allocates %d bytes, LU and snapshot %d", st.AllocatedBytes, want)
	}
	if want := size + s1.AllocatedBytes(); st.ProvisionedBytes != want {
		t.Fatalf("pool provisions %d bytes, want the LU's size plus the snapshot's %d allocated: %d", st.ProvisionedBytes, s1.AllocatedBytes(), want)
	}
	s2, err := p.Snapshot(ctx, "vm", "s2")
	if err != nil {
		t.Fatal(err)
	}
	fill("CCCCCCCC", 128<<10)
	if !bytes.Equal(readAll(t, s2), atS2) || !bytes.Equal(readAll(t, s1), atS1) {
		t.Fatal("a snapshot changed with writes to the LU")
	}
	if err := p.Rollback(ctx, "vm", "vm@nope"); !errors.Is(err, ErrNotSnapshot) {
		t.Fatalf("rollback to a missing snapshot: %v, want ErrNotSnapshot", err)
	}
	if err := p.Rollback(ctx, "vm", "vm@s1"); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(readAll(t, v), atS1) {
		t.Fatal("after rollback to s1 the LU does not read s1's content")
	}
	if !bytes.Equal(readAll(t, s2), atS2) {
		t.Fatal("rollback to s1 changed s2")
	}
	fill("DDDDDDDD", 0)
	atClose := readAll(t, v)
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}

	p, err = OpenPool(opts)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	get := func(name string) Volume {
		t.Helper()
		x, ok := p.Get(name)
		if !ok {
			t.Fatalf("%s missing after reopen", name)
		}
		return x
	}
	v = get("vm")
	if !bytes.Equal(readAll(t, v), atClose) || !bytes.Equal(readAll(t, get("vm@s1")), atS1) || !bytes.Equal(readAll(t, get("vm@s2")), atS2) {
		t.Fatal("content changed across a reopen")
	}
	if err := get("vm@s1").WriteAt(ctx, make([]byte, 4096), 0, 0); err == nil && overlayOf(get("vm@s1")) != nil {
		t.Fatal("a frozen snapshot layer took a write")
	}
	if _, err := p.CreateClone("c", "vm@s2", 0); err != nil {
		t.Fatal(err)
	}
	if err := p.DeleteSnapshot(ctx, "vm", "vm@s2"); !errors.Is(err, ErrSnapshotInUse) {
		t.Fatalf("delete s2 while a clone reads it: %v, want ErrSnapshotInUse", err)
	}
	if err := p.Delete("c"); err != nil {
		t.Fatal(err)
	}
	// s1 is read by the LU (rolled back to it) and by s2: both merge it.
	if err := p.DeleteSnapshot(ctx, "vm", "vm@s1"); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(readAll(t, get("vm@s2")), atS2) || !bytes.Equal(readAll(t, v), atClose) {
		t.Fatal("merging s1 away changed what s2 or the LU read")
	}
	if err := p.DeleteSnapshot(ctx, "vm", "vm@s2"); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(readAll(t, v), atClose) {
		t.Fatal("deleting the snapshots changed the LU's content")
	}
	if names := p.Names(); len(names) != 1 || names[0] != "vm" {
		t.Fatalf("volumes left: %v", names)
	}
	files, err := fs.ReadDir("/d0")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if bytes.Contains([]byte(f), []byte("+")) {
			t.Fatalf("snapshot file %s left behind", f)
		}
	}
}

// TestPoolSnapshotInterrupted: a snapshot that fails at each of its steps
// (the new layer's data file, its map, a rename) changes nothing: the LU
// reads what it read, no snapshot volume is left, and a later snapshot
// works; one that stopped half way on disk (a crash: intent file, renamed
// files, no new map) is undone when the pool opens again.
func TestPoolSnapshotInterrupted(t *testing.T) {
	ctx := context.Background()
	mem := lufs.NewMemFS(lufs.MemFSOptions{})
	ffs := lufs.NewFaultFS(mem)
	opts := PoolOptions{Dirs: []string{"/d0"}, FS: ffs}
	p, err := OpenPool(opts)
	if err != nil {
		t.Fatal(err)
	}
	v, err := p.Create("vm", 1<<20, KindFile)
	if err != nil {
		t.Fatal(err)
	}
	if err := v.WriteAt(ctx, bytes.Repeat([]byte("plain..."), 8192), 0, 0); err != nil {
		t.Fatal(err)
	}
	want := readAll(t, v)
	failOn := func(op lufs.Op, path string) {
		ffs.SetInjector(func(e lufs.Event) error {
			if e.Op == op && e.Path == path {
				return lufs.Errno(errors.New("injected"))
			}
			return nil
		})
	}
	for round, layered := range []bool{false, true} {
		for _, step := range []struct {
			op   lufs.Op
			path string
		}{
			{lufs.OpOpen, "/d0/vm.lu"},        // the new layer's data file
			{lufs.OpOpen, "/d0/vm.lumap.1"},   // its map
			{lufs.OpRename, "/d0/vm.lumap.1"}, // the old map's second slot (layered only)
			{lufs.OpOpen, "/d0/vm.snapshot-intent"},
		} {
			failOn(step.op, step.path)
			_, err := p.Snapshot(ctx, "vm", "bad")
			ffs.SetInjector(nil)
			if err == nil {
				if step.op == lufs.OpRename && !layered {
					if err := p.DeleteSnapshot(ctx, "vm", "vm@bad"); err != nil { // no map to rename: it worked
						t.Fatal(err)
					}
					continue
				}
				t.Fatalf("round %d: snapshot with %v of %s failing succeeded", round, step.op, step.path)
			}
			if _, ok := p.Get("vm@bad"); ok {
				t.Fatalf("round %d: a failed snapshot left vm@bad", round)
			}
			if !bytes.Equal(readAll(t, v), want) {
				t.Fatalf("round %d: a snapshot failing at %v %s changed the LU", round, step.op, step.path)
			}
		}
		if _, err := p.Snapshot(ctx, "vm", fmt.Sprint("ok", round)); err != nil {
			t.Fatalf("round %d: snapshot after the failures: %v", round, err)
		}
		if !bytes.Equal(readAll(t, v), want) {
			t.Fatal("the LU changed with a snapshot")
		}
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}

	// A crash after the renames, before the new map: put the disk in that
	// state by hand.
	for _, r := range [][2]string{{"/d0/vm.lu", "/d0/vm+crash.lu"}, {"/d0/vm.lumap.0", "/d0/vm+crash.lumap.0"}, {"/d0/vm.lumap.1", "/d0/vm+crash.lumap.1"}} {
		if err := mem.Rename(r[0], r[1]); err != nil {
			t.Fatal(err)
		}
	}
	f, err := mem.OpenFile("/d0/vm.lu", os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600) // the empty new data file
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	f, err = mem.OpenFile("/d0/vm.snapshot-intent", os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("vm@crash"), 0); err != nil {
		t.Fatal(err)
	}
	f.Close()
	p, err = OpenPool(opts)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	v, ok := p.Get("vm")
	if !ok {
		t.Fatal("vm missing after the interrupted snapshot was undone")
	}
	if _, ok := p.Get("vm@crash"); ok {
		t.Fatal("the interrupted snapshot is still there")
	}
	if !bytes.Equal(readAll(t, v), want) {
		t.Fatal("undoing the interrupted snapshot changed the LU")
	}
	if names, _ := mem.ReadDir("/d0"); slices.Contains(names, "vm.snapshot-intent") {
		t.Fatal("the intent file stayed")
	}
}
