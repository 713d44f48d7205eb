package raftpebble

import (
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"

	"github.com/lupool/lupool/internal/testseed"
)

// listFSM records every applied command in order.
type listFSM struct {
	mu      sync.Mutex
	entries []string // guarded by mu
}

func (f *listFSM) Apply(l *raft.Log) any {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.entries = append(f.entries, string(l.Data))
	return nil
}

func (f *listFSM) Snapshot() (raft.FSMSnapshot, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return listSnapshot(strings.Join(f.entries, "\n")), nil
}

func (f *listFSM) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.entries = nil
	if len(b) > 0 {
		f.entries = strings.Split(string(b), "\n")
	}
	return nil
}

func (f *listFSM) list() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.entries...)
}

type listSnapshot string

func (s listSnapshot) Persist(sink raft.SnapshotSink) error {
	if _, err := sink.Write([]byte(s)); err != nil {
		_ = sink.Cancel()
		return err
	}
	return sink.Close()
}
func (s listSnapshot) Release() {}

// raftNode is one member of the in-process cluster: its Pebble lives on a
// crashable MemFS so a restart can be a crash.
type raftNode struct {
	id    raft.ServerID
	addr  raft.ServerAddress
	fs    *vfs.MemFS
	db    *pebble.DB
	trans *raft.InmemTransport
	// snaps survives restarts, as a disk would. raft's in-memory store is
	// not used: it lets a leader read a snapshot that is still being
	// written (a data race, and a follower that never catches up).
	snaps raft.SnapshotStore
	fsm   *listFSM
	raft  *raft.Raft
}

func raftConfig(id raft.ServerID) *raft.Config {
	c := raft.DefaultConfig()
	c.LocalID = id
	c.HeartbeatTimeout = 100 * time.Millisecond
	c.ElectionTimeout = 100 * time.Millisecond
	c.LeaderLeaseTimeout = 100 * time.Millisecond
	c.CommitTimeout = 5 * time.Millisecond
	c.SnapshotThreshold = 16
	c.SnapshotInterval = 100 * time.Millisecond
	c.TrailingLogs = 8
	c.Logger = hclog.NewNullLogger()
	return c
}

func (n *raftNode) start(t *testing.T, bootstrap *raft.Configuration) {
	t.Helper()
	db, err := pebble.Open("db", &pebble.Options{FS: n.fs, Logger: quietLogger{t}})
	if err != nil {
		t.Fatal(err)
	}
	n.db = db
	s := newStore(t, db)
	n.fsm = &listFSM{}
	_, n.trans = raft.NewInmemTransport(n.addr)
	if bootstrap != nil {
		if err := raft.BootstrapCluster(raftConfig(n.id), s, s, n.snaps, n.trans, *bootstrap); err != nil {
			t.Fatal(err)
		}
	}
	if n.raft, err = raft.NewRaft(raftConfig(n.id), n.fsm, s, s, n.snaps, n.trans); err != nil {
		t.Fatal(err)
	}
}

// crash stops raft and replaces the file system with a crash image.
func (n *raftNode) crash(t *testing.T, rng *rand.Rand) {
	t.Helper()
	if err := n.raft.Shutdown().Error(); err != nil {
		t.Fatal(err)
	}
	img := n.fs.CrashClone(vfs.CrashCloneCfg{UnsyncedDataPercent: rng.IntN(50), RNG: rng})
	_ = n.db.Close()
	n.fs = img
}

func connectAll(nodes []*raftNode) {
	for _, a := range nodes {
		for _, b := range nodes {
			if a != b {
				a.trans.Connect(b.addr, b.trans)
			}
		}
	}
}

func isolate(nodes []*raftNode, x *raftNode) {
	x.trans.DisconnectAll()
	for _, o := range nodes {
		if o != x {
			o.trans.Disconnect(x.addr)
		}
	}
}

func leaderOf(nodes []*raftNode, among func(*raftNode) bool) *raftNode {
	for _, n := range nodes {
		if among(n) && n.raft.State() == raft.Leader {
			return n
		}
	}
	return nil
}

// TestRaftOnPebbleUnderFaults runs hashicorp/raft on three Pebble stores
// through leader isolation (the old leader appends entries that are later
// truncated), crashes with restarts, snapshots and compaction, and checks
// that every node ends with the same history holding each acknowledged
// command exactly once.
func TestRaftOnPebbleUnderFaults(t *testing.T) {
	// A seed replays the same fault schedule; raft's own timing still
	// varies from run to run.
	seed := testseed.Seed(t, "./cluster/raftpebble/")
	rng := rand.New(rand.NewPCG(seed, 11))
	var nodes []*raftNode
	var conf raft.Configuration
	for i := 0; i < 3; i++ {
		n := &raftNode{id: raft.ServerID(fmt.Sprintf("r%d", i)), addr: raft.ServerAddress(fmt.Sprintf("r%d", i)),
			fs: vfs.NewCrashableMem()}
		snaps, err := raft.NewFileSnapshotStore(t.TempDir(), 2, io.Discard)
		if err != nil {
			t.Fatal(err)
		}
		n.snaps = snaps
		nodes = append(nodes, n)
		conf.Servers = append(conf.Servers, raft.Server{Suffrage: raft.Voter, ID: n.id, Address: n.addr})
	}
	for i, n := range nodes {
		if i == 0 {
			n.start(t, &conf)
		} else {
			n.start(t, nil)
		}
	}
	connectAll(nodes)
	defer func() {
		for _, n := range nodes {
			_ = n.raft.Shutdown().Error()
			_ = n.db.Close()
		}
	}()

	waitLeader := func(among func(*raftNode) bool) *raftNode {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for time.Now().Before(deadline) {
			if l := leaderOf(nodes, among); l != nil {
				return l
			}
			time.Sleep(10 * time.Millisecond)
		}
		t.Fatal("no leader")
		return nil
	}
	all := func(*raftNode) bool { return true }
	acked := map[string]bool{}
	seq := 0
	apply := func(l *raftNode, count int) {
		var futures []raft.ApplyFuture
		var cmds []string
		for i := 0; i < count; i++ {
			seq++
			cmd := fmt.Sprintf("c%05d", seq)
			cmds = append(cmds, cmd)
			futures = append(futures, l.raft.Apply([]byte(cmd), time.Second))
		}
		// hashicorp/raft sometimes never resolves a future whose leader
		// lost its lead under these faults (seen about once in three
		// runs on a loaded machine). Such a command is not acknowledged:
		// it must appear at most once, like any other, and the cluster
		// must still agree on one history (checked below); a cluster that
		// makes no progress fails at the final barrier.
		deadline := time.After(30 * time.Second)
		for i, f := range futures {
			res := make(chan error, 1)
			go func() { res <- f.Error() }()
			select {
			case err := <-res:
				if err == nil {
					acked[cmds[i]] = true
				}
			case <-deadline:
				t.Logf("commands %s..%s on leader %s: no result after 30 s; counted as not acknowledged", cmds[i], cmds[len(cmds)-1], l.id)
				return
			}
		}
	}
	rounds := 12
	if testing.Short() {
		rounds = 5
	}
	for round := 0; round < rounds; round++ {
		l := waitLeader(all)
		apply(l, 10+rng.IntN(20))
		switch rng.IntN(2) {
		case 0: // isolate the leader: it appends entries nobody commits
			isolate(nodes, l)
			for i := 0; i < 5; i++ {
				l.raft.Apply([]byte(fmt.Sprintf("lost-%d-%d", round, i)), 0)
			}
			nl := waitLeader(func(n *raftNode) bool { return n != l })
			apply(nl, 10+rng.IntN(10))
			connectAll(nodes)
		case 1: // crash and restart a random node
			victim := nodes[rng.IntN(len(nodes))]
			victim.crash(t, rng)
			victim.start(t, nil)
			connectAll(nodes)
		}
	}
	// The reconnected nodes may still hold an election: retry the final
	// barrier on whoever leads until one leader holds through it.
	var l *raftNode
	for attempt := 0; ; attempt++ {
		l = waitLeader(all)
		apply(l, 5)
		err := l.raft.Barrier(10 * time.Second).Error()
		if err == nil {
			break
		}
		if !errors.Is(err, raft.ErrNotLeader) && !errors.Is(err, raft.ErrLeadershipLost) || attempt == 10 {
			t.Fatalf("final barrier on %s (attempt %d): %v", l.id, attempt+1, err)
		}
	}
	want := l.fsm.list()
	deadline := time.Now().Add(30 * time.Second)
	for _, n := range nodes {
		for fmt.Sprint(n.fsm.list()) != fmt.Sprint(want) {
			if time.Now().After(deadline) {
				got := n.fsm.list()
				t.Fatalf("%s has %d entries, leader %s has %d", n.id, len(got), l.id, len(want))
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	seen := map[string]int{}
	for _, e := range want {
		if strings.HasPrefix(e, "lost-") {
			t.Fatalf("%s, appended by an isolated leader, was applied", e)
		}
		seen[e]++
		if seen[e] > 1 {
			t.Fatalf("%s applied twice", e)
		}
	}
	for cmd := range acked {
		if seen[cmd] != 1 {
			t.Fatalf("acknowledged %s is missing from the history", cmd)
		}
	}
	t.Logf("%d acknowledged, %d in the history", len(acked), len(want))
}
