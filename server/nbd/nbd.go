// Package nbd is lupool's NBD protocol engine: it serves any
// blockdev.Device to NBD clients (nbd-client, QEMU, libnbd tools, fio).
//
// # Lifecycle of a connection
//
// A connection negotiates in fixed newstyle (see server/nbdproto for the
// wire format): NBD_OPT_GO, INFO, EXPORT_NAME, LIST, ABORT,
// STRUCTURED_REPLY, LIST/SET_META_CONTEXT (base:allocation) and STARTTLS.
// Every option is bounded (MaxOptionBytes, MaxOptions, a handshake deadline)
// so a hostile client cannot make the server allocate without bound.
//
// In transmission a per-connection set of worker goroutines takes turns as
// the reader (leader/follower): the leader decodes and validates the next
// request, reads a write's payload into a pooled buffer, makes sure another
// worker waits to read after it, and then runs the request itself, writing
// the reply as soon as it completes, in any order, under one writer mutex
// that flushes when no other reply is queued. The next request is read
// while earlier ones run, and no goroutine hand-off sits between a request
// and its reply. On an [InlineDevice] (memory) the leader runs small reads,
// writes and flushes itself, without handing the reader role over, and
// flushes their replies together once no further request is buffered: one
// read and one write system call per burst instead of one per request.
// On a [blockdev.TryReader] (a file volume, or a mirror over one) the
// leader tries reads whose reply fits the reply writer (up to 64 KiB) the
// same way, straight into the reply buffer, without waiting for the disk
// (preadv2 with RWF_NOWAIT): data in the page cache is answered with no
// hand-off, and only a read that would wait for the disk goes to a worker,
// so a slow disk never holds back the requests behind it. Larger reads go
// to workers, where sending one reply overlaps with reading the next. A
// TryReader that is also an [InlineDevice] (a file volume: its writes go
// to the page cache) gets only its writes of whole blocks without FUA, up
// to InlineMaxBytes, run inline, straight from the reader's buffer; its
// flushes, FUA writes and partial blocks, which may wait for the disk, go
// to workers.
// On a [blockdev.AsyncWriter] (a mirror waiting for its copies) the leader
// starts small writes without FUA itself and reads on; the goroutine that
// learns a write is complete (the replication stream's reader) queues it
// for the connection's replier goroutine, which writes and flushes the
// replies of a burst together. No goroutine is parked per write in flight,
// and a client that stops reading delays only its own replies.
// On a [blockdev.AsyncReader] (the client-side endpoint, whose data comes
// from another server) the leader starts reads whose reply fits the reply
// writer the same way, into a pool buffer, and the completer answers them
// with their data. A device that is also a [blockdev.RequestFlusher] may
// hold the requests started so; the leader calls FlushRequests before it
// waits for anything, so that a burst goes on together.
// At most MaxInflightRequests requests and MaxInflightBytes
// buffer bytes are in flight per connection; when either limit is reached
// the reader stops reading, so a client that stops reading replies blocks
// only itself.
//
// # The front door
//
// At most MaxConnections connections are open at once, negotiating ones
// included (the handshake has an absolute deadline, HandshakeTimeout);
// one over the cap is reset right after accept, before any byte, since
// NBD has no message before the greeting. At most MaxConnectionsPerExport
// of them are in transmission on one export: NBD_OPT_GO over it gets
// NBD_REP_ERR_POLICY with a message, NBD_OPT_EXPORT_NAME (which has no
// error reply) a close. Refusals are counted
// (lupool_nbd_connections_refused_total) and logged at most once per ten
// seconds per kind.
//
// Memory held for a connection is bounded: negotiation uses 4 KiB
// buffers, transmission 64 KiB (reader) and 68 KiB (writer) ones, and every read, write and block
// status buffer is charged to the connection's MaxInflightBytes at its
// allocated size before it exists; an asynchronous write holds no
// engine buffer (WriteAsync returns once it no longer needs the payload),
// and an inline read is written straight into the reply buffer. Buffers of
// up to 1 MiB are pooled; larger ones are allocated at their size and
// dropped after use, so that no 32 MiB buffer outlives the burst that
// needed it. When connections end after the server allocated a fair amount
// of buffers, the server calls FreeMemory (by default a collection and
// debug.FreeOSMemory) so that the memory goes back to the OS in seconds,
// not at the runtime's next periodic collection.
//
// # Validation and errors
//
// Every request is checked before the device sees it and before any buffer
// is allocated: magic (a protocol violation, which ends only that
// connection), command, flags, length (at most MaxRequestBytes for reads and
// writes), range (overflow-safe), read-only. Device errors become NBD error
// replies through one table (errorCode) and the connection stays usable.
//
// # Block sizes
//
// NBD_INFO_BLOCK_SIZE advertises minimum 1, preferred 4096 and maximum
// MaxRequestBytes (32 MiB): devices accept any byte alignment.
package nbd

import (
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"runtime/debug"
	"sort"
	"sync"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/internal/rules"
	"github.com/lupool/lupool/server/nbdproto"
)

// Limits. The relationships between them are checked in limits_test.go.
const (
	// MaxRequestBytes is the largest READ or WRITE payload, advertised as
	// the maximum block size.
	MaxRequestBytes = 32 << 20
	// MinBlockBytes is the advertised minimum block size.
	MinBlockBytes = 1
	// PreferredBlockBytes is the advertised preferred block size: the
	// volumes' allocation unit.
	PreferredBlockBytes = rules.BlockBytes
	// MaxOptionBytes is the largest option payload the server reads. A
	// larger option gets NBD_REP_ERR_TOO_BIG and the connection is closed.
	MaxOptionBytes = 64 << 10
	// MaxOptions is how many options one connection may send before it is
	// closed (nbdinfo --list sends one NBD_OPT_INFO per export).
	MaxOptions = 4096
	// MaxBlockStatusExtents bounds the descriptors in one block status reply.
	MaxBlockStatusExtents = 8192
	// MaxNameBytes is the longest export name.
	MaxNameBytes = nbdproto.MaxStringBytes
)

// Defaults for Options, part of the same limits (see limits_test.go).
const (
	DefaultMaxInflightRequests = 128
	DefaultMaxInflightBytes    = 64 << 20
	DefaultHandshakeTimeout    = 30 * time.Second
	DefaultReplyTimeout        = 2 * time.Minute
	// DefaultMaxConnections bounds one server's connections, negotiating
	// ones included: each holds a socket, a goroutine and, in
	// transmission, up to MaxInflightBytes of buffers.
	DefaultMaxConnections = 1024
	// DefaultMaxConnectionsPerExport bounds the connections in
	// transmission on one export: far above what a multi-conn client
	// opens (nbdcopy 4, qemu and nbd-client -C a few), far below the
	// server's cap, so that one export's clients cannot take every slot.
	DefaultMaxConnectionsPerExport = 64
	// MaxConnectionsLimit is the largest MaxConnections Validate accepts.
	MaxConnectionsLimit = 1 << 20
)

// Errors.
var (
	// ErrServerClosed is returned by Serve after Shutdown was called.
	ErrServerClosed = errors.New("nbd: server closed")
	// ErrExportExists is returned by ExportSet.Add when the name is taken.
	ErrExportExists = errors.New("nbd: export exists")
	// ErrInvalidExport is returned by ExportSet.Add when the name is empty,
	// too long or not valid UTF-8, or the device is nil.
	ErrInvalidExport = errors.New("nbd: invalid export")
	// ErrInvalidOptions is returned by Options.Validate and NewServer when
	// an option is missing or out of range.
	ErrInvalidOptions = errors.New("nbd: invalid options")
)

// Export is one named device the server offers.
type Export struct {
	Name        string
	Description string
	// ID, when not empty, is the export's stable identity (for an LU: the
	// node that created it and when), sent as NBD_INFO (type
	// nbdproto.InfoLUID) to clients that ask for it, so that a client
	// that reconnects can tell the same LU from a new one of the same
	// name. At most MaxNameBytes bytes.
	ID     string
	Device blockdev.Device
}

// InlineDevice is an optional interface of a blockdev.Device whose ReadAt,
// WriteAt and Flush finish in memory, without waiting on I/O or on other
// callers for more than a moment (lu.MemVolume). The engine then runs those
// requests, up to InlineMaxBytes, on the goroutine that reads them and
// batches their replies: on such a device handing a request to another
// goroutine costs more than running it. A device whose calls may block must
// not report true, since while an inline request runs its connection reads
// nothing else.
//
// A device that is also a blockdev.TryReader promises less: only that a
// WriteAt of whole blocks (Caps.BlockSizeBytes) without FUA does not wait
// for a disk or the network (lu.FileVolume: it copies into the page cache).
// The engine then runs only those writes inline; it tries reads
// (TryReadAt) and runs flushes, FUA writes and partial blocks on workers.
type InlineDevice interface {
	blockdev.Device
	// InlineIO reports whether ReadAt, WriteAt and Flush (on a TryReader:
	// WriteAt of whole blocks without FUA) never block now. It is asked
	// for every request that may run inline, so the answer may change
	// over the device's life (a mirror that gains a remote copy); it must
	// be cheap.
	InlineIO() bool
}

// ExportSource resolves export names; safe for concurrent use. Lookup is
// also called with the Server's (and Metrics') lock held, when a
// connection starts transmission, so it must not call into the Server.
type ExportSource interface {
	Lookup(name string) (Export, bool)
	List() []Export
}

// ExportSet is a concurrency-safe ExportSource the daemon adds to and removes
// from at run time. Removing an export does not end connections already
// attached to it; see Server.DisconnectExport.
type ExportSet struct {
	mu      sync.RWMutex
	exports map[string]Export // guarded by mu
}

var _ ExportSource = (*ExportSet)(nil)

// NewExportSet returns an empty set.
func NewExportSet() *ExportSet {
	return &ExportSet{exports: make(map[string]Export)}
}

// Add adds e. It returns ErrInvalidExport for an empty or over-long name or a
// nil device and ErrExportExists when the name is taken.
func (s *ExportSet) Add(e Export) error {
	if e.Name == "" || len(e.Name) > MaxNameBytes || e.Device == nil {
		return fmt.Errorf("%w: %q", ErrInvalidExport, e.Name)
	}
	if len(e.Description) > nbdproto.MaxStringBytes {
		return fmt.Errorf("%w: description of %q too long", ErrInvalidExport, e.Name)
	}
	if len(e.ID) > MaxNameBytes {
		return fmt.Errorf("%w: id of %q too long", ErrInvalidExport, e.Name)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.exports[e.Name]; ok {
		return fmt.Errorf("%w: %q", ErrExportExists, e.Name)
	}
	s.exports[e.Name] = e
	return nil
}

// Remove removes the export and reports whether it existed.
func (s *ExportSet) Remove(name string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.exports[name]
	delete(s.exports, name)
	return ok
}

// Lookup returns the export called name.
func (s *ExportSet) Lookup(name string) (Export, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	e, ok := s.exports[name]
	return e, ok
}

// List returns every export sorted by name.
func (s *ExportSet) List() []Export {
	s.mu.RLock()
	out := make([]Export, 0, len(s.exports))
	for _, e := range s.exports {
		out = append(out, e)
	}
	s.mu.RUnlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// TLSMode says whether connections use TLS.
type TLSMode int

// TLS modes.
const (
	// TLSOff refuses NBD_OPT_STARTTLS.
	TLSOff TLSMode = iota
	// TLSOptional serves clients with and without TLS.
	TLSOptional
	// TLSRequired answers every option but STARTTLS and ABORT with
	// NBD_REP_ERR_TLS_REQD until TLS is up.
	TLSRequired
)

// Options configure a Server.
type Options struct {
	Exports   ExportSource // required
	Logger    *slog.Logger // default: discard
	TLSConfig *tls.Config  // required unless TLSMode == TLSOff
	TLSMode   TLSMode
	// MaxInflightRequests bounds requests in flight per connection; default 128.
	MaxInflightRequests int
	// MaxInflightBytes bounds the buffer bytes of requests in flight per
	// connection (reads, writes and block status, each counted at the size
	// of the buffer it gets: a power of two up to 1 MiB, its length above);
	// default 64 MiB. Once it is reached the connection is not read until
	// replies go out, so a client that does not read its replies holds at
	// most this much. A single request larger than this still runs, alone.
	MaxInflightBytes int64
	// Metrics is optional; nil means no metrics.
	Metrics *Metrics
	// OnDeviceError, when set, is called after an export's device failed a
	// request (an I/O error of the volume behind it; not a request the
	// server refused, nor one cut short by a closing connection). It runs
	// on the request's goroutine and must not block.
	OnDeviceError func(export, command string, err error)
	// HandshakeTimeout bounds negotiation (including TLS); default 30 s.
	HandshakeTimeout time.Duration
	// ReplyTimeout bounds how long writing replies may block on a client
	// that does not read them before the connection is dropped; default
	// 2 min.
	ReplyTimeout time.Duration
	// MaxConnections bounds the server's connections, those still
	// negotiating included. A connection over it is closed right after
	// accept, before any byte is sent (NBD has no way to say why before
	// the greeting), logged (at most once per 10 s) and
	// counted in lupool_nbd_connections_refused_total{reason="server_limit"}.
	// Default DefaultMaxConnections; at most MaxConnectionsLimit.
	MaxConnections int
	// MaxConnectionsPerExport bounds the connections in transmission on
	// one export. NBD_OPT_GO over it gets NBD_REP_ERR_POLICY with a
	// message naming the limit (the client shows it and may try another
	// option); NBD_OPT_EXPORT_NAME, which has no error reply, gets the
	// connection closed. Both are logged and counted (reason
	// "export_limit"). Default the smaller of
	// DefaultMaxConnectionsPerExport and MaxConnections; at most
	// MaxConnections.
	MaxConnectionsPerExport int
	// FreeMemory is called, on a goroutine of its own and at most once per
	// 10 s, a second after connections ended once the server has allocated
	// 64 MiB of buffers since the last call: it should give the memory of
	// the buffers those connections held back to the operating system. It
	// is not called after Shutdown. Default: two garbage collections (the
	// first empties the buffer pools into their victim caches, the second
	// frees them) and debug.FreeOSMemory. Without it the Go runtime keeps
	// that memory until its next periodic collection, minutes later.
	FreeMemory func()
}

// EnsureDefaults fills zero fields with defaults.
func (o *Options) EnsureDefaults() {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.MaxInflightRequests == 0 {
		// Enough for fio/qemu queue depths of 32-128 on one connection.
		o.MaxInflightRequests = DefaultMaxInflightRequests
	}
	if o.MaxInflightBytes == 0 {
		// Two maximum-size requests, or 16k of 4 KiB ones.
		o.MaxInflightBytes = DefaultMaxInflightBytes
	}
	if o.HandshakeTimeout == 0 {
		// Long enough for a slow TLS handshake, short enough to drop
		// idle half-open clients.
		o.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if o.ReplyTimeout == 0 {
		o.ReplyTimeout = DefaultReplyTimeout
	}
	if o.MaxConnections == 0 {
		o.MaxConnections = DefaultMaxConnections
	}
	if o.MaxConnectionsPerExport == 0 {
		o.MaxConnectionsPerExport = min(DefaultMaxConnectionsPerExport, max(o.MaxConnections, 1))
	}
	if o.FreeMemory == nil {
		o.FreeMemory = freeOSMemory
	}
}

// freeOSMemory is the default Options.FreeMemory.
func freeOSMemory() {
	// A sync.Pool keeps what it held before a collection in a victim cache
	// until the next one: the first collection moves pooled buffers
	// there, FreeOSMemory's collection frees them and returns the pages.
	runtime.GC()
	debug.FreeOSMemory()
}

// Validate checks the options after EnsureDefaults.
func (o *Options) Validate() error {
	switch {
	case o.Exports == nil:
		return fmt.Errorf("%w: Exports is required", ErrInvalidOptions)
	case o.TLSMode < TLSOff || o.TLSMode > TLSRequired:
		return fmt.Errorf("%w: unknown TLSMode %d", ErrInvalidOptions, o.TLSMode)
	case o.TLSMode != TLSOff && o.TLSConfig == nil:
		return fmt.Errorf("%w: TLSConfig is required with TLS", ErrInvalidOptions)
	case o.MaxInflightRequests < 1 || o.MaxInflightRequests > 1<<16:
		return fmt.Errorf("%w: MaxInflightRequests %d not in [1, 65536]", ErrInvalidOptions, o.MaxInflightRequests)
	case o.MaxInflightBytes < 1:
		return fmt.Errorf("%w: MaxInflightBytes %d < 1", ErrInvalidOptions, o.MaxInflightBytes)
	case o.HandshakeTimeout < 0 || o.ReplyTimeout < 0:
		return fmt.Errorf("%w: negative timeout", ErrInvalidOptions)
	case o.MaxConnections < 1 || o.MaxConnections > MaxConnectionsLimit:
		return fmt.Errorf("%w: MaxConnections %d not in [1, %d]", ErrInvalidOptions, o.MaxConnections, MaxConnectionsLimit)
	case o.MaxConnectionsPerExport < 1 || o.MaxConnectionsPerExport > o.MaxConnections:
		return fmt.Errorf("%w: MaxConnectionsPerExport %d not in [1, MaxConnections %d]",
			ErrInvalidOptions, o.MaxConnectionsPerExport, o.MaxConnections)
	}
	return nil
}
