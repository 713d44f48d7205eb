package lu

import (
	"testing"
)

// checkMemChunks asserts the page directory's bookkeeping: every chunk in
// the right shard, no empty chunk kept, each chunk's count equal to its
// pages, and the counts adding up to the volume's held pages.
func checkMemChunks(t *testing.T, v *MemVolume) {
	t.Helper()
	total := int64(0)
	for si := range v.shards {
		s := &v.shards[si]
		s.mu.Lock()
		for ci, ch := range s.chunks {
			if v.shard(ci*memChunkPages) != s {
				t.Errorf("chunk %d in shard %d", ci, si)
			}
			n := 0
			for _, pg := range ch.pages {
				if pg != nil {
					n++
				}
			}
			if n == 0 || n != ch.held {
				t.Errorf("chunk %d: held %d, %d pages", ci, ch.held, n)
			}
			total += int64(n)
		}
		s.mu.Unlock()
	}
	if held := v.heldPages.Load(); held != total {
		t.Errorf("heldPages %d, chunks hold %d", held, total)
	}
}

func TestMemChunkBookkeeping(t *testing.T) {
	// A few chunks and a partial last one (the model's ranges span chunk
	// boundaries and its trims and zeroes empty whole chunks).
	const sizeBytes = (3*memChunkPages + 3) * BlockSizeBytes
	v := NewMemVolume(sizeBytes)
	runModel(t, v, true)
	checkMemChunks(t, v)
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	checkMemChunks(t, v)
	if v.AllocatedBytes() != 0 {
		t.Errorf("closed volume holds %d bytes", v.AllocatedBytes())
	}
}
