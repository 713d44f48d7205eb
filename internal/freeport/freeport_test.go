package freeport

import (
	"net"
	"strconv"
	"testing"
)

func TestAddrsAreDistinctFreeAndBelowEphemeral(t *testing.T) {
	p := New()
	seen := map[string]bool{}
	for range 200 {
		a, err := p.Addr()
		if err != nil {
			t.Fatal(err)
		}
		if seen[a] {
			t.Fatalf("address %s handed out twice", a)
		}
		seen[a] = true
		_, portStr, _ := net.SplitHostPort(a)
		l, err := net.Listen("tcp", a)
		if err != nil {
			t.Fatalf("handed-out address %s is not free: %v", a, err)
		}
		l.Close()
		if p.hi >= p.lo {
			port := l.Addr().(*net.TCPAddr).Port
			if port < p.lo || port > p.hi {
				t.Fatalf("port %s outside %d..%d", portStr, p.lo, p.hi)
			}
		}
	}
}

func TestBusyPortIsSkipped(t *testing.T) {
	p := New()
	if p.hi < p.lo {
		t.Skip("no range below the ephemeral ports here")
	}
	// Occupy every candidate but a few and check that only free ones come back.
	p.lo, p.hi = 20000, 20009
	var held []net.Listener
	for port := 20000; port <= 20007; port++ {
		l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err != nil {
			t.Skipf("port %d busy on this machine: %v", port, err)
		}
		held = append(held, l)
	}
	defer func() {
		for _, l := range held {
			l.Close()
		}
	}()
	got := map[string]bool{}
	for range 2 {
		a, err := p.Addr()
		if err != nil {
			t.Fatal(err)
		}
		got[a] = true
	}
	if !got["127.0.0.1:20008"] || !got["127.0.0.1:20009"] {
		t.Fatalf("got %v, want the two free ports 20008 and 20009", got)
	}
	if _, err := p.Addr(); err == nil {
		t.Fatal("a third address from a range with none left: want an error")
	}
}
