package replication

import (
	"context"
	"testing"
	"time"

	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/internal/copyset"
)

// TestCopyLossHoldsLaterWrites: once a copy is recorded out of sync, no
// write is acknowledged before the copy's read lease has run out, not
// even one started after the record (which never goes to the copy): the
// copy may still serve reads of the old data on that lease
// (copyset.AckAfterCopyLoss; testdata/unsafe_hold_missed_only in package
// copyset shows the stale read otherwise).
func TestCopyLossHoldsLaterWrites(t *testing.T) {
	const lease = 800 * time.Millisecond
	mt, nodes := newTestClusterOpts(t, func(o *ManagerOptions) {
		o.ReadLease, o.AckTimeout = lease, 300*time.Millisecond
	}, "a", "b", "c")
	rec := twoCopies("h", 1<<20, "memory")
	rec.Copies = 3
	rec.Replicas = append(rec.Replicas, cluster.Replica{NodeID: "c", State: cluster.ReplicaInSync})
	mt.create(t, rec)
	mir := streamingMirror(t, nodes["a"].m, "h")
	waitFor(t, "streams to both copies", func() bool {
		for _, l := range mir.linkSet() {
			if l.conn.Load() == nil {
				return false
			}
		}
		return true
	})
	ctx := context.Background()
	p := make([]byte, 4096)
	if err := mir.WriteAt(ctx, p, 0, 0); err != nil {
		t.Fatal(err)
	}
	var lc *copyLink
	for _, l := range mir.linkSet() {
		if l.node == "c" {
			lc = l
		}
	}
	nodes["c"].down()
	first := make(chan error, 1)
	go func() { first <- mir.WriteAt(ctx, p, 4096, 0) }()
	waitFor(t, "c recorded out of sync", func() bool { return copyState(lc.state.Load()) == stOutOfSync })
	holdEnd := copyset.AckAfterCopyLoss(copyset.Params{ReadLease: lease}, lc.lastAck.Load(), 0, false)
	if err := mir.WriteAt(ctx, p, 8192, 0); err != nil {
		t.Fatal(err)
	}
	ackedAt := mir.m.now()
	if ackedAt < holdEnd {
		t.Fatalf("a write started after c was recorded out of sync was acknowledged %v before c's lease ran out",
			time.Duration(holdEnd-ackedAt))
	}
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	t.Logf("the later write waited until %v after c's last answer", time.Duration(ackedAt-lc.lastAck.Load()).Round(time.Millisecond))
}

// TestCopyLeaseFromEchoOnly: a copy's read lease runs from its own ping
// answer times that the writer echoed, never from a frame's arrival: a
// frame answered now does not renew it, an old echo renews it only until
// ReadLease after that old time, and an echo from the future (another run
// of this node) is ignored.
func TestCopyLeaseFromEchoOnly(t *testing.T) {
	_, nodes := newTestClusterOpts(t, func(o *ManagerOptions) { o.ReadLease = 300 * time.Millisecond }, "a")
	m := nodes["a"].m
	m.answeredWriter("x")
	if m.leaseValid("x") {
		t.Fatal("answering a frame gave the copy a lease")
	}
	old := m.now()
	time.Sleep(350 * time.Millisecond)
	m.renewLeaseFrom("x", old)
	if m.leaseValid("x") {
		t.Fatal("an echo older than the lease renewed it")
	}
	m.renewLeaseFrom("x", m.now()+int64(time.Hour))
	if m.leaseValid("x") {
		t.Fatal("an echo from the future renewed the lease")
	}
	m.renewLeaseFrom("x", m.now())
	if !m.leaseValid("x") {
		t.Fatal("a fresh echo did not renew the lease")
	}
	time.Sleep(350 * time.Millisecond)
	if m.leaseValid("x") {
		t.Fatal("the lease outlived ReadLease after its echo")
	}
}
