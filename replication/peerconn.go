package replication

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/replication/replproto"
)

// StreamPath is the HTTP path on every node's API address that upgrades to
// a replication stream (replproto). The API front end hands the hijacked
// connection to Manager.ServeStream.
const StreamPath = "/v1/internal/stream"

// StreamUpgrade is the HTTP Upgrade token of the replication stream.
// Its number is the frame format's (replproto.Version).
const StreamUpgrade = "lupool-repl/2"

// ErrPeerDown is returned (wrapped with the cause) by a stream whose
// connection failed or whose peer did not answer within the ack timeout.
// A write that failed with it may or may not have landed on the peer.
var ErrPeerDown = errors.New("replication: peer connection down")

// peerConn is the requesting side of one replication stream: requests are
// pipelined, replies are matched by handle. Safe for concurrent use.
type peerConn struct {
	conn    net.Conn
	br      *bufio.Reader
	timeout time.Duration

	// Outgoing frames are appended to out. The requester that finds no
	// write in progress becomes the writer: it writes everything queued,
	// including frames other requesters append meanwhile, until the queue
	// is empty. Alone, a request is written by its own goroutine with no
	// hand-off.
	//
	// Under load, frames are held back the way Nagle's algorithm holds
	// back small segments: while sendWindow batches (system calls' worth
	// of frames) are unanswered, new frames wait in out, and the reader
	// writes them as one batch when the oldest batch has been answered in
	// full (or a requester does, if out has grown past holdMaxBytes). A
	// lone request or two in flight are never held; at iodepth 32 a batch
	// carries several writes, and the copy reads, applies and answers them
	// with one system call each way instead of one per write.
	qmu       sync.Mutex
	out       []byte   // guarded by qmu; frames not yet written
	outFrames uint64   // guarded by qmu; how many frames out holds
	spare     []byte   // guarded by qmu; the other buffer, owned by the writer while writing
	writing   bool     // guarded by qmu
	sent      uint64   // guarded by qmu; frames handed to the connection so far
	batchEnds []uint64 // guarded by qmu; for each unanswered batch, sent after it
	// replied counts replies received; nextEnd is batchEnds[0] (or the
	// maximum when none is unanswered), for the reader's check without qmu.
	replied atomic.Uint64
	nextEnd atomic.Uint64

	mu struct {
		sync.Mutex
		pending map[uint64]*call // guarded by mu
		next    uint64           // guarded by mu; last handle used
		err     error            // guarded by mu; set once, when the stream fails
	}
	done  chan struct{} // closed when the stream fails or is closed
	calls sync.Pool     // of *call
	// onChecksum, if set, is called on the reader for each reply whose
	// payload failed its checksum. Immutable.
	onChecksum func()
}

// sendWindow is how many batches may be unanswered before new frames are
// held back; holdMaxBytes is how many bytes may be held back before a
// requester writes them regardless.
const (
	sendWindow   = 2
	holdMaxBytes = 256 << 10
)

// call is one request waiting for its reply.
type call struct {
	dst   []byte // where a Read or Hash reply's payload goes
	start time.Time
	reply replproto.Header
	err   error
	done  chan struct{}
	// async, when set, is told of the answer instead of done (startAsync).
	async asyncCaller
	slot  int
}

// asyncCaller is told of the answer to a request started with startAsync,
// on the stream's reader (or on whoever fails the stream). It must not
// block; a ReplyFlusher it returns is flushed before the reader next waits.
type asyncCaller interface {
	answered(slot int, err error) blockdev.ReplyFlusher
}

// deliver hands cl's answer to its waiter. An asynchronous call is
// recycled here; the ReplyFlusher its caller returned, if any, is returned.
func (c *peerConn) deliver(cl *call) blockdev.ReplyFlusher {
	if cl.async == nil {
		cl.done <- struct{}{}
		return nil
	}
	w, slot, err := cl.async, cl.slot, cl.err
	cl.async, cl.dst = nil, nil
	c.calls.Put(cl)
	return w.answered(slot, err)
}

// dialStream connects to node at apiAddr through m's Dial, upgrades to a
// replication stream and introduces itself with hello at epoch. It returns
// the peer's epoch from the hello reply.
func (m *Manager) dialStream(ctx context.Context, node, apiAddr string, hello replproto.Hello, epoch uint64, sizeBytes int64) (*peerConn, uint64, error) {
	timeout := m.opts.AckTimeout
	dctx, cancel := context.WithTimeout(ctx, timeout)
	conn, err := m.opts.Dial(dctx, node, apiAddr)
	cancel()
	if err != nil {
		return nil, 0, fmt.Errorf("%w: dial %s: %v", ErrPeerDown, apiAddr, err)
	}
	if tc, ok := conn.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true) // mutual-TLS dialers set it themselves
	}
	fail := func(err error) (*peerConn, uint64, error) {
		conn.Close()
		return nil, 0, err
	}
	_ = conn.SetDeadline(time.Now().Add(timeout))
	req := "GET " + StreamPath + " HTTP/1.1\r\nHost: " + apiAddr +
		"\r\nConnection: Upgrade\r\nUpgrade: " + StreamUpgrade + "\r\n\r\n"
	if _, err := io.WriteString(conn, req); err != nil {
		return fail(fmt.Errorf("%w: %s: %v", ErrPeerDown, apiAddr, err))
	}
	br := bufio.NewReaderSize(conn, 64<<10)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return fail(fmt.Errorf("%w: %s: upgrade: %v", ErrPeerDown, apiAddr, err))
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		resp.Body.Close()
		return fail(fmt.Errorf("%w: %s refused the replication stream: %s %s", ErrPeerDown, apiAddr, resp.Status, body))
	}
	payload := replproto.AppendHello(nil, hello)
	h := replproto.Header{Type: replproto.TypeHello, Epoch: epoch, Offset: uint64(sizeBytes)}
	if _, err := conn.Write(replproto.AppendFrame(nil, h, payload)); err != nil {
		return fail(fmt.Errorf("%w: %s: hello: %v", ErrPeerDown, apiAddr, err))
	}
	var hb [replproto.HeaderBytes]byte
	rh, err := replproto.ReadHeader(br, &hb)
	if err != nil {
		return fail(fmt.Errorf("%w: %s: hello reply: %v", ErrPeerDown, apiAddr, err))
	}
	if rh.Type != replproto.TypeReply|replproto.TypeHello {
		return fail(fmt.Errorf("%w: %s: hello answered with %v", ErrPeerDown, apiAddr, rh.Type))
	}
	if rh.Status != replproto.StatusOK {
		msg := make([]byte, rh.PayloadLen)
		_, _ = io.ReadFull(br, msg)
		return fail(fmt.Errorf("%s: hello for %s: %w: %s", apiAddr, hello.LU, rh.Status.Err(), msg))
	}
	_ = conn.SetDeadline(time.Time{})
	c := &peerConn{conn: conn, br: br, timeout: timeout, done: make(chan struct{})}
	replyChecksum := m.luCounter(m.metrics.checksumRefused, nil, hello.LU, "reply")
	c.onChecksum = replyChecksum.Inc
	c.mu.pending = map[uint64]*call{}
	c.nextEnd.Store(math.MaxUint64)
	go c.readLoop()
	go c.watchdog()
	return c, rh.Epoch, nil
}

// fail ends the stream once; every pending and later call gets err.
func (c *peerConn) fail(err error) {
	c.mu.Lock()
	if c.mu.err != nil {
		c.mu.Unlock()
		return
	}
	c.mu.err = err
	pending := c.mu.pending
	c.mu.pending = map[uint64]*call{}
	close(c.done)
	c.mu.Unlock()
	c.conn.Close()
	for _, cl := range pending {
		cl.err = err
		if fl := c.deliver(cl); fl != nil {
			fl.FlushReplies()
		}
	}
}

// Close ends the stream; calls in flight fail with ErrPeerDown.
func (c *peerConn) Close() { c.fail(fmt.Errorf("%w: closed", ErrPeerDown)) }

// broken reports whether the stream has failed.
func (c *peerConn) broken() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

func (c *peerConn) readLoop() {
	var hb [replproto.HeaderBytes]byte
	// The replies to asynchronous calls that one read brought in are all
	// delivered before their clients' replies are flushed.
	var flushers []blockdev.ReplyFlusher
	keep := func(fl blockdev.ReplyFlusher) {
		if fl != nil && !slices.Contains(flushers, fl) {
			flushers = append(flushers, fl)
		}
	}
	flush := func() {
		for i, fl := range flushers {
			fl.FlushReplies()
			flushers[i] = nil
		}
		flushers = flushers[:0]
	}
	defer flush()
	for {
		if len(flushers) > 0 && c.br.Buffered() < replproto.HeaderBytes && pendingBelow(c.conn) == 0 {
			flush()
		}
		h, err := replproto.ReadHeader(c.br, &hb)
		if err != nil {
			c.fail(fmt.Errorf("%w: read reply: %v", ErrPeerDown, err))
			return
		}
		c.mu.Lock()
		cl := c.mu.pending[h.Handle]
		delete(c.mu.pending, h.Handle)
		c.mu.Unlock()
		if cl == nil {
			c.fail(fmt.Errorf("%w: reply for unknown handle %d", ErrPeerDown, h.Handle))
			return
		}
		cl.reply = h
		if h.PayloadLen > 0 {
			var dst []byte
			if len(flushers) > 0 && c.br.Buffered() < int(h.PayloadLen) {
				flush() // reading the payload may block
			}
			if h.Status == replproto.StatusOK && int(h.PayloadLen) <= len(cl.dst) {
				dst = cl.dst[:h.PayloadLen]
			} else {
				dst = make([]byte, h.PayloadLen)
			}
			if _, err := io.ReadFull(c.br, dst); err != nil {
				err = fmt.Errorf("%w: read reply payload: %v", ErrPeerDown, err)
				cl.err = err
				keep(c.deliver(cl))
				c.fail(err)
				return
			}
			if err := h.CheckPayload(dst); err != nil {
				// A Read's data or a Hash's digest that changed on the way
				// fails its request; the caller never sees those bytes.
				cl.err = fmt.Errorf("%w: reply to %v: %w", blockdev.ErrIO, h.Type, err)
				if c.onChecksum != nil {
					c.onChecksum()
				}
			} else if h.Status != replproto.StatusOK {
				cl.err = fmt.Errorf("%w: %s", h.Status.Err(), dst)
			}
		} else if h.Status != replproto.StatusOK {
			cl.err = h.Status.Err()
		}
		keep(c.deliver(cl))
		if c.replied.Add(1) >= c.nextEnd.Load() {
			c.qmu.Lock()
			unanswered := c.unansweredLocked()
			if c.writing || len(c.out) == 0 || unanswered >= sendWindow {
				c.qmu.Unlock()
				continue
			}
			// The held frames go out now, but not from this goroutine:
			// a reader blocked in a write while the peer is blocked
			// writing its answers to it would stall both.
			c.writing = true
			c.qmu.Unlock()
			go c.writeQueued()
		}
	}
}

// watchdog fails the stream when the oldest pending call has waited
// longer than the ack timeout: a peer that stops answering is down.
func (c *peerConn) watchdog() {
	tick := time.NewTicker(c.timeout / 4)
	defer tick.Stop()
	for {
		select {
		case <-c.done:
			return
		case now := <-tick.C:
			c.mu.Lock()
			late := false
			for _, cl := range c.mu.pending {
				if now.Sub(cl.start) > c.timeout {
					late = true
					break
				}
			}
			c.mu.Unlock()
			if late {
				c.fail(fmt.Errorf("%w: no reply within %v", ErrPeerDown, c.timeout))
				return
			}
		}
	}
}

// start sends one request and returns the call to wait on. dst receives a
// Read's data or a Hash's digest.
func (c *peerConn) start(h replproto.Header, payload, dst []byte) (*call, error) {
	return c.begin(h, payload, dst, nil, 0)
}

// startAsync sends one request whose answer goes to w.answered(slot, err).
// If it returns an error, the request was not sent and w is not called.
func (c *peerConn) startAsync(h replproto.Header, payload []byte, w asyncCaller, slot int) error {
	_, err := c.begin(h, payload, nil, w, slot)
	return err
}

func (c *peerConn) begin(h replproto.Header, payload, dst []byte, w asyncCaller, slot int) (*call, error) {
	cl, _ := c.calls.Get().(*call)
	if cl == nil {
		cl = &call{done: make(chan struct{}, 1)}
	}
	cl.dst, cl.err, cl.reply, cl.start = dst, nil, replproto.Header{}, time.Now()
	cl.async, cl.slot = w, slot
	h.PayloadCRC = replproto.Checksum(payload) // before c.qmu, which other requesters wait for
	c.mu.Lock()
	if c.mu.err != nil {
		err := c.mu.err
		c.mu.Unlock()
		c.calls.Put(cl)
		return nil, err
	}
	c.mu.next++
	h.Handle = c.mu.next
	c.mu.pending[h.Handle] = cl
	c.mu.Unlock()

	c.qmu.Lock()
	c.out = replproto.AppendSummedFrame(c.out, h, payload)
	c.outFrames++
	if c.writing || c.holdLocked() {
		c.qmu.Unlock()
		return cl, nil
	}
	c.writing = true
	c.writeQueuedLocked()
	return cl, nil
}

// unansweredLocked drops the batches answered in full and returns how many
// are left. c.qmu must be held.
func (c *peerConn) unansweredLocked() int {
	replied := c.replied.Load()
	n := 0
	for n < len(c.batchEnds) && replied >= c.batchEnds[n] {
		n++
	}
	if n > 0 {
		c.batchEnds = append(c.batchEnds[:0], c.batchEnds[n:]...)
		c.setNextEndLocked()
	}
	return len(c.batchEnds)
}

func (c *peerConn) setNextEndLocked() {
	if len(c.batchEnds) == 0 {
		c.nextEnd.Store(math.MaxUint64)
	} else {
		c.nextEnd.Store(c.batchEnds[0])
	}
}

// holdLocked reports whether the queued frames wait for an answer rather
// than being written now. c.qmu must be held.
func (c *peerConn) holdLocked() bool {
	unanswered := c.unansweredLocked() // always: it also trims batchEnds
	return len(c.out) < holdMaxBytes && unanswered >= sendWindow
}

// writeQueued takes c.qmu and writes the queued frames; c.writing must
// have been set by the caller.
func (c *peerConn) writeQueued() {
	c.qmu.Lock()
	c.writeQueuedLocked()
}

// writeQueuedLocked writes the queued frames as batches until the queue is
// empty or held back, then gives up the writer role and c.qmu. c.qmu must
// be held and c.writing set by the caller.
func (c *peerConn) writeQueuedLocked() {
	for {
		buf := c.out
		c.sent += c.outFrames
		c.out, c.outFrames = c.spare[:0], 0
		c.batchEnds = append(c.batchEnds, c.sent)
		c.setNextEndLocked()
		c.qmu.Unlock()
		_ = c.conn.SetWriteDeadline(time.Now().Add(c.timeout))
		_, err := c.conn.Write(buf)
		if cap(buf) > 4<<20 {
			buf = nil // do not keep a resync burst's buffer
		}
		c.qmu.Lock()
		c.spare = buf
		if err != nil {
			c.writing = false
			c.out, c.outFrames = c.out[:0], 0
			c.qmu.Unlock()
			c.fail(fmt.Errorf("%w: send: %v", ErrPeerDown, err))
			return
		}
		if len(c.out) == 0 || c.holdLocked() {
			c.writing = false
			c.qmu.Unlock()
			return
		}
	}
}

// wait waits for cl's reply (or the stream's failure) and recycles cl.
func (c *peerConn) wait(cl *call) (replproto.Header, error) {
	<-cl.done
	h, err := cl.reply, cl.err
	cl.dst = nil
	c.calls.Put(cl)
	return h, err
}

// do sends a request and waits for its reply.
func (c *peerConn) do(h replproto.Header, payload, dst []byte) (replproto.Header, error) {
	cl, err := c.start(h, payload, dst)
	if err != nil {
		return replproto.Header{}, err
	}
	return c.wait(cl)
}
