package nbd

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/lupool/lupool/server/nbdproto"
)

// rawClient speaks the wire format byte by byte so tests can also send what
// a real client never would.
type rawClient struct {
	t    testing.TB
	conn net.Conn
	r    *bufio.Reader
}

func dialRaw(t testing.TB, addr string) *rawClient {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	_ = conn.SetDeadline(time.Now().Add(20 * time.Second))
	t.Cleanup(func() { _ = conn.Close() })
	return &rawClient{t: t, conn: conn, r: bufio.NewReader(conn)}
}

func (c *rawClient) send(parts ...[]byte) {
	c.t.Helper()
	for _, p := range parts {
		if _, err := c.conn.Write(p); err != nil {
			c.t.Fatalf("write: %v", err)
		}
	}
}

func (c *rawClient) read(n int) []byte {
	c.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(c.r, b); err != nil {
		c.t.Fatalf("read %d bytes: %v", n, err)
	}
	return b
}

// expectClosed checks the server closes the connection (EOF) soon.
func (c *rawClient) expectClosed() {
	c.t.Helper()
	_ = c.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.Copy(io.Discard, c.r); err != nil {
		// A reset is also a close.
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			c.t.Fatalf("connection still open")
		}
	}
}

// greet reads the greeting and sends client flags.
func (c *rawClient) greet(clientFlags uint32) {
	c.t.Helper()
	g := c.read(nbdproto.GreetingSize)
	if string(g[:16]) != "NBDMAGICIHAVEOPT" {
		c.t.Fatalf("greeting %q", g)
	}
	if f := binary.BigEndian.Uint16(g[16:]); f != nbdproto.FlagFixedNewstyle|nbdproto.FlagNoZeroes {
		c.t.Fatalf("handshake flags %#x", f)
	}
	c.send(binary.BigEndian.AppendUint32(nil, clientFlags))
}

func (c *rawClient) option(opt uint32, payload []byte) {
	c.t.Helper()
	var h [nbdproto.OptionHeaderSize]byte
	nbdproto.PutOptionHeader(h[:], nbdproto.OptionHeader{Option: opt, Length: uint32(len(payload))})
	c.send(h[:], payload)
}

type optReply struct {
	nbdproto.OptionReply
	data []byte
}

func (c *rawClient) optReply() optReply {
	c.t.Helper()
	h, err := nbdproto.ParseOptionReply(c.read(nbdproto.OptionReplyHeaderSize))
	if err != nil {
		c.t.Fatal(err)
	}
	return optReply{h, c.read(int(h.Length))}
}

// expectReply reads one option reply and checks its option and type.
func (c *rawClient) expectReply(opt, typ uint32) optReply {
	c.t.Helper()
	r := c.optReply()
	if r.Option != opt || r.Type != typ {
		c.t.Fatalf("option reply (opt %d, type %#x), want (opt %d, type %#x)", r.Option, r.Type, opt, typ)
	}
	return r
}

func infoPayload(name string, infos ...uint16) []byte {
	p := nbdproto.AppendString(nil, name)
	p = binary.BigEndian.AppendUint16(p, uint16(len(infos)))
	for _, i := range infos {
		p = binary.BigEndian.AppendUint16(p, i)
	}
	return p
}

func metaPayload(name string, queries ...string) []byte {
	p := nbdproto.AppendString(nil, name)
	p = binary.BigEndian.AppendUint32(p, uint32(len(queries)))
	for _, q := range queries {
		p = nbdproto.AppendString(p, q)
	}
	return p
}

// goReplies reads the replies to OPT_GO/INFO up to ACK and returns the
// export size and transmission flags.
func (c *rawClient) goReplies(opt uint32) (size uint64, flags uint16, infos map[uint16][]byte) {
	c.t.Helper()
	infos = make(map[uint16][]byte)
	for {
		r := c.optReply()
		if r.Option != opt {
			c.t.Fatalf("reply for option %d, want %d", r.Option, opt)
		}
		switch r.Type {
		case nbdproto.RepAck:
			if _, ok := infos[nbdproto.InfoExport]; !ok {
				c.t.Fatal("no NBD_INFO_EXPORT before ACK")
			}
			return size, flags, infos
		case nbdproto.RepInfo:
			typ := binary.BigEndian.Uint16(r.data)
			infos[typ] = r.data[2:]
			if typ == nbdproto.InfoExport {
				size = binary.BigEndian.Uint64(r.data[2:])
				flags = binary.BigEndian.Uint16(r.data[10:])
			}
		default:
			c.t.Fatalf("reply type %#x to GO", r.Type)
		}
	}
}

// attach negotiates (optionally structured replies with base:allocation)
// and enters transmission on export.
func (c *rawClient) attach(export string, structured bool) (size uint64, flags uint16) {
	c.t.Helper()
	c.greet(nbdproto.ClientFlagFixedNewstyle | nbdproto.ClientFlagNoZeroes)
	if structured {
		c.option(nbdproto.OptStructuredReply, nil)
		c.expectReply(nbdproto.OptStructuredReply, nbdproto.RepAck)
		c.option(nbdproto.OptSetMetaContext, metaPayload(export, nbdproto.ContextBaseAllocation))
		c.expectReply(nbdproto.OptSetMetaContext, nbdproto.RepMetaContext)
		c.expectReply(nbdproto.OptSetMetaContext, nbdproto.RepAck)
	}
	c.option(nbdproto.OptGo, infoPayload(export))
	size, flags, _ = c.goReplies(nbdproto.OptGo)
	return size, flags
}

func (c *rawClient) request(typ, flags uint16, handle, off uint64, length uint32, payload []byte) {
	c.t.Helper()
	var b [nbdproto.RequestSize]byte
	nbdproto.PutRequest(b[:], nbdproto.Request{Type: typ, Flags: flags, Handle: handle, Offset: off, Length: length})
	c.send(b[:], payload)
}

// simpleReply reads a simple reply; for a successful read it also reads
// dataLen bytes.
func (c *rawClient) simpleReply(dataLen int) (handle uint64, errCode uint32, data []byte) {
	c.t.Helper()
	r, err := nbdproto.ParseSimpleReply(c.read(nbdproto.SimpleReplySize))
	if err != nil {
		c.t.Fatal(err)
	}
	if r.Error == 0 && dataLen > 0 {
		data = c.read(dataLen)
	}
	return r.Handle, r.Error, data
}

type chunk struct {
	nbdproto.StructuredReply
	data []byte
}

func (c *rawClient) chunk() chunk {
	c.t.Helper()
	h, err := nbdproto.ParseStructuredReply(c.read(nbdproto.StructuredReplySize))
	if err != nil {
		c.t.Fatal(err)
	}
	return chunk{h, c.read(int(h.Length))}
}

// chunkError returns the error code of an error chunk, or 0.
func (ch chunk) errorCode() uint32 {
	if ch.Type&(1<<15) == 0 {
		return 0
	}
	return binary.BigEndian.Uint32(ch.data)
}

// do sends a request and returns the simple reply's error (no data).
func (c *rawClient) do(typ, flags uint16, off uint64, length uint32, payload []byte) uint32 {
	c.t.Helper()
	c.request(typ, flags, 42, off, length, payload)
	h, code, _ := c.simpleReply(0)
	if h != 42 {
		c.t.Fatalf("handle %d, want 42", h)
	}
	return code
}

func errName(code uint32) string {
	switch code {
	case 0:
		return "OK"
	case nbdproto.EPERM:
		return "EPERM"
	case nbdproto.EIO:
		return "EIO"
	case nbdproto.EINVAL:
		return "EINVAL"
	case nbdproto.ENOSPC:
		return "ENOSPC"
	case nbdproto.EOVERFLOW:
		return "EOVERFLOW"
	case nbdproto.ENOTSUP:
		return "ENOTSUP"
	case nbdproto.ESHUTDOWN:
		return "ESHUTDOWN"
	}
	return fmt.Sprintf("errno(%d)", code)
}
