package replication

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/lu"
)

type exportLog struct {
	mu       sync.Mutex
	exported map[string]blockdev.Device
	removed  []string
}

func newTestManager(t *testing.T) (*Manager, *lu.Pool, *exportLog) {
	t.Helper()
	pool, err := lu.OpenPool(lu.PoolOptions{Dirs: []string{t.TempDir()}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pool.Close() })
	log := &exportLog{exported: map[string]blockdev.Device{}}
	m, err := NewManager(ManagerOptions{
		NodeID: "me",
		Pool:   pool,
		Export: func(name, _ string, dev blockdev.Device) {
			log.mu.Lock()
			defer log.mu.Unlock()
			log.exported[name] = dev.(*roleDevice).Device()
		},
		Unexport: func(name string) {
			log.mu.Lock()
			defer log.mu.Unlock()
			delete(log.exported, name)
			log.removed = append(log.removed, name)
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m, pool, log
}

func rec(name string, size int64, kind string, nodes ...string) cluster.LU {
	r := cluster.LU{Name: name, SizeBytes: size, Kind: kind, Copies: len(nodes), Epoch: 1}
	for _, n := range nodes {
		r.Replicas = append(r.Replicas, cluster.Replica{NodeID: n, State: cluster.ReplicaInSync})
	}
	return r
}

func sync1(t testing.TB, m *Manager) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := m.Sync(ctx); err != nil {
		t.Fatal(err)
	}
}

func TestManagerFollowsChanges(t *testing.T) {
	m, pool, log := newTestManager(t)
	m.Enqueue(cluster.Change{Kind: cluster.Created, LU: rec("f", 1<<20, "file", "me"), Index: 1})
	m.Enqueue(cluster.Change{Kind: cluster.Created, LU: rec("mem", 1<<20, "memory", "me"), Index: 2})
	m.Enqueue(cluster.Change{Kind: cluster.Created, LU: rec("elsewhere", 1<<20, "file", "other"), Index: 3})
	sync1(t, m)

	if _, ok := m.Volume("f"); !ok {
		t.Fatal("file LU with a local copy has no volume")
	}
	if v, ok := m.Volume("mem"); !ok || v.Kind() != lu.KindMemory {
		t.Fatalf("memory LU: %v %v", v, ok)
	}
	if _, ok := m.Volume("elsewhere"); ok {
		t.Fatal("LU whose copy is on another node got a local volume")
	}
	if _, ok := pool.Get("elsewhere"); ok {
		t.Fatal("LU whose copy is on another node got a pool volume")
	}
	log.mu.Lock()
	if len(log.exported) != 3 || log.exported["f"] == nil || log.exported["mem"] == nil {
		t.Fatalf("exports = %v, want f, mem and elsewhere", log.exported)
	}
	if _, ok := log.exported["elsewhere"].(*Forwarder); !ok {
		t.Fatalf("LU written elsewhere exported as %T, want *Forwarder", log.exported["elsewhere"])
	}
	if _, ok := log.exported["f"].(*Mirror); !ok {
		t.Fatalf("single-copy LU written here exported as %T, want *Mirror (copies can be added online)", log.exported["f"])
	}
	log.mu.Unlock()

	// Resize follows the record; a duplicate create is harmless.
	m.Enqueue(cluster.Change{Kind: cluster.Resized, LU: rec("f", 4<<20, "file", "me"), Index: 4})
	m.Enqueue(cluster.Change{Kind: cluster.Created, LU: rec("f", 4<<20, "file", "me"), Index: 4})
	sync1(t, m)
	if v, _ := m.Volume("f"); v.Size() != 4<<20 {
		t.Fatalf("after resize: size %d, want %d", v.Size(), 4<<20)
	}

	// Data written survives a duplicate create (reopen, not truncate).
	v, _ := m.Volume("f")
	if err := v.WriteAt(context.Background(), []byte("page"), 8192, 0); err != nil {
		t.Fatal(err)
	}
	m.Enqueue(cluster.Change{Kind: cluster.Created, LU: rec("f", 4<<20, "file", "me"), Index: 5})
	sync1(t, m)
	buf := make([]byte, 4)
	if err := v.ReadAt(context.Background(), buf, 8192); err != nil || string(buf) != "page" {
		t.Fatalf("data after duplicate create: %q %v", buf, err)
	}

	// The copy moves away: its volume is unexported and deleted here, and
	// the LU is served by forwarding to its new writer.
	m.Enqueue(cluster.Change{Kind: cluster.Updated, LU: rec("mem", 1<<20, "memory", "other"), Index: 6})
	m.Enqueue(cluster.Change{Kind: cluster.Deleted, LU: rec("f", 4<<20, "file", "me"), Index: 7})
	sync1(t, m)
	if _, ok := m.Volume("mem"); ok {
		t.Fatal("moved LU still has a local volume")
	}
	if names := pool.Names(); len(names) != 0 {
		t.Fatalf("pool still holds %v after move and delete", names)
	}
	log.mu.Lock()
	defer log.mu.Unlock()
	if len(log.exported) != 2 || len(log.removed) != 2 {
		t.Fatalf("exports %v removed %v; want mem and elsewhere forwarded, and two removals", log.exported, log.removed)
	}
	if _, ok := log.exported["mem"].(*Forwarder); !ok {
		t.Fatalf("moved LU exported as %T, want *Forwarder", log.exported["mem"])
	}
	if err := v.ReadAt(context.Background(), buf, 0); !errors.Is(err, blockdev.ErrShutdown) {
		t.Fatalf("I/O on a deleted LU's volume: %v, want ErrShutdown", err)
	}
}

func TestManagerReconcileKeepsOrphans(t *testing.T) {
	m, pool, _ := newTestManager(t)
	if _, err := pool.Create("orphan", 1<<20, lu.KindFile); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := m.Reconcile(ctx, []cluster.LU{rec("a", 1<<20, "file", "me")}); err != nil {
		t.Fatal(err)
	}
	if _, ok := pool.Get("orphan"); !ok {
		t.Fatal("reconcile deleted a volume the metadata does not know; it must leave it")
	}
	if _, ok := m.Volume("a"); !ok {
		t.Fatal("reconcile did not create the LU's volume")
	}
	if err := m.LastError(); err != nil {
		t.Fatalf("LastError = %v", err)
	}
	m.Close()
	if err := m.Reconcile(ctx, nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("Reconcile after Close = %v, want ErrClosed", err)
	}
}

func TestManagerRecordsFailures(t *testing.T) {
	m, _, _ := newTestManager(t)
	m.Enqueue(cluster.Change{Kind: cluster.Created, LU: rec("bad", 1<<20, "tape", "me"), Index: 1})
	sync1(t, m)
	if err := m.LastError(); err == nil {
		t.Fatal("a volume the pool cannot create must be reported by LastError")
	}
}
