package lu

import (
	"context"
	"math/rand/v2"
	"testing"
)

// BenchmarkMemRandom4K measures MemVolume's 4 KiB random reads and writes
// over a fully written 1 GiB volume, the pattern of fio randread/randwrite
// against the NBD engine (bench/).
func BenchmarkMemRandom4K(b *testing.B) {
	const sizeBytes = 1 << 30
	v := NewMemVolume(sizeBytes)
	defer v.Close()
	ctx := context.Background()
	p := make([]byte, 1<<20)
	for off := int64(0); off < sizeBytes; off += int64(len(p)) {
		if err := v.WriteAt(ctx, p, off, 0); err != nil {
			b.Fatal(err)
		}
	}
	rng := rand.New(rand.NewPCG(1, 2))
	offsets := make([]int64, 1<<20)
	for i := range offsets {
		offsets[i] = rng.Int64N(sizeBytes/BlockSizeBytes) * BlockSizeBytes
	}
	page := p[:BlockSizeBytes]
	b.Run("write", func(b *testing.B) {
		b.SetBytes(BlockSizeBytes)
		b.ReportAllocs()
		for i := 0; b.Loop(); i++ {
			if err := v.WriteAt(ctx, page, offsets[i%len(offsets)], 0); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("read", func(b *testing.B) {
		b.SetBytes(BlockSizeBytes)
		b.ReportAllocs()
		for i := 0; b.Loop(); i++ {
			if err := v.ReadAt(ctx, page, offsets[i%len(offsets)]); err != nil {
				b.Fatal(err)
			}
		}
	})
}
