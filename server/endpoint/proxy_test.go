package endpoint

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"testing"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/blockdev/blockdevtest"
	"github.com/lupool/lupool/internal/testseed"
	"github.com/lupool/lupool/server/nbd"
	"github.com/lupool/lupool/server/nbdkernel"
	"github.com/lupool/lupool/server/nbdproto"
)

// serveLocal serves d with the NBD engine on loopback, as `lupool attach
// --listen` does, and returns the address.
func serveLocal(tb testing.TB, d *Device) string {
	tb.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	es := nbd.NewExportSet()
	if err := es.Add(nbd.Export{Name: "lu", Device: d}); err != nil {
		tb.Fatal(err)
	}
	srv, err := nbd.NewServer(nbd.Options{Exports: es})
	if err != nil {
		tb.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	tb.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
		<-done
	})
	return l.Addr().String()
}

// rawClient is a minimal NBD client with simple replies and requests in
// flight answered in any order.
type rawClient struct {
	nc   net.Conn
	br   *bufio.Reader
	hdr  [nbdproto.RequestSize]byte
	rhdr [nbdproto.SimpleReplySize]byte // a field: on the stack it escapes through io.ReadFull
}

func dialRaw(tb testing.TB, addr string) *rawClient {
	tb.Helper()
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		tb.Fatal(err)
	}
	c, _, err := nbdkernel.Negotiate(context.Background(), nc, "lu", nil)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _ = c.Close() })
	return &rawClient{nc: c, br: bufio.NewReaderSize(c, 256<<10)}
}

func (c *rawClient) send(typ uint16, handle uint64, off int64, length int, payload []byte) error {
	nbdproto.PutRequest(c.hdr[:], nbdproto.Request{Type: typ, Handle: handle, Offset: uint64(off), Length: uint32(length)})
	if _, err := c.nc.Write(c.hdr[:]); err != nil {
		return err
	}
	if payload != nil {
		_, err := c.nc.Write(payload)
		return err
	}
	return nil
}

// reply reads one simple reply; data (by handle) receives a read's data.
func (c *rawClient) reply(data func(handle uint64) []byte) (nbdproto.SimpleReply, error) {
	if _, err := io.ReadFull(c.br, c.rhdr[:]); err != nil {
		return nbdproto.SimpleReply{}, err
	}
	r, err := nbdproto.ParseSimpleReply(c.rhdr[:])
	if err != nil || r.Error != 0 {
		return r, err
	}
	if p := data(r.Handle); p != nil {
		_, err = io.ReadFull(c.br, p)
	}
	return r, err
}

// TestEngineRidesOverRestarts drives the endpoint through the NBD engine
// (asynchronous reads and writes answered by the reply reader) at queue
// depth 16 while the node is stopped and started again: every reply is a
// success and every read returns what was written last.
func TestEngineRidesOverRestarts(t *testing.T) {
	mem := blockdevtest.NewMem(testSizeBytes, blockdev.Caps{})
	n := newNode(t, "a", mem, "id-1")
	d := newDevice(t, Options{}, n)
	c := dialRaw(t, serveLocal(t, d))
	rng := rand.New(rand.NewPCG(testseed.Seed(t, "./server/endpoint"), 1))

	const depth, blocks = 16, 256
	model := make([][]byte, blocks) // last data written per block
	type slot struct {
		read  bool
		block int
		buf   []byte
	}
	slots := make([]slot, depth)
	busy := make([]bool, blocks) // a request on the block is in flight
	issue := func(h int) {
		b := rng.IntN(blocks)
		for busy[b] {
			b = rng.IntN(blocks)
		}
		busy[b] = true
		s := &slots[h]
		s.block, s.read = b, model[b] != nil && rng.IntN(2) == 0
		if s.read {
			s.buf = make([]byte, 4096)
			if err := c.send(nbdproto.CmdRead, uint64(h), int64(b)*4096, 4096, nil); err != nil {
				t.Fatal(err)
			}
			return
		}
		s.buf = make([]byte, 4096)
		for i := range s.buf {
			s.buf[i] = byte(rng.Uint32())
		}
		if err := c.send(nbdproto.CmdWrite, uint64(h), int64(b)*4096, 4096, s.buf); err != nil {
			t.Fatal(err)
		}
	}
	for h := range depth {
		issue(h)
	}
	restarts := 0
	deadline := time.Now().Add(3 * time.Second)
	for ops := 0; time.Now().Before(deadline) || restarts < 2; ops++ {
		r, err := c.reply(func(h uint64) []byte {
			if s := slots[h]; s.read {
				return s.buf
			}
			return nil
		})
		if err != nil || r.Error != 0 {
			t.Fatalf("reply %d: error %d, %v", ops, r.Error, err)
		}
		s := &slots[r.Handle]
		if s.read {
			if !bytes.Equal(s.buf, model[s.block]) {
				t.Fatalf("block %d: read other data than written last", s.block)
			}
		} else {
			model[s.block] = s.buf
		}
		busy[s.block] = false
		if ops%2000 == 1999 && restarts < 2 {
			n.stop()
			n.start()
			restarts++
		}
		issue(int(r.Handle))
	}
	if got := counter(t, d.opts.Metrics.reconnects); got < 2 {
		t.Fatalf("reconnects = %v, want at least 2", got)
	}
}

// BenchmarkProxy compares 4 KiB reads and writes at queue depth 1 and 32
// straight to a node and through the endpoint served by the engine (the
// `lupool attach` path), in one process on loopback.
func BenchmarkProxy(b *testing.B) {
	for _, via := range []string{"node", "endpoint"} {
		for _, op := range []string{"read", "write"} {
			for _, depth := range []int{1, 32} {
				b.Run(fmt.Sprintf("%s/%s/qd%d", via, op, depth), func(b *testing.B) {
					mem := blockdevtest.NewMem(testSizeBytes, blockdev.Caps{})
					n := newNode(b, "a", mem, "id-1")
					addr := n.addr
					if via == "endpoint" {
						d, err := New(context.Background(), Options{Export: "lu", Nodes: func(context.Context) ([]Node, error) {
							return []Node{{ID: "a", NBDAddr: n.addr}}, nil
						}})
						if err != nil {
							b.Fatal(err)
						}
						b.Cleanup(func() { d.Close() })
						addr = serveLocal(b, d)
					}
					c := dialRaw(b, addr)
					benchLoad(b, c, op == "read", depth)
				})
			}
		}
	}
}

func benchLoad(b *testing.B, c *rawClient, read bool, depth int) {
	bufs := make([][]byte, depth)
	for i := range bufs {
		bufs[i] = make([]byte, 4096)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	blocks := int64(testSizeBytes / 4096)
	send := func(h int) {
		off := rng.Int64N(blocks) * 4096
		var err error
		if read {
			err = c.send(nbdproto.CmdRead, uint64(h), off, 4096, nil)
		} else {
			err = c.send(nbdproto.CmdWrite, uint64(h), off, 4096, bufs[h])
		}
		if err != nil {
			b.Fatal(err)
		}
	}
	data := func(h uint64) []byte {
		if read {
			return bufs[h]
		}
		return nil
	}
	b.SetBytes(4096)
	b.ReportAllocs()
	b.ResetTimer()
	sent := 0
	for ; sent < min(depth, b.N); sent++ {
		send(sent)
	}
	for range b.N {
		r, err := c.reply(data)
		if err != nil || r.Error != 0 {
			b.Fatal(r.Error, err)
		}
		if sent < b.N {
			send(int(r.Handle))
			sent++
		}
	}
}
