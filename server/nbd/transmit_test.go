package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"syscall"
	"testing"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/blockdev/blockdevtest"
	"github.com/lupool/lupool/server/nbdproto"
)

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7)
	}
	return b
}

func TestReadWriteSimple(t *testing.T) {
	ts := startServer(t, blockdev.Caps{}, nil)
	c := dialRaw(t, ts.addr)
	c.attach("disk", false)
	data := pattern(10000, 3)
	if code := c.do(nbdproto.CmdWrite, nbdproto.CmdFlagFUA, 12345, uint32(len(data)), data); code != 0 {
		t.Fatalf("write: %s", errName(code))
	}
	if ts.mem.Flushes() != 1 {
		t.Errorf("FUA did not reach the device: %d flushes", ts.mem.Flushes())
	}
	if !bytes.Equal(ts.mem.Bytes()[12345:12345+len(data)], data) {
		t.Fatal("device does not hold the written data")
	}
	c.request(nbdproto.CmdRead, 0, 7, 12345, uint32(len(data)), nil)
	h, code, got := c.simpleReply(len(data))
	if h != 7 || code != 0 || !bytes.Equal(got, data) {
		t.Fatalf("read: handle %d code %s equal %v", h, errName(code), bytes.Equal(got, data))
	}
	if code := c.do(nbdproto.CmdFlush, 0, 0, 0, nil); code != 0 || ts.mem.Flushes() != 2 {
		t.Fatalf("flush: %s, %d flushes", errName(code), ts.mem.Flushes())
	}
	if code := c.do(nbdproto.CmdCache, 0, 0, 4096, nil); code != 0 {
		t.Fatalf("cache: %s", errName(code))
	}
	// Zero-length read and write succeed without payload.
	if code := c.do(nbdproto.CmdWrite, 0, 0, 0, nil); code != 0 {
		t.Fatalf("empty write: %s", errName(code))
	}
	c.request(nbdproto.CmdDisc, 0, 1, 0, 0, nil)
	c.expectClosed()
}

func TestValidation(t *testing.T) {
	ts := startServer(t, blockdev.Caps{}, nil, Export{Name: "ro", Device: blockdevtest.NewMem(1<<20, blockdev.Caps{ReadOnly: true})})
	c := dialRaw(t, ts.addr)
	c.attach("disk", false)
	const size = testSizeBytes
	payload := make([]byte, 4096)
	cases := []struct {
		name    string
		typ     uint16
		flags   uint16
		off     uint64
		length  uint32
		payload []byte
		want    uint32
	}{
		{"read past end", nbdproto.CmdRead, 0, size - 100, 4096, nil, nbdproto.EINVAL},
		{"read offset overflow", nbdproto.CmdRead, 0, ^uint64(0) - 10, 4096, nil, nbdproto.EINVAL},
		{"read too large", nbdproto.CmdRead, 0, 0, MaxRequestBytes + 1, nil, nbdproto.EINVAL},
		{"write past end", nbdproto.CmdWrite, 0, size - 100, 4096, payload, nbdproto.ENOSPC},
		{"write overflow", nbdproto.CmdWrite, 0, ^uint64(0), 4096, payload, nbdproto.ENOSPC},
		{"write unknown flag", nbdproto.CmdWrite, 1 << 9, 0, 4096, payload, nbdproto.EINVAL},
		{"write DF flag", nbdproto.CmdWrite, nbdproto.CmdFlagDF, 0, 4096, payload, nbdproto.EINVAL},
		{"read DF without structured", nbdproto.CmdRead, nbdproto.CmdFlagDF, 0, 4096, nil, nbdproto.EINVAL},
		{"trim past end", nbdproto.CmdTrim, 0, size, 1, nil, nbdproto.EINVAL},
		{"zero past end", nbdproto.CmdWriteZeroes, nbdproto.CmdFlagNoHole, size - 1, 2, nil, nbdproto.ENOSPC},
		{"flush with NO_HOLE", nbdproto.CmdFlush, nbdproto.CmdFlagNoHole, 0, 0, nil, nbdproto.EINVAL},
		{"read with REQ_ONE", nbdproto.CmdRead, nbdproto.CmdFlagReqOne, 0, 4096, nil, nbdproto.EINVAL},
		{"trim with FAST_ZERO", nbdproto.CmdTrim, nbdproto.CmdFlagFastZero, 0, 4096, nil, nbdproto.EINVAL},
		{"read with FUA is accepted", nbdproto.CmdRead, nbdproto.CmdFlagFUA, 0, 0, nil, 0},
		{"flush with FUA is accepted", nbdproto.CmdFlush, nbdproto.CmdFlagFUA, 0, 0, nil, 0},
		{"cache with FUA is accepted", nbdproto.CmdCache, nbdproto.CmdFlagFUA, 0, 4096, nil, 0},
		{"cache past end", nbdproto.CmdCache, 0, size, 1, nil, nbdproto.EINVAL},
		{"unknown command", 42, 0, 0, 0, nil, nbdproto.EINVAL},
		{"resize", nbdproto.CmdResize, 0, 0, 0, nil, nbdproto.EINVAL},
		{"block status without structured", nbdproto.CmdBlockStatus, 0, 0, 4096, nil, nbdproto.EINVAL},
		{"payload len flag", nbdproto.CmdWrite, nbdproto.CmdFlagPayloadLen, 0, 4096, payload, nbdproto.EINVAL},
	}
	for _, tc := range cases {
		if got := c.do(tc.typ, tc.flags, tc.off, tc.length, tc.payload); got != tc.want {
			t.Errorf("%s: got %s, want %s", tc.name, errName(got), errName(tc.want))
		}
	}
	// The connection is still in step: a good read works.
	c.request(nbdproto.CmdRead, 0, 9, size-4096, 4096, nil)
	if _, code, _ := c.simpleReply(4096); code != 0 {
		t.Fatalf("read after errors: %s", errName(code))
	}
	if !bytes.Equal(ts.mem.Bytes(), make([]byte, size)) {
		t.Fatal("a refused request changed the device")
	}

	ro := dialRaw(t, ts.addr)
	ro.attach("ro", false)
	for _, typ := range []uint16{nbdproto.CmdWrite, nbdproto.CmdTrim, nbdproto.CmdWriteZeroes} {
		var p []byte
		if typ == nbdproto.CmdWrite {
			p = payload
		}
		if got := ro.do(typ, 0, 0, 4096, p); got != nbdproto.EPERM {
			t.Errorf("read-only %s: %s", nbdproto.CommandName(typ), errName(got))
		}
	}
	if got := ro.do(nbdproto.CmdFlush, 0, 0, 0, nil); got != 0 {
		t.Errorf("read-only flush: %s", errName(got))
	}
}

func TestWriteTooLargeClosesOnlyThatConnection(t *testing.T) {
	ts := startServer(t, blockdev.Caps{}, nil)
	other := dialRaw(t, ts.addr)
	other.attach("disk", false)
	c := dialRaw(t, ts.addr)
	c.attach("disk", false)
	c.request(nbdproto.CmdWrite, 0, 1, 0, MaxRequestBytes+1, nil)
	c.expectClosed()
	if code := other.do(nbdproto.CmdFlush, 0, 0, 0, nil); code != 0 {
		t.Fatalf("other connection: %s", errName(code))
	}
	c2 := dialRaw(t, ts.addr)
	c2.attach("disk", false)
	c2.request(nbdproto.CmdRead, 0, 1, 0, 0, nil)
	c2.send([]byte("garbage magic here and more bytes"))
	if _, code, _ := c2.simpleReply(0); code != 0 {
		t.Fatalf("zero read: %s", errName(code))
	}
	c2.expectClosed()
}

func TestStructuredReplies(t *testing.T) {
	ts := startServer(t, blockdev.Caps{}, nil)
	c := dialRaw(t, ts.addr)
	c.attach("disk", true)
	data := pattern(8192, 1)
	c.request(nbdproto.CmdWrite, 0, 1, 8192, 8192, data)
	if ch := c.chunk(); ch.Type != nbdproto.ReplyTypeNone || ch.Flags != nbdproto.ReplyFlagDone || ch.Handle != 1 {
		t.Fatalf("write reply %+v", ch.StructuredReply)
	}
	c.request(nbdproto.CmdRead, nbdproto.CmdFlagDF, 2, 8192, 8192, nil)
	ch := c.chunk()
	if ch.Type != nbdproto.ReplyTypeOffsetData || ch.Flags != nbdproto.ReplyFlagDone ||
		binary.BigEndian.Uint64(ch.data) != 8192 || !bytes.Equal(ch.data[8:], data) {
		t.Fatalf("read chunk %+v", ch.StructuredReply)
	}
	c.request(nbdproto.CmdRead, 0, 3, 0, MaxRequestBytes+1, nil)
	if ch := c.chunk(); ch.errorCode() != nbdproto.EOVERFLOW || ch.Flags != nbdproto.ReplyFlagDone {
		t.Fatalf("oversized structured read: %s", errName(ch.errorCode()))
	}

	// Block status: written block, then trim makes a hole.
	status := func(off uint64, length uint32, flags uint16) [][2]uint32 {
		t.Helper()
		c.request(nbdproto.CmdBlockStatus, flags, 4, off, length, nil)
		ch := c.chunk()
		if ch.Type != nbdproto.ReplyTypeBlockStatus || binary.BigEndian.Uint32(ch.data) != contextIDAllocation {
			t.Fatalf("block status chunk %+v code %s", ch.StructuredReply, errName(ch.errorCode()))
		}
		var out [][2]uint32
		for p := ch.data[4:]; len(p) >= 8; p = p[8:] {
			out = append(out, [2]uint32{binary.BigEndian.Uint32(p), binary.BigEndian.Uint32(p[4:])})
		}
		return out
	}
	hz := nbdproto.StateHole | nbdproto.StateZero
	if got := fmt.Sprint(status(0, 32768, 0)); got != fmt.Sprint([][2]uint32{{8192, hz}, {8192, 0}, {16384, hz}}) {
		t.Fatalf("extents after write: %s", got)
	}
	if got := status(0, 32768, nbdproto.CmdFlagReqOne); len(got) != 1 || got[0] != [2]uint32{8192, hz} {
		t.Fatalf("REQ_ONE: %v", got)
	}
	c.request(nbdproto.CmdTrim, nbdproto.CmdFlagFUA, 5, 8192, 4096, nil)
	if ch := c.chunk(); ch.Type != nbdproto.ReplyTypeNone {
		t.Fatalf("trim: %s", errName(ch.errorCode()))
	}
	if got := fmt.Sprint(status(8192, 8192, 0)); got != fmt.Sprint([][2]uint32{{4096, hz}, {4096, 0}}) {
		t.Fatalf("extents after trim: %s", got)
	}
	// Write zeroes without NO_HOLE punches; with NO_HOLE stays allocated.
	c.request(nbdproto.CmdWriteZeroes, 0, 6, 12288, 4096, nil)
	c.chunk()
	c.request(nbdproto.CmdWriteZeroes, nbdproto.CmdFlagNoHole, 7, 0, 4096, nil)
	c.chunk()
	if got := fmt.Sprint(status(0, 16384, 0)); got != fmt.Sprint([][2]uint32{{4096, 0}, {12288, hz}}) {
		t.Fatalf("extents after zeroes: %s", got)
	}
	if !bytes.Equal(ts.mem.Bytes()[:32768], make([]byte, 32768)) {
		t.Fatal("data left after trim and zeroes")
	}
	c.request(nbdproto.CmdBlockStatus, 0, 8, testSizeBytes-10, 20, nil)
	if ch := c.chunk(); ch.errorCode() != nbdproto.EINVAL {
		t.Fatalf("block status past end: %s", errName(ch.errorCode()))
	}
}

func TestDeviceErrorsKeepConnection(t *testing.T) {
	ts := startServer(t, blockdev.Caps{}, nil)
	errs := map[blockdevtest.Op]error{
		blockdevtest.OpRead:  blockdev.ErrIO,
		blockdevtest.OpWrite: fmt.Errorf("wrapped: %w", syscall.ENOSPC),
		blockdevtest.OpFlush: blockdev.ErrShutdown,
		blockdevtest.OpTrim:  blockdev.ErrNotSupported,
		blockdevtest.OpZero:  errors.New("mystery"),
	}
	ts.mem.SetFault(func(op blockdevtest.Op, _, _ int64) error { return errs[op] })
	for _, structured := range []bool{false, true} {
		c := dialRaw(t, ts.addr)
		c.attach("disk", structured)
		for _, tc := range []struct {
			typ  uint16
			want uint32
		}{
			{nbdproto.CmdRead, nbdproto.EIO},
			{nbdproto.CmdWrite, nbdproto.ENOSPC},
			{nbdproto.CmdFlush, nbdproto.ESHUTDOWN},
			{nbdproto.CmdTrim, nbdproto.ENOTSUP},
			{nbdproto.CmdWriteZeroes, nbdproto.EIO},
		} {
			var p []byte
			length := uint32(4096)
			if tc.typ == nbdproto.CmdWrite {
				p = make([]byte, 4096)
			}
			if tc.typ == nbdproto.CmdFlush {
				length = 0
			}
			c.request(tc.typ, 0, 11, 0, length, p)
			var got uint32
			if structured {
				ch := c.chunk()
				got = ch.errorCode()
				if ch.Flags != nbdproto.ReplyFlagDone || ch.Handle != 11 {
					t.Fatalf("error chunk %+v", ch.StructuredReply)
				}
			} else {
				_, got, _ = c.simpleReply(0)
			}
			if got != tc.want {
				t.Errorf("structured=%v %s: %s, want %s", structured, nbdproto.CommandName(tc.typ), errName(got), errName(tc.want))
			}
		}
	}
}

func TestErrorTable(t *testing.T) {
	for _, tc := range []struct {
		cmd  uint16
		err  error
		want uint32
	}{
		{nbdproto.CmdRead, nil, 0},
		{nbdproto.CmdWrite, blockdev.ErrReadOnly, nbdproto.EPERM},
		{nbdproto.CmdWrite, blockdev.ErrNoSpace, nbdproto.ENOSPC},
		{nbdproto.CmdWrite, blockdev.ErrOutOfRange, nbdproto.ENOSPC},
		{nbdproto.CmdWriteZeroes, blockdev.ErrOutOfRange, nbdproto.ENOSPC},
		{nbdproto.CmdTrim, blockdev.ErrOutOfRange, nbdproto.EINVAL},
		{nbdproto.CmdRead, blockdev.ErrOutOfRange, nbdproto.EINVAL},
		{nbdproto.CmdTrim, fmt.Errorf("x: %w", blockdev.ErrInvalid), nbdproto.EINVAL},
		{nbdproto.CmdWriteZeroes, blockdev.ErrNotSupported, nbdproto.ENOTSUP},
		{nbdproto.CmdRead, context.Canceled, nbdproto.ESHUTDOWN},
		{nbdproto.CmdRead, syscall.EOVERFLOW, nbdproto.EOVERFLOW},
		{nbdproto.CmdWrite, syscall.EROFS, nbdproto.EPERM},
		{nbdproto.CmdWrite, syscall.EDQUOT, nbdproto.ENOSPC},
		{nbdproto.CmdRead, errors.New("?"), nbdproto.EIO},
	} {
		if got := errorCode(tc.cmd, tc.err); got != tc.want {
			t.Errorf("errorCode(%s, %v) = %s, want %s", nbdproto.CommandName(tc.cmd), tc.err, errName(got), errName(tc.want))
		}
	}
}

// gateDevice blocks reads at offset 0 until gate is closed.
type gateDevice struct {
	*blockdevtest.Mem
	gate chan struct{}
}

func (g *gateDevice) ReadAt(ctx context.Context, p []byte, off int64) error {
	if off == 0 {
		select {
		case <-g.gate:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return g.Mem.ReadAt(ctx, p, off)
}

func TestOutOfOrderReplies(t *testing.T) {
	gate := &gateDevice{Mem: blockdevtest.NewMem(1<<20, blockdev.Caps{}), gate: make(chan struct{})}
	ts := startServer(t, blockdev.Caps{}, nil, Export{Name: "gate", Device: gate})
	c := dialRaw(t, ts.addr)
	c.attach("gate", false)
	for h := range uint64(3) {
		c.request(nbdproto.CmdRead, 0, h+1, 0, 4096, nil) // blocks
	}
	c.request(nbdproto.CmdRead, 0, 9, 4096, 4096, nil) // completes first
	if h, code, _ := c.simpleReply(4096); h != 9 || code != 0 {
		t.Fatalf("first reply handle %d code %s, want handle 9", h, errName(code))
	}
	waitFor(t, func() bool {
		n := ts.srv.ConnStats()
		return len(n) == 1 && n[0].InflightRequests == 3 && n[0].Export == "gate"
	})
	// DISC waits for the blocked reads to be answered.
	c.request(nbdproto.CmdDisc, 0, 3, 0, 0, nil)
	close(gate.gate)
	seen := map[uint64]bool{}
	for range 3 {
		h, code, _ := c.simpleReply(4096)
		if code != 0 || h < 1 || h > 3 || seen[h] {
			t.Fatalf("reply handle %d code %s", h, errName(code))
		}
		seen[h] = true
	}
	c.expectClosed()
}

func TestShutdownFinishesInflight(t *testing.T) {
	gate := &gateDevice{Mem: blockdevtest.NewMem(1<<20, blockdev.Caps{}), gate: make(chan struct{})}
	ts := startServer(t, blockdev.Caps{}, nil, Export{Name: "gate", Device: gate})
	c := dialRaw(t, ts.addr)
	c.attach("gate", false)
	c.request(nbdproto.CmdRead, 0, 1, 0, 4096, nil)
	waitFor(t, func() bool { return ts.srv.ConnStats()[0].InflightRequests == 1 })
	done := make(chan error, 1)
	go func() { done <- ts.srv.Shutdown(context.Background()) }()
	waitFor(t, func() bool { return ts.srv.closing.Load() })
	// A new request during shutdown gets ESHUTDOWN.
	c.request(nbdproto.CmdFlush, 0, 2, 0, 0, nil)
	if h, code, _ := c.simpleReply(0); h != 2 || code != nbdproto.ESHUTDOWN {
		t.Fatalf("during shutdown: handle %d %s", h, errName(code))
	}
	close(gate.gate)
	if h, code, _ := c.simpleReply(4096); h != 1 || code != 0 {
		t.Fatalf("in-flight read: handle %d %s", h, errName(code))
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	c.expectClosed()
}

func TestDisconnectExport(t *testing.T) {
	ts := startServer(t, blockdev.Caps{}, nil)
	a, b := dialRaw(t, ts.addr), dialRaw(t, ts.addr)
	a.attach("disk", false)
	b.attach("disk", true)
	waitFor(t, func() bool { return ts.srv.Connections("disk") == 2 })
	if n := ts.srv.DisconnectExport("disk"); n != 2 {
		t.Fatalf("DisconnectExport = %d", n)
	}
	a.expectClosed()
	b.expectClosed()
	waitFor(t, func() bool { return ts.srv.Connections("disk") == 0 })
}

func waitFor(t testing.TB, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached in 10s")
		}
		time.Sleep(time.Millisecond)
	}
}
