package nbd

import (
	"encoding/binary"
	"errors"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/server/nbdproto"
)

// handle runs one request and answers it. Counters are updated before the
// reply is written, so a client that has its reply sees them.
func (c *conn) handle(r *request) {
	if !c.readIntoReply(r) {
		code, err := r.errCode, error(nil)
		if code == 0 {
			code, err = c.execute(r)
			if err != nil && c.srv.opts.OnDeviceError != nil && c.ctx.Err() == nil {
				c.srv.mu.Lock()
				name := c.exportName
				c.srv.mu.Unlock()
				c.srv.opts.OnDeviceError(name, nbdproto.CommandName(r.hdr.Type), err)
			}
		}
		c.account(r, code)
		switch {
		case code != 0:
			c.replyError(r, code, err)
		case r.hdr.Type == nbdproto.CmdRead && r.hdr.Length > 0:
			c.replyRead(r)
		case r.hdr.Type == nbdproto.CmdBlockStatus:
			c.replyBlockStatus(r)
		default:
			c.replyOK(r)
		}
	}
	c.finishRequest(r)
}

// finishRequest ends r once it is answered.
func (c *conn) finishRequest(r *request) {
	c.release(r)
	c.inflight.Add(-1)
}

// account updates counters for a finished request, once, before its reply
// is written. The in-flight gauge drops here too, so that a client that has
// its reply sees it (ConnStat.InflightRequests, which Shutdown waits on,
// drops only after the reply).
func (c *conn) account(r *request, code uint32) {
	if c.metrics != nil {
		c.metrics.inflight.Dec()
	}
	t := r.hdr.Type
	if int(t) >= numCommands {
		return
	}
	var payload uint64
	if code == 0 && (t == nbdproto.CmdRead || t == nbdproto.CmdWrite) {
		payload = uint64(r.hdr.Length)
	}
	s := &c.stats[t]
	s.requests.Add(1)
	if code != 0 {
		s.errors.Add(1)
	}
	s.bytes.Add(payload)
	if c.metrics == nil {
		return
	}
	m := &c.metrics.commands[t]
	m.requests.Inc()
	if code != 0 {
		m.errors.Inc()
	}
	if payload != 0 {
		m.bytes.Add(float64(payload))
	}
	m.duration.Observe(time.Since(r.start).Seconds())
}

// execute calls the device for a validated request and returns the NBD
// error code (0 on success). Reads leave their data in r.buf, block status
// its encoded payload in r.buf[:r.payloadBytes].
func (c *conn) execute(r *request) (uint32, error) {
	h := &r.hdr
	ctx := c.ctx
	off, n := int64(h.Offset), int64(h.Length)
	var err error
	switch h.Type {
	case nbdproto.CmdRead:
		return c.read(r)
	case nbdproto.CmdBlockStatus:
		return c.blockStatus(r)
	case nbdproto.CmdWrite:
		if n > 0 {
			err = c.dev.WriteAt(ctx, r.payload, off, fuaFlag(h.Flags))
		}
	case nbdproto.CmdFlush:
		err = c.dev.Flush(ctx)
	case nbdproto.CmdTrim:
		if n > 0 {
			err = c.trimmer.Trim(ctx, off, n, fuaFlag(h.Flags))
		}
	case nbdproto.CmdWriteZeroes:
		if n > 0 {
			err = c.writeZeroes(off, n, h.Flags)
		}
	case nbdproto.CmdCache:
		if c.cacher != nil && n > 0 {
			err = c.cacher.Cache(ctx, off, n)
		}
	}
	return errorCode(h.Type, err), err
}

func fuaFlag(f uint16) blockdev.Flags {
	if f&nbdproto.CmdFlagFUA != 0 {
		return blockdev.FUA
	}
	return 0
}

func (c *conn) writeZeroes(off, n int64, wire uint16) error {
	flags := fuaFlag(wire)
	if wire&nbdproto.CmdFlagNoHole != 0 {
		flags |= blockdev.NoHole
	}
	if wire&nbdproto.CmdFlagFastZero != 0 {
		flags |= blockdev.FastZero
	}
	if c.zeroer != nil {
		return c.zeroer.WriteZeroes(c.ctx, off, n, flags)
	}
	// Emulate with writes of a shared zero buffer; FUA on the last one
	// covers the whole range only if the device orders them, so flush.
	for n > 0 {
		chunk := min(n, int64(len(c.srv.zeroes)))
		if err := c.dev.WriteAt(c.ctx, c.srv.zeroes[:chunk], off, 0); err != nil {
			return err
		}
		off, n = off+chunk, n-chunk
	}
	if flags&blockdev.FUA != 0 {
		return c.dev.Flush(c.ctx)
	}
	return nil
}

// read fills r.buf; the reply is sent only after the read succeeded.
func (c *conn) read(r *request) (uint32, error) {
	n := int(r.hdr.Length)
	if n == 0 {
		return 0, nil
	}
	r.buf = c.srv.pools.get(n)
	if err := c.dev.ReadAt(c.ctx, r.buf.b[:n], int64(r.hdr.Offset)); err != nil {
		return errorCode(r.hdr.Type, err), err
	}
	return 0, nil
}

// maxReadReplyHeadBytes is the longest header in front of read data.
const maxReadReplyHeadBytes = nbdproto.StructuredReplySize + nbdproto.OffsetDataHeaderSize

// readIntoReply runs an inline read, or tries a try read, straight into the
// free space of the reply writer, and puts the reply header in front of the
// data once the read has succeeded: one copy less than reading into a
// buffer. It reports false, having answered nothing, when r is neither, when
// the reply does not fit the writer, or when the device would wait for a
// try read.
func (c *conn) readIntoReply(r *request) bool {
	n := int(r.hdr.Length)
	if r.errCode != 0 || r.hdr.Type != nbdproto.CmdRead || n == 0 || !(r.inline || r.try) {
		return false
	}
	head := nbdproto.SimpleReplySize
	if c.sess.structured {
		head = nbdproto.StructuredReplySize + nbdproto.OffsetDataHeaderSize
	}
	if head+n > c.bw.Size() {
		return false
	}
	c.beginReply()
	if c.bw.Available() < head+n && !c.broken.Load() {
		if err := c.bw.Flush(); err != nil {
			c.fail()
		}
	}
	if c.broken.Load() || c.bw.Available() < head+n {
		c.endReply()
		return false
	}
	b := c.bw.AvailableBuffer()[:head+n]
	var err error
	if r.try {
		var done bool
		if done, err = c.tryr.TryReadAt(c.ctx, b[head:], int64(r.hdr.Offset)); !done && err == nil {
			c.endReply()
			return false
		}
	} else {
		err = c.dev.ReadAt(c.ctx, b[head:], int64(r.hdr.Offset))
	}
	if err != nil {
		c.endReply()
		code := errorCode(r.hdr.Type, err)
		c.account(r, code)
		c.replyError(r, code, err)
		return true
	}
	c.account(r, 0)
	if c.sess.structured {
		nbdproto.PutStructuredReply(b, nbdproto.StructuredReply{
			Flags: nbdproto.ReplyFlagDone, Type: nbdproto.ReplyTypeOffsetData,
			Handle: r.hdr.Handle, Length: uint32(nbdproto.OffsetDataHeaderSize + n),
		})
		binary.BigEndian.PutUint64(b[nbdproto.StructuredReplySize:], r.hdr.Offset)
	} else {
		nbdproto.PutSimpleReply(b, 0, r.hdr.Handle)
	}
	c.write(b) // copies b onto itself: no move
	c.endReply()
	return true
}

// replyRead answers a successful read with its data. A large payload
// goes through the writer too: the writer copies what fits its free space
// and writes the rest straight from r.buf. (One writev of header and
// payload was measured slower for 1 MiB reads on loopback: 0.83x.)
func (c *conn) replyRead(r *request) {
	n := int(r.hdr.Length)
	c.beginReply()
	if c.sess.structured {
		b := r.scratch[:nbdproto.StructuredReplySize+nbdproto.OffsetDataHeaderSize]
		nbdproto.PutStructuredReply(b, nbdproto.StructuredReply{
			Flags: nbdproto.ReplyFlagDone, Type: nbdproto.ReplyTypeOffsetData,
			Handle: r.hdr.Handle, Length: uint32(nbdproto.OffsetDataHeaderSize + n),
		})
		binary.BigEndian.PutUint64(b[nbdproto.StructuredReplySize:], r.hdr.Offset)
		c.write(b)
	} else {
		b := r.scratch[:nbdproto.SimpleReplySize]
		nbdproto.PutSimpleReply(b, 0, r.hdr.Handle)
		c.write(b)
	}
	c.write(r.buf.b[:n])
	c.endReply()
}

// appendReadReply appends the reply of a successful read with its data
// (r.buf), as replyRead writes it.
func (c *conn) appendReadReply(b []byte, r *request) []byte {
	n := int(r.hdr.Length)
	if c.sess.structured {
		h := r.scratch[:nbdproto.StructuredReplySize+nbdproto.OffsetDataHeaderSize]
		nbdproto.PutStructuredReply(h, nbdproto.StructuredReply{
			Flags: nbdproto.ReplyFlagDone, Type: nbdproto.ReplyTypeOffsetData,
			Handle: r.hdr.Handle, Length: uint32(nbdproto.OffsetDataHeaderSize + n),
		})
		binary.BigEndian.PutUint64(h[nbdproto.StructuredReplySize:], r.hdr.Offset)
		b = append(b, h...)
	} else {
		h := r.scratch[:nbdproto.SimpleReplySize]
		nbdproto.PutSimpleReply(h, 0, r.hdr.Handle)
		b = append(b, h...)
	}
	return append(b, r.buf.b[:n]...)
}

// blockStatus answers NBD_CMD_BLOCK_STATUS for base:allocation.
func (c *conn) blockStatus(r *request) (uint32, error) {
	off, length := int64(r.hdr.Offset), int64(r.hdr.Length)
	ext := r.extents[:0]
	if c.extenter == nil {
		ext = append(ext, blockdev.Extent{LengthBytes: length})
	} else {
		var err error
		pos, end := off, off+length
		for range 64 {
			before := len(ext)
			ext, err = c.extenter.Extents(c.ctx, pos, end-pos, ext)
			if err != nil {
				r.extents = ext
				return errorCode(r.hdr.Type, err), err
			}
			for _, e := range ext[before:] {
				pos += max(e.LengthBytes, 0)
			}
			if pos >= end || len(ext) == before || len(ext) >= MaxBlockStatusExtents ||
				r.hdr.Flags&nbdproto.CmdFlagReqOne != 0 {
				break
			}
		}
	}
	r.extents = ext
	// Merge, clamp to the request and encode.
	count := 0
	r.buf = c.srv.pools.get(blockStatusPayloadBytes)
	p := r.buf.b[:4]
	binary.BigEndian.PutUint32(p, contextIDAllocation)
	covered := int64(0)
	for i := 0; i < len(ext) && covered < length && count < MaxBlockStatusExtents; i++ {
		l := min(ext[i].LengthBytes, length-covered)
		if l <= 0 {
			continue
		}
		flags := uint32(ext[i].Flags) & (nbdproto.StateHole | nbdproto.StateZero)
		if count > 0 {
			last := p[len(p)-8:]
			if binary.BigEndian.Uint32(last[4:]) == flags {
				binary.BigEndian.PutUint32(last, binary.BigEndian.Uint32(last)+uint32(l))
				covered += l
				continue
			}
		}
		p = binary.BigEndian.AppendUint32(p, uint32(l))
		p = binary.BigEndian.AppendUint32(p, flags)
		covered += l
		count++
		if r.hdr.Flags&nbdproto.CmdFlagReqOne != 0 {
			break
		}
	}
	if count == 0 {
		return nbdproto.EIO, errNoExtents
	}
	r.payloadBytes = len(p)
	return 0, nil
}

var errNoExtents = errors.New("nbd: device returned no extents")

// blockStatusPayloadBytes is the largest block status payload: the context
// id and MaxBlockStatusExtents descriptors.
const blockStatusPayloadBytes = 4 + nbdproto.BlockStatusDescSize*MaxBlockStatusExtents

// replyBlockStatus sends the payload blockStatus encoded.
func (c *conn) replyBlockStatus(r *request) {
	c.beginReply()
	hb := r.scratch[:nbdproto.StructuredReplySize]
	nbdproto.PutStructuredReply(hb, nbdproto.StructuredReply{
		Flags: nbdproto.ReplyFlagDone, Type: nbdproto.ReplyTypeBlockStatus,
		Handle: r.hdr.Handle, Length: uint32(r.payloadBytes),
	})
	c.write(hb)
	c.write(r.buf.b[:r.payloadBytes])
	c.endReply()
}

// replyOK answers a successful request without payload.
func (c *conn) replyOK(r *request) {
	c.beginReply()
	c.write(c.appendOKReply(r.scratch[:0], r.hdr.Handle))
	c.endReply()
}

// appendOKReply appends the reply of a successful request without payload
// (simple, or a structured NBD_REPLY_TYPE_NONE chunk with the done flag).
func (c *conn) appendOKReply(b []byte, handle uint64) []byte {
	n := len(b)
	if c.sess.structured {
		b = append(b, make([]byte, nbdproto.StructuredReplySize)...)
		nbdproto.PutStructuredReply(b[n:], nbdproto.StructuredReply{
			Flags: nbdproto.ReplyFlagDone, Type: nbdproto.ReplyTypeNone, Handle: handle,
		})
	} else {
		b = append(b, make([]byte, nbdproto.SimpleReplySize)...)
		nbdproto.PutSimpleReply(b[n:], 0, handle)
	}
	return b
}

// maxErrorMessageBytes bounds the message in an error chunk.
const maxErrorMessageBytes = 256

// replyError answers with an error code (an error chunk with structured
// replies). err, if any, becomes the chunk's message.
func (c *conn) replyError(r *request, code uint32, err error) {
	c.beginReply()
	if !c.sess.structured {
		b := r.scratch[:nbdproto.SimpleReplySize]
		nbdproto.PutSimpleReply(b, code, r.hdr.Handle)
		c.write(b)
		c.endReply()
		return
	}
	var msg string
	if err != nil {
		msg = err.Error()
		if len(msg) > maxErrorMessageBytes {
			msg = msg[:maxErrorMessageBytes]
		}
	}
	b := r.scratch[:nbdproto.StructuredReplySize+nbdproto.ErrorChunkHeaderSize]
	nbdproto.PutStructuredReply(b, nbdproto.StructuredReply{
		Flags: nbdproto.ReplyFlagDone, Type: nbdproto.ReplyTypeError, Handle: r.hdr.Handle,
		Length: uint32(nbdproto.ErrorChunkHeaderSize + len(msg)),
	})
	binary.BigEndian.PutUint32(b[nbdproto.StructuredReplySize:], code)
	binary.BigEndian.PutUint16(b[nbdproto.StructuredReplySize+4:], uint16(len(msg)))
	c.write(b)
	c.writeString(msg)
	c.endReply()
}

// beginReply takes the writer. Replies are written between beginReply and
// endReply; the last writer in a burst flushes.
func (c *conn) beginReply() {
	c.pendingReplies.Add(1)
	c.wmu.Lock()
	// Moving the deadline on every reply costs a timer update; moving it
	// when an eighth of the timeout has passed keeps it within 7/8..1 of
	// ReplyTimeout ahead of any write.
	if t := c.srv.opts.ReplyTimeout; t > 0 && !c.broken.Load() {
		if now := time.Now(); now.Sub(c.deadlineSet) > t/8 {
			_ = c.nc.SetWriteDeadline(now.Add(t))
			c.deadlineSet = now
		}
	}
}

// endReply flushes when no other reply is waiting and releases the writer.
// c.wmu must be held.
func (c *conn) endReply() {
	if c.pendingReplies.Add(-1) == 0 && !c.broken.Load() {
		if err := c.bw.Flush(); err != nil {
			c.fail()
		}
	}
	c.wmu.Unlock()
}

// write appends p to the reply stream. c.wmu must be held.
func (c *conn) write(p []byte) {
	if c.broken.Load() {
		return
	}
	if _, err := c.bw.Write(p); err != nil {
		c.fail()
	}
}

// writeString is write for a string. c.wmu must be held.
func (c *conn) writeString(s string) {
	if c.broken.Load() || s == "" {
		return
	}
	if _, err := c.bw.WriteString(s); err != nil {
		c.fail()
	}
}

// fail marks the reply stream broken and ends the connection.
func (c *conn) fail() {
	c.broken.Store(true)
	c.close()
}
