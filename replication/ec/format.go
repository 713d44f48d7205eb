package ec

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"

	"github.com/lupool/lupool/internal/rules"
)

// Format constants: part of the on-disk format (see the package doc).
// Changing any of them makes existing shard files unreadable.
const (
	// ChunkBytes is the size of one shard's part of one stripe.
	ChunkBytes = 64 << 10
	// FormatVersion is the superblock's version field.
	FormatVersion = 1
	// superblockFixedBytes is the size of the fields before the table.
	superblockFixedBytes = 48
	// superblockAlignBytes is what the superblock is padded to.
	superblockAlignBytes = 4096
)

// Limits (not format: a reader accepts what the decoder checks).
const (
	// DataShardsMax is the largest K (one rule for the pool: package rules).
	DataShardsMax = rules.ECDataShardsMax
	// ParityShardsMax is the largest M.
	ParityShardsMax = rules.ECParityShardsMax
	// ImageBytesMax is the largest image an EC layout takes (16 TiB): it
	// bounds the superblock's table (at most 2^28/K entries).
	ImageBytesMax = 16 << 40
)

var magic = [8]byte{'L', 'U', 'P', 'O', 'O', 'L', 'E', 'C'}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Errors. ErrCorrupt marks every checksum or format failure of a shard.
var (
	// ErrCorrupt is returned (wrapped) when a superblock or chunk fails its
	// checksum or does not decode.
	ErrCorrupt = errors.New("ec: shard corrupt")
	// ErrGeometry is returned by Geometry.Validate for K or M out of range.
	ErrGeometry = errors.New("ec: invalid geometry")
	// ErrTooFewShards is returned by a read when fewer than K shards of a
	// stripe are readable and intact.
	ErrTooFewShards = errors.New("ec: too few intact shards to read the stripe")
	// ErrSelfTest is returned by SelfTest when the encoder's output differs
	// from the committed golden hash.
	ErrSelfTest = errors.New("ec: encoder self-test failed")
)

// Geometry is the K+M of a stripe.
type Geometry struct {
	// K is the count of data shards per stripe.
	K int `json:"k"`
	// M is the count of parity shards per stripe.
	M int `json:"m"`
}

// Shards returns K+M.
func (g Geometry) Shards() int { return g.K + g.M }

// String gives "K+M".
func (g Geometry) String() string { return fmt.Sprintf("%d+%d", g.K, g.M) }

// Validate checks K and M against the limits.
func (g Geometry) Validate() error {
	if err := rules.ECGeometry(g.K, g.M); err != nil {
		return fmt.Errorf("%w: %v", ErrGeometry, err)
	}
	return nil
}

// ParseGeometry parses "K+M", e.g. "2+1".
func ParseGeometry(s string) (Geometry, error) {
	var g Geometry
	var rest string
	n, _ := fmt.Sscanf(s, "%d+%d%s", &g.K, &g.M, &rest)
	if n != 2 || fmt.Sprintf("%d+%d", g.K, g.M) != s {
		return Geometry{}, fmt.Errorf("%w: %q: give data+parity shards, e.g. 2+1", ErrGeometry, s)
	}
	return g, g.Validate()
}

// StripeDataBytes is the image bytes one stripe holds.
func (g Geometry) StripeDataBytes() int64 { return int64(g.K) * ChunkBytes }

// Stripes returns the stripe count of an image of dataBytes.
func (g Geometry) Stripes(dataBytes int64) int64 {
	return (dataBytes + g.StripeDataBytes() - 1) / g.StripeDataBytes()
}

// SuperblockBytes returns the superblock size for an image of dataBytes.
func (g Geometry) SuperblockBytes(dataBytes int64) int64 {
	n := superblockFixedBytes + 4*g.Stripes(dataBytes) + 4
	return (n + superblockAlignBytes - 1) / superblockAlignBytes * superblockAlignBytes
}

// ShardBytes returns the size of one shard file of an image of dataBytes.
func (g Geometry) ShardBytes(dataBytes int64) int64 {
	return g.SuperblockBytes(dataBytes) + g.Stripes(dataBytes)*ChunkBytes
}

// Superblock is a shard file's header with its chunk checksum table.
type Superblock struct {
	Geometry
	// Shard is this shard's index, 0..K+M-1.
	Shard int
	// DataBytes is the image size.
	DataBytes int64
	// ImageID is the same in every shard of one image.
	ImageID [16]byte
	// ChunkCRCs holds the CRC-32C of each stripe's chunk of this shard.
	ChunkCRCs []uint32
}

// Encode returns the superblock's bytes, SuperblockBytes long.
func (sb *Superblock) Encode() []byte {
	out := make([]byte, sb.SuperblockBytes(sb.DataBytes))
	copy(out, magic[:])
	binary.LittleEndian.PutUint16(out[8:], FormatVersion)
	out[10], out[11], out[12] = byte(sb.K), byte(sb.M), byte(sb.Shard)
	binary.LittleEndian.PutUint32(out[16:], ChunkBytes)
	binary.LittleEndian.PutUint32(out[20:], uint32(len(sb.ChunkCRCs)))
	binary.LittleEndian.PutUint64(out[24:], uint64(sb.DataBytes))
	copy(out[32:48], sb.ImageID[:])
	at := superblockFixedBytes
	for _, c := range sb.ChunkCRCs {
		binary.LittleEndian.PutUint32(out[at:], c)
		at += 4
	}
	binary.LittleEndian.PutUint32(out[at:], crc32.Checksum(out[:at], castagnoli))
	return out
}

// SuperblockBytesOf returns the full superblock size that a superblock
// whose first 4096 bytes are head declares, so that a reader knows how
// much to read; it checks only what it needs for that.
func SuperblockBytesOf(head []byte) (int64, error) {
	g, dataBytes, err := decodeFixed(head)
	if err != nil {
		return 0, err
	}
	return g.SuperblockBytes(dataBytes), nil
}

func decodeFixed(b []byte) (Geometry, int64, error) {
	if len(b) < superblockFixedBytes {
		return Geometry{}, 0, fmt.Errorf("%w: superblock of %d bytes", ErrCorrupt, len(b))
	}
	if !bytes.Equal(b[:8], magic[:]) {
		return Geometry{}, 0, fmt.Errorf("%w: no superblock (magic %q)", ErrCorrupt, b[:8])
	}
	if v := binary.LittleEndian.Uint16(b[8:]); v != FormatVersion {
		return Geometry{}, 0, fmt.Errorf("%w: format version %d, this build reads %d", ErrCorrupt, v, FormatVersion)
	}
	g := Geometry{K: int(b[10]), M: int(b[11])}
	if err := g.Validate(); err != nil {
		return Geometry{}, 0, fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	if c := binary.LittleEndian.Uint32(b[16:]); c != ChunkBytes {
		return Geometry{}, 0, fmt.Errorf("%w: chunk size %d, the format's is %d", ErrCorrupt, c, ChunkBytes)
	}
	dataBytes := int64(binary.LittleEndian.Uint64(b[24:]))
	if dataBytes <= 0 || dataBytes > ImageBytesMax {
		return Geometry{}, 0, fmt.Errorf("%w: image of %d bytes", ErrCorrupt, dataBytes)
	}
	if s := int64(binary.LittleEndian.Uint32(b[20:])); s != g.Stripes(dataBytes) {
		return Geometry{}, 0, fmt.Errorf("%w: %d stripes for %d bytes, want %d", ErrCorrupt, s, dataBytes, g.Stripes(dataBytes))
	}
	return g, dataBytes, nil
}

// DecodeSuperblock decodes and checks a superblock: b holds at least its
// SuperblockBytes.
func DecodeSuperblock(b []byte) (Superblock, error) {
	g, dataBytes, err := decodeFixed(b)
	if err != nil {
		return Superblock{}, err
	}
	stripes := int(g.Stripes(dataBytes))
	end := superblockFixedBytes + 4*stripes
	if len(b) < end+4 {
		return Superblock{}, fmt.Errorf("%w: superblock cut short: %d bytes of %d", ErrCorrupt, len(b), end+4)
	}
	if got, want := crc32.Checksum(b[:end], castagnoli), binary.LittleEndian.Uint32(b[end:]); got != want {
		return Superblock{}, fmt.Errorf("%w: superblock checksum %08x, stored %08x", ErrCorrupt, got, want)
	}
	sb := Superblock{Geometry: g, Shard: int(b[12]), DataBytes: dataBytes, ChunkCRCs: make([]uint32, stripes)}
	if sb.Shard >= g.Shards() || b[13] != 0 || b[14] != 0 || b[15] != 0 {
		return Superblock{}, fmt.Errorf("%w: shard index %d of %s", ErrCorrupt, sb.Shard, g)
	}
	copy(sb.ImageID[:], b[32:48])
	for i := range sb.ChunkCRCs {
		sb.ChunkCRCs[i] = binary.LittleEndian.Uint32(b[superblockFixedBytes+4*i:])
	}
	return sb, nil
}

// ChunkCRC returns a chunk's checksum as the superblock stores it.
func ChunkCRC(chunk []byte) uint32 { return crc32.Checksum(chunk, castagnoli) }

// CheckChunk compares a chunk against its stored checksum.
func CheckChunk(chunk []byte, want uint32) error {
	if len(chunk) != ChunkBytes {
		return fmt.Errorf("%w: chunk of %d bytes", ErrCorrupt, len(chunk))
	}
	if got := ChunkCRC(chunk); got != want {
		return fmt.Errorf("%w: chunk checksum %08x, stored %08x", ErrCorrupt, got, want)
	}
	return nil
}
