package ec

import (
	"context"
	"math/rand/v2"
	"testing"

	"github.com/lupool/lupool/blockdev"
)

func benchStripe(b *testing.B, g Geometry) [][]byte {
	b.Helper()
	rng := rand.NewChaCha8([32]byte{1})
	shards := make([][]byte, g.Shards())
	for i := range shards {
		shards[i] = make([]byte, ChunkBytes)
		if i < g.K {
			_, _ = rng.Read(shards[i])
		}
	}
	return shards
}

func benchEncode(b *testing.B, g Geometry) {
	enc, err := newEncoder(g)
	if err != nil {
		b.Fatal(err)
	}
	shards := benchStripe(b, g)
	_ = enc.Encode(shards) // warm up
	b.SetBytes(int64(g.K) * ChunkBytes)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := enc.Encode(shards); err != nil {
			b.Fatal(err)
		}
	}
}

func benchReconstruct(b *testing.B, g Geometry) {
	enc, err := newEncoder(g)
	if err != nil {
		b.Fatal(err)
	}
	shards := benchStripe(b, g)
	if err := enc.Encode(shards); err != nil {
		b.Fatal(err)
	}
	lost := shards[0]
	b.SetBytes(int64(g.K) * ChunkBytes)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		shards[0] = lost[:0] // a lost data shard, its buffer reused
		if err := enc.ReconstructData(shards); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkEncode2x1x64KiB(b *testing.B)      { benchEncode(b, Geometry{2, 1}) }
func BenchmarkEncode4x2x64KiB(b *testing.B)      { benchEncode(b, Geometry{4, 2}) }
func BenchmarkReconstruct2x1x64KiB(b *testing.B) { benchReconstruct(b, Geometry{2, 1}) }
func BenchmarkReconstruct4x2x64KiB(b *testing.B) { benchReconstruct(b, Geometry{4, 2}) }

// benchRead reads an encoded 2+1 image in reads of n bytes through Image,
// intact or with data shard 0 missing.
func benchRead(b *testing.B, n int64, degraded bool) {
	g := Geometry{2, 1}
	data := make([]byte, 64*g.StripeDataBytes())
	_, _ = rand.NewChaCha8([32]byte{2}).Read(data)
	mems, opts := encodeMem(b, g, data)
	devs := devices(mems)
	if degraded {
		devs[0] = nil
	}
	img := openMem(b, devs, opts)
	p := make([]byte, n)
	ctx := context.Background()
	_ = img.ReadAt(ctx, p, 0)
	b.SetBytes(n)
	b.ReportAllocs()
	b.ResetTimer()
	off := int64(0)
	for i := 0; i < b.N; i++ {
		if off+n > int64(len(data)) {
			off = 0
		}
		if err := img.ReadAt(ctx, p, off); err != nil {
			b.Fatal(err)
		}
		off += n
	}
}

var _ blockdev.Device = (*Image)(nil)

func BenchmarkRead2x1x1MiB(b *testing.B)         { benchRead(b, 1<<20, false) }
func BenchmarkRead2x1x4KiB(b *testing.B)         { benchRead(b, 4096, false) }
func BenchmarkReadDegraded2x1x1MiB(b *testing.B) { benchRead(b, 1<<20, true) }
