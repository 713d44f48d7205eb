package replication

import (
	"context"
	"fmt"
	"math/rand"
	"sync"
	"testing"

	"github.com/lupool/lupool/cluster"
)

// BenchmarkMirrorWrite4K measures 4 KiB random writes through the writer's
// Mirror of a file or memory LU with 1 copy (local only) and 2 copies (a
// second node in the same process over loopback TCP), at 1 and 32 writes
// in flight. Memory LUs show the cost of the replication stream alone;
// file LUs add a second page-cache write.
func BenchmarkMirrorWrite4K(b *testing.B) {
	for _, kind := range []string{"memory", "file"} {
		for _, depth := range []int{1, 32} {
			for _, copies := range []int{1, 2} {
				b.Run(fmt.Sprintf("%s/qd=%d/copies=%d", kind, depth, copies), func(b *testing.B) {
					benchMirror(b, kind, copies, depth)
				})
			}
		}
	}
}

func benchMirror(b *testing.B, kind string, copies, depth int) {
	mt, nodes := newTestCluster(b, "a", "b")
	const size = 256 << 20
	rec := twoCopies("bench", size, kind)
	if copies == 1 {
		rec.Replicas = rec.Replicas[:1]
		rec.Copies = 1
	}
	mt.create(b, rec)
	mir := exported(b, nodes["a"].m, "bench").(*Mirror)
	if copies == 2 {
		waitFor(b, "stream", func() bool { return mir.linkSet()[0].conn.Load() != nil })
	}
	ctx := context.Background()
	// Allocate the range first: measure overwrites, like swap traffic.
	page := make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(page)) {
		if err := mir.WriteAt(ctx, page, off, 0); err != nil {
			b.Fatal(err)
		}
	}
	b.SetBytes(4096)
	b.ReportAllocs()
	b.ResetTimer()
	var wg sync.WaitGroup
	per := b.N / depth
	for w := 0; w < depth; w++ {
		n := per
		if w == 0 {
			n += b.N % depth
		}
		wg.Add(1)
		go func(seed int64, n int) {
			defer wg.Done()
			rng := rand.New(rand.NewSource(seed))
			p := make([]byte, 4096)
			for i := 0; i < n; i++ {
				off := int64(rng.Intn(size/4096)) * 4096
				if err := mir.WriteAt(ctx, p, off, 0); err != nil {
					b.Error(err)
					return
				}
			}
		}(int64(w), n)
	}
	wg.Wait()
	b.StopTimer()
	if got := mt.get("bench"); copies == 2 && got.Replicas[1].State != cluster.ReplicaInSync {
		b.Fatalf("copy fell out of sync during the benchmark: %+v", got)
	}
}
