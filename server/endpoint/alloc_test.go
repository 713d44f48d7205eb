package endpoint

import (
	"context"
	"testing"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/blockdev/blockdevtest"
	"github.com/lupool/lupool/server/nbdproto"
)

// TestHotPathAllocations: a 4 KiB read or write through the endpoint (the
// `lupool attach` path: local client, the engine, the endpoint's Device,
// the node's engine), after warm-up, makes no heap allocation anywhere in
// the process, the client included.
func TestHotPathAllocations(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts mean nothing under the race detector (sync.Pool drops items on purpose); make test runs this test without -race")
	}
	mem := blockdevtest.NewMem(testSizeBytes, blockdev.Caps{})
	n := newNode(t, "a", mem, "id-1")
	d, err := New(context.Background(), Options{Export: "lu", Nodes: func(context.Context) ([]Node, error) {
		return []Node{{ID: "a", NBDAddr: n.addr}}, nil
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	c := dialRaw(t, serveLocal(t, d))
	buf := make([]byte, 4096)
	data := func(uint64) []byte { return buf }
	noData := func(uint64) []byte { return nil }
	for _, typ := range []uint16{nbdproto.CmdRead, nbdproto.CmdWrite} {
		i := 0
		roundTrip := func() {
			off := int64(i%64) * 4096
			i++
			var payload []byte
			dst := noData
			if typ == nbdproto.CmdWrite {
				payload = buf
			} else {
				dst = data
			}
			if e := c.send(typ, 7, off, 4096, payload); e != nil {
				err = e
				return
			}
			r, e := c.reply(dst)
			if e == nil && r.Error != 0 {
				t.Errorf("%s: NBD error %d", nbdproto.CommandName(typ), r.Error)
			}
			if e != nil {
				err = e
			}
		}
		for range 300 { // warm up pools, workers and buffers
			roundTrip()
		}
		allocs := testing.AllocsPerRun(500, roundTrip)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%s: %.2f allocations per 4 KiB request through the endpoint", nbdproto.CommandName(typ), allocs)
		// A stray allocation of the runtime (timers, netpoll) is tolerated
		// on average; one per request is a regression.
		if allocs >= 0.5 {
			t.Errorf("%s: %.2f allocations per 4 KiB request through the endpoint, want 0", nbdproto.CommandName(typ), allocs)
		}
	}
}
