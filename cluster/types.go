package cluster

import (
	"errors"
	"fmt"
	"github.com/lupool/lupool/internal/rules"
	"time"
)

var (
	// ErrNotLeader is returned by the write methods (CreateLU, ResizeLU,
	// DeleteLU, ChangeCopies, AddVoter, RemoveServer, RegisterSelf,
	// RegisterNode, SetSetting) when this
	// node is not the raft leader, or lost leadership before the command
	// committed. Leader tells where to send the request instead.
	ErrNotLeader = errors.New("cluster: not the leader")

	// ErrExists is returned by CreateLU when an LU with that name exists.
	ErrExists = errors.New("cluster: LU already exists")

	// ErrNotFound is returned by GetLU, ResizeLU, DeleteLU and ChangeCopies when
	// no LU has that name.
	ErrNotFound = errors.New("cluster: LU not found")

	// ErrInvalid is returned (wrapped, with the reason) by the write methods
	// when the request breaks a rule: a bad name, a size that is not a
	// positive multiple of 512 up to 1 EiB, a copy count out of 1 to 16, a
	// new LU's copies not all in sync on members with the writer's first. The same
	// checks run again in Apply; a command that fails them there is
	// recorded as rejected and changes nothing.
	ErrInvalid = errors.New("cluster: invalid request")

	// ErrUnknownCommand is returned by the write methods when a log entry
	// carries a command version or type this binary does not know (a newer
	// node proposed it). Apply logs it at error level and records it as
	// rejected.
	ErrUnknownCommand = errors.New("cluster: unknown command")

	// ErrOutcomeUnknown is returned by the write methods when the context
	// ended or this node lost leadership after the command was appended:
	// it may or may not be applied. Read the state (GetLU) before retrying;
	// a blind retry may meet ErrExists or ErrNotFound.
	ErrOutcomeUnknown = errors.New("cluster: outcome unknown")

	// ErrEpochChanged is returned by ChangeCopies (and CheckCopyChange) when
	// the LU's recorded epoch is not CopyChange.ExpectedEpoch (someone else
	// changed the copy set or the writer first): read it again and retry.
	ErrEpochChanged = errors.New("cluster: LU epoch changed")

	// ErrLocked is returned by Open when another Node (in this or another
	// process) holds Options.Dir.
	ErrLocked = errors.New("cluster: metadata directory in use")

	// ErrClosed is returned by the methods of a Node after Close.
	ErrClosed = errors.New("cluster: node closed")
)

// Limits on LU records.
const (
	// NameLengthMax is the longest LU name (rules.NameLengthMax).
	NameLengthMax = rules.NameLengthMax
	// SectorBytes is the unit of LU sizes: sizes are multiples of it
	// (rules.SectorBytes).
	SectorBytes = rules.SectorBytes
	// DescriptionLengthMax bounds the free-text description.
	DescriptionLengthMax = 1024
	// CopiesMax bounds the copy count of one LU (rules.CopiesMax).
	CopiesMax = rules.CopiesMax
)

// Replica states, as stored in Replica.State.
const (
	ReplicaInSync    = "in-sync"
	ReplicaResyncing = "resyncing"
	ReplicaOutOfSync = "out-of-sync"
	// ReplicaNew is a copy that holds nothing usable yet (just added, or
	// its data was lost): the writer rebuilds it from every allocated
	// extent, then resyncs it like an out-of-sync copy.
	ReplicaNew        = "new"
	KindFile          = "file"
	KindMemory        = "memory"
	defaultKind       = KindFile
	defaultCopies     = 1
	suffrageVoter     = "voter"
	suffrageNonvoter  = "nonvoter"
	suffrageStaging   = "staging"
	suffrageUnlisted  = "none"
	raftStateShutdown = "Shutdown"
)

// LU is one logical unit's record in the replicated table.
type LU struct {
	Name        string `json:"name"`
	Description string `json:"description,omitempty"`
	SizeBytes   int64  `json:"size_bytes"`
	// Kind is KindFile (durable) or KindMemory (ephemeral); empty means
	// KindFile.
	Kind string `json:"kind"`
	// Copies is the number of copies wanted; 0 on create means 1.
	Copies int `json:"copies"`
	// CreatedOn is the id of the node whose API created the LU.
	CreatedOn string `json:"created_on,omitempty"`
	// Writer is the id of the node that applies writes; empty means
	// CreatedOn.
	Writer string `json:"writer,omitempty"`
	// Epoch changes whenever the in-sync copy set or the writer changes.
	// It starts at 1.
	Epoch    uint64    `json:"epoch"`
	Replicas []Replica `json:"replicas,omitempty"`
	// CreatedAt is the leader's clock when it proposed the create.
	CreatedAt time.Time `json:"created_at"`
	// UpdatedAt is the leader's clock when it proposed the last change.
	UpdatedAt time.Time `json:"updated_at"`
	// QoS limits client I/O to the LU on every node that serves it; nil
	// is no limit.
	QoS *QoS `json:"qos,omitempty"`
	// HandoverEpoch is the epoch at which a planned move made Writer the
	// writer (move.go): a clean handover, every in-sync copy holding every
	// acknowledged write with none in flight. Any other epoch is not one.
	HandoverEpoch uint64 `json:"handover_epoch,omitempty"`
	// Image names the image this LU is a disk of (the LU is IMAGE/N);
	// only image.create makes such LUs, and only image.delete removes them.
	Image string `json:"image,omitempty"`
	// ReadOnly LUs refuse writes: an image's disks once it is ready.
	ReadOnly bool `json:"read_only,omitempty"`
	// Base is the image disk (IMAGE/N) a linked clone reads the blocks it
	// never wrote from; empty for an LU that is no clone (or was
	// flattened). Every copy of a clone sits on a node holding a copy of
	// its base.
	Base string `json:"base,omitempty"`
	// SnapshotOf is the LU this one is a snapshot of (the LU is then
	// read-only and named SnapshotOf@SNAP; snapshots.go).
	SnapshotOf string `json:"snapshot_of,omitempty"`
}

// QoS are an LU's client I/O limits, per node that serves it (the writer
// and every forwarding node apply them to the requests they receive). A
// zero rate is no limit.
type QoS struct {
	ReadIOPS            int64 `json:"read_iops,omitempty"`
	WriteIOPS           int64 `json:"write_iops,omitempty"`
	ReadBytesPerSecond  int64 `json:"read_bytes_per_second,omitempty"`
	WriteBytesPerSecond int64 `json:"write_bytes_per_second,omitempty"`
	// BurstMillis is how much unused allowance a quiet LU saves up, in
	// milliseconds of each rate; 0 is the default (100 ms).
	BurstMillis int64 `json:"burst_ms,omitempty"`
}

// Zero reports whether q limits nothing.
func (q QoS) Zero() bool {
	return q.ReadIOPS == 0 && q.WriteIOPS == 0 && q.ReadBytesPerSecond == 0 && q.WriteBytesPerSecond == 0
}

// ValidateQoS checks q against the QoS rules. Errors wrap ErrInvalid.
func ValidateQoS(q QoS) error {
	for _, c := range []struct {
		name      string
		v, limMax int64
	}{
		{"read_iops", q.ReadIOPS, rules.QoSIOPSMax},
		{"write_iops", q.WriteIOPS, rules.QoSIOPSMax},
		{"read_bytes_per_second", q.ReadBytesPerSecond, rules.QoSBytesPerSecondMax},
		{"write_bytes_per_second", q.WriteBytesPerSecond, rules.QoSBytesPerSecondMax},
	} {
		if err := rules.QoSLimit(c.v, c.limMax); err != nil {
			return fmt.Errorf("%w: QoS %s %d: %w", ErrInvalid, c.name, c.v, err)
		}
	}
	if err := rules.QoSBurst(q.BurstMillis); err != nil {
		return fmt.Errorf("%w: QoS burst_ms %d: %w", ErrInvalid, q.BurstMillis, err)
	}
	return nil
}

// Replica is one copy of an LU on one node.
type Replica struct {
	NodeID string `json:"node_id"`
	// State is ReplicaInSync, ReplicaResyncing, ReplicaOutOfSync or
	// ReplicaNew.
	State string `json:"state"`
}

// NodeInfo describes one member of the cluster.
type NodeInfo struct {
	ID       string `json:"id"`
	PeerAddr string `json:"peer_addr"`
	APIAddr  string `json:"api_addr,omitempty"`
	NBDAddr  string `json:"nbd_addr,omitempty"`
	// CertSHA256 is the fingerprint of the certificate the node joined
	// with (its peers accept no other for its id).
	CertSHA256 string `json:"cert_sha256,omitempty"`
	// Suffrage is "voter", "nonvoter", "staging", or "none" for a node
	// with a record that is no longer in the raft configuration.
	Suffrage string `json:"suffrage"`
	Leader   bool   `json:"leader"`
	// UpdatedAt is the leader's clock when the record was last written;
	// zero for a member without a record yet.
	UpdatedAt time.Time `json:"updated_at,omitempty"`
}

// ChangeKind says what an applied command did to an LU.
type ChangeKind int

// Change kinds.
const (
	Created ChangeKind = iota + 1
	Resized
	Deleted
	// Updated: writer, epoch or copies changed (ChangeCopies).
	Updated
)

func (k ChangeKind) String() string {
	switch k {
	case Created:
		return "created"
	case Resized:
		return "resized"
	case Deleted:
		return "deleted"
	case Updated:
		return "updated"
	default:
		return fmt.Sprintf("ChangeKind(%d)", int(k))
	}
}

// Change is one applied LU change, delivered to Watch callbacks.
type Change struct {
	Kind ChangeKind
	// LU is the record after the change; for Deleted, the record before.
	LU LU
	// Index is the raft log index of the command (for a snapshot restore,
	// the snapshot's last applied index).
	Index uint64
}

// Stats is a point-in-time view of the raft node.
type Stats struct {
	// State is "Follower", "Candidate", "Leader" or "Shutdown".
	State        string `json:"state"`
	Term         uint64 `json:"term"`
	LastLogIndex uint64 `json:"last_log_index"`
	CommitIndex  uint64 `json:"commit_index"`
	// AppliedIndex is raft's applied index; FSMIndex is the last index the
	// state machine recorded in Pebble (they differ briefly after a restart
	// while raft walks past entries the state machine already holds).
	AppliedIndex uint64 `json:"applied_index"`
	FSMIndex     uint64 `json:"fsm_index"`
	// Rejected counts commands Apply refused (invalid or unknown).
	Rejected  uint64 `json:"rejected_commands"`
	LeaderID  string `json:"leader_id,omitempty"`
	LUs       int64  `json:"lus"`
	NodeCount int    `json:"nodes"`
	// AppliedSinceOpen counts commands this process applied; after a
	// restart, entries the state already held count in SkippedSinceOpen
	// instead (they are never applied twice).
	AppliedSinceOpen uint64 `json:"applied_since_open"`
	SkippedSinceOpen uint64 `json:"skipped_since_open"`
}

// ValidateName checks the LU name rule (rules.LUName: 1–128 characters of
// [A-Za-z0-9._-], not "." or "..", or an image's disk IMAGE/N). The error
// wraps ErrInvalid and says what to fix.
func ValidateName(name string) error {
	if err := rules.LUName(name); err != nil {
		return fmt.Errorf("%w: LU name %q: %w", ErrInvalid, name, err)
	}
	return nil
}

// ValidateSize checks the LU size rule (rules.Size: positive, a multiple
// of 512, at most 1 EiB). The error wraps ErrInvalid.
func ValidateSize(sizeBytes int64) error {
	if err := rules.Size(sizeBytes); err != nil {
		if rounded, changed, rerr := rules.RoundSize(sizeBytes); rerr == nil && changed {
			return fmt.Errorf("%w: size %d bytes: %w; round it up to %d", ErrInvalid, sizeBytes, err, rounded)
		}
		return fmt.Errorf("%w: size %d bytes: %w", ErrInvalid, sizeBytes, err)
	}
	return nil
}

// validateLU checks a complete record (after defaults were filled in).
func validateLU(lu *LU) error {
	if err := ValidateName(lu.Name); err != nil {
		return err
	}
	if err := ValidateSize(lu.SizeBytes); err != nil {
		return err
	}
	if err := validateImageFields(lu); err != nil {
		return err
	}
	if err := validateSnapshotFields(lu); err != nil {
		return err
	}
	if lu.Kind != KindFile && lu.Kind != KindMemory {
		return fmt.Errorf("%w: LU kind %q; use %q or %q", ErrInvalid, lu.Kind, KindFile, KindMemory)
	}
	if err := rules.Copies(lu.Copies); err != nil {
		return fmt.Errorf("%w: copies %d: %w", ErrInvalid, lu.Copies, err)
	}
	if len(lu.Description) > DescriptionLengthMax {
		return fmt.Errorf("%w: description is %d bytes, at most %d", ErrInvalid, len(lu.Description), DescriptionLengthMax)
	}
	if lu.Epoch == 0 {
		return fmt.Errorf("%w: epoch must be at least 1", ErrInvalid)
	}
	if lu.QoS != nil {
		if err := ValidateQoS(*lu.QoS); err != nil {
			return err
		}
	}
	seen := map[string]bool{}
	for _, r := range lu.Replicas {
		if r.NodeID == "" {
			return fmt.Errorf("%w: replica with an empty node id", ErrInvalid)
		}
		if seen[r.NodeID] {
			return fmt.Errorf("%w: two replicas on node %q", ErrInvalid, r.NodeID)
		}
		seen[r.NodeID] = true
		switch r.State {
		case ReplicaInSync, ReplicaResyncing, ReplicaOutOfSync, ReplicaNew:
		default:
			return fmt.Errorf("%w: replica on %q has state %q; use %q, %q, %q or %q", ErrInvalid,
				r.NodeID, r.State, ReplicaInSync, ReplicaResyncing, ReplicaOutOfSync, ReplicaNew)
		}
	}
	return nil
}

// withDefaults returns lu with the create-time defaults filled in; a
// one-copy LU without a copy list gets the writer's copy, in sync.
func withDefaults(lu LU, nodeID string) LU {
	if lu.Kind == "" {
		lu.Kind = defaultKind
	}
	if lu.Copies == 0 {
		lu.Copies = defaultCopies
	}
	if lu.CreatedOn == "" {
		lu.CreatedOn = nodeID
	}
	if lu.Writer == "" {
		lu.Writer = lu.CreatedOn
	}
	if lu.Epoch == 0 {
		lu.Epoch = 1
	}
	lu.Replicas = append([]Replica(nil), lu.Replicas...)
	if len(lu.Replicas) == 0 && lu.Copies == 1 {
		// One copy: the writer's, in sync (a new LU reads as zeros).
		lu.Replicas = []Replica{{NodeID: lu.Writer, State: ReplicaInSync}}
	}
	return lu
}
