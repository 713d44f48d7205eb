// Package api is lupool's HTTP API: JSON under /v1, plus /healthz and
// /readyz. It knows nothing of clusters or storage; it serves any Backend,
// which the daemon wires to the metadata, the pool and the NBD engine.
//
// Every error is a JSON object {"error": "..."} whose text says what to fix,
// with a status code chosen by the sentinel the backend wrapped:
//
//	ErrInvalid     400  bad name, size, flag or body
//	ErrNotFound    404  no such LU or node
//	ErrExists      409  the name is taken
//	ErrBusy        409  clients are attached (delete without force)
//	ErrUnauthorized 401 no admin token, or a wrong one
//	ErrForbidden   403  the caller may not do this (not a member node, not the writer)
//	ErrStale       412  a conditional change met a newer state (epoch)
//	ErrNoSpace     507  the pool's overcommit limit would be exceeded
//	ErrUnavailable 503  no leader, not ready, shutting down
//
// Mutating requests that reach a node which is not the metadata leader are
// forwarded to the leader (the backend says who it is with a
// NotLeaderError), so any node can be used for every call.
//
// # Who may call what
//
// The handler serves two listeners. On a node's API port, callers are
// operators and tools: every /v1 call needs the cluster's admin token
// ("Authorization: Bearer TOKEN"), except POST /v1/join, whose credential
// is the join token in its body. On the peer port (mutual TLS, see
// cluster/peerlink) callers are member nodes, identified by the node id in
// their certificate (Options.PeerNode), never by a message field: they may
// call everything an admin may (a request forwarded to the leader), and
// the node-only endpoints under /v1/internal/ (replication streams, copy
// state changes proposed by an LU's writer, a node registering its own
// addresses). /healthz, /readyz and /metrics stay open unless
// Options.ProtectProbes.
package api

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Sentinel errors a Backend wraps (with %w) to choose the status code.
var (
	// ErrInvalid is returned when the request itself is wrong.
	ErrInvalid = errors.New("api: invalid request")
	// ErrNotFound is returned when the named object does not exist.
	ErrNotFound = errors.New("api: not found")
	// ErrExists is returned when creating an object whose name is taken.
	ErrExists = errors.New("api: already exists")
	// ErrBusy is returned when an object is in use (clients attached).
	ErrBusy = errors.New("api: in use")
	// ErrNoSpace is returned when the pool cannot take the request.
	ErrNoSpace = errors.New("api: insufficient storage")
	// ErrUnavailable is returned while the node cannot serve the request.
	ErrUnavailable = errors.New("api: unavailable")
	// ErrNotApplied is wrapped (with ErrUnavailable) by errors after which
	// nothing was changed, so the request may be sent again as it is: the
	// handler then answers 503 with Retry-After, and Client retries it.
	// A NotLeaderError that knows no leader counts as one.
	ErrNotApplied = errors.New("api: nothing was changed; the request can be sent again")
	// ErrStale is returned by a conditional change (ChangeCopies) whose
	// expected epoch is no longer the recorded one.
	ErrStale = errors.New("api: changed meanwhile")
	// ErrUnauthorized is returned when a request carries no valid
	// credential (admin token, join token).
	ErrUnauthorized = errors.New("api: unauthorized")
	// ErrForbidden is returned when the authenticated caller may not make
	// the request (a node that is not a member, not the LU's writer).
	ErrForbidden = errors.New("api: forbidden")
)

// Caller is who sent a request, as the handler authenticated it.
type Caller struct {
	// Node is the member node id from the connection's certificate;
	// empty for an operator.
	Node string
	// Admin is true when the request carried the admin token.
	Admin bool
}

type callerKey struct{}

// CallerFrom returns the authenticated caller of the request whose
// context ctx is (the zero Caller outside the handler).
func CallerFrom(ctx context.Context) Caller {
	c, _ := ctx.Value(callerKey{}).(Caller)
	return c
}

// WithCaller returns ctx carrying c (for backends called outside HTTP).
func WithCaller(ctx context.Context, c Caller) context.Context {
	return context.WithValue(ctx, callerKey{}, c)
}

// NotLeaderError is returned by a Backend asked to change metadata on a node
// that is not the leader. LeaderID, LeaderAPI and LeaderPeer name the
// leader, its API address and its peer address (where requests are
// forwarded, over mutual TLS); empty when no leader is known.
type NotLeaderError struct {
	LeaderID   string
	LeaderAPI  string
	LeaderPeer string
}

func (e *NotLeaderError) Error() string {
	if e.LeaderID == "" {
		return "api: this node is not the metadata leader and no leader is known; retry shortly"
	}
	return fmt.Sprintf("api: this node is not the metadata leader (leader %s, API %s)", e.LeaderID, e.LeaderAPI)
}

// Unwrap makes a NotLeaderError match ErrUnavailable.
func (e *NotLeaderError) Unwrap() error { return ErrUnavailable }

// Backend is what the API serves. Implementations must be safe for
// concurrent use and should honour ctx.
type Backend interface {
	CreateLU(ctx context.Context, req CreateLURequest) (LU, error)
	ListLUs(ctx context.Context) ([]LU, error)
	GetLU(ctx context.Context, name string) (LU, error)
	ResizeLU(ctx context.Context, name string, sizeBytes int64) (LU, error)
	// SetQoS replaces an LU's QoS limits (zero lifts them).
	SetQoS(ctx context.Context, name string, q QoS) (LU, error)
	DeleteLU(ctx context.Context, name string, force bool) error
	PoolStatus(ctx context.Context) (PoolStatus, error)
	Nodes(ctx context.Context) ([]Node, error)
	// Status gathers the cluster's one-screen view, asking every other
	// node for its pool (a node that does not answer is reported so).
	Status(ctx context.Context) (Status, error)
	// Join checks a join token and issues a node certificate to a node
	// that is not a member yet (the first step of joining; ErrUnauthorized
	// for a bad token, ErrExists for a member's id).
	Join(ctx context.Context, req JoinRequest) (JoinResponse, error)
	// RegisterNode adds the calling node (CallerFrom(ctx).Node, from its
	// certificate) as a voter, or updates its own addresses (the second
	// step of joining).
	RegisterNode(ctx context.Context, req RegisterNodeRequest) ([]Node, error)
	// RemoveNode removes a node from the cluster.
	RemoveNode(ctx context.Context, id string) error
	// ChangeCopies records a new epoch, writer and copy states of an LU
	// proposed by the calling node (CallerFrom(ctx).Node), if its epoch is
	// still req.ExpectedEpoch (else ErrStale) and the metadata rules allow
	// it (else ErrForbidden).
	ChangeCopies(ctx context.Context, name string, req CopyChangeRequest) (LU, error)
	// ConfirmLease grants the calling node (CallerFrom(ctx).Node) a
	// metadata read lease on its copy of an LU: nil when, after every
	// committed change is applied, its copy is in sync at req.Epoch;
	// ErrStale when not.
	ConfirmLease(ctx context.Context, name string, req LeaseRequest) error
	// Liveness returns this node's liveness view of the members: the
	// primary's view on the primary, states "unknown" elsewhere.
	Liveness(ctx context.Context) ([]NodeLiveness, error)
	// CreateJoinToken, ListJoinTokens and RevokeJoinToken manage the
	// tokens new nodes join with; RotateAdminToken replaces the admin
	// token and returns the new one (the old one stops working).
	CreateJoinToken(ctx context.Context, req JoinTokenRequest) (JoinTokenCreated, error)
	ListJoinTokens(ctx context.Context) ([]JoinTokenInfo, error)
	RevokeJoinToken(ctx context.Context, id string) error
	RotateAdminToken(ctx context.Context) (AdminToken, error)
	// AddCopy places a new copy of an LU on req.Node; the writer rebuilds
	// it from the allocated extents while writes go on.
	AddCopy(ctx context.Context, name string, req AddCopyRequest) (LU, error)
	// RegionHashes hashes regions of this node's own copy of an LU.
	RegionHashes(ctx context.Context, name string, offsetBytes, regionBytes int64, count int) (RegionHashes, error)
	// VerifyLU compares every copy of an LU region by region by hash.
	VerifyLU(ctx context.Context, name string, req VerifyRequest) (VerifyReport, error)
	// ScrubLU compares every in-sync copy of an LU with its writer's data
	// and repairs the regions that differ, on the LU's writer (a node that
	// is not the writer answers with a NotLeaderError naming it, and the
	// request is forwarded there).
	ScrubLU(ctx context.Context, name string) (ScrubReport, error)
	// MoveLU records a planned move of an LU's writer role to
	// req.To (leader only: a NotLeaderError forwards it), and with
	// req.Wait waits until it ended. ErrNotFound for an unknown LU,
	// ErrInvalid for an unknown node or a target that may not write it
	// (no in-sync copy, already the writer), ErrExists while another move
	// of the LU is in progress.
	MoveLU(ctx context.Context, name string, req MoveRequest) (MoveResult, error)
	// ListMoves returns the moves in progress.
	ListMoves(ctx context.Context) ([]Move, error)
	// ProposeMoveOp records a move monitor's operation as the calling
	// node (CallerFrom(ctx).Node); ErrForbidden when the rules refuse it.
	ProposeMoveOp(ctx context.Context, name string, req MoveOpRequest) error
	// Ready returns nil when the node can serve LU requests.
	Ready() error
}

// CreateLURequest is the body of POST /v1/lus.
type CreateLURequest struct {
	Name        string `json:"name"`
	SizeBytes   int64  `json:"size_bytes"`
	Copies      int    `json:"copies,omitempty"` // default 1
	Kind        string `json:"kind,omitempty"`   // "file" (default) or "memory"
	Description string `json:"description,omitempty"`
	// Node is where the LU's writer should live; empty means the node that
	// received the request (on the leader: the member that forwarded it,
	// as its certificate names it).
	Node string `json:"node,omitempty"`
	// QoS limits client I/O to the LU; absent is no limit.
	QoS *QoS `json:"qos,omitempty"`
	// From makes the LU a linked clone of an image disk (IMAGE/N): it
	// reads the image until it writes; SizeBytes 0 means the disk's size.
	From string `json:"from,omitempty"`
}

// QoS are an LU's client I/O limits, applied by every node that serves the
// LU to the requests it receives; the body of POST /v1/lus/{name}/qos. A
// zero rate is no limit. Requests over a limit wait; they never fail.
type QoS struct {
	ReadIOPS            int64 `json:"read_iops,omitempty"`
	WriteIOPS           int64 `json:"write_iops,omitempty"`
	ReadBytesPerSecond  int64 `json:"read_bytes_per_second,omitempty"`
	WriteBytesPerSecond int64 `json:"write_bytes_per_second,omitempty"`
	// BurstMillis is how much unused allowance a quiet LU saves up, in
	// milliseconds of each rate; 0 is the default (100 ms).
	BurstMillis int64 `json:"burst_ms,omitempty"`
}

// CopyChangeRequest is the body of POST /v1/internal/lus/{name}/copy-change,
// sent by an LU's writer (or a copy recording itself new) to the leader.
type CopyChangeRequest struct {
	ExpectedEpoch uint64    `json:"expected_epoch"`
	Epoch         uint64    `json:"epoch"`
	Writer        string    `json:"writer"`
	Copies        int       `json:"copies"`
	Replicas      []Replica `json:"replicas"`
}

// LeaseRequest is the body of POST /v1/internal/lus/{name}/lease: the
// calling node (its certificate) asks the leader to confirm that its copy
// of the LU is in sync at Epoch (a metadata read lease).
type LeaseRequest struct {
	Epoch uint64 `json:"epoch"`
}

// AddCopyRequest is the body of POST /v1/lus/{name}/copies. An empty Node
// lets the primary pick the node holding the fewest copies.
type AddCopyRequest struct {
	Node string `json:"node"`
}

// RegionHashes is the answer of GET /v1/lus/{name}/hashes: the SHA-256 of
// consecutive regions of one node's copy, from OffsetBytes.
type RegionHashes struct {
	Node        string   `json:"node"`
	OffsetBytes int64    `json:"offset_bytes"`
	RegionBytes int64    `json:"region_bytes"`
	Hashes      []string `json:"hashes"`
}

// VerifyRequest is the body of POST /v1/lus/{name}/verify.
type VerifyRequest struct {
	// RegionBytes is the comparison unit; 0 means 1 MiB.
	RegionBytes int64 `json:"region_bytes,omitempty"`
}

// VerifyReport says whether an LU's copies hold the same bytes.
type VerifyReport struct {
	Name        string   `json:"name"`
	RegionBytes int64    `json:"region_bytes"`
	Regions     int64    `json:"regions"`
	Copies      []string `json:"copies"`
	// Equal is true when every compared region matched on every copy and
	// no copy was skipped.
	Equal      bool             `json:"equal"`
	Mismatches []RegionMismatch `json:"mismatches"`
	// Skipped names copies that could not be compared, with the reason.
	Skipped map[string]string `json:"skipped,omitempty"`
}

// ScrubReport is the outcome of one scrub of an LU (POST
// /v1/lus/{name}/scrub).
type ScrubReport struct {
	Name        string `json:"name"`
	RegionBytes int64  `json:"region_bytes"`
	// Regions is how many regions were compared with each copy.
	Regions int64 `json:"regions"`
	// Copies are the in-sync copies compared with the writer.
	Copies []string `json:"copies"`
	// Repairs are the regions that differed from the writer and were
	// rewritten from it.
	Repairs []ScrubRepair `json:"repairs"`
	// Skipped names copies that could not be compared, with the reason.
	Skipped     map[string]string `json:"skipped,omitempty"`
	TookSeconds float64           `json:"took_seconds"`
}

// ScrubRepair is one region of a copy rewritten from the writer.
type ScrubRepair struct {
	Copy        string `json:"copy"`
	OffsetBytes int64  `json:"offset_bytes"`
	LengthBytes int64  `json:"length_bytes"`
}

// ScrubStatus is an LU's scrub state as its writer knows it.
type ScrubStatus struct {
	Running      bool  `json:"running"`
	RegionsDone  int64 `json:"regions_done"`
	RegionsTotal int64 `json:"regions_total"`
	// LastFinished is when the last scrub finished; absent before the
	// first since the writer started.
	LastFinished *time.Time `json:"last_finished,omitempty"`
	LastRepaired int64      `json:"last_repaired_regions"`
}

// RegionMismatch is one region whose copies differ, with each copy's hash.
type RegionMismatch struct {
	OffsetBytes int64             `json:"offset_bytes"`
	Hashes      map[string]string `json:"hashes"`
}

// ResizeLURequest is the body of POST /v1/lus/{name}/resize.
type ResizeLURequest struct {
	SizeBytes int64 `json:"size_bytes"`
}

// LU describes one logical unit.
type LU struct {
	Name           string    `json:"name"`
	Description    string    `json:"description,omitempty"`
	SizeBytes      int64     `json:"size_bytes"`
	AllocatedBytes int64     `json:"allocated_bytes"`
	Copies         int       `json:"copies"`
	Kind           string    `json:"kind"`
	Writer         string    `json:"writer"`
	Epoch          uint64    `json:"epoch"`
	Replicas       []Replica `json:"replicas"`
	Connections    int       `json:"connections"`
	CreatedAt      time.Time `json:"created_at"`
	// QoS are the LU's client I/O limits; absent when it has none.
	QoS *QoS `json:"qos,omitempty"`
	// Scrub is the LU's scrub state; only in answers from the writer's
	// node.
	Scrub *ScrubStatus `json:"scrub,omitempty"`
	// Move is the LU's planned writer move in progress, if any.
	Move *Move `json:"move,omitempty"`
	// Image is the image this LU is a disk of; ReadOnly says it refuses
	// writes (the image is ready).
	Image    string `json:"image,omitempty"`
	ReadOnly bool   `json:"read_only,omitempty"`
	// Base is the image disk a linked clone reads the blocks it never
	// wrote from. A clone's AllocatedBytes are its own blocks only: the
	// image's are counted once, on the image's disks (and in pool status).
	Base string `json:"base,omitempty"`
	// SnapshotOf is the LU this read-only LU is a snapshot of (its name
	// is then SNAPSHOT_OF@SNAP).
	SnapshotOf string `json:"snapshot_of,omitempty"`
}

// Replica is one copy of an LU.
type Replica struct {
	Node  string `json:"node"`
	State string `json:"state"`
	// DirtyBytes is what the copy lacks, as its writer knows it (resync
	// progress); only in answers from the writer's node.
	DirtyBytes *int64 `json:"dirty_bytes,omitempty"`
	// RepairedRegions is how many regions of the copy scrubs repaired,
	// and Degraded whether that is over the threshold; only in answers
	// from the writer's node.
	RepairedRegions *int64 `json:"repaired_regions,omitempty"`
	Degraded        bool   `json:"degraded,omitempty"`
}

// PoolStatus is this node's storage pool.
type PoolStatus struct {
	Node                   string `json:"node"`
	CapacityBytes          int64  `json:"capacity_bytes"`
	FreeBytes              int64  `json:"free_bytes"`
	AllocatedBytes         int64  `json:"allocated_bytes"`
	ProvisionedBytes       int64  `json:"provisioned_bytes"`
	MemoryAllocatedBytes   int64  `json:"memory_allocated_bytes"`
	MemoryProvisionedBytes int64  `json:"memory_provisioned_bytes"`
	// MemoryBudgetBytes is the node's memory budget for memory LUs (the
	// sum of their sizes; 0: none), MemoryReservedBytes the memory LUs
	// being created, MemoryFreeBytes what the budget still takes.
	MemoryBudgetBytes   int64       `json:"memory_budget_bytes"`
	MemoryReservedBytes int64       `json:"memory_reserved_bytes"`
	MemoryFreeBytes     int64       `json:"memory_free_bytes"`
	OvercommitRatio     float64     `json:"overcommit_ratio"`
	Level               string      `json:"level"`
	LUs                 int         `json:"lus"`
	Dirs                []PoolDir   `json:"dirs"`
	Thresholds          *Thresholds `json:"thresholds,omitempty"`
}

// Thresholds are the usage levels at which the pool warns.
type Thresholds struct {
	WarnPercent     float64 `json:"warn_percent"`
	CriticalPercent float64 `json:"critical_percent"`
}

// PoolDir is one data directory of the pool.
type PoolDir struct {
	Path             string `json:"path"`
	CapacityBytes    int64  `json:"capacity_bytes"`
	FreeBytes        int64  `json:"free_bytes"`
	AllocatedBytes   int64  `json:"allocated_bytes"`
	ProvisionedBytes int64  `json:"provisioned_bytes"`
	Volumes          int    `json:"volumes"`
}

// Node is one member of the cluster.
type Node struct {
	ID       string `json:"id"`
	PeerAddr string `json:"peer_addr"`
	APIAddr  string `json:"api_addr"`
	NBDAddr  string `json:"nbd_addr"`
	Voter    bool   `json:"voter"`
	Leader   bool   `json:"leader"`
	// CertSHA256 is the fingerprint of the certificate the node joined
	// with; peers accept no other certificate for its id.
	CertSHA256 string `json:"cert_sha256,omitempty"`
	// Liveness is the node's state in the primary's liveness view
	// (alive, suspect, dead; unknown when the primary cannot be asked or
	// failover is off), and LastHeard when the primary last heard it.
	Liveness  string     `json:"liveness,omitempty"`
	LastHeard *time.Time `json:"last_heard,omitempty"`
}

// NodeLiveness is one member in the primary's liveness view (GET
// /v1/internal/liveness).
type NodeLiveness struct {
	ID        string    `json:"id"`
	State     string    `json:"state"`
	LastHeard time.Time `json:"last_heard"`
}

// JoinRequest is the body of POST /v1/join: a node that is not a member
// asks for a node certificate, proving the join token's secret.
type JoinRequest struct {
	Token string `json:"token"`
	ID    string `json:"id"`
	// PublicKeyPEM is the node's public key (PKIX PEM); the private key
	// never leaves the node.
	PublicKeyPEM string `json:"public_key_pem"`
	// Hosts become the certificate's SANs (informational: peers check the
	// node id, not host names).
	Hosts []string `json:"hosts,omitempty"`
}

// JoinResponse is the answer to a JoinRequest: the cluster CA's
// certificate (never its key, which stays on the node that created the
// cluster) and the joiner's node certificate. Members lists where to
// register (and whose certificates to accept meanwhile).
type JoinResponse struct {
	ClusterID   string `json:"cluster_id"`
	CACertPEM   string `json:"ca_cert_pem"`
	NodeCertPEM string `json:"node_cert_pem"`
	LeaderID    string `json:"leader_id"`
	Members     []Node `json:"members"`
}

// RegisterNodeRequest is the body of POST /v1/internal/nodes: the calling
// node's own addresses.
type RegisterNodeRequest struct {
	PeerAddr string `json:"peer_addr"`
	APIAddr  string `json:"api_addr"`
	NBDAddr  string `json:"nbd_addr"`
}

// JoinTokenRequest is the body of POST /v1/cluster/join-tokens.
type JoinTokenRequest struct {
	// TTLSeconds is how long the token may be used; 0 means 24 hours.
	TTLSeconds int64 `json:"ttl_seconds,omitempty"`
}

// JoinTokenCreated is a new join token; Token is shown only here.
type JoinTokenCreated struct {
	ID        string    `json:"id"`
	Token     string    `json:"token"`
	ExpiresAt time.Time `json:"expires_at"`
}

// JoinTokenInfo describes a join token (never its secret).
type JoinTokenInfo struct {
	ID        string    `json:"id"`
	CreatedAt time.Time `json:"created_at"`
	ExpiresAt time.Time `json:"expires_at"`
	Revoked   bool      `json:"revoked"`
	Expired   bool      `json:"expired"`
}

// AdminToken is the answer of POST /v1/cluster/admin-token.
type AdminToken struct {
	Token string `json:"token"`
}

// ErrorBody is the JSON shape of every error response.
type ErrorBody struct {
	Error string `json:"error"`
}
