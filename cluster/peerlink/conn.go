package peerlink

import (
	"crypto/tls"
	"github.com/lupool/lupool/cluster/pki"
	"net"
	"sync/atomic"
	"time"
)

// Conn is a connection accepted on the peer port, after its TLS handshake,
// with its first byte peeked and still to be read. It is safe for
// concurrent use like any net.Conn (one reader and one writer at a time
// keep the byte order meaningful).
type Conn struct {
	tc     *tls.Conn    // immutable; never nil for accepted conns
	raw    *bufferedRaw // immutable; the buffered TCP connection under tc
	peerID string       // immutable; the verified node id of the peer
	// certSHA256 is the peer certificate's fingerprint (pki.Fingerprint).
	// Immutable.
	certSHA256 string
	first      byte        // immutable; the peeked byte
	peeked     atomic.Bool // true while first has not been read
}

var _ net.Conn = (*Conn)(nil)

func newConn(tc *tls.Conn, raw *bufferedRaw, peerID string, first byte) *Conn {
	c := &Conn{tc: tc, raw: raw, peerID: peerID, first: first}
	c.peeked.Store(true)
	if tc == nil {
		return c // tests of the peeked byte
	}
	if cs := tc.ConnectionState(); len(cs.PeerCertificates) > 0 {
		c.certSHA256 = pki.Fingerprint(cs.PeerCertificates[0].Raw)
	}
	return c
}

// Read replays the peeked first byte, then reads from the TLS connection.
// It does not allocate.
func (c *Conn) Read(p []byte) (int, error) {
	if c.peeked.Load() {
		if len(p) == 0 {
			return 0, nil
		}
		if c.peeked.CompareAndSwap(true, false) {
			p[0] = c.first
			return 1, nil
		}
	}
	return c.tc.Read(p)
}

// Write writes to the TLS connection, with one system call for all the
// records of p.
func (c *Conn) Write(p []byte) (int, error) {
	n, err := c.tc.Write(p)
	if ferr := c.raw.flush(); err == nil {
		err = ferr
	}
	return n, err
}

// Close closes the TLS connection (sending close_notify, bounded by Go to
// 5 seconds).
func (c *Conn) Close() error { return c.tc.Close() }

// Pending returns how many bytes have arrived that TLS has not decrypted
// yet: more than zero means more records are on their way (a peer sends a
// batch in one write), so a reader that answers in batches can hold its
// answers a moment longer. Call it from the reading goroutine only.
func (c *Conn) Pending() int {
	if c.raw == nil {
		return 0
	}
	return c.raw.pending()
}

// CloseWrite shuts down the writing side (tls.Conn.CloseWrite).
func (c *Conn) CloseWrite() error {
	err := c.tc.CloseWrite()
	if ferr := c.raw.flush(); err == nil {
		err = ferr
	}
	return err
}

// LocalAddr returns the local network address.
func (c *Conn) LocalAddr() net.Addr { return c.tc.LocalAddr() }

// RemoteAddr returns the peer's network address.
func (c *Conn) RemoteAddr() net.Addr { return c.tc.RemoteAddr() }

// SetDeadline sets the read and write deadlines.
func (c *Conn) SetDeadline(t time.Time) error { return c.tc.SetDeadline(t) }

// SetReadDeadline sets the read deadline.
func (c *Conn) SetReadDeadline(t time.Time) error { return c.tc.SetReadDeadline(t) }

// SetWriteDeadline sets the write deadline.
func (c *Conn) SetWriteDeadline(t time.Time) error { return c.tc.SetWriteDeadline(t) }

// PeerID returns the node id from the peer's certificate, verified against
// the cluster CA during the handshake.
func (c *Conn) PeerID() string { return c.peerID }

// ConnectionState returns the TLS state of the connection.
func (c *Conn) ConnectionState() tls.ConnectionState { return c.tc.ConnectionState() }

// NetConn returns the underlying *tls.Conn. Reading from it directly skips
// the peeked byte if it was not read yet.
func (c *Conn) NetConn() net.Conn { return c.tc }
