package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/lupool/lupool/internal/freeport"
)

// testTimeout bounds every wait in these tests; elections take well under a
// second even under -race on a loaded machine.
const testTimeout = 20 * time.Second

// ports hands out this test binary's peer addresses: distinct, and below
// the ephemeral range so that no node's outgoing connection takes one.
var ports = freeport.New()

// freePort returns a loopback address that was free a moment ago, so that
// a node keeps its peer address across restarts in one test.
func freePort(t *testing.T) string {
	t.Helper()
	a, err := ports.Addr()
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func testOptions(t *testing.T, dir, id string, bootstrap bool) Options {
	return Options{
		Dir:       dir,
		NodeID:    id,
		PeerAddr:  freePort(t),
		APIAddr:   "127.0.0.1:1" + id[len(id)-1:],
		NBDAddr:   "127.0.0.1:2" + id[len(id)-1:],
		Bootstrap: bootstrap,
		Logger:    testLogger(),
	}
}

// testLogger discards logs unless CLUSTER_TEST_LOG is set (to a slog level
// such as DEBUG or WARN), which sends them to stderr.
func testLogger() *slog.Logger {
	level := os.Getenv("CLUSTER_TEST_LOG")
	if level == "" {
		return slog.New(slog.DiscardHandler)
	}
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		l = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: l}))
}

func openNode(t *testing.T, opts Options) *Node {
	t.Helper()
	n, err := Open(opts)
	if err != nil {
		t.Fatalf("Open(%s): %v", opts.NodeID, err)
	}
	t.Cleanup(func() { _ = n.Close() })
	return n
}

// openThree opens n1 (bootstrapped; it leads and records itself), then n2
// and n3, which it adds as voters; opts gives each node's options.
func openThree(t *testing.T, opts func(id string, boot bool) Options) (n1, n2, n3 *Node) {
	t.Helper()
	ctx := ctxT(t)
	n1 = openNode(t, opts("n1", true))
	waitLeaderIs(t, n1)
	if err := n1.RegisterSelf(ctx); err != nil {
		t.Fatal(err)
	}
	n2 = openNode(t, opts("n2", false))
	n3 = openNode(t, opts("n3", false))
	for _, n := range []*Node{n2, n3} {
		if err := n1.AddVoter(ctx, n.ID(), n.PeerAddress(), n.opts.APIAddr, n.opts.NBDAddr, ""); err != nil {
			t.Fatal(err)
		}
	}
	return n1, n2, n3
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	t.Cleanup(cancel)
	return ctx
}

// waitFor polls cond until it holds or the test times out.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(testTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func waitLeaderIs(t *testing.T, n *Node) {
	t.Helper()
	if err := n.WaitLeader(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, n.ID()+" to lead", n.IsLeader)
	// The new leader writes its own record (leaderLoop); wait for it so
	// that tests count only their own commands.
	waitFor(t, n.ID()+" to record itself", func() bool {
		id, api := n.Leader()
		return id == n.ID() && api == n.opts.APIAddr
	})
}

// onLeader runs a write on whichever node leads, retrying when leadership
// moves (a loaded machine can starve heartbeats). After an unknown outcome,
// the error okAfterUnknown (e.g. ErrExists for a create) counts as success.
func onLeader(t *testing.T, nodes []*Node, okAfterUnknown error, fn func(*Node) error) {
	t.Helper()
	unknown := false
	deadline := time.Now().Add(testTimeout)
	for time.Now().Before(deadline) {
		var leader *Node
		for _, n := range nodes {
			if !n.isClosed() && n.IsLeader() {
				leader = n
			}
		}
		if leader == nil {
			time.Sleep(10 * time.Millisecond)
			continue
		}
		err := fn(leader)
		switch {
		case err == nil:
			return
		case unknown && okAfterUnknown != nil && errors.Is(err, okAfterUnknown):
			return
		case errors.Is(err, ErrOutcomeUnknown):
			unknown = true
		case errors.Is(err, ErrNotLeader):
		default:
			t.Fatalf("on leader %s: %v", leader.ID(), err)
		}
		t.Logf("retrying after %v", err)
	}
	t.Fatal("no leader accepted the write in time")
}

// changeLog collects Watch callbacks.
type changeLog struct {
	mu      sync.Mutex
	changes []Change // guarded by mu
}

func (c *changeLog) add(ch Change) {
	c.mu.Lock()
	c.changes = append(c.changes, ch)
	c.mu.Unlock()
}

func (c *changeLog) get() []Change {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]Change(nil), c.changes...)
}

func names(lus []LU) []string {
	var out []string
	for _, lu := range lus {
		out = append(out, lu.Name)
	}
	return out
}

func TestSingleNodeLifecycleAndRestart(t *testing.T) {
	dir := t.TempDir()
	opts := testOptions(t, dir, "n1", true)
	n := openNode(t, opts)
	ctx := ctxT(t)
	waitLeaderIs(t, n)
	if err := n.RegisterSelf(ctx); err != nil {
		t.Fatal(err)
	}
	if id, api := n.Leader(); id != "n1" || api != opts.APIAddr {
		t.Fatalf("Leader() = %q, %q", id, api)
	}
	var seen changeLog
	lus, cancel, err := n.ListAndWatch(seen.add)
	if err != nil || len(lus) != 0 {
		t.Fatalf("ListAndWatch on a fresh node = %v, %v", lus, err)
	}
	defer cancel()

	for _, name := range []string{"zeta", "alpha", "mid.dle_1-x"} {
		if err := n.CreateLU(ctx, LU{Name: name, SizeBytes: 1 << 20, Description: "d-" + name}); err != nil {
			t.Fatalf("CreateLU(%s): %v", name, err)
		}
	}
	lus, err = n.ListLUs()
	if err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(names(lus)); got != "[alpha mid.dle_1-x zeta]" {
		t.Fatalf("ListLUs = %s", got)
	}
	lu, err := n.GetLU("alpha")
	if err != nil {
		t.Fatal(err)
	}
	if lu.Kind != KindFile || lu.Copies != 1 || lu.CreatedOn != "n1" || lu.Writer != "n1" ||
		lu.Epoch != 1 || lu.CreatedAt.IsZero() || lu.Description != "d-alpha" {
		t.Fatalf("defaults not applied: %+v", lu)
	}

	// Bad input changes nothing.
	bad := []struct {
		err error
		do  func() error
	}{
		{ErrExists, func() error { return n.CreateLU(ctx, LU{Name: "alpha", SizeBytes: 512}) }},
		{ErrInvalid, func() error { return n.CreateLU(ctx, LU{Name: "bad name", SizeBytes: 512}) }},
		{ErrInvalid, func() error { return n.CreateLU(ctx, LU{Name: "", SizeBytes: 512}) }},
		{ErrInvalid, func() error { return n.CreateLU(ctx, LU{Name: string(make([]byte, 129)), SizeBytes: 512}) }},
		{ErrInvalid, func() error { return n.CreateLU(ctx, LU{Name: "x", SizeBytes: 1000}) }},
		{ErrInvalid, func() error { return n.CreateLU(ctx, LU{Name: "x", SizeBytes: 0}) }},
		{ErrInvalid, func() error { return n.CreateLU(ctx, LU{Name: "x", SizeBytes: 512, Copies: -1}) }},
		{ErrInvalid, func() error { return n.CreateLU(ctx, LU{Name: "x", SizeBytes: 512, Kind: "tape"}) }},
		{ErrNotFound, func() error { return n.ResizeLU(ctx, "nope", 512) }},
		{ErrInvalid, func() error { return n.ResizeLU(ctx, "alpha", 513) }},
		{ErrNotFound, func() error { return n.DeleteLU(ctx, "nope") }},
		{ErrNotFound, func() error { _, err := n.GetLU("nope"); return err }},
	}
	for i, b := range bad {
		if err := b.do(); !errors.Is(err, b.err) {
			t.Errorf("bad input %d: %v, want %v", i, err, b.err)
		}
	}
	if err := n.ResizeLU(ctx, "alpha", 4<<20); err != nil {
		t.Fatal(err)
	}
	if err := n.DeleteLU(ctx, "zeta"); err != nil {
		t.Fatal(err)
	}
	if err := n.SetSetting(ctx, "overcommit", "1.5"); err != nil {
		t.Fatal(err)
	}
	got := seen.get()
	wantKinds := []ChangeKind{Created, Created, Created, Resized, Deleted}
	if len(got) != len(wantKinds) {
		t.Fatalf("watch saw %d changes, want %d: %+v", len(got), len(wantKinds), got)
	}
	for i, c := range got {
		if c.Kind != wantKinds[i] || (i > 0 && c.Index <= got[i-1].Index) {
			t.Fatalf("change %d = %v at %d (previous at %d)", i, c.Kind, c.Index, got[max(i-1, 0)].Index)
		}
	}
	if got[3].LU.SizeBytes != 4<<20 || got[4].LU.Name != "zeta" {
		t.Fatalf("change contents: %+v", got)
	}
	waitPrimaryEvent(t, n)
	before := n.Stats()
	if before.LUs != 2 || before.FSMIndex == 0 || before.Rejected != 0 {
		t.Fatalf("stats before restart: %+v", before)
	}
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := n.ListLUs(); !errors.Is(err, ErrClosed) {
		t.Fatalf("ListLUs after Close: %v", err)
	}

	// Restart: the table is intact and old entries are skipped, not re-applied.
	n2 := openNode(t, opts)
	var seen2 changeLog
	lus, cancel2, err := n2.ListAndWatch(seen2.add)
	if err != nil {
		t.Fatal(err)
	}
	defer cancel2()
	if got := fmt.Sprint(names(lus)); got != "[alpha mid.dle_1-x]" {
		t.Fatalf("after restart ListLUs = %s", got)
	}
	waitLeaderIs(t, n2)
	if err := n2.Barrier(ctx); err != nil {
		t.Fatal(err)
	}
	// The one new entry is the restarted primary's PrimaryElected event.
	waitPrimaryEvent(t, n2)
	after := n2.Stats()
	if after.FSMIndex <= before.FSMIndex {
		t.Fatalf("FSM index %d after restart, %d before (PrimaryElected comes after)", after.FSMIndex, before.FSMIndex)
	}
	if after.AppliedSinceOpen != 1 || after.SkippedSinceOpen == 0 {
		t.Fatalf("after restart applied %d, skipped %d; want 1 applied (PrimaryElected), some skipped", after.AppliedSinceOpen, after.SkippedSinceOpen)
	}
	if c := seen2.get(); len(c) != 0 {
		t.Fatalf("watch after restart saw %+v", c)
	}
	if v, ok, err := n2.Setting("overcommit"); err != nil || !ok || v != "1.5" {
		t.Fatalf("setting after restart = %q, %v, %v", v, ok, err)
	}
	if lu, err := n2.GetLU("alpha"); err != nil || lu.SizeBytes != 4<<20 {
		t.Fatalf("alpha after restart = %+v, %v", lu, err)
	}
	// New writes continue after the old index.
	if err := n2.CreateLU(ctx, LU{Name: "after", SizeBytes: 512}); err != nil {
		t.Fatal(err)
	}
	if c := seen2.get(); len(c) != 1 || c[0].Index <= before.FSMIndex {
		t.Fatalf("watch after a new create: %+v", c)
	}
}

// TestSnapshotCompactionRestart makes raft snapshot and truncate its log,
// then restarts: the table survives and nothing is re-applied.
func TestSnapshotCompactionRestart(t *testing.T) {
	dir := t.TempDir()
	opts := testOptions(t, dir, "n1", true)
	opts.SnapshotThreshold = 4
	opts.TrailingLogs = 2
	n := openNode(t, opts)
	ctx := ctxT(t)
	waitLeaderIs(t, n)
	for i := 0; i < 20; i++ {
		if err := n.CreateLU(ctx, LU{Name: fmt.Sprintf("lu%02d", i), SizeBytes: 512 * int64(i+1)}); err != nil {
			t.Fatal(err)
		}
	}
	if err := n.Snapshot(); err != nil {
		t.Fatal(err)
	}
	first, err := n.storeFirstIndex()
	if err != nil {
		t.Fatal(err)
	}
	if first < 10 {
		t.Fatalf("log not compacted: first index %d", first)
	}
	// Entries after the snapshot: restoring the snapshot on start would
	// roll the state back and apply these again.
	for i := 20; i < 23; i++ {
		if err := n.CreateLU(ctx, LU{Name: fmt.Sprintf("lu%02d", i), SizeBytes: 512 * int64(i+1)}); err != nil {
			t.Fatal(err)
		}
	}
	waitPrimaryEvent(t, n)
	before := n.Stats()
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	n2 := openNode(t, opts)
	waitLeaderIs(t, n2)
	waitPrimaryEvent(t, n2)
	if err := n2.Barrier(ctx); err != nil {
		t.Fatal(err)
	}
	lus, err := n2.ListLUs()
	if err != nil || len(lus) != 23 || lus[19].SizeBytes != 512*20 {
		t.Fatalf("after restart: %d LUs, %v", len(lus), err)
	}
	st := n2.Stats()
	// The one command applied is the restarted primary's PrimaryElected.
	if st.FSMIndex <= before.FSMIndex || st.AppliedSinceOpen != 1 {
		t.Fatalf("after restart: %+v; before %+v", st, before)
	}
}

// TestCrashWhileWriting takes crash images of the file system while
// creates are in flight; every acknowledged create is in every image and
// the state machine's index never goes back.
func TestCrashWhileWriting(t *testing.T) {
	fs := vfs.NewCrashableMem()
	dir := t.TempDir()
	opts := testOptions(t, dir, "n1", true)
	opts.FS = fs
	n := openNode(t, opts)
	ctx := ctxT(t)
	waitLeaderIs(t, n)

	var mu sync.Mutex
	acked := map[string]bool{} // guarded by mu
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < 60; i++ {
			name := fmt.Sprintf("c%03d", i)
			if err := n.CreateLU(ctx, LU{Name: name, SizeBytes: 512}); err != nil {
				t.Errorf("CreateLU(%s): %v", name, err)
				return
			}
			mu.Lock()
			acked[name] = true
			mu.Unlock()
		}
	}()
	images := 4
	if testing.Short() {
		images = 2
	}
	var lastIndex uint64
	for img := 0; img < images; img++ {
		time.Sleep(30 * time.Millisecond)
		mu.Lock()
		want := make([]string, 0, len(acked))
		for name := range acked {
			want = append(want, name)
		}
		mu.Unlock()
		clone := fs.CrashClone(vfs.CrashCloneCfg{})
		copts := opts
		copts.FS = clone
		copts.Dir = dir                // same paths inside the image; snapshots are on the OS and unused here
		copts.PeerAddr = "127.0.0.1:0" // the original still holds its port
		c := openNode(t, copts)
		for _, name := range want {
			if _, err := c.GetLU(name); err != nil {
				t.Fatalf("image %d: acknowledged %s missing: %v", img, name, err)
			}
		}
		st := c.Stats()
		if st.FSMIndex < lastIndex {
			t.Fatalf("image %d: FSM index %d went back from %d", img, st.FSMIndex, lastIndex)
		}
		lastIndex = st.FSMIndex
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
	}
	<-done
}

// TestAppendedNotApplied simulates a crash after an entry reached the log
// but before the state machine applied it: on restart it is applied once.
func TestAppendedNotApplied(t *testing.T) {
	fs := vfs.NewCrashableMem()
	dir := t.TempDir()
	opts := testOptions(t, dir, "n1", true)
	opts.FS = fs
	n := openNode(t, opts)
	ctx := ctxT(t)
	waitLeaderIs(t, n)
	if err := n.CreateLU(ctx, LU{Name: "a", SizeBytes: 512}); err != nil {
		t.Fatal(err)
	}
	term := n.Stats().Term
	before := n.Stats().FSMIndex
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	lu := withDefaults(LU{Name: "b", SizeBytes: 1024}, "n1")
	if err := appendRawCommand(fs, dir, term, &command{Type: cmdCreateLU, At: time.Unix(1_800_000_000, 0).UTC(), LU: &lu}); err != nil {
		t.Fatal(err)
	}
	opts.FS = fs.CrashClone(vfs.CrashCloneCfg{})
	n2 := openNode(t, opts)
	var seen changeLog
	lus, cancel, err := n2.ListAndWatch(seen.add)
	if err != nil {
		t.Fatal(err)
	}
	defer cancel()
	if len(lus) != 1 || lus[0].Name != "a" {
		t.Fatalf("before election: %v", names(lus))
	}
	waitLeaderIs(t, n2)
	if err := n2.Barrier(ctx); err != nil {
		t.Fatal(err)
	}
	got := seen.get()
	if len(got) != 1 || got[0].Kind != Created || got[0].LU.Name != "b" || got[0].Index <= before {
		t.Fatalf("changes after restart: %+v", got)
	}
	b, err := n2.GetLU("b")
	if err != nil || !b.CreatedAt.Equal(time.Unix(1_800_000_000, 0)) {
		t.Fatalf("b = %+v, %v (CreatedAt must come from the command)", b, err)
	}
	waitPrimaryEvent(t, n2)
	// The event is readable a moment before the apply that wrote it is
	// counted.
	waitFor(t, "two commands counted as applied", func() bool { return n2.Stats().AppliedSinceOpen >= 2 })
	if st := n2.Stats(); st.AppliedSinceOpen != 2 {
		t.Fatalf("applied %d commands after restart, want 2 (the appended create and PrimaryElected)", st.AppliedSinceOpen)
	}
}

func TestThreeNodes(t *testing.T) {
	ctx := ctxT(t)
	o1 := testOptions(t, t.TempDir(), "n1", true)
	o1.SnapshotThreshold = 4
	o1.TrailingLogs = 2
	n1 := openNode(t, o1)
	waitLeaderIs(t, n1)
	if err := n1.RegisterSelf(ctx); err != nil {
		t.Fatal(err)
	}
	n2 := openNode(t, testOptions(t, t.TempDir(), "n2", false))
	n3 := openNode(t, testOptions(t, t.TempDir(), "n3", false))
	all := []*Node{n1, n2, n3}
	onLeader(t, all, nil, func(l *Node) error {
		return l.AddVoter(ctx, "n2", n2.PeerAddress(), n2.opts.APIAddr, n2.opts.NBDAddr, "")
	})
	for i := 0; i < 12; i++ {
		onLeader(t, all, ErrExists, func(l *Node) error {
			// The writer (the leader, which creates) first, then the other member.
			other := map[string]string{"n1": "n2", "n2": "n1"}[l.ID()]
			return l.CreateLU(ctx, LU{Name: fmt.Sprintf("lu%02d", i), SizeBytes: 1 << 20, Copies: 2,
				Replicas: []Replica{{NodeID: l.ID(), State: ReplicaInSync}, {NodeID: other, State: ReplicaInSync}}})
		})
	}
	// n3 joins after a compaction, so it catches up from a snapshot.
	if err := n1.Snapshot(); err != nil {
		t.Fatal(err)
	}
	var seen3 changeLog
	_, cancel3, err := n3.ListAndWatch(seen3.add)
	if err != nil {
		t.Fatal(err)
	}
	defer cancel3()
	onLeader(t, all, nil, func(l *Node) error {
		return l.AddVoter(ctx, "n3", n3.PeerAddress(), n3.opts.APIAddr, n3.opts.NBDAddr, "")
	})
	for _, f := range all {
		waitFor(t, f.ID()+" to see 12 LUs", func() bool {
			lus, err := f.ListLUs()
			return err == nil && len(lus) == 12
		})
		if f.IsLeader() {
			continue
		}
		if err := f.CreateLU(ctx, LU{Name: "x", SizeBytes: 512}); !errors.Is(err, ErrNotLeader) {
			t.Fatalf("CreateLU on follower %s: %v", f.ID(), err)
		}
		// The leader's record carries its API address (n1 registered itself,
		// AddVoter recorded the others), whoever leads now.
		waitFor(t, f.ID()+" to know the leader's API address", func() bool {
			id, api := f.Leader()
			return id != "" && api == "127.0.0.1:1"+id[1:]
		})
	}
	// Watchers run just after the commit that made the LUs visible.
	waitFor(t, "n3's watch to see 12 creates", func() bool { return len(seen3.get()) >= 12 })
	for _, c := range seen3.get() {
		if c.Kind != Created {
			t.Fatalf("n3 watch saw %+v, want only creates", c)
		}
	}
	// n2 applies n3's record shortly after the leader does.
	var nodes []NodeInfo
	waitFor(t, "n2 to list 3 nodes with addresses", func() bool {
		nodes, err = n2.Nodes()
		return err == nil && len(nodes) == 3 && nodes[2].NBDAddr == n3.opts.NBDAddr
	})
	leaders := 0
	for _, ni := range nodes {
		if ni.Suffrage != "voter" || ni.APIAddr != "127.0.0.1:1"+ni.ID[1:] || ni.UpdatedAt.IsZero() {
			t.Fatalf("Nodes() = %+v", nodes)
		}
		if ni.Leader {
			leaders++
		}
	}
	if leaders != 1 {
		t.Fatalf("Nodes() has %d leaders: %+v", leaders, nodes)
	}

	// Kill the leader: one of the others takes over with the table intact.
	var old *Node
	waitFor(t, "a leader", func() bool {
		for _, f := range all {
			if f.IsLeader() {
				old = f
				return true
			}
		}
		return false
	})
	if err := old.Close(); err != nil {
		t.Fatal(err)
	}
	var rest []*Node
	for _, f := range all {
		if f != old {
			rest = append(rest, f)
		}
	}
	onLeader(t, rest, ErrExists, func(l *Node) error {
		return l.CreateLU(ctx, LU{Name: "after-failover", SizeBytes: 512})
	})
	for _, f := range rest {
		waitFor(t, f.ID()+" to see 13 LUs", func() bool {
			lus, err := f.ListLUs()
			return err == nil && len(lus) == 13
		})
	}
	if lu, err := rest[1].GetLU("lu05"); err != nil || lu.Copies != 2 {
		t.Fatalf("lu05 on %s = %+v, %v", rest[1].ID(), lu, err)
	}

	// Remove the dead node: membership and records shrink to the two left.
	onLeader(t, rest, nil, func(l *Node) error { return l.RemoveServer(ctx, old.ID()) })
	for _, f := range rest {
		waitFor(t, f.ID()+" to list 2 nodes", func() bool {
			nodes, err := f.Nodes()
			if err != nil || len(nodes) != 2 {
				return false
			}
			for _, ni := range nodes {
				if ni.ID == old.ID() {
					return false
				}
			}
			return true
		})
	}
}

// TestFollowerRestartAfterCompaction stops a follower, changes the table
// while the leader compacts its log past the follower's index, and restarts
// the follower: it installs a snapshot over its existing state, and its
// watchers see exactly the difference.
func TestFollowerRestartAfterCompaction(t *testing.T) {
	ctx := ctxT(t)
	o1 := testOptions(t, t.TempDir(), "n1", true)
	o1.SnapshotThreshold = 4
	o1.TrailingLogs = 2
	n1 := openNode(t, o1)
	waitLeaderIs(t, n1)
	n2 := openNode(t, testOptions(t, t.TempDir(), "n2", false))
	o3 := testOptions(t, t.TempDir(), "n3", false)
	n3 := openNode(t, o3)
	all := []*Node{n1, n2, n3}
	for _, f := range []*Node{n2, n3} {
		onLeader(t, all, nil, func(l *Node) error {
			return l.AddVoter(ctx, f.ID(), f.PeerAddress(), f.opts.APIAddr, f.opts.NBDAddr, "")
		})
	}
	for _, name := range []string{"keep", "grow", "drop"} {
		onLeader(t, all, ErrExists, func(l *Node) error { return l.CreateLU(ctx, LU{Name: name, SizeBytes: 1 << 20}) })
	}
	waitFor(t, "n3 to see 3 LUs", func() bool { lus, _ := n3.ListLUs(); return len(lus) == 3 })
	if err := n3.Close(); err != nil {
		t.Fatal(err)
	}
	up := []*Node{n1, n2}
	onLeader(t, up, nil, func(l *Node) error { return l.ResizeLU(ctx, "grow", 2<<20) })
	onLeader(t, up, ErrNotFound, func(l *Node) error { return l.DeleteLU(ctx, "drop") })
	for i := 0; i < 8; i++ {
		onLeader(t, up, ErrExists, func(l *Node) error {
			return l.CreateLU(ctx, LU{Name: fmt.Sprintf("new%d", i), SizeBytes: 512})
		})
	}
	if err := n1.Snapshot(); err != nil {
		t.Fatal(err)
	}
	if first, err := n1.storeFirstIndex(); err != nil || first <= n3.fsm.applied.Load() {
		t.Fatalf("leader log starts at %d (%v); n3 stopped at %d: no snapshot would be needed", first, err, n3.fsm.applied.Load())
	}

	n3 = openNode(t, o3)
	var seen changeLog
	_, cancel, err := n3.ListAndWatch(seen.add)
	if err != nil {
		t.Fatal(err)
	}
	defer cancel()
	waitFor(t, "n3 to catch up", func() bool {
		lus, _ := n3.ListLUs()
		return len(lus) == 10 && n3.fsm.applied.Load() >= max(n1.fsm.applied.Load(), n2.fsm.applied.Load())
	})
	if lu, err := n3.GetLU("grow"); err != nil || lu.SizeBytes != 2<<20 {
		t.Fatalf("grow on n3 = %+v, %v", lu, err)
	}
	waitFor(t, "n3's watch to see 10 changes", func() bool { return len(seen.get()) >= 10 })
	kinds := map[string]ChangeKind{}
	for _, c := range seen.get() {
		kinds[c.LU.Name] = c.Kind
	}
	if kinds["grow"] != Resized || kinds["drop"] != Deleted || kinds["new7"] != Created || len(kinds) != 10 {
		t.Fatalf("n3 changes: %v", kinds)
	}
	if _, ok := kinds["keep"]; ok {
		t.Fatalf("unchanged LU reported: %v", kinds)
	}
}

// BenchmarkCreateLU measures one create through a one-node cluster on the
// OS file system: propose, append (fsync), commit, apply (fsync).
func BenchmarkCreateLU(b *testing.B) {
	opts := Options{Dir: b.TempDir(), NodeID: "n1", PeerAddr: "127.0.0.1:0", Bootstrap: true, Logger: testLogger()}
	n, err := Open(opts)
	if err != nil {
		b.Fatal(err)
	}
	defer n.Close()
	ctx := context.Background()
	deadline := time.Now().Add(testTimeout)
	for !n.IsLeader() && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := n.CreateLU(ctx, LU{Name: fmt.Sprintf("b%08d", i), SizeBytes: 1 << 30}); err != nil {
			b.Fatal(err)
		}
	}
}

// TestStateOlderThanSnapshot: raft stored a snapshot and compacted its log,
// but the state machine in Pebble is older (a follower crashed after
// storing an installed snapshot, before applying it). Open must restore
// the snapshot, or the compacted entries would be lost for good.
func TestStateOlderThanSnapshot(t *testing.T) {
	dir := t.TempDir()
	opts := testOptions(t, dir, "n1", true)
	opts.SnapshotThreshold = 2
	opts.TrailingLogs = 1
	n := openNode(t, opts)
	ctx := ctxT(t)
	waitLeaderIs(t, n)
	for i := 0; i < 6; i++ {
		if err := n.CreateLU(ctx, LU{Name: fmt.Sprintf("lu%d", i), SizeBytes: 512}); err != nil {
			t.Fatal(err)
		}
	}
	if err := n.Snapshot(); err != nil {
		t.Fatal(err)
	}
	first, err := n.storeFirstIndex()
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	// Roll the state machine back to before lu3..lu5.
	if _, err := rollBackState(dir, []string{"lu3", "lu4", "lu5"}, first-1); err != nil {
		t.Fatal(err)
	}
	n2 := openNode(t, opts)
	waitLeaderIs(t, n2)
	if err := n2.Barrier(ctx); err != nil {
		t.Fatal(err)
	}
	lus, err := n2.ListLUs()
	if err != nil || len(lus) != 6 {
		t.Fatalf("after reopen: %v, %v; want lu0..lu5", names(lus), err)
	}
}
