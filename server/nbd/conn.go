package nbd

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/server/nbdproto"
)

// Buffer sizes of a connection's reader and writer. A connection
// negotiates with small ones (a server at its connection cap holds
// MaxConnections of them) and gets the large ones when transmission starts.
const (
	readBufferBytes = 64 << 10
	// writeBufferBytes holds a 64 KiB read's reply (header included), so
	// that such reads can be answered straight from the reply buffer
	// (readIntoReply); BenchmarkFileVolume/read/64KiB: 5 to 18 % faster
	// than with 64 KiB.
	writeBufferBytes     = 64<<10 + 4<<10
	handshakeBufferBytes = 4 << 10
)

// conn is one client connection.
//
// The serve goroutine owns negotiation; in transmission workers take turns
// reading requests (under readMu), run them and write replies under wmu.
// The reader runs inline requests (see inlineRequest) itself, without letting
// go of readMu, and holds their replies' flush back while more requests are
// buffered (batchOpen).
type conn struct {
	srv    *Server
	raw    net.Conn // the accepted connection; closing it ends everything
	remote string
	ctx    context.Context // cancelled by close
	cancel context.CancelFunc
	once   sync.Once

	// nc is raw or the TLS connection over it; br and bw wrap it. Set during
	// negotiation by the serve goroutine only, then immutable.
	nc net.Conn
	br *bufio.Reader // serve goroutine, then guarded by readMu

	wmu         sync.Mutex
	bw          *bufio.Writer // guarded by wmu once transmission starts
	deadlineSet time.Time     // guarded by wmu; when the write deadline was last moved
	// pendingReplies counts the replies queued for or holding wmu, plus one
	// while the reader holds a batch open (batchOpen); whoever brings it to
	// zero flushes bw.
	pendingReplies atomic.Int32
	broken         atomic.Bool // a reply write failed

	// Guarded by srv.mu.
	attached   bool
	exportName string
	tls        bool
	structured bool
	// reserved is set while the connection holds a place on
	// reservedExport (Server.reserveExport).
	reserved       bool
	reservedExport string

	// Set before transmission starts; immutable afterwards.
	sess     *session
	dev      blockdev.Device
	trimmer  blockdev.Trimmer  // nil if unsupported
	zeroer   blockdev.Zeroer   // nil if unsupported
	extenter blockdev.Extenter // nil if unsupported
	cacher   blockdev.Cacher   // nil if unsupported
	readOnly bool
	// blockBytes is the device's block size (at least 1).
	blockBytes uint64
	inliner    InlineDevice            // dev if it implements InlineDevice, else nil
	asyncw     blockdev.AsyncWriter    // dev if it implements AsyncWriter, else nil
	asyncr     blockdev.AsyncReader    // dev if it implements AsyncReader, else nil
	reqfl      blockdev.RequestFlusher // dev if it implements RequestFlusher, else nil
	tryr       blockdev.TryReader      // dev if it implements TryReader, else nil
	metrics    *exportMetrics          // nil without Metrics

	inflight atomic.Int32
	stats    [numCommands]struct{ requests, errors, bytes atomic.Uint64 }

	free   chan *request // request structs not in flight
	budget byteBudget

	// Workers take turns as the reader (leader/follower): the one holding
	// readMu reads and validates the next request, makes sure another
	// worker is waiting to read after it, releases readMu and runs the
	// request itself. The request's own goroutine thus answers it, and
	// handing over the reader role is off the request's critical path.
	readMu    sync.Mutex
	stopped   bool                       // guarded by readMu; reading has ended
	readErr   error                      // guarded by readMu; why reading ended (nil after DISC)
	headerBuf [nbdproto.RequestSize]byte // guarded by readMu
	// batchOpen is true while the reader has written replies of inline
	// requests and holds their flush back (one count in pendingReplies),
	// because more requests are already buffered. Guarded by readMu; the
	// reader closes the batch before anything that may block.
	batchOpen bool
	// unflushed: asynchronous requests were started since the last
	// FlushRequests (reqfl only). Guarded by readMu.
	unflushed bool
	// peekedBytes is the payload of the inline write running now, left in
	// br (request.payload) and discarded once it has run. Guarded by readMu.
	peekedBytes int
	// br (above) is also guarded by readMu during transmission.
	workers  atomic.Int32 // started workers
	waiting  atomic.Int32 // workers waiting for readMu
	workerWG sync.WaitGroup

	// Asynchronous writes (see startAsync) are counted in asyncWG until
	// they are answered. Complete queues a finished write in asyncDone and
	// kicks the connection's replier goroutine, which writes the replies:
	// a completer never waits for this client's socket.
	asyncWG    sync.WaitGroup
	asyncMu    sync.Mutex
	asyncDone  []*request // guarded by asyncMu
	asyncKick  chan struct{}
	asyncStop  chan struct{}
	replierWG  sync.WaitGroup
	asyncSpare []*request // the replier's
	// rawWrite is the plain TCP connection's, for Complete's non-blocking
	// write; nil over TLS. rawWriteFn writes rawBuf once and records the
	// result in rawN and rawErr; made once, so that a write allocates
	// nothing. The three are guarded by wmu.
	rawWrite   syscall.RawConn
	rawWriteFn func(fd uintptr) bool
	rawBuf     []byte
	rawN       int
	rawErr     error
	// fastMu is held by FlushReplies' direct path, which owns fastBatch,
	// fastErrs and fastBuf while it runs.
	fastMu    sync.Mutex
	fastBatch []*request
	fastErrs  []*request
	fastBuf   []byte
}

// request is one request in flight. Owned by the reader until dispatched,
// then by one worker until returned to free.
type request struct {
	c       *conn // immutable
	hdr     nbdproto.Request
	errCode uint32 // set by validation: reply with this, do not run
	inline  bool   // the reader runs it (inlineRequest); set with errCode
	// async: the reader starts it on the AsyncWriter or AsyncReader
	// (asyncRequest).
	async bool
	// try: the reader tries the read without waiting (tryRequest) and
	// hands it to a worker only if the device would wait.
	try bool
	// asyncErr is an asynchronous request's result, set by Complete.
	asyncErr error
	buf      *buffer // write payload or read data; nil otherwise
	// payload is a write's payload: in buf, or in the reader's buffer for
	// an inline write (valid only until the reader reads on).
	payload []byte
	budget  int64 // bytes acquired from the budget
	// payloadBytes is the encoded block status payload in buf.
	payloadBytes int
	start        time.Time
	extents      []blockdev.Extent // scratch for block status
	scratch      [nbdproto.StructuredReplySize + 8]byte
}

func newConn(s *Server, nc net.Conn) *conn {
	c := &conn{srv: s, raw: nc, nc: nc, remote: nc.RemoteAddr().String()}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	c.br = bufio.NewReaderSize(nc, handshakeBufferBytes)
	c.bw = bufio.NewWriterSize(nc, handshakeBufferBytes)
	return c
}

// growBuffers replaces the negotiation buffers by the transmission ones.
// Requests the client sent right behind its last option may already sit in
// br: they are carried over. Negotiation has flushed bw. Serve goroutine
// only, before transmission starts.
func (c *conn) growBuffers() {
	var src io.Reader = c.nc
	if n := c.br.Buffered(); n > 0 {
		pending, _ := c.br.Peek(n) // buffered: cannot fail
		src = io.MultiReader(bytes.NewReader(bytes.Clone(pending)), c.nc)
	}
	c.br = bufio.NewReaderSize(src, readBufferBytes)
	c.bw = bufio.NewWriterSize(c.nc, writeBufferBytes)
	c.srv.pools.allocatedBytes.Add(readBufferBytes + writeBufferBytes)
}

// close ends the connection at once: in-flight device calls see a cancelled
// context and replies are dropped. Safe to call many times, from anywhere.
func (c *conn) close() {
	c.once.Do(func() {
		c.cancel()
		_ = c.raw.Close()
	})
}

// statLocked snapshots the connection. srv.mu must be held.
func (c *conn) statLocked() ConnStat {
	st := ConnStat{
		RemoteAddr:        c.remote,
		Export:            c.exportName,
		TLS:               c.tls,
		StructuredReplies: c.structured,
		InflightRequests:  int(c.inflight.Load()),
		Commands:          make(map[string]CommandStat),
	}
	for i := range c.stats {
		if uint16(i) == nbdproto.CmdDisc {
			continue
		}
		s := &c.stats[i]
		st.Commands[nbdproto.CommandName(uint16(i))] = CommandStat{
			Requests: s.requests.Load(), Errors: s.errors.Load(), Bytes: s.bytes.Load(),
		}
	}
	return st
}

// serve runs the connection to its end.
func (c *conn) serve() {
	defer c.srv.removeConn(c)
	defer c.close()
	log := c.srv.log.With("remote", c.remote)
	sess, err := c.negotiate()
	if err != nil {
		if !errors.Is(err, errAbort) && !errors.Is(err, io.EOF) {
			log.Debug("nbd: negotiation ended", "err", err)
		}
		return
	}
	_ = c.raw.SetDeadline(time.Time{})
	c.growBuffers()
	c.start(sess)
	log = log.With("export", sess.export.Name)
	log.Debug("nbd: transmission", "structured", sess.structured, "size", c.dev.Size())
	c.workers.Store(1)
	c.workerWG.Add(1)
	c.worker() // returns when reading has ended
	c.workerWG.Wait()
	c.asyncWG.Wait()
	if c.asyncStop != nil {
		close(c.asyncStop)
		c.replierWG.Wait()
	}
	c.readMu.Lock()
	err = c.readErr
	c.readMu.Unlock()
	c.finish()
	if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
		log.Info("nbd: connection ended", "err", err)
	}
}

// start prepares transmission for sess.
func (c *conn) start(sess *session) {
	c.sess = sess
	c.dev = sess.export.Device
	c.trimmer, _ = c.dev.(blockdev.Trimmer)
	c.zeroer, _ = c.dev.(blockdev.Zeroer)
	c.extenter, _ = c.dev.(blockdev.Extenter)
	c.cacher, _ = c.dev.(blockdev.Cacher)
	c.readOnly = c.dev.Caps().ReadOnly
	c.blockBytes = uint64(max(c.dev.Caps().BlockSizeBytes, 1))
	c.inliner, _ = c.dev.(InlineDevice)
	c.asyncw, _ = c.dev.(blockdev.AsyncWriter)
	c.asyncr, _ = c.dev.(blockdev.AsyncReader)
	c.reqfl, _ = c.dev.(blockdev.RequestFlusher)
	c.tryr, _ = c.dev.(blockdev.TryReader)
	if c.asyncw != nil || c.asyncr != nil {
		if sc, ok := c.nc.(syscall.Conn); ok && rawSocketWrites {
			c.rawWrite, _ = sc.SyscallConn()
			c.rawWriteFn = func(fd uintptr) bool {
				c.rawN, c.rawErr = rawSocketWrite(fd, c.rawBuf)
				return true // one attempt; never wait for the socket
			}
		}
		c.asyncKick, c.asyncStop = make(chan struct{}, 1), make(chan struct{})
		c.replierWG.Add(1)
		go c.replier()
	}
	name := sess.export.Name
	current := func() bool {
		_, ok := c.srv.opts.Exports.Lookup(name)
		return ok
	}
	if m := c.srv.opts.Metrics; m != nil {
		if c.metrics = m.forExport(name, current); c.metrics != nil {
			c.metrics.connections.Inc()
		}
	}
	n := c.srv.opts.MaxInflightRequests
	c.free = make(chan *request, n)
	for range n {
		c.free <- &request{c: c}
	}
	c.budget.init(c.srv.opts.MaxInflightBytes)
	// An export removed since negotiation looked it up (its LU deleted)
	// had DisconnectExport run before this connection counted as
	// attached: end it here. Checked under srv.mu, as DisconnectExport
	// runs, so one of the two ends it.
	c.srv.mu.Lock()
	c.attached, c.exportName, c.structured = true, name, sess.structured
	gone := !current()
	c.srv.mu.Unlock()
	if gone {
		c.close()
	}
}

// finish runs after every worker has ended: it flushes the last replies.
func (c *conn) finish() {
	c.wmu.Lock()
	if !c.broken.Load() {
		_ = c.bw.Flush()
	}
	c.wmu.Unlock()
	if c.metrics != nil {
		c.metrics.connections.Dec()
	}
}

// worker alternates between reading requests (as the leader) and running
// one, until reading ends.
func (c *conn) worker() {
	defer c.workerWG.Done()
	for {
		c.waiting.Add(1)
		c.readMu.Lock()
		c.waiting.Add(-1)
		r := c.lead()
		if r == nil {
			c.readMu.Unlock()
			return
		}
		// Make sure someone reads the next request while this one runs.
		if c.waiting.Load() == 0 && int(c.workers.Load()) <= c.srv.opts.MaxInflightRequests {
			c.workers.Add(1)
			c.workerWG.Add(1)
			go c.worker()
		}
		c.readMu.Unlock()
		c.handle(r)
	}
}

// lead reads requests and runs the inline ones itself until it reads one
// that must run apart, which it returns, or until reading ends (nil). The
// replies of inline requests are flushed together when no further request
// is buffered. c.readMu must be held.
func (c *conn) lead() *request {
	for !c.stopped {
		r, err := c.next()
		if r == nil {
			c.closeBatchLocked()
			c.stopLocked(err)
			return nil
		}
		if r.async {
			// WriteAsync may block briefly: flush the replies, but
			// not the requests (a RequestFlusher sends what it holds
			// before it waits).
			c.closeReplyBatchLocked()
			c.startAsync(r)
			if c.peekedBytes > 0 {
				_, _ = c.br.Discard(c.peekedBytes) // buffered: cannot fail
				c.peekedBytes = 0
			}
			continue
		}
		if r.try {
			// Answered now if the data is in memory; else a worker
			// waits for the device while this goroutine reads on.
			c.openBatchLocked()
			if c.readIntoReply(r) {
				c.finishRequest(r)
				continue
			}
			r.try = false
		}
		if !r.inline {
			c.closeBatchLocked()
			return r
		}
		c.openBatchLocked()
		c.handle(r)
		if c.peekedBytes > 0 {
			_, _ = c.br.Discard(c.peekedBytes) // buffered: cannot fail
			c.peekedBytes = 0
		}
	}
	return nil
}

// InlineMaxBytes is the largest read or write that runs inline on an
// InlineDevice. Larger ones go to a worker, so that copying them overlaps
// with reading the next request.
const InlineMaxBytes = 128 << 10

// inlineRequest decides, once per request, whether the reader runs r
// itself: requests refused by validation (their reply is all there is to
// do) and, on an InlineDevice that says so now, reads, writes and flushes of
// at most InlineMaxBytes. On an InlineDevice that is also a
// blockdev.TryReader (a file volume, whose reads and flushes may wait for
// the disk) only writes without FUA run inline: reads are tried instead
// (tryRequest) and flushes and FUA writes go to workers.
func (c *conn) inlineRequest(r *request) bool {
	if r.errCode != 0 {
		return true
	}
	if c.inliner == nil {
		return false
	}
	switch r.hdr.Type {
	case nbdproto.CmdRead:
		if c.tryr != nil || r.hdr.Length > InlineMaxBytes {
			return false
		}
	case nbdproto.CmdWrite:
		if r.hdr.Length > InlineMaxBytes {
			return false
		}
		// A partial block not in the page cache is read from the disk
		// first: only whole blocks without FUA on a TryReader.
		if c.tryr != nil && (r.hdr.Flags&nbdproto.CmdFlagFUA != 0 ||
			r.hdr.Offset%c.blockBytes != 0 || uint64(r.hdr.Length)%c.blockBytes != 0) {
			return false
		}
	case nbdproto.CmdFlush:
		if c.tryr != nil {
			return false
		}
	default:
		return false
	}
	return c.inliner.InlineIO()
}

// TryReadMaxBytes is the largest read the reader tries itself on a
// blockdev.TryReader: one whose reply fits the reply writer, so that it is
// read straight into it. Larger reads go to workers, so that sending one
// reply (most of a large read's cost, and it waits for the client) overlaps
// with reading and running the next request.
const TryReadMaxBytes = writeBufferBytes - maxReadReplyHeadBytes

// tryRequest decides, once per request, whether the reader tries read r
// on the device's TryReader before handing it to a worker: a device whose
// data is in the page cache answers in a few microseconds per 4 KiB, less
// than a hand-off to another goroutine costs.
func (c *conn) tryRequest(r *request) bool {
	return c.tryr != nil && r.errCode == 0 && r.hdr.Type == nbdproto.CmdRead &&
		r.hdr.Length > 0 && r.hdr.Length <= TryReadMaxBytes
}

// asyncRequest decides, once per request, whether the reader starts r on
// the device's AsyncWriter and reads on while it runs: writes of 1 to
// InlineMaxBytes bytes without FUA (a FUA write waits for the disk, which
// the reader must not), when the device says so now; or on its
// AsyncReader: reads of 1 to TryReadMaxBytes bytes (whose reply fits the
// reply writer), when the device says so now.
func (c *conn) asyncRequest(r *request) bool {
	if r.errCode != 0 || r.hdr.Length == 0 {
		return false
	}
	switch r.hdr.Type {
	case nbdproto.CmdWrite:
		return c.asyncw != nil && r.hdr.Length <= InlineMaxBytes &&
			r.hdr.Flags&nbdproto.CmdFlagFUA == 0 && c.asyncw.AsyncWrites()
	case nbdproto.CmdRead:
		return c.asyncr != nil && r.hdr.Length <= TryReadMaxBytes && c.asyncr.AsyncReads()
	}
	return false
}

// startAsync hands write r to the AsyncWriter, or read r to the
// AsyncReader with a buffer for its data; r belongs to the device until
// its Complete, which may already have run when the call returns.
// c.readMu must be held.
func (c *conn) startAsync(r *request) {
	c.asyncWG.Add(1)
	c.unflushed = c.reqfl != nil
	if r.hdr.Type == nbdproto.CmdRead {
		n := int(r.hdr.Length)
		r.buf = c.srv.pools.get(n)
		c.asyncr.ReadAsync(c.ctx, r.buf.b[:n], int64(r.hdr.Offset), r)
		return
	}
	p, off, flags := r.payload, int64(r.hdr.Offset), fuaFlag(r.hdr.Flags)
	c.asyncw.WriteAsync(c.ctx, p, off, flags, r)
}

// Complete implements blockdev.Completion for an asynchronous request: it
// queues r and returns the connection as the ReplyFlusher; the completer
// calls FlushReplies once it has completed the writes it has, which
// answers them together. Neither waits for the client.
func (r *request) Complete(err error) blockdev.ReplyFlusher {
	c := r.c
	r.asyncErr = err
	c.asyncMu.Lock()
	c.asyncDone = append(c.asyncDone, r)
	c.asyncMu.Unlock()
	return c
}

// FlushReplies implements blockdev.ReplyFlusher: it answers the queued
// asynchronous requests. When no reply is being written or buffered, their
// replies go out in one non-blocking write on the completer's goroutine;
// the rest (error replies, what the socket did not take, or everything
// when the reply stream is busy) is left to the replier goroutine. So a
// burst of completions costs one system call, and a client that stops
// reading holds up only its own replier.
func (c *conn) FlushReplies() {
	if c.rawWrite == nil || !c.fastMu.TryLock() {
		c.kickReplier()
		return
	}
	defer c.fastMu.Unlock()
	if !c.wmu.TryLock() {
		c.kickReplier()
		return
	}
	if c.broken.Load() || c.bw.Buffered() != 0 {
		c.wmu.Unlock()
		c.kickReplier()
		return
	}
	c.asyncMu.Lock()
	batch := c.asyncDone
	c.asyncDone = c.fastBatch[:0]
	c.asyncMu.Unlock()
	buf, errs := c.fastBuf[:0], c.fastErrs[:0]
	ok := batch[:0]
	for _, r := range batch {
		if r.asyncErr != nil {
			errs = append(errs, r)
			continue
		}
		c.account(r, 0)
		if r.hdr.Type == nbdproto.CmdRead {
			buf = c.appendReadReply(buf, r)
		} else {
			buf = c.appendOKReply(buf, r.hdr.Handle)
		}
		ok = append(ok, r)
	}
	rest := false
	if len(buf) > 0 {
		c.rawBuf = buf
		werr := c.rawWrite.Write(c.rawWriteFn)
		if werr == nil {
			werr = c.rawErr
		}
		n := max(c.rawN, 0)
		c.rawBuf, c.rawErr = nil, nil
		switch {
		case werr != nil && !errors.Is(werr, syscall.EAGAIN):
			c.fail()
		case n < len(buf):
			_, _ = c.bw.Write(buf[n:]) // bw was empty; the replier flushes it
			rest = true
		}
	}
	c.wmu.Unlock()
	if len(errs) > 0 {
		c.asyncMu.Lock()
		c.asyncDone = append(c.asyncDone, errs...)
		c.asyncMu.Unlock()
	}
	if rest || len(errs) > 0 {
		c.kickReplier()
	}
	for i, r := range ok {
		c.answeredAsync(r)
		ok[i] = nil
	}
	clear(errs)
	c.fastBatch, c.fastErrs, c.fastBuf = ok[:0], errs[:0], buf[:0]
}

// answeredAsync ends asynchronous write r once its reply is written (and,
// unless the socket did not take all of it, flushed).
func (c *conn) answeredAsync(r *request) {
	c.release(r)
	c.inflight.Add(-1)
	c.asyncWG.Done()
}

// kickReplier wakes the replier, unless it was already woken.
func (c *conn) kickReplier() {
	select {
	case c.asyncKick <- struct{}{}:
	default:
	}
}

// replier answers the asynchronous writes that Complete queues, a burst at
// a time with one flush, and flushes what FlushReplies left buffered, until
// asyncStop is closed (after every asynchronous write was answered).
func (c *conn) replier() {
	defer c.replierWG.Done()
	for {
		select {
		case <-c.asyncKick:
		case <-c.asyncStop:
			return
		}
		c.asyncMu.Lock()
		batch := c.asyncDone
		c.asyncDone = c.asyncSpare[:0]
		c.asyncMu.Unlock()
		// Hold the flush until the whole burst is written.
		c.pendingReplies.Add(1)
		for _, r := range batch {
			code := errorCode(r.hdr.Type, r.asyncErr)
			c.account(r, code)
			switch {
			case code != 0:
				c.replyError(r, code, r.asyncErr)
			case r.hdr.Type == nbdproto.CmdRead:
				c.replyRead(r)
			default:
				c.replyOK(r)
			}
		}
		c.flushHeld()
		// Only now do the writes leave the in-flight count, so that
		// Shutdown, which waits for it, cannot close the connection
		// between a reply and its flush.
		for i, r := range batch {
			r.asyncErr = nil
			c.answeredAsync(r)
			batch[i] = nil
		}
		c.asyncSpare = batch
	}
}

// flushHeld ends a hold on the reply flush (one count in pendingReplies)
// and flushes unless other replies are still pending.
func (c *conn) flushHeld() {
	if c.pendingReplies.Add(-1) != 0 {
		return
	}
	c.wmu.Lock()
	if !c.broken.Load() {
		if err := c.bw.Flush(); err != nil {
			c.fail()
		}
	}
	c.wmu.Unlock()
}

// openBatchLocked holds back the flush of the replies written from now on
// until closeBatchLocked. c.readMu must be held.
func (c *conn) openBatchLocked() {
	if !c.batchOpen {
		c.batchOpen = true
		c.pendingReplies.Add(1)
	}
}

// closeBatchLocked ends the batch: the asynchronous requests started
// during it are flushed to the device (RequestFlusher), and the replies
// written during it are flushed now, or by the last reply still pending.
// The reader calls it before anything that may block. c.readMu must be
// held.
func (c *conn) closeBatchLocked() {
	if c.unflushed {
		c.unflushed = false
		c.reqfl.FlushRequests()
	}
	c.closeReplyBatchLocked()
}

// closeReplyBatchLocked ends the batch of replies only (closeBatchLocked).
// c.readMu must be held.
func (c *conn) closeReplyBatchLocked() {
	if !c.batchOpen {
		return
	}
	c.batchOpen = false
	c.flushHeld()
}

// stopLocked ends reading. On a clean end (DISC or EOF) and on a protocol
// violation, requests in flight complete and are answered (bounded by
// ReplyTimeout); on a broken connection they are cancelled. c.readMu must
// be held.
func (c *conn) stopLocked(err error) {
	c.stopped, c.readErr = true, err
	if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, errProtocol) {
		c.close()
	}
}

// next reads the next request. It returns nil and the reason when reading
// must end: nil error after NBD_CMD_DISC. c.readMu must be held.
func (c *conn) next() (*request, error) {
	if c.br.Buffered() < nbdproto.RequestSize {
		c.closeBatchLocked()
	}
	if _, err := io.ReadFull(c.br, c.headerBuf[:]); err != nil {
		return nil, err
	}
	hdr, err := nbdproto.ParseRequest(c.headerBuf[:])
	if err != nil {
		return nil, errors.Join(errProtocol, err)
	}
	if hdr.Type == nbdproto.CmdDisc {
		return nil, nil
	}
	if hdr.Type == nbdproto.CmdWrite && hdr.Length > MaxRequestBytes {
		// Skipping up to 4 GiB of payload is not worth it.
		return nil, errors.Join(errProtocol, errWriteTooLarge)
	}
	// Counted from here so that Shutdown waits for this request.
	c.inflight.Add(1)
	r, err := c.take(hdr)
	if err != nil {
		c.inflight.Add(-1)
		return nil, err
	}
	if c.metrics != nil {
		c.metrics.inflight.Inc()
	}
	return r, nil
}

// take gets a free request struct for hdr, validates it and reads its
// payload. On error the struct is back on the free list. c.readMu must be
// held.
func (c *conn) take(hdr nbdproto.Request) (*request, error) {
	var r *request
	select {
	case r = <-c.free:
	default:
		c.closeBatchLocked()
		select {
		case r = <-c.free:
		case <-c.ctx.Done():
			return nil, c.ctx.Err()
		}
	}
	r.hdr, r.buf, r.payload, r.budget, r.payloadBytes = hdr, nil, nil, 0, 0
	r.start = time.Time{}
	if c.metrics != nil {
		r.start = time.Now() // only the latency histogram needs it
	}
	r.errCode = c.validate(&hdr)
	if r.errCode == 0 && (c.srv.closing.Load() || c.srv.shedding.Load()) {
		r.errCode = nbdproto.ESHUTDOWN
	}
	r.inline = c.inlineRequest(r)
	r.async = !r.inline && c.asyncRequest(r)
	r.try = !r.inline && !r.async && c.tryRequest(r)
	if err := c.readPayload(r); err != nil {
		c.release(r)
		return nil, err
	}
	return r, nil
}

var errWriteTooLarge = errors.New("nbd: write larger than the maximum block size")

// readPayload takes the budget for r and reads a write's payload (or skips
// it when the write was refused). c.readMu must be held.
func (c *conn) readPayload(r *request) error {
	n := int64(r.hdr.Length)
	if r.hdr.Type == nbdproto.CmdWrite && int64(c.br.Buffered()) < n {
		c.closeBatchLocked() // reading the payload may block
	}
	switch {
	case r.hdr.Type == nbdproto.CmdWrite && r.errCode != 0:
		_, err := io.CopyN(io.Discard, c.br, n)
		return err
	case r.hdr.Type == nbdproto.CmdWrite && n > 0 && n <= int64(c.br.Size()) && (r.inline || r.async):
		// The reader runs (or starts) the write before it reads on, so
		// the payload can stay in br: no copy, no buffer, no budget.
		p, err := c.br.Peek(int(n))
		if err != nil {
			return errors.Join(io.ErrUnexpectedEOF, err)
		}
		r.payload, c.peekedBytes = p, int(n)
		return nil
	case r.hdr.Type == nbdproto.CmdWrite && n > 0:
		c.acquireLocked(r, int64(bufferBytes(int(n))))
		r.buf = c.srv.pools.get(int(n))
		r.payload = r.buf.b[:n]
		_, err := io.ReadFull(c.br, r.payload)
		return err
	case r.hdr.Type == nbdproto.CmdRead && r.errCode == 0 && n > 0:
		// Charged before the buffer exists (the worker allocates it), so
		// that a client whose read replies back up stops being read.
		c.acquireLocked(r, int64(bufferBytes(int(n))))
	case r.hdr.Type == nbdproto.CmdBlockStatus && r.errCode == 0:
		c.acquireLocked(r, int64(bufferBytes(blockStatusPayloadBytes)))
	}
	return nil
}

// acquireLocked takes n bytes of the budget for r, closing the batch first
// if it has to wait. c.readMu must be held.
func (c *conn) acquireLocked(r *request, n int64) {
	if !c.budget.tryAcquire(n) {
		c.closeBatchLocked()
		c.budget.acquire(n)
	}
	r.budget = n
}

// release frees r's buffer and budget and returns it to the free list.
func (c *conn) release(r *request) {
	if r.buf != nil {
		c.srv.pools.put(r.buf)
		r.buf = nil
	}
	r.payload = nil
	c.budget.release(r.budget)
	r.budget = 0
	if cap(r.extents) > 1024 {
		r.extents = nil
	}
	c.free <- r
}

// validate checks a request before the device sees it and returns the NBD
// error code to answer with, or 0.
func (c *conn) validate(h *nbdproto.Request) uint32 {
	// FUA is valid on every command (the server ignores it where nothing
	// is written); the others only where the spec documents them.
	allowed := nbdproto.CmdFlagFUA
	switch h.Type {
	case nbdproto.CmdRead:
		if c.sess.structured {
			allowed |= nbdproto.CmdFlagDF
		}
	case nbdproto.CmdWriteZeroes:
		allowed |= nbdproto.CmdFlagNoHole | nbdproto.CmdFlagFastZero
	case nbdproto.CmdBlockStatus:
		allowed |= nbdproto.CmdFlagReqOne
	case nbdproto.CmdWrite, nbdproto.CmdTrim, nbdproto.CmdFlush, nbdproto.CmdCache:
	default:
		return nbdproto.EINVAL
	}
	if h.Flags&^allowed != 0 {
		return nbdproto.EINVAL
	}
	write := isWriteCommand(h.Type)
	if write && c.readOnly {
		return nbdproto.EPERM
	}
	switch h.Type {
	case nbdproto.CmdFlush:
		return 0
	case nbdproto.CmdRead:
		if h.Length > MaxRequestBytes {
			if c.sess.structured {
				return nbdproto.EOVERFLOW
			}
			return nbdproto.EINVAL
		}
	case nbdproto.CmdTrim:
		if c.trimmer == nil {
			return nbdproto.EINVAL
		}
	case nbdproto.CmdWriteZeroes:
		if h.Flags&nbdproto.CmdFlagFastZero != 0 && c.zeroer == nil {
			return nbdproto.ENOTSUP
		}
	case nbdproto.CmdBlockStatus:
		if !c.sess.metaAllocation || h.Length == 0 {
			return nbdproto.EINVAL
		}
	}
	size := uint64(max(c.dev.Size(), 0))
	if h.Offset > size || uint64(h.Length) > size-h.Offset {
		return outOfRangeCode(h.Type)
	}
	return 0
}
