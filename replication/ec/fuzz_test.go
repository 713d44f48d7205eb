package ec

import (
	"bytes"
	"errors"
	"testing"
)

// FuzzDecodeSuperblock: any bytes either decode to a superblock that
// encodes back to the same bytes (up to the padding) or fail with
// ErrCorrupt; the decoder never panics or allocates past the stripe
// limit.
func FuzzDecodeSuperblock(f *testing.F) {
	for _, sb := range []Superblock{
		{Geometry: Geometry{2, 1}, Shard: 0, DataBytes: 4096, ChunkCRCs: []uint32{7}},
		{Geometry: Geometry{4, 2}, Shard: 5, DataBytes: 9 * 4 * ChunkBytes, ImageID: testID, ChunkCRCs: make([]uint32, 9)},
	} {
		f.Add(sb.Encode())
	}
	f.Add([]byte("LUPOOLEC"))
	f.Fuzz(func(t *testing.T, b []byte) {
		if n, err := SuperblockBytesOf(b); err == nil && (n <= 0 || n%superblockAlignBytes != 0) {
			t.Fatalf("superblock size %d", n)
		}
		sb, err := DecodeSuperblock(b)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error %v is not ErrCorrupt", err)
			}
			return
		}
		if err := sb.Geometry.Validate(); err != nil || sb.Shard >= sb.Shards() {
			t.Fatalf("decoded a bad superblock %+v", sb)
		}
		enc := sb.Encode()
		used := superblockFixedBytes + 4*len(sb.ChunkCRCs) + 4
		if !bytes.Equal(enc[:used], b[:used]) {
			t.Fatal("re-encoding differs")
		}
		if _, err := DecodeSuperblock(enc); err != nil {
			t.Fatalf("re-encoded superblock does not decode: %v", err)
		}
	})
}

// FuzzCheckChunk: a chunk passes only against its own checksum.
func FuzzCheckChunk(f *testing.F) {
	f.Add([]byte{1, 2, 3}, uint32(0))
	f.Fuzz(func(t *testing.T, seed []byte, crc uint32) {
		chunk := make([]byte, ChunkBytes)
		copy(chunk, seed)
		err := CheckChunk(chunk, crc)
		if (err == nil) != (ChunkCRC(chunk) == crc) {
			t.Fatalf("CheckChunk against %08x: %v", crc, err)
		}
		if err != nil && !errors.Is(err, ErrCorrupt) {
			t.Fatal(err)
		}
		if CheckChunk(chunk[:len(chunk)-1], ChunkCRC(chunk[:len(chunk)-1])) == nil {
			t.Fatal("a short chunk passed")
		}
	})
}
