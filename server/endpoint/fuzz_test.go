package endpoint

import (
	"bytes"
	"io"
	"log/slog"
	"net"
	"testing"

	"github.com/lupool/lupool/server/nbdproto"
)

// byteConn is a connection whose reads come from a byte slice; readLoop
// uses nothing else.
type byteConn struct {
	*bytes.Reader
	net.Conn
}

func (c byteConn) Read(p []byte) (int, error) { return c.Reader.Read(p) }

// FuzzReplies feeds arbitrary server bytes to the reply reader with three
// requests in the table: it must never panic, complete a call twice, or
// complete a call with an error the server did not send, and it must end
// with an error when the bytes run out.
func FuzzReplies(f *testing.F) {
	reply := func(code uint32, handle uint64, data ...byte) []byte {
		b := make([]byte, nbdproto.SimpleReplySize)
		nbdproto.PutSimpleReply(b, code, handle)
		return append(b, data...)
	}
	f.Add(reply(0, 2))
	f.Add(append(reply(0, 1, 1, 2, 3, 4, 5, 6, 7, 8), reply(nbdproto.EIO, 3)...))
	f.Add(reply(nbdproto.ESHUTDOWN, 2))
	f.Add(reply(0, 99))
	f.Add([]byte("garbage that is not a reply"))
	f.Fuzz(func(t *testing.T, in []byte) {
		d := &Device{opts: Options{Export: "lu", Logger: slog.New(slog.NewTextHandler(io.Discard, nil))},
			budget: newBudget(3, 1<<20)}
		d.mu.pending = map[uint64]*call{
			1: {req: nbdproto.Request{Type: nbdproto.CmdRead, Handle: 1, Length: 8}, data: make([]byte, 8), done: make(chan error, 1)},
			2: {req: nbdproto.Request{Type: nbdproto.CmdWrite, Handle: 2, Length: 4}, data: []byte("abcd"), done: make(chan error, 1)},
			3: {req: nbdproto.Request{Type: nbdproto.CmdFlush, Handle: 3}, done: make(chan error, 1)},
		}
		calls := map[uint64]*call{}
		for h, c := range d.mu.pending {
			calls[h] = c
		}
		u := &upstream{nc: byteConn{Reader: bytes.NewReader(in)}}
		d.mu.conn = u
		if err := d.readLoop(u); err == nil {
			t.Fatal("readLoop ended without an error")
		}
		for h, c := range calls {
			_, still := d.mu.pending[h]
			select {
			case <-c.done:
				if still {
					t.Errorf("call %d completed and still in the table", h)
				}
			default:
				if !still {
					t.Errorf("call %d left the table without completing", h)
				}
			}
			if len(c.data) != int(c.req.Length) && c.req.Type != nbdproto.CmdFlush {
				t.Errorf("call %d data resized to %d", h, len(c.data))
			}
		}
	})
}
