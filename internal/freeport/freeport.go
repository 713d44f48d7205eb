// Package freeport hands out loopback TCP addresses for tests and
// benchmarks that must name an address to a child process before the child
// listens on it.
//
// Asking the kernel for port 0 and closing the listener is not enough: the
// kernel hands the same ephemeral port out again, to the next such request
// or to an outgoing connection (a raft peer dialling out, say), and the
// child then fails with "address already in use". A Picker therefore takes
// ports from below the kernel's ephemeral range, where neither happens,
// never hands out a port twice, and checks that each is free right now.
package freeport

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
)

// Picker hands out distinct free loopback ports. The zero value is not
// usable; call New.
type Picker struct {
	mu     sync.Mutex
	used   map[int]bool
	lo, hi int // candidate range, inclusive
}

// New returns a Picker whose ports lie below the ephemeral port range read
// from /proc (32768 when that cannot be read).
func New() *Picker {
	ephemeralLow := 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if n, err := strconv.Atoi(f[0]); err == nil {
				ephemeralLow = n
			}
		}
	}
	// From 11000: lupool's default ports (10809-10811) stay free for the
	// test that runs the README's commands with the defaults.
	p := &Picker{used: make(map[int]bool), lo: 11000, hi: ephemeralLow - 1}
	if p.hi-p.lo < 1000 { // an unusual range: fall back to the ephemeral one
		p.lo, p.hi = 0, -1
	}
	return p
}

// Addr returns "127.0.0.1:PORT" for a port that was free a moment ago and
// that this Picker has not returned before.
func (p *Picker) Addr() (string, error) {
	port, err := p.Port()
	if err != nil {
		return "", err
	}
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), nil
}

// Port is Addr's port number alone.
func (p *Picker) Port() (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for range 1000 {
		port := 0
		if p.hi >= p.lo {
			port = p.lo + rand.IntN(p.hi-p.lo+1)
			if p.used[port] {
				continue
			}
		}
		l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err != nil {
			continue
		}
		got := l.Addr().(*net.TCPAddr).Port
		l.Close()
		if p.used[got] {
			continue
		}
		p.used[got] = true
		return got, nil
	}
	return 0, fmt.Errorf("freeport: no free loopback port found in %d..%d", p.lo, p.hi)
}
