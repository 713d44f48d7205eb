package lu

import (
	"context"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/lupool/lupool/lu/lufs"
)

// BenchmarkClone4K measures 4 KiB random reads and writes (page cache, no
// FUA) on a linked clone, an Overlay over a fully written image, against
// the plain FileVolume of the same size. "read-base" reads blocks the
// clone never wrote (they come from the image), "read-own" reads blocks it
// wrote, "write" overwrites blocks (the first pass over the clone, in the
// warm-up, takes the copy-on-write path). The ratio sub-benchmarks
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
	// "own" wrote every offset the benchmark touches.
	for _, off := range offsets {
		if err := own.WriteAt(ctx, p, off, 0); err != nil {
			b.Fatal(err)
		}
	}
	read := func(d interface {
		ReadAt(context.Context, []byte, int64) error
	}) benchOp {
		return func(p []byte, off int64) error { return d.ReadAt(ctx, p, off) }
	}
	plainWrite := func(p []byte, off int64) error { return plain.WriteAt(ctx, p, off, 0) }
	ownWrite := func(p []byte, off int64) error { return own.WriteAt(ctx, p, off, 0) }
	cases := []struct {
		name         string
		clone, plain benchOp
	}{
		{"read-base", read(fresh), read(plain)},
		{"read-own", read(own), read(plain)},
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
