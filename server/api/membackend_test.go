package api

import (
	"context"
	"fmt"
	"net/http"
	"sort"
	"sync"
	"time"
)

// memBackend is an in-memory twin of the daemon's backend. It counts the
// calls of every method and remembers the authenticated caller of the
// last one (CallerFrom), so tests can check that a refused request never
// reached it and that an accepted one carried the right identity. When
// notLeader is set it refuses every change with it, like a follower.
//
// Safe for concurrent use: every field below mu is guarded by mu.
type memBackend struct {
	mu        sync.Mutex
	lus       map[string]LU
	busy      map[string]bool
	nodes     map[string]Node
	tokens    map[string]JoinTokenInfo
	joinToken string
	adminSeq  int
	notLeader *NotLeaderError
	calls     map[string]int    // method name -> calls
	callers   map[string]Caller // method name -> caller of its last call
	creates   []CreateLURequest // every CreateLU request, in order
}

var _ Backend = (*memBackend)(nil)

func newMemBackend() *memBackend {
	return &memBackend{
		lus:       map[string]LU{},
		busy:      map[string]bool{},
		nodes:     map[string]Node{"n1": {ID: "n1", Voter: true, Leader: true}},
		tokens:    map[string]JoinTokenInfo{},
		joinToken: "join-secret",
		calls:     map[string]int{},
		callers:   map[string]Caller{},
	}
}

// enterLocked records a call of method and its caller; b.mu must be held.
func (b *memBackend) enterLocked(ctx context.Context, method string) {
	b.calls[method]++
	b.callers[method] = CallerFrom(ctx)
}

// enter locks b.mu, records a call of method and returns the follower
// error for a method that mutates; the caller must unlock b.mu.
func (b *memBackend) enter(ctx context.Context, method string, mutates bool) error {
	b.mu.Lock()
	b.enterLocked(ctx, method)
	if mutates && b.notLeader != nil {
		nl := *b.notLeader
		return &nl
	}
	return nil
}

func (b *memBackend) setNotLeader(nl *NotLeaderError) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.notLeader = nl
}

// callCount returns how often method was called.
func (b *memBackend) callCount(method string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.calls[method]
}

// totalCalls returns the calls of every method together.
func (b *memBackend) totalCalls() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := 0
	for _, c := range b.calls {
		n += c
	}
	return n
}

// callerOf returns the caller of method's last call.
func (b *memBackend) callerOf(method string) Caller {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.callers[method]
}

// lastCreate returns the last CreateLU request (zero if none).
func (b *memBackend) lastCreate() CreateLURequest {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.creates) == 0 {
		return CreateLURequest{}
	}
	return b.creates[len(b.creates)-1]
}

func (b *memBackend) putLU(lu LU) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.lus[lu.Name] = lu
}

func (b *memBackend) lu(name string) (LU, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	lu, ok := b.lus[name]
	return lu, ok
}

func (b *memBackend) luCount() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.lus)
}

// counted wraps an http.Handler (Metrics, Debug) so its calls count as
// calls of method.
func (b *memBackend) counted(method string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b.mu.Lock()
		b.enterLocked(r.Context(), method)
		b.mu.Unlock()
		w.WriteHeader(http.StatusOK)
	})
}

func (b *memBackend) CreateLU(ctx context.Context, req CreateLURequest) (LU, error) {
	err := b.enter(ctx, "CreateLU", true)
	defer b.mu.Unlock()
	b.creates = append(b.creates, req)
	if err != nil {
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
	lu := LU{Name: req.Name, SizeBytes: req.SizeBytes, Copies: 1, Writer: req.Node, Epoch: 1,
		Replicas: []Replica{{Node: req.Node, State: "in-sync"}}}
	b.lus[req.Name] = lu
	return lu, nil
}

func (b *memBackend) ListLUs(ctx context.Context) ([]LU, error) {
	_ = b.enter(ctx, "ListLUs", false)
	defer b.mu.Unlock()
	out := []LU{}
	for _, lu := range b.lus {
		out = append(out, lu)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

func (b *memBackend) GetLU(ctx context.Context, name string) (LU, error) {
	_ = b.enter(ctx, "GetLU", false)
	defer b.mu.Unlock()
	lu, ok := b.lus[name]
	if !ok {
		return LU{}, fmt.Errorf("%w: no LU named %q", ErrNotFound, name)
	}
	return lu, nil
}

func (b *memBackend) ResizeLU(ctx context.Context, name string, size int64) (LU, error) {
	err := b.enter(ctx, "ResizeLU", true)
	defer b.mu.Unlock()
	if err != nil {
		return LU{}, err
	}
	lu, ok := b.lus[name]
	if !ok {
		return LU{}, fmt.Errorf("%w: no LU named %q", ErrNotFound, name)
	}
	lu.SizeBytes = size
	b.lus[name] = lu
	return lu, nil
}

func (b *memBackend) SetQoS(ctx context.Context, name string, q QoS) (LU, error) {
	err := b.enter(ctx, "SetQoS", true)
	defer b.mu.Unlock()
	if err != nil {
		return LU{}, err
	}
	lu, ok := b.lus[name]
	if !ok {
		return LU{}, fmt.Errorf("%w: no LU named %q", ErrNotFound, name)
	}
	lu.QoS = &q
	b.lus[name] = lu
	return lu, nil
}

func (b *memBackend) DeleteLU(ctx context.Context, name string, force bool) error {
	err := b.enter(ctx, "DeleteLU", true)
	defer b.mu.Unlock()
	if err != nil {
		return err
	}
	if _, ok := b.lus[name]; !ok {
		return fmt.Errorf("%w: no LU named %q", ErrNotFound, name)
	}
	if b.busy[name] && !force {
		return fmt.Errorf("%w: clients attached", ErrBusy)
	}
	delete(b.lus, name)
	return nil
}

func (b *memBackend) PoolStatus(ctx context.Context) (PoolStatus, error) {
	_ = b.enter(ctx, "PoolStatus", false)
	defer b.mu.Unlock()
	return PoolStatus{CapacityBytes: 100}, nil
}

func (b *memBackend) Nodes(ctx context.Context) ([]Node, error) {
	_ = b.enter(ctx, "Nodes", false)
	defer b.mu.Unlock()
	out := []Node{}
	for _, n := range b.nodes {
		out = append(out, n)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

func (b *memBackend) Status(ctx context.Context) (Status, error) {
	_ = b.enter(ctx, "Status", false)
	defer b.mu.Unlock()
	return Status{Node: "mem", Nodes: []NodeStatus{}, LUs: LUSummary{Total: len(b.lus), Healthy: len(b.lus), NotHealthy: []LUHealth{}}}, nil
}

func (b *memBackend) Join(ctx context.Context, req JoinRequest) (JoinResponse, error) {
	err := b.enter(ctx, "Join", true)
	defer b.mu.Unlock()
	if err != nil {
		return JoinResponse{}, err
	}
	if req.Token != b.joinToken {
		return JoinResponse{}, fmt.Errorf("%w: join token is not valid", ErrUnauthorized)
	}
	if _, ok := b.nodes[req.ID]; ok {
		return JoinResponse{}, fmt.Errorf("%w: node %q is a member", ErrExists, req.ID)
	}
	return JoinResponse{ClusterID: "c1", CACertPEM: "CA", NodeCertPEM: "CERT " + req.ID, LeaderID: "n1"}, nil
}

func (b *memBackend) RegisterNode(ctx context.Context, req RegisterNodeRequest) ([]Node, error) {
	err := b.enter(ctx, "RegisterNode", true)
	defer b.mu.Unlock()
	if err != nil {
		return nil, err
	}
	id := CallerFrom(ctx).Node
	if id == "" {
		return nil, fmt.Errorf("%w: only a node registers itself", ErrForbidden)
	}
	b.nodes[id] = Node{ID: id, PeerAddr: req.PeerAddr, APIAddr: req.APIAddr, NBDAddr: req.NBDAddr, Voter: true}
	out := []Node{}
	for _, n := range b.nodes {
		out = append(out, n)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

func (b *memBackend) RemoveNode(ctx context.Context, id string) error {
	err := b.enter(ctx, "RemoveNode", true)
	defer b.mu.Unlock()
	if err != nil {
		return err
	}
	if _, ok := b.nodes[id]; !ok {
		return fmt.Errorf("%w: no node %q", ErrNotFound, id)
	}
	delete(b.nodes, id)
	return nil
}

// Liveness reports every node alive.
func (b *memBackend) Liveness(ctx context.Context) ([]NodeLiveness, error) {
	_ = b.enter(ctx, "Liveness", false)
	defer b.mu.Unlock()
	var out []NodeLiveness
	for id := range b.nodes {
		out = append(out, NodeLiveness{ID: id, State: "alive"})
	}
	return out, nil
}

// ConfirmLease confirms a lease when the caller's copy is in sync at the
// epoch asked about.
func (b *memBackend) ConfirmLease(ctx context.Context, name string, req LeaseRequest) error {
	err := b.enter(ctx, "ConfirmLease", false)
	defer b.mu.Unlock()
	if err != nil {
		return err
	}
	lu, ok := b.lus[name]
	if !ok {
		return fmt.Errorf("%w: %s", ErrNotFound, name)
	}
	caller := CallerFrom(ctx).Node
	for _, r := range lu.Replicas {
		if r.Node == caller && r.State == "in-sync" && lu.Epoch == req.Epoch {
			return nil
		}
	}
	return fmt.Errorf("%w: %s's copy of %s is not in sync at epoch %d", ErrStale, caller, name, req.Epoch)
}

// ChangeCopies applies the change at the expected epoch, proposed by the
// LU's writer only.
func (b *memBackend) ChangeCopies(ctx context.Context, name string, req CopyChangeRequest) (LU, error) {
	err := b.enter(ctx, "ChangeCopies", true)
	defer b.mu.Unlock()
	if err != nil {
		return LU{}, err
	}
	lu, ok := b.lus[name]
	if !ok {
		return LU{}, fmt.Errorf("%w: no LU %q", ErrNotFound, name)
	}
	if lu.Epoch != req.ExpectedEpoch {
		return LU{}, fmt.Errorf("%w: %q is at epoch %d", ErrStale, name, lu.Epoch)
	}
	if caller := CallerFrom(ctx).Node; caller != lu.Writer {
		return LU{}, fmt.Errorf("%w: node %q is not the writer of %q", ErrForbidden, caller, name)
	}
	if req.Epoch != lu.Epoch+1 {
		return LU{}, fmt.Errorf("%w: epoch must be %d", ErrInvalid, lu.Epoch+1)
	}
	lu.Epoch, lu.Writer, lu.Copies, lu.Replicas = req.Epoch, req.Writer, req.Copies, req.Replicas
	b.lus[name] = lu
	return lu, nil
}

func (b *memBackend) CreateJoinToken(ctx context.Context, req JoinTokenRequest) (JoinTokenCreated, error) {
	err := b.enter(ctx, "CreateJoinToken", true)
	defer b.mu.Unlock()
	if err != nil {
		return JoinTokenCreated{}, err
	}
	id := fmt.Sprintf("t%d", len(b.tokens)+1)
	ttl := time.Duration(req.TTLSeconds) * time.Second
	if ttl == 0 {
		ttl = 24 * time.Hour
	}
	at := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	b.tokens[id] = JoinTokenInfo{ID: id, CreatedAt: at, ExpiresAt: at.Add(ttl)}
	return JoinTokenCreated{ID: id, Token: "secret-" + id, ExpiresAt: at.Add(ttl)}, nil
}

func (b *memBackend) ListJoinTokens(ctx context.Context) ([]JoinTokenInfo, error) {
	_ = b.enter(ctx, "ListJoinTokens", false)
	defer b.mu.Unlock()
	out := []JoinTokenInfo{}
	for _, t := range b.tokens {
		out = append(out, t)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

func (b *memBackend) RevokeJoinToken(ctx context.Context, id string) error {
	err := b.enter(ctx, "RevokeJoinToken", true)
	defer b.mu.Unlock()
	if err != nil {
		return err
	}
	t, ok := b.tokens[id]
	if !ok {
		return fmt.Errorf("%w: no join token %q", ErrNotFound, id)
	}
	t.Revoked = true
	b.tokens[id] = t
	return nil
}

func (b *memBackend) RotateAdminToken(ctx context.Context) (AdminToken, error) {
	err := b.enter(ctx, "RotateAdminToken", true)
	defer b.mu.Unlock()
	if err != nil {
		return AdminToken{}, err
	}
	b.adminSeq++
	return AdminToken{Token: fmt.Sprintf("admin-%d", b.adminSeq)}, nil
}

func (b *memBackend) AddCopy(ctx context.Context, name string, req AddCopyRequest) (LU, error) {
	err := b.enter(ctx, "AddCopy", true)
	defer b.mu.Unlock()
	if err != nil {
		return LU{}, err
	}
	lu, ok := b.lus[name]
	if !ok {
		return LU{}, fmt.Errorf("%w: no LU %q", ErrNotFound, name)
	}
	lu.Copies++
	lu.Replicas = append(lu.Replicas, Replica{Node: req.Node, State: "new"})
	b.lus[name] = lu
	return lu, nil
}

func (b *memBackend) RegionHashes(ctx context.Context, name string, off, region int64, count int) (RegionHashes, error) {
	_ = b.enter(ctx, "RegionHashes", false)
	defer b.mu.Unlock()
	return RegionHashes{Node: "n1", OffsetBytes: off, RegionBytes: region, Hashes: make([]string, count)}, nil
}

func (b *memBackend) VerifyLU(ctx context.Context, name string, req VerifyRequest) (VerifyReport, error) {
	_ = b.enter(ctx, "VerifyLU", false)
	defer b.mu.Unlock()
	return VerifyReport{Name: name, RegionBytes: req.RegionBytes, Equal: true}, nil
}

func (b *memBackend) ScrubLU(ctx context.Context, name string) (ScrubReport, error) {
	_ = b.enter(ctx, "ScrubLU", false)
	defer b.mu.Unlock()
	return ScrubReport{Name: name, Repairs: []ScrubRepair{}}, nil
}

func (b *memBackend) Ready() error {
	_ = b.enter(context.Background(), "Ready", false)
	defer b.mu.Unlock()
	return nil
}

// MoveLU moves the writer at once when the target holds an in-sync copy.
func (b *memBackend) MoveLU(ctx context.Context, name string, req MoveRequest) (MoveResult, error) {
	err := b.enter(ctx, "MoveLU", true)
	defer b.mu.Unlock()
	if err != nil {
		return MoveResult{}, err
	}
	lu, ok := b.lus[name]
	if !ok {
		return MoveResult{}, fmt.Errorf("%w: %s", ErrNotFound, name)
	}
	if lu.Writer == req.To {
		return MoveResult{}, fmt.Errorf("%w: %s already writes %s", ErrInvalid, req.To, name)
	}
	for _, r := range lu.Replicas {
		if r.Node == req.To && r.State == "in-sync" {
			from := lu.Writer
			lu.Writer = req.To
			lu.Epoch++
			b.lus[name] = lu
			return MoveResult{LU: name, From: from, To: req.To, Outcome: "done", Writer: req.To}, nil
		}
	}
	return MoveResult{}, fmt.Errorf("%w: %s holds no in-sync copy of %s", ErrInvalid, req.To, name)
}

// ListMoves has none: MoveLU moves at once.
func (b *memBackend) ListMoves(ctx context.Context) ([]Move, error) {
	_ = b.enter(ctx, "ListMoves", false)
	defer b.mu.Unlock()
	return []Move{}, nil
}

// ProposeMoveOp accepts any operation on a known LU (it keeps no moves).
func (b *memBackend) ProposeMoveOp(ctx context.Context, name string, _ MoveOpRequest) error {
	err := b.enter(ctx, "ProposeMoveOp", true)
	defer b.mu.Unlock()
	if err != nil {
		return err
	}
	if _, ok := b.lus[name]; !ok {
		return fmt.Errorf("%w: %s", ErrNotFound, name)
	}
	return nil
}
