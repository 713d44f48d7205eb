package replication

import (
	"bytes"
	"context"
	"sort"
	"strings"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/cluster"
)

// registry returns m's collectors on a fresh registry.
func registry(t *testing.T, m *Manager) *prometheus.Registry {
	t.Helper()
	reg := prometheus.NewRegistry()
	for _, c := range m.Collectors() {
		if err := reg.Register(c); err != nil {
			t.Fatal(err)
		}
	}
	return reg
}

// seriesWith counts the series of reg whose labels include every pair of
// match.
func seriesWith(t *testing.T, reg *prometheus.Registry, match map[string]string) int {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			hits := 0
			for _, l := range m.GetLabel() {
				if v, ok := match[l.GetName()]; ok && v == l.GetValue() {
					hits++
				}
			}
			if hits == len(match) {
				n++
			}
		}
	}
	return n
}

// remove deletes the LU from the metadata twin and every manager, like the
// raft apply loop does.
func (mt *metaTwin) remove(t testing.TB, name string) {
	t.Helper()
	mt.mu.Lock()
	rec := mt.lus[name]
	delete(mt.lus, name)
	ms := append([]*Manager(nil), mt.managers...)
	mt.mu.Unlock()
	for _, m := range ms {
		m.Enqueue(cluster.Change{Kind: cluster.Deleted, LU: rec})
	}
	for _, m := range ms {
		sync1(t, m)
	}
}

// exercise writes through the writer, writes and reads through b's
// forwarder (its own copy) and reads through c's (no copy: over the
// network), so every per-LU counter of the LU gets a series somewhere.
func exercise(t *testing.T, nodes map[string]*testNode, name string) {
	t.Helper()
	ctx := context.Background()
	mir := streamingMirror(t, nodes["a"].m, name)
	p := bytes.Repeat([]byte{7}, 4096)
	if err := mir.WriteAt(ctx, p, 0, 0); err != nil {
		t.Fatal(err)
	}
	fb := exported(t, nodes["b"].m, name).(*Forwarder)
	if err := fb.WriteAt(ctx, p, 4096, 0); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "b reads locally", fb.localReads.Load)
	for _, n := range []string{"b", "c"} {
		if err := exported(t, nodes[n].m, name).ReadAt(ctx, make([]byte, 4096), 0); err != nil {
			t.Fatalf("read on %s: %v", n, err)
		}
	}
}

// TestMetricsDeletedLUSeriesGo: once an LU is deleted no node reports a
// series labelled with it, the other LU's series stay, and neither a
// device still holding its counters nor a late stream brings them back.
func TestMetricsDeletedLUSeriesGo(t *testing.T) {
	var deletedMu sync.Mutex
	var deleted []string // node/LU, as ManagerOptions.Deleted was called
	var self map[string]*testNode
	mt, nodes := newTestClusterOpts(t, func(o *ManagerOptions) {
		id := o.NodeID
		o.Deleted = func(name string) {
			// Called once the LU is unexported and its volume gone.
			m := self[id].m
			m.mu.Lock()
			_, exported := m.mu.devices[name]
			m.mu.Unlock()
			if exported {
				t.Errorf("Deleted(%s) on %s while the LU is still exported", name, id)
			}
			if _, ok := self[id].pool.Get(name); ok {
				t.Errorf("Deleted(%s) on %s while its volume is still in the pool", name, id)
			}
			deletedMu.Lock()
			deleted = append(deleted, id+"/"+name)
			deletedMu.Unlock()
		}
	}, "a", "b", "c")
	self = nodes
	regs := map[string]*prometheus.Registry{}
	for id, n := range nodes {
		regs[id] = registry(t, n.m)
	}
	mt.create(t, twoCopies("gone", 1<<20, "file"))
	mt.create(t, twoCopies("kept", 1<<20, "memory"))
	exercise(t, nodes, "gone")
	exercise(t, nodes, "kept")
	total := 0
	for id, reg := range regs {
		g, k := seriesWith(t, reg, map[string]string{"lu": "gone"}), seriesWith(t, reg, map[string]string{"lu": "kept"})
		if g == 0 || g != k {
			t.Fatalf("before: node %s has %d series of gone, %d of kept", id, g, k)
		}
		total += g
	}
	t.Logf("%d per-LU series of each LU across the three nodes", total)
	// Counters of the doomed LU's devices, held past the deletion.
	mir := exported(t, nodes["a"].m, "gone").(*Mirror)
	fc := exported(t, nodes["c"].m, "gone").(*Forwarder)
	link := mir.linkSet()[0]

	mt.remove(t, "gone")
	deletedMu.Lock()
	if sort.Strings(deleted); strings.Join(deleted, " ") != "a/gone b/gone c/gone" {
		t.Errorf("ManagerOptions.Deleted calls: %v, want one per node", deleted)
	}
	deletedMu.Unlock()
	link.sentLive.Add(1)
	link.sentResync.Add(1)
	fc.readWriter.Add(1)
	fc.writesForwarded.Add(1)
	for _, n := range nodes {
		// A stream or refusal resolving counters after the deletion.
		n.m.luCounter(n.m.metrics.staleRefused, nil, "gone").Inc()
		n.m.luCounter(n.m.metrics.servedReads, nil, "gone").Inc()
	}
	for id, reg := range regs {
		if n := seriesWith(t, reg, map[string]string{"lu": "gone"}); n != 0 {
			t.Errorf("node %s still reports %d series of the deleted LU", id, n)
		}
		if n := seriesWith(t, reg, map[string]string{"lu": "kept"}); n == 0 {
			t.Errorf("node %s lost the series of the other LU", id)
		}
	}
	if got := testutil.CollectAndCount(nodes["a"].m.metrics.sent); got != 2 {
		t.Errorf("writer has %d sent series, want 2 (kept's live and resync bytes to b)", got)
	}

	// The name comes back as a new LU: it gets series again.
	mt.create(t, twoCopies("gone", 1<<20, "memory"))
	exercise(t, nodes, "gone")
	if n := seriesWith(t, regs["a"], map[string]string{"lu": "gone"}); n == 0 {
		t.Error("a re-created LU of the same name has no series")
	}
}

// TestMetricsRemovedCopySeriesGo: a copy removed from an LU takes its
// series with it: on the writer the bytes sent to it, on its node the
// bytes it received; the remaining copy's stay.
func TestMetricsRemovedCopySeriesGo(t *testing.T) {
	mt, nodes := newTestCluster(t, "a", "b", "c")
	regA, regC := registry(t, nodes["a"].m), registry(t, nodes["c"].m)
	three := twoCopies("x", 1<<20, "file")
	three.Copies = 3
	three.Replicas = append(three.Replicas, cluster.Replica{NodeID: "c", State: cluster.ReplicaInSync})
	mt.create(t, three)
	mir := streamingMirror(t, nodes["a"].m, "x")
	waitFor(t, "streams to both copies", func() bool {
		for _, l := range mir.linkSet() {
			if l.conn.Load() == nil {
				return false
			}
		}
		return true
	})
	if err := mir.WriteAt(context.Background(), make([]byte, 4096), 0, blockdev.FUA); err != nil {
		t.Fatal(err)
	}
	if n := seriesWith(t, regA, map[string]string{"lu": "x", "copy": "c"}); n == 0 {
		t.Fatal("no series of the writer's bytes sent to c")
	}
	received := func() int { return testutil.CollectAndCount(nodes["c"].m.metrics.copyReceived) }
	if received() == 0 {
		t.Fatal("c counted no received bytes")
	}

	two := mt.get("x")
	two.Copies, two.Replicas, two.Epoch = 2, two.Replicas[:2], two.Epoch+1
	if err := mt.update(context.Background(), two, two.Epoch-1); err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		sync1(t, n.m)
	}
	if n := seriesWith(t, regA, map[string]string{"lu": "x", "copy": "c"}); n != 0 {
		t.Errorf("the writer still reports %d series of the removed copy", n)
	}
	if n := seriesWith(t, regA, map[string]string{"lu": "x", "copy": "b"}); n == 0 {
		t.Error("the writer lost the series of the remaining copy")
	}
	if n := received(); n != 0 {
		t.Errorf("the removed copy's node still reports %d received-bytes series", n)
	}
	// Its forwarder's series stay: every node exports every LU.
	if n := seriesWith(t, regC, map[string]string{"lu": "x"}); n == 0 {
		t.Error("c lost the series of its forwarder")
	}
}
