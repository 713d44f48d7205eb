package api

import (
	"crypto/tls"
	"io"
	"net"
	"sync"
)

// tlsRecordHandshake is the first byte of every TLS connection (a
// handshake record, RFC 8446 section 5.1).
const tlsRecordHandshake = 0x16

// plainRefusal is what a client that speaks plain HTTP from beyond
// loopback gets before the connection is closed.
const plainRefusal = "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n" +
	`{"error": "this API is HTTPS for clients beyond loopback: use https:// (the CLI does for a non-loopback --api) and trust the cluster CA (--ca-file DATA/pki/ca.crt)"}` + "\n"

// SniffTLS returns a listener whose connections speak TLS (with conf) when
// their first byte starts a TLS handshake, and plain HTTP otherwise, but
// plain only for clients plainOK accepts (loopback): everyone else gets a
// 400 that says to use https, and the connection is closed. The decision
// and the TLS handshake happen on the connection's first Read, on the
// server's goroutine for that connection, so one slow client never holds
// up Accept. Handlers see r.TLS == nil either way.
func SniffTLS(ln net.Listener, conf *tls.Config, plainOK func(remote net.Addr) bool) net.Listener {
	return &sniffListener{Listener: ln, conf: conf, plainOK: plainOK}
}

type sniffListener struct {
	net.Listener
	conf    *tls.Config
	plainOK func(net.Addr) bool
}

func (l *sniffListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &sniffConn{Conn: c, l: l}, nil
}

// sniffConn decides on its first Read whether it is TLS or plain.
type sniffConn struct {
	net.Conn
	l    *sniffListener
	once sync.Once
	// inner is what Read and Write go to after the decision: the raw
	// conn (plain) or a *tls.Conn over it. Written once under once.
	inner   net.Conn
	peeked  []byte // plain: the first byte, returned by the next Read
	failErr error
}

func (c *sniffConn) decide() {
	var first [1]byte
	if _, err := io.ReadFull(c.Conn, first[:]); err != nil {
		c.failErr = err
		return
	}
	if first[0] == tlsRecordHandshake {
		c.inner = tls.Server(&replayConn{Conn: c.Conn, first: first[0], pending: true}, c.l.conf)
		return
	}
	if !c.l.plainOK(c.Conn.RemoteAddr()) {
		_, _ = io.WriteString(c.Conn, plainRefusal)
		c.failErr = io.EOF
		return
	}
	c.inner, c.peeked = c.Conn, []byte{first[0]}
}

func (c *sniffConn) Read(p []byte) (int, error) {
	c.once.Do(c.decide)
	if c.failErr != nil {
		return 0, c.failErr
	}
	if len(c.peeked) > 0 && len(p) > 0 {
		p[0] = c.peeked[0]
		c.peeked = nil
		return 1, nil
	}
	return c.inner.Read(p)
}

func (c *sniffConn) Write(p []byte) (int, error) {
	c.once.Do(c.decide)
	if c.failErr != nil {
		return 0, c.failErr
	}
	return c.inner.Write(p)
}

func (c *sniffConn) Close() error {
	if t, ok := c.inner.(*tls.Conn); ok {
		return t.Close()
	}
	return c.Conn.Close()
}

// replayConn returns first before the rest of Conn.
type replayConn struct {
	net.Conn
	first   byte
	pending bool
}

func (c *replayConn) Read(p []byte) (int, error) {
	if c.pending && len(p) > 0 {
		p[0], c.pending = c.first, false
		return 1, nil
	}
	return c.Conn.Read(p)
}
