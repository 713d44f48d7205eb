package api

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"
	"time"
)

// TestReplicasEndpointGone: the public endpoints that rewrote copy sets
// and member records are gone: 404 "no such endpoint" for an admin and
// for a member node alike, and neither the LU nor the nodes change.
func TestReplicasEndpointGone(t *testing.T) {
	b := newMemBackend()
	b.putLU(LU{Name: "r", SizeBytes: 1 << 20, Copies: 2, Writer: "n1", Epoch: 1,
		Replicas: []Replica{{Node: "n1", State: "in-sync"}, {Node: "n2", State: "in-sync"}}})
	before, _ := b.lu("r")
	h := newTestHandler(t, Options{Backend: b, NodeID: "n1"})
	attack := `{"expected_epoch":1,"epoch":4611686018427387904,"writer":"n3","replicas":[{"node":"n3","state":"in-sync"}]}`
	for _, tc := range []struct {
		name, method, path, body string
		hdr                      []string
	}{
		{"replicas by admin", http.MethodPost, "/v1/lus/r/replicas", attack, bearerHeader(testToken)},
		{"replicas by member", http.MethodPost, "/v1/lus/r/replicas", attack, []string{testPeerHeader, "n2"}},
		{"replicas anonymous", http.MethodPost, "/v1/lus/r/replicas", attack, nil},
		{"node record by admin", http.MethodPost, "/v1/nodes", `{"id":"n2","api_addr":"evil:1"}`, bearerHeader(testToken)},
		{"node record by member", http.MethodPost, "/v1/nodes", `{"id":"n2","api_addr":"evil:1"}`, []string{testPeerHeader, "n3"}},
	} {
		w := serve(h, tc.method, tc.path, tc.body, tc.hdr...)
		if w.Code != http.StatusNotFound || !strings.Contains(errorText(w), "no such endpoint") {
			t.Errorf("%s: %s %s answered %d %q, want 404 no such endpoint", tc.name, tc.method, tc.path, w.Code, w.Body.String())
		}
	}
	if n := b.totalCalls(); n != 0 {
		t.Fatalf("backend called %d times by removed endpoints", n)
	}
	if after, _ := b.lu("r"); !reflect.DeepEqual(before, after) {
		t.Fatalf("LU changed: %+v, was %+v", after, before)
	}
	nodes, _ := b.Nodes(context.Background())
	if len(nodes) != 1 || nodes[0].APIAddr != "" {
		t.Fatalf("nodes changed: %+v", nodes)
	}
}

// TestChangeCopiesConditional: a member's copy change applies only at the
// expected epoch (412 otherwise); a malformed one is refused by the
// handler (400, backend not called); the backend's verdicts map to 403
// and 404.
func TestChangeCopiesConditional(t *testing.T) {
	b := newMemBackend()
	b.putLU(LU{Name: "r", SizeBytes: 1 << 20, Copies: 1, Writer: "n2", Epoch: 1,
		Replicas: []Replica{{Node: "n2", State: "in-sync"}}})
	srv, _ := newTestServer(t, b, "n1")
	member := func(id string) *Client {
		c, err := NewClientWith(srv.URL, ClientOptions{HTTP: peerHTTPClient(t, id)})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	writer := member("n2")
	ctx := context.Background()
	req := CopyChangeRequest{ExpectedEpoch: 1, Epoch: 2, Writer: "n2", Copies: 2,
		Replicas: []Replica{{Node: "n2", State: "in-sync"}, {Node: "n3", State: "new"}}}

	got, err := writer.ChangeCopies(ctx, "r", req)
	if err != nil || got.Epoch != 2 || len(got.Replicas) != 2 {
		t.Fatalf("change at the current epoch: %+v %v", got, err)
	}
	if c := b.callerOf("ChangeCopies"); c != (Caller{Node: "n2"}) {
		t.Fatalf("backend saw caller %+v, want node n2", c)
	}
	if _, err := writer.ChangeCopies(ctx, "r", req); statusOfErr(t, err) != http.StatusPreconditionFailed {
		t.Fatalf("change at a stale epoch: %v, want 412", err)
	}
	calls := b.callCount("ChangeCopies")
	for _, bad := range []CopyChangeRequest{
		{ExpectedEpoch: 0, Epoch: 1, Writer: "n2", Copies: 1, Replicas: req.Replicas},
		{ExpectedEpoch: 2, Epoch: 3, Writer: "n2", Copies: 0},
	} {
		if _, err := writer.ChangeCopies(ctx, "r", bad); statusOfErr(t, err) != http.StatusBadRequest {
			t.Fatalf("malformed change %+v: %v, want 400", bad, err)
		}
	}
	if n := b.callCount("ChangeCopies"); n != calls {
		t.Fatalf("malformed changes reached the backend (%d calls, want %d)", n, calls)
	}
	next := req
	next.ExpectedEpoch, next.Epoch = 2, 3
	if _, err := member("n3").ChangeCopies(ctx, "r", next); statusOfErr(t, err) != http.StatusForbidden {
		t.Fatalf("change by a member that is not the writer: %v, want 403", err)
	}
	if _, err := writer.ChangeCopies(ctx, "nope", next); statusOfErr(t, err) != http.StatusNotFound {
		t.Fatalf("unknown LU: %v, want 404", err)
	}
	if lu, _ := b.lu("r"); lu.Epoch != 2 {
		t.Fatalf("refused changes moved the epoch to %d, want 2", lu.Epoch)
	}
}

// upgradeRequest sends a raw upgrade request for path (with extra header
// lines) followed by payload, and returns the answer and the reader.
func upgradeRequest(t *testing.T, srv *httptest.Server, path, extra, payload string) (*http.Response, *bufio.Reader) {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(srv.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	// The first stream bytes ride in the same packet as the request.
	fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: test/1\r\n%s\r\n%s", path, extra, payload)
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("upgrade answer: %v", err)
	}
	return resp, br
}

type upgraded struct{ peer, line string }

func newUpgradeServer(t *testing.T) (*httptest.Server, chan upgraded) {
	t.Helper()
	got := make(chan upgraded, 4)
	h := newTestHandler(t, Options{Backend: newMemBackend(), Upgrades: map[string]func(string, net.Conn, *bufio.Reader){
		"/v1/internal/stream": func(peer string, conn net.Conn, br *bufio.Reader) {
			defer conn.Close()
			line, _ := br.ReadString('\n')
			got <- upgraded{peer, line}
			fmt.Fprintf(conn, "echo %s %s", peer, line)
		},
	}})
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return srv, got
}

// TestUpgradeHandsOverConnection: a member's Upgrade request gets 101 and
// its connection, with the member's id, goes to the registered handler; a
// member's plain request gets 426.
func TestUpgradeHandsOverConnection(t *testing.T) {
	srv, got := newUpgradeServer(t)
	resp := send(t, srv.URL, http.MethodGet, "/v1/internal/stream", "", testPeerHeader, "n2")
	resp.Body.Close()
	if resp.StatusCode != http.StatusUpgradeRequired {
		t.Fatalf("plain GET by a member: %d, want 426", resp.StatusCode)
	}
	resp, br := upgradeRequest(t, srv, "/v1/internal/stream", testPeerHeader+": n2\r\n", "hello\n")
	if resp.StatusCode != http.StatusSwitchingProtocols || resp.Header.Get("Upgrade") != "test/1" {
		t.Fatalf("upgrade answer: %+v, want 101 test/1", resp)
	}
	if u := <-got; u.peer != "n2" || u.line != "hello\n" {
		t.Fatalf("handler got peer %q, read %q; want n2 and the bytes sent after the request", u.peer, u.line)
	}
	if echo, _ := br.ReadString('\n'); echo != "echo n2 hello\n" {
		t.Fatalf("stream answer %q", echo)
	}
}

// TestUpgradeNeedsMember: without a member's identity (nothing, the admin
// token, a non-member's certificate) an upgrade gets 403 and the
// connection is not handed over.
func TestUpgradeNeedsMember(t *testing.T) {
	srv, got := newUpgradeServer(t)
	for _, tc := range []struct{ name, extra string }{
		{"anonymous", ""},
		{"admin token", "Authorization: Bearer " + testToken + "\r\n"},
		{"non-member", testPeerHeader + ": mallory\r\n"},
		{"non-member with admin token", testPeerHeader + ": mallory\r\nAuthorization: Bearer " + testToken + "\r\n"},
	} {
		resp, _ := upgradeRequest(t, srv, "/v1/internal/stream", tc.extra, "forged hello\n")
		resp.Body.Close()
		if resp.StatusCode != http.StatusForbidden {
			t.Errorf("%s: upgrade answered %d, want 403", tc.name, resp.StatusCode)
		}
	}
	select {
	case u := <-got:
		t.Fatalf("a refused upgrade reached the stream handler: %+v", u)
	default:
	}
}
