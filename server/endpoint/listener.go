package endpoint

import (
	"net"
	"sync"
)

// ConnListener is a net.Listener that accepts one given connection (the
// server end of a socket pair for the kernel) and then blocks until
// closed, so that the NBD engine can serve a connection it did not accept.
type ConnListener struct {
	ch     chan net.Conn
	closed chan struct{}
	once   sync.Once
}

var _ net.Listener = (*ConnListener)(nil)

// NewConnListener returns a listener whose first Accept returns c.
func NewConnListener(c net.Conn) *ConnListener {
	l := &ConnListener{ch: make(chan net.Conn, 1), closed: make(chan struct{})}
	l.ch <- c
	return l
}

// Accept returns the connection once, then net.ErrClosed after Close.
func (l *ConnListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.closed:
		return nil, net.ErrClosed
	}
}

// Close makes Accept return net.ErrClosed.
func (l *ConnListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return nil
}

// Addr names the socket pair.
func (l *ConnListener) Addr() net.Addr { return socketPairAddr{} }

type socketPairAddr struct{}

func (socketPairAddr) Network() string { return "unix" }
func (socketPairAddr) String() string  { return "socketpair" }
