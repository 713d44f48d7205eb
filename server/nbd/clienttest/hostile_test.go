package clienttest

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"runtime"
	"testing"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/blockdev/blockdevtest"
	"github.com/lupool/lupool/server/nbd"
	"github.com/lupool/lupool/server/nbdkernel"
	"github.com/lupool/lupool/server/nbdproto"
)

// rawTimeout bounds every raw read in these tests.
const rawTimeout = 10 * time.Second

func dialRaw(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, rawTimeout)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// greet reads the server greeting and sends client flags.
func greet(t *testing.T, c net.Conn, clientFlags uint32) {
	t.Helper()
	var g [nbdproto.GreetingSize]byte
	_ = c.SetReadDeadline(time.Now().Add(rawTimeout))
	if _, err := io.ReadFull(c, g[:]); err != nil {
		t.Fatalf("read greeting: %v", err)
	}
	if binary.BigEndian.Uint64(g[:8]) != nbdproto.NBDMagic || binary.BigEndian.Uint64(g[8:16]) != nbdproto.IHaveOpt {
		t.Fatalf("bad greeting %x", g)
	}
	writeRaw(t, c, binary.BigEndian.AppendUint32(nil, clientFlags))
}

func writeRaw(t *testing.T, c net.Conn, b []byte) {
	t.Helper()
	_ = c.SetWriteDeadline(time.Now().Add(rawTimeout))
	if _, err := c.Write(b); err != nil {
		t.Fatalf("write: %v", err)
	}
}

func optionHeader(option, length uint32) []byte {
	b := make([]byte, nbdproto.OptionHeaderSize)
	nbdproto.PutOptionHeader(b, nbdproto.OptionHeader{Option: option, Length: length})
	return b
}

// readOptionReply reads one option reply and its payload.
func readOptionReply(t *testing.T, c net.Conn) (nbdproto.OptionReply, []byte) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(rawTimeout))
	var h [nbdproto.OptionReplyHeaderSize]byte
	if _, err := io.ReadFull(c, h[:]); err != nil {
		t.Fatalf("read option reply: %v", err)
	}
	r, err := nbdproto.ParseOptionReply(h[:])
	if err != nil {
		t.Fatalf("option reply: %v", err)
	}
	if r.Length > 1<<20 {
		t.Fatalf("option reply of %d bytes", r.Length)
	}
	p := make([]byte, r.Length)
	if _, err := io.ReadFull(c, p); err != nil {
		t.Fatalf("read option reply payload: %v", err)
	}
	return r, p
}

// expectClosed waits for the server to close c (EOF or reset), discarding
// anything it sends first.
func expectClosed(t *testing.T, c net.Conn) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(rawTimeout))
	_, err := io.Copy(io.Discard, c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("server kept the connection open for %v", rawTimeout)
	}
}

// memStats returns the heap bytes in use after a GC.
func heapInUse() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse
}

// TestHostileHandshake sends broken handshakes; each connection is refused
// or closed, none makes the server allocate without bound, and the server
// keeps serving a real client throughout and returns to its baseline
// goroutine count afterwards.
func TestHostileHandshake(t *testing.T) {
	srv, _ := startMem(t, 4*miB, blockdev.Caps{})
	needTool(t, "nbdinfo")
	mustRun(t, "nbdinfo", "--size", srv.uri("mem")) // warm up
	base := runtime.NumGoroutine()
	heapBefore := heapInUse()

	t.Run("garbage greeting reply", func(t *testing.T) {
		c := dialRaw(t, srv.addr)
		greet(t, c, nbdproto.ClientFlagFixedNewstyle)
		writeRaw(t, c, []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
		expectClosed(t, c)
	})
	t.Run("unknown client flags", func(t *testing.T) {
		c := dialRaw(t, srv.addr)
		greet(t, c, 0xffff0001)
		expectClosed(t, c)
	})
	t.Run("truncated option", func(t *testing.T) {
		c := dialRaw(t, srv.addr)
		greet(t, c, nbdproto.ClientFlagFixedNewstyle)
		writeRaw(t, c, append(optionHeader(nbdproto.OptGo, 100), make([]byte, 10)...))
		_ = c.(*net.TCPConn).CloseWrite()
		expectClosed(t, c)
	})
	t.Run("truncated header", func(t *testing.T) {
		c := dialRaw(t, srv.addr)
		greet(t, c, nbdproto.ClientFlagFixedNewstyle)
		writeRaw(t, c, optionHeader(nbdproto.OptGo, 100)[:11])
		_ = c.(*net.TCPConn).CloseWrite()
		expectClosed(t, c)
	})
	t.Run("option length over the limit", func(t *testing.T) {
		for range 20 {
			c := dialRaw(t, srv.addr)
			greet(t, c, nbdproto.ClientFlagFixedNewstyle)
			writeRaw(t, c, optionHeader(nbdproto.OptGo, 1<<31))
			r, _ := readOptionReply(t, c)
			if r.Type&nbdproto.RepFlagError == 0 {
				t.Fatalf("reply %#x to a 2 GiB option, want an error", r.Type)
			}
			c.Close()
		}
	})
	t.Run("name length over the limit", func(t *testing.T) {
		c := dialRaw(t, srv.addr)
		greet(t, c, nbdproto.ClientFlagFixedNewstyle)
		payload := binary.BigEndian.AppendUint32(nil, 1<<30) // name length
		payload = append(payload, bytes.Repeat([]byte{'a'}, 100)...)
		payload = binary.BigEndian.AppendUint16(payload, 0)
		writeRaw(t, c, append(optionHeader(nbdproto.OptGo, uint32(len(payload))), payload...))
		r, _ := readOptionReply(t, c)
		if r.Type&nbdproto.RepFlagError == 0 {
			t.Fatalf("reply %#x to a malformed GO, want an error", r.Type)
		}
	})
	t.Run("unknown option is skipped exactly", func(t *testing.T) {
		c := dialRaw(t, srv.addr)
		greet(t, c, nbdproto.ClientFlagFixedNewstyle|nbdproto.ClientFlagNoZeroes)
		// The payload looks like an option header: a server that does not
		// skip exactly would parse it as NBD_OPT_ABORT.
		writeRaw(t, c, append(optionHeader(1000, 16), optionHeader(nbdproto.OptAbort, 0)...))
		if r, _ := readOptionReply(t, c); r.Type != nbdproto.RepErrUnsup || r.Option != 1000 {
			t.Fatalf("reply to unknown option: %+v, want NBD_REP_ERR_UNSUP", r)
		}
		writeRaw(t, c, optionHeader(nbdproto.OptList, 0))
		names := 0
		for {
			r, _ := readOptionReply(t, c)
			if r.Type == nbdproto.RepAck {
				break
			}
			if r.Type != nbdproto.RepServer {
				t.Fatalf("reply to LIST: %+v", r)
			}
			names++
		}
		if names != 1 {
			t.Errorf("LIST after an unknown option: %d exports, want 1", names)
		}
	})
	t.Run("GO without info requests", func(t *testing.T) {
		// nbd-client asks for nothing; the server sends every info anyway.
		c := dialRaw(t, srv.addr)
		greet(t, c, nbdproto.ClientFlagFixedNewstyle|nbdproto.ClientFlagNoZeroes)
		payload := binary.BigEndian.AppendUint16(nbdproto.AppendString(nil, "mem"), 0)
		writeRaw(t, c, append(optionHeader(nbdproto.OptGo, uint32(len(payload))), payload...))
		infos := map[uint16][]byte{}
		for {
			r, p := readOptionReply(t, c)
			if r.Type == nbdproto.RepAck {
				break
			}
			if r.Type != nbdproto.RepInfo || len(p) < 2 {
				t.Fatalf("reply to GO: %+v", r)
			}
			infos[binary.BigEndian.Uint16(p)] = p[2:]
		}
		if e := infos[nbdproto.InfoExport]; len(e) != 10 || binary.BigEndian.Uint64(e) != 4*miB {
			t.Errorf("NBD_INFO_EXPORT %x", e)
		}
		if n := infos[nbdproto.InfoName]; string(n) != "mem" {
			t.Errorf("NBD_INFO_NAME %q, want mem", n)
		}
		if d := infos[nbdproto.InfoDescription]; string(d) != "memory export mem" {
			t.Errorf("NBD_INFO_DESCRIPTION %q", d)
		}
		if b := infos[nbdproto.InfoBlockSize]; len(b) != 12 || binary.BigEndian.Uint32(b[4:]) != 4096 || binary.BigEndian.Uint32(b[8:]) != 32*miB {
			t.Errorf("NBD_INFO_BLOCK_SIZE %x", b)
		}
		// Now in transmission: a read of the first block.
		req := make([]byte, nbdproto.RequestSize)
		nbdproto.PutRequest(req, nbdproto.Request{Type: nbdproto.CmdRead, Handle: 1, Length: 512})
		writeRaw(t, c, req)
		rep := make([]byte, nbdproto.SimpleReplySize+512)
		if _, err := io.ReadFull(c, rep); err != nil {
			t.Fatalf("read after GO: %v", err)
		}
		if r, err := nbdproto.ParseSimpleReply(rep); err != nil || r.Error != 0 || r.Handle != 1 {
			t.Errorf("read after GO: %+v %v", r, err)
		}
	})
	t.Run("abort", func(t *testing.T) {
		c := dialRaw(t, srv.addr)
		greet(t, c, nbdproto.ClientFlagFixedNewstyle)
		writeRaw(t, c, optionHeader(nbdproto.OptAbort, 0))
		if r, _ := readOptionReply(t, c); r.Type != nbdproto.RepAck || r.Option != nbdproto.OptAbort {
			t.Errorf("reply to ABORT: %+v, want NBD_REP_ACK", r)
		}
		expectClosed(t, c)
	})
	t.Run("too many options", func(t *testing.T) {
		c := dialRaw(t, srv.addr)
		greet(t, c, nbdproto.ClientFlagFixedNewstyle)
		go func() {
			// Pipelined; stops when the server closes.
			opt := optionHeader(1000, 0)
			batch := bytes.Repeat(opt, 256)
			for range (nbd.MaxOptions + 1024) / 256 {
				if _, err := c.Write(batch); err != nil {
					return
				}
			}
		}()
		replies := 0
		_ = c.SetReadDeadline(time.Now().Add(rawTimeout))
		var h [nbdproto.OptionReplyHeaderSize]byte
		for {
			if _, err := io.ReadFull(c, h[:]); err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					t.Fatalf("server still open after %d replies", replies)
				}
				break
			}
			r, _ := nbdproto.ParseOptionReply(h[:])
			if _, err := io.CopyN(io.Discard, c, int64(r.Length)); err != nil {
				break
			}
			replies++
		}
		if replies > nbd.MaxOptions+1 {
			t.Errorf("server answered %d options, limit is %d", replies, nbd.MaxOptions)
		}
	})
	t.Run("idle after greeting", func(t *testing.T) {
		c := dialRaw(t, srv.addr)
		greet(t, c, nbdproto.ClientFlagFixedNewstyle)
		// The client goes away without a word.
		c.Close()
	})

	// A real client still works, and everything is released.
	mustRun(t, "nbdinfo", "--size", srv.uri("mem"))
	waitFor(t, "connections to close", 10*time.Second, func() bool { return srv.srv.Connections("mem") == 0 })
	waitGoroutines(t, base)
	if grown := int64(heapInUse()) - int64(heapBefore); grown > 32*miB {
		t.Errorf("heap grew by %d MiB over the hostile handshakes", grown/miB)
	}
}

// rawClient is a transmission-phase client with simple replies.
type rawClient struct {
	t *testing.T
	c net.Conn
}

// openRaw negotiates export with simple replies (nbdkernel's client
// handshake, which is what the kernel driver gets).
func openRaw(t *testing.T, addr, export string) (*rawClient, nbdkernel.ExportInfo) {
	t.Helper()
	c := dialRaw(t, addr)
	ctx, cancel := context.WithTimeout(context.Background(), rawTimeout)
	defer cancel()
	nc, info, err := nbdkernel.Negotiate(ctx, c, export, nil)
	if err != nil {
		t.Fatalf("negotiate: %v", err)
	}
	return &rawClient{t: t, c: nc}, info
}

func (r *rawClient) send(cmd, flags uint16, handle, off uint64, length uint32, payload []byte) {
	r.t.Helper()
	b := make([]byte, nbdproto.RequestSize, nbdproto.RequestSize+len(payload))
	nbdproto.PutRequest(b, nbdproto.Request{Flags: flags, Type: cmd, Handle: handle, Offset: off, Length: length})
	writeRaw(r.t, r.c, append(b, payload...))
}

// reply reads one simple reply; dataLen says how many data bytes follow a
// successful reply, by handle.
func (r *rawClient) reply(dataLen func(handle uint64) int) (nbdproto.SimpleReply, []byte) {
	r.t.Helper()
	_ = r.c.SetReadDeadline(time.Now().Add(rawTimeout))
	var h [nbdproto.SimpleReplySize]byte
	if _, err := io.ReadFull(r.c, h[:]); err != nil {
		r.t.Fatalf("read reply: %v", err)
	}
	rep, err := nbdproto.ParseSimpleReply(h[:])
	if err != nil {
		r.t.Fatalf("reply: %v", err)
	}
	var data []byte
	if rep.Error == 0 {
		data = make([]byte, dataLen(rep.Handle))
		if _, err := io.ReadFull(r.c, data); err != nil {
			r.t.Fatalf("read reply data: %v", err)
		}
	}
	return rep, data
}

// slowDevice delays reads at offset 0 so that later requests overtake them.
type slowDevice struct {
	*blockdevtest.Mem
	delay time.Duration
}

var _ blockdev.Device = (*slowDevice)(nil)

func (d *slowDevice) ReadAt(ctx context.Context, p []byte, off int64) error {
	if off == 0 {
		select {
		case <-time.After(d.delay):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return d.Mem.ReadAt(ctx, p, off)
}

// TestRawTransmission checks what libnbd cannot send: unknown commands,
// oversized reads, out-of-order replies, DISC with requests in flight, a
// client that vanishes mid-request.
func TestRawTransmission(t *testing.T) {
	mem := blockdevtest.NewMem(8*miB, blockdev.Caps{})
	dev := &slowDevice{Mem: mem, delay: 300 * time.Millisecond}
	srv := startServer(t, serverConfig{exports: []nbd.Export{{Name: "slow", Device: dev}}})
	base := runtime.NumGoroutine()
	sizes := map[uint64]int{}
	dataLen := func(h uint64) int { return sizes[h] }

	t.Run("unknown command then read", func(t *testing.T) {
		c, info := openRaw(t, srv.addr, "slow")
		if info.SizeBytes != 8*miB {
			t.Fatalf("size %d", info.SizeBytes)
		}
		c.send(0x99, 0, 1, 4096, 4096, nil)
		if rep, _ := c.reply(dataLen); rep.Handle != 1 || rep.Error != nbdproto.EINVAL {
			t.Fatalf("unknown command: %+v, want EINVAL for handle 1", rep)
		}
		sizes[2] = 4096
		c.send(nbdproto.CmdRead, 0, 2, 4096, 4096, nil)
		if rep, _ := c.reply(dataLen); rep.Handle != 2 || rep.Error != 0 {
			t.Fatalf("read after unknown command: %+v", rep)
		}
	})
	t.Run("block status without structured replies", func(t *testing.T) {
		c, _ := openRaw(t, srv.addr, "slow")
		c.send(nbdproto.CmdBlockStatus, 0, 5, 0, 4096, nil)
		if rep, _ := c.reply(dataLen); rep.Handle != 5 || rep.Error != nbdproto.EINVAL {
			t.Fatalf("BLOCK_STATUS without a negotiated context: %+v, want EINVAL", rep)
		}
		sizes[6] = 512
		c.send(nbdproto.CmdRead, 0, 6, 0, 512, nil)
		if rep, _ := c.reply(dataLen); rep.Handle != 6 || rep.Error != 0 {
			t.Fatalf("read after refused BLOCK_STATUS: %+v", rep)
		}
	})
	t.Run("read over the maximum", func(t *testing.T) {
		c, _ := openRaw(t, srv.addr, "slow")
		c.send(nbdproto.CmdRead, 0, 3, 0, 64*miB, nil)
		rep, _ := c.reply(dataLen)
		if rep.Handle != 3 || (rep.Error != nbdproto.EINVAL && rep.Error != nbdproto.EOVERFLOW) {
			t.Fatalf("64 MiB read: %+v, want EINVAL or EOVERFLOW", rep)
		}
		sizes[4] = 512
		c.send(nbdproto.CmdRead, 0, 4, 4096, 512, nil)
		if rep, _ := c.reply(dataLen); rep.Handle != 4 || rep.Error != 0 {
			t.Fatalf("read after refused read: %+v", rep)
		}
	})
	t.Run("replies out of order", func(t *testing.T) {
		c, _ := openRaw(t, srv.addr, "slow")
		sizes[10], sizes[11] = 4096, 4096
		c.send(nbdproto.CmdRead, 0, 10, 0, 4096, nil) // slow
		c.send(nbdproto.CmdRead, 0, 11, 8192, 4096, nil)
		first, _ := c.reply(dataLen)
		second, _ := c.reply(dataLen)
		if first.Handle != 11 || second.Handle != 10 || first.Error != 0 || second.Error != 0 {
			t.Fatalf("replies %+v then %+v: the fast read should overtake the slow one", first, second)
		}
	})
	t.Run("disc finishes requests in flight", func(t *testing.T) {
		c, _ := openRaw(t, srv.addr, "slow")
		want := map[uint64]bool{}
		for h := uint64(20); h < 30; h++ {
			sizes[h] = 4096
			want[h] = true
			c.send(nbdproto.CmdRead, 0, h, (h%3)*4096, 4096, nil)
		}
		c.send(nbdproto.CmdDisc, 0, 99, 0, 0, nil)
		for range want {
			rep, _ := c.reply(dataLen)
			if !want[rep.Handle] || rep.Error != 0 {
				t.Fatalf("reply %+v after DISC", rep)
			}
			delete(want, rep.Handle)
		}
		expectClosed(t, c.c)
	})
	t.Run("client vanishes mid-write", func(t *testing.T) {
		c, _ := openRaw(t, srv.addr, "slow")
		c.send(nbdproto.CmdWrite, 0, 40, 0, 64*kiB, make([]byte, kiB))
		c.c.Close()
	})
	t.Run("client vanishes with reads in flight", func(t *testing.T) {
		c, _ := openRaw(t, srv.addr, "slow")
		for h := uint64(50); h < 100; h++ {
			c.send(nbdproto.CmdRead, 0, h, 0, 64*kiB, nil)
		}
		c.c.Close()
	})
	t.Run("write length over the limit", func(t *testing.T) {
		// A 2 GiB WRITE header without its payload: the server may answer
		// with an error, wait for the payload or close, but must not
		// allocate for it.
		before := heapInUse()
		for h := uint64(200); h < 205; h++ {
			c, _ := openRaw(t, srv.addr, "slow")
			c.send(nbdproto.CmdWrite, 0, h, 0, 1<<31, make([]byte, 4096))
			_ = c.c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
			var b [nbdproto.SimpleReplySize]byte
			if _, err := io.ReadFull(c.c, b[:]); err == nil {
				if rep, err := nbdproto.ParseSimpleReply(b[:]); err != nil || rep.Handle != h || rep.Error == 0 {
					t.Errorf("reply to a 2 GiB write: %+v %v, want an error", rep, err)
				}
			}
			c.c.Close()
		}
		if grown := int64(heapInUse()) - int64(before); grown > 64*miB {
			t.Errorf("heap grew by %d MiB for five 2 GiB write headers", grown/miB)
		}
	})
	t.Run("bad request magic", func(t *testing.T) {
		c, _ := openRaw(t, srv.addr, "slow")
		writeRaw(t, c.c, bytes.Repeat([]byte{0xee}, nbdproto.RequestSize))
		expectClosed(t, c.c)
	})

	waitFor(t, "connections to close", 10*time.Second, func() bool { return srv.srv.Connections("slow") == 0 })
	waitGoroutines(t, base)
	if !bytes.Equal(mem.Bytes()[:64*kiB], make([]byte, 64*kiB)) {
		t.Error("a write whose payload never arrived changed the device")
	}
}

// TestClientNeverReads pipelines reads and never reads the replies. The
// server must bound what it buffers, keep serving other clients meanwhile,
// and drop the stuck connection after its reply timeout.
func TestClientNeverReads(t *testing.T) {
	e, _ := memExport("mem", 16*miB, blockdev.Caps{})
	srv := startServer(t, serverConfig{exports: []nbd.Export{e}, replyTimeout: 2 * time.Second})
	needTool(t, "nbdinfo")
	base := runtime.NumGoroutine()
	heapBefore := heapInUse()

	c, _ := openRaw(t, srv.addr, "mem")
	_ = c.c.(*net.TCPConn).SetReadBuffer(4096)
	writerDone := make(chan struct{})
	go func() {
		defer close(writerDone)
		b := make([]byte, nbdproto.RequestSize)
		for h := uint64(0); h < 8192; h++ { // 8192 x 256 KiB = 2 GiB of replies
			nbdproto.PutRequest(b, nbdproto.Request{Type: nbdproto.CmdRead, Handle: h, Offset: (h % 64) * 256 * kiB, Length: 256 * kiB})
			_ = c.c.SetWriteDeadline(time.Now().Add(30 * time.Second))
			if _, err := c.c.Write(b); err != nil {
				return // the server stopped reading, then dropped us
			}
		}
	}()
	// Meanwhile another client works.
	time.Sleep(200 * time.Millisecond)
	other, _ := openRaw(t, srv.addr, "mem")
	for h := uint64(1); h <= 20; h++ {
		other.send(nbdproto.CmdRead, 0, h, h*4096, 4096, nil)
		if rep, _ := other.reply(func(uint64) int { return 4096 }); rep.Handle != h || rep.Error != 0 {
			t.Fatalf("other client: %+v", rep)
		}
	}
	mustRun(t, "nbdinfo", "--size", srv.uri("mem"))
	if grown := int64(heapInUse()) - int64(heapBefore); grown > 128*miB {
		t.Errorf("heap grew by %d MiB for one client that never reads", grown/miB)
	}
	other.c.Close()
	// The reply timeout drops the stuck client without our help.
	waitFor(t, "the stuck connection to be dropped", 20*time.Second, func() bool { return srv.srv.Connections("mem") == 0 })
	c.c.Close()
	<-writerDone
	waitGoroutines(t, base)
}
