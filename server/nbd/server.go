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
	// shedding is set while the server sends its clients elsewhere (Shed).
	shedding atomic.Bool

	// Refusals are logged through these, at most once per
	// refusalLogInterval each, so that a flood does not flood the log.
	refusedServerLog logLimiter
	refusedExportLog logLimiter

	mu struct {
		sync.Mutex
		listeners map[net.Listener]struct{} // guarded by mu
		// conns holds every accepted connection until its goroutine is
		// done, negotiating ones included; its size is checked against
		// MaxConnections under mu, in the same critical section as the
		// insert. Guarded by mu.
		conns map[*conn]struct{}
		// exportConns counts the connections holding a place on each
		// export (reserveExport), by export name; no zero entries.
		// Guarded by mu.
		exportConns map[string]int
	}
	connWG sync.WaitGroup // one per connection goroutine

	// free schedules Options.FreeMemory (maybeFreeMemory).
	free struct {
		sync.Mutex
		timer   *time.Timer // pending call, or nil; guarded by free
		last    time.Time   // when the last call started; guarded by free
		stopped bool        // set by Shutdown: no more calls; guarded by free
		// stragglers counts connections that were open when a call gave
		// back a wave's buffers: they may hold buffers of that wave, so
		// each of their ends schedules a call too. Guarded by free.
		stragglers int
	}
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
	s.mu.exportConns = make(map[string]int)
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
		if s.shedding.Load() {
			_ = nc.Close() // sent elsewhere: this node does not serve now
			continue
		}
		s.mu.Lock()
		if s.closing.Load() {
			s.mu.Unlock()
			_ = nc.Close()
			return ErrServerClosed
		}
		if len(s.mu.conns) >= s.opts.MaxConnections {
			s.mu.Unlock()
			s.refuseConn(nc)
			continue
		}
		c := newConn(s, nc)
		s.mu.conns[c] = struct{}{}
		s.connWG.Add(1)
		s.mu.Unlock()
		if m := s.opts.Metrics; m != nil {
			m.open.Inc()
		}
		go c.serve()
	}
}

// refusalLogInterval is the shortest time between two log lines about the
// same kind of refused connection.
const refusalLogInterval = 10 * time.Second

// refuseConn closes a connection the server has no room for, before any
// byte is sent, and counts and logs it.
func (s *Server) refuseConn(nc net.Conn) {
	// Counted and logged before the close, so that a client that sees
	// the refusal also finds it in the metrics.
	if m := s.opts.Metrics; m != nil {
		m.refusedServer.Inc()
	}
	if ok, unlogged := s.refusedServerLog.allow(time.Now()); ok {
		s.log.Warn("nbd: connection refused: the server is at its connection limit",
			"remote", nc.RemoteAddr().String(), "limit", s.opts.MaxConnections, "refused_unlogged", unlogged)
	}
	if tc, ok := nc.(*net.TCPConn); ok {
		// Reset rather than close: under a flood, no TIME_WAIT socket per
		// refused connection is left behind on the server.
		_ = tc.SetLinger(0)
	}
	_ = nc.Close()
}

// reserveExport takes one of export's MaxConnectionsPerExport places for c
// (checked and taken under s.mu, so concurrent negotiations cannot both
// take the last one) and reports false when none is left. The place is
// given back by removeConn. At most once per connection: negotiation ends
// with it.
func (s *Server) reserveExport(c *conn, export string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if c.reserved {
		return c.reservedExport == export
	}
	n := s.mu.exportConns[export]
	if n >= s.opts.MaxConnectionsPerExport {
		return false
	}
	s.mu.exportConns[export] = n + 1
	c.reserved, c.reservedExport = true, export
	return true
}

// refuseExport counts and logs a connection refused on export because the
// export is at its connection limit.
func (s *Server) refuseExport(remote, export, option string) {
	if m := s.opts.Metrics; m != nil {
		m.refusedExport.Inc()
	}
	if ok, unlogged := s.refusedExportLog.allow(time.Now()); ok {
		s.log.Warn("nbd: connection refused: the export is at its connection limit",
			"remote", remote, "export", export, "option", option,
			"limit", s.opts.MaxConnectionsPerExport, "refused_unlogged", unlogged)
	}
}

// removeConn forgets c once its goroutine is done.
func (s *Server) removeConn(c *conn) {
	s.mu.Lock()
	delete(s.mu.conns, c)
	if c.reserved {
		if n := s.mu.exportConns[c.reservedExport] - 1; n > 0 {
			s.mu.exportConns[c.reservedExport] = n
		} else {
			delete(s.mu.exportConns, c.reservedExport)
		}
		c.reserved = false
	}
	s.mu.Unlock()
	if m := s.opts.Metrics; m != nil {
		m.open.Dec()
	}
	s.maybeFreeMemory()
	s.connWG.Done()
}

// When connections end, their buffers are garbage, but the Go runtime
// frees them only at its next collection, which an idle daemon runs every
// two minutes, and returns the pages to the OS later still. So once
// freeMemoryMinBytes of buffers were allocated since the last call, a
// connection's end schedules Options.FreeMemory freeMemoryDelay later (a
// wave of closing connections makes one call, after their goroutines have
// gone), and at most once per freeMemoryInterval (a full collection is
// not free).
const (
	freeMemoryMinBytes = 2 * MaxRequestBytes
	freeMemoryDelay    = time.Second
	freeMemoryInterval = 10 * time.Second
)

// maybeFreeMemory schedules Options.FreeMemory (see freeMemoryMinBytes).
func (s *Server) maybeFreeMemory() {
	s.free.Lock()
	defer s.free.Unlock()
	if s.pools.allocatedBytes.Load() < freeMemoryMinBytes {
		if s.free.stragglers == 0 {
			return
		}
		s.free.stragglers--
	}
	if s.free.timer != nil || s.free.stopped {
		return
	}
	wait := max(freeMemoryDelay, time.Until(s.free.last.Add(freeMemoryInterval)))
	s.free.timer = time.AfterFunc(wait, s.freeMemory)
}

// freeMemory runs Options.FreeMemory from the timer maybeFreeMemory set.
func (s *Server) freeMemory() {
	s.free.Lock()
	if s.free.stopped {
		s.free.Unlock()
		return
	}
	s.free.timer, s.free.last = nil, time.Now()
	allocated := s.pools.allocatedBytes.Swap(0)
	s.free.Unlock()
	s.log.Debug("nbd: giving buffer memory back to the OS", "allocated_since_last_bytes", allocated)
	s.opts.FreeMemory()
	if allocated >= freeMemoryMinBytes {
		s.mu.Lock()
		open := len(s.mu.conns)
		s.mu.Unlock()
		s.free.Lock()
		s.free.stragglers = open
		s.free.Unlock()
	}
}

// stopFreeMemory cancels a pending FreeMemory call and prevents new ones.
func (s *Server) stopFreeMemory() {
	s.free.Lock()
	defer s.free.Unlock()
	s.free.stopped = true
	if s.free.timer != nil {
		s.free.timer.Stop()
		s.free.timer = nil
	}
}

// logLimiter lets one event through per refusalLogInterval and counts the
// others. Safe for concurrent use.
type logLimiter struct {
	mu       sync.Mutex
	next     time.Time // guarded by mu; no event is let through before it
	unlogged int       // guarded by mu; events held back since the last let through
}

// allow reports whether an event at now may be logged and, if so, how many
// were held back since the last one that was.
func (l *logLimiter) allow(now time.Time) (bool, int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if now.Before(l.next) {
		l.unlogged++
		return false, 0
	}
	n := l.unlogged
	l.next, l.unlogged = now.Add(refusalLogInterval), 0
	return true, n
}

// shedGrace is how long Shed lets a connection with requests in flight
// finish them before it closes the connection anyway.
const shedGrace = time.Second

// Shed sends the server's clients elsewhere while on (the daemon: this
// node lost the metadata majority): every new request is answered
// ESHUTDOWN, new connections are closed at once, idle connections are
// closed, and a connection still busy after shedGrace is closed too (a
// client that replays unanswered requests, such as lupool attach, sends
// them to another node). Off serves again. Shutdown ends shedding.
func (s *Server) Shed(on bool) {
	if s.shedding.Swap(on) == on || !on {
		return
	}
	s.log.Warn("nbd: sending every client elsewhere (ESHUTDOWN) until this node serves again")
	go func() {
		start := time.Now()
		t := time.NewTicker(10 * shutdownPollInterval)
		defer t.Stop()
		for s.shedding.Load() && !s.closing.Load() {
			late := time.Since(start) > shedGrace
			s.mu.Lock()
			for c := range s.mu.conns {
				if late || c.inflight.Load() == 0 {
					c.close()
				}
			}
			s.mu.Unlock()
			<-t.C
		}
	}()
}

// Shedding reports whether Shed is on.
func (s *Server) Shedding() bool { return s.shedding.Load() }

// shutdownPollInterval is how often Shutdown looks for idle connections.
const shutdownPollInterval = 5 * time.Millisecond

// Shutdown stops accepting, lets in-flight requests finish (new requests get
// ESHUTDOWN), closes each connection once it is idle and returns when all
// are gone. When ctx ends first it closes the rest forcibly and returns
// ctx.Err().
func (s *Server) Shutdown(ctx context.Context) error {
	s.stopFreeMemory()
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
