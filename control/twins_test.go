package control

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/lu"
	"github.com/lupool/lupool/lu/lufs"
	"github.com/lupool/lupool/replication"
	"github.com/lupool/lupool/server/api"
)

// This file holds the in-memory twins of a node's parts: a real
// single-member cluster.Node on Pebble's memory FS, a real lu.Pool on
// lufs.MemFS (optionally behind a FaultFS), a real replication.Manager
// following the metadata, and small twins of what the daemon reaches over
// the network (other nodes' hashes and connection counts) or serves (NBD
// connection counts). memMeta is a metadata twin for tables with several
// nodes, which one raft member cannot have.

// poolCapacityBytes is the test pool's capacity; with ratio 1 it is also
// the overcommit limit.
const poolCapacityBytes = 64 << 20

// connTwin counts NBD connections per LU, like nbd.Server.Connections.
type connTwin struct {
	mu sync.Mutex
	n  map[string]int // guarded by mu
}

func (c *connTwin) Connections(name string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n[name]
}

func (c *connTwin) set(name string, n int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.n == nil {
		c.n = map[string]int{}
	}
	c.n[name] = n
}

// peerNode is another node as its peer port shows it: its copies (real
// volumes) and its NBD connection counts. fail makes it unreachable.
type peerNode struct {
	// memBudget and memFree are its memory budget (0: none) and what the
	// budget still takes.
	memBudget, memFree int64
	vols               map[string]lu.Volume
	conns              map[string]int
	fail               error
	// once, when set, is the hash answered for region offset once, the
	// first time it is asked (a write in flight while hashing).
	once map[int64]string
}

// peersTwin routes calls to peerNodes by id; it checks the address the
// plane used is the one recorded for the node.
type peersTwin struct {
	mu    sync.Mutex
	nodes map[string]*peerNode // guarded by mu
	addrs map[string]string    // node id -> peer address; immutable
	calls map[string]int       // guarded by mu; RegionHashes calls per node
}

var _ Peers = (*peersTwin)(nil)

func (p *peersTwin) node(id, addr string) (*peerNode, error) {
	if p.addrs[id] != addr {
		return nil, fmt.Errorf("peers twin: node %s is at %q, not %q", id, p.addrs[id], addr)
	}
	n, ok := p.nodes[id]
	if !ok {
		return nil, fmt.Errorf("peers twin: no node %s", id)
	}
	return n, n.fail
}

func (p *peersTwin) RegionHashes(ctx context.Context, id, addr, name string, off, region int64, count int) ([]string, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.calls == nil {
		p.calls = map[string]int{}
	}
	p.calls[id]++
	n, err := p.node(id, addr)
	if err != nil {
		return nil, err
	}
	vol, ok := n.vols[name]
	if !ok {
		return nil, fmt.Errorf("peers twin: %s holds no copy of %s", id, name)
	}
	out, err := hashRegions(ctx, vol, off, region, count)
	if err != nil {
		return nil, err
	}
	for i := range out {
		at := off + int64(i)*region
		if h, ok := n.once[at]; ok {
			out[i] = h
			delete(n.once, at)
		}
	}
	return out, nil
}

func (p *peersTwin) Connections(_ context.Context, id, addr, name string) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	n, err := p.node(id, addr)
	if err != nil {
		return 0, err
	}
	return n.conns[name], nil
}

func (p *peersTwin) PoolStatus(_ context.Context, id, addr string) (api.PoolStatus, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	n, err := p.node(id, addr)
	if err != nil {
		return api.PoolStatus{}, err
	}
	return api.PoolStatus{Node: id, CapacityBytes: 1 << 30, FreeBytes: 1 << 29, ProvisionedBytes: int64(len(n.vols)) << 20, Level: "ok",
		MemoryBudgetBytes: n.memBudget, MemoryFreeBytes: n.memFree}, nil
}

// hashRegions hashes regions of a volume the way replication.Manager's
// RegionHashes does (SHA-256 of each region's bytes, the last one short).
func hashRegions(ctx context.Context, vol lu.Volume, off, region int64, count int) ([]string, error) {
	var out []string
	buf := make([]byte, region)
	for i := 0; i < count && off < vol.Size(); i, off = i+1, off+region {
		n := min(region, vol.Size()-off)
		if err := vol.ReadAt(ctx, buf[:n], off); err != nil {
			return nil, err
		}
		sum := sha256.Sum256(buf[:n])
		out = append(out, hex.EncodeToString(sum[:]))
	}
	return out, nil
}

// memMeta is a metadata twin: an LU table and a member list in memory,
// with cluster's own copy-change rule. It is the leader.
type memMeta struct {
	mu    sync.Mutex
	lus   map[string]cluster.LU // guarded by mu
	nodes []cluster.NodeInfo    // immutable
}

var _ Metadata = (*memMeta)(nil)

func newMemMeta(nodes ...string) *memMeta {
	m := &memMeta{lus: map[string]cluster.LU{}}
	for _, id := range nodes {
		m.nodes = append(m.nodes, cluster.NodeInfo{ID: id, PeerAddr: "peer-" + id, APIAddr: "api-" + id, NBDAddr: "nbd-" + id, Suffrage: "voter"})
	}
	return m
}

func (m *memMeta) Leader() (string, string) { return m.nodes[0].ID, m.nodes[0].APIAddr }
func (m *memMeta) Nodes() ([]cluster.NodeInfo, error) {
	return append([]cluster.NodeInfo(nil), m.nodes...), nil
}

func (m *memMeta) GetLU(name string) (cluster.LU, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	rec, ok := m.lus[name]
	if !ok {
		return cluster.LU{}, fmt.Errorf("%w: %q", cluster.ErrNotFound, name)
	}
	return rec, nil
}

func (m *memMeta) ListLUs() ([]cluster.LU, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]cluster.LU, 0, len(m.lus))
	for _, rec := range m.lus {
		out = append(out, rec)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

func (m *memMeta) CreateLU(_ context.Context, rec cluster.LU) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.lus[rec.Name]; ok {
		return fmt.Errorf("%w: %q", cluster.ErrExists, rec.Name)
	}
	if err := cluster.ValidateName(rec.Name); err != nil {
		return err
	}
	m.lus[rec.Name] = rec
	return nil
}

func (m *memMeta) ResizeLU(_ context.Context, name string, size int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	rec, ok := m.lus[name]
	if !ok {
		return fmt.Errorf("%w: %q", cluster.ErrNotFound, name)
	}
	rec.SizeBytes = size
	m.lus[name] = rec
	return nil
}

func (m *memMeta) SetQoS(_ context.Context, name string, q cluster.QoS) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	rec, ok := m.lus[name]
	if !ok {
		return fmt.Errorf("%w: %q", cluster.ErrNotFound, name)
	}
	if err := cluster.ValidateQoS(q); err != nil {
		return err
	}
	rec.QoS = nil
	if !q.Zero() {
		rec.QoS = &q
	}
	m.lus[name] = rec
	return nil
}

func (m *memMeta) DeleteLU(_ context.Context, name string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.lus[name]; !ok {
		return fmt.Errorf("%w: %q", cluster.ErrNotFound, name)
	}
	delete(m.lus, name)
	return nil
}

func (m *memMeta) ChangeCopies(_ context.Context, by cluster.Proposer, c cluster.CopyChange) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	rec, ok := m.lus[c.Name]
	if !ok {
		return fmt.Errorf("%w: %q", cluster.ErrNotFound, c.Name)
	}
	members := map[string]bool{}
	for _, n := range m.nodes {
		members[n.ID] = true
	}
	if err := cluster.CheckCopyChange(rec, c, by, members); err != nil {
		return err
	}
	rec.Epoch, rec.Writer, rec.Copies, rec.Replicas = c.Epoch, c.Writer, c.Copies, c.Replicas
	m.lus[c.Name] = rec
	return nil
}

// put records an LU as it is, bypassing CreateLU (the starting state of
// a test).
func (m *memMeta) put(rec cluster.LU) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.lus[rec.Name] = rec
}

// node is one real node's parts.
type node struct {
	meta  *cluster.Node
	pool  *lu.Pool
	fault *lufs.FaultFS
	mgr   *replication.Manager
	conns *connTwin
	peers *peersTwin
	plane *Plane
}

// newNode opens a one-member cluster "n1" on Pebble's memory FS, a pool of
// poolCapacityBytes on lufs.MemFS (through a FaultFS) with overcommit
// ratio 1, and a replication manager that follows the metadata.
// with option changes the pool's options.
func newNode(t *testing.T, with ...func(*lu.PoolOptions)) *node {
	t.Helper()
	ctx := ctxT(t)
	meta, err := cluster.Open(cluster.Options{Dir: t.TempDir(), FS: vfs.NewMem(), NodeID: "n1", PeerAddr: "127.0.0.1:0",
		APIAddr: "127.0.0.1:1", Bootstrap: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = meta.Close() })
	if err := meta.WaitLeader(ctx); err != nil {
		t.Fatal(err)
	}
	if err := meta.RegisterSelf(ctx); err != nil {
		t.Fatal(err)
	}
	fault := lufs.NewFaultFS(lufs.NewMemFS(lufs.MemFSOptions{CapacityBytes: poolCapacityBytes}))
	popts := lu.PoolOptions{Dirs: []string{"/pool"}, FS: fault, OvercommitRatio: 1}
	for _, w := range with {
		w(&popts)
	}
	pool, err := lu.OpenPool(popts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pool.Close() })
	mgr, err := replication.NewManager(replication.ManagerOptions{NodeID: "n1", Pool: pool})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = mgr.Close() })
	lus, cancel, err := meta.ListAndWatch(mgr.Enqueue)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cancel)
	if err := mgr.Reconcile(ctx, lus); err != nil {
		t.Fatal(err)
	}
	n := &node{meta: meta, pool: pool, fault: fault, mgr: mgr, conns: &connTwin{}, peers: &peersTwin{}}
	n.plane = newPlane(t, Options{NodeID: "n1", Metadata: meta, Pool: pool, Replicas: mgr, Connections: n.conns,
		Peers: n.peers, OvercommitRatio: 1})
	return n
}

func newPlane(t *testing.T, opts Options) *Plane {
	t.Helper()
	if opts.RecheckInterval == 0 {
		opts.RecheckInterval = time.Millisecond
	}
	p, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// remoteOnly is a Plane on node "n0", which holds no copy, over memMeta
// with members n0..n<nodes-1>; its Replicas is a real manager that follows
// nothing (no copy here).
func remoteOnly(t *testing.T, nodes int) (*Plane, *memMeta, *peersTwin, *connTwin) {
	t.Helper()
	var ids []string
	addrs := map[string]string{}
	for i := range nodes {
		id := fmt.Sprintf("n%d", i)
		ids = append(ids, id)
		addrs[id] = "peer-" + id
	}
	meta := newMemMeta(ids...)
	pool, err := lu.OpenPool(lu.PoolOptions{Dirs: []string{"/pool"}, FS: lufs.NewMemFS(lufs.MemFSOptions{}), OvercommitRatio: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pool.Close() })
	mgr, err := replication.NewManager(replication.ManagerOptions{NodeID: "n0", Pool: pool})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = mgr.Close() })
	peers := &peersTwin{nodes: map[string]*peerNode{}, addrs: addrs}
	conns := &connTwin{}
	p := newPlane(t, Options{NodeID: "n0", Metadata: meta, Pool: pool, Replicas: mgr, Connections: conns, Peers: peers,
		OvercommitRatio: 1})
	return p, meta, peers, conns
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}
