package nbdproto

import (
	"bytes"
	"errors"
	"testing"
)

func TestHeaderSizes(t *testing.T) {
	// The sizes are fixed by the protocol; a change here breaks every client.
	for _, c := range []struct {
		name      string
		got, want int
	}{
		{"greeting", GreetingSize, 18},
		{"option header", OptionHeaderSize, 16},
		{"option reply", OptionReplyHeaderSize, 20},
		{"request", RequestSize, 28},
		{"simple reply", SimpleReplySize, 16},
		{"structured reply", StructuredReplySize, 20},
		{"export name reply", ExportNameReplySize + ExportNameZeroPadSize, 134},
	} {
		if c.got != c.want {
			t.Errorf("%s: %d bytes, want %d", c.name, c.got, c.want)
		}
	}
}

func TestRequestRoundTrip(t *testing.T) {
	want := Request{Flags: CmdFlagFUA, Type: CmdWrite, Handle: 0x0102030405060708, Offset: 1 << 40, Length: 4096}
	var b [RequestSize]byte
	PutRequest(b[:], want)
	if !bytes.Equal(b[:4], []byte{0x25, 0x60, 0x95, 0x13}) {
		t.Fatalf("magic bytes %x", b[:4])
	}
	got, err := ParseRequest(b[:])
	if err != nil || got != want {
		t.Fatalf("ParseRequest = %+v, %v; want %+v", got, err, want)
	}
	if _, err := ParseRequest(b[:RequestSize-1]); !errors.Is(err, ErrShort) {
		t.Fatalf("short: %v", err)
	}
	b[0] ^= 0xff
	if _, err := ParseRequest(b[:]); !errors.Is(err, ErrBadMagic) {
		t.Fatalf("bad magic: %v", err)
	}
}

func TestRepliesRoundTrip(t *testing.T) {
	var s [SimpleReplySize]byte
	PutSimpleReply(s[:], EIO, 77)
	sr, err := ParseSimpleReply(s[:])
	if err != nil || sr.Error != EIO || sr.Handle != 77 {
		t.Fatalf("simple reply %+v %v", sr, err)
	}
	var c [StructuredReplySize]byte
	want := StructuredReply{Flags: ReplyFlagDone, Type: ReplyTypeError, Handle: 9, Length: 6}
	PutStructuredReply(c[:], want)
	got, err := ParseStructuredReply(c[:])
	if err != nil || got != want {
		t.Fatalf("structured %+v %v", got, err)
	}
	var o [OptionReplyHeaderSize]byte
	wo := OptionReply{Option: OptGo, Type: RepErrUnknown, Length: 0}
	PutOptionReply(o[:], wo)
	gotO, err := ParseOptionReply(o[:])
	if err != nil || gotO != wo {
		t.Fatalf("option reply %+v %v", gotO, err)
	}
	var g [GreetingSize]byte
	PutGreeting(g[:], FlagFixedNewstyle|FlagNoZeroes)
	if string(g[:8]) != "NBDMAGIC" || string(g[8:16]) != "IHAVEOPT" || g[17] != 3 {
		t.Fatalf("greeting %q", g[:])
	}
}

func TestParseInfoRequest(t *testing.T) {
	p := AppendString(nil, "disk")
	p = append(p, 0, 2, 0, 3, 0, 1)
	r, err := ParseInfoRequest(p)
	if err != nil || r.Name != "disk" || len(r.Infos) != 2 || r.Infos[0] != InfoBlockSize || r.Infos[1] != InfoName {
		t.Fatalf("%+v %v", r, err)
	}
	for _, bad := range [][]byte{
		nil,
		{0, 0, 0, 5, 'a'},
		append(AppendString(nil, "x"), 0, 1),    // count 1, no entries
		append(AppendString(nil, "x"), 0, 0, 0), // trailing byte
		append([]byte{0, 0, 0x10, 0x01}, make([]byte, 4097+2)...), // name too long
	} {
		if _, err := ParseInfoRequest(bad); !errors.Is(err, ErrMalformed) {
			t.Errorf("ParseInfoRequest(%x) = %v, want ErrMalformed", bad, err)
		}
	}
}

func TestParseMetaContextRequest(t *testing.T) {
	p := AppendString(nil, "disk")
	p = append(p, 0, 0, 0, 2)
	p = AppendString(p, "base:")
	p = AppendString(p, ContextBaseAllocation)
	r, err := ParseMetaContextRequest(p)
	if err != nil || r.Name != "disk" || len(r.Queries) != 2 || r.Queries[1] != ContextBaseAllocation {
		t.Fatalf("%+v %v", r, err)
	}
	huge := append(AppendString(nil, ""), 0xff, 0xff, 0xff, 0xff)
	if _, err := ParseMetaContextRequest(huge); !errors.Is(err, ErrMalformed) {
		t.Fatalf("huge count: %v", err)
	}
	if _, err := ParseMetaContextRequest(append(p, 0)); !errors.Is(err, ErrMalformed) {
		t.Fatalf("trailing: %v", err)
	}
}

func TestCommandName(t *testing.T) {
	want := map[uint16]string{CmdRead: "read", CmdWrite: "write", CmdFlush: "flush", CmdTrim: "trim",
		CmdWriteZeroes: "write_zeroes", CmdBlockStatus: "block_status", CmdCache: "cache", 99: "unknown"}
	for c, n := range want {
		if got := CommandName(c); got != n {
			t.Errorf("CommandName(%d) = %q, want %q", c, got, n)
		}
	}
}

// FuzzParseRequest checks that the request parser never panics and that
// what it accepts re-encodes to the same bytes.
func FuzzParseRequest(f *testing.F) {
	var b [RequestSize]byte
	PutRequest(b[:], Request{Type: CmdRead, Handle: 1, Offset: 0, Length: 4096})
	f.Add(b[:])
	PutRequest(b[:], Request{Type: CmdWrite, Flags: CmdFlagFUA, Handle: ^uint64(0), Offset: ^uint64(0), Length: ^uint32(0)})
	f.Add(b[:])
	f.Add([]byte("garbage"))
	f.Fuzz(func(t *testing.T, in []byte) {
		r, err := ParseRequest(in)
		if err != nil {
			if len(in) >= RequestSize && !errors.Is(err, ErrBadMagic) {
				t.Fatalf("unexpected error %v", err)
			}
			return
		}
		var out [RequestSize]byte
		PutRequest(out[:], r)
		if !bytes.Equal(out[:], in[:RequestSize]) {
			t.Fatalf("round trip %x != %x", out, in[:RequestSize])
		}
	})
}

// FuzzParseOptionPayloads feeds the option payload parsers arbitrary bytes:
// they must not panic, must bound what they allocate by the input, and must
// re-encode what they accept.
func FuzzParseOptionPayloads(f *testing.F) {
	f.Add(append(AppendString(nil, "disk"), 0, 1, 0, 3))
	mc := append(AppendString(nil, ""), 0, 0, 0, 1)
	f.Add(AppendString(mc, ContextBaseAllocation))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, in []byte) {
		if r, err := ParseInfoRequest(in); err == nil {
			out := AppendString(nil, r.Name)
			out = be.AppendUint16(out, uint16(len(r.Infos)))
			for _, i := range r.Infos {
				out = be.AppendUint16(out, i)
			}
			if !bytes.Equal(out, in) {
				t.Fatalf("info round trip %x != %x", out, in)
			}
		}
		if r, err := ParseMetaContextRequest(in); err == nil {
			if len(r.Queries) > len(in)/4 {
				t.Fatalf("%d queries from %d bytes", len(r.Queries), len(in))
			}
			out := AppendString(nil, r.Name)
			out = be.AppendUint32(out, uint32(len(r.Queries)))
			for _, q := range r.Queries {
				out = AppendString(out, q)
			}
			if !bytes.Equal(out, in) {
				t.Fatalf("meta round trip %x != %x", out, in)
			}
		}
		if h, err := ParseOptionHeader(in); err == nil {
			var out [OptionHeaderSize]byte
			PutOptionHeader(out[:], h)
			if !bytes.Equal(out[:], in[:OptionHeaderSize]) {
				t.Fatalf("header round trip")
			}
		}
	})
}
