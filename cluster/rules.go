package cluster

import (
	"context"
	"errors"
	"fmt"
	"github.com/lupool/lupool/internal/rules"
	"slices"
)

// The metadata state machine's rules for copy sets and node records
// (DESIGN.md, decision 3; issue 10). Every rule is a pure function of the
// recorded state, the proposed change and the proposer, so that Apply on
// every node reaches the same verdict; the write methods run the same
// functions first as a fast pre-check against the local state.

var (
	// ErrIllegalChange is returned (wrapped, with the rule broken and the
	// values) by ChangeCopies, and recorded as a rejected command by Apply,
	// when a proposed copy-set change breaks a rule of CheckCopyChange.
	ErrIllegalChange = errors.New("cluster: illegal copy-state change")

	// ErrMember is returned by AddVoter when the node id already belongs to
	// a member (it is in the raft configuration or has a node record) at
	// another peer address, and recorded as a rejected command by Apply for
	// a join whose node id already has a record. A join never overwrites
	// another member's record.
	ErrMember = errors.New("cluster: node id already a member")

	// ErrForeignRecord is returned by RegisterNode, and recorded as a
	// rejected command by Apply, when a node proposes addresses for a node
	// record that is not its own: a node re-registers only itself.
	ErrForeignRecord = errors.New("cluster: node record belongs to another node")
)

// Proposer is who asks for a metadata change: a node id from its certificate, and whether the
// primary (the metadata leader) itself proposes it as the pool's control plane.
//
// The leader fills it in from the authenticated connection (or with its
// own id for its control loops and the admin operations it runs); it is
// never taken from a request body.
type Proposer struct {
	NodeID  string
	Primary bool
}

// CopyChange is a proposed new writer, epoch and copy set of an LU, applied only if the LU is still at ExpectedEpoch.
//
// The JSON encoding is part of the on-disk format (the body of an
// lu.copies command).
type CopyChange struct {
	Name          string    `json:"name"`
	ExpectedEpoch uint64    `json:"expected_epoch"`
	Epoch         uint64    `json:"epoch"`
	Writer        string    `json:"writer"`
	Copies        int       `json:"copies"`
	Replicas      []Replica `json:"replicas"`
}

// NodeAddrs are the addresses a member records for itself (RegisterNode).
type NodeAddrs struct {
	ID, PeerAddr, APIAddr, NBDAddr string
	// CertSHA256 is the fingerprint of the certificate the node proved
	// its id with; it must be the recorded one.
	CertSHA256 string
}

// Rule names, as they appear in ErrIllegalChange messages.
const (
	ruleName       = "same LU"
	ruleCount      = "copy count"
	ruleDistinct   = "distinct copies"
	ruleState      = "known state"
	ruleMembers    = "members only"
	ruleEpoch      = "epoch +1"
	ruleLastInSync = "last in-sync copy"
	ruleWriterCopy = "writer holds a copy"
	ruleWriterSync = "writer in sync"
	ruleWriterMove = "writer change"
	ruleTransition = "state transition"
	ruleAdded      = "new copies start new"
	ruleRemoved    = "writer stays"
	ruleProposer   = "proposer"
	ruleCloneBase  = "clone beside its image"
)

func illegal(name, rule, format string, args ...any) error {
	return fmt.Errorf("%w: LU %q: rule %q: %s", ErrIllegalChange, name, rule, fmt.Sprintf(format, args...))
}

// legalTransition reports whether a copy may go from state from to state
// to in one change: a copy becomes in sync only from resyncing.
func legalTransition(from, to string) bool {
	if from == to || to == ReplicaNew {
		return true
	}
	switch from {
	case ReplicaInSync:
		return to == ReplicaOutOfSync
	case ReplicaOutOfSync:
		return to == ReplicaResyncing
	case ReplicaResyncing:
		return to == ReplicaOutOfSync || to == ReplicaInSync
	case ReplicaNew:
		return to == ReplicaOutOfSync
	}
	return false
}

// copyDiff is what a CopyChange changes in a record.
type copyDiff struct {
	oldStates     map[string]string // node id -> state in the old record
	newStates     map[string]string // node id -> state in the change
	added         []string          // in the change only, in its order
	removed       []string          // in the old record only, in its order
	changed       []string          // in both, with a different state, in the change's order
	writerChanged bool
	inSyncChanged bool
}

func diffCopies(old LU, c CopyChange) copyDiff {
	d := copyDiff{oldStates: map[string]string{}, newStates: map[string]string{}, writerChanged: c.Writer != old.Writer}
	for _, r := range old.Replicas {
		d.oldStates[r.NodeID] = r.State
	}
	for _, r := range c.Replicas {
		d.newStates[r.NodeID] = r.State
		from, kept := d.oldStates[r.NodeID]
		switch {
		case !kept:
			d.added = append(d.added, r.NodeID)
		case from != r.State:
			d.changed = append(d.changed, r.NodeID)
		}
		if (from == ReplicaInSync && kept) != (r.State == ReplicaInSync) {
			d.inSyncChanged = true
		}
	}
	for _, r := range old.Replicas {
		if _, kept := d.newStates[r.NodeID]; !kept {
			d.removed = append(d.removed, r.NodeID)
			if r.State == ReplicaInSync {
				d.inSyncChanged = true
			}
		}
	}
	return d
}

// CheckCopyChange is the rule set, a pure function, used by Apply and (as a fast pre-check) by ChangeCopies:
// it reports whether proposer by may turn the recorded LU old into c.
// members holds the node ids that have a node record.
//
// It returns nil, an error wrapping ErrEpochChanged when c.ExpectedEpoch
// is not old.Epoch (read the record again and recompute the change), or
// an error wrapping ErrIllegalChange that names the rule broken:
//
//   - same LU: c.Name is old.Name.
//   - copy count: Copies == len(Replicas), 1 <= Copies <= CopiesMax.
//   - distinct copies / known state: node ids non-empty and distinct,
//     states one of the Replica* constants.
//   - members only: every copy is on a node with a record. A copy already
//     in the record whose node has no record any more (it was removed) may
//     stay as it is or be recorded out-of-sync or new, so that its writer
//     can still stop counting on it and the primary can replace it; it may
//     not advance, and a new writer must be a member.
//   - epoch +1: Epoch is ExpectedEpoch or ExpectedEpoch+1, and +1 when the
//     writer, the set of copy node ids or the set of in-sync copies changes.
//   - last in-sync copy: at least one copy is in sync after the change.
//   - writer holds a copy / writer in sync: Writer is in Replicas and its
//     copy is in sync.
//   - writer change: only the primary moves the writer, and only to a
//     node whose copy was in sync in old.
//   - state transition: per copy in both, the state stays, or goes
//     in-sync→out-of-sync, out-of-sync→resyncing, resyncing→out-of-sync,
//     resyncing→in-sync, new→out-of-sync, or any→new.
//   - new copies start new / writer stays: an added copy is new; the
//     writer's copy is never removed.
//   - proposer: old's writer may change the states of its other copies; a
//     node may record its own copy new when that is the whole change; the
//     primary may add and remove copies, move the writer and, when it
//     does, record the old writer's copy out-of-sync or new. Nothing else.
func CheckCopyChange(old LU, c CopyChange, by Proposer, members map[string]bool) error {
	if c.Name != old.Name {
		return illegal(c.Name, ruleName, "the change names %q but the record is %q", c.Name, old.Name)
	}
	if c.ExpectedEpoch != old.Epoch {
		return fmt.Errorf("%w: %q is at epoch %d, not %d; read it again and recompute the change",
			ErrEpochChanged, old.Name, old.Epoch, c.ExpectedEpoch)
	}
	if err := checkCopyList(old, c); err != nil {
		return err
	}
	d := diffCopies(old, c)
	if err := checkMembers(old, c, d, members); err != nil {
		return err
	}
	if err := checkEpoch(old, c, d); err != nil {
		return err
	}
	if err := checkWriter(old, c, d, by); err != nil {
		return err
	}
	if err := checkTransitions(old, c, d); err != nil {
		return err
	}
	return checkProposer(old, c, d, by)
}

// checkCopyList checks the shape of the proposed list on its own.
func checkCopyList(old LU, c CopyChange) error {
	if c.Copies != len(c.Replicas) {
		return illegal(old.Name, ruleCount, "copies is %d but the list holds %d copies", c.Copies, len(c.Replicas))
	}
	if err := rules.Copies(c.Copies); err != nil {
		return illegal(old.Name, ruleCount, "copies %d: %v", c.Copies, err)
	}
	seen := map[string]bool{}
	for _, r := range c.Replicas {
		if r.NodeID == "" {
			return illegal(old.Name, ruleDistinct, "a copy has an empty node id")
		}
		if seen[r.NodeID] {
			return illegal(old.Name, ruleDistinct, "two copies on node %q", r.NodeID)
		}
		seen[r.NodeID] = true
		switch r.State {
		case ReplicaInSync, ReplicaResyncing, ReplicaOutOfSync, ReplicaNew:
		default:
			return illegal(old.Name, ruleState, "copy on %q has state %q; use %q, %q, %q or %q",
				r.NodeID, r.State, ReplicaInSync, ReplicaResyncing, ReplicaOutOfSync, ReplicaNew)
		}
	}
	return nil
}

func checkMembers(old LU, c CopyChange, d copyDiff, members map[string]bool) error {
	if d.writerChanged && !members[c.Writer] {
		return illegal(old.Name, ruleMembers, "new writer %q has no node record", c.Writer)
	}
	for _, r := range c.Replicas {
		if members[r.NodeID] {
			continue
		}
		from, kept := d.oldStates[r.NodeID]
		demoted := r.State == ReplicaOutOfSync || r.State == ReplicaNew
		if !kept || (from != r.State && !demoted) {
			return illegal(old.Name, ruleMembers, "copy on %q (%s) is on a node without a node record", r.NodeID, r.State)
		}
	}
	return nil
}

func checkEpoch(old LU, c CopyChange, d copyDiff) error {
	if c.Epoch != c.ExpectedEpoch && c.Epoch != c.ExpectedEpoch+1 || c.Epoch == 0 {
		return illegal(old.Name, ruleEpoch, "epoch %d from %d; propose %d or %d", c.Epoch, c.ExpectedEpoch,
			c.ExpectedEpoch, c.ExpectedEpoch+1)
	}
	setChanged := len(d.added) > 0 || len(d.removed) > 0
	if (d.writerChanged || setChanged || d.inSyncChanged) && c.Epoch != c.ExpectedEpoch+1 {
		return illegal(old.Name, ruleEpoch, "writer changed %v, copy set changed %v, in-sync set changed %v: "+
			"the epoch must go from %d to %d, got %d", d.writerChanged, setChanged, d.inSyncChanged,
			c.ExpectedEpoch, c.ExpectedEpoch+1, c.Epoch)
	}
	return nil
}

func checkWriter(old LU, c CopyChange, d copyDiff, by Proposer) error {
	inSync := 0
	for _, r := range c.Replicas {
		if r.State == ReplicaInSync {
			inSync++
		}
	}
	if inSync == 0 {
		return illegal(old.Name, ruleLastInSync, "no copy would be in sync (old in-sync copies: %v)", inSyncIDs(old.Replicas))
	}
	state, holds := d.newStates[c.Writer]
	if !holds {
		return illegal(old.Name, ruleWriterCopy, "writer %q holds no copy in %v", c.Writer, c.Replicas)
	}
	if state != ReplicaInSync {
		return illegal(old.Name, ruleWriterSync, "the writer %q's own copy is %s, it must be %s", c.Writer, state, ReplicaInSync)
	}
	if !d.writerChanged {
		return nil
	}
	if !by.Primary {
		return illegal(old.Name, ruleWriterMove, "%q proposes writer %q (was %q); only the primary moves the writer",
			by.NodeID, c.Writer, old.Writer)
	}
	if d.oldStates[c.Writer] != ReplicaInSync {
		return illegal(old.Name, ruleWriterMove, "new writer %q's copy was %q, not %s; promote only an in-sync copy",
			c.Writer, d.oldStates[c.Writer], ReplicaInSync)
	}
	return nil
}

func checkTransitions(old LU, c CopyChange, d copyDiff) error {
	for _, id := range d.changed {
		if from, to := d.oldStates[id], d.newStates[id]; !legalTransition(from, to) {
			return illegal(old.Name, ruleTransition, "copy on %q may not go %s → %s (a copy becomes in sync only from resyncing)",
				id, from, to)
		}
	}
	for _, id := range d.added {
		if d.newStates[id] != ReplicaNew {
			return illegal(old.Name, ruleAdded, "added copy on %q is %s; a copy joins the set as %s", id, d.newStates[id], ReplicaNew)
		}
	}
	if slices.Contains(d.removed, old.Writer) {
		return illegal(old.Name, ruleRemoved, "the change removes the writer %q's copy", old.Writer)
	}
	return nil
}

func checkProposer(old LU, c CopyChange, d copyDiff, by Proposer) error {
	isWriter := by.NodeID != "" && by.NodeID == old.Writer
	// A node records its own copy new (its data was lost): that alone.
	selfNew := len(d.changed) == 1 && d.changed[0] == by.NodeID && d.newStates[by.NodeID] == ReplicaNew &&
		len(d.added) == 0 && len(d.removed) == 0 && !d.writerChanged
	if !by.Primary && !isWriter && !selfNew {
		return illegal(old.Name, ruleProposer, "%q is neither the writer %q nor the primary, and does not only record its own copy %s",
			by.NodeID, old.Writer, ReplicaNew)
	}
	if (len(d.added) > 0 || len(d.removed) > 0) && !by.Primary {
		return illegal(old.Name, ruleProposer, "%q adds %v and removes %v; only the primary changes the copy list",
			by.NodeID, d.added, d.removed)
	}
	for _, id := range d.changed {
		switch {
		case isWriter && id != old.Writer:
		case selfNew:
		case by.Primary && d.writerChanged && id == old.Writer &&
			(d.newStates[id] == ReplicaOutOfSync || d.newStates[id] == ReplicaNew):
		default:
			return illegal(old.Name, ruleProposer, "%q (primary %v) may not record copy on %q %s (writer %q)",
				by.NodeID, by.Primary, id, d.newStates[id], old.Writer)
		}
	}
	return nil
}

func inSyncIDs(rs []Replica) []string {
	var out []string
	for _, r := range rs {
		if r.State == ReplicaInSync {
			out = append(out, r.NodeID)
		}
	}
	return out
}

// checkCreate is the rule set of a new LU's copies (validateLU checked the
// rest): every copy on a member, the writer's copy first, every copy in
// sync (a new LU reads as zeros everywhere), one copy per wanted copy, and
// epoch 1. Errors wrap ErrInvalid.
func checkCreate(lu LU, members map[string]bool) error {
	switch {
	case lu.Copies != len(lu.Replicas):
		return fmt.Errorf("%w: LU %q wants %d copies but lists %d; list every copy, the writer's first",
			ErrInvalid, lu.Name, lu.Copies, len(lu.Replicas))
	case lu.Replicas[0].NodeID != lu.Writer:
		return fmt.Errorf("%w: LU %q: the first copy is on %q, not on the writer %q", ErrInvalid, lu.Name,
			lu.Replicas[0].NodeID, lu.Writer)
	case lu.Epoch != 1:
		return fmt.Errorf("%w: LU %q: a new LU starts at epoch 1, got %d", ErrInvalid, lu.Name, lu.Epoch)
	}
	for _, r := range lu.Replicas {
		if r.State != ReplicaInSync {
			return fmt.Errorf("%w: LU %q: copy on %q is %s; every copy of a new LU is %s", ErrInvalid, lu.Name,
				r.NodeID, r.State, ReplicaInSync)
		}
		if !members[r.NodeID] {
			return fmt.Errorf("%w: LU %q: copy on %q, which has no node record (see Nodes)", ErrInvalid, lu.Name, r.NodeID)
		}
	}
	return nil
}

// checkLUsPerNodeHeld is the LUs-per-node rule of a create or a copy
// change that adds copies: every node that gets one of adding (the new
// copies) must hold fewer than the limit (rules.LUsPerNodeLimit of
// configured) of held, the copies per node in the LU table. Errors wrap
// ErrInvalid and rules.ErrLUsPerNode.
func checkLUsPerNodeHeld(name string, adding []Replica, held map[string]int, configured int) error {
	limit := rules.LUsPerNodeLimit(configured)
	for _, r := range adding {
		if err := rules.LUsPerNode(held[r.NodeID], limit); err != nil {
			return fmt.Errorf("%w: LU %q: no room for a copy on %q: %w (the primary's lupool serve --lus-per-node-max)", ErrInvalid, name, r.NodeID, err)
		}
	}
	return nil
}

// checkNodeUpsert decides whether proposer by may write record rec:
// a node writes its own record; a join (the primary adding a new member)
// writes a record only where none exists.
func checkNodeUpsert(rec nodeRecord, join bool, by Proposer, exists bool) error {
	return checkNodeUpsertOf(rec, join, by, exists, nodeRecord{})
}

// checkNodeUpsertOf is checkNodeUpsert that also knows the existing
// record: its certificate binding never changes.
func checkNodeUpsertOf(rec nodeRecord, join bool, by Proposer, exists bool, old nodeRecord) error {
	if exists && old.CertSHA256 != "" && rec.CertSHA256 != old.CertSHA256 {
		return fmt.Errorf("%w: %q is bound to certificate %s; a record is never rebound (remove the node and join it again)",
			ErrForeignRecord, rec.ID, old.CertSHA256)
	}
	return checkNodeUpsertBy(rec, join, by, exists)
}

func checkNodeUpsertBy(rec nodeRecord, join bool, by Proposer, exists bool) error {
	if join {
		if !by.Primary {
			return fmt.Errorf("%w: %q proposes a join of %q; only the primary joins nodes", ErrForeignRecord, by.NodeID, rec.ID)
		}
		if exists {
			return fmt.Errorf("%w: %q has a record; a join never overwrites it", ErrMember, rec.ID)
		}
		return nil
	}
	if by.NodeID != rec.ID {
		return fmt.Errorf("%w: %q proposes addresses for %q", ErrForeignRecord, by.NodeID, rec.ID)
	}
	return nil
}

// membersWithSelf returns the ids with a node record in the local state.
// If this node holds one of replicas but has no record yet (a bootstrapped
// node proposes before its leader loop recorded it), it records itself
// first, so that the state machine counts it as a member.
func (n *Node) membersWithSelf(ctx context.Context, replicas []Replica) (map[string]bool, error) {
	var members map[string]bool
	read := func() error {
		return n.readDB(func() (err error) {
			members, err = memberSet(n.db)
			return err
		})
	}
	if err := read(); err != nil {
		return nil, err
	}
	self := n.opts.NodeID
	if members[self] || !slices.ContainsFunc(replicas, func(r Replica) bool { return r.NodeID == self }) {
		return members, nil
	}
	if err := n.RegisterSelf(ctx); err != nil {
		return nil, err
	}
	if err := read(); err != nil {
		return nil, err
	}
	return members, nil
}
