package ec

import (
	"context"
	"fmt"
	"sync"

	"github.com/lupool/lupool/blockdev"
)

// batchStripes is how many stripes Encode, Verify and Rebuild handle at a
// time (K+M times 1 MiB of buffers).
const batchStripes = 16

var zeroChunk = make([]byte, ChunkBytes)

// zeroChunkCRC is the checksum of a chunk never written.
var zeroChunkCRC = ChunkCRC(zeroChunk)

func isZero(b []byte) bool {
	for len(b) >= ChunkBytes {
		if string(b[:ChunkBytes]) != string(zeroChunk) {
			return false
		}
		b = b[ChunkBytes:]
	}
	return string(b) == string(zeroChunk[:len(b)])
}

// Source is what Encode reads an image from.
type Source interface {
	ReadAt(ctx context.Context, p []byte, off int64) error
}

// Encode writes the image of opts.DataBytes read from src into the K+M
// shard devices, which must be at least ShardBytes long and read as zeros
// (fresh thin volumes: all-zero chunks are not written). It writes every
// shard's superblock last and flushes, so a shard without a superblock is
// one whose encode did not finish. progress, if set, gets the image bytes
// done.
func Encode(ctx context.Context, src Source, shards []blockdev.Device, opts Options, progress func(doneBytes int64)) error {
	opts.ensureDefaults()
	if err := opts.validate(len(shards)); err != nil {
		return err
	}
	enc, err := newEncoder(opts.Geometry)
	if err != nil {
		return err
	}
	for i, d := range shards {
		if d == nil || d.Size() < opts.ShardBytes(opts.DataBytes) {
			return fmt.Errorf("%w: shard %d device is missing or smaller than %d bytes", ErrGeometry, i, opts.ShardBytes(opts.DataBytes))
		}
	}
	g, n := opts.Geometry, opts.Shards()
	stripes := g.Stripes(opts.DataBytes)
	sbBytes := g.SuperblockBytes(opts.DataBytes)
	crcs := make([][]uint32, n)
	for i := range crcs {
		crcs[i] = make([]uint32, stripes)
	}
	data := make([]byte, batchStripes*g.StripeDataBytes())
	perShard := make([][]byte, n) // batchStripes chunks of shard i, in stripe order
	for i := range perShard {
		perShard[i] = make([]byte, batchStripes*ChunkBytes)
	}
	for s0 := int64(0); s0 < stripes; s0 += batchStripes {
		nb := min(batchStripes, stripes-s0)
		off := s0 * g.StripeDataBytes()
		want := min(nb*g.StripeDataBytes(), opts.DataBytes-off)
		clear(data)
		if err := src.ReadAt(ctx, data[:want], off); err != nil {
			return fmt.Errorf("ec: read the image at %d: %w", off, err)
		}
		for s := int64(0); s < nb; s++ {
			stripe := make([][]byte, n)
			for i := 0; i < n; i++ {
				stripe[i] = perShard[i][s*ChunkBytes : (s+1)*ChunkBytes]
			}
			for j := 0; j < g.K; j++ {
				copy(stripe[j], data[(s*int64(g.K)+int64(j))*ChunkBytes:])
			}
			if err := enc.Encode(stripe); err != nil {
				return fmt.Errorf("ec: encode stripe %d: %w", s0+s, err)
			}
			for i := 0; i < n; i++ {
				crcs[i][s0+s] = ChunkCRC(stripe[i])
			}
		}
		if err := writeBatch(ctx, shards, perShard, sbBytes+s0*ChunkBytes, nb, nil); err != nil {
			return err
		}
		if progress != nil {
			progress(off + want)
		}
	}
	for i, d := range shards {
		sb := Superblock{Geometry: g, Shard: i, DataBytes: opts.DataBytes, ImageID: opts.ImageID, ChunkCRCs: crcs[i]}
		if err := d.WriteAt(ctx, sb.Encode(), 0, 0); err != nil {
			return fmt.Errorf("ec: shard %d: write superblock: %w", i, err)
		}
	}
	for i, d := range shards {
		if err := d.Flush(ctx); err != nil {
			return fmt.Errorf("ec: shard %d: flush: %w", i, err)
		}
	}
	return nil
}

// writeBatch writes nb chunks of each shard's buffer at off on its device,
// all shards in parallel, runs of non-zero chunks as one write. A shard
// with only[i] false (when only is set) is not written. With zeros set,
// all-zero chunks are written too (a device that may hold old data).
func writeBatch(ctx context.Context, shards []blockdev.Device, bufs [][]byte, off, nb int64, only []bool) error {
	errs := make([]error, len(shards))
	var wg sync.WaitGroup
	for i := range shards {
		if only != nil && !only[i] {
			continue
		}
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			errs[i] = writeRuns(ctx, shards[i], bufs[i][:nb*ChunkBytes], off, only != nil)
		}(i)
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			return fmt.Errorf("ec: shard %d: write: %w", i, err)
		}
	}
	return nil
}

// writeRuns writes buf at off, runs of non-zero chunks as one write each.
// All-zero chunks are skipped, or with zeros (a device that may hold old
// data there) zeroed: deallocated where the device can (blockdev.Zeroer),
// so a rebuilt shard stays as sparse as an encoded one.
func writeRuns(ctx context.Context, d blockdev.Device, buf []byte, off int64, zeros bool) error {
	chunks := int64(len(buf)) / ChunkBytes
	zeroer, canZero := d.(blockdev.Zeroer)
	for c := int64(0); c < chunks; {
		zero := isZero(buf[c*ChunkBytes : (c+1)*ChunkBytes])
		end := c + 1
		for end < chunks && isZero(buf[end*ChunkBytes:(end+1)*ChunkBytes]) == zero {
			end++
		}
		var err error
		switch {
		case !zero || zeros && !canZero:
			err = d.WriteAt(ctx, buf[c*ChunkBytes:end*ChunkBytes], off+c*ChunkBytes, 0)
		case zeros:
			err = zeroer.WriteZeroes(ctx, off+c*ChunkBytes, (end-c)*ChunkBytes, 0)
		}
		if err != nil {
			return err
		}
		c = end
	}
	return nil
}
