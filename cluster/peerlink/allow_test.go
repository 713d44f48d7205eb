package peerlink

import (
	"io"
	"sync"
	"testing"
	"time"

	"github.com/lupool/lupool/cluster/pki"
)

// TestAllowRaft: a certificate of the CA alone does not reach raft; only
// peers AllowRaft admits, by id and certificate fingerprint, do. HTTP is
// not affected (its handlers check membership themselves).
func TestAllowRaft(t *testing.T) {
	f := newFixture(t)
	memberA := pki.Fingerprint(f.certs["A"].Certificate[0])
	var mu sync.Mutex
	var asked []string
	b := f.listen(t, "B", func(o *Options) {
		o.AllowRaft = func(id, fp string) bool {
			mu.Lock()
			defer mu.Unlock()
			asked = append(asked, id)
			return id == "A" && fp == memberA
		}
	})
	accepted := acceptAll(b.Raft())
	for _, id := range []string{"C", "A"} {
		a := f.listen(t, id, nil)
		c, err := a.Raft().Dial(raftAddr(b), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Write([]byte{0, 1, 2}); err != nil {
			t.Fatal(err)
		}
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, rerr := c.Read(make([]byte, 1))
		c.Close()
		switch id {
		case "C":
			if rerr == nil || rerr == io.ErrNoProgress {
				t.Fatalf("raft connection from non-member C: read %v, want the connection closed", rerr)
			}
			waitFor(t, "C refused", func() bool { return b.Stats().RaftRefused == 1 })
		case "A":
			select {
			case sc := <-accepted:
				if sc.(*Conn).PeerID() != "A" {
					t.Fatalf("accepted %q", sc.(*Conn).PeerID())
				}
				sc.Close()
			case <-time.After(5 * time.Second):
				t.Fatal("member A's raft connection never reached Accept")
			}
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(asked) != 2 || asked[0] != "C" || asked[1] != "A" {
		t.Fatalf("AllowRaft asked for %v, want [C A]", asked)
	}
	if s := b.Stats(); s.Raft != 1 || s.RaftRefused != 1 {
		t.Fatalf("stats %+v: want 1 raft, 1 refused", s)
	}
}
