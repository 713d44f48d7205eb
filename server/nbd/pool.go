package nbd

import (
	"math/bits"
	"sync"
	"sync/atomic"
)

// Buffer size classes: powers of two from minBufferShift to maxPooledShift
// are pooled. Larger buffers (up to MaxRequestBytes) are allocated at their
// exact size and dropped after use: a sync.Pool keeps what it is given until
// two garbage collections have passed, and a few pooled 32 MiB buffers of
// a burst of large reads would otherwise stay in the heap long after the
// clients that needed them are gone.
const (
	minBufferShift = 12 // 4 KiB
	maxPooledShift = 20 // 1 MiB
	numBufferPools = maxPooledShift - minBufferShift + 1
	// maxPooledBytes is the largest buffer that is pooled.
	maxPooledBytes = 1 << maxPooledShift
)

// buffer is a byte slice, pooled when small. Pools hold *buffer so that Put
// does not allocate.
type buffer struct {
	b []byte // len == cap: a size class, or the exact size above maxPooledBytes
}

// bufferPools hands out buffers by size class. Safe for concurrent use.
type bufferPools struct {
	classes [numBufferPools]sync.Pool
	// allocatedBytes counts the bytes of buffers allocated (not taken from
	// a pool); the server reads and resets it to decide when to give
	// memory back (Options.FreeMemory).
	allocatedBytes atomic.Int64
}

// sizeClass returns the pool index for n bytes (1 <= n <= maxPooledBytes).
func sizeClass(n int) int {
	if n <= 1<<minBufferShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minBufferShift
}

// bufferBytes is the size of the buffer get(n) returns (1 <= n <=
// MaxRequestBytes): what a request of n bytes is charged in the byte budget.
func bufferBytes(n int) int {
	if n > maxPooledBytes {
		return n
	}
	return 1 << (sizeClass(n) + minBufferShift)
}

// get returns a buffer of bufferBytes(n) bytes (1 <= n <= MaxRequestBytes).
func (p *bufferPools) get(n int) *buffer {
	size := bufferBytes(n)
	if size <= maxPooledBytes {
		if v := p.classes[sizeClass(size)].Get(); v != nil {
			return v.(*buffer)
		}
	}
	p.allocatedBytes.Add(int64(size))
	return &buffer{b: make([]byte, size)}
}

// put returns b to its pool, or drops it when it is not of a pooled size.
// b must not be used afterwards.
func (p *bufferPools) put(b *buffer) {
	n := len(b.b)
	if n > maxPooledBytes || 1<<(sizeClass(n)+minBufferShift) != n {
		b.b = nil // not pooled: let the GC have it now
		return
	}
	p.classes[sizeClass(n)].Put(b)
}

// byteBudget bounds payload bytes in flight on one connection.
type byteBudget struct {
	max  int64
	mu   sync.Mutex
	cond sync.Cond
	used int64 // guarded by mu
}

func (b *byteBudget) init(max int64) {
	b.max = max
	b.cond.L = &b.mu
}

// acquire waits until n more bytes fit. A request larger than max runs when
// nothing else is in flight.
func (b *byteBudget) acquire(n int64) {
	if n == 0 {
		return
	}
	b.mu.Lock()
	for b.used > 0 && b.used+n > b.max {
		b.cond.Wait()
	}
	b.used += n
	b.mu.Unlock()
}

// tryAcquire is acquire without waiting: false if n bytes do not fit now.
func (b *byteBudget) tryAcquire(n int64) bool {
	if n == 0 {
		return true
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.used > 0 && b.used+n > b.max {
		return false
	}
	b.used += n
	return true
}

// release returns n bytes.
func (b *byteBudget) release(n int64) {
	if n == 0 {
		return
	}
	b.mu.Lock()
	b.used -= n
	if b.used < 0 {
		b.mu.Unlock()
		panic("nbd: byte budget released more than acquired")
	}
	b.mu.Unlock()
	b.cond.Broadcast()
}
