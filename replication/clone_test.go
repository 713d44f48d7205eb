package replication

import (
	"bytes"
	"context"
	"math/rand"
	"testing"

	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/internal/testseed"
	"github.com/lupool/lupool/lu"
)

// TestMirrorOfLinkedClones: an LU whose copies are linked clones of the
// same image on each node (lu.Pool.CreateClone) replicates like any LU:
// writes, trims and zeroes through the writer reach both clones, a copy
// that missed writes and trims over the image's data is resynced, and
// both copies then read the model, never the image where the clone
// trimmed it. The image on each node is left unchanged.
func TestMirrorOfLinkedClones(t *testing.T) {
	rng := rand.New(rand.NewSource(int64(testseed.Seed(t, "./replication/"))))
	ctx := context.Background()
	mt, nodes := newTestCluster(t, "a", "b")
	const size = 2 << 20
	image := make([]byte, size)
	for i := range image[:size/2] { // data in the first half, holes after
		image[i] = byte(i%253 + 1)
	}
	for _, n := range nodes {
		img, err := n.pool.Create("img", size, lu.KindFile)
		if err != nil {
			t.Fatal(err)
		}
		if err := img.WriteAt(ctx, image[:size/2], 0, 0); err != nil {
			t.Fatal(err)
		}
		if _, err := n.pool.CreateClone("x", "img", 0); err != nil {
			t.Fatal(err)
		}
	}
	mt.create(t, twoCopies("x", size, "file"))
	a, b := nodes["a"], nodes["b"]
	mir := streamingMirror(t, a.m, "x")
	if _, ok := mir.local.(*lu.Overlay); !ok {
		t.Fatalf("the writer mirrors a %T, want the clone (*lu.Overlay)", mir.local)
	}
	model := bytes.Clone(image)
	step := func(i int) {
		off := int64(rng.Intn(size/4096)) * 4096
		n := min(int64(1+rng.Intn(16))*4096, size-off)
		var err error
		switch rng.Intn(4) {
		case 0:
			err = mir.Trim(ctx, off, n, 0)
			clear(model[off : off+n])
		case 1:
			err = mir.WriteZeroes(ctx, off, n, 0)
			clear(model[off : off+n])
		default:
			p := make([]byte, n)
			rng.Read(p)
			err = mir.WriteAt(ctx, p, off, 0)
			copy(model[off:], p)
		}
		if err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
	}
	for i := range 100 {
		step(i)
	}
	b.down()
	for i := range 100 {
		step(100 + i)
	}
	b.up(t)
	waitFor(t, "b in sync", func() bool { return mt.get("x").Replicas[1].State == cluster.ReplicaInSync })
	if err := mir.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	for _, n := range []*testNode{a, b} {
		v, ok := n.m.Volume("x")
		if !ok {
			t.Fatalf("no volume x on %s", n.id)
		}
		if got := readAll(t, v); !bytes.Equal(got, model) {
			t.Fatalf("copy on %s differs from the model", n.id)
		}
		img, _ := n.pool.Get("img")
		if got := readAll(t, img); !bytes.Equal(got, image) {
			t.Fatalf("the image on %s changed", n.id)
		}
		if own, whole := v.AllocatedBytes(), int64(size); own >= whole {
			t.Fatalf("the clone on %s holds %d bytes of its own, as much as a full copy", n.id, own)
		}
	}
}
