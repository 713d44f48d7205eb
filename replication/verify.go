package replication

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/internal/rules"
)

// RegionHashesMax bounds the regions one RegionHashes call hashes.
const RegionHashesMax = 4096

// RegionHashes returns the SHA-256 (hex) of up to count regions of
// regionBytes of this node's copy of name, starting at offsetBytes; the
// last region may be shorter (the LU's end). A region wholly unallocated
// is neither read nor hashed again: it gets the hash of zeros of its
// length, computed once per call (a thin 16 GiB LU's 16384 holes of 1 MiB
// cost one SHA-256, not 16 GiB of it). It returns an error wrapping
// replproto.ErrNotFound when this node holds no copy.
func (m *Manager) RegionHashes(ctx context.Context, name string, offsetBytes, regionBytes int64, count int) ([]string, error) {
	if err := rules.Region(regionBytes); err != nil {
		return nil, fmt.Errorf("%w: region %d bytes: %w", blockdev.ErrInvalid, regionBytes, err)
	}
	if offsetBytes < 0 || offsetBytes%regionBytes != 0 || count < 1 || count > RegionHashesMax {
		return nil, fmt.Errorf("%w: offset %d (a multiple of the region, %d bytes), count %d (1 to %d)",
			blockdev.ErrInvalid, offsetBytes, regionBytes, count, RegionHashesMax)
	}
	vol, ok := m.Volume(name)
	if !ok {
		return nil, fmt.Errorf("%w: no copy of %s on %s", ErrNoCopy, name, m.opts.NodeID)
	}
	size := vol.Size()
	buf := make([]byte, regionBytes)
	var ext []blockdev.Extent
	var out []string
	zeroHashes := map[int64]string{} // by region length: at most two (full, last)
	for i, off := 0, offsetBytes; i < count && off < size; i, off = i+1, off+regionBytes {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		n := min(regionBytes, size-off)
		var err error
		if ext, err = vol.Extents(ctx, off, n, ext[:0]); err != nil {
			return nil, err
		}
		if len(ext) == 1 && ext[0].LengthBytes >= n && ext[0].Flags&blockdev.ExtentHole != 0 {
			h, ok := zeroHashes[n]
			if !ok {
				clear(buf[:n])
				sum := sha256.Sum256(buf[:n])
				h = hex.EncodeToString(sum[:])
				zeroHashes[n] = h
			}
			out = append(out, h)
			continue
		}
		if err := vol.ReadAt(ctx, buf[:n], off); err != nil {
			return nil, err
		}
		sum := sha256.Sum256(buf[:n])
		out = append(out, hex.EncodeToString(sum[:]))
	}
	return out, nil
}
