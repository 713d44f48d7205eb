package cluster

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strconv"

	"github.com/cockroachdb/pebble/v2"
	"github.com/lupool/lupool/internal/rules"
)

// Snapshots (issue 15, item 3). A snapshot SNAP of LU L is itself a
// read-only LU record named L@SNAP (rules.SnapshotLUName) whose
// SnapshotOf names L: it is exported, verified, listed and deleted like any
// LU. lu.snapshot records it once the LU's writer froze every copy at the
// same flush point (package replication); its copies are the LU's copies
// that froze, its writer the LU's writer. The rules: the LU exists, is a
// plain writable file LU (no image disk, no snapshot), every listed copy
// holds an in-sync copy of the LU, at most rules.SnapshotsMax snapshots per
// LU (one fewer for a linked clone, whose image disk is a layer too). An LU
// with snapshots cannot be deleted or resized (delete its snapshots
// first); a snapshot is deleted with lu.delete.

const cmdSnapshotLU = "lu.snapshot"

// ErrSnapshotLimit is returned by SnapshotLU when the LU has as many
// snapshots as its overlay chain allows.
var ErrSnapshotLimit = errors.New("cluster: too many snapshots")

// snapshotsOf returns the names of the snapshots of LU name, sorted.
func snapshotsOf(lus []LU, name string) []string {
	var out []string
	for _, lu := range lus {
		if lu.SnapshotOf == name {
			out = append(out, lu.Name)
		}
	}
	sort.Strings(out)
	return out
}

// validateSnapshotFields checks an LU record's snapshot fields: a name
// LU@SNAP if and only if SnapshotOf is LU, and then read-only.
func validateSnapshotFields(lu *LU) error {
	of, _, isSnap := rules.SplitSnapshotLU(lu.Name)
	switch {
	case isSnap && lu.SnapshotOf != of:
		return fmt.Errorf("%w: LU name %q is a snapshot's; only lu snapshot creates it", ErrInvalid, lu.Name)
	case !isSnap && lu.SnapshotOf != "":
		return fmt.Errorf("%w: snapshot %q of %q must be named %s@SNAP", ErrInvalid, lu.Name, lu.SnapshotOf, lu.SnapshotOf)
	case isSnap && (!lu.ReadOnly || lu.Image != "" || lu.Base != "" || lu.Kind != KindFile):
		return fmt.Errorf("%w: snapshot %q must be a read-only file LU, no image disk or clone", ErrInvalid, lu.Name)
	}
	return nil
}

// checkSnapshot checks a lu.snapshot body against the LU it freezes.
func (f *fsm) checkSnapshot(snap LU) error {
	if err := validateLU(&snap); err != nil {
		return err
	}
	if snap.SnapshotOf == "" {
		return fmt.Errorf("%w: %s without the LU it freezes (snapshot_of)", ErrInvalid, cmdSnapshotLU)
	}
	of, err := f.mustGetLU(snap.SnapshotOf)
	if errors.Is(err, ErrNotFound) {
		return fmt.Errorf("%w: no LU %q to snapshot (see lupool lu list)", ErrNotFound, snap.SnapshotOf)
	}
	if err != nil {
		return err
	}
	switch {
	case of.Image != "" || of.ReadOnly:
		return fmt.Errorf("%w: %q is read-only (an image disk or a snapshot); it needs no snapshot", ErrInvalid, of.Name)
	case of.Kind != KindFile:
		return fmt.Errorf("%w: %q is a %s LU; only file LUs have snapshots", ErrInvalid, of.Name, of.Kind)
	case snap.SizeBytes != of.SizeBytes:
		return fmt.Errorf("%w: snapshot of %d bytes, %q has %d", ErrInvalid, snap.SizeBytes, of.Name, of.SizeBytes)
	case snap.Writer != of.Writer:
		return fmt.Errorf("%w: snapshot written by %s, %q by %s", ErrInvalid, snap.Writer, of.Name, of.Writer)
	case snap.Copies != len(snap.Replicas):
		return fmt.Errorf("%w: snapshot %q wants %d copies but lists %d", ErrInvalid, snap.Name, snap.Copies, len(snap.Replicas))
	}
	for _, r := range snap.Replicas {
		if r.State != ReplicaInSync || replicaStateOn(of, r.NodeID) != ReplicaInSync {
			return fmt.Errorf("%w: snapshot copy on %s: %q's copy there is %q, not in-sync; wait until it is (lupool lu show %s)",
				ErrInvalid, r.NodeID, of.Name, replicaStateOn(of, r.NodeID), of.Name)
		}
	}
	if _, err := f.mustGetLU(snap.Name); err == nil {
		return fmt.Errorf("%w: %q; pick another snapshot name, or delete it first (lupool snapshot delete)", ErrExists, snap.Name)
	} else if !errors.Is(err, ErrNotFound) {
		return err
	}
	lus, err := listLUs(f.db)
	if err != nil {
		return err
	}
	limit := rules.SnapshotsMax
	if of.Base != "" {
		limit--
	}
	if n := len(snapshotsOf(lus, of.Name)); n >= limit {
		return fmt.Errorf("%w: %q has %d snapshots, at most %d; delete one first (lupool snapshot delete)", ErrSnapshotLimit, of.Name, n, limit)
	}
	return nil
}

func (f *fsm) applySnapshot(b *pebble.Batch, c *command, index uint64) applyResult {
	snap := *c.LU
	if !c.Primary {
		// The LU's writer froze the copies and proposes the record
		// (through the leader, which names it by its certificate).
		of, err := f.mustGetLU(snap.SnapshotOf)
		if err != nil && !errors.Is(err, ErrNotFound) {
			return applyResult{err: err}
		}
		if err == nil && (c.By != of.Writer || snap.Writer != c.By) {
			return applyResult{err: fmt.Errorf("%w: %q proposes a snapshot of %q, written by %q; only its writer or the primary records one", ErrForeignRecord, c.By, of.Name, of.Writer)}
		}
	}
	snap.CreatedAt, snap.UpdatedAt = c.At, c.At
	if err := f.checkSnapshot(snap); err != nil {
		return applyResult{err: err}
	}
	res := f.putLU(b, snap, Created, index)
	res.events = []Event{{Time: c.At, Kind: EventLUCreated, LU: snap.Name, Node: snap.Writer, By: c.By, Details: map[string]string{
		"snapshot_of": snap.SnapshotOf, "size_bytes": strconv.FormatInt(snap.SizeBytes, 10), "copies": strconv.Itoa(snap.Copies),
	}}}
	return res
}

// checkNoSnapshots refuses an operation on LU name while it has snapshots.
func (f *fsm) checkNoSnapshots(name, what string) error {
	lus, err := listLUs(f.db)
	if err != nil {
		return err
	}
	if snaps := snapshotsOf(lus, name); len(snaps) > 0 {
		return fmt.Errorf("%w: %q has snapshots %v; delete them first (lupool snapshot delete %s SNAP) to %s it", ErrInvalid, name, snaps, name, what)
	}
	return nil
}

// SnapshotLU records snapshot snap (its LU record: name LU@SNAP,
// SnapshotOf LU, read-only, the copies that froze). Returns ErrInvalid,
// ErrExists, ErrNotFound, ErrSnapshotLimit or ErrNotLeader.
func (n *Node) SnapshotLU(ctx context.Context, by Proposer, snap LU) error {
	snap = withDefaults(snap, n.opts.NodeID)
	var pre error
	if rerr := n.readDB(func() error { pre = n.fsm.checkSnapshot(snap); return nil }); rerr != nil {
		return rerr
	}
	if pre != nil {
		return pre
	}
	_, err := n.propose(ctx, &command{Type: cmdSnapshotLU, LU: &snap, By: by.NodeID, Primary: by.Primary})
	return err
}

// Snapshots returns the snapshot records of LU name, sorted by name.
func (n *Node) Snapshots(name string) ([]LU, error) {
	var out []LU
	err := n.readDB(func() error {
		lus, err := listLUs(n.db)
		for _, lu := range lus {
			if lu.SnapshotOf == name {
				out = append(out, lu)
			}
		}
		return err
	})
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, err
}
