package peerlink

import (
	"bufio"
	"crypto/tls"
	"net"
	"sync"
)

// Buffer sizes under TLS. Go's TLS writes each record (at most 16 KiB of
// payload) with its own system call and reads about one record per call;
// a replication stream hands over a batch of many frames in one Write and
// reads through a 256 KiB buffer, so without these the batching of the
// layers above would be lost on the wire (measured: 1.85x the write calls
// and 1.4x the read calls per byte of the plain-TCP stream).
const (
	rawReadBufferBytes  = 256 << 10
	rawWriteBufferBytes = 256 << 10
)

// bufferedRaw is the TCP connection under a tls.Conn: writes collect in a
// buffer that the connection above flushes once per Write (flushingConn),
// and before every read (so the handshake's and TLS's own messages, such
// as alerts and tickets, never wait behind a read); reads come through a
// large buffer. The tls.Conn serialises its writes and its reads; mu
// orders a flush from the reading side against the writing side.
type bufferedRaw struct {
	net.Conn
	br *bufio.Reader // used by the tls.Conn's reader only
	mu sync.Mutex
	bw *bufio.Writer // guarded by mu
}

func newBufferedRaw(c net.Conn) *bufferedRaw {
	return &bufferedRaw{Conn: c, br: bufio.NewReaderSize(c, rawReadBufferBytes), bw: bufio.NewWriterSize(c, rawWriteBufferBytes)}
}

func (b *bufferedRaw) Read(p []byte) (int, error) {
	if err := b.flush(); err != nil {
		return 0, err
	}
	return b.br.Read(p)
}

func (b *bufferedRaw) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.bw.Write(p)
}

// pending returns the bytes received and not yet read by TLS. Call it
// from the connection's reading goroutine only.
func (b *bufferedRaw) pending() int { return b.br.Buffered() }

// flush writes out what is buffered.
func (b *bufferedRaw) flush() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.bw.Buffered() == 0 {
		return nil
	}
	return b.bw.Flush()
}

// Close flushes (a close_notify alert) and closes the TCP connection.
func (b *bufferedRaw) Close() error {
	_ = b.flush()
	return b.Conn.Close()
}

// flushingConn is a tls.Conn over a bufferedRaw whose Write flushes once
// at its end: one system call for a whole batch of records.
type flushingConn struct {
	*tls.Conn
	raw *bufferedRaw
}

func newFlushingConn(tc *tls.Conn, raw *bufferedRaw) *flushingConn {
	return &flushingConn{Conn: tc, raw: raw}
}

func (c *flushingConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	if ferr := c.raw.flush(); err == nil {
		err = ferr
	}
	return n, err
}

// CloseWrite sends close_notify and flushes it.
func (c *flushingConn) CloseWrite() error {
	err := c.Conn.CloseWrite()
	if ferr := c.raw.flush(); err == nil {
		err = ferr
	}
	return err
}

// Pending is Conn.Pending for a dialed connection.
func (c *flushingConn) Pending() int { return c.raw.pending() }

// NetConn returns the tls.Conn (for ConnectionState and the like).
func (c *flushingConn) NetConn() net.Conn { return c.Conn }
