package lu

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/lupool/lupool/blockdev"
	"golang.org/x/sys/unix"
)

const benchFileBytes = 64 << 20

// benchFiles returns a FileVolume and a raw *os.File of benchFileBytes each,
// fully written, in the same directory (the same file system).
//
// The files live in b.TempDir(), or in $LU_BENCH_DIR when set (for example
// a tmpfs, to take the disk's writeback out of the comparison).
func benchFiles(b *testing.B) (*FileVolume, *os.File) {
	b.Helper()
	dir := b.TempDir()
	if d := os.Getenv("LU_BENCH_DIR"); d != "" {
		var err error
		if dir, err = os.MkdirTemp(d, "lu-bench-"); err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { _ = os.RemoveAll(dir) })
	}
	v, err := CreateFile(filepath.Join(dir, "lu.lu"), benchFileBytes)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = v.Close() })
	raw, err := os.OpenFile(filepath.Join(dir, "raw"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = raw.Close() })
	chunk := make([]byte, 1<<20)
	for i := range chunk {
		chunk[i] = byte(i)
	}
	for off := int64(0); off < benchFileBytes; off += int64(len(chunk)) {
		// The raw file is laid down in the pieces FileVolume writes, so
		// that both have page-cache folios of the same size (see
		// maxWriteChunkBytes and BenchmarkOverwrite4KAfterLargeWrites).
		for c := 0; c < len(chunk); c += maxWriteChunkBytes {
			if _, err := raw.WriteAt(chunk[c:c+maxWriteChunkBytes], off+int64(c)); err != nil {
				b.Fatal(err)
			}
		}
		if err := v.WriteAt(context.Background(), chunk, off, 0); err != nil {
			b.Fatal(err)
		}
	}
	return v, raw
}

func benchOffsets(n int) []int64 {
	rng := rand.New(rand.NewPCG(1, 2))
	out := make([]int64, n)
	for i := range out {
		out[i] = rng.Int64N(benchFileBytes/4096) * 4096
	}
	return out
}

type benchOp func(p []byte, off int64) error

func benchOps(v *FileVolume, raw *os.File) (luWrite, rawWrite, luRead, rawRead benchOp) {
	ctx := context.Background()
	luWrite = func(p []byte, off int64) error { return v.WriteAt(ctx, p, off, 0) }
	// The raw side is the bare system call on the descriptor, the
	// strictest baseline (os.File adds its own per-call bookkeeping).
	fd := int(raw.Fd())
	rawWrite = func(p []byte, off int64) error { _, err := unix.Pwrite(fd, p, off); return err }
	luRead = func(p []byte, off int64) error { return v.ReadAt(ctx, p, off) }
	rawRead = func(p []byte, off int64) error { _, err := unix.Pread(fd, p, off); return err }
	return
}

func runOps(b *testing.B, op benchOp, offsets []int64, p []byte, from, n int) {
	for i := range n {
		if err := op(p, offsets[(from+i)%len(offsets)]); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkRandom4K measures 4 KiB random reads and writes (page cache, no
// FUA) through a FileVolume and with raw pwrite/pread on a file of the same
// kind. The ratio sub-benchmarks interleave both in blocks of 1,000 ops and
// report lu-vs-raw throughput (1.0 = as fast as raw; target >= 0.95).
func BenchmarkRandom4K(b *testing.B) {
	v, raw := benchFiles(b)
	luWrite, rawWrite, luRead, rawRead := benchOps(v, raw)
	offsets := benchOffsets(1 << 16)
	for _, c := range []struct {
		name string
		op   benchOp
	}{{"write/lu", luWrite}, {"write/raw", rawWrite}, {"read/lu", luRead}, {"read/raw", rawRead}} {
		b.Run(c.name, func(b *testing.B) {
			p := make([]byte, 4096)
			runOps(b, c.op, offsets, p, 0, 2000) // warm-up
			b.SetBytes(4096)
			b.ReportAllocs()
			b.ResetTimer()
			runOps(b, c.op, offsets, p, 0, b.N)
		})
	}
	for _, c := range []struct {
		name    string
		lu, raw benchOp
	}{{"write/ratio", luWrite, rawWrite}, {"read/ratio", luRead, rawRead}} {
		b.Run(c.name, func(b *testing.B) {
			const block = 200
			p := make([]byte, 4096)
			runOps(b, c.lu, offsets, p, 0, 2000)
			runOps(b, c.raw, offsets, p, 0, 2000)
			b.SetBytes(2 * 4096)
			b.ResetTimer()
			// The median of per-block ratios resists the bursts of a shared
			// machine; the order alternates so neither side always runs
			// second.
			var ratios []float64
			for done := 0; done < b.N; done += block {
				n := min(block, b.N-done)
				first, second := c.lu, c.raw
				if (done/block)%2 == 1 {
					first, second = c.raw, c.lu
				}
				start := time.Now()
				runOps(b, first, offsets, p, done, n)
				mid := time.Now()
				runOps(b, second, offsets, p, done, n)
				firstTime, secondTime := mid.Sub(start), time.Since(mid)
				luTime, rawTime := firstTime, secondTime
				if (done/block)%2 == 1 {
					luTime, rawTime = secondTime, firstTime
				}
				ratios = append(ratios, float64(rawTime)/float64(max(luTime, 1)))
			}
			slices.Sort(ratios)
			b.ReportMetric(ratios[len(ratios)/2], "lu/raw-throughput")
		})
	}
}

// BenchmarkOverwrite4KAfterLargeWrites measures 4 KiB random overwrites of
// a region first laid down by 1 MiB writes: through a FileVolume (which
// writes in maxWriteChunkBytes pieces) and with raw 1 MiB pwrites, whose
// large page-cache folios make each later small write walk 256 blocks.
// "lu" should be several times faster than "raw-1MiB-fill" on ext4 or XFS
// with large folios, and the same elsewhere.
func BenchmarkOverwrite4KAfterLargeWrites(b *testing.B) {
	v, raw := benchFiles(b)
	// A new file: the page cache keeps the folios of benchFiles' own
	// fill, whatever is written over them later.
	big, err := os.OpenFile(filepath.Join(filepath.Dir(raw.Name()), "raw-1MiB"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = big.Close() })
	chunk := make([]byte, 1<<20)
	for off := int64(0); off < benchFileBytes; off += int64(len(chunk)) {
		if _, err := big.WriteAt(chunk, off); err != nil {
			b.Fatal(err)
		}
	}
	luWrite, rawWrite, _, _ := benchOps(v, big)
	offsets := benchOffsets(1 << 16)
	for _, c := range []struct {
		name string
		op   benchOp
	}{{"lu", luWrite}, {"raw-1MiB-fill", rawWrite}} {
		b.Run(c.name, func(b *testing.B) {
			p := make([]byte, 4096)
			b.SetBytes(4096)
			b.ResetTimer()
			runOps(b, c.op, offsets, p, 0, b.N)
		})
	}
}

// BenchmarkCreateDelete measures Pool.Create and Pool.Delete of a 1 TiB
// file volume with 10,000 volumes already in the pool, and reports their
// p50 and p99 latencies (target p50 <= 10 ms).
func BenchmarkCreateDelete(b *testing.B) {
	const existing = 10000
	dir := b.TempDir()
	for i := range existing {
		f, err := os.Create(filepath.Join(dir, fmt.Sprintf("lu%05d%s", i, volumeFileSuffix)))
		if err != nil {
			b.Fatal(err)
		}
		if err := f.Truncate(1 << 40); err != nil {
			b.Fatal(err)
		}
		_ = f.Close()
	}
	p, err := OpenPool(PoolOptions{Dirs: []string{dir}, OvercommitRatio: 1e9})
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()
	if n := len(p.Names()); n != existing {
		b.Fatalf("pool holds %d volumes, want %d", n, existing)
	}
	create := make([]time.Duration, 0, b.N)
	del := make([]time.Duration, 0, b.N)
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		name := fmt.Sprintf("bench-%d", i)
		t0 := time.Now()
		v, err := p.Create(name, 1<<40, KindFile)
		if err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if err := v.WriteAt(ctx, []byte{1}, 1<<39, blockdev.FUA); err != nil {
			b.Fatal(err)
		}
		t2 := time.Now()
		if err := p.Delete(name); err != nil {
			b.Fatal(err)
		}
		create = append(create, t1.Sub(t0))
		del = append(del, time.Since(t2))
	}
	b.StopTimer()
	report := func(d []time.Duration, what string) {
		slices.Sort(d)
		b.ReportMetric(float64(d[len(d)/2])/1e6, what+"-p50-ms")
		b.ReportMetric(float64(d[len(d)*99/100])/1e6, what+"-p99-ms")
	}
	report(create, "create")
	report(del, "delete")
}
