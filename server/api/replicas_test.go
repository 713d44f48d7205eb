package api

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// TestUpdateReplicasConditional: the replicas update applies only at the
// expected epoch (412 otherwise) and rejects a body that breaks the rules.
func TestUpdateReplicasConditional(t *testing.T) {
	b := newMemBackend()
	_, c := newTestServer(t, b, "n1")
	ctx := context.Background()
	if _, err := c.CreateLU(ctx, CreateLURequest{Name: "r", SizeBytes: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	b.mu.Lock()
	rec := b.lus["r"]
	rec.Epoch = 1
	b.lus["r"] = rec
	b.mu.Unlock()
	lu, err := c.GetLU(ctx, "r")
	if err != nil {
		t.Fatal(err)
	}
	req := UpdateReplicasRequest{ExpectedEpoch: lu.Epoch, Epoch: lu.Epoch + 1, Writer: "n1",
		Replicas: []Replica{{Node: "n1", State: "in-sync"}, {Node: "n2", State: "out-of-sync"}}}
	got, err := c.UpdateReplicas(ctx, "r", req)
	if err != nil || got.Epoch != lu.Epoch+1 || len(got.Replicas) != 2 {
		t.Fatalf("update at the current epoch: %+v %v", got, err)
	}
	if _, err := c.UpdateReplicas(ctx, "r", req); statusOfErr(t, err) != http.StatusPreconditionFailed {
		t.Fatalf("update at a stale epoch: %v, want 412", err)
	}
	bad := req
	bad.ExpectedEpoch, bad.Epoch = 3, 2
	if _, err := c.UpdateReplicas(ctx, "r", bad); statusOfErr(t, err) != http.StatusBadRequest {
		t.Fatalf("epoch below expected: %v, want 400", err)
	}
	if _, err := c.UpdateReplicas(ctx, "nope", UpdateReplicasRequest{ExpectedEpoch: 1, Epoch: 1, Replicas: req.Replicas}); statusOfErr(t, err) != http.StatusNotFound {
		t.Fatalf("unknown LU: %v, want 404", err)
	}
}

// TestUpgradeHandsOverConnection: an Upgrade request gets 101 and its
// connection goes to the registered handler; a plain request gets 426.
func TestUpgradeHandsOverConnection(t *testing.T) {
	got := make(chan string, 1)
	h, err := NewHandler(Options{Backend: newMemBackend(), Upgrades: map[string]func(net.Conn, *bufio.Reader){
		"/v1/internal/stream": func(conn net.Conn, br *bufio.Reader) {
			defer conn.Close()
			line, _ := br.ReadString('\n')
			got <- line
			fmt.Fprintf(conn, "echo %s", line)
		},
	}})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(h)
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/v1/internal/stream")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUpgradeRequired {
		t.Fatalf("plain GET: %d, want 426", resp.StatusCode)
	}
	conn, err := net.Dial("tcp", strings.TrimPrefix(srv.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	// The first stream bytes ride in the same packet as the request.
	fmt.Fprintf(conn, "GET /v1/internal/stream HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: test/1\r\n\r\nhello\n")
	br := bufio.NewReader(conn)
	resp, err = http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols || resp.Header.Get("Upgrade") != "test/1" {
		t.Fatalf("upgrade answer: %v %+v", err, resp)
	}
	if line := <-got; line != "hello\n" {
		t.Fatalf("handler read %q, want the bytes sent after the request", line)
	}
	if echo, _ := br.ReadString('\n'); echo != "echo hello\n" {
		t.Fatalf("stream answer %q", echo)
	}
}
