package replication

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/replication/replproto"
)

// streamInflightMax bounds the requests one stream runs at once; the
// stream stops reading (and so pushes back on its sender) beyond it.
const streamInflightMax = 64

// epochWaitMax bounds how long a copy waits for its metadata to reach the
// epoch a request carries (the writer committed a change this node has not
// applied yet).
const epochWaitMax = 2 * time.Second

// target is what one accepted stream applies its requests to.
type target struct {
	dev  blockdev.Device
	role replproto.Role
	name string
	// peer is the sender's node id, from its certificate.
	peer string
	// received counts write bytes by kind (live, resync) for a copy.
	receivedLive, receivedResync prometheus.Counter
	// servedReads counts bytes read for a forwarding node (RoleClient).
	servedReads prometheus.Counter
}

// ServeStream runs the receiving side of one replication stream on conn,
// whose buffered reader br may hold bytes already read, from the node peer.
// peer is the sender's identity as its certificate proves it, never a
// message field: a copy takes frames only from the node its record names
// as writer at the frame's epoch, and a writer serves forwarded client I/O
// only to members. It returns when the stream ends. The peer port's HTTP
// server calls it for StreamPath upgrades.
func (m *Manager) ServeStream(peer string, conn net.Conn, br *bufio.Reader) {
	defer conn.Close()
	br = readerOfSize(conn, br, streamReadBufferBytes)
	if tc, ok := conn.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true)
	}
	// Replies go through one buffered writer. A copy applies its requests
	// in order on this goroutine (a page-cache write takes microseconds) and
	// flushes replies once no further request is waiting in the read
	// buffer; forwarded client I/O runs on its own goroutines (it waits for
	// the network) and flushes each reply.
	var wmu sync.Mutex
	bw := bufio.NewWriterSize(conn, 64<<10)
	// The reply header is marshalled under wmu into one buffer per
	// stream: a header per reply would escape to the heap.
	var replyHdr [replproto.HeaderBytes]byte
	send := func(h replproto.Header, payload []byte, flush bool) error {
		h.PayloadLen, h.PayloadCRC = uint32(len(payload)), replproto.Checksum(payload)
		wmu.Lock()
		defer wmu.Unlock()
		h.Marshal(replyHdr[:])
		_ = conn.SetWriteDeadline(time.Now().Add(m.opts.AckTimeout))
		if _, err := bw.Write(replyHdr[:]); err != nil {
			return err
		}
		if _, err := bw.Write(payload); err != nil {
			return err
		}
		if flush {
			return bw.Flush()
		}
		return nil
	}
	reply := func(h replproto.Header, payload []byte) error { return send(h, payload, true) }
	failWith := func(h replproto.Header, err error, epoch uint64, flush bool) error {
		msg := err.Error()
		if len(msg) > replproto.MessageBytesMax {
			msg = msg[:replproto.MessageBytesMax]
		}
		return send(replproto.Header{Type: replproto.TypeReply | h.Type, Status: replproto.StatusOf(err),
			Handle: h.Handle, Epoch: epoch, Offset: h.Offset, Length: h.Length}, []byte(msg), flush)
	}
	fail := func(h replproto.Header, err error, epoch uint64) error { return failWith(h, err, epoch, true) }

	var hb [replproto.HeaderBytes]byte
	_ = conn.SetReadDeadline(time.Now().Add(m.opts.AckTimeout))
	h, err := replproto.ReadHeader(br, &hb)
	if err != nil || h.Type != replproto.TypeHello {
		m.opts.Logger.Warn("replication stream without hello", "remote", conn.RemoteAddr(), "err", err, "type", h.Type)
		return
	}
	payload := make([]byte, h.PayloadLen)
	if _, err := io.ReadFull(br, payload); err != nil {
		return
	}
	if err := h.CheckPayload(payload); err != nil {
		m.opts.Logger.Warn("replication stream hello refused", "remote", conn.RemoteAddr(), "err", err)
		_ = fail(h, err, 0)
		return
	}
	hello, err := replproto.ParseHello(payload)
	if err != nil {
		_ = fail(h, fmt.Errorf("%w: %v", blockdev.ErrInvalid, err), 0)
		return
	}
	if hello.Role == replproto.RolePair {
		if peer == "" || hello.Node != peer || !m.opts.IsMember(peer) {
			_ = fail(h, fmt.Errorf("%w: pair heartbeat from %q (certificate %q), not a member", replproto.ErrForbidden, hello.Node, peer), 0)
			return
		}
		if reply(replproto.Header{Type: replproto.TypeReply | replproto.TypeHello, Handle: h.Handle}, nil) == nil {
			_ = conn.SetReadDeadline(time.Time{})
			m.servePair(peer, conn, br, reply)
		}
		return
	}
	tgt, epoch, err := m.streamTarget(hello, h.Epoch, peer)
	if err != nil {
		if errors.Is(err, replproto.ErrStaleEpoch) {
			m.luCounter(m.metrics.staleRefused, nil, hello.LU).Inc()
		}
		m.opts.Logger.Warn("replication stream refused", "lu", hello.LU, "peer", peer, "hello_node", hello.Node, "role", hello.Role, "err", err)
		_ = fail(h, err, epoch)
		return
	}
	if err := reply(replproto.Header{Type: replproto.TypeReply | replproto.TypeHello, Handle: h.Handle, Epoch: epoch}, nil); err != nil {
		return
	}
	_ = conn.SetReadDeadline(time.Time{})
	m.opts.Logger.Debug("replication stream open", "lu", hello.LU, "from", hello.Node, "role", hello.Role)

	sem := make(chan struct{}, streamInflightMax)
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		h, err := replproto.ReadHeader(br, &hb)
		if err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				m.opts.Logger.Debug("replication stream ends", "lu", hello.LU, "from", hello.Node, "err", err)
			}
			return
		}
		var data []byte
		if h.PayloadLen > 0 { // a Write's data (PayloadLen == Length), a snapshot marker's name
			data = m.bufs.Get(int(h.PayloadLen))
			if _, err := io.ReadFull(br, data); err != nil {
				m.bufs.Put(data)
				return
			}
			// The payload is checked before anything uses it: a frame
			// corrupted on the way is refused, never written.
			if err := h.CheckPayload(data); err != nil {
				m.bufs.Put(data)
				m.luCounter(m.metrics.checksumRefused, nil, hello.LU, "served").Inc()
				m.opts.Logger.Warn("replication frame refused: checksum mismatch", "lu", hello.LU, "from", hello.Node, "offset", h.Offset, "length", h.Length, "err", err)
				var epoch uint64
				if rec, ok := m.record(hello.LU); ok {
					epoch = rec.Epoch
				}
				if failWith(h, err, epoch, true) != nil {
					return
				}
				continue
			}
		}
		if tgt.role == replproto.RoleCopy {
			out, epoch, err := m.applyStream(tgt, h, data)
			m.bufs.Put(data)
			flush := br.Buffered() < replproto.HeaderBytes && pendingBelow(conn) == 0
			if err != nil {
				err = failWith(h, err, epoch, flush)
			} else {
				err = send(replproto.Header{Type: replproto.TypeReply | h.Type, Handle: h.Handle, Epoch: epoch,
					Offset: m.replyOffset(h), Length: h.Length}, out, flush)
				if h.Type == replproto.TypeRead {
					m.bufs.Put(out)
				}
			}
			if err != nil {
				return
			}
			continue
		}
		sem <- struct{}{}
		wg.Add(1)
		go func(h replproto.Header, data []byte) {
			defer func() { <-sem; wg.Done() }()
			defer m.bufs.Put(data)
			out, epoch, err := m.applyStream(tgt, h, data)
			if err != nil {
				if fail(h, err, epoch) != nil {
					conn.Close()
				}
				return
			}
			if reply(replproto.Header{Type: replproto.TypeReply | h.Type, Handle: h.Handle, Epoch: epoch,
				Offset: m.replyOffset(h), Length: h.Length}, out) != nil {
				conn.Close()
			}
			if h.Type == replproto.TypeRead {
				m.bufs.Put(out)
			}
		}(h, data)
	}
}

// pendingBelow returns the bytes conn has received but not yet handed up
// (the ciphertext of further TLS records on a peer-port connection); 0 for
// a connection that cannot tell.
func pendingBelow(conn net.Conn) int {
	if p, ok := conn.(interface{ Pending() int }); ok {
		return p.Pending()
	}
	return 0
}

// streamReadBufferBytes is the read buffer of a served stream: a batch of
// 4 KiB writes is read with one system call, not two per write as through
// the 4 KiB buffer net/http hands over with the connection.
const streamReadBufferBytes = 256 << 10

// readerOfSize returns a reader of conn with at least size bytes of buffer
// that first yields what br has already buffered.
func readerOfSize(conn net.Conn, br *bufio.Reader, size int) *bufio.Reader {
	if br.Size() >= size {
		return br
	}
	pre, _ := br.Peek(br.Buffered()) // buffered: cannot fail
	return bufio.NewReaderSize(io.MultiReader(bytes.NewReader(bytes.Clone(pre)), conn), size)
}

// streamTarget resolves a hello to the device its requests apply to.
func (m *Manager) streamTarget(hello replproto.Hello, epoch uint64, peer string) (target, uint64, error) {
	if peer == "" || hello.Node != peer {
		return target{}, 0, fmt.Errorf("%w: hello names node %q but the sender's certificate is %q", replproto.ErrForbidden, hello.Node, peer)
	}
	rec, err := m.waitRecord(hello.LU, epoch)
	if err != nil {
		return target{}, rec.Epoch, err
	}
	switch hello.Role {
	case replproto.RoleCopy:
		if rec.Writer != peer {
			return target{}, rec.Epoch, fmt.Errorf("%w: %s is not the writer of %s at epoch %d (%s is)", replproto.ErrForbidden, peer, rec.Name, rec.Epoch, rec.Writer)
		}
		if rec.Writer == m.opts.NodeID {
			return target{}, rec.Epoch, fmt.Errorf("%w: this node is the writer of %s", blockdev.ErrInvalid, rec.Name)
		}
		vol, ok := m.Volume(hello.LU)
		if !ok || !holdsCopy(rec, m.opts.NodeID) {
			return target{}, rec.Epoch, fmt.Errorf("%w: no copy of %s on %s", replproto.ErrNotFound, hello.LU, m.opts.NodeID)
		}
		if m.isLost(hello.LU) {
			return target{}, rec.Epoch, fmt.Errorf("%w: the copy of %s on %s lost its data at start and waits to be recorded new", replproto.ErrNotFound, hello.LU, m.opts.NodeID)
		}
		return target{dev: vol, role: hello.Role, name: hello.LU, peer: peer,
			receivedLive:   m.luCounter(m.metrics.copyReceived, m.holdsOwnCopy, hello.LU, "live"),
			receivedResync: m.luCounter(m.metrics.copyReceived, m.holdsOwnCopy, hello.LU, "resync")}, rec.Epoch, nil
	case replproto.RoleClient:
		if !m.opts.IsMember(peer) {
			return target{}, rec.Epoch, fmt.Errorf("%w: %s is not a member of the cluster", replproto.ErrForbidden, peer)
		}
		mir, ok := m.mirror(hello.LU)
		if !ok {
			return target{}, rec.Epoch, fmt.Errorf("%w: %s's writer is %s, not %s", replproto.ErrNotWriter, hello.LU, rec.Writer, m.opts.NodeID)
		}
		return target{dev: mir, role: hello.Role, name: hello.LU, peer: peer,
			servedReads: m.luCounter(m.metrics.servedReads, nil, hello.LU)}, rec.Epoch, nil
	}
	return target{}, rec.Epoch, fmt.Errorf("%w: role %d", blockdev.ErrInvalid, hello.Role)
}

// waitRecord returns the LU's record once this node has applied epoch (or
// a later one); a request from a newer writer may arrive before this node
// applied the change that made it the writer.
func (m *Manager) waitRecord(name string, epoch uint64) (cluster.LU, error) {
	deadline := time.Now().Add(epochWaitMax)
	for {
		rec, ok := m.record(name)
		if !ok {
			if time.Now().After(deadline) {
				return cluster.LU{}, fmt.Errorf("%w: no LU %s on %s", replproto.ErrNotFound, name, m.opts.NodeID)
			}
		} else {
			if epoch < rec.Epoch {
				return rec, fmt.Errorf("%w: request epoch %d, LU %s is at epoch %d", replproto.ErrStaleEpoch, epoch, name, rec.Epoch)
			}
			if epoch == rec.Epoch || time.Now().After(deadline) {
				if epoch > rec.Epoch {
					return rec, fmt.Errorf("%w: request epoch %d is ahead of this node's metadata (epoch %d)", blockdev.ErrIO, epoch, rec.Epoch)
				}
				return rec, nil
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// replyOffset is the offset of the reply to h: the request's, except in
// a ping's reply, which carries this node's lease clock at the answer for
// the writer to echo in its next ping (copyLease).
func (m *Manager) replyOffset(h replproto.Header) uint64 {
	if h.Type == replproto.TypePing {
		return uint64(m.now())
	}
	return h.Offset
}

// applyStream runs one request against the stream's target.
func (m *Manager) applyStream(tgt target, h replproto.Header, data []byte) (out []byte, epoch uint64, err error) {
	ctx := context.Background()
	if tgt.role == replproto.RoleCopy {
		rec, err := m.waitRecord(tgt.name, h.Epoch)
		if err != nil {
			if errors.Is(err, replproto.ErrStaleEpoch) {
				m.luCounter(m.metrics.staleRefused, nil, tgt.name).Inc()
			}
			return nil, rec.Epoch, err
		}
		epoch = rec.Epoch
		if rec.Writer != tgt.peer {
			// The writer moved since the hello: this sender is fenced.
			return nil, epoch, fmt.Errorf("%w: %s is no longer the writer of %s at epoch %d", replproto.ErrStaleEpoch, tgt.peer, tgt.name, epoch)
		}
		defer func() {
			if err == nil {
				m.answeredWriter(tgt.name)
			}
		}()
		if h.Type == replproto.TypeWrite {
			if h.Flags&replproto.FlagResync != 0 {
				tgt.receivedResync.Add(float64(len(data)))
			} else {
				tgt.receivedLive.Add(float64(len(data)))
			}
		}
	} else if rec, ok := m.record(tgt.name); ok {
		epoch = rec.Epoch
	}
	off, length := int64(h.Offset), int64(h.Length)
	flags := blockdev.Flags(0)
	if h.Flags&replproto.FlagFUA != 0 {
		flags |= blockdev.FUA
	}
	if h.Flags&replproto.FlagNoHole != 0 {
		flags |= blockdev.NoHole
	}
	if h.Flags&replproto.FlagFastZero != 0 {
		flags |= blockdev.FastZero
	}
	dev := tgt.dev
	switch h.Type {
	case replproto.TypeWrite:
		err = dev.WriteAt(ctx, data, off, flags)
	case replproto.TypeTrim:
		if t, ok := dev.(blockdev.Trimmer); ok {
			err = t.Trim(ctx, off, length, flags)
		}
	case replproto.TypeZero:
		if z, ok := dev.(blockdev.Zeroer); ok {
			err = z.WriteZeroes(ctx, off, length, flags)
		} else {
			err = blockdev.ErrNotSupported
		}
	case replproto.TypeFlush:
		err = dev.Flush(ctx)
	case replproto.TypeRead:
		out = m.bufs.Get(int(length))
		if err = dev.ReadAt(ctx, out, off); err != nil {
			m.bufs.Put(out)
			out = nil
		} else if tgt.role == replproto.RoleClient {
			tgt.servedReads.Add(float64(length))
		}
	case replproto.TypeHash:
		buf := m.bufs.Get(int(length))
		if err = dev.ReadAt(ctx, buf, off); err == nil {
			sum := sha256.Sum256(buf)
			out = sum[:]
		}
		m.bufs.Put(buf)
	case replproto.TypePing:
		if tgt.role == replproto.RoleCopy {
			m.renewLeaseFrom(tgt.name, int64(h.Offset))
		}
	case replproto.TypeLog:
		if tgt.role != replproto.RoleCopy {
			err = fmt.Errorf("%w: Log on a client stream", blockdev.ErrInvalid)
			break
		}
		out, err = m.logReply(tgt.name)
	case replproto.TypeSnapshot, replproto.TypeRollback:
		err = m.applyMarker(ctx, tgt, h.Type, data) // snapshot.go
	default:
		err = fmt.Errorf("%w: request type %v", blockdev.ErrInvalid, h.Type)
	}
	return out, epoch, err
}
