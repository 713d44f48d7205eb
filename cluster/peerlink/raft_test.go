package peerlink

import (
	"bytes"
	"io"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
)

// memFSM is an in-memory raft FSM: the applied commands in order.
type memFSM struct {
	mu      sync.Mutex
	applied [][]byte // guarded by mu
}

var _ raft.FSM = (*memFSM)(nil)

func (m *memFSM) Apply(l *raft.Log) any {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.applied = append(m.applied, append([]byte(nil), l.Data...))
	return len(m.applied)
}

func (m *memFSM) Snapshot() (raft.FSMSnapshot, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return &memSnapshot{data: bytes.Join(m.applied, []byte{'\n'})}, nil
}

func (m *memFSM) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.applied = bytes.Split(b, []byte{'\n'})
	return nil
}

func (m *memFSM) has(cmd string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, a := range m.applied {
		if string(a) == cmd {
			return true
		}
	}
	return false
}

type memSnapshot struct{ data []byte }

func (s *memSnapshot) Persist(sink raft.SnapshotSink) error {
	if _, err := sink.Write(s.data); err != nil {
		sink.Cancel()
		return err
	}
	return sink.Close()
}

func (s *memSnapshot) Release() {}

// TestRaftOverLink: two hashicorp/raft nodes whose NetworkTransports run
// over Link.Raft() elect a leader and replicate an Apply.
func TestRaftOverLink(t *testing.T) {
	f := newFixture(t)
	ids := []string{"A", "B"}
	links := map[string]*Link{}
	var servers []raft.Server
	for _, id := range ids {
		links[id] = f.listen(t, id, nil)
		servers = append(servers, raft.Server{Suffrage: raft.Voter, ID: raft.ServerID(id), Address: raft.ServerAddress(links[id].Addr())})
	}
	nodes, fsms := map[string]*raft.Raft{}, map[string]*memFSM{}
	for _, id := range ids {
		logger := hclog.New(&hclog.LoggerOptions{Name: "raft-" + id, Output: io.Discard})
		cfg := raft.DefaultConfig()
		cfg.LocalID = raft.ServerID(id)
		cfg.HeartbeatTimeout = 200 * time.Millisecond
		cfg.ElectionTimeout = 200 * time.Millisecond
		cfg.LeaderLeaseTimeout = 100 * time.Millisecond
		cfg.CommitTimeout = 10 * time.Millisecond
		cfg.Logger = logger
		trans := raft.NewNetworkTransportWithConfig(&raft.NetworkTransportConfig{
			Stream: links[id].Raft(), MaxPool: 3, Timeout: 2 * time.Second, Logger: logger,
		})
		logs, stable, snaps := raft.NewInmemStore(), raft.NewInmemStore(), raft.NewInmemSnapshotStore()
		if err := raft.BootstrapCluster(cfg, logs, stable, snaps, trans, raft.Configuration{Servers: servers}); err != nil {
			t.Fatal(err)
		}
		fsms[id] = &memFSM{}
		r, err := raft.NewRaft(cfg, fsms[id], logs, stable, snaps, trans)
		if err != nil {
			t.Fatal(err)
		}
		nodes[id] = r
		t.Cleanup(func() {
			r.Shutdown().Error()
			trans.Close()
		})
	}
	var leader *raft.Raft
	waitFor(t, "a leader", func() bool {
		for _, r := range nodes {
			if r.State() == raft.Leader {
				leader = r
				return true
			}
		}
		return false
	})
	if err := leader.Apply([]byte("hello over mTLS"), 5*time.Second).Error(); err != nil {
		t.Fatalf("Apply: %v", err)
	}
	for _, id := range ids {
		waitFor(t, "node "+id+" to apply", func() bool { return fsms[id].has("hello over mTLS") })
	}
	// The leader dials its follower; the follower accepted raft connections.
	for _, id := range ids {
		s := links[id].Stats()
		if s.HandshakeFailed != 0 || s.HTTP != 0 || s.BadFirstByte != 0 {
			t.Errorf("node %s stats %+v, want raft connections only", id, s)
		}
		if nodes[id] != leader && s.Raft == 0 {
			t.Errorf("follower %s accepted no raft connection (stats %+v)", id, s)
		}
	}
}
