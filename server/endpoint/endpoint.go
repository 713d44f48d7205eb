// Package endpoint is the client side of `lupool attach`: a
// blockdev.Device that forwards every call to an LU on the pool over one
// upstream NBD connection and rides over the loss of that connection.
// Served by the project's NBD engine (server/nbd) on a local address, it is
// what local consumers (QEMU, nbd-client, fio, the kernel through a socket
// pair) connect to; they see a pause when a node restarts or dies, never an
// error or a disconnect.
//
// # The replay table
//
// Every call gets a handle and sits in the replay table, with its data (a
// write's payload, a read's destination), until its reply arrives. The
// table is bounded (Options.MaxReplayRequests, Options.MaxReplayBytes): a
// call waits for room before it is sent.
//
//	caller ─► table[handle] ─► upstream.send        (while connected)
//	caller ─► table[handle]                         (while reconnecting: held)
//	reader ◄─ reply(handle) ─► table.delete, caller woken
//
// Requests go out by combining (the caller that finds no write under way
// writes everything queued, with one writev); a write's payload is sent by
// reference, since the table holds it anyway. Writes of up to the engine's
// inline size and reads of up to nbd.TryReadMaxBytes come as
// blockdev.AsyncWriter and blockdev.AsyncReader calls: the engine's reader
// starts them and reads on, and the reply reader answers them itself (a
// read's data goes straight into the engine's buffer; a write's payload is
// copied, as the engine reuses its buffer), so that no goroutine waits for
// a request in between. Asynchronous requests are held until the engine's
// reader is about to wait (blockdev.RequestFlusher), so that a burst of the
// local client goes upstream in one writev.
//
// # Reconnecting
//
// When the upstream connection breaks, when its oldest unanswered request
// is older than Options.ReplyTimeout, or when the server answers
// NBD_ESHUTDOWN (it is stopping: the requests it took before finish, the
// later ones are refused), the endpoint stops sending, drains what the old
// server still answers, and then connects to the preferred live node
// (Options.Prefer, the local host's), else any other node of the list
// (Options.Nodes, refreshed while it looks), renegotiates, checks that it
// reached the same LU (the server's stable LU id, nbdproto.InfoLUID, and the
// size), and re-sends every unanswered request in handle order before any
// new one. Only one goroutine ever reads replies, and it reads the next
// connection only after the previous one is closed, so a late reply of the
// old connection can never reach a caller.
//
// Replay is safe because every request is idempotent: a read reads again, a
// write, trim or write-zeroes writes the same bytes again, and a flush on
// the new node covers every write acknowledged on the old one (a write is
// acknowledged only once every in-sync copy has it, so the node reached
// next has it too, or reaches the writer through it). A request is never
// in the table twice: it has one entry until its one answer.
//
// With Options.GiveUp set, calls fail with blockdev.ErrIO once the pool was
// unreachable that long, and new calls fail at once until a node answers
// again; with 0 (the default, right for swap) they wait for ever.
package endpoint

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/internal/bufpool"
	"github.com/lupool/lupool/server/nbdkernel"
	"github.com/lupool/lupool/server/nbdproto"
)

// Sentinel errors.
var (
	// ErrInvalidOptions is returned by New for missing or negative options.
	ErrInvalidOptions = errors.New("endpoint: invalid options")
	// ErrNoNode is returned by New when no node of the list serves the LU.
	ErrNoNode = errors.New("endpoint: no node serves the LU")
	// ErrOtherLU is returned (wrapped, in logs) when a node serves an
	// export of the LU's name with another id or size: a different LU.
	ErrOtherLU = errors.New("endpoint: the node serves another LU under that name")
	// ErrUpstream wraps an error reply of the server other than
	// NBD_ESHUTDOWN; it also wraps the blockdev sentinel that matches the
	// NBD error code.
	ErrUpstream = errors.New("endpoint: the server answered an error")
	// ErrProtocol is returned (wrapped, in logs) when the server breaks
	// the transmission protocol: bad magic, a reply for no request.
	ErrProtocol = errors.New("endpoint: NBD protocol error from the server")
)

// Defaults for Options.
const (
	DefaultReplyTimeout      = 30 * time.Second
	DefaultMaxReplayRequests = 1024
	DefaultMaxReplayBytes    = 256 << 20
	DefaultRefreshInterval   = 10 * time.Second
	// connectTimeout bounds one dial and handshake to one node.
	connectTimeout = 3 * time.Second
	// retryDelayMin and retryDelayMax bound the pause between two rounds
	// over every node.
	retryDelayMin = 20 * time.Millisecond
	retryDelayMax = 500 * time.Millisecond
	// readBufferBytes is the reply reader's buffer; a larger read's data
	// goes straight into the caller's buffer.
	readBufferBytes = 64 << 10
	// maxSpareBuffers bounds the send slice an upstream keeps for reuse.
	maxSpareBuffers = 4096
)

// Node is a pool node that may serve the LU.
type Node struct {
	ID string
	// NBDAddr is the node's NBD address, host:port.
	NBDAddr string
}

// Options configure New.
type Options struct {
	// Export is the LU's name. Required.
	Export string
	// Nodes returns the pool's nodes (from the API). Required. It is
	// called at start, and again while reconnecting at most once per
	// RefreshInterval; on error the last list is kept.
	Nodes func(ctx context.Context) ([]Node, error)
	// Prefer reports whether a node is tried first (the local host's);
	// nil prefers none.
	Prefer func(Node) bool
	// Dial connects to a node; nil dials TCP with keep-alive.
	Dial func(ctx context.Context, addr string) (net.Conn, error)
	// TLSConfig returns the TLS configuration for a node, or nil for
	// plain NBD; nil means plain NBD everywhere.
	TLSConfig func(Node) *tls.Config
	// GiveUp is how long calls wait for the pool before failing with
	// blockdev.ErrIO; 0 waits for ever.
	GiveUp time.Duration
	// ReplyTimeout is how long the oldest unanswered request may wait
	// before the connection is taken for dead. 0 means
	// DefaultReplyTimeout.
	ReplyTimeout time.Duration
	// MaxReplayRequests and MaxReplayBytes bound the replay table; 0
	// means the defaults. One request larger than MaxReplayBytes still
	// goes alone.
	MaxReplayRequests int
	MaxReplayBytes    int64
	// RefreshInterval: see Nodes. 0 means DefaultRefreshInterval.
	RefreshInterval time.Duration
	// Logger receives reconnects; nil discards.
	Logger *slog.Logger
	// Metrics, if not nil, counts reconnects, replays and time without
	// service.
	Metrics *Metrics
}

func (o *Options) ensureDefaults() error {
	if o.Export == "" || o.Nodes == nil {
		return fmt.Errorf("%w: Export and Nodes are required", ErrInvalidOptions)
	}
	if o.GiveUp < 0 || o.ReplyTimeout < 0 || o.MaxReplayRequests < 0 || o.MaxReplayBytes < 0 || o.RefreshInterval < 0 {
		return fmt.Errorf("%w: negative limit", ErrInvalidOptions)
	}
	if o.ReplyTimeout == 0 {
		o.ReplyTimeout = DefaultReplyTimeout
	}
	if o.MaxReplayRequests == 0 {
		o.MaxReplayRequests = DefaultMaxReplayRequests
	}
	if o.MaxReplayBytes == 0 {
		o.MaxReplayBytes = DefaultMaxReplayBytes
	}
	if o.RefreshInterval == 0 {
		o.RefreshInterval = DefaultRefreshInterval
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if o.Dial == nil {
		d := net.Dialer{KeepAlive: 5 * time.Second}
		o.Dial = func(ctx context.Context, addr string) (net.Conn, error) { return d.DialContext(ctx, "tcp", addr) }
	}
	return nil
}

// call is one request in the replay table.
type call struct {
	req nbdproto.Request
	// hdr is req on the wire, written once when the handle is set and
	// only read afterwards (a replay queues it again).
	hdr [nbdproto.RequestSize]byte
	// data is a write's payload or a read's destination; owned by the
	// caller, who waits in submit until done.
	data   []byte
	cost   int64
	sentAt time.Time // guarded by Device.mu
	// done wakes a waiting caller; async answers an asynchronous write
	// instead (exactly one of them is set).
	done  chan error
	async blockdev.Completion
	// ownData: data came from Device.bufs (an asynchronous write's copy)
	// and goes back there when the call is recycled.
	ownData bool
}

// upstream is one connection to a node.
//
// Requests are sent by combining: a caller appends its request to queued
// and, unless another caller is already writing, writes everything queued
// (looping while more arrives) with one writev, so that at a queue depth
// one system call carries many requests and no goroutine hand-off sits in
// the path. A write's payload is not copied: the call keeps it until its
// reply anyway.
type upstream struct {
	nc   net.Conn
	node Node
	// out is the batch being written, consumed by WriteTo; only the
	// caller that set mu.writing touches it. A field, so that WriteTo's
	// receiver is not a new heap slice header per write.
	out net.Buffers
	mu  struct {
		sync.Mutex
		queued  net.Buffers // requests not yet written
		spare   net.Buffers // the slice written last, reused
		writing bool        // a caller is writing; it will write queued too
	}
}

// queueLocked appends c's request (and a write's payload). u.mu must be
// held.
func (u *upstream) queueLocked(c *call) {
	u.mu.queued = append(u.mu.queued, c.hdr[:])
	if c.req.Type == nbdproto.CmdWrite && len(c.data) > 0 {
		u.mu.queued = append(u.mu.queued, c.data)
	}
}

// waitWritten waits, after nc was closed, until no write to it reads a
// caller's data any more (a write started later fails before reading), so
// that the calls can then be completed and their buffers reused.
func (u *upstream) waitWritten() {
	u.mu.Lock()
	for u.mu.writing {
		u.mu.Unlock()
		time.Sleep(time.Millisecond)
		u.mu.Lock()
	}
	u.mu.Unlock()
}

// send queues c and, unless hold is set, writes the queue unless another
// caller is writing. A held request goes with the next write (flush).
func (u *upstream) send(c *call, hold bool) {
	u.mu.Lock()
	u.queueLocked(c)
	if hold {
		u.mu.Unlock()
		return
	}
	u.flushLocked()
}

// flush writes what is queued unless another caller is writing.
func (u *upstream) flush() {
	u.mu.Lock()
	u.flushLocked()
}

// flushLocked writes everything queued unless a write is under way, and
// unlocks u.mu. A failed write closes the connection: the supervisor then
// reconnects and replays every unanswered request.
func (u *upstream) flushLocked() {
	if u.mu.writing {
		u.mu.Unlock()
		return
	}
	u.mu.writing = true
	for len(u.mu.queued) > 0 {
		// b is now owned here: spare never aliases queued.
		b := u.mu.queued
		u.mu.queued, u.mu.spare = u.mu.spare[:0], nil
		u.mu.Unlock()
		u.out = b // WriteTo consumes its receiver
		_, err := u.out.WriteTo(u.nc)
		u.out = nil
		clear(b) // drop the references to callers' data
		u.mu.Lock()
		if cap(b) <= maxSpareBuffers {
			u.mu.spare = b[:0]
		}
		if err != nil {
			u.mu.queued = nil
			_ = u.nc.Close()
			break
		}
	}
	u.mu.writing = false
	u.mu.Unlock()
}

// Device forwards to the LU on the pool. It implements blockdev.Device,
// Trimmer and Zeroer; it is safe for concurrent use.
type Device struct {
	opts Options
	// info is what the first node said; immutable.
	info   nbdkernel.ExportInfo
	budget *budget
	// runDone is closed when the supervising goroutine has failed every
	// call and ended (after Close).
	runDone chan struct{}
	closing chan struct{}
	// closingCtx is done when closing is closed; it ends a connect.
	closingCtx    context.Context
	cancelClosing context.CancelFunc
	closeMu       sync.Once
	// calls and bufs recycle the calls of asynchronous requests and the
	// copies of write payloads (recycle), so that a 4 KiB request through
	// the endpoint allocates nothing once they are warm.
	calls sync.Pool
	bufs  bufpool.Pool

	mu struct {
		sync.Mutex
		// conn is the connection requests go to; nil while reconnecting
		// or after the server answered NBD_ESHUTDOWN.
		conn       *upstream
		reading    *upstream // the connection the supervisor reads
		nextHandle uint64
		pending    map[uint64]*call
		// downSince is when service stopped; zero while connected.
		downSince time.Time
		gaveUp    bool // calls fail at once until a node answers
		closed    bool
		nodes     []Node
		refreshed time.Time
	}
}

var (
	_ blockdev.AsyncWriter    = (*Device)(nil)
	_ blockdev.AsyncReader    = (*Device)(nil)
	_ blockdev.RequestFlusher = (*Device)(nil)
	_ blockdev.Device         = (*Device)(nil)
	_ blockdev.Trimmer        = (*Device)(nil)
	_ blockdev.Zeroer         = (*Device)(nil)
)

// New connects to the LU on one of the nodes and starts serving calls. It
// returns ErrNoNode when no node serves it now.
func New(ctx context.Context, opts Options) (*Device, error) {
	if err := opts.ensureDefaults(); err != nil {
		return nil, err
	}
	d := &Device{opts: opts, runDone: make(chan struct{}), closing: make(chan struct{})}
	d.closingCtx, d.cancelClosing = context.WithCancel(context.Background())
	d.budget = newBudget(opts.MaxReplayRequests, opts.MaxReplayBytes)
	d.mu.pending = make(map[uint64]*call)
	d.mu.nextHandle = 1
	nodes, err := opts.Nodes(ctx)
	if err != nil {
		return nil, fmt.Errorf("endpoint: list nodes: %w", err)
	}
	d.mu.nodes, d.mu.refreshed = nodes, time.Now()
	var errs []error
	for _, n := range d.ordered(nodes) {
		u, info, err := d.connect(ctx, n, nil)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		d.info = info
		opts.Logger.Info("endpoint: connected", "lu", opts.Export, "node", n.ID, "addr", n.NBDAddr,
			"size_bytes", info.SizeBytes, "lu_id", info.LUID)
		d.install(u)
		go d.run(u)
		go d.watchdog()
		return d, nil
	}
	d.cancelClosing()
	return nil, fmt.Errorf("%w: %q on %d nodes: %w", ErrNoNode, opts.Export, len(nodes), errors.Join(errs...))
}

// ordered returns the preferred nodes first, each group in list order.
func (d *Device) ordered(nodes []Node) []Node {
	out := make([]Node, 0, len(nodes))
	for _, pass := range []bool{true, false} {
		for _, n := range nodes {
			if n.NBDAddr != "" && (d.opts.Prefer != nil && d.opts.Prefer(n)) == pass {
				out = append(out, n)
			}
		}
	}
	return out
}

// connect dials n and negotiates the LU; with want set, it also checks
// that n serves the same LU.
func (d *Device) connect(ctx context.Context, n Node, want *nbdkernel.ExportInfo) (*upstream, nbdkernel.ExportInfo, error) {
	ctx, cancel := context.WithTimeout(ctx, connectTimeout)
	defer cancel()
	nc, err := d.opts.Dial(ctx, n.NBDAddr)
	if err != nil {
		return nil, nbdkernel.ExportInfo{}, fmt.Errorf("node %s (%s): %w", n.ID, n.NBDAddr, err)
	}
	var tc *tls.Config
	if d.opts.TLSConfig != nil {
		tc = d.opts.TLSConfig(n)
	}
	c, info, err := nbdkernel.Negotiate(ctx, nc, d.opts.Export, tc)
	if err == nil && want != nil {
		err = sameLU(*want, info)
	}
	if err != nil {
		_ = nc.Close()
		return nil, nbdkernel.ExportInfo{}, fmt.Errorf("node %s (%s): %w", n.ID, n.NBDAddr, err)
	}
	return &upstream{nc: c, node: n}, info, nil
}

// sameLU checks that got describes the LU first reached (want).
func sameLU(want, got nbdkernel.ExportInfo) error {
	switch {
	case want.LUID != got.LUID:
		return fmt.Errorf("%w: id %q, want %q", ErrOtherLU, got.LUID, want.LUID)
	case want.SizeBytes != got.SizeBytes:
		return fmt.Errorf("%w: size %d bytes, want %d", ErrOtherLU, got.SizeBytes, want.SizeBytes)
	case want.TransmissionFlags&nbdproto.TxFlagReadOnly != got.TransmissionFlags&nbdproto.TxFlagReadOnly:
		return fmt.Errorf("%w: read-only flag changed", ErrOtherLU)
	}
	return nil
}

// run is the supervisor: it reads replies of one connection at a time and
// reconnects when a connection ends, until Close. u is installed.
func (d *Device) run(u *upstream) {
	defer close(d.runDone)
	for u != nil {
		err := d.readLoop(u)
		_ = u.nc.Close()
		u.waitWritten()
		d.mu.Lock()
		if d.mu.conn == u {
			d.mu.conn = nil
		}
		d.mu.reading = nil
		if d.mu.downSince.IsZero() {
			d.mu.downSince = time.Now()
		}
		closed := d.mu.closed
		d.mu.Unlock()
		if closed {
			break
		}
		d.opts.Logger.Warn("endpoint: upstream connection lost; reconnecting", "lu", d.opts.Export,
			"node", u.node.ID, "err", err)
		if u = d.reconnect(); u != nil {
			d.install(u)
		}
	}
	d.failAll(blockdev.ErrShutdown)
}

// install makes u the connection and re-sends every unanswered request
// on it, in handle order, before any new one.
func (d *Device) install(u *upstream) {
	d.mu.Lock()
	calls := make([]*call, 0, len(d.mu.pending))
	for _, c := range d.mu.pending {
		calls = append(calls, c)
	}
	slices.SortFunc(calls, func(a, b *call) int {
		switch {
		case a.req.Handle < b.req.Handle:
			return -1
		case a.req.Handle > b.req.Handle:
			return 1
		}
		return 0
	})
	// Queued before conn is visible: replays go before any new request.
	u.mu.Lock()
	now := time.Now()
	for _, c := range calls {
		c.sentAt = now
		u.queueLocked(c)
	}
	u.mu.Unlock()
	d.mu.conn, d.mu.reading = u, u
	down := d.mu.downSince
	d.mu.downSince, d.mu.gaveUp = time.Time{}, false
	d.mu.Unlock()
	u.mu.Lock()
	u.flushLocked()
	if !down.IsZero() {
		without := now.Sub(down)
		d.opts.Logger.Info("endpoint: reconnected", "lu", d.opts.Export, "node", u.node.ID, "addr", u.node.NBDAddr,
			"replayed", len(calls), "without_service", without.Round(time.Millisecond))
		d.opts.Metrics.reconnected(d.opts.Export, len(calls), without)
	}
}

// readLoop reads replies from u until it fails.
func (d *Device) readLoop(u *upstream) error {
	var hdr [nbdproto.SimpleReplySize]byte
	// Buffered: at a queue depth, one system call reads many replies.
	br := bufio.NewReaderSize(u.nc, readBufferBytes)
	var flushers []blockdev.ReplyFlusher
	defer func() { flushReplies(flushers) }()
	for {
		if _, err := io.ReadFull(br, hdr[:]); err != nil {
			return err
		}
		r, err := nbdproto.ParseSimpleReply(hdr[:])
		if err != nil {
			return fmt.Errorf("%w: reply header: %w", ErrProtocol, err)
		}
		d.mu.Lock()
		c := d.mu.pending[r.Handle]
		if r.Error == nbdproto.ESHUTDOWN && c != nil {
			// The node is stopping: send nothing more there, keep
			// reading what it finishes; c is replayed elsewhere.
			if d.mu.conn == u {
				d.mu.conn = nil
				d.mu.downSince = time.Now()
				d.opts.Logger.Info("endpoint: node is shutting down; moving", "lu", d.opts.Export, "node", u.node.ID)
			}
			d.mu.Unlock()
			continue
		}
		d.mu.Unlock()
		if c == nil {
			return fmt.Errorf("%w: reply for unknown handle %d", ErrProtocol, r.Handle)
		}
		if r.Error == 0 && c.req.Type == nbdproto.CmdRead {
			if _, err := io.ReadFull(br, c.data); err != nil {
				return err
			}
		}
		d.mu.Lock()
		delete(d.mu.pending, r.Handle)
		d.mu.Unlock()
		flushers = addFlusher(flushers, d.complete(c, replyError(r.Error)))
		if br.Buffered() == 0 {
			// About to wait for the server: send the answers first.
			flushers = flushReplies(flushers)
		}
	}
}

// complete ends c with err: it wakes the caller, or answers an
// asynchronous write, whose buffered answer the caller must flush with the
// returned ReplyFlusher before it next waits.
func (d *Device) complete(c *call, err error) blockdev.ReplyFlusher {
	d.budget.release(c.cost)
	if c.async != nil {
		done := c.async
		d.recycle(c)
		return done.Complete(err)
	}
	c.done <- err
	return nil
}

// newCall returns an empty call for an asynchronous request.
func (d *Device) newCall() *call {
	if c, ok := d.calls.Get().(*call); ok {
		return c
	}
	return &call{}
}

// recycle gives an asynchronous call (and its copy of a write's data) back
// once it is out of the table. No connection can still read them: c was
// answered on the connection it was last sent on, which had read all of
// it; a connection it was sent on before was closed and waited out
// (waitWritten) before c was sent again; a call failed without an answer
// is failed only once no connection is read. An error from start leaves
// c to the garbage collector (it may sit in no queue, but that path is
// cold).
func (d *Device) recycle(c *call) {
	if c.ownData {
		d.bufs.Put(c.data)
	}
	*c = call{}
	d.calls.Put(c)
}

// addFlusher adds fl to fls unless it is nil or already there.
func addFlusher(fls []blockdev.ReplyFlusher, fl blockdev.ReplyFlusher) []blockdev.ReplyFlusher {
	if fl == nil || slices.Contains(fls, fl) {
		return fls
	}
	return append(fls, fl)
}

// flushReplies flushes every fl and returns fls emptied.
func flushReplies(fls []blockdev.ReplyFlusher) []blockdev.ReplyFlusher {
	for _, fl := range fls {
		fl.FlushReplies()
	}
	return fls[:0]
}

// reconnect finds a node serving the same LU; nil after Close.
func (d *Device) reconnect() *upstream {
	delay := retryDelayMin
	for {
		d.mu.Lock()
		closed, nodes := d.mu.closed, d.mu.nodes
		refresh := time.Since(d.mu.refreshed) >= d.opts.RefreshInterval
		d.mu.Unlock()
		if closed {
			return nil
		}
		if refresh {
			d.refreshNodes()
			d.mu.Lock()
			nodes = d.mu.nodes
			d.mu.Unlock()
		}
		for _, n := range d.ordered(nodes) {
			u, _, err := d.connect(d.closingCtx, n, &d.info)
			if err == nil {
				return u
			}
			d.opts.Logger.Debug("endpoint: node not usable", "lu", d.opts.Export, "err", err)
			if errors.Is(err, ErrOtherLU) {
				d.opts.Logger.Error("endpoint: node serves another LU of that name", "lu", d.opts.Export, "err", err)
			}
		}
		wait := d.checkGiveUp(delay)
		select {
		case <-d.closing:
			return nil
		case <-time.After(wait):
		}
		delay = min(2*delay, retryDelayMax)
	}
}

// refreshNodes asks for the node list; on error it keeps the old one.
func (d *Device) refreshNodes() {
	ctx, cancel := context.WithTimeout(context.Background(), connectTimeout)
	defer cancel()
	nodes, err := d.opts.Nodes(ctx)
	d.mu.Lock()
	defer d.mu.Unlock()
	d.mu.refreshed = time.Now()
	if err != nil || len(nodes) == 0 {
		d.opts.Logger.Debug("endpoint: node list not refreshed", "err", err)
		return
	}
	d.mu.nodes = nodes
}

// checkGiveUp fails every waiting call with ErrIO once the pool was
// unreachable for GiveUp, and returns how long to wait before the next
// round (at most delay, less when the give-up time comes first).
func (d *Device) checkGiveUp(delay time.Duration) time.Duration {
	if d.opts.GiveUp == 0 {
		return delay
	}
	d.mu.Lock()
	left := d.opts.GiveUp - time.Since(d.mu.downSince)
	giveUp := left <= 0 && !d.mu.gaveUp
	if giveUp {
		d.mu.gaveUp = true
	}
	d.mu.Unlock()
	if giveUp {
		d.opts.Logger.Error("endpoint: no node answered; failing requests with EIO", "lu", d.opts.Export, "give_up", d.opts.GiveUp)
		d.failAll(fmt.Errorf("%w: no node reached for %v", blockdev.ErrIO, d.opts.GiveUp))
		return delay
	}
	if left > 0 && left < delay {
		return left
	}
	return delay
}

// failAll ends every waiting call with err. Only the supervisor calls it,
// while no connection is read.
func (d *Device) failAll(err error) {
	d.mu.Lock()
	calls := d.mu.pending
	d.mu.pending = make(map[uint64]*call)
	d.mu.Unlock()
	var flushers []blockdev.ReplyFlusher
	for _, c := range calls {
		flushers = addFlusher(flushers, d.complete(c, err))
	}
	flushReplies(flushers)
}

// watchdog closes a connection whose oldest request waits longer than
// ReplyTimeout.
func (d *Device) watchdog() {
	t := time.NewTicker(max(d.opts.ReplyTimeout/4, 10*time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-d.closing:
			return
		case <-t.C:
		}
		d.mu.Lock()
		u := d.mu.reading
		var oldest time.Time
		for _, c := range d.mu.pending {
			if !c.sentAt.IsZero() && (oldest.IsZero() || c.sentAt.Before(oldest)) {
				oldest = c.sentAt
			}
		}
		d.mu.Unlock()
		if u != nil && !oldest.IsZero() && time.Since(oldest) > d.opts.ReplyTimeout {
			d.opts.Logger.Warn("endpoint: no reply in time; taking the connection for dead", "lu", d.opts.Export,
				"node", u.node.ID, "reply_timeout", d.opts.ReplyTimeout)
			_ = u.nc.Close()
		}
	}
}

// Close fails every waiting call with blockdev.ErrShutdown and closes the
// upstream connection.
func (d *Device) Close() error {
	d.closeMu.Do(func() {
		d.mu.Lock()
		d.mu.closed = true
		u := d.mu.reading
		d.mu.Unlock()
		close(d.closing)
		d.cancelClosing()
		if u != nil {
			_ = u.nc.Close()
		}
		<-d.runDone
	})
	return nil
}

// submit puts a request in the table, sends it when connected, and waits
// for its reply.
func (d *Device) submit(req nbdproto.Request, data []byte) error {
	c := &call{req: req, data: data, done: make(chan error, 1)}
	if err := d.start(c, false); err != nil {
		return err
	}
	return <-c.done
}

// WriteAsync implements blockdev.AsyncWriter: the engine's reader starts a
// write and reads on; the reply reader answers it. p is copied, since the
// table keeps a write's data until its reply.
func (d *Device) WriteAsync(_ context.Context, p []byte, off int64, flags blockdev.Flags, done blockdev.Completion) {
	c := d.newCall()
	c.req = nbdproto.Request{Type: nbdproto.CmdWrite, Flags: fuaFlag(flags), Offset: uint64(off), Length: uint32(len(p))}
	c.data, c.ownData, c.async = d.bufs.Get(len(p)), true, done
	copy(c.data, p)
	if err := d.start(c, true); err != nil {
		if fl := done.Complete(err); fl != nil {
			fl.FlushReplies()
		}
	}
}

// AsyncWrites implements blockdev.AsyncWriter: always.
func (d *Device) AsyncWrites() bool { return true }

// ReadAsync implements blockdev.AsyncReader: the engine's reader sends a
// read and reads on; the reply reader reads the data into p and answers
// it, so that no goroutine waits for the read in between.
func (d *Device) ReadAsync(_ context.Context, p []byte, off int64, done blockdev.Completion) {
	c := d.newCall()
	c.req = nbdproto.Request{Type: nbdproto.CmdRead, Offset: uint64(off), Length: uint32(len(p))}
	c.data, c.async = p, done
	if err := d.start(c, true); err != nil {
		if fl := done.Complete(err); fl != nil {
			fl.FlushReplies()
		}
	}
}

// AsyncReads implements blockdev.AsyncReader: always.
func (d *Device) AsyncReads() bool { return true }

// FlushRequests implements blockdev.RequestFlusher: it sends the
// asynchronous requests started since, with one writev. Requests held on
// a connection that is no longer used are replayed on the next one.
func (d *Device) FlushRequests() {
	d.mu.Lock()
	u := d.mu.conn
	d.mu.Unlock()
	if u != nil {
		u.flush()
	}
}

// start puts c in the table and sends it when connected, or with hold
// (an asynchronous call) queues it for the next FlushRequests; c
// completes later (complete), unless start returns an error.
func (d *Device) start(c *call, hold bool) error {
	if c.req.Type == nbdproto.CmdRead || c.req.Type == nbdproto.CmdWrite {
		c.cost = int64(len(c.data))
	}
	if !d.budget.tryAcquire(c.cost) {
		// Held requests may be what frees the room: send them first.
		d.FlushRequests()
		d.budget.acquire(c.cost)
	}
	d.mu.Lock()
	switch {
	case d.mu.closed:
		d.mu.Unlock()
		d.budget.release(c.cost)
		return blockdev.ErrShutdown
	case d.mu.gaveUp && d.mu.conn == nil:
		d.mu.Unlock()
		d.budget.release(c.cost)
		return fmt.Errorf("%w: no node reached for %v", blockdev.ErrIO, d.opts.GiveUp)
	}
	c.req.Handle = d.mu.nextHandle
	d.mu.nextHandle++
	nbdproto.PutRequest(c.hdr[:], c.req)
	d.mu.pending[c.req.Handle] = c
	u := d.mu.conn
	if u != nil {
		c.sentAt = time.Now()
	}
	d.mu.Unlock()
	if u != nil {
		u.send(c, hold)
	}
	return nil
}

// replyError maps an NBD error code to an error.
func replyError(code uint32) error {
	var base error
	switch code {
	case 0:
		return nil
	case nbdproto.EPERM:
		base = blockdev.ErrReadOnly
	case nbdproto.ENOSPC:
		base = blockdev.ErrNoSpace
	case nbdproto.EINVAL:
		base = blockdev.ErrInvalid
	case nbdproto.ENOTSUP:
		base = blockdev.ErrNotSupported
	case nbdproto.ENOMEM:
		base = syscall.ENOMEM
	case nbdproto.EOVERFLOW:
		base = syscall.EOVERFLOW
	default:
		base = blockdev.ErrIO
	}
	return fmt.Errorf("%w %d: %w", ErrUpstream, code, base)
}

// Size returns the LU's size at the first connection.
func (d *Device) Size() int64 { return int64(d.info.SizeBytes) }

// Caps: one upstream connection carries every local connection's
// requests, so a flush covers all of them (MultiConn).
func (d *Device) Caps() blockdev.Caps {
	return blockdev.Caps{
		ReadOnly:   d.info.TransmissionFlags&nbdproto.TxFlagReadOnly != 0,
		Rotational: d.info.TransmissionFlags&nbdproto.TxFlagRotational != 0,
		MultiConn:  true,
	}
}

// Node returns the node requests go to, "" while reconnecting.
func (d *Device) Node() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.mu.conn == nil {
		return ""
	}
	return d.mu.conn.node.ID
}

func fuaFlag(f blockdev.Flags) uint16 {
	if f&blockdev.FUA != 0 {
		return nbdproto.CmdFlagFUA
	}
	return 0
}

// ReadAt forwards a READ; ctx is not used (the reply fills p).
func (d *Device) ReadAt(_ context.Context, p []byte, off int64) error {
	return d.submit(nbdproto.Request{Type: nbdproto.CmdRead, Offset: uint64(off), Length: uint32(len(p))}, p)
}

// WriteAt forwards a WRITE.
func (d *Device) WriteAt(_ context.Context, p []byte, off int64, flags blockdev.Flags) error {
	return d.submit(nbdproto.Request{Type: nbdproto.CmdWrite, Flags: fuaFlag(flags), Offset: uint64(off), Length: uint32(len(p))}, p)
}

// Flush forwards a FLUSH.
func (d *Device) Flush(context.Context) error {
	return d.submit(nbdproto.Request{Type: nbdproto.CmdFlush}, nil)
}

// Trim forwards a TRIM.
func (d *Device) Trim(_ context.Context, off, length int64, flags blockdev.Flags) error {
	if d.info.TransmissionFlags&nbdproto.TxFlagSendTrim == 0 {
		return blockdev.ErrNotSupported
	}
	return d.submit(nbdproto.Request{Type: nbdproto.CmdTrim, Flags: fuaFlag(flags), Offset: uint64(off), Length: uint32(length)}, nil)
}

// WriteZeroes forwards a WRITE_ZEROES.
func (d *Device) WriteZeroes(_ context.Context, off, length int64, flags blockdev.Flags) error {
	if d.info.TransmissionFlags&nbdproto.TxFlagSendWriteZeroes == 0 {
		return blockdev.ErrNotSupported
	}
	f := fuaFlag(flags)
	if flags&blockdev.NoHole != 0 {
		f |= nbdproto.CmdFlagNoHole
	}
	if flags&blockdev.FastZero != 0 {
		if d.info.TransmissionFlags&nbdproto.TxFlagSendFastZero == 0 {
			return blockdev.ErrNotSupported
		}
		f |= nbdproto.CmdFlagFastZero
	}
	return d.submit(nbdproto.Request{Type: nbdproto.CmdWriteZeroes, Flags: f, Offset: uint64(off), Length: uint32(length)}, nil)
}

// budget bounds the replay table by requests and bytes.
type budget struct {
	mu       sync.Mutex
	cond     *sync.Cond
	requests int   // guarded by mu
	bytes    int64 // guarded by mu
	maxReqs  int
	maxBytes int64
}

func newBudget(maxReqs int, maxBytes int64) *budget {
	b := &budget{maxReqs: maxReqs, maxBytes: maxBytes}
	b.cond = sync.NewCond(&b.mu)
	return b
}

// acquire waits until one more request of cost bytes fits; a request
// larger than the whole budget goes when the table holds no bytes.
func (b *budget) acquire(cost int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for b.requests >= b.maxReqs || (b.bytes > 0 && b.bytes+cost > b.maxBytes) {
		b.cond.Wait()
	}
	b.requests++
	b.bytes += cost
}

// tryAcquire is acquire without waiting; it reports whether it took room.
func (b *budget) tryAcquire(cost int64) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.requests >= b.maxReqs || (b.bytes > 0 && b.bytes+cost > b.maxBytes) {
		return false
	}
	b.requests++
	b.bytes += cost
	return true
}

func (b *budget) release(cost int64) {
	b.mu.Lock()
	b.requests--
	b.bytes -= cost
	b.mu.Unlock()
	b.cond.Broadcast()
}
