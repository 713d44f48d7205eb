package lu

import (
	"bytes"
	"context"
	"errors"
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
