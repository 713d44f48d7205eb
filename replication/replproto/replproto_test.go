package replproto

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math"
	"strings"
	"syscall"
	"testing"

	"github.com/lupool/lupool/blockdev"
)

// TestConstants checks the relationships between the limits.
func TestConstants(t *testing.T) {
	b := AppendFrame(nil, Header{Type: TypePing}, nil)
	if len(b) != HeaderBytes {
		t.Fatalf("AppendFrame wrote %d header bytes, HeaderBytes is %d", len(b), HeaderBytes)
	}
	if HeaderBytes != 48 {
		t.Fatalf("HeaderBytes = %d, want 48", HeaderBytes)
	}
	if headerCRCAt != HeaderBytes-4 || Version != 2 {
		t.Fatalf("headerCRCAt = %d, Version = %d", headerCRCAt, Version)
	}
	var big [HeaderBytes + 8]byte
	for i := range big {
		big[i] = 0xee
	}
	h := Header{Type: TypePing}
	h.Marshal(big[:])
	for i := HeaderBytes; i < len(big); i++ {
		if big[i] != 0xee {
			t.Fatalf("Marshal wrote byte %d, beyond HeaderBytes", i)
		}
	}
	if uint64(LengthMax) > math.MaxUint32 {
		t.Fatalf("LengthMax %d does not fit in uint32", LengthMax)
	}
	if uint64(LengthMax) > math.MaxInt64/2 {
		t.Fatalf("LengthMax %d too large for offset arithmetic", LengthMax)
	}
	if MessageBytesMax >= LengthMax {
		t.Fatalf("MessageBytesMax %d >= LengthMax %d", MessageBytesMax, LengthMax)
	}
	if NameBytesMax > math.MaxUint8 {
		t.Fatalf("NameBytesMax %d does not fit in a length byte", NameBytesMax)
	}
	if helloBytesMax >= LengthMax {
		t.Fatalf("helloBytesMax %d >= LengthMax", helloBytesMax)
	}
	if flagsKnown != FlagFUA|FlagNoHole|FlagFastZero|FlagResync {
		t.Fatalf("flagsKnown = %#x", flagsKnown)
	}
	if string(binary.BigEndian.AppendUint32(nil, Magic)) != "LURP" {
		t.Fatalf("Magic %#x is not LURP", Magic)
	}
	for typ := TypeHello; typ <= typeLast; typ++ {
		if typ&TypeReply != 0 {
			t.Fatalf("request type %v overlaps TypeReply", typ)
		}
	}
}

// TestMarshalLayout pins the byte layout of the header.
func TestMarshalLayout(t *testing.T) {
	h := Header{
		Type:       TypeReply | TypeRead,
		Flags:      0,
		Status:     StatusOK,
		Handle:     0x0102030405060708,
		Epoch:      0x1112131415161718,
		Offset:     0x2122232425262728,
		Length:     0x31323334,
		PayloadLen: 0x41424344,
		PayloadCRC: 0x51525354,
	}
	var b [HeaderBytes]byte
	h.Marshal(b[:])
	want := []byte{
		0x4c, 0x55, 0x52, 0x50, 0x86, 0x00, 0x00, 0x00,
		0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08,
		0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18,
		0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28,
		0x31, 0x32, 0x33, 0x34, 0x41, 0x42, 0x43, 0x44,
		0x51, 0x52, 0x53, 0x54,
	}
	want = binary.BigEndian.AppendUint32(want, crc32.Checksum(want, crc32.MakeTable(crc32.Castagnoli)))
	if !bytes.Equal(b[:], want) {
		t.Fatalf("layout\n got %x\nwant %x", b, want)
	}
	h2 := Header{Type: TypeZero, Flags: FlagFastZero | FlagResync, Status: StatusReadOnly}
	h2.Marshal(b[:])
	if b[4] != 4 || b[5] != 0x0c || b[6] != 0 || b[7] != 10 {
		t.Fatalf("type/flags/status bytes %x", b[4:8])
	}
}

func TestMarshalPanicsOnShortBuffer(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Fatal("Marshal into a short buffer did not panic")
		}
	}()
	h := Header{Type: TypePing}
	h.Marshal(make([]byte, HeaderBytes-1))
}

// validHeaders returns one valid request and replies for every type.
func validHeaders() []Header {
	const ep = 7
	return []Header{
		{Type: TypeHello, Handle: 1, Epoch: ep, Offset: 1 << 30, PayloadLen: 5},
		{Type: TypeHello, Handle: 1, Epoch: ep, PayloadLen: helloBytesMax},
		{Type: TypeWrite, Handle: 2, Epoch: ep, Offset: 4096, Length: 4096, PayloadLen: 4096},
		{Type: TypeWrite, Flags: FlagFUA | FlagResync, Handle: 2, Offset: 0, Length: LengthMax, PayloadLen: LengthMax},
		{Type: TypeWrite, Handle: 2, Offset: 8, Length: 0, PayloadLen: 0},
		{Type: TypeTrim, Flags: FlagFUA, Handle: 3, Offset: 1 << 20, Length: 1 << 20},
		{Type: TypeZero, Flags: FlagFUA | FlagNoHole | FlagFastZero | FlagResync, Handle: 4, Length: 512},
		{Type: TypeFlush, Handle: 5, Epoch: ep},
		{Type: TypeRead, Handle: 6, Offset: math.MaxInt64 - LengthMax, Length: LengthMax},
		{Type: TypeHash, Handle: 7, Offset: 0, Length: 1},
		{Type: TypePing, Handle: math.MaxUint64, Epoch: math.MaxUint64},
		{Type: TypePing, Offset: 1 << 50}, // a lease echo
		{Type: TypeLog, Handle: 9, Epoch: ep},
		{Type: TypeSnapshot, Handle: 10, Epoch: ep, PayloadLen: 5},
		{Type: TypeRollback, Handle: 11, Epoch: ep, PayloadLen: NameBytesMax},

		{Type: TypeReply | TypeHello, Handle: 1, Epoch: ep, Offset: 1 << 30},
		{Type: TypeReply | TypeHello, Status: StatusStaleEpoch, Handle: 1, Epoch: ep + 1, PayloadLen: 11},
		{Type: TypeReply | TypeHello, Status: StatusNotFound, Handle: 1},
		{Type: TypeReply | TypeHello, Status: StatusNotWriter, Handle: 1, PayloadLen: MessageBytesMax},
		{Type: TypeReply | TypeWrite, Flags: FlagFUA, Handle: 2, Offset: 4096, Length: 4096},
		{Type: TypeReply | TypeWrite, Status: StatusIO, Handle: 2, Offset: 4096, Length: 4096, PayloadLen: 20},
		{Type: TypeReply | TypeTrim, Handle: 3, Length: 1 << 20},
		{Type: TypeReply | TypeZero, Flags: FlagFastZero, Status: StatusNotSupported, Handle: 4, Length: 512},
		{Type: TypeReply | TypeFlush, Handle: 5},
		{Type: TypeReply | TypeRead, Handle: 6, Offset: 512, Length: 4096, PayloadLen: 4096},
		{Type: TypeReply | TypeRead, Status: StatusOutOfRange, Handle: 6, Offset: 512, Length: 4096},
		{Type: TypeReply | TypeHash, Handle: 7, Length: 1 << 20, PayloadLen: 32},
		{Type: TypeReply | TypePing, Handle: 8, Epoch: ep},
		{Type: TypeReply | TypePing, Status: Status(999), Handle: 8, PayloadLen: 3},
		{Type: TypeReply | TypeLog, Handle: 9, Epoch: ep, PayloadLen: 1 + 3*16},
		{Type: TypeReply | TypeLog, Status: StatusIO, Handle: 9, PayloadLen: 4},
		{Type: TypeReply | TypeSnapshot, Handle: 10, Epoch: ep},
		{Type: TypeReply | TypeRollback, Status: StatusIO, Handle: 11, PayloadLen: 9},
	}
}

func TestHeaderRoundTrip(t *testing.T) {
	seen := map[Type]bool{}
	for _, h := range validHeaders() {
		t.Run(h.Type.String(), func(t *testing.T) {
			var b [HeaderBytes]byte
			h.Marshal(b[:])
			got, err := ParseHeader(b[:])
			if err != nil {
				t.Fatalf("ParseHeader(%+v): %v", h, err)
			}
			if got != h {
				t.Fatalf("round trip\n got %+v\nwant %+v", got, h)
			}
			var again [HeaderBytes]byte
			got.Marshal(again[:])
			if again != b {
				t.Fatalf("re-marshal %x != %x", again, b)
			}
			// Trailing bytes beyond the header are not the header's business.
			if _, err := ParseHeader(append(b[:], 1, 2, 3)); err != nil {
				t.Fatalf("ParseHeader with trailing bytes: %v", err)
			}
			got2, err := ReadHeader(bytes.NewReader(b[:]), new([HeaderBytes]byte))
			if err != nil || got2 != h {
				t.Fatalf("ReadHeader = %+v, %v", got2, err)
			}
		})
		seen[h.Type] = true
	}
	for typ := TypeHello; typ <= typeLast; typ++ {
		if !seen[typ] || !seen[TypeReply|typ] {
			t.Errorf("no round trip for %v or its reply", typ)
		}
	}
}

func TestParseHeaderRejects(t *testing.T) {
	ok := Header{Type: TypeWrite, Handle: 1, Epoch: 2, Offset: 4096, Length: 4096, PayloadLen: 4096}
	tests := []struct {
		name string
		h    Header
		// mutate, if set, edits the marshalled bytes.
		mutate func(b []byte) []byte
		want   string
	}{
		{name: "short", h: ok, mutate: func(b []byte) []byte { return b[:HeaderBytes-1] }, want: "short header"},
		{name: "empty", h: ok, mutate: func(b []byte) []byte { return nil }, want: "short header"},
		{name: "bad magic", h: ok, mutate: func(b []byte) []byte { b[0] ^= 1; return b }, want: "bad magic"},
		{name: "NBD magic", h: ok, mutate: func(b []byte) []byte { copy(b, []byte{0x25, 0x60, 0x95, 0x13}); return b }, want: "bad magic"},
		{name: "type 0", h: Header{Type: 0}, want: "unknown type"},
		{name: "type 12", h: Header{Type: 12}, want: "unknown type"},
		{name: "snapshot without a name", h: Header{Type: TypeSnapshot}, want: "payload length 0"},
		{name: "rollback with a range", h: Header{Type: TypeRollback, Length: 4096, PayloadLen: 3}, want: "length 4096"},
		{name: "type 0x7f", h: Header{Type: 0x7f}, want: "unknown type"},
		{name: "reply type 0x80", h: Header{Type: TypeReply}, want: "unknown type"},
		{name: "reply type 0x8c", h: Header{Type: TypeReply | 12}, want: "unknown type"},
		{name: "reply type 0xff", h: Header{Type: 0xff}, want: "unknown type"},
		{name: "unknown flag 0x10", h: Header{Type: TypeWrite, Flags: 0x10}, want: "unknown flags 0x10"},
		{name: "unknown flag 0x80", h: Header{Type: TypeZero, Flags: FlagFUA | 0x80}, want: "unknown flags 0x80"},
		{name: "FUA on Read", h: Header{Type: TypeRead, Flags: FlagFUA, Length: 1}, want: "not valid on Read"},
		{name: "FUA on Flush", h: Header{Type: TypeFlush, Flags: FlagFUA}, want: "not valid on Flush"},
		{name: "Resync on Hello", h: Header{Type: TypeHello, Flags: FlagResync, PayloadLen: 5}, want: "not valid on Hello"},
		{name: "NoHole on Write", h: Header{Type: TypeWrite, Flags: FlagNoHole}, want: "not valid on Write"},
		{name: "FastZero on Trim", h: Header{Type: TypeTrim, Flags: FlagFastZero}, want: "not valid on Trim"},
		{name: "Resync on Hash", h: Header{Type: TypeHash, Flags: FlagResync, Length: 1}, want: "not valid on Hash"},
		{name: "FUA on Ping", h: Header{Type: TypePing, Flags: FlagFUA}, want: "not valid on Ping"},
		{name: "NoHole on Write reply", h: Header{Type: TypeReply | TypeWrite, Flags: FlagNoHole}, want: "not valid on WriteReply"},
		{name: "FUA on Read reply", h: Header{Type: TypeReply | TypeRead, Flags: FlagFUA}, want: "not valid on ReadReply"},
		{name: "status in request", h: Header{Type: TypeFlush, Status: StatusIO}, want: "request with status IO"},
		{name: "unknown status in request", h: Header{Type: TypeTrim, Status: 500}, want: "request with status Status(500)"},
		{name: "length too big", h: Header{Type: TypeRead, Length: LengthMax + 1}, want: "length 33554433 exceeds"},
		{name: "length max uint32", h: Header{Type: TypeTrim, Length: math.MaxUint32}, want: "length 4294967295 exceeds"},
		{name: "payload too big", h: Header{Type: TypeWrite, Length: 1, PayloadLen: LengthMax + 1}, want: "payload length 33554433 exceeds"},
		{name: "reply payload too big", h: Header{Type: TypeReply | TypeRead, PayloadLen: math.MaxUint32}, want: "payload length 4294967295 exceeds"},
		{name: "offset overflow", h: Header{Type: TypeRead, Offset: math.MaxInt64, Length: 1}, want: "overflows"},
		{name: "offset above int64", h: Header{Type: TypeTrim, Offset: math.MaxInt64 + 1}, want: "overflows"},
		{name: "offset max uint64", h: Header{Type: TypeReply | TypeFlush, Offset: math.MaxUint64}, want: "overflows"},
		{name: "Write payload short", h: Header{Type: TypeWrite, Length: 4096, PayloadLen: 4095}, want: "Write payload length 4095 != length 4096"},
		{name: "Write payload long", h: Header{Type: TypeWrite, Length: 0, PayloadLen: 1}, want: "Write payload length 1 != length 0"},
		{name: "Hello empty", h: Header{Type: TypeHello}, want: "Hello payload length 0 not in"},
		{name: "Hello too long", h: Header{Type: TypeHello, PayloadLen: helloBytesMax + 1}, want: "Hello payload length 260 not in"},
		{name: "Trim payload", h: Header{Type: TypeTrim, Length: 1, PayloadLen: 1}, want: "Trim request with payload length 1"},
		{name: "Zero payload", h: Header{Type: TypeZero, PayloadLen: 4}, want: "Zero request with payload length 4"},
		{name: "Flush payload", h: Header{Type: TypeFlush, PayloadLen: 1}, want: "Flush request with payload"},
		{name: "Read payload", h: Header{Type: TypeRead, Length: 8, PayloadLen: 8}, want: "Read request with payload"},
		{name: "Hash payload", h: Header{Type: TypeHash, Length: 8, PayloadLen: 32}, want: "Hash request with payload"},
		{name: "Flush offset", h: Header{Type: TypeFlush, Offset: 1}, want: "Flush with range offset 1 length 0"},
		{name: "Flush length", h: Header{Type: TypeFlush, Length: 1}, want: "Flush with range offset 0 length 1"},
		{name: "Ping length", h: Header{Type: TypePing, Length: 4096}, want: "Ping with length"},
		{name: "Hash zero length", h: Header{Type: TypeHash, Offset: 4096}, want: "Hash of zero length"},
		{name: "error reply message too long", h: Header{Type: TypeReply | TypeWrite, Status: StatusIO, PayloadLen: MessageBytesMax + 1}, want: "message length 1025 exceeds"},
		{name: "unknown status message too long", h: Header{Type: TypeReply | TypeHello, Status: 77, PayloadLen: 4096}, want: "Status(77) with message length"},
		{name: "Read reply short", h: Header{Type: TypeReply | TypeRead, Length: 4096, PayloadLen: 4095}, want: "ReadReply OK with payload length 4095, want 4096"},
		{name: "Read reply long", h: Header{Type: TypeReply | TypeRead, Length: 0, PayloadLen: 1}, want: "ReadReply OK with payload length 1, want 0"},
		{name: "Hash reply short", h: Header{Type: TypeReply | TypeHash, Length: 1, PayloadLen: 31}, want: "HashReply OK with payload length 31, want 32"},
		{name: "Hash reply empty", h: Header{Type: TypeReply | TypeHash, Length: 1}, want: "HashReply OK with payload length 0, want 32"},
		{name: "Write reply payload", h: Header{Type: TypeReply | TypeWrite, Length: 4, PayloadLen: 4}, want: "WriteReply OK with payload length 4, want 0"},
		{name: "Hello reply payload", h: Header{Type: TypeReply | TypeHello, PayloadLen: 5}, want: "HelloReply OK with payload length 5, want 0"},
		{name: "Trim reply payload", h: Header{Type: TypeReply | TypeTrim, PayloadLen: 1}, want: "TrimReply OK with payload"},
		{name: "Zero reply payload", h: Header{Type: TypeReply | TypeZero, PayloadLen: 1}, want: "ZeroReply OK with payload"},
		{name: "Flush reply payload", h: Header{Type: TypeReply | TypeFlush, PayloadLen: 1}, want: "FlushReply OK with payload"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b := make([]byte, HeaderBytes)
			tc.h.Marshal(b)
			if tc.mutate != nil {
				b = tc.mutate(b)
			}
			h, err := ParseHeader(b)
			if err == nil {
				t.Fatalf("ParseHeader accepted %+v", h)
			}
			if !errors.Is(err, ErrBadFrame) {
				t.Fatalf("error %v does not wrap ErrBadFrame", err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not mention %q", err, tc.want)
			}
			if !strings.HasPrefix(err.Error(), "replproto: malformed frame: ") {
				t.Fatalf("error %q lacks the prefix", err)
			}
			if h != (Header{}) {
				t.Fatalf("rejected header returned %+v", h)
			}
		})
	}
}

// errReader returns its data then err.
type errReader struct {
	data []byte
	err  error
}

func (r *errReader) Read(p []byte) (int, error) {
	if len(r.data) == 0 {
		return 0, r.err
	}
	n := copy(p, r.data)
	r.data = r.data[n:]
	return n, nil
}

func TestReadHeader(t *testing.T) {
	var frame [HeaderBytes]byte
	want := Header{Type: TypeFlush, Handle: 9, Epoch: 3}
	want.Marshal(frame[:])
	var buf [HeaderBytes]byte

	// Two frames back to back, delivered one byte at a time.
	stream := append(append([]byte{}, frame[:]...), frame[:]...)
	r := io.MultiReader(&oneByteReader{bytes.NewReader(stream)})
	for i := 0; i < 2; i++ {
		h, err := ReadHeader(r, &buf)
		if err != nil || h != want {
			t.Fatalf("frame %d: %+v, %v", i, h, err)
		}
	}
	if _, err := ReadHeader(r, &buf); err != io.EOF {
		t.Fatalf("at end of stream: %v, want io.EOF", err)
	}
	if _, err := ReadHeader(bytes.NewReader(frame[:17]), &buf); err != io.ErrUnexpectedEOF {
		t.Fatalf("truncated header: %v, want io.ErrUnexpectedEOF", err)
	}
	if _, err := ReadHeader(bytes.NewReader(nil), &buf); err != io.EOF {
		t.Fatalf("empty stream: %v, want io.EOF", err)
	}
	boom := errors.New("boom")
	if _, err := ReadHeader(&errReader{data: frame[:3], err: boom}, &buf); err != boom {
		t.Fatalf("read error: %v, want boom", err)
	}
	bad := frame
	bad[1] = 0
	if _, err := ReadHeader(bytes.NewReader(bad[:]), &buf); !errors.Is(err, ErrBadFrame) {
		t.Fatalf("bad magic: %v", err)
	}
}

type oneByteReader struct{ r io.Reader }

func (o *oneByteReader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	return o.r.Read(p[:1])
}

func TestAppendFrame(t *testing.T) {
	payload := bytes.Repeat([]byte{0xab}, 4096)
	h := Header{Type: TypeWrite, Flags: FlagFUA, Handle: 42, Epoch: 5, Offset: 8192, Length: 4096, PayloadLen: 1}
	dst := []byte("prefix")
	out := AppendFrame(dst, h, payload)
	if string(out[:6]) != "prefix" {
		t.Fatalf("prefix clobbered: %q", out[:6])
	}
	if len(out) != 6+HeaderBytes+len(payload) {
		t.Fatalf("len %d", len(out))
	}
	got, err := ParseHeader(out[6:])
	if err != nil {
		t.Fatal(err)
	}
	h.PayloadLen, h.PayloadCRC = 4096, Checksum(payload)
	if got != h {
		t.Fatalf("header %+v, want %+v", got, h)
	}
	if !bytes.Equal(out[6+HeaderBytes:], payload) {
		t.Fatal("payload differs")
	}
	// Batching: a second frame appends after the first.
	out = AppendFrame(out, Header{Type: TypeFlush, Handle: 43}, nil)
	got, err = ParseHeader(out[6+HeaderBytes+len(payload):])
	if err != nil || got.Type != TypeFlush || got.Handle != 43 || got.PayloadLen != 0 {
		t.Fatalf("second frame %+v, %v", got, err)
	}
}

func TestAppendFramePanicsOnHugePayload(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Fatal("AppendFrame with an oversized payload did not panic")
		}
	}()
	AppendFrame(nil, Header{Type: TypeWrite}, make([]byte, LengthMax+1))
}

func TestHelloRoundTrip(t *testing.T) {
	long := strings.Repeat("n", NameBytesMax)
	for _, h := range []Hello{
		{Role: RoleCopy, LU: "vol0", Node: "node-1"},
		{Role: RoleClient, LU: "a", Node: "b"},
		{Role: RoleCopy, LU: long, Node: long},
		{Role: RoleClient, LU: "ünïcode/λ", Node: "10.0.0.1:7000"},
	} {
		p := AppendHello([]byte("x"), h)
		if p[0] != 'x' {
			t.Fatal("prefix clobbered")
		}
		p = p[1:]
		if len(p) != 3+len(h.LU)+len(h.Node) {
			t.Fatalf("payload length %d", len(p))
		}
		got, err := ParseHello(p)
		if err != nil {
			t.Fatalf("ParseHello(%+v): %v", h, err)
		}
		if got != h {
			t.Fatalf("round trip %+v != %+v", got, h)
		}
		// The payload fits the Hello request header rules.
		hdr := Header{Type: TypeHello, PayloadLen: uint32(len(p))}
		var b [HeaderBytes]byte
		hdr.Marshal(b[:])
		if _, err := ParseHeader(b[:]); err != nil {
			t.Fatalf("Hello header for %d-byte payload: %v", len(p), err)
		}
	}
	want := []byte{1, 3, 'l', 'u', '0', 2, 'n', '1'}
	if got := AppendHello(nil, Hello{Role: RoleCopy, LU: "lu0", Node: "n1"}); !bytes.Equal(got, want) {
		t.Fatalf("layout %x, want %x", got, want)
	}
}

func TestParseHelloRejects(t *testing.T) {
	long := strings.Repeat("x", NameBytesMax+1)
	tests := []struct {
		name string
		p    []byte
		want string
	}{
		{"empty", nil, "truncated"},
		{"role only", []byte{1}, "truncated"},
		{"no node length", []byte{1, 2, 'a', 'b'}, "truncated in the LU name"},
		{"name cut", []byte{1, 5, 'a', 'b'}, "truncated in the LU name"},
		{"node cut", []byte{1, 1, 'a', 3, 'n'}, "truncated in the node id"},
		{"trailing", []byte{1, 1, 'a', 1, 'n', 0}, "1 trailing bytes"},
		{"role 0", []byte{0, 1, 'a', 1, 'n'}, "unknown role 0"},
		{"role 4", []byte{4, 1, 'a', 1, 'n'}, "unknown role 4"},
		{"empty name", []byte{1, 0, 1, 'n'}, "LU name of 0 bytes"},
		{"empty node", []byte{2, 1, 'a', 0}, "node id of 0 bytes"},
		{"name too long", append(append([]byte{1, byte(len(long))}, long...), 1, 'n'), "LU name of 129 bytes"},
		{"node too long", append([]byte{1, 1, 'a', byte(len(long))}, long...), "node id of 129 bytes"},
		{"oversized", make([]byte, helloBytesMax+1), "exceeds"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h, err := ParseHello(tc.p)
			if err == nil {
				t.Fatalf("ParseHello accepted %+v", h)
			}
			if !errors.Is(err, ErrBadFrame) {
				t.Fatalf("error %v does not wrap ErrBadFrame", err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not mention %q", err, tc.want)
			}
		})
	}
}

func TestAppendHelloPanics(t *testing.T) {
	for _, h := range []Hello{
		{Role: 0, LU: "a", Node: "n"},
		{Role: RoleCopy, LU: "", Node: "n"},
		{Role: RoleCopy, LU: "a", Node: ""},
		{Role: RoleCopy, LU: strings.Repeat("a", NameBytesMax+1), Node: "n"},
		{Role: RoleClient, LU: "a", Node: strings.Repeat("n", 256)},
	} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("AppendHello(%+v) did not panic", h)
				}
			}()
			AppendHello(nil, h)
		}()
	}
}

// statusErrors lists every status with the error it maps to.
var statusErrors = []struct {
	s   Status
	err error
}{
	{StatusOK, nil},
	{StatusStaleEpoch, ErrStaleEpoch},
	{StatusIO, blockdev.ErrIO},
	{StatusNoSpace, blockdev.ErrNoSpace},
	{StatusInvalid, blockdev.ErrInvalid},
	{StatusNotFound, ErrNotFound},
	{StatusShutdown, blockdev.ErrShutdown},
	{StatusOutOfRange, blockdev.ErrOutOfRange},
	{StatusNotSupported, blockdev.ErrNotSupported},
	{StatusNotWriter, ErrNotWriter},
	{StatusReadOnly, blockdev.ErrReadOnly},
	{StatusForbidden, ErrForbidden},
	{StatusChecksum, ErrChecksum},
}

func TestStatusErr(t *testing.T) {
	if len(statusErrors) != int(statusLast)+1 {
		t.Fatalf("table has %d statuses, want %d", len(statusErrors), statusLast+1)
	}
	for i, tc := range statusErrors {
		if tc.s != Status(i) {
			t.Fatalf("table row %d is %v", i, tc.s)
		}
		if got := tc.s.Err(); got != tc.err {
			t.Errorf("%v.Err() = %v, want %v", tc.s, got, tc.err)
		}
		if got := StatusOf(tc.err); got != tc.s {
			t.Errorf("StatusOf(%v) = %v, want %v", tc.err, got, tc.s)
		}
		if tc.err != nil {
			wrapped := fmt.Errorf("lu %q: write at 4096: %w", "vol0", tc.err)
			if got := StatusOf(wrapped); got != tc.s {
				t.Errorf("StatusOf(wrapped %v) = %v, want %v", tc.err, got, tc.s)
			}
			if !errors.Is(StatusOf(wrapped).Err(), tc.err) {
				t.Errorf("%v does not survive the round trip", tc.err)
			}
		}
	}
	for _, s := range []Status{statusLast + 1, 100, math.MaxUint16} {
		err := s.Err()
		if !errors.Is(err, ErrBadFrame) || !strings.Contains(err.Error(), fmt.Sprintf("unknown status %d", s)) {
			t.Errorf("%d.Err() = %v", s, err)
		}
	}
}

func TestStatusOf(t *testing.T) {
	tests := []struct {
		err  error
		want Status
	}{
		{syscall.ENOSPC, StatusNoSpace},
		{fmt.Errorf("pwrite: %w", syscall.ENOSPC), StatusNoSpace},
		{syscall.EIO, StatusIO},
		{fmt.Errorf("fsync: %w", syscall.EIO), StatusIO},
		{context.Canceled, StatusIO},
		{fmt.Errorf("wait: %w", context.DeadlineExceeded), StatusIO},
		{errors.New("something else"), StatusIO},
		{io.ErrUnexpectedEOF, StatusIO},
		{fmt.Errorf("%w and %w", ErrStaleEpoch, blockdev.ErrIO), StatusStaleEpoch},
	}
	for _, tc := range tests {
		if got := StatusOf(tc.err); got != tc.want {
			t.Errorf("StatusOf(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}

func TestStrings(t *testing.T) {
	for _, tc := range []struct {
		got, want string
	}{
		{TypeHello.String(), "Hello"},
		{TypeWrite.String(), "Write"},
		{TypeTrim.String(), "Trim"},
		{TypeZero.String(), "Zero"},
		{TypeFlush.String(), "Flush"},
		{TypeRead.String(), "Read"},
		{TypeHash.String(), "Hash"},
		{TypePing.String(), "Ping"},
		{TypeLog.String(), "Log"},
		{(TypeReply | TypeRead).String(), "ReadReply"},
		{Type(0).String(), "Type(0x00)"},
		{Type(0x8c).String(), "Type(0x8c)"},
		{TypeSnapshot.String(), "Snapshot"},
		{TypeReply.String(), "Type(0x80)"},
		{StatusOK.String(), "OK"},
		{StatusStaleEpoch.String(), "StaleEpoch"},
		{StatusReadOnly.String(), "ReadOnly"},
		{StatusForbidden.String(), "Forbidden"},
		{StatusChecksum.String(), "Checksum"},
		{Status(13).String(), "Status(13)"},
	} {
		if tc.got != tc.want {
			t.Errorf("got %q, want %q", tc.got, tc.want)
		}
	}
	for s := StatusOK; s <= statusLast; s++ {
		if strings.HasPrefix(s.String(), "Status(") || s.String() == "" {
			t.Errorf("status %d has no name", s)
		}
	}
}

func TestNoAllocs(t *testing.T) {
	var b [HeaderBytes]byte
	h := Header{Type: TypeWrite, Handle: 1, Length: 4096, PayloadLen: 4096}
	r := bytes.NewReader(nil)
	var buf [HeaderBytes]byte
	n := testing.AllocsPerRun(100, func() {
		h.Marshal(b[:])
		if _, err := ParseHeader(b[:]); err != nil {
			t.Fatal(err)
		}
		r.Reset(b[:])
		if _, err := ReadHeader(r, &buf); err != nil {
			t.Fatal(err)
		}
	})
	if n != 0 {
		t.Fatalf("Marshal/ParseHeader/ReadHeader allocated %v times", n)
	}
	dst := make([]byte, 0, HeaderBytes+4096)
	payload := make([]byte, 4096)
	n = testing.AllocsPerRun(100, func() {
		dst = AppendFrame(dst[:0], h, payload)
	})
	if n != 0 {
		t.Fatalf("AppendFrame into a large enough buffer allocated %v times", n)
	}
}

// FuzzParseHeader checks that ParseHeader never panics, that every error
// wraps ErrBadFrame, and that an accepted header re-marshals to the same
// bytes.
func FuzzParseHeader(f *testing.F) {
	for _, h := range validHeaders() {
		var b [HeaderBytes]byte
		h.Marshal(b[:])
		f.Add(b[:])
	}
	f.Add([]byte("LURP"))
	f.Fuzz(func(t *testing.T, in []byte) {
		checkParsedHeader(t, in)
		// Random bytes almost never carry a matching header_crc: parse
		// them sealed as well, so that the field rules get fuzzed too.
		if len(in) >= HeaderBytes {
			sealed := bytes.Clone(in)
			binary.BigEndian.PutUint32(sealed[headerCRCAt:], Checksum(sealed[:headerCRCAt]))
			checkParsedHeader(t, sealed)
		}
	})
}

// checkParsedHeader parses in and checks what FuzzParseHeader promises.
func checkParsedHeader(t *testing.T, in []byte) {
	t.Helper()
	{
		h, err := ParseHeader(in)
		if err != nil {
			if !errors.Is(err, ErrBadFrame) {
				t.Fatalf("error %v does not wrap ErrBadFrame", err)
			}
			return
		}
		var out [HeaderBytes]byte
		h.Marshal(out[:])
		if !bytes.Equal(out[:], in[:HeaderBytes]) {
			t.Fatalf("round trip %x != %x", out, in[:HeaderBytes])
		}
		if h.Length > LengthMax || h.PayloadLen > LengthMax || h.Offset+uint64(h.Length) > math.MaxInt64 {
			t.Fatalf("accepted out-of-bounds header %+v", h)
		}
		if !h.Type.isReply() && h.Status != StatusOK {
			t.Fatalf("accepted request with status %+v", h)
		}
	}
}

// FuzzParseHello checks that ParseHello never panics, that every error wraps
// ErrBadFrame, and that an accepted Hello re-encodes to the same bytes.
func FuzzParseHello(f *testing.F) {
	f.Add(AppendHello(nil, Hello{Role: RoleCopy, LU: "vol0", Node: "node-1"}))
	f.Add(AppendHello(nil, Hello{Role: RoleClient, LU: "a", Node: "b"}))
	f.Add([]byte{1, 5, 'a'})
	f.Fuzz(func(t *testing.T, in []byte) {
		h, err := ParseHello(in)
		if err != nil {
			if !errors.Is(err, ErrBadFrame) {
				t.Fatalf("error %v does not wrap ErrBadFrame", err)
			}
			return
		}
		out := AppendHello(nil, h)
		if !bytes.Equal(out, in) {
			t.Fatalf("round trip %x != %x", out, in)
		}
	})
}

// FuzzParseLog checks that ParseLog never panics, that every error wraps
// ErrBadFrame, and that an accepted payload re-encodes to the same bytes.
func FuzzParseLog(f *testing.F) {
	f.Add(AppendLog(nil, false, nil))
	f.Add(AppendLog(nil, true, nil))
	f.Add(AppendLog(nil, true, [][2]int64{{0, 1 << 20}, {5 << 20, 2 << 20}}))
	f.Add([]byte{0, 1, 2})
	f.Fuzz(func(t *testing.T, in []byte) {
		known, ranges, err := ParseLog(in)
		if err != nil {
			if !errors.Is(err, ErrBadFrame) {
				t.Fatalf("error %v does not wrap ErrBadFrame", err)
			}
			return
		}
		if out := AppendLog(nil, known, ranges); !bytes.Equal(out, in) {
			t.Fatalf("round trip %x != %x", out, in)
		}
	})
}

// TestLogPayload: the Log payload's rules, and a Log reply's header.
func TestLogPayload(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   []byte
		ok   bool
	}{
		{"unknown", []byte{LogUnknown}, true},
		{"no ranges", []byte{LogRanges}, true},
		{"one range", AppendLog(nil, true, [][2]int64{{4096, 8192}}), true},
		{"empty", nil, false},
		{"unknown with bytes", []byte{LogUnknown, 0}, false},
		{"bad kind", []byte{2}, false},
		{"torn range", AppendLog(nil, true, [][2]int64{{4096, 8192}})[:10], false},
		{"zero length", append([]byte{LogRanges}, make([]byte, 16)...), false},
		{"overflow", append([]byte{LogRanges}, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 2), false},
	} {
		_, _, err := ParseLog(tc.in)
		if (err == nil) != tc.ok {
			t.Errorf("%s: ParseLog(%x) = %v, want ok %v", tc.name, tc.in, err, tc.ok)
		}
	}
	for _, tc := range []struct {
		h  Header
		ok bool
	}{
		{Header{Type: TypeLog}, true},
		{Header{Type: TypeLog, Offset: 1}, false},
		{Header{Type: TypeLog, Length: 1}, false},
		{Header{Type: TypeReply | TypeLog, PayloadLen: 17}, true},
		{Header{Type: TypeReply | TypeLog, PayloadLen: 1}, true},
		{Header{Type: TypeReply | TypeLog, PayloadLen: 0}, false},
		{Header{Type: TypeReply | TypeLog, PayloadLen: 16}, false},
	} {
		var b [HeaderBytes]byte
		tc.h.Marshal(b[:])
		if _, err := ParseHeader(b[:]); (err == nil) != tc.ok {
			t.Errorf("header %+v: %v, want ok %v", tc.h, err, tc.ok)
		}
	}
}

func BenchmarkParseHeader(b *testing.B) {
	var buf [HeaderBytes]byte
	h := Header{Type: TypeWrite, Flags: FlagFUA, Handle: 1, Epoch: 9, Offset: 1 << 30, Length: 4096, PayloadLen: 4096}
	h.Marshal(buf[:])
	b.ReportAllocs()
	b.SetBytes(HeaderBytes)
	for b.Loop() {
		got, err := ParseHeader(buf[:])
		if err != nil || got.Handle != 1 {
			b.Fatal(err)
		}
	}
}

func BenchmarkAppendFrame4K(b *testing.B) {
	payload := make([]byte, 4096)
	h := Header{Type: TypeWrite, Handle: 1, Epoch: 9, Offset: 1 << 30, Length: 4096}
	dst := make([]byte, 0, HeaderBytes+len(payload))
	b.ReportAllocs()
	b.SetBytes(int64(HeaderBytes + len(payload)))
	for b.Loop() {
		dst = AppendFrame(dst[:0], h, payload)
	}
}

// TestHeaderChecksum flips every bit of a valid header in turn: each flip
// is refused (bad magic or a header_crc mismatch), never parsed into
// another header.
func TestHeaderChecksum(t *testing.T) {
	payload := bytes.Repeat([]byte{0x5a}, 4096)
	frame := AppendFrame(nil, Header{Type: TypeWrite, Flags: FlagFUA, Handle: 3, Epoch: 4, Offset: 8192, Length: 4096}, payload)
	if _, err := ParseHeader(frame); err != nil {
		t.Fatalf("valid header refused: %v", err)
	}
	for bit := 0; bit < HeaderBytes*8; bit++ {
		b := bytes.Clone(frame[:HeaderBytes])
		b[bit/8] ^= 1 << (bit % 8)
		h, err := ParseHeader(b)
		if err == nil {
			t.Fatalf("bit %d flipped: accepted %+v", bit, h)
		}
		if !errors.Is(err, ErrBadFrame) {
			t.Fatalf("bit %d flipped: %v does not wrap ErrBadFrame", bit, err)
		}
		if bit >= 32 && !errors.Is(err, ErrChecksum) {
			t.Fatalf("bit %d flipped: %v does not wrap ErrChecksum", bit, err)
		}
	}
}

// TestPayloadChecksum checks CheckPayload against AppendFrame's payload_crc:
// the payload sent passes, every single-byte change and a truncation fail.
func TestPayloadChecksum(t *testing.T) {
	payload := make([]byte, 4096)
	for i := range payload {
		payload[i] = byte(i * 7)
	}
	frame := AppendFrame(nil, Header{Type: TypeWrite, Handle: 1, Length: 4096}, payload)
	h, err := ParseHeader(frame)
	if err != nil {
		t.Fatal(err)
	}
	if h.PayloadCRC != Checksum(payload) || h.PayloadCRC == 0 {
		t.Fatalf("PayloadCRC %#x, want %#x", h.PayloadCRC, Checksum(payload))
	}
	summed := AppendSummedFrame(nil, Header{Type: TypeWrite, Handle: 1, Length: 4096, PayloadCRC: Checksum(payload)}, payload)
	if !bytes.Equal(summed, frame) {
		t.Fatal("AppendSummedFrame with the checksum differs from AppendFrame")
	}
	if err := h.CheckPayload(frame[HeaderBytes:]); err != nil {
		t.Fatalf("intact payload refused: %v", err)
	}
	for _, at := range []int{0, 1, 511, 2048, 4095} {
		p := bytes.Clone(frame[HeaderBytes:])
		p[at] ^= 0x20
		err := h.CheckPayload(p)
		if !errors.Is(err, ErrChecksum) || !strings.Contains(err.Error(), "header says") {
			t.Fatalf("byte %d flipped: %v", at, err)
		}
		if StatusOf(err) != StatusChecksum || !errors.Is(StatusChecksum.Err(), ErrChecksum) {
			t.Fatalf("byte %d flipped: status %v", at, StatusOf(err))
		}
	}
	if err := h.CheckPayload(frame[HeaderBytes : HeaderBytes+4095]); !errors.Is(err, ErrChecksum) {
		t.Fatalf("short payload: %v", err)
	}
	empty := Header{Type: TypeFlush}
	if err := empty.CheckPayload(nil); err != nil || Checksum(nil) != 0 {
		t.Fatalf("empty payload: %v, checksum %#x", err, Checksum(nil))
	}
}

// BenchmarkChecksum is the cost of CheckPayload (and of AppendFrame's
// Checksum) per payload size.
func BenchmarkChecksum(b *testing.B) {
	for _, size := range []int{512, 4096, 64 << 10, 1 << 20} {
		b.Run(fmt.Sprintf("%dB", size), func(b *testing.B) {
			payload := make([]byte, size)
			h := Header{Type: TypeWrite, Length: uint32(size), PayloadCRC: Checksum(payload)}
			b.ReportAllocs()
			b.SetBytes(int64(size))
			for b.Loop() {
				if err := h.CheckPayload(payload); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// FuzzParseSnapshot checks that ParseSnapshot never panics, that every
// error wraps ErrBadFrame, that an accepted payload names a snapshot of
// the LU it returns, and that it re-encodes to the same bytes.
func FuzzParseSnapshot(f *testing.F) {
	f.Add(AppendSnapshot(nil, "vm@s1"))
	f.Add(AppendSnapshot(nil, "a@b@c"))
	f.Add(AppendSnapshot(nil, "deb/0"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, in []byte) {
		name, lu, err := ParseSnapshot(in)
		if err != nil {
			if !errors.Is(err, ErrBadFrame) {
				t.Fatalf("error %v does not wrap ErrBadFrame", err)
			}
			return
		}
		if !strings.HasPrefix(name, lu+"@") || len(name) <= len(lu)+1 {
			t.Fatalf("snapshot %q is not of LU %q", name, lu)
		}
		if out := AppendSnapshot(nil, name); !bytes.Equal(out, in) {
			t.Fatalf("round trip %q != %q", out, in)
		}
	})
}
