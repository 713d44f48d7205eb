package replication

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/internal/testseed"
	"github.com/lupool/lupool/lu"
	"github.com/lupool/lupool/replication/replproto"
)

// metaTwin is an in-memory stand-in for the metadata leader: it applies
// conditional LU updates with the same epoch rule as cluster.Node and
// delivers every change to each node's Manager, like the raft apply loop.
type metaTwin struct {
	mu       sync.Mutex
	lus      map[string]cluster.LU
	managers []*Manager
	updates  []cluster.LU // every accepted update, in order
	// refuse makes UpdateLU fail (no metadata leader reachable).
	refuse bool
	// block, while non-nil, holds every UpdateLU until it is closed (a
	// slow metadata leader).
	block chan struct{}
}

func (mt *metaTwin) update(_ context.Context, rec cluster.LU, expected uint64) error {
	mt.mu.Lock()
	if block := mt.block; block != nil {
		mt.mu.Unlock()
		<-block
		mt.mu.Lock()
	}
	old, ok := mt.lus[rec.Name]
	switch {
	case mt.refuse:
		mt.mu.Unlock()
		return errors.New("metaTwin: no leader")
	case !ok:
		mt.mu.Unlock()
		return cluster.ErrNotFound
	case old.Epoch != expected:
		mt.mu.Unlock()
		return fmt.Errorf("%w: at %d not %d", cluster.ErrEpochChanged, old.Epoch, expected)
	}
	mt.lus[rec.Name] = cloneLU(rec)
	mt.updates = append(mt.updates, cloneLU(rec))
	ms := append([]*Manager(nil), mt.managers...)
	mt.mu.Unlock()
	for _, m := range ms {
		m.Enqueue(cluster.Change{Kind: cluster.Updated, LU: cloneLU(rec)})
	}
	return nil
}

func (mt *metaTwin) create(t testing.TB, rec cluster.LU) {
	t.Helper()
	mt.mu.Lock()
	mt.lus[rec.Name] = cloneLU(rec)
	ms := append([]*Manager(nil), mt.managers...)
	mt.mu.Unlock()
	for _, m := range ms {
		m.Enqueue(cluster.Change{Kind: cluster.Created, LU: cloneLU(rec)})
	}
	for _, m := range ms {
		sync1(t, m)
	}
}

func (mt *metaTwin) get(name string) cluster.LU {
	mt.mu.Lock()
	defer mt.mu.Unlock()
	return cloneLU(mt.lus[name])
}

// testNode is one in-process node: a pool, a Manager and a listener that
// upgrades connections to replication streams the way the API does.
type testNode struct {
	id   string
	addr string // immutable: the listener's address, kept across down/up
	m    *Manager
	pool *lu.Pool
	mu   sync.Mutex
	ln   net.Listener // guarded by mu
	// conns are the accepted stream connections, so a test can cut them.
	conns []net.Conn // guarded by mu
}

func (n *testNode) serve() {
	n.mu.Lock()
	ln := n.ln
	n.mu.Unlock()
	for {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		n.mu.Lock()
		n.conns = append(n.conns, conn)
		n.mu.Unlock()
		go func() {
			br := bufio.NewReader(conn)
			// The test stand-in for a peer certificate: testDial sends
			// the dialer's node id on the first line.
			peer, err := br.ReadString('\n')
			if err != nil {
				conn.Close()
				return
			}
			req, err := http.ReadRequest(br)
			if err != nil || req.URL.Path != StreamPath {
				conn.Close()
				return
			}
			fmt.Fprintf(conn, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: %s\r\n\r\n", StreamUpgrade)
			n.m.ServeStream(strings.TrimSuffix(peer, "\n"), conn, br)
		}()
	}
}

// down closes the node's listener and every stream: it looks dead to its
// peers until up is called.
func (n *testNode) down() {
	n.mu.Lock()
	n.ln.Close()
	for _, c := range n.conns {
		c.Close()
	}
	n.conns = nil
	n.mu.Unlock()
}

func (n *testNode) up(t testing.TB) {
	t.Helper()
	for i := 0; i < 50; i++ {
		ln, err := net.Listen("tcp", n.addr)
		if err == nil {
			n.mu.Lock()
			n.ln = ln
			n.mu.Unlock()
			go n.serve()
			return
		}
		if i == 49 {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// newTestCluster builds nodes ids sharing one metaTwin; dirty stores live
// on an in-memory FS.
func newTestCluster(t testing.TB, ids ...string) (*metaTwin, map[string]*testNode) {
	t.Helper()
	return newTestClusterOpts(t, nil, ids...)
}

// newTestClusterOpts is newTestCluster with tune applied to every node's
// ManagerOptions.
func newTestClusterOpts(t testing.TB, tune func(*ManagerOptions), ids ...string) (*metaTwin, map[string]*testNode) {
	t.Helper()
	mt := &metaTwin{lus: map[string]cluster.LU{}}
	nodes := map[string]*testNode{}
	for _, id := range ids {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		nodes[id] = &testNode{id: id, ln: ln, addr: ln.Addr().String()}
	}
	for _, id := range ids {
		n := nodes[id]
		pool, err := lu.OpenPool(lu.PoolOptions{Dirs: []string{t.TempDir()}})
		if err != nil {
			t.Fatal(err)
		}
		store, err := OpenDirtyStore("dirty", vfs.NewMem())
		if err != nil {
			t.Fatal(err)
		}
		n.pool = pool
		opts := ManagerOptions{
			NodeID:        id,
			Pool:          pool,
			Dirty:         store,
			UpdateLU:      mt.update,
			AckTimeout:    2 * time.Second,
			RetryInterval: 20 * time.Millisecond,
			RegionBytes:   64 << 10,
			NodeAPI: func(node string) (string, bool) {
				other, ok := nodes[node]
				if !ok {
					return "", false
				}
				return other.addr, true
			},
			Dial:       testDial(id),
			PairLeases: *pairLeasesFlag,
		}
		if tune != nil {
			tune(&opts)
		}
		n.m, err = NewManager(opts)
		if err != nil {
			t.Fatal(err)
		}
		mt.managers = append(mt.managers, n.m)
		go n.serve()
		t.Cleanup(func() {
			n.down()
			n.m.Close()
			store.Close()
			pool.Close()
		})
	}
	return mt, nodes
}

// testDial dials addr and introduces the dialer as self on the first
// line, the in-process stand-in for the certificate a peer presents.
func testDial(self string) func(ctx context.Context, node, addr string) (net.Conn, error) {
	return func(ctx context.Context, _, addr string) (net.Conn, error) {
		var d net.Dialer
		conn, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return nil, err
		}
		if _, err := io.WriteString(conn, self+"\n"); err != nil {
			conn.Close()
			return nil, err
		}
		return conn, nil
	}
}

func twoCopies(name string, size int64, kind string) cluster.LU {
	return cluster.LU{Name: name, SizeBytes: size, Kind: kind, Copies: 2, Writer: "a", CreatedOn: "a", Epoch: 1,
		Replicas: []cluster.Replica{{NodeID: "a", State: cluster.ReplicaInSync}, {NodeID: "b", State: cluster.ReplicaInSync}}}
}

func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func exported(t testing.TB, m *Manager, name string) blockdev.Device {
	t.Helper()
	m.mu.Lock()
	defer m.mu.Unlock()
	d, ok := m.mu.devices[name]
	if !ok {
		t.Fatalf("%s not exported on %s", name, m.opts.NodeID)
	}
	if rd := m.mu.exported[name]; rd == nil || rd.Device() != d {
		t.Fatalf("%s on %s: the role device does not serve the role's device", name, m.opts.NodeID)
	}
	return d
}

// streamingMirror returns the Mirror that writer node m exports for name,
// once its stream to the first copy is open.
func streamingMirror(t testing.TB, m *Manager, name string) *Mirror {
	t.Helper()
	dev := exported(t, m, name)
	mir, ok := dev.(*Mirror)
	if !ok {
		t.Fatalf("writer exports %T, want *Mirror", dev)
	}
	waitFor(t, "stream to the copy", func() bool { return mir.linkSet()[0].conn.Load() != nil })
	return mir
}

func readAll(t testing.TB, dev blockdev.Device) []byte {
	t.Helper()
	buf := make([]byte, dev.Size())
	if err := dev.ReadAt(context.Background(), buf, 0); err != nil {
		t.Fatal(err)
	}
	return buf
}

// TestMirrorCopyFailsResyncs drives the writer against a flat model while
// its copy goes away and comes back: acknowledged writes are on the writer,
// the copy is recorded out of sync before the first write it missed is
// acknowledged, the resync sends only dirty blocks, and both copies end
// equal to the model.
func TestMirrorCopyFailsResyncs(t *testing.T) {
	rng := rand.New(rand.NewSource(int64(testseed.Seed(t, "./replication/"))))
	mt, nodes := newTestCluster(t, "a", "b")
	const size = 4 << 20
	mt.create(t, twoCopies("x", size, "file"))
	a, b := nodes["a"], nodes["b"]
	mir := streamingMirror(t, a.m, "x")

	model := make([]byte, size)
	ctx := context.Background()
	step := func(i int) {
		off := int64(rng.Intn(size/4096)) * 4096
		n := int64(1+rng.Intn(8)) * 4096
		n = min(n, size-off)
		switch rng.Intn(5) {
		case 0:
			if err := mir.Trim(ctx, off, n, 0); err != nil {
				t.Fatalf("step %d trim: %v", i, err)
			}
			clear(model[off : off+n])
		case 1:
			if err := mir.WriteZeroes(ctx, off, n, blockdev.FUA); err != nil {
				t.Fatalf("step %d zero: %v", i, err)
			}
			clear(model[off : off+n])
		default:
			p := make([]byte, n)
			rng.Read(p)
			if err := mir.WriteAt(ctx, p, off, 0); err != nil {
				t.Fatalf("step %d write: %v", i, err)
			}
			copy(model[off:], p)
		}
	}
	for i := 0; i < 200; i++ {
		step(i)
	}
	if got := mt.get("x"); got.Replicas[1].State != cluster.ReplicaInSync {
		t.Fatalf("copy b is %s before any failure", got.Replicas[1].State)
	}
	b.down()
	// The first write b misses returns only after b is recorded out of
	// sync (the metaTwin applies synchronously).
	p := bytes.Repeat([]byte{7}, 4096)
	if err := mir.WriteAt(ctx, p, 0, 0); err != nil {
		t.Fatal(err)
	}
	copy(model, p)
	if got := mt.get("x"); got.Replicas[1].State != cluster.ReplicaOutOfSync || got.Epoch != 2 {
		t.Fatalf("after b failed: %+v; want b out-of-sync at epoch 2", got)
	}
	// Read-after-write through b, whose copy missed the write: b's read
	// lease ran out before the write was acknowledged, so b reads from
	// the writer and sees it.
	fb := exported(t, b.m, "x").(*Forwarder)
	got := make([]byte, 4096)
	if err := fb.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, p) {
		t.Fatalf("read through b after an acknowledged write b missed: %v, stale data %v", err, !bytes.Equal(got, p))
	}
	for i := 0; i < 200; i++ {
		step(200 + i)
	}
	dirty := mir.linkSet()[0].dirty.dirtyBytes()
	if dirty == 0 || dirty > size {
		t.Fatalf("dirty bytes %d", dirty)
	}
	b.up(t)
	waitFor(t, "b in sync", func() bool { return mt.get("x").Replicas[1].State == cluster.ReplicaInSync })
	if got := mt.get("x"); got.Epoch != 3 {
		t.Fatalf("epoch after resync %d, want 3", got.Epoch)
	}
	sent := sentBytes(a.m, "x", "b", "resync")
	if sent > float64(dirty) {
		t.Errorf("resync sent %v bytes for %d dirty", sent, dirty)
	}
	if !bytes.Equal(readAll(t, mir), model) {
		t.Fatal("writer differs from the model")
	}
	vb, _ := b.m.Volume("x")
	if !bytes.Equal(readAll(t, vb), model) {
		t.Fatal("copy differs from the model after resync")
	}
	// Reads on b come from its own copy again.
	waitFor(t, "b reads locally", fb.localReads.Load)
}

func sentBytes(m *Manager, name, copyNode, kind string) float64 {
	return testutil.ToFloat64(m.metrics.sent.WithLabelValues(name, copyNode, kind))
}

// TestMirrorNoLeaderFailsWrite: when a copy fails and the metadata cannot
// record it, the write is not acknowledged as done.
func TestMirrorNoLeaderFailsWrite(t *testing.T) {
	mt, nodes := newTestCluster(t, "a", "b")
	mt.create(t, twoCopies("y", 1<<20, "memory"))
	mir := streamingMirror(t, nodes["a"].m, "y")
	mt.mu.Lock()
	mt.refuse = true
	mt.mu.Unlock()
	nodes["b"].down()
	err := mir.WriteAt(context.Background(), make([]byte, 4096), 0, 0)
	if !errors.Is(err, blockdev.ErrIO) {
		t.Fatalf("write with a dead copy and no metadata leader: %v, want ErrIO", err)
	}
}

// TestForwarderWritesThroughWriter: a node without the writer role sends
// writes to the writer, which applies them to both copies; the node then
// reads them from its own copy.
func TestForwarderWritesThroughWriter(t *testing.T) {
	mt, nodes := newTestCluster(t, "a", "b")
	mt.create(t, twoCopies("z", 1<<20, "file"))
	fb := exported(t, nodes["b"].m, "z").(*Forwarder)
	streamingMirror(t, nodes["a"].m, "z")
	ctx := context.Background()
	p := bytes.Repeat([]byte("lupool!!"), 512)
	if err := fb.WriteAt(ctx, p, 8192, blockdev.FUA); err != nil {
		t.Fatal(err)
	}
	if err := fb.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	va, _ := nodes["a"].m.Volume("z")
	got := make([]byte, len(p))
	if err := va.ReadAt(ctx, got, 8192); err != nil || !bytes.Equal(got, p) {
		t.Fatalf("writer's copy: %v", err)
	}
	clear(got)
	if err := fb.ReadAt(ctx, got, 8192); err != nil || !bytes.Equal(got, p) {
		t.Fatalf("read on b: %v", err)
	}
	if v := testutil.ToFloat64(nodes["b"].m.metrics.reads.WithLabelValues("z", "local")); v != float64(len(p)) {
		t.Errorf("local read bytes on b = %v, want %d", v, len(p))
	}
	if err := fb.Trim(ctx, 0, 1<<20, 0); err != nil {
		t.Fatal(err)
	}
}

// TestStaleEpochRefused: a copy refuses a stream or a request below its
// recorded epoch.
func TestStaleEpochRefused(t *testing.T) {
	mt, nodes := newTestCluster(t, "a", "b")
	rec := twoCopies("s", 1<<20, "memory")
	rec.Epoch = 5
	mt.create(t, rec)
	addr := nodes["b"].addr
	hello := replproto.Hello{Role: replproto.RoleCopy, LU: "s", Node: "a"}
	a := nodes["a"].m
	_, _, err := a.dialStream(context.Background(), "b", addr, hello, 4, 1<<20)
	if !errors.Is(err, replproto.ErrStaleEpoch) {
		t.Fatalf("hello at epoch 4 of 5: %v, want ErrStaleEpoch", err)
	}
	c, epoch, err := a.dialStream(context.Background(), "b", addr, hello, 5, 1<<20)
	if err != nil || epoch != 5 {
		t.Fatalf("hello at the current epoch: %v (epoch %d)", err, epoch)
	}
	defer c.Close()
	_, err = c.do(replproto.Header{Type: replproto.TypeWrite, Epoch: 4, Offset: 0, Length: 4096}, make([]byte, 4096), nil)
	if !errors.Is(err, replproto.ErrStaleEpoch) {
		t.Fatalf("write at epoch 4 of 5: %v, want ErrStaleEpoch", err)
	}
	if _, err := c.do(replproto.Header{Type: replproto.TypeWrite, Epoch: 5, Offset: 0, Length: 4096}, bytes.Repeat([]byte{1}, 4096), nil); err != nil {
		t.Fatalf("write at the current epoch: %v", err)
	}
	if v := testutil.ToFloat64(nodes["b"].m.metrics.staleRefused.WithLabelValues("s")); v != 2 {
		t.Errorf("stale refusals = %v, want 2", v)
	}
}

// TestDirtyMapPersists: regions survive a reopen of the store (as whole
// regions), blocks inside a region are tracked exactly until then.
func TestDirtyMapPersists(t *testing.T) {
	fs := vfs.NewMem()
	store, err := OpenDirtyStore("d", fs)
	if err != nil {
		t.Fatal(err)
	}
	d, err := newDirtyMap(store, "lu", "n2", 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.mark(4096, 4096); err != nil {
		t.Fatal(err)
	}
	if err := d.mark(200<<10, 8192); err != nil {
		t.Fatal(err)
	}
	if got := d.dirtyBytes(); got != 3*4096 {
		t.Fatalf("dirty %d, want %d", got, 3*4096)
	}
	if got := d.regionList(); len(got) != 2 || got[0] != 0 || got[1] != 3 {
		t.Fatalf("regions %v, want [0 3]", got)
	}
	runs := d.takeRegion(0)
	if len(runs) != 1 || runs[0] != [2]int64{4096, 4096} {
		t.Fatalf("runs of region 0: %v", runs)
	}
	if err := d.doneRegion(0); err != nil {
		t.Fatal(err)
	}
	if _, err := newDirtyMap(store, "lu", "n2", 64<<10); err != nil {
		t.Fatal(err)
	}
	store.Close()
	store, err = OpenDirtyStore("d", fs)
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	again, err := newDirtyMap(store, "lu", "n2", 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	if got := again.regionList(); len(got) != 1 || got[0] != 3 {
		t.Fatalf("after reopen regions %v, want [3]", got)
	}
	if got := again.dirtyBytes(); got != 64<<10 {
		t.Fatalf("after reopen a recorded region is wholly dirty: %d, want %d", got, 64<<10)
	}
	other, _ := newDirtyMap(store, "lu", "n3", 64<<10)
	if !other.empty() {
		t.Fatal("another copy's map sees n2's regions")
	}
	if err := again.reset(); err != nil {
		t.Fatal(err)
	}
	if fresh, _ := newDirtyMap(store, "lu", "n2", 64<<10); !fresh.empty() {
		t.Fatal("reset left regions on disk")
	}
	if _, err := newDirtyMap(store, "lu", "n2", 5000); err == nil {
		t.Fatal("region size not a multiple of 4096 accepted")
	}
}

// TestResyncResumes: a resync cut short keeps the regions it has not sent,
// and the next one sends only those.
func TestResyncResumes(t *testing.T) {
	mt, nodes := newTestClusterOpts(t, func(o *ManagerOptions) {
		o.ResyncBytesPerSecond = 8 << 20 // 1 MiB of dirty data takes ~125 ms
	}, "a", "b")
	const size = 8 << 20
	mt.create(t, twoCopies("r", size, "file"))
	a, b := nodes["a"], nodes["b"]
	mir := streamingMirror(t, a.m, "r")
	b.down()
	ctx := context.Background()
	p := bytes.Repeat([]byte{0xab}, 64<<10)
	for off := int64(0); off < 4<<20; off += int64(len(p)) {
		if err := mir.WriteAt(ctx, p, off, 0); err != nil {
			t.Fatal(err)
		}
	}
	l := mir.linkSet()[0]
	dirty := l.dirty.dirtyBytes()
	if dirty != 4<<20 {
		t.Fatalf("dirty %d, want 4 MiB", dirty)
	}
	b.up(t)
	waitFor(t, "resync under way", func() bool {
		left := l.dirty.dirtyBytes()
		return left > 0 && left <= 3<<20
	})
	b.down()
	waitFor(t, "copy back out of sync", func() bool { return mt.get("r").Replicas[1].State == cluster.ReplicaOutOfSync })
	left := l.dirty.dirtyBytes()
	sentFirst := sentBytes(a.m, "r", "b", "resync")
	if left == 0 || left >= dirty || sentFirst == 0 {
		t.Fatalf("after the interrupted resync: %d of %d bytes left, %v sent", left, dirty, sentFirst)
	}
	b.up(t)
	waitFor(t, "b in sync", func() bool { return mt.get("r").Replicas[1].State == cluster.ReplicaInSync })
	sent := sentBytes(a.m, "r", "b", "resync")
	// The second pass sends what was left (a region cut mid-way is sent
	// again whole, at most one 64 KiB region).
	if second := sent - sentFirst; second < float64(left) || second > float64(left)+64<<10 {
		t.Errorf("second resync sent %v bytes for %d left", second, left)
	}
	vb, _ := b.m.Volume("r")
	if !bytes.Equal(readAll(t, vb), readAll(t, mir)) {
		t.Fatal("copy differs from the writer after the resumed resync")
	}
}
