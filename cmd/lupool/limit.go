package main

import (
	"net"
	"sync"
	"time"
)

// apiConnsMax bounds the API port's open connections. Operators and
// tools make a handful; forwarded calls between nodes use the peer port.
const apiConnsMax = 256

// apiIdleTimeout closes keep-alive API connections idle this long, well
// inside the CLI's 60 s request timeout, so that idle clients at the cap
// give way to new ones quickly.
const apiIdleTimeout = 15 * time.Second

// limitListener accepts at most n connections at a time: Accept waits
// while n are open. (golang.org/x/net/netutil has the same; it is not a
// dependency of this module, and this is the whole of it.)
func limitListener(ln net.Listener, n int) net.Listener {
	return &limitedListener{Listener: ln, sem: make(chan struct{}, n)}
}

type limitedListener struct {
	net.Listener
	sem chan struct{}
}

func (l *limitedListener) Accept() (net.Conn, error) {
	l.sem <- struct{}{}
	c, err := l.Listener.Accept()
	if err != nil {
		<-l.sem
		return nil, err
	}
	return &limitedConn{Conn: c, release: func() { <-l.sem }}, nil
}

type limitedConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *limitedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	return err
}
