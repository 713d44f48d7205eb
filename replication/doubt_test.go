package replication

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"math/rand"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/internal/testseed"
	"github.com/lupool/lupool/lu"
)

// restartNode is an in-process node whose Manager can be replaced (a
// daemon restart over the same pool and dirty-store FS).
type restartNode struct {
	ln net.Listener
	m  atomic.Pointer[Manager]
}

func (n *restartNode) serve() {
	for {
		conn, err := n.ln.Accept()
		if err != nil {
			return
		}
		go func() {
			br := bufio.NewReader(conn)
			// The test stand-in for a peer certificate (see testDial).
			peer, err := br.ReadString('\n')
			if err != nil {
				conn.Close()
				return
			}
			req, err := http.ReadRequest(br)
			m := n.m.Load()
			if err != nil || req.URL.Path != StreamPath || m == nil {
				conn.Close()
				return
			}
			fmt.Fprintf(conn, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: %s\r\n\r\n", StreamUpgrade)
			m.ServeStream(strings.TrimSuffix(peer, "\n"), conn, br)
		}()
	}
}

// logBuffer collects a Manager's log lines.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// restartPair is writer a (a restartNode over a dirty store on fsA) and
// copy b, in process, with the metadata twin mt; inSyncEqual is set when b
// is recorded in sync: whether b's volume then equals a's.
type restartPair struct {
	a            *restartNode
	b            *testNode
	mt           *metaTwin
	poolA, poolB *lu.Pool
	fsA          vfs.FS
	logA         logBuffer
	inSyncEqual  atomic.Pointer[bool]
	newManagerA  func(store *DirtyStore) *Manager
}

func newRestartPair(t *testing.T, fsA vfs.FS, regionBytes int64) *restartPair {
	t.Helper()
	p := &restartPair{mt: &metaTwin{lus: map[string]cluster.LU{}}, fsA: fsA}
	lnA, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p.a = &restartNode{ln: lnA}
	lnB, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p.b = &testNode{id: "b", ln: lnB, addr: lnB.Addr().String()}
	addrs := map[string]string{"a": lnA.Addr().String(), "b": p.b.addr}
	nodeAPI := func(node string) (string, bool) {
		addr, ok := addrs[node]
		return addr, ok
	}
	for _, pool := range []**lu.Pool{&p.poolA, &p.poolB} {
		if *pool, err = lu.OpenPool(lu.PoolOptions{Dirs: []string{t.TempDir()}}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { (*pool).Close() })
	}
	p.b.pool = p.poolB
	p.newManagerA = func(store *DirtyStore) *Manager {
		m, err := NewManager(ManagerOptions{
			NodeID: "a", Pool: p.poolA, Dirty: store, NodeAPI: nodeAPI, Dial: testDial("a"), RegionBytes: regionBytes,
			AckTimeout: 2 * time.Second, RetryInterval: 20 * time.Millisecond,
			Logger: slog.New(slog.NewTextHandler(&p.logA, nil)),
			UpdateLU: func(ctx context.Context, rec cluster.LU, expected uint64) error {
				if replicaState(rec, "b") == cluster.ReplicaInSync && replicaState(p.mt.get(rec.Name), "b") != cluster.ReplicaInSync {
					// The writer holds the mirror's gate: no write is in flight.
					va, _ := p.poolA.Get(rec.Name)
					vb, _ := p.poolB.Get(rec.Name)
					eq := bytes.Equal(readAll(t, va), readAll(t, vb))
					p.inSyncEqual.Store(&eq)
				}
				return p.mt.update(ctx, rec, expected)
			},
		})
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	p.b.m, err = NewManager(ManagerOptions{NodeID: "b", Pool: p.poolB, UpdateLU: p.mt.update, NodeAPI: nodeAPI, Dial: testDial("b"),
		RegionBytes: regionBytes, AckTimeout: 2 * time.Second, RetryInterval: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	go p.a.serve()
	go p.b.serve()
	t.Cleanup(func() {
		lnA.Close()
		p.b.down()
		if m := p.a.m.Load(); m != nil {
			m.Close()
		}
		p.b.m.Close()
	})
	return p
}

// restartA replaces a's manager by a new one over store and reconciles
// the LU table, as a daemon restart does.
func (p *restartPair) restartA(t *testing.T, store *DirtyStore) *Manager {
	t.Helper()
	m2 := p.newManagerA(store)
	p.a.m.Store(m2)
	p.mt.mu.Lock()
	p.mt.managers[0] = m2
	p.mt.mu.Unlock()
	lus := make([]cluster.LU, 0)
	for _, name := range []string{"h"} {
		lus = append(lus, p.mt.get(name))
	}
	if err := m2.Reconcile(context.Background(), lus); err != nil {
		t.Fatal(err)
	}
	return m2
}

// TestHashResyncAfterCorruptDirtyStore: the writer's dirty-region store
// gets a flipped byte while a copy is out of sync; after a writer restart
// the store is in doubt, the copy is compared by region hashes, only the
// regions that differ are sent, and the copy equals the writer byte for
// byte when it is recorded in sync.
func TestHashResyncAfterCorruptDirtyStore(t *testing.T) {
	rng := rand.New(rand.NewSource(int64(testseed.Seed(t, "./replication/"))))
	const (
		size        = 1 << 20
		regionBytes = 64 << 10
	)
	fsA := vfs.NewMem()
	rp := newRestartPair(t, fsA, regionBytes)
	a, b, mt, poolA, poolB := rp.a, rp.b, rp.mt, rp.poolA, rp.poolB
	storeA, err := OpenDirtyStoreOptions("dirty", DirtyStoreOptions{FS: fsA})
	if err != nil {
		t.Fatal(err)
	}
	a.m.Store(rp.newManagerA(storeA))
	mt.managers = []*Manager{a.m.Load(), b.m}

	mt.create(t, twoCopies("h", size, "file"))
	mir := streamingMirror(t, a.m.Load(), "h")
	ctx := context.Background()
	full := make([]byte, size)
	rng.Read(full)
	if err := mir.WriteAt(ctx, full, 0, 0); err != nil {
		t.Fatal(err)
	}

	// b misses writes in four regions; one of them is hit twice.
	b.down()
	missed := []int64{2, 5, 9, 13}
	for i, r := range missed {
		p := make([]byte, 8192)
		rng.Read(p)
		if err := mir.WriteAt(ctx, p, r*regionBytes+int64(i)*4096, 0); err != nil {
			t.Fatal(err)
		}
	}
	if err := mir.WriteAt(ctx, bytes.Repeat([]byte{9}, 4096), 9*regionBytes+32<<10, 0); err != nil {
		t.Fatal(err)
	}
	if st := replicaState(mt.get("h"), "b"); st != cluster.ReplicaOutOfSync {
		t.Fatalf("b is %s after missing writes, want out-of-sync", st)
	}
	if got := mir.linkSet()[0].dirty.regionList(); len(got) != len(missed) {
		t.Fatalf("dirty regions %v, want %v", got, missed)
	}

	// The writer stops; a byte of its dirty store flips on disk.
	if err := a.m.Load().Close(); err != nil {
		t.Fatal(err)
	}
	if err := storeA.Close(); err != nil {
		t.Fatal(err)
	}
	flipIn(t, fsA, "dirty", ".sst", []byte("dirty/h"))
	storeA, err = OpenDirtyStoreOptions("dirty", DirtyStoreOptions{FS: fsA, ExpectExisting: true})
	if err != nil {
		t.Fatal(err)
	}
	defer storeA.Close()
	if err := storeA.Doubt(); err == nil {
		t.Fatal("dirty store with a flipped byte is trusted")
	}

	// The writer starts again, b comes back.
	m2 := rp.restartA(t, storeA)
	b.up(t)
	waitFor(t, "b in sync", func() bool { return replicaState(mt.get("h"), "b") == cluster.ReplicaInSync })
	if eq := rp.inSyncEqual.Load(); eq == nil || !*eq {
		t.Fatalf("b recorded in sync while it differs from the writer (compared: %v)", eq != nil)
	}
	if sent, want := sentBytes(m2, "h", "b", "resync"), float64(len(missed)*regionBytes); sent != want {
		t.Errorf("hash resync sent %v bytes, want %v (the %d regions that differ)", sent, want, len(missed))
	}
	if want := fmt.Sprintf("hash resync done: compared %d regions, sent %d", size/regionBytes, len(missed)); !strings.Contains(rp.logA.String(), want) {
		t.Errorf("writer's log lacks %q:\n%s", want, rp.logA.String())
	}
	va, _ := poolA.Get("h")
	vb, _ := poolB.Get("h")
	if !bytes.Equal(readAll(t, va), readAll(t, vb)) {
		t.Fatal("copy differs from the writer after the hash resync")
	}
	if l := exported(t, m2, "h").(*Mirror).linkSet()[0]; l.dirty.isUnknown() {
		t.Fatal("copy still unknown once in sync")
	}
}

// TestWriterCrashComparesInSyncCopies: the writer dies (its dirty store is
// left as a crash of a version without the activity log leaves it, "open")
// while both copies are recorded in sync, with a write in flight that reached only the copy and another that
// reached only the writer. The restarted writer takes the copy out of the
// live set, records it out of sync, compares it by region hashes and sends
// exactly the two regions that differ; the copy equals the writer when it
// is recorded in sync again.
func TestWriterCrashComparesInSyncCopies(t *testing.T) {
	cr := newCrashRun(t)
	rp, storeA := cr.rp, cr.storeA
	const size, regionBytes = crashRunSize, crashRunRegionBytes
	before := rp.mt.get("h")
	if replicaState(before, "b") != cluster.ReplicaInSync {
		t.Fatalf("b is %s before the crash, want in-sync", replicaState(before, "b"))
	}

	// The crash: the store as synced, the manager gone without a clean
	// close; one write landed only on b, one only on a.
	if err := storeA.setState(stateOpen); err != nil {
		t.Fatal(err)
	}
	va, vb, store2 := cr.crash(t)
	if store2.Doubt() == nil || !strings.Contains(store2.Doubt().Error(), "not closed cleanly") {
		t.Fatalf("store after a crash: doubt %v, want not closed cleanly", store2.Doubt())
	}

	began := time.Now()
	m2 := rp.restartA(t, store2)
	if took := time.Since(began); took < 900*time.Millisecond {
		t.Errorf("the restarted writer served after %v, before a read lease (1 s) of its previous run could run out", took)
	}
	cr.waitResynced(t, m2, before)
	for _, want := range []string{"writer started after an unclean stop", fmt.Sprintf("hash resync done: compared %d regions, sent 2", size/regionBytes)} {
		if !strings.Contains(rp.logA.String(), want) {
			t.Errorf("writer's log lacks %q:\n%s", want, rp.logA.String())
		}
	}
	if !bytes.Equal(readAll(t, va), readAll(t, vb)) {
		t.Fatal("copy differs from the writer after the restart")
	}
}

// TestWriterCrashComparesActivityLog: the writer dies with writes in flight
// in two regions (one reached only the copy, one only the writer's volume)
// while both copies are recorded in sync. The restarted writer's store is
// Crashed, not in doubt; it compares only the regions of its activity log
// (the two written since the last flush, not the whole LU), sends the two
// that differ, and the copy equals the writer when it is in sync again.
func TestWriterCrashComparesActivityLog(t *testing.T) {
	cr := newCrashRun(t)
	rp, mir, rng := cr.rp, cr.mir, cr.rng
	const size, regionBytes = crashRunSize, crashRunRegionBytes
	ctx := context.Background()
	if err := mir.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	// Evict what the flush made durable: a log of 4 regions at most.
	mir.al.mu.Lock()
	mir.al.limit = 4
	mir.al.evictLocked()
	mir.al.mu.Unlock()
	// The two writes that will be in flight at the crash.
	for _, off := range []int64{3*regionBytes + 4096, 11 * regionBytes} {
		p := make([]byte, 4096)
		rng.Read(p)
		if err := mir.WriteAt(ctx, p, off, 0); err != nil {
			t.Fatal(err)
		}
	}
	if n := mir.al.size(); n > 5 {
		t.Fatalf("activity log holds %d regions after eviction, want at most 5", n)
	}
	before := rp.mt.get("h")

	va, vb, store2 := cr.crash(t)
	if store2.Doubt() != nil || !store2.Crashed() {
		t.Fatalf("store after a crash: doubt %v, crashed %v; want crashed, no doubt", store2.Doubt(), store2.Crashed())
	}
	logged, err := store2.loadActive("h")
	if err != nil {
		t.Fatal(err)
	}
	m2 := rp.restartA(t, store2)
	cr.waitResynced(t, m2, before)
	var loggedBytes int64
	for _, r := range logged {
		loggedBytes += r[1]
	}
	if loggedBytes >= size/2 || loggedBytes < 2*regionBytes {
		t.Errorf("activity log at the crash: %v (%d bytes), want the 2 regions in flight and at most a few more", logged, loggedBytes)
	}
	// The resync logs what it compared once the copy is recorded in sync.
	wantLog := fmt.Sprintf("activity-log regions compared: %d, sent 2", loggedBytes/regionBytes)
	waitFor(t, "the resync's log line", func() bool { return strings.Contains(rp.logA.String(), wantLog) })
	log := rp.logA.String()
	if !strings.Contains(log, "writer started after a crash: its activity-log regions are compared") {
		t.Errorf("writer's log lacks the activity-log recovery:\n%s", log)
	}
	if strings.Contains(log, "hash resync starts") {
		t.Errorf("writer compared the whole LU although its activity log was intact:\n%s", log)
	}
	if !bytes.Equal(readAll(t, va), readAll(t, vb)) {
		t.Fatal("copy differs from the writer after the restart")
	}
	if left, err := store2.loadActive("h"); err != nil || len(left) != 0 {
		t.Errorf("activity log after the restart: %v, %v; want it carried over and empty", left, err)
	}
}

const (
	crashRunSize        = 1 << 20
	crashRunRegionBytes = 64 << 10
)

// crashRun is writer a of LU "h" (crashRunSize, crashRunRegionBytes
// regions) with its copy on b, over a dirty store on a crashable FS, with
// the whole LU written through the mirror.
type crashRun struct {
	rp     *restartPair
	fsA    *vfs.MemFS
	storeA *DirtyStore
	mir    *Mirror
	rng    *rand.Rand
}

func newCrashRun(t *testing.T) *crashRun {
	t.Helper()
	cr := &crashRun{rng: rand.New(rand.NewSource(int64(testseed.Seed(t, "./replication/")))), fsA: vfs.NewCrashableMem()}
	cr.rp = newRestartPair(t, cr.fsA, crashRunRegionBytes)
	var err error
	if cr.storeA, err = OpenDirtyStoreOptions("dirty", DirtyStoreOptions{FS: cr.fsA}); err != nil {
		t.Fatal(err)
	}
	cr.rp.a.m.Store(cr.rp.newManagerA(cr.storeA))
	cr.rp.mt.managers = []*Manager{cr.rp.a.m.Load(), cr.rp.b.m}
	cr.rp.mt.create(t, twoCopies("h", crashRunSize, "file"))
	cr.mir = streamingMirror(t, cr.rp.a.m.Load(), "h")
	full := make([]byte, crashRunSize)
	cr.rng.Read(full)
	if err := cr.mir.WriteAt(context.Background(), full, 0, 0); err != nil {
		t.Fatal(err)
	}
	return cr
}

// crash stops a as a crash does (its store as synced, its manager gone
// without a clean close); then a write in flight lands only on b (region
// 3) and another only on a (region 11). It returns both volumes and a's
// store reopened over the crash clone.
func (cr *crashRun) crash(t *testing.T) (va, vb lu.Volume, store2 *DirtyStore) {
	t.Helper()
	crashed := cr.fsA.CrashClone(vfs.CrashCloneCfg{})
	if err := cr.rp.a.m.Load().Close(); err != nil {
		t.Fatal(err)
	}
	_ = cr.storeA.Close() // the original; the restart uses the crash clone
	va, _ = cr.rp.poolA.Get("h")
	vb, _ = cr.rp.poolB.Get("h")
	onlyCopy, onlyWriter := make([]byte, 4096), make([]byte, 8192)
	cr.rng.Read(onlyCopy)
	cr.rng.Read(onlyWriter)
	ctx := context.Background()
	if err := vb.WriteAt(ctx, onlyCopy, 3*crashRunRegionBytes+4096, 0); err != nil {
		t.Fatal(err)
	}
	if err := va.WriteAt(ctx, onlyWriter, 11*crashRunRegionBytes, 0); err != nil {
		t.Fatal(err)
	}
	store2, err := OpenDirtyStoreOptions("dirty", DirtyStoreOptions{FS: crashed, ExpectExisting: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store2.Close() })
	return va, vb, store2
}

// waitResynced waits until b is recorded in sync again past before's epoch
// (taken out of sync, resynced), checks that it then equalled the writer
// and that the resync sent exactly the two regions crash made differ.
func (cr *crashRun) waitResynced(t *testing.T, m2 *Manager, before cluster.LU) {
	t.Helper()
	waitFor(t, "b in sync", func() bool {
		rec := cr.rp.mt.get("h")
		return rec.Epoch > before.Epoch+1 && replicaState(rec, "b") == cluster.ReplicaInSync
	})
	if eq := cr.rp.inSyncEqual.Load(); eq == nil || !*eq {
		t.Fatalf("b recorded in sync while it differs from the writer (compared: %v)", eq != nil)
	}
	if sent, want := sentBytes(m2, "h", "b", "resync"), float64(2*crashRunRegionBytes); sent != want {
		t.Errorf("resync after the crash sent %v bytes, want %v (the 2 regions that differ)", sent, want)
	}
}
