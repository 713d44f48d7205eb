package replication

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"testing"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/lu"
)

// naiveRegionHashes is the dumb version RegionHashes must agree with: read
// every region, holes included, and hash it.
func naiveRegionHashes(t *testing.T, vol lu.Volume, offsetBytes, regionBytes int64, count int) []string {
	t.Helper()
	var out []string
	for i, off := 0, offsetBytes; i < count && off < vol.Size(); i, off = i+1, off+regionBytes {
		buf := make([]byte, min(regionBytes, vol.Size()-off))
		if err := vol.ReadAt(context.Background(), buf, off); err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(buf)
		out = append(out, hex.EncodeToString(sum[:]))
	}
	return out
}

// TestRegionHashesMatchNaive: holes (whole regions, the short last region,
// regions with data at either end) hash exactly as reading them would.
func TestRegionHashesMatchNaive(t *testing.T) {
	m, _, _ := newTestManager(t)
	const region = 64 << 10
	size := int64(40*region + 8192) // a short last region
	m.Enqueue(cluster.Change{Kind: cluster.Created, LU: rec("v", size, "file", "me"), Index: 1})
	sync1(t, m)
	vol, ok := m.Volume("v")
	if !ok {
		t.Fatal("no volume")
	}
	ctx := context.Background()
	page := make([]byte, 4096)
	for i := range page {
		page[i] = byte(i*7 + 1)
	}
	for _, off := range []int64{0, 3 * region, 5*region - 4096, 17*region + 8192, 40 * region} {
		if err := vol.WriteAt(ctx, page, off, 0); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		off   int64
		count int
	}{{0, 41}, {0, 5}, {20 * region, 30}, {40 * region, 1}, {39 * region, 2}} {
		got, err := m.RegionHashes(ctx, "v", tc.off, region, tc.count)
		if err != nil {
			t.Fatal(err)
		}
		want := naiveRegionHashes(t, vol, tc.off, region, tc.count)
		if len(got) != len(want) {
			t.Fatalf("offset %d count %d: %d hashes, want %d", tc.off, tc.count, len(got), len(want))
		}
		for i := range want {
			if got[i] != want[i] {
				t.Errorf("offset %d region %d: %s, want %s", tc.off, i, got[i], want[i])
			}
		}
	}
	// A region wholly a hole and one with data differ; two holes of the
	// same length agree.
	h, _ := m.RegionHashes(ctx, "v", 0, region, 5)
	if h[1] != h[2] || h[1] == h[3] || h[0] == h[1] {
		t.Errorf("hole and data hashes: %v", h)
	}
	if _, err := m.RegionHashes(ctx, "v", 0, 6<<10, 1); !errors.Is(err, blockdev.ErrInvalid) {
		t.Errorf("6 KiB region: %v, want ErrInvalid", err)
	}
	if _, err := m.RegionHashes(ctx, "nosuch", 0, region, 1); !errors.Is(err, ErrNoCopy) {
		t.Errorf("unknown LU: %v, want ErrNoCopy", err)
	}
}

// BenchmarkRegionHashesThin hashes a thin 4 GiB LU with one 1 MiB region
// written: the holes must cost next to nothing.
func BenchmarkRegionHashesThin(b *testing.B) {
	pool, err := lu.OpenPool(lu.PoolOptions{Dirs: []string{b.TempDir()}})
	if err != nil {
		b.Fatal(err)
	}
	defer pool.Close()
	m, err := NewManager(ManagerOptions{NodeID: "me", Pool: pool})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	const size, region = 4 << 30, 1 << 20
	m.Enqueue(cluster.Change{Kind: cluster.Created, LU: rec("v", size, "file", "me"), Index: 1})
	sync1(b, m)
	vol, _ := m.Volume("v")
	if err := vol.WriteAt(context.Background(), make([]byte, region), 7*region, 0); err != nil {
		b.Fatal(err)
	}
	b.SetBytes(size)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := m.RegionHashes(context.Background(), "v", 0, region, RegionHashesMax); err != nil {
			b.Fatal(err)
		}
	}
}
