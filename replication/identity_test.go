package replication

import (
	"bytes"
	"context"
	"errors"
	"testing"

	"github.com/lupool/lupool/replication/replproto"
)

// TestStreamSenderIdentity: a copy takes frames only from the node its
// record names as writer, identified by the connection (its certificate in
// the daemon), never by the hello's node field; forwarded client I/O only
// from members.
func TestStreamSenderIdentity(t *testing.T) {
	mt, nodes := newTestCluster(t, "a", "b")
	rec := twoCopies("s", 1<<20, "file")
	mt.create(t, rec)
	addr := nodes["b"].addr
	before := make([]byte, 4096)
	vol, ok := nodes["b"].m.Volume("s")
	if !ok {
		t.Fatal("no copy of s on b")
	}
	if err := vol.ReadAt(context.Background(), before, 0); err != nil {
		t.Fatal(err)
	}
	mallory, err := NewManager(ManagerOptions{NodeID: "mallory", Pool: nodes["a"].pool, Dial: testDial("mallory"), AckTimeout: 5e9})
	if err != nil {
		t.Fatal(err)
	}
	defer mallory.Close()
	cases := []struct {
		name  string
		from  *Manager
		hello replproto.Hello
	}{
		{"hello names the writer, sender is not a member", mallory, replproto.Hello{Role: replproto.RoleCopy, LU: "s", Node: "a"}},
		{"sender names itself, not the writer", mallory, replproto.Hello{Role: replproto.RoleCopy, LU: "s", Node: "mallory"}},
		{"copy role from a member that is not the writer", nodes["b"].m, replproto.Hello{Role: replproto.RoleCopy, LU: "s", Node: "b"}},
	}
	for _, tc := range cases {
		c, _, err := tc.from.dialStream(context.Background(), "b", addr, tc.hello, 1, 1<<20)
		if err == nil {
			_, werr := c.do(replproto.Header{Type: replproto.TypeWrite, Epoch: 1, Length: 4096}, bytes.Repeat([]byte{0xee}, 4096), nil)
			c.Close()
			t.Fatalf("%s: stream accepted (write: %v)", tc.name, werr)
		}
		if !errors.Is(err, replproto.ErrForbidden) {
			t.Fatalf("%s: %v, want ErrForbidden", tc.name, err)
		}
	}
	after := make([]byte, 4096)
	if err := vol.ReadAt(context.Background(), after, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(before, after) {
		t.Fatal("a refused sender changed the copy")
	}
	// Forwarding: a non-member may not use the writer either.
	_, _, err = mallory.dialStream(context.Background(), "a", nodes["a"].addr,
		replproto.Hello{Role: replproto.RoleClient, LU: "s", Node: "mallory"}, 1, 1<<20)
	if err != nil {
		t.Fatalf("without IsMember every peer counts as a member: %v", err)
	}
	// The legitimate writer still gets through.
	c, _, err := nodes["a"].m.dialStream(context.Background(), "b", addr, replproto.Hello{Role: replproto.RoleCopy, LU: "s", Node: "a"}, 1, 1<<20)
	if err != nil {
		t.Fatalf("the writer's stream: %v", err)
	}
	c.Close()
}
