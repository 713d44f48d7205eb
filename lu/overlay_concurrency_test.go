package lu

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/lu/lufs"
)

// TestOverlaySnapshotAndFlattenUnderWrites: writers stamp numbered blocks
// with growing sequence numbers while a snapshot, a flatten and a merge
// run. The snapshot holds, for every block, a write at least as new as the
// last one acknowledged before Snapshot was called and no newer than the
// first acknowledged after it returned; the overlay ends holding every
// block's last acknowledged write.
func TestOverlaySnapshotAndFlattenUnderWrites(t *testing.T) {
	ctx := context.Background()
	const blocks, writers = 256, 4
	fs := lufs.NewMemFS(lufs.MemFSOptions{})
	if err := fs.MkdirAll("/p", 0o700); err != nil {
		t.Fatal(err)
	}
	base, err := CreateFileFS(fs, "/p/base.lu", blocks*BlockSizeBytes)
	if err != nil {
		t.Fatal(err)
	}
	if err := base.WriteAt(ctx, make([]byte, blocks*BlockSizeBytes/2), 0, 0); err != nil {
		t.Fatal(err)
	}
	newData := func(name string) *FileVolume {
		v, err := CreateFileFS(fs, "/p/"+name+".lu", blocks*BlockSizeBytes)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	o, err := CreateOverlay(OverlayOptions{Data: newData("c"), Base: base, BaseName: "base", FS: fs, MapPath: "/p/c.lumap"})
	if err != nil {
		t.Fatal(err)
	}
	var acked [blocks]atomic.Uint64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, BlockSizeBytes)
			for seq := uint64(1); ; seq++ {
				select {
				case <-stop:
					return
				default:
				}
				for b := w; b < blocks; b += writers {
					binary.LittleEndian.PutUint64(buf, seq)
					// Half the writes are partial: copy on write under load.
					p, off := buf, int64(b)*BlockSizeBytes
					if seq%2 == 0 {
						p = buf[:512]
					}
					if err := o.WriteAt(ctx, p, off, 0); err != nil {
						t.Error(err)
						return
					}
					acked[b].Store(seq)
				}
			}
		}()
	}
	seqOf := func(d blockdev.Device, b int) uint64 {
		buf := make([]byte, 8)
		if err := d.ReadAt(ctx, buf, int64(b)*BlockSizeBytes); err != nil {
			t.Fatal(err)
		}
		return binary.LittleEndian.Uint64(buf)
	}
	var before, after [blocks]uint64
	for b := range blocks {
		before[b] = acked[b].Load()
	}
	snap, err := o.Snapshot(ctx, OverlayOptions{Data: newData("c2"), BaseName: "s1", FS: fs, MapPath: "/p/c2.lumap"})
	if err != nil {
		t.Fatal(err)
	}
	for b := range blocks {
		after[b] = acked[b].Load()
	}
	if err := o.Flatten(ctx); err != nil {
		t.Fatal(err)
	}
	close(stop)
	wg.Wait()
	for b := range blocks {
		if got := seqOf(snap, b); got < before[b] || got > after[b]+1 {
			t.Fatalf("block %d: snapshot holds seq %d, acknowledged %d before and %d after", b, got, before[b], after[b])
		}
		if got, want := seqOf(o, b), acked[b].Load(); got != want {
			t.Fatalf("block %d: overlay holds seq %d, last acknowledged %d", b, got, want)
		}
	}
	if d := o.Depth(); d != 1 {
		t.Fatalf("depth %d after flatten", d)
	}
}

// gatedBase holds the n-th Extents call until gate is closed.
type gatedBase struct {
	Base
	n     int64
	calls atomic.Int64
	hit   chan struct{}
	gate  chan struct{}
}

func (g *gatedBase) Extents(ctx context.Context, off, length int64, dst []blockdev.Extent) ([]blockdev.Extent, error) {
	if g.calls.Add(1) == g.n {
		close(g.hit)
		<-g.gate
	}
	return g.Base.Extents(ctx, off, length, dst)
}

// TestOverlayFlattenAcrossSnapshot: a snapshot taken while Flatten copies
// the image in stops that flatten (the new top layer must not get the
// image's blocks where the snapshot wrote its own); flattening again
// finishes, and both the overlay and the snapshot read what they should.
func TestOverlayFlattenAcrossSnapshot(t *testing.T) {
	ctx := context.Background()
	const size = 1 << 20
	img := NewMemVolume(size)
	// The image holds data in the first half of every 64 KiB, holes in
	// the second, where the clone writes its own blocks.
	imgData := make([]byte, size)
	for off := 0; off < size; off += 64 << 10 {
		for i := off; i < off+32<<10; i++ {
			imgData[i] = 0xaa
		}
		if err := img.WriteAt(ctx, imgData[off:off+32<<10], int64(off), 0); err != nil {
			t.Fatal(err)
		}
	}
	g := &gatedBase{Base: img, n: 2, hit: make(chan struct{}), gate: make(chan struct{})}
	o, err := CreateOverlay(OverlayOptions{Data: NewMemVolume(size), Base: g})
	if err != nil {
		t.Fatal(err)
	}
	want := bytes.Clone(imgData)
	// Own blocks everywhere, also in the chunks Flatten has not reached.
	for off := int64(0); off < size; off += 64 << 10 {
		if err := o.WriteAt(ctx, []byte("own"), off+40<<10, 0); err != nil {
			t.Fatal(err)
		}
		copy(want[off+40<<10:], "own")
	}
	flattened := make(chan error, 1)
	go func() { flattened <- o.Flatten(ctx) }()
	<-g.hit
	snapped := make(chan error, 1)
	var snap *Overlay
	go func() {
		var err error
		snap, err = o.Snapshot(ctx, OverlayOptions{Data: NewMemVolume(size), BaseName: "s"})
		snapped <- err
	}()
	time.Sleep(50 * time.Millisecond) // let Snapshot wait for the lock
	close(g.gate)
	if err := <-snapped; err != nil {
		t.Fatal(err)
	}
	if err := <-flattened; err != nil && !errors.Is(err, ErrNotInChain) {
		t.Fatalf("flatten across a snapshot: %v", err)
	}
	if err := o.Flatten(ctx); err != nil {
		t.Fatal(err)
	}
	for name, d := range map[string]blockdev.Device{"overlay": o, "snapshot": snap} {
		got := make([]byte, size)
		if err := d.ReadAt(ctx, got, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("%s differs at byte %d", name, firstDiff(got, want))
		}
	}
}
