package lu

import (
	"context"
	"os"
	"os/exec"
	"testing"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/internal/realclient"
)

// mountTmpfs mounts a fresh tmpfs of the given size (e.g. "64m") and
// unmounts it when the test ends. When mount is refused (not root) it ends
// the test through realclient.Missing: a skip, a failure in CI.
func mountTmpfs(t testing.TB, size string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "lu-tmpfs-")
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size, "tmpfs", dir).CombinedOutput()
	if err != nil {
		_ = os.Remove(dir)
		realclient.Missing(t, "cannot mount a tmpfs (needs root): %v: %s", err, out)
		return ""
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", dir, err, out)
			return
		}
		_ = os.Remove(dir)
	})
	return dir
}

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
