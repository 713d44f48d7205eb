package lu

import (
	"context"
	"encoding/binary"
	"sync"
	"sync/atomic"
	"testing"

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
