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
	mt := &metaTwin{lus: map[string]cluster.LU{}}
	lnA, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := &restartNode{ln: lnA}
	lnB, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &testNode{id: "b", ln: lnB, addr: lnB.Addr().String()}
	addrs := map[string]string{"a": lnA.Addr().String(), "b": b.addr}
	nodeAPI := func(node string) (string, bool) {
		addr, ok := addrs[node]
		return addr, ok
	}
	poolA, err := lu.OpenPool(lu.PoolOptions{Dirs: []string{t.TempDir()}})
	if err != nil {
		t.Fatal(err)
	}
	defer poolA.Close()
	poolB, err := lu.OpenPool(lu.PoolOptions{Dirs: []string{t.TempDir()}})
	if err != nil {
		t.Fatal(err)
	}
	defer poolB.Close()
	b.pool = poolB
	fsA := vfs.NewMem()
	var logA logBuffer
	// inSyncEqual is set when b is recorded in sync: whether b's volume then
	// equals a's.
	var inSyncEqual atomic.Pointer[bool]
	managerA := func(store *DirtyStore) *Manager {
		m, err := NewManager(ManagerOptions{
			NodeID: "a", Pool: poolA, Dirty: store, NodeAPI: nodeAPI, Dial: testDial("a"), RegionBytes: regionBytes,
			AckTimeout: 2 * time.Second, RetryInterval: 20 * time.Millisecond,
			Logger: slog.New(slog.NewTextHandler(&logA, nil)),
			UpdateLU: func(ctx context.Context, rec cluster.LU, expected uint64) error {
				if replicaState(rec, "b") == cluster.ReplicaInSync && replicaState(mt.get(rec.Name), "b") != cluster.ReplicaInSync {
					// The writer holds the mirror's gate: no write is in flight.
					va, _ := poolA.Get(rec.Name)
					vb, _ := poolB.Get(rec.Name)
					eq := bytes.Equal(readAll(t, va), readAll(t, vb))
					inSyncEqual.Store(&eq)
				}
				return mt.update(ctx, rec, expected)
			},
		})
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	storeA, err := OpenDirtyStoreOptions("dirty", DirtyStoreOptions{FS: fsA})
	if err != nil {
		t.Fatal(err)
	}
	a.m.Store(managerA(storeA))
	b.m, err = NewManager(ManagerOptions{NodeID: "b", Pool: poolB, UpdateLU: mt.update, NodeAPI: nodeAPI, Dial: testDial("b"),
		RegionBytes: regionBytes, AckTimeout: 2 * time.Second, RetryInterval: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	mt.managers = []*Manager{a.m.Load(), b.m}
	go a.serve()
	go b.serve()
	defer func() {
		lnA.Close()
		b.down()
		a.m.Load().Close()
		b.m.Close()
	}()

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
	m2 := managerA(storeA)
	a.m.Store(m2)
	mt.mu.Lock()
	mt.managers[0] = m2
	mt.mu.Unlock()
	if err := m2.Reconcile(ctx, []cluster.LU{mt.get("h")}); err != nil {
		t.Fatal(err)
	}
	b.up(t)
	waitFor(t, "b in sync", func() bool { return replicaState(mt.get("h"), "b") == cluster.ReplicaInSync })
	if eq := inSyncEqual.Load(); eq == nil || !*eq {
		t.Fatalf("b recorded in sync while it differs from the writer (compared: %v)", eq != nil)
	}
	if sent, want := sentBytes(m2, "h", "b", "resync"), float64(len(missed)*regionBytes); sent != want {
		t.Errorf("hash resync sent %v bytes, want %v (the %d regions that differ)", sent, want, len(missed))
	}
	if want := fmt.Sprintf("hash resync done: compared %d regions, sent %d", size/regionBytes, len(missed)); !strings.Contains(logA.String(), want) {
		t.Errorf("writer's log lacks %q:\n%s", want, logA.String())
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
