package replproto

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

// TestPairList: the pair list's rules, round trips and refusals.
func TestPairList(t *testing.T) {
	in := []PairEntry{{PairEnroll, "a"}, {PairDrop, "img/3"}, {PairFenced, strings.Repeat("x", NameBytesMax)}}
	p := AppendPairList(nil, in)
	out, err := ParsePairList(p)
	if err != nil || len(out) != 3 || out[0] != in[0] || out[1] != in[1] || out[2] != in[2] {
		t.Fatalf("round trip: %v %v", out, err)
	}
	if out, err := ParsePairList(nil); err != nil || len(out) != 0 {
		t.Fatalf("empty list: %v %v", out, err)
	}
	for _, tc := range []struct {
		name string
		in   []byte
		want string
	}{
		{"kind 0", []byte{0, 1, 'a'}, "unknown kind 0"},
		{"kind 4", []byte{4, 1, 'a'}, "unknown kind 4"},
		{"empty name", []byte{1, 0}, "name of 0 bytes"},
		{"long name", append([]byte{1, 129}, bytes.Repeat([]byte{'a'}, 129)...), "name of 129 bytes"},
		{"truncated header", []byte{1}, "truncated in an entry header"},
		{"truncated name", []byte{1, 3, 'a'}, "truncated in an LU name"},
	} {
		if _, err := ParsePairList(tc.in); !errors.Is(err, ErrBadFrame) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want %q", tc.name, err, tc.want)
		}
	}
	// A RolePair hello and pings with a payload pass the frame rules.
	if h, err := ParseHello(AppendHello(nil, Hello{Role: RolePair, LU: PairLU, Node: "n1"})); err != nil || h.Role != RolePair {
		t.Fatalf("pair hello: %+v %v", h, err)
	}
	for _, h := range []Header{{Type: TypePing, PayloadLen: uint32(len(p))}, {Type: TypeReply | TypePing, PayloadLen: 2}} {
		var b [HeaderBytes]byte
		h.Marshal(b[:])
		if _, err := ParseHeader(b[:]); err != nil {
			t.Errorf("%v with payload: %v", h.Type, err)
		}
	}
}

// FuzzParsePairList checks that ParsePairList never panics, that every
// error wraps ErrBadFrame, and that an accepted list re-encodes to the
// same bytes.
func FuzzParsePairList(f *testing.F) {
	f.Add(AppendPairList(nil, []PairEntry{{PairEnroll, "a"}, {PairDrop, "b"}}))
	f.Add(AppendPairList(nil, []PairEntry{{PairFenced, "lu-1"}}))
	f.Add([]byte{1, 2, 'a'})
	f.Fuzz(func(t *testing.T, in []byte) {
		entries, err := ParsePairList(in)
		if err != nil {
			if !errors.Is(err, ErrBadFrame) {
				t.Fatalf("error %v does not wrap ErrBadFrame", err)
			}
			return
		}
		if out := AppendPairList(nil, entries); !bytes.Equal(out, in) {
			t.Fatalf("round trip %x != %x", out, in)
		}
	})
}
