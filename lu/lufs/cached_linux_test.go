package lufs

import (
	"os"
	"path/filepath"
	"testing"
)

// TestCached checks the page-cache probe of the OS file: a written range
// is cached, a range that runs into never-touched parts of a sparse file
// is not, a range evicted with fadvise is not, and bad ranges are not.
func TestCached(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f")
	f, err := OS().OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cc := f.(CacheChecker)
	if err := f.Truncate(4 << 20); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(fill(3, 1<<20), 1<<20); err != nil {
		t.Fatal(err)
	}
	osf := f.(*osFile)
	if !cc.Cached(1<<20, 1<<20) {
		if osf.noCachestat.Load() {
			t.Skip("cachestat: not supported by this kernel")
		}
		t.Fatal("a range just written is not reported cached")
	}
	if !cc.Cached(1<<20+100, 5000) {
		t.Fatal("an unaligned range inside the written one is not reported cached")
	}
	for _, r := range [][2]int64{{1<<20 - 4096, 8192}, {2 << 20, 4096}, {0, 4 << 20}, {1 << 20, 0}, {-4096, 8192}} {
		if cc.Cached(r[0], r[1]) {
			t.Errorf("Cached(%d, %d) = true, want false", r[0], r[1])
		}
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := unixFadviseDontNeed(osf.fd); err != nil {
		t.Skipf("fadvise: %v", err)
	}
	if cc.Cached(1<<20, 1<<20) {
		t.Log("range still cached after fadvise(DONTNEED) (pages kept?)")
	}
}
