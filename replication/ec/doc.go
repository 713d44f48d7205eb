// Package ec stores a read-only image erasure-coded: its bytes are cut into
// stripes of K data shards plus M parity shards (Reed-Solomon,
// github.com/klauspost/reedsolomon), each shard of every stripe in its own
// shard file (in lupool, a one-copy LU on its own node). Any K of the K+M
// shards give the image back; reads touch only the data shards of the range
// asked for, and fall back to reconstructing a stripe when up to M shards
// are missing or fail their checksums.
//
// The package is a library over [blockdev.Device]: it knows nothing about
// nodes or the network. The caller hands it the K+M shard devices (nil for
// one that is gone) and learns about degraded reads through a callback.
//
// # Stripe layout (part of the format)
//
// The image is split into chunks of [ChunkBytes] (64 KiB). Chunk c of the
// image is data shard c mod K of stripe c / K; a stripe's M parity chunks
// are the Reed-Solomon parity of its K data chunks. The last stripe is
// padded with zeros up to K chunks. So a 4 KiB read reads one 64 KiB chunk
// from one shard, not a whole stripe:
//
//	image:   | c0 | c1 | c2 | c3 | c4 | c5 | ...        (K=2, M=1)
//	stripe:  |  s0     |  s1     |  s2     |
//	shard 0: [superblock] c0 c2 c4 ...                 (data)
//	shard 1: [superblock] c1 c3 c5 ...                 (data)
//	shard 2: [superblock] p0 p1 p2 ...                 (parity)
//
// # Shard file (part of the format)
//
// Every shard file starts with a superblock of SuperblockBytes (a multiple
// of 4096 bytes); stripe s's chunk follows at SuperblockBytes + s*ChunkBytes.
// All integers are little-endian.
//
//	offset  bytes  field
//	0       8      magic "LUPOOLEC"
//	8       2      format version (1)
//	10      1      K, data shards per stripe (1..DataShardsMax)
//	11      1      M, parity shards per stripe (1..ParityShardsMax)
//	12      1      this shard's index, 0..K+M-1 (K and up: parity)
//	13      3      zero
//	16      4      chunk size in bytes (ChunkBytes)
//	20      4      stripe count = ceil(image bytes / (K*ChunkBytes))
//	24      8      image bytes
//	32      16     image id (the same in every shard of one image)
//	48      4*S    CRC-32C (Castagnoli) of each of the S chunks of this shard
//	48+4*S  4      CRC-32C of bytes 0 .. 48+4*S
//	...            zeros up to SuperblockBytes
//
// A chunk that was never written reads as zeros, which is also what an
// all-zero chunk encodes to: an import writes no all-zero chunks, so a
// sparse image stays sparse in every shard.
package ec
