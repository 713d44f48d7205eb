// Package control is lupool's control plane: the rules a node applies when
// an operator or a host asks for a change to the LU table. It owns
//
//   - CreateLU: validation, a reservation in the local pool while the LU is
//     recorded (so that creates racing each other cannot all pass the
//     overcommit limit), placement of the copies, the record, the wait for
//     the volume, and the rollback of the record when the volume cannot be
//     made;
//   - ResizeLU: a shrink only when the cut tail holds no data, the
//     overcommit limit on a grow;
//   - DeleteLU: refused while clients are attached through any node,
//     unless forced;
//   - AddCopy: placement of a new copy;
//   - MoveLU: a planned move of an LU's writer role (the record; the
//     handover is the nodes' move monitors'), and its wait;
//   - VerifyLU: a region-hash compare of every in-sync copy, with re-checks
//     of regions that differ;
//   - ScrubLU: the compare and repair, sent to the LU's writer, and the
//     scrub state in an LU's answer from its writer's node;
//   - placement: the writer first, then the members holding the fewest
//     copies (cluster.PickNodes);
//   - Status: the cluster's one-screen view (nodes and whether they
//     answer, the primary, LUs by health, the pools against their
//     thresholds);
//   - the mapping of metadata errors onto the API's sentinels.
//
// The rules themselves (names, sizes, copies, regions, overcommit) are in
// internal/rules; this package applies them to requests and says what to
// fix in the API's words ("pick another name", "raise --overcommit").
//
// A Plane depends on small interfaces — Metadata, Pool, Replicas,
// Connections, Peers — that cluster.Node, lu.Pool, replication.Manager,
// nbd.Server and the daemon's peer access satisfy; cmd/lupool wires them.
// Its methods have the shape of server/api.Backend's LU calls and return
// errors wrapping the api sentinels.
package control

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/lu"
	"github.com/lupool/lupool/replication"
	"github.com/lupool/lupool/server/api"
)

// Metadata is the replicated LU table and membership: cluster.Node. The
// write methods succeed only on the metadata leader (else an error
// matching cluster.ErrNotLeader).
type Metadata interface {
	// Leader names the leader and its API address; empty when unknown.
	Leader() (id, apiAddr string)
	Nodes() ([]cluster.NodeInfo, error)
	// GetLU returns an error matching cluster.ErrNotFound for an unknown
	// name.
	GetLU(name string) (cluster.LU, error)
	ListLUs() ([]cluster.LU, error)
	CreateLU(ctx context.Context, rec cluster.LU) error
	ResizeLU(ctx context.Context, name string, sizeBytes int64) error
	SetQoS(ctx context.Context, name string, q cluster.QoS) error
	DeleteLU(ctx context.Context, name string) error
	ChangeCopies(ctx context.Context, by cluster.Proposer, change cluster.CopyChange) error
}

// Pool is this node's storage: lu.Pool.
type Pool interface {
	// Reserve holds room under the overcommit limit for a volume about to
	// be created (an error matching lu.ErrOvercommit when there is none).
	Reserve(name string, sizeBytes int64, kind lu.Kind, ttl time.Duration) error
	// Release gives a reservation back.
	Release(name string)
	Status() lu.PoolStatus
	// Thresholds are the usage levels (percent of capacity) at which
	// Status reports warn and critical.
	Thresholds() (warnPercent, criticalPercent float64)
}

// Replicas keeps this node's volumes in step with the metadata:
// replication.Manager.
type Replicas interface {
	// Sync returns once every metadata change applied so far is applied
	// to the local volumes.
	Sync(ctx context.Context) error
	// Volume returns this node's copy of an LU.
	Volume(name string) (lu.Volume, bool)
	// LastError is the last failure to apply a change (why a volume is
	// missing).
	LastError() error
	// DirtyBytes is what each copy of an LU lacks, as its writer here
	// knows it.
	DirtyBytes(name string) map[string]int64
	// RegionHashes hashes regions of this node's copy (an error matching
	// replication.ErrNoCopy without one).
	RegionHashes(ctx context.Context, name string, offsetBytes, regionBytes int64, count int) ([]string, error)
}

// Connections counts the NBD clients attached to an LU through this node:
// nbd.Server.
type Connections interface {
	Connections(name string) int
}

// Peers reaches other nodes at their peer address (from the metadata's
// NodeInfo.PeerAddr). Implementations must check that the far end is node.
type Peers interface {
	// RegionHashes asks node for the hashes of its own copy of an LU.
	RegionHashes(ctx context.Context, node, peerAddr, name string, offsetBytes, regionBytes int64, count int) ([]string, error)
	// Connections asks node how many NBD clients are attached to an LU
	// through it.
	Connections(ctx context.Context, node, peerAddr, name string) (int, error)
	// PoolStatus asks node for its storage pool.
	PoolStatus(ctx context.Context, node, peerAddr string) (api.PoolStatus, error)
}

var (
	_ Metadata = (*cluster.Node)(nil)
	_ Pool     = (*lu.Pool)(nil)
	_ Replicas = (*replication.Manager)(nil)
)

// Options configure a Plane. New calls EnsureDefaults and Validate.
type Options struct {
	// NodeID is this node's id. Required.
	NodeID string
	// Metadata, Pool, Replicas, Connections and Peers are this node's
	// parts. Required.
	Metadata    Metadata
	Pool        Pool
	Replicas    Replicas
	Connections Connections
	Peers       Peers
	// Scrubs scrubs the LUs this node writes; optional (without it,
	// ScrubLU on the writer answers ErrUnavailable).
	Scrubs Scrubs
	// OvercommitRatio is the pool's limit of provisioned file-volume bytes
	// per byte of capacity; it must be the ratio the Pool was opened with.
	// Required (> 0).
	OvercommitRatio float64
	// ReserveTTL is how long a create's reservation holds if the create
	// neither finishes nor fails (a crash of the proposer's request);
	// default 1 minute.
	ReserveTTL time.Duration
	// PeerTimeout bounds asking one other node for its connection count
	// or its pool; a node that does not answer in time is left out (and
	// reported unreachable by Status). Default 2 s.
	PeerTimeout time.Duration
	// Rechecks is how many times VerifyLU hashes a region that differs
	// again before it reports it: a write in flight while the copies were
	// hashed makes them differ for a moment. Default 3.
	Rechecks int
	// RecheckInterval is the pause before each re-check; default 100 ms.
	RecheckInterval time.Duration
	// Now is the clock of record timestamps; default time.Now.
	Now func() time.Time
	// Liveness, when set, returns the primary's liveness view of the
	// members (asked of the primary when this node is not); Nodes and
	// Status show it. An error leaves the states out.
	Liveness func(ctx context.Context) ([]api.NodeLiveness, error)
	// Moves runs planned writer moves (move.go); optional (without it
	// MoveLU answers ErrUnavailable).
	Moves Moves
	// Images is the image table (images.go); optional (without it the
	// image calls answer ErrUnavailable).
	Images ImageMetadata
	// SnapshotRecords and Snapshots take LU snapshots (snapshots.go);
	// optional (without them the snapshot calls answer ErrUnavailable).
	SnapshotRecords SnapshotMetadata
	Snapshots       SnapshotTaker
	// ProposeSnapshot records a snapshot this node (the LU's writer)
	// froze: directly when it leads the metadata log, else through the
	// leader's peer port, which names this node by its certificate. Nil:
	// SnapshotRecords.SnapshotLU as this node, which works on the leader
	// only.
	ProposeSnapshot func(ctx context.Context, snap cluster.LU) error
}

// EnsureDefaults fills the zero fields that have defaults.
func (o *Options) EnsureDefaults() {
	if o.ReserveTTL == 0 {
		// Long enough for a raft commit and a volume create on a busy
		// node; short enough that a lost reservation frees itself.
		o.ReserveTTL = time.Minute
	}
	if o.PeerTimeout == 0 {
		o.PeerTimeout = 2 * time.Second
	}
	if o.Rechecks == 0 {
		o.Rechecks = 3
	}
	if o.RecheckInterval == 0 {
		// Longer than a write's round trip to every copy.
		o.RecheckInterval = 100 * time.Millisecond
	}
	if o.Now == nil {
		o.Now = time.Now
	}
}

// Validate reports options that cannot work.
func (o *Options) Validate() error {
	switch {
	case o.NodeID == "":
		return errors.New("control: options: no NodeID")
	case o.Metadata == nil || o.Pool == nil || o.Replicas == nil || o.Connections == nil || o.Peers == nil:
		return errors.New("control: options: Metadata, Pool, Replicas, Connections and Peers are required")
	case !(o.OvercommitRatio > 0):
		return fmt.Errorf("control: options: overcommit ratio %g must be > 0", o.OvercommitRatio)
	case o.ReserveTTL < 0 || o.PeerTimeout < 0 || o.Rechecks < 0 || o.RecheckInterval < 0:
		return errors.New("control: options: negative durations or counts")
	}
	return nil
}

// Plane applies the control-plane rules on one node. It is safe for
// concurrent use and holds no state of its own beyond its options: the
// LU table is the metadata's, the room is the pool's.
type Plane struct {
	opts Options // immutable
}

// New returns a Plane over opts' parts.
func New(opts Options) (*Plane, error) {
	opts.EnsureDefaults()
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	return &Plane{opts: opts}, nil
}

// NodeID is this node's id.
func (p *Plane) NodeID() string { return p.opts.NodeID }

// OvercommitRatio is the pool's overcommit ratio.
func (p *Plane) OvercommitRatio() float64 { return p.opts.OvercommitRatio }
