package bufpool

import (
	"testing"
)

func TestGetPut(t *testing.T) {
	var p Pool
	if b := p.Get(0); b != nil {
		t.Fatalf("Get(0) = %d bytes, want nil", len(b))
	}
	for _, n := range []int{1, 3, 4096, 4097, 1 << 20, 32 << 20} {
		b := p.Get(n)
		if len(b) != n {
			t.Fatalf("Get(%d): length %d", n, len(b))
		}
		if c := cap(b); c < n || c&(c-1) != 0 {
			t.Fatalf("Get(%d): capacity %d, want a power of two >= n", n, c)
		}
		p.Put(b)
	}
	// Past the largest class: exact, and not kept.
	big := p.Get(32<<20 + 1)
	if len(big) != 32<<20+1 || cap(big) != 32<<20+1 {
		t.Fatalf("Get(32 MiB + 1): length %d capacity %d", len(big), cap(big))
	}
	p.Put(big)
	// A buffer not from Get is not kept.
	p.Put(make([]byte, 100))
	if b := p.Get(100); cap(b) != 128 {
		t.Fatalf("Get(100) after Put of a 100-byte buffer: capacity %d, want 128", cap(b))
	}
}

// TestNoAllocations: a warm Get and Put pair allocates nothing.
func TestNoAllocations(t *testing.T) {
	if raceEnabled {
		t.Skip("sync.Pool drops items on purpose under the race detector; make test runs this test without -race")
	}
	var p Pool
	p.Put(p.Get(4096))
	if n := testing.AllocsPerRun(1000, func() { p.Put(p.Get(4096)) }); n != 0 {
		t.Fatalf("%.2f allocations per Get and Put, want 0", n)
	}
}
