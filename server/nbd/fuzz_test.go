package nbd

import (
	"bytes"
	"encoding/binary"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/blockdev/blockdevtest"
	"github.com/lupool/lupool/server/nbdproto"
)

// scriptConn is a net.Conn that reads a fixed script (then EOF) and
// records what the server writes.
type scriptConn struct {
	in  *bytes.Reader
	mu  sync.Mutex
	out bytes.Buffer // guarded by mu
}

var _ net.Conn = (*scriptConn)(nil)

func (c *scriptConn) Read(p []byte) (int, error) { return c.in.Read(p) }
func (c *scriptConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.out.Write(p)
}
func (c *scriptConn) Close() error                     { return nil }
func (c *scriptConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (c *scriptConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (c *scriptConn) SetDeadline(time.Time) error      { return nil }
func (c *scriptConn) SetReadDeadline(time.Time) error  { return nil }
func (c *scriptConn) SetWriteDeadline(time.Time) error { return nil }

// runConn serves one connection that reads in and then EOF, and returns
// what the server wrote. It fails if the server does not finish.
func runConn(t *testing.T, srv *Server, in []byte) []byte {
	t.Helper()
	sc := &scriptConn{in: bytes.NewReader(in)}
	c := newConn(srv, sc)
	srv.mu.Lock()
	srv.mu.conns[c] = struct{}{}
	srv.connWG.Add(1)
	srv.mu.Unlock()
	done := make(chan struct{})
	go func() {
		c.serve()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("connection did not end at the end of its input")
	}
	sc.mu.Lock()
	defer sc.mu.Unlock()
	return bytes.Clone(sc.out.Bytes())
}

// fuzzServer serves a 1 MiB "disk", run inline (InlineDevice) if inline.
func fuzzServer(t testing.TB, inline bool) *Server {
	var dev blockdev.Device = blockdevtest.NewMem(1<<20, blockdev.Caps{})
	if inline {
		dev = inlineMem{dev.(*blockdevtest.Mem)}
	}
	set := NewExportSet()
	if err := set.Add(Export{Name: "disk", Device: dev}); err != nil {
		t.Fatal(err)
	}
	srv, err := NewServer(Options{Exports: set, MaxInflightRequests: 4, MaxInflightBytes: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	return srv
}

func optionBytes(opt uint32, payload []byte) []byte {
	var h [nbdproto.OptionHeaderSize]byte
	nbdproto.PutOptionHeader(h[:], nbdproto.OptionHeader{Option: opt, Length: uint32(len(payload))})
	return append(h[:], payload...)
}

// FuzzNegotiation feeds arbitrary option streams to the handshake: it must
// never panic or hang, and must answer with the greeting first.
func FuzzNegotiation(f *testing.F) {
	flags := binary.BigEndian.AppendUint32(nil, nbdproto.ClientFlagFixedNewstyle|nbdproto.ClientFlagNoZeroes)
	f.Add(append(append([]byte(nil), flags...), optionBytes(nbdproto.OptGo, infoPayload("disk", nbdproto.InfoBlockSize))...))
	f.Add(append(append([]byte(nil), flags...), optionBytes(nbdproto.OptList, nil)...))
	f.Add(append(append([]byte(nil), flags...), optionBytes(nbdproto.OptSetMetaContext, metaPayload("disk", "base:allocation"))...))
	f.Add(append(append([]byte(nil), flags...), optionBytes(nbdproto.OptExportName, []byte("disk"))...))
	f.Add(append(append([]byte(nil), flags...), optionBytes(nbdproto.OptStructuredReply, nil)...))
	f.Add(append(append([]byte(nil), flags...), optionBytes(77, []byte("xyz"))...))
	f.Add([]byte("garbage"))
	srv := fuzzServer(f, false)
	f.Fuzz(func(t *testing.T, in []byte) {
		out := runConn(t, srv, in)
		if len(out) < nbdproto.GreetingSize || string(out[:8]) != "NBDMAGIC" {
			t.Fatalf("no greeting: %q", out)
		}
	})
}

// FuzzTransmission feeds arbitrary request streams to an attached
// connection, once with requests run by workers and once inline: it must
// never panic or hang, and every reply must be well formed.
func FuzzTransmission(f *testing.F) {
	var prefix []byte
	prefix = binary.BigEndian.AppendUint32(prefix, nbdproto.ClientFlagFixedNewstyle|nbdproto.ClientFlagNoZeroes)
	prefix = append(prefix, optionBytes(nbdproto.OptStructuredReply, nil)...)
	prefix = append(prefix, optionBytes(nbdproto.OptSetMetaContext, metaPayload("disk", "base:allocation"))...)
	prefix = append(prefix, optionBytes(nbdproto.OptGo, infoPayload("disk"))...)
	req := func(typ, flags uint16, off uint64, length uint32, payload []byte) []byte {
		var b [nbdproto.RequestSize]byte
		nbdproto.PutRequest(b[:], nbdproto.Request{Type: typ, Flags: flags, Handle: 5, Offset: off, Length: length})
		return append(b[:], payload...)
	}
	f.Add(req(nbdproto.CmdRead, 0, 0, 4096, nil))
	f.Add(req(nbdproto.CmdWrite, nbdproto.CmdFlagFUA, 512, 16, make([]byte, 16)))
	f.Add(req(nbdproto.CmdBlockStatus, nbdproto.CmdFlagReqOne, 0, 1<<20, nil))
	f.Add(req(nbdproto.CmdWriteZeroes, nbdproto.CmdFlagNoHole|nbdproto.CmdFlagFastZero, 0, 8192, nil))
	f.Add(append(req(nbdproto.CmdTrim, 0, 0, 4096, nil), req(nbdproto.CmdDisc, 0, 0, 0, nil)...))
	f.Add(req(nbdproto.CmdRead, 0, ^uint64(0), ^uint32(0), nil))
	srvs := []*Server{fuzzServer(f, false), fuzzServer(f, true)}
	f.Fuzz(func(t *testing.T, in []byte) {
		for _, srv := range srvs {
			checkTransmission(t, runConn(t, srv, append(append([]byte(nil), prefix...), in...)))
		}
	})
}

// checkTransmission checks the output of a FuzzTransmission connection.
func checkTransmission(t *testing.T, out []byte) {
	t.Helper()
	// Skip greeting and option replies up to GO's ACK.
	p := out[nbdproto.GreetingSize:]
	for {
		r, err := nbdproto.ParseOptionReply(p)
		if err != nil {
			t.Fatalf("option reply: %v", err)
		}
		p = p[nbdproto.OptionReplyHeaderSize+int(r.Length):]
		if r.Option == nbdproto.OptGo && r.Type == nbdproto.RepAck {
			break
		}
	}
	// Every chunk must parse (the stream may be cut at the end).
	for len(p) >= nbdproto.StructuredReplySize {
		ch, err := nbdproto.ParseStructuredReply(p)
		if err != nil {
			t.Fatalf("chunk: %v", err)
		}
		if ch.Flags != nbdproto.ReplyFlagDone {
			t.Fatalf("chunk without DONE: %+v", ch)
		}
		if int(ch.Length) > len(p)-nbdproto.StructuredReplySize {
			break
		}
		p = p[nbdproto.StructuredReplySize+int(ch.Length):]
	}
}
