package cluster

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

// TestNodeImages walks an image through a one-node cluster's write
// methods: create (its disks' LUs appear with it, watchers see each),
// pre-checks that refuse without proposing, ready, a clone, delete
// refused while the clone reads it, flatten, delete.
func TestNodeImages(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	n := openNode(t, testOptions(t, t.TempDir(), "n1", true))
	if err := n.WaitLeader(ctx); err != nil {
		t.Fatal(err)
	}
	var seen changeLog
	defer n.Watch(seen.add)()
	disk := func(i int) LU {
		name := []string{"img/0", "img/1"}[i]
		return LU{Name: name, Image: "img", SizeBytes: 1 << 20, Kind: KindFile, Copies: 1, Writer: "n1", CreatedOn: "n1"}
	}
	img := Image{Name: "img", State: ImageImporting, Copies: 1, Disks: []ImageDisk{{LU: "img/0", SizeBytes: 1 << 20}, {LU: "img/1", SizeBytes: 1 << 20}}}
	bad := img
	bad.Disks = bad.Disks[:1]
	if err := n.CreateImage(ctx, bad, []LU{disk(0), disk(1)}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("disks and LUs that do not match: %v", err)
	}
	if err := n.CreateImage(ctx, img, []LU{disk(0), disk(1)}); err != nil {
		t.Fatal(err)
	}
	before := n.Stats().LastLogIndex
	if err := n.CreateImage(ctx, img, []LU{disk(0), disk(1)}); !errors.Is(err, ErrImageExists) {
		t.Fatalf("a second create: %v", err)
	}
	if got := n.Stats().LastLogIndex - before; got != 0 {
		t.Errorf("a refused create appended %d entries, want none (the refusal is a pre-check)", got)
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(seen.get()) < 2 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if ch := seen.get(); len(ch) != 2 || ch[0].LU.Name != "img/0" || ch[1].LU.Name != "img/1" || ch[0].Kind != Created {
		t.Fatalf("watchers saw %+v, want img/0 and img/1 created", ch)
	}
	if lus, _ := n.ListLUs(); len(lus) != 2 || n.Stats().LUs != 2 {
		t.Fatalf("LUs after create: %+v (count %d)", lus, n.Stats().LUs)
	}
	clone := LU{Name: "vm", Base: "img/0", SizeBytes: 1 << 20, Kind: KindFile, Copies: 1, Writer: "n1", CreatedOn: "n1"}
	if err := n.CreateLU(ctx, clone); err == nil || !strings.Contains(err.Error(), "ready") {
		t.Fatalf("a clone of an importing image: %v", err)
	}
	ready := img
	ready.Disks = []ImageDisk{{LU: "img/0", SizeBytes: 1 << 20, SHA256: strings.Repeat("0", 64)}, {LU: "img/1", SizeBytes: 1 << 20, SHA256: strings.Repeat("1", 64)}}
	if err := n.MarkImageReady(ctx, ready); err != nil {
		t.Fatal(err)
	}
	if got, err := n.GetImage("img"); err != nil || got.State != ImageReady || got.Disks[1].SHA256 != strings.Repeat("1", 64) {
		t.Fatalf("after ready: %+v %v", got, err)
	}
	if lu, _ := n.GetLU("img/1"); !lu.ReadOnly {
		t.Fatal("a ready image's disk is not read-only")
	}
	if err := n.CreateLU(ctx, clone); err != nil {
		t.Fatal(err)
	}
	if err := n.DeleteImage(ctx, "img"); !errors.Is(err, ErrHasClones) {
		t.Fatalf("delete with a clone: %v", err)
	}
	if err := n.FlattenLU(ctx, "vm"); err != nil {
		t.Fatal(err)
	}
	if err := n.DeleteImage(ctx, "img"); err != nil {
		t.Fatal(err)
	}
	if _, err := n.GetImage("img"); !errors.Is(err, ErrImageNotFound) {
		t.Fatalf("after delete: %v", err)
	}
	if imgs, _ := n.ListImages(); len(imgs) != 0 {
		t.Fatalf("images left: %+v", imgs)
	}
	if lus, _ := n.ListLUs(); len(lus) != 1 || lus[0].Name != "vm" || lus[0].Base != "" || n.Stats().LUs != 1 {
		t.Fatalf("LUs left: %+v (count %d)", lus, n.Stats().LUs)
	}
}
