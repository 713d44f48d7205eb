package replication

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/lu"
	"github.com/lupool/lupool/replication/replproto"
)

// pairLeasesFlag runs every test cluster with ManagerOptions.PairLeases:
// go test ./replication -args -pair-leases
var pairLeasesFlag = flag.Bool("pair-leases", false, "run the replication tests with read leases per node pair (ManagerOptions.PairLeases)")

// TestPairLeasesIdleLUsAreNotPinged: with PairLeases, idle LUs with a
// copy on the same node keep the copy's read lease and the writer's
// through the one heartbeat between the two nodes; the writer pings none
// of them itself.
func TestPairLeasesIdleLUsAreNotPinged(t *testing.T) {
	const lease = time.Second // long enough that a loaded machine does not let it lapse
	mt, nodes := newTestClusterOpts(t, func(o *ManagerOptions) { o.PairLeases, o.ReadLease = true, lease }, "a", "b")
	const count = 20
	var mirrors []*Mirror
	for i := range count {
		name := fmt.Sprintf("lu%d", i)
		mt.create(t, twoCopies(name, 1<<20, "memory"))
		mirrors = append(mirrors, streamingMirror(t, nodes["a"].m, name))
	}
	waitFor(t, "every LU covered by the pair heartbeat", func() bool {
		for _, mi := range mirrors {
			for _, l := range mi.linkSet() {
				if !mi.pairCovers(l) {
					return false
				}
			}
		}
		return true
	})
	pinged := map[*copyLink]int64{}
	for _, mi := range mirrors {
		for _, l := range mi.linkSet() {
			pinged[l] = l.lastPing.Load()
		}
	}
	time.Sleep(3 * lease / 2) // a lease from the pings alone would have run out
	for i, mi := range mirrors {
		name := fmt.Sprintf("lu%d", i)
		if !nodes["b"].m.leaseValid(name) {
			t.Errorf("%s: the copy holds no read lease", name)
		}
		if !mi.leaseHeld() {
			t.Errorf("%s: the writer holds no read lease", name)
		}
		for _, l := range mi.linkSet() {
			if l.lastPing.Load() != pinged[l] {
				t.Errorf("%s: the writer pinged its copy on %s itself", name, l.node)
			}
		}
	}
	if p, ok := nodes["a"].m.pairLinkOf("b"); !ok || p.s.lastAck.Load() < nodes["a"].m.now()-int64(lease) {
		t.Errorf("no recent heartbeat answer from b")
	}
}

// TestPairLeaseCopyLossEndsItsLease: a copy that fails a write while its
// node still answers the pair heartbeat (for this and other LUs) holds no
// read lease on the LU by the time the write is acknowledged: the writer
// dropped it from the heartbeat and waited out the lease the heartbeat
// gave (copyset.AckAfterCopyLoss).
func TestPairLeaseCopyLossEndsItsLease(t *testing.T) {
	const lease = 400 * time.Millisecond
	mt, nodes := newTestClusterOpts(t, func(o *ManagerOptions) {
		o.PairLeases, o.ReadLease, o.AckTimeout = true, lease, time.Second
	}, "a", "b")
	mt.create(t, twoCopies("h", 1<<20, "memory"))
	mt.create(t, twoCopies("other", 1<<20, "memory"))
	mir := streamingMirror(t, nodes["a"].m, "h")
	streamingMirror(t, nodes["a"].m, "other")
	waitFor(t, "h covered by the pair heartbeat", func() bool {
		return mir.pairCovers(mir.linkSet()[0]) && nodes["b"].m.leaseValid("h")
	})
	vol, ok := nodes["b"].m.Volume("h")
	if !ok {
		t.Fatal("no copy of h on b")
	}
	if err := vol.Close(); err != nil { // b's copy of h fails every request from now on
		t.Fatal(err)
	}
	if err := mir.WriteAt(context.Background(), make([]byte, 4096), 0, 0); err != nil {
		t.Fatal(err)
	}
	if nodes["b"].m.leaseValid("h") {
		t.Fatal("the write b missed was acknowledged while b still held a read lease on h")
	}
	if copyState(mir.linkSet()[0].state.Load()) == stInSync { // out of sync, or a resync (which fails) began
		t.Fatal("b's copy of h is still in sync")
	}
	// The heartbeat goes on for the other LU.
	time.Sleep(2 * lease)
	if !nodes["b"].m.leaseValid("other") {
		t.Fatal("the copy of another LU lost its lease")
	}
	if nodes["b"].m.leaseValid("h") {
		t.Fatal("the heartbeat renewed b's lease on h after it was dropped")
	}
}

// FuzzServePairStream feeds a copy node's pair heartbeat server a valid
// RolePair hello followed by arbitrary bytes: it must never panic or hang,
// must answer only with well-formed frames, and once the stream ends no
// LU reads on a lease from it.
func FuzzServePairStream(f *testing.F) {
	ping := func(echo uint64, entries ...replproto.PairEntry) []byte {
		return replproto.AppendFrame(nil, replproto.Header{Type: replproto.TypePing, Offset: echo}, replproto.AppendPairList(nil, entries))
	}
	f.Add(append(ping(0, replproto.PairEntry{Kind: replproto.PairEnroll, LU: "f"}), ping(1)...))
	f.Add(append(ping(1, replproto.PairEntry{Kind: replproto.PairEnroll, LU: "nope"}), ping(1, replproto.PairEntry{Kind: replproto.PairDrop, LU: "f"})...))
	f.Add(replproto.AppendFrame(nil, replproto.Header{Type: replproto.TypeWrite, Epoch: 1, Length: 16}, make([]byte, 16)))
	f.Add([]byte("garbage that is not a frame at all, forty bytes or more......"))

	pool, err := lu.OpenPool(lu.PoolOptions{Dirs: []string{f.TempDir()}})
	if err != nil {
		f.Fatal(err)
	}
	defer pool.Close()
	m, err := NewManager(ManagerOptions{NodeID: "copy", Pool: pool, AckTimeout: time.Second})
	if err != nil {
		f.Fatal(err)
	}
	defer m.Close()
	rec := cluster.LU{Name: "f", SizeBytes: 2 << 20, Kind: "memory", Copies: 2, Writer: "w", Epoch: 1,
		Replicas: []cluster.Replica{{NodeID: "w", State: cluster.ReplicaInSync}, {NodeID: "copy", State: cluster.ReplicaInSync}}}
	m.Enqueue(cluster.Change{Kind: cluster.Created, LU: rec})
	sync1(f, m)
	hello := replproto.AppendFrame(nil, replproto.Header{Type: replproto.TypeHello},
		replproto.AppendHello(nil, replproto.Hello{Role: replproto.RolePair, LU: replproto.PairLU, Node: "w"}))

	f.Fuzz(func(t *testing.T, data []byte) {
		client, server := net.Pipe()
		done := make(chan struct{})
		go func() {
			defer close(done)
			m.ServeStream("w", server, bufio.NewReader(server))
		}()
		go func() { _, _ = client.Write(append(append([]byte(nil), hello...), data...)) }()
		_ = client.SetReadDeadline(time.Now().Add(5 * time.Second))
		br := bufio.NewReader(client)
		var hb [replproto.HeaderBytes]byte
		h, err := replproto.ReadHeader(br, &hb)
		if err != nil || h.Type != replproto.TypeReply|replproto.TypeHello || h.Status != replproto.StatusOK {
			t.Fatalf("hello answered %+v %v", h, err)
		}
		for {
			_ = client.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
			h, err := replproto.ReadHeader(br, &hb)
			if err != nil {
				break
			}
			if h.Type&replproto.TypeReply == 0 {
				t.Fatalf("server sent a request: %+v", h)
			}
			payload := make([]byte, h.PayloadLen)
			if _, err := io.ReadFull(br, payload); err != nil {
				break
			}
			if h.Type == replproto.TypeReply|replproto.TypePing && h.Status == replproto.StatusOK {
				if _, err := replproto.ParsePairList(payload); err != nil {
					t.Fatalf("heartbeat answer with a bad list: %v", err)
				}
			}
		}
		client.Close()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("pair stream server did not end after its peer closed")
		}
		if m.leaseValid("f") {
			t.Fatal("the copy reads on a lease from a pair session that ended")
		}
	})
}
