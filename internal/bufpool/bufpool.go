// Package bufpool recycles byte buffers by power-of-two size class, for
// the request paths that must not allocate per request (the replication
// stream, the client-side endpoint).
//
// It is sync.Pool with two details that matter on a 4 KiB hot path:
// sync.Pool holds pointers, so a buffer goes in as a *[]byte; and the
// *[]byte holders that Get empties are kept and refilled by the next Put,
// so that a Get and Put pair allocates nothing once the pool is warm (a
// fresh holder per Put would be one allocation per request).
package bufpool

import "sync"

// classesMax bounds the size classes: 1 B to 32 MiB.
const classesMax = 26

// Pool recycles buffers. The zero value is ready to use; it is safe for
// concurrent use.
type Pool struct {
	classes [classesMax]sync.Pool
	holders sync.Pool
}

func sizeClass(n int) int {
	c := 0
	for 1<<c < n {
		c++
	}
	return c
}

// Get returns a buffer of length n (nil for 0). Its capacity is n rounded
// up to a power of two; past 32 MiB it is a fresh buffer of exactly n.
func (p *Pool) Get(n int) []byte {
	if n <= 0 {
		return nil
	}
	c := sizeClass(n)
	if c >= classesMax {
		return make([]byte, n)
	}
	if h, ok := p.classes[c].Get().(*[]byte); ok {
		b := (*h)[:n]
		*h = nil
		p.holders.Put(h)
		return b
	}
	return make([]byte, n, 1<<c)
}

// Put gives b back for a later Get. Buffers whose capacity is not a power
// of two (not from Get) are left to the garbage collector. The caller must
// not use b afterwards.
func (p *Pool) Put(b []byte) {
	if cap(b) == 0 {
		return
	}
	c := sizeClass(cap(b))
	if 1<<c != cap(b) || c >= classesMax {
		return
	}
	h, _ := p.holders.Get().(*[]byte)
	if h == nil {
		h = new([]byte)
	}
	*h = b[:cap(b)]
	p.classes[c].Put(h)
}
