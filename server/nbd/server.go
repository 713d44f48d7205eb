package nbd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Server serves NBD exports. Create it with NewServer; it is safe for
// concurrent use.
type Server struct {
	opts Options // immutable after NewServer
	log  *slog.Logger
	// zeroes is a read-only buffer of zero bytes for emulating WRITE_ZEROES
	// on devices without blockdev.Zeroer. Never written.
	zeroes  []byte
	pools   bufferPools
	closing atomic.Bool // set once by Shutdown

	mu struct {
		sync.Mutex
		listeners map[net.Listener]struct{} // guarded by mu
		conns     map[*conn]struct{}        // guarded by mu
	}
	connWG sync.WaitGroup // one per connection goroutine
}

// zeroBufferBytes is the size of Server.zeroes.
const zeroBufferBytes = 1 << 20

// NewServer validates opts (after EnsureDefaults) and returns a server.
func NewServer(opts Options) (*Server, error) {
	opts.EnsureDefaults()
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	s := &Server{opts: opts, log: opts.Logger, zeroes: make([]byte, zeroBufferBytes)}
	s.mu.listeners = make(map[net.Listener]struct{})
	s.mu.conns = make(map[*conn]struct{})
	return s, nil
}

// Serve accepts connections on l until Shutdown, then returns
// ErrServerClosed. It may be called on several listeners at once. Serve
// closes l when it returns.
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	if s.closing.Load() {
		s.mu.Unlock()
		_ = l.Close()
		return ErrServerClosed
	}
	s.mu.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.mu.listeners, l)
		s.mu.Unlock()
		_ = l.Close()
	}()
	var backoff time.Duration
	for {
		nc, err := l.Accept()
		if err != nil {
			if s.closing.Load() {
				return ErrServerClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.log.Warn("nbd: accept", "err", err, "retry_in", backoff)
				time.Sleep(backoff)
				continue
			}
			return fmt.Errorf("nbd: accept: %w", err)
		}
		backoff = 0
		c := newConn(s, nc)
		s.mu.Lock()
		if s.closing.Load() {
			s.mu.Unlock()
			_ = nc.Close()
			return ErrServerClosed
		}
		s.mu.conns[c] = struct{}{}
		s.connWG.Add(1)
		s.mu.Unlock()
		go c.serve()
	}
}

// removeConn forgets c once its goroutine is done.
func (s *Server) removeConn(c *conn) {
	s.mu.Lock()
	delete(s.mu.conns, c)
	s.mu.Unlock()
	s.connWG.Done()
}

// shutdownPollInterval is how often Shutdown looks for idle connections.
const shutdownPollInterval = 5 * time.Millisecond

// Shutdown stops accepting, lets in-flight requests finish (new requests get
// ESHUTDOWN), closes each connection once it is idle and returns when all
// are gone. When ctx ends first it closes the rest forcibly and returns
// ctx.Err().
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closing.Store(true)
	for l := range s.mu.listeners {
		_ = l.Close()
	}
	s.mu.Unlock()
	t := time.NewTicker(shutdownPollInterval)
	defer t.Stop()
	for {
		s.mu.Lock()
		left := 0
		for c := range s.mu.conns {
			if c.inflight.Load() == 0 {
				c.close()
			} else {
				left++
			}
		}
		s.mu.Unlock()
		if left == 0 {
			s.connWG.Wait()
			return nil
		}
		select {
		case <-ctx.Done():
			s.mu.Lock()
			for c := range s.mu.conns {
				c.close()
			}
			s.mu.Unlock()
			s.connWG.Wait()
			return ctx.Err()
		case <-t.C:
		}
	}
}

// Connections returns how many clients are in transmission on export.
func (s *Server) Connections(export string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for c := range s.mu.conns {
		if c.attached && c.exportName == export {
			n++
		}
	}
	return n
}

// DisconnectExport forcibly ends every connection attached to the export
// (in-flight requests are cancelled and get no reply) and returns how many
// it ended. Remove the export from the ExportSource first so that clients
// cannot reattach.
func (s *Server) DisconnectExport(name string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for c := range s.mu.conns {
		if c.attached && c.exportName == name {
			c.close()
			n++
		}
	}
	return n
}

// CommandStat counts one command on one connection.
type CommandStat struct {
	Requests uint64
	Errors   uint64
	Bytes    uint64 // payload bytes of successful reads and writes
}

// ConnStat describes one connection.
type ConnStat struct {
	RemoteAddr string
	// Export is empty while the connection negotiates.
	Export            string
	TLS               bool
	StructuredReplies bool
	InflightRequests  int
	// Commands is keyed by the lower-case command name (read, write, ...).
	Commands map[string]CommandStat
}

// ConnStats returns a snapshot of every connection, in no particular order.
func (s *Server) ConnStats() []ConnStat {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]ConnStat, 0, len(s.mu.conns))
	for c := range s.mu.conns {
		out = append(out, c.statLocked())
	}
	return out
}

// lookup resolves an export name. The empty name (the NBD default export)
// means the only export when exactly one exists.
func (s *Server) lookup(name string) (Export, bool) {
	if e, ok := s.opts.Exports.Lookup(name); ok || name != "" {
		return e, ok
	}
	if all := s.opts.Exports.List(); len(all) == 1 {
		return all[0], true
	}
	return Export{}, false
}
