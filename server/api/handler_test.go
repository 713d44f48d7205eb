package api

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
)

// memBackend is an in-memory twin of the daemon's backend. When leaderAPI
// is set it refuses mutations with NotLeaderError, like a follower.
type memBackend struct {
	mu        sync.Mutex
	lus       map[string]LU
	busy      map[string]bool
	leaderAPI string
	calls     int
}

var _ Backend = (*memBackend)(nil)

func newMemBackend() *memBackend {
	return &memBackend{lus: map[string]LU{}, busy: map[string]bool{}}
}

func (b *memBackend) follower() error {
	if b.leaderAPI != "" {
		return &NotLeaderError{LeaderAPI: b.leaderAPI}
	}
	return nil
}

func (b *memBackend) CreateLU(_ context.Context, req CreateLURequest) (LU, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.calls++
	if err := b.follower(); err != nil {
		return LU{}, err
	}
	if req.SizeBytes <= 0 {
		return LU{}, fmt.Errorf("%w: size_bytes must be positive", ErrInvalid)
	}
	if req.SizeBytes > 1<<40 {
		return LU{}, fmt.Errorf("%w: over the overcommit limit", ErrNoSpace)
	}
	if _, ok := b.lus[req.Name]; ok {
		return LU{}, fmt.Errorf("%w: LU %q", ErrExists, req.Name)
	}
	lu := LU{Name: req.Name, SizeBytes: req.SizeBytes, Copies: 1, Writer: req.Node}
	b.lus[req.Name] = lu
	return lu, nil
}

func (b *memBackend) ListLUs(context.Context) ([]LU, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []LU
	for _, lu := range b.lus {
		out = append(out, lu)
	}
	return out, nil
}

func (b *memBackend) GetLU(_ context.Context, name string) (LU, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	lu, ok := b.lus[name]
	if !ok {
		return LU{}, fmt.Errorf("%w: no LU named %q", ErrNotFound, name)
	}
	return lu, nil
}

func (b *memBackend) ResizeLU(ctx context.Context, name string, size int64) (LU, error) {
	lu, err := b.GetLU(ctx, name)
	if err != nil {
		return lu, err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	lu.SizeBytes = size
	b.lus[name] = lu
	return lu, nil
}

func (b *memBackend) DeleteLU(_ context.Context, name string, force bool) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.lus[name]; !ok {
		return fmt.Errorf("%w: no LU named %q", ErrNotFound, name)
	}
	if b.busy[name] && !force {
		return fmt.Errorf("%w: clients attached", ErrBusy)
	}
	delete(b.lus, name)
	return nil
}

func (b *memBackend) PoolStatus(context.Context) (PoolStatus, error) {
	return PoolStatus{CapacityBytes: 100}, nil
}
func (b *memBackend) Nodes(context.Context) ([]Node, error) { return []Node{{ID: "n1"}}, nil }
func (b *memBackend) Join(context.Context, JoinRequest) error {
	return b.follower()
}
func (b *memBackend) Ready() error { return nil }

func (b *memBackend) AddCopy(_ context.Context, name string, req AddCopyRequest) (LU, error) {
	if err := b.follower(); err != nil {
		return LU{}, err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	lu, ok := b.lus[name]
	if !ok {
		return LU{}, fmt.Errorf("%w: no LU %q", ErrNotFound, name)
	}
	lu.Copies++
	lu.Replicas = append(lu.Replicas, Replica{Node: req.Node, State: "new"})
	b.lus[name] = lu
	return lu, nil
}

func (b *memBackend) RegionHashes(_ context.Context, name string, off, region int64, count int) (RegionHashes, error) {
	return RegionHashes{Node: "n1", OffsetBytes: off, RegionBytes: region, Hashes: make([]string, count)}, nil
}

func (b *memBackend) VerifyLU(_ context.Context, name string, req VerifyRequest) (VerifyReport, error) {
	return VerifyReport{Name: name, RegionBytes: req.RegionBytes, Equal: true}, nil
}

func (b *memBackend) UpdateReplicas(_ context.Context, name string, req UpdateReplicasRequest) (LU, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	lu, ok := b.lus[name]
	if !ok {
		return LU{}, fmt.Errorf("%w: no LU %q", ErrNotFound, name)
	}
	if lu.Epoch != req.ExpectedEpoch {
		return LU{}, fmt.Errorf("%w: %q is at epoch %d", ErrStale, name, lu.Epoch)
	}
	lu.Epoch, lu.Writer, lu.Replicas = req.Epoch, req.Writer, req.Replicas
	b.lus[name] = lu
	return lu, nil
}

func newTestServer(t *testing.T, b Backend, nodeID string) (*httptest.Server, *Client) {
	t.Helper()
	h, err := NewHandler(Options{Backend: b, NodeID: nodeID})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	c, err := NewClient(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	return srv, c
}

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
		resp, err := http.Post(srv.URL+"/v1/lus", "application/json", strings.NewReader(tc.body))
		if err != nil {
			t.Fatal(err)
		}
		var eb ErrorBody
		decodeErr := decodeResp(resp, &eb)
		if resp.StatusCode != http.StatusBadRequest || decodeErr != nil || !strings.Contains(eb.Error, tc.want) {
			t.Errorf("body %q: status %d error %q (decode %v), want 400 containing %q", tc.body, resp.StatusCode, eb.Error, decodeErr, tc.want)
		}
	}
	if n := len(b.lus); n != 1 {
		t.Fatalf("bad requests changed state: %d LUs, want 1", n)
	}
	resp, err := http.Get(srv.URL + "/v1/nope")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Fatalf("unknown endpoint: %d", resp.StatusCode)
	}
}

func TestFollowerForwardsToLeader(t *testing.T) {
	leader := newMemBackend()
	leaderSrv, _ := newTestServer(t, leader, "leader")
	follower := newMemBackend()
	follower.leaderAPI = strings.TrimPrefix(leaderSrv.URL, "http://")
	_, c := newTestServer(t, follower, "follower")

	lu, err := c.CreateLU(context.Background(), CreateLURequest{Name: "fwd", SizeBytes: 512})
	if err != nil {
		t.Fatalf("create through follower: %v", err)
	}
	if lu.Writer != "follower" {
		t.Fatalf("writer = %q, want the node that received the request", lu.Writer)
	}
	if _, ok := leader.lus["fwd"]; !ok {
		t.Fatal("the leader did not get the forwarded create")
	}
	// A follower that points at itself must not loop.
	loop := newMemBackend()
	loopSrv, lc := newTestServer(t, loop, "loop")
	loop.leaderAPI = strings.TrimPrefix(loopSrv.URL, "http://")
	_, err = lc.CreateLU(context.Background(), CreateLURequest{Name: "x", SizeBytes: 512})
	if got := statusOfErr(t, err); got != http.StatusServiceUnavailable {
		t.Fatalf("forwarding loop: status %d, err %v", got, err)
	}
	if loop.calls != 2 {
		t.Fatalf("forwarding loop: backend called %d times, want 2 (once, then once forwarded)", loop.calls)
	}
}

func decodeResp(resp *http.Response, v any) error {
	defer resp.Body.Close()
	return jsonDecode(resp, v)
}
