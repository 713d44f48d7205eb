package nbd

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/server/nbdproto"
)

// errAbort ends negotiation cleanly (NBD_OPT_ABORT).
var errAbort = errors.New("nbd: client aborted negotiation")

// errProtocol marks a protocol violation that ends the connection.
var errProtocol = errors.New("nbd: protocol violation")

// errExportFull ends a negotiation whose NBD_OPT_EXPORT_NAME named an
// export at its MaxConnectionsPerExport.
var errExportFull = errors.New("nbd: export at its connection limit")

// session is what negotiation agrees on; immutable afterwards.
type session struct {
	export     Export
	structured bool
	// metaAllocation is true when base:allocation was selected for export.
	metaAllocation bool
}

// negotiation is the per-connection option state.
type negotiation struct {
	noZeroes   bool
	structured bool
	tls        bool
	metaExport string // export that metaSet applies to
	metaSet    bool
	payload    []byte // scratch, at most MaxOptionBytes
}

// contextIDAllocation is the id we give base:allocation.
const contextIDAllocation = 1

// negotiate runs the handshake. It returns a session for NBD_OPT_GO or
// NBD_OPT_EXPORT_NAME, errAbort, or an error that ends the connection.
func (c *conn) negotiate() (*session, error) {
	if t := c.srv.opts.HandshakeTimeout; t > 0 {
		_ = c.raw.SetDeadline(time.Now().Add(t))
	}
	var b [nbdproto.GreetingSize]byte
	nbdproto.PutGreeting(b[:], nbdproto.FlagFixedNewstyle|nbdproto.FlagNoZeroes)
	if _, err := c.bw.Write(b[:]); err != nil {
		return nil, err
	}
	if err := c.bw.Flush(); err != nil {
		return nil, err
	}
	var cf [nbdproto.ClientFlagsSize]byte
	if _, err := io.ReadFull(c.br, cf[:]); err != nil {
		return nil, err
	}
	flags := binary.BigEndian.Uint32(cf[:])
	if flags&^(nbdproto.ClientFlagFixedNewstyle|nbdproto.ClientFlagNoZeroes) != 0 {
		return nil, fmt.Errorf("%w: unknown client flags %#x", errProtocol, flags)
	}
	n := &negotiation{noZeroes: flags&nbdproto.ClientFlagNoZeroes != 0}
	for range MaxOptions {
		s, err := c.option(n)
		if err == nil {
			err = c.bw.Flush()
		}
		if err != nil || s != nil {
			return s, err
		}
	}
	return nil, fmt.Errorf("%w: more than %d options", errProtocol, MaxOptions)
}

// option reads and answers one option.
func (c *conn) option(n *negotiation) (*session, error) {
	var hb [nbdproto.OptionHeaderSize]byte
	if _, err := io.ReadFull(c.br, hb[:]); err != nil {
		return nil, err
	}
	h, err := nbdproto.ParseOptionHeader(hb[:])
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errProtocol, err)
	}
	if h.Length > MaxOptionBytes {
		_ = c.optReply(h.Option, nbdproto.RepErrTooBig, nil)
		_ = c.bw.Flush()
		return nil, fmt.Errorf("%w: option %d of %d bytes", errProtocol, h.Option, h.Length)
	}
	if cap(n.payload) < int(h.Length) {
		n.payload = make([]byte, h.Length)
	}
	p := n.payload[:h.Length]
	if _, err := io.ReadFull(c.br, p); err != nil {
		return nil, err
	}
	if c.srv.opts.TLSMode == TLSRequired && !n.tls {
		switch h.Option {
		case nbdproto.OptStartTLS, nbdproto.OptAbort:
		case nbdproto.OptExportName:
			return nil, fmt.Errorf("%w: EXPORT_NAME before STARTTLS", errProtocol)
		default:
			return nil, c.optReply(h.Option, nbdproto.RepErrTLSReqd, nil)
		}
	}
	switch h.Option {
	case nbdproto.OptExportName:
		return c.optExportName(n, string(p))
	case nbdproto.OptAbort:
		_ = c.optReply(h.Option, nbdproto.RepAck, nil)
		_ = c.bw.Flush()
		return nil, errAbort
	case nbdproto.OptList:
		return nil, c.optList(p)
	case nbdproto.OptStartTLS:
		return nil, c.optStartTLS(n, p)
	case nbdproto.OptInfo, nbdproto.OptGo:
		return c.optInfo(n, h.Option, p)
	case nbdproto.OptStructuredReply:
		if len(p) != 0 {
			return nil, c.optReply(h.Option, nbdproto.RepErrInvalid, nil)
		}
		n.structured = true
		return nil, c.optReply(h.Option, nbdproto.RepAck, nil)
	case nbdproto.OptListMetaContext, nbdproto.OptSetMetaContext:
		return nil, c.optMetaContext(n, h.Option, p)
	default:
		return nil, c.optReply(h.Option, nbdproto.RepErrUnsup, nil)
	}
}

// optReply writes one option reply with its payload.
func (c *conn) optReply(opt, typ uint32, payload []byte) error {
	var b [nbdproto.OptionReplyHeaderSize]byte
	nbdproto.PutOptionReply(b[:], nbdproto.OptionReply{Option: opt, Type: typ, Length: uint32(len(payload))})
	if _, err := c.bw.Write(b[:]); err != nil {
		return err
	}
	_, err := c.bw.Write(payload)
	return err
}

func (c *conn) optExportName(n *negotiation, name string) (*session, error) {
	e, ok := c.srv.lookup(name)
	if !ok {
		return nil, fmt.Errorf("nbd: unknown export %q requested with EXPORT_NAME", name)
	}
	if !c.srv.reserveExport(c, e.Name) {
		// EXPORT_NAME has no error reply: closing is all the spec allows.
		c.srv.refuseExport(c.remote, e.Name, "EXPORT_NAME")
		return nil, fmt.Errorf("%w: export %q", errExportFull, e.Name)
	}
	s := n.session(e)
	var b [nbdproto.ExportNameReplySize + nbdproto.ExportNameZeroPadSize]byte
	binary.BigEndian.PutUint64(b[0:8], uint64(e.Device.Size()))
	binary.BigEndian.PutUint16(b[8:10], transmissionFlags(e.Device, s.structured))
	out := b[:]
	if n.noZeroes {
		out = b[:nbdproto.ExportNameReplySize]
	}
	if _, err := c.bw.Write(out); err != nil {
		return nil, err
	}
	return s, c.bw.Flush()
}

func (n *negotiation) session(e Export) *session {
	return &session{
		export:         e,
		structured:     n.structured,
		metaAllocation: n.structured && n.metaSet && n.metaExport == e.Name,
	}
}

func (c *conn) optList(p []byte) error {
	if len(p) != 0 {
		return c.optReply(nbdproto.OptList, nbdproto.RepErrInvalid, nil)
	}
	for _, e := range c.srv.opts.Exports.List() {
		b := nbdproto.AppendString(nil, e.Name)
		b = append(b, e.Description...)
		if err := c.optReply(nbdproto.OptList, nbdproto.RepServer, b); err != nil {
			return err
		}
	}
	return c.optReply(nbdproto.OptList, nbdproto.RepAck, nil)
}

func (c *conn) optStartTLS(n *negotiation, p []byte) error {
	switch {
	case len(p) != 0:
		return c.optReply(nbdproto.OptStartTLS, nbdproto.RepErrInvalid, nil)
	case c.srv.opts.TLSMode == TLSOff:
		return c.optReply(nbdproto.OptStartTLS, nbdproto.RepErrPolicy, nil)
	case n.tls:
		return c.optReply(nbdproto.OptStartTLS, nbdproto.RepErrInvalid, nil)
	}
	if err := c.optReply(nbdproto.OptStartTLS, nbdproto.RepAck, nil); err != nil {
		return err
	}
	if err := c.bw.Flush(); err != nil {
		return err
	}
	if c.br.Buffered() != 0 {
		return fmt.Errorf("%w: data sent before the TLS handshake", errProtocol)
	}
	tc := tls.Server(c.raw, c.srv.opts.TLSConfig)
	ctx, cancel := context.WithTimeout(c.ctx, c.srv.opts.HandshakeTimeout)
	defer cancel()
	if err := tc.HandshakeContext(ctx); err != nil {
		return fmt.Errorf("nbd: TLS handshake: %w", err)
	}
	c.nc = tc
	c.br.Reset(tc)
	c.bw.Reset(tc)
	// Options before STARTTLS do not carry over (NBD spec).
	*n = negotiation{noZeroes: n.noZeroes, tls: true, payload: n.payload}
	c.srv.mu.Lock()
	c.tls = true
	c.srv.mu.Unlock()
	return nil
}

func (c *conn) optInfo(n *negotiation, opt uint32, p []byte) (*session, error) {
	req, err := nbdproto.ParseInfoRequest(p)
	if err != nil {
		return nil, c.optReply(opt, nbdproto.RepErrInvalid, nil)
	}
	e, ok := c.srv.lookup(req.Name)
	if !ok {
		return nil, c.optReply(opt, nbdproto.RepErrUnknown, []byte("unknown export"))
	}
	if opt == nbdproto.OptGo && !c.srv.reserveExport(c, e.Name) {
		// POLICY ("server-side policy forbids the option") rather than
		// UNKNOWN (the export exists) or SHUTDOWN (the server is not
		// stopping); the message says which limit.
		c.srv.refuseExport(c.remote, e.Name, "GO")
		msg := fmt.Sprintf("export is at its limit of %d connections; retry later",
			c.srv.opts.MaxConnectionsPerExport)
		return nil, c.optReply(opt, nbdproto.RepErrPolicy, []byte(msg))
	}
	be := binary.BigEndian
	// Every info is sent whether asked for or not (nbd-client never asks).
	info := make([]byte, 0, nbdproto.InfoExportSize)
	info = be.AppendUint16(info, nbdproto.InfoExport)
	info = be.AppendUint64(info, uint64(e.Device.Size()))
	info = be.AppendUint16(info, transmissionFlags(e.Device, n.structured))
	if err := c.optReply(opt, nbdproto.RepInfo, info); err != nil {
		return nil, err
	}
	name := be.AppendUint16(nil, nbdproto.InfoName)
	if err := c.optReply(opt, nbdproto.RepInfo, append(name, e.Name...)); err != nil {
		return nil, err
	}
	if e.Description != "" {
		d := be.AppendUint16(nil, nbdproto.InfoDescription)
		if err := c.optReply(opt, nbdproto.RepInfo, append(d, e.Description...)); err != nil {
			return nil, err
		}
	}
	if e.ID != "" && slices.Contains(req.Infos, nbdproto.InfoLUID) {
		id := be.AppendUint16(nil, nbdproto.InfoLUID)
		if err := c.optReply(opt, nbdproto.RepInfo, append(id, e.ID...)); err != nil {
			return nil, err
		}
	}
	bs := be.AppendUint16(nil, nbdproto.InfoBlockSize)
	bs = be.AppendUint32(bs, MinBlockBytes)
	bs = be.AppendUint32(bs, PreferredBlockBytes)
	bs = be.AppendUint32(bs, MaxRequestBytes)
	if err := c.optReply(opt, nbdproto.RepInfo, bs); err != nil {
		return nil, err
	}
	if err := c.optReply(opt, nbdproto.RepAck, nil); err != nil {
		return nil, err
	}
	if opt == nbdproto.OptInfo {
		return nil, nil
	}
	return n.session(e), c.bw.Flush()
}

func (c *conn) optMetaContext(n *negotiation, opt uint32, p []byte) error {
	req, err := nbdproto.ParseMetaContextRequest(p)
	if err != nil {
		return c.optReply(opt, nbdproto.RepErrInvalid, nil)
	}
	set := opt == nbdproto.OptSetMetaContext
	if set && !n.structured {
		return c.optReply(opt, nbdproto.RepErrInvalid, []byte("structured replies not negotiated"))
	}
	e, ok := c.srv.lookup(req.Name)
	if !ok {
		return c.optReply(opt, nbdproto.RepErrUnknown, []byte("unknown export"))
	}
	match := !set && len(req.Queries) == 0
	for _, q := range req.Queries {
		if q == nbdproto.ContextBaseAllocation || (!set && q == "base:") {
			match = true
		}
	}
	if set {
		n.metaSet, n.metaExport = match, e.Name
	}
	if match {
		b := binary.BigEndian.AppendUint32(nil, contextIDAllocation)
		if err := c.optReply(opt, nbdproto.RepMetaContext, append(b, nbdproto.ContextBaseAllocation...)); err != nil {
			return err
		}
	}
	return c.optReply(opt, nbdproto.RepAck, nil)
}

// transmissionFlags are the flags advertised for dev.
func transmissionFlags(dev blockdev.Device, structured bool) uint16 {
	f := nbdproto.TxFlagHasFlags | nbdproto.TxFlagSendFlush | nbdproto.TxFlagSendFUA | nbdproto.TxFlagSendCache
	caps := dev.Caps()
	if caps.ReadOnly {
		f |= nbdproto.TxFlagReadOnly
	} else {
		f |= nbdproto.TxFlagSendWriteZeroes | nbdproto.TxFlagSendFastZero
		if _, ok := dev.(blockdev.Trimmer); ok {
			f |= nbdproto.TxFlagSendTrim
		}
	}
	if caps.Rotational {
		f |= nbdproto.TxFlagRotational
	}
	if caps.MultiConn {
		f |= nbdproto.TxFlagCanMultiConn
	}
	if structured {
		f |= nbdproto.TxFlagSendDF
	}
	return f
}
