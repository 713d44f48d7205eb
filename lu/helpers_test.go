package lu

import (
	"context"
	"testing"

	"github.com/lupool/lupool/blockdev"
)

// allocationMap expands a device's extents over [0, size) into one bool per
// 4 KiB block (true = allocated).
func allocationMap(t testing.TB, d blockdev.Extenter, size int64) []bool {
	t.Helper()
	blocks := make([]bool, (size+BlockSizeBytes-1)/BlockSizeBytes)
	var ext []blockdev.Extent
	for pos := int64(0); pos < size; {
		var err error
		ext, err = d.Extents(context.Background(), pos, size-pos, ext[:0])
		if err != nil {
			t.Fatalf("extents at %d: %v", pos, err)
		}
		if len(ext) == 0 {
			t.Fatalf("extents at %d returned nothing", pos)
		}
		for _, e := range ext {
			if e.LengthBytes <= 0 {
				t.Fatalf("extent of %d bytes at %d", e.LengthBytes, pos)
			}
			hole := e.Flags&blockdev.ExtentHole != 0
			if hole && e.Flags&blockdev.ExtentZero == 0 {
				t.Fatalf("hole at %d not marked zero", pos)
			}
			for b := pos / BlockSizeBytes; b*BlockSizeBytes < pos+e.LengthBytes; b++ {
				if !hole {
					blocks[b] = true
				}
			}
			pos += e.LengthBytes
		}
	}
	return blocks
}
