package nbd

import (
	"math/bits"
	"sync"
)

// Buffer size classes: powers of two from minBufferShift to maxBufferShift.
const (
	minBufferShift = 12 // 4 KiB
	maxBufferShift = 25 // 32 MiB == MaxRequestBytes
	numBufferPools = maxBufferShift - minBufferShift + 1
)

// buffer is a pooled byte slice. Pools hold *buffer so that Put does not
// allocate.
type buffer struct {
	b []byte // len == cap == a size class
}

// bufferPools hands out buffers by size class. Safe for concurrent use.
type bufferPools struct {
	classes [numBufferPools]sync.Pool
}

// sizeClass returns the pool index for n bytes (1 <= n <= MaxRequestBytes).
func sizeClass(n int) int {
	if n <= 1<<minBufferShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minBufferShift
}

// get returns a buffer of at least n bytes (n <= MaxRequestBytes).
func (p *bufferPools) get(n int) *buffer {
	c := sizeClass(n)
	if v := p.classes[c].Get(); v != nil {
		return v.(*buffer)
	}
	return &buffer{b: make([]byte, 1<<(c+minBufferShift))}
}

// put returns b to its pool.
func (p *bufferPools) put(b *buffer) {
	c := sizeClass(len(b.b))
	if 1<<(c+minBufferShift) != len(b.b) {
		return // not one of ours; let the GC have it
	}
	p.classes[c].Put(b)
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
