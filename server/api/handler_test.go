package api

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

func statusOfErr(t *testing.T, err error) int {
	t.Helper()
	var se *StatusError
	if !errors.As(err, &se) {
		t.Fatalf("want a StatusError, got %v", err)
	}
	return se.StatusCode
}

func TestLULifecycleAndStatusCodes(t *testing.T) {
	b := newMemBackend()
	b.busy["busy"] = true
	srv, c := newTestServer(t, b, "node-a")
	ctx := context.Background()

	lu, err := c.CreateLU(ctx, CreateLURequest{Name: "a", SizeBytes: 4096})
	if err != nil || lu.Name != "a" || lu.Writer != "node-a" {
		t.Fatalf("create: %+v %v (writer must default to the receiving node)", lu, err)
	}
	_, err = c.CreateLU(ctx, CreateLURequest{Name: "a", SizeBytes: 4096})
	if got := statusOfErr(t, err); got != http.StatusConflict {
		t.Fatalf("duplicate create: status %d", got)
	}
	_, err = c.CreateLU(ctx, CreateLURequest{Name: "big", SizeBytes: 1 << 50})
	if got := statusOfErr(t, err); got != http.StatusInsufficientStorage {
		t.Fatalf("overcommit: status %d", got)
	}
	_, err = c.GetLU(ctx, "missing")
	if got := statusOfErr(t, err); got != http.StatusNotFound || !strings.Contains(err.Error(), `"missing"`) {
		t.Fatalf("unknown LU: status %d, %v", got, err)
	}
	if _, err := c.CreateLU(ctx, CreateLURequest{Name: "busy", SizeBytes: 512}); err != nil {
		t.Fatal(err)
	}
	if got := statusOfErr(t, c.DeleteLU(ctx, "busy", false)); got != http.StatusConflict {
		t.Fatalf("delete busy: status %d", got)
	}
	if err := c.DeleteLU(ctx, "busy", true); err != nil {
		t.Fatalf("forced delete: %v", err)
	}
	if lu, err := c.ResizeLU(ctx, "a", 8192); err != nil || lu.SizeBytes != 8192 {
		t.Fatalf("resize: %+v %v", lu, err)
	}

	for _, tc := range []struct{ body, want string }{
		{`{"name": "x", "size_bytes": 1`, "malformed JSON"},
		{`{"name": "x", "size": 1}`, "unknown field"},
		{``, "empty"},
		{`{"name":"x","size_bytes":512} {}`, "after the object"},
	} {
		resp := send(t, srv.URL, http.MethodPost, "/v1/lus", tc.body, bearerHeader(testToken)...)
		var eb ErrorBody
		decodeErr := decodeResp(resp, &eb)
		if resp.StatusCode != http.StatusBadRequest || decodeErr != nil || !strings.Contains(eb.Error, tc.want) {
			t.Errorf("body %q: status %d error %q (decode %v), want 400 containing %q", tc.body, resp.StatusCode, eb.Error, decodeErr, tc.want)
		}
	}
	if n := b.luCount(); n != 1 {
		t.Fatalf("bad requests changed state: %d LUs, want 1", n)
	}
	resp := send(t, srv.URL, http.MethodGet, "/v1/nope", "", bearerHeader(testToken)...)
	var eb ErrorBody
	if err := decodeResp(resp, &eb); err != nil || resp.StatusCode != http.StatusNotFound || !strings.Contains(eb.Error, "no such endpoint") {
		t.Fatalf("unknown endpoint: %d %q (%v), want 404 no such endpoint", resp.StatusCode, eb.Error, err)
	}
}

// TestFollowerForwardsWithToken: without a PeerClient a follower forwards
// a change to the leader's API address with the caller's Authorization
// header; the leader sees an admin caller and no node, so the writer of a
// new LU is the leader's own node (the origin is never taken from a
// header, such as the old X-Lupool-Origin-Node, or any other field).
func TestFollowerForwardsWithToken(t *testing.T) {
	leader := newMemBackend()
	// The leader trusts testPeerHeader; a forwarded request that carried
	// the client's copy of it would show up as node "mallory".
	leaderSrv, _ := newTestServerWith(t, Options{Backend: leader, NodeID: "leader", IsMember: members("n1", "mallory")})
	follower := newMemBackend()
	follower.setNotLeader(&NotLeaderError{LeaderID: "leader", LeaderAPI: strings.TrimPrefix(leaderSrv.URL, "http://"), LeaderPeer: "127.0.0.1:1"})
	followerSrv, c := newTestServerWith(t, Options{Backend: follower, NodeID: "follower",
		PeerNode: func(*http.Request) (string, bool) { return "", false }})

	lu, err := c.CreateLU(context.Background(), CreateLURequest{Name: "fwd", SizeBytes: 512})
	if err != nil {
		t.Fatalf("create through follower: %v", err)
	}
	if follower.callCount("CreateLU") != 1 || leader.callCount("CreateLU") != 1 {
		t.Fatalf("CreateLU calls: follower %d, leader %d; want 1 and 1 (tried, then forwarded)",
			follower.callCount("CreateLU"), leader.callCount("CreateLU"))
	}
	if got := leader.callerOf("CreateLU"); got != (Caller{Admin: true}) {
		t.Fatalf("leader saw caller %+v, want the forwarded admin token and no node", got)
	}
	if _, ok := leader.lu("fwd"); !ok || lu.Writer != "leader" {
		t.Fatalf("leader LU present %v, writer %q; want the LU on the leader with writer %q", ok, lu.Writer, "leader")
	}

	// A wrong token is forwarded as is, and the leader refuses it.
	resp := send(t, followerSrv.URL, http.MethodPost, "/v1/lus", `{"name":"w","size_bytes":512}`, "Authorization", "Bearer wrong")
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized || leader.callCount("CreateLU") != 1 {
		t.Fatalf("wrong token at the follower: status %d, leader CreateLU calls %d; want 401 and 1", resp.StatusCode, leader.callCount("CreateLU"))
	}

	// No smuggled origin: neither the old origin header nor a copy of the
	// peer header reach the leader's request.
	resp = send(t, followerSrv.URL, http.MethodPost, "/v1/lus", `{"name":"s","size_bytes":512}`,
		"Authorization", "Bearer "+testToken, "X-Lupool-Origin-Node", "mallory", testPeerHeader, "mallory")
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("create with smuggling headers: status %d, want 201", resp.StatusCode)
	}
	if got := leader.lastCreate(); got.Name != "s" || got.Node != "leader" {
		t.Fatalf("leader got %+v, want node %q (headers must not choose the writer)", got, "leader")
	}
	if got := leader.callerOf("CreateLU"); got.Node != "" {
		t.Fatalf("leader saw node %q on a token-forwarded request", got.Node)
	}
	// Straight to the leader, the old header is ignored as well.
	resp = send(t, leaderSrv.URL, http.MethodPost, "/v1/lus", `{"name":"d","size_bytes":512}`,
		"Authorization", "Bearer "+testToken, "X-Lupool-Origin-Node", "mallory")
	resp.Body.Close()
	if got := leader.lastCreate(); resp.StatusCode != http.StatusCreated || got.Node != "leader" {
		t.Fatalf("direct create with X-Lupool-Origin-Node: status %d, node %q; want 201 and %q", resp.StatusCode, got.Node, "leader")
	}
}

// TestFollowerForwardsOverPeerClient: with a PeerClient, a follower
// forwards to https://LeaderPeer with the client for the leader's id and
// without the caller's token; the leader authenticates the follower as a
// member, and a new LU without a node gets the follower as its writer.
func TestFollowerForwardsOverPeerClient(t *testing.T) {
	leader := newMemBackend()
	leaderSrv, _ := newTestServerWith(t, Options{Backend: leader, NodeID: "n1", IsMember: members("n1", "n2")})
	leaderPeer := strings.TrimPrefix(leaderSrv.URL, "http://")

	follower := newMemBackend()
	follower.setNotLeader(&NotLeaderError{LeaderID: "n1", LeaderAPI: "127.0.0.1:1", LeaderPeer: leaderPeer})
	var mu sync.Mutex
	var asked []string // guarded by mu
	followerSrv, c := newTestServerWith(t, Options{Backend: follower, NodeID: "n2",
		PeerClient: func(id string) *http.Client {
			mu.Lock()
			defer mu.Unlock()
			asked = append(asked, id)
			return peerHTTPClient(t, "n2")
		}})
	ctx := context.Background()

	lu, err := c.CreateLU(ctx, CreateLURequest{Name: "p", SizeBytes: 512})
	if err != nil {
		t.Fatalf("create through follower: %v", err)
	}
	if lu.Writer != "n2" || leader.lastCreate().Node != "n2" {
		t.Fatalf("writer %q, leader request node %q; want the forwarding member n2", lu.Writer, leader.lastCreate().Node)
	}
	if got := leader.callerOf("CreateLU"); got != (Caller{Node: "n2"}) {
		t.Fatalf("leader saw caller %+v, want node n2 without the admin token", got)
	}
	mu.Lock()
	if len(asked) != 1 || asked[0] != "n1" {
		t.Fatalf("PeerClient asked for %v, want [n1] (the leader's id)", asked)
	}
	mu.Unlock()
	// An explicit node in the body stays; an origin header changes nothing.
	resp := send(t, followerSrv.URL, http.MethodPost, "/v1/lus", `{"name":"q","size_bytes":512,"node":"n3"}`,
		"Authorization", "Bearer "+testToken, "X-Lupool-Origin-Node", "mallory")
	resp.Body.Close()
	if got := leader.lastCreate(); resp.StatusCode != http.StatusCreated || got.Node != "n3" {
		t.Fatalf("explicit node: status %d, leader request node %q; want 201 and n3", resp.StatusCode, got.Node)
	}
	resp = send(t, followerSrv.URL, http.MethodPost, "/v1/lus", `{"name":"r","size_bytes":512}`,
		"Authorization", "Bearer "+testToken, "X-Lupool-Origin-Node", "mallory")
	resp.Body.Close()
	if got := leader.lastCreate(); resp.StatusCode != http.StatusCreated || got.Node != "n2" {
		t.Fatalf("origin header: status %d, leader request node %q; want 201 and n2", resp.StatusCode, got.Node)
	}
	// Other changes are forwarded the same way, query included.
	if err := c.DeleteLU(ctx, "p", true); err != nil {
		t.Fatalf("delete through follower: %v", err)
	}
	if _, ok := leader.lu("p"); ok || leader.callCount("DeleteLU") != 1 {
		t.Fatalf("leader still has p (DeleteLU calls %d)", leader.callCount("DeleteLU"))
	}
}

// TestNodeOnlyNotForwarded: a copy change (node-only) that reaches a
// follower gets 503 naming the leader's id and peer address, and the
// leader never sees it, even when the follower could forward.
func TestNodeOnlyNotForwarded(t *testing.T) {
	leader := newMemBackend()
	leaderSrv, _ := newTestServerWith(t, Options{Backend: leader, NodeID: "n1"})
	leaderAddr := strings.TrimPrefix(leaderSrv.URL, "http://")
	follower := newMemBackend()
	follower.setNotLeader(&NotLeaderError{LeaderID: "n1", LeaderAPI: leaderAddr, LeaderPeer: leaderAddr})
	followerSrv, _ := newTestServerWith(t, Options{Backend: follower, NodeID: "n2"})
	node, err := NewClientWith(followerSrv.URL, ClientOptions{HTTP: peerHTTPClient(t, "n2"), Token: testToken})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()

	_, err = node.ChangeCopies(ctx, "a", CopyChangeRequest{ExpectedEpoch: 1, Epoch: 2, Writer: "n2", Copies: 1,
		Replicas: []Replica{{Node: "n2", State: "in-sync"}}})
	var se *StatusError
	if !errors.As(err, &se) || se.StatusCode != http.StatusServiceUnavailable || se.LeaderID != "n1" || se.LeaderPeer != leaderAddr {
		t.Fatalf("copy change at a follower: %#v, want 503 with leader n1 at %s", err, leaderAddr)
	}
	_, err = node.RegisterNode(ctx, RegisterNodeRequest{PeerAddr: "p:1", APIAddr: "a:1"})
	if !errors.As(err, &se) || se.StatusCode != http.StatusServiceUnavailable || se.LeaderID != "n1" {
		t.Fatalf("register at a follower: %#v, want 503 with leader n1", err)
	}
	if follower.callCount("ChangeCopies") != 1 || follower.callCount("RegisterNode") != 1 {
		t.Fatalf("follower calls: ChangeCopies %d, RegisterNode %d; want 1 and 1",
			follower.callCount("ChangeCopies"), follower.callCount("RegisterNode"))
	}
	if n := leader.totalCalls(); n != 0 {
		t.Fatalf("leader backend called %d times; node-only requests must not be forwarded", n)
	}
}

// TestForwardingLimits: a follower that points at itself does not loop,
// and one that knows no leader answers 503 without forwarding.
func TestForwardingLimits(t *testing.T) {
	loop := newMemBackend()
	loopSrv, lc := newTestServer(t, loop, "loop")
	loop.setNotLeader(&NotLeaderError{LeaderID: "loop", LeaderAPI: strings.TrimPrefix(loopSrv.URL, "http://")})
	_, err := lc.CreateLU(context.Background(), CreateLURequest{Name: "x", SizeBytes: 512})
	if got := statusOfErr(t, err); got != http.StatusServiceUnavailable {
		t.Fatalf("forwarding loop: status %d, err %v", got, err)
	}
	if n := loop.callCount("CreateLU"); n != 2 {
		t.Fatalf("forwarding loop: backend called %d times, want 2 (once, then once forwarded)", n)
	}

	orphan := newMemBackend()
	orphan.setNotLeader(&NotLeaderError{LeaderAPI: strings.TrimPrefix(loopSrv.URL, "http://")})
	_, oc := newTestServer(t, orphan, "orphan")
	// The client retries a request that changed nothing (Retry-After)
	// until its context ends.
	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	_, err = oc.CreateLU(ctx, CreateLURequest{Name: "y", SizeBytes: 512})
	cancel()
	if got := statusOfErr(t, err); got != http.StatusServiceUnavailable || !strings.Contains(err.Error(), "no leader is known") {
		t.Fatalf("no leader known: status %d, err %v; want 503 saying no leader is known", got, err)
	}
	if n := orphan.callCount("CreateLU"); n < 3 {
		t.Fatalf("a request refused for want of a leader was sent %d times, want it retried", n)
	}
	if n := loop.callCount("CreateLU"); n != 2 {
		t.Fatalf("a NotLeaderError without LeaderID was forwarded (CreateLU calls at its LeaderAPI: %d, want 2)", n)
	}
}

// TestClientRetriesUntilLeader: a mutating request refused because no
// leader is known yet (503 with Retry-After) succeeds once an election
// has produced one, without the caller seeing the refusal; a 503 without
// Retry-After (the outcome may be unknown) is returned at once.
func TestClientRetriesUntilLeader(t *testing.T) {
	b := newMemBackend()
	b.setNotLeader(&NotLeaderError{})
	_, c := newTestServer(t, b, "n1")
	go func() {
		time.Sleep(300 * time.Millisecond)
		b.setNotLeader(nil)
	}()
	start := time.Now()
	if _, err := c.CreateLU(context.Background(), CreateLURequest{Name: "after-election", SizeBytes: 512}); err != nil {
		t.Fatalf("CreateLU across a leaderless moment: %v", err)
	}
	if n := b.callCount("CreateLU"); n < 2 {
		t.Fatalf("CreateLU reached the backend %d times, want a retry", n)
	}
	t.Logf("created %v after the first refusal", time.Since(start).Round(time.Millisecond))
	b.setNotLeader(&NotLeaderError{LeaderID: "n9"}) // a leader whose address is unknown: forwarding fails
	before := b.callCount("CreateLU")
	start = time.Now()
	if _, err := c.CreateLU(context.Background(), CreateLURequest{Name: "x2", SizeBytes: 512}); err == nil {
		t.Fatal("CreateLU through a leader that cannot be reached succeeded")
	}
	if took := time.Since(start); took > 2*time.Second || b.callCount("CreateLU") != before+1 {
		t.Fatalf("a 503 without Retry-After was retried (%v, %d calls)", took, b.callCount("CreateLU")-before)
	}
}
