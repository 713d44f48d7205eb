package lu

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/lu/lufs"
)

// BenchmarkClone4K measures 4 KiB random reads and writes (page cache, no
// FUA) on a linked clone, an Overlay over a fully written image, against
// the plain FileVolume of the same size. "read-base" reads blocks the
// clone never wrote (they come from the image), "read-own" reads blocks it
// wrote, "tryread-base" is the NBD engine's read path (TryReadAt), "write"
// overwrites blocks the clone holds (the common case: a block's first
// write takes the locked path once). The ratio sub-benchmarks
// interleave clone and plain in blocks of 200 ops and report the median
// clone-vs-plain throughput (1.0 = as fast; target >= 0.9).
func BenchmarkClone4K(b *testing.B) {
	plain, _ := benchFiles(b)
	dir := filepath.Dir(plain.Path())
	image, err := CreateFile(filepath.Join(dir, "image.lu"), benchFileBytes)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = image.Close() })
	ctx := context.Background()
	chunk := make([]byte, 1<<20)
	for i := range chunk {
		chunk[i] = byte(i * 7)
	}
	for off := int64(0); off < benchFileBytes; off += int64(len(chunk)) {
		if err := image.WriteAt(ctx, chunk, off, 0); err != nil {
			b.Fatal(err)
		}
	}
	newClone := func(name string) *Overlay {
		data, err := CreateFile(filepath.Join(dir, name+".lu"), benchFileBytes)
		if err != nil {
			b.Fatal(err)
		}
		o, err := CreateOverlay(OverlayOptions{Data: data, Base: image, BaseName: "image", FS: lufs.OS(), MapPath: filepath.Join(dir, name+".lumap")})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { _ = o.Close() })
		return o
	}
	fresh, own := newClone("fresh"), newClone("own")
	offsets := benchOffsets(1 << 16)
	p := make([]byte, 4096)
	// "own" wrote every block, laid down the way the plain volume was (1
	// MiB writes that FileVolume cuts into 64 KiB pieces), so that both
	// have page-cache folios of the same size.
	for off := int64(0); off < benchFileBytes; off += int64(len(chunk)) {
		if err := own.WriteAt(ctx, chunk, off, 0); err != nil {
			b.Fatal(err)
		}
	}
	read := func(d interface {
		ReadAt(context.Context, []byte, int64) error
	}) benchOp {
		return func(p []byte, off int64) error { return d.ReadAt(ctx, p, off) }
	}
	// tryRead is the NBD engine's read path: TryReadAt, ReadAt if declined.
	tryRead := func(d blockdev.TryReader) benchOp {
		return func(p []byte, off int64) error {
			if done, err := d.TryReadAt(ctx, p, off); done || err != nil {
				return err
			}
			return d.ReadAt(ctx, p, off)
		}
	}
	plainWrite := func(p []byte, off int64) error { return plain.WriteAt(ctx, p, off, 0) }
	ownWrite := func(p []byte, off int64) error { return own.WriteAt(ctx, p, off, 0) }
	cases := []struct {
		name         string
		clone, plain benchOp
	}{
		{"read-base", read(fresh), read(plain)},
		{"read-own", read(own), read(plain)},
		{"tryread-base", tryRead(fresh), tryRead(plain)},
		{"write", ownWrite, plainWrite},
	}
	for _, c := range cases {
		b.Run(c.name+"/clone", func(b *testing.B) {
			runOps(b, c.clone, offsets, p, 0, 2000)
			b.SetBytes(4096)
			b.ReportAllocs()
			b.ResetTimer()
			runOps(b, c.clone, offsets, p, 0, b.N)
		})
		b.Run(c.name+"/ratio", func(b *testing.B) {
			const block = 200
			runOps(b, c.clone, offsets, p, 0, 2000)
			runOps(b, c.plain, offsets, p, 0, 2000)
			b.SetBytes(2 * 4096)
			b.ResetTimer()
			var ratios []float64
			for done := 0; done < b.N; done += block {
				n := min(block, b.N-done)
				swap := (done/block)%2 == 1
				first, second := c.clone, c.plain
				if swap {
					first, second = c.plain, c.clone
				}
				start := time.Now()
				runOps(b, first, offsets, p, done, n)
				mid := time.Now()
				runOps(b, second, offsets, p, done, n)
				cloneTime, plainTime := mid.Sub(start), time.Since(mid)
				if swap {
					cloneTime, plainTime = plainTime, cloneTime
				}
				ratios = append(ratios, float64(plainTime)/float64(max(cloneTime, 1)))
			}
			slices.Sort(ratios)
			b.ReportMetric(ratios[len(ratios)/2], "clone/plain-throughput")
		})
	}
}

// BenchmarkCloneFirstWrite measures the first write to a block of a clone,
// the locked path: "clone-4096" writes a whole block (no copy),
// "clone-512" a sector (copy on write: the block is read from the image
// first); "plain-4096" is the first write to a hole of a plain volume, the
// file system's own allocation cost that both pay. Blocks
// are taken in random order; a fresh clone replaces a used-up one outside
// the timer.
func BenchmarkCloneFirstWrite(b *testing.B) {
	dir := b.TempDir()
	ctx := context.Background()
	image, err := CreateFile(filepath.Join(dir, "image.lu"), benchFileBytes)
	if err != nil {
		b.Fatal(err)
	}
	defer image.Close()
	chunk := make([]byte, 1<<20)
	for i := range chunk {
		chunk[i] = byte(i * 7)
	}
	for off := int64(0); off < benchFileBytes; off += int64(len(chunk)) {
		if err := image.WriteAt(ctx, chunk, off, 0); err != nil {
			b.Fatal(err)
		}
	}
	const blocks = benchFileBytes / BlockSizeBytes
	order := rand.New(rand.NewPCG(3, 4)).Perm(blocks)
	made := 0 // clones made, across the runs of every sub-benchmark
	for _, c := range []struct {
		name  string
		size  int
		plain bool
	}{{"clone-4096", 4096, false}, {"plain-4096", 4096, true}, {"clone-512", 512, false}} {
		size := c.size
		b.Run(c.name, func(b *testing.B) {
			var clone Volume
			fresh := func() {
				if clone != nil {
					_ = clone.Close()
				}
				made++
				name := fmt.Sprintf("c%d-%d", size, made)
				path := filepath.Join(dir, name+".lu")
				b.Cleanup(func() { _ = os.Remove(path) })
				data, err := CreateFile(path, benchFileBytes)
				if err != nil {
					b.Fatal(err)
				}
				if c.plain {
					clone = data
					return
				}
				if clone, err = CreateOverlay(OverlayOptions{Data: data, Base: image, BaseName: "image", FS: lufs.OS(), MapPath: filepath.Join(dir, name+".lumap")}); err != nil {
					b.Fatal(err)
				}
			}
			p := make([]byte, size)
			b.SetBytes(int64(size))
			b.ReportAllocs()
			for i := range b.N {
				if i%blocks == 0 {
					b.StopTimer()
					fresh()
					b.StartTimer()
				}
				if err := clone.WriteAt(ctx, p, int64(order[i%blocks])*BlockSizeBytes, 0); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			_ = clone.Close()
		})
	}
}

// BenchmarkCloneFlushAfterFirstWrite measures a Flush that must write the
// map (one block changed state since the last): the changed pages of the
// map and its header, whatever the clone's size (a 100 GiB clone's map is
// 6.25 MiB, written whole only at creation and after a resize). "plain"
// is the same write and Flush on a plain volume: the data's own fsync.
func BenchmarkCloneFlushAfterFirstWrite(b *testing.B) {
	ctx := context.Background()
	for _, c := range []struct {
		sizeGiB int64
		plain   bool
	}{{1, false}, {100, false}, {100, true}} {
		sizeGiB := c.sizeGiB
		name := fmt.Sprintf("clone-%dGiB", sizeGiB)
		if c.plain {
			name = fmt.Sprintf("plain-%dGiB", sizeGiB)
		}
		b.Run(name, func(b *testing.B) {
			dir := b.TempDir()
			size := sizeGiB << 30
			image, err := CreateFile(filepath.Join(dir, "image.lu"), size)
			if err != nil {
				b.Fatal(err)
			}
			defer image.Close()
			data, err := CreateFile(filepath.Join(dir, "c.lu"), size)
			if err != nil {
				b.Fatal(err)
			}
			var o Volume = data
			if !c.plain {
				if o, err = CreateOverlay(OverlayOptions{Data: data, Base: image, BaseName: "image", FS: lufs.OS(), MapPath: filepath.Join(dir, "c.lumap")}); err != nil {
					b.Fatal(err)
				}
			}
			defer o.Close()
			p := make([]byte, 4096)
			blocks := size / BlockSizeBytes
			b.ResetTimer()
			for i := range b.N {
				if err := o.WriteAt(ctx, p, (int64(i)*7919%blocks)*BlockSizeBytes, 0); err != nil {
					b.Fatal(err)
				}
				if err := o.Flush(ctx); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
