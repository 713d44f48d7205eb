package control

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/internal/rules"
	"github.com/lupool/lupool/replication"
	"github.com/lupool/lupool/server/api"
)

// SnapshotMetadata is the replicated record of snapshots: cluster.Node.
type SnapshotMetadata interface {
	SnapshotLU(ctx context.Context, by cluster.Proposer, snap cluster.LU) error
	Snapshots(name string) ([]cluster.LU, error)
}

// SnapshotTaker freezes and rolls back an LU this node writes, on every
// copy at one flush point: replication.Manager.
type SnapshotTaker interface {
	Snapshot(ctx context.Context, name, snap string) ([]string, error)
	Rollback(ctx context.Context, name, snapName string) error
}

var (
	_ SnapshotMetadata = (*cluster.Node)(nil)
	_ SnapshotTaker    = (*replication.Manager)(nil)
)

func (p *Plane) snapshots() (SnapshotMetadata, SnapshotTaker, error) {
	if p.opts.SnapshotRecords == nil || p.opts.Snapshots == nil {
		return nil, nil, fmt.Errorf("%w: this node takes no snapshots", api.ErrUnavailable)
	}
	return p.opts.SnapshotRecords, p.opts.Snapshots, nil
}

// snapshotTarget checks that LU name can be snapshotted or rolled back
// here: it exists, is a writable file LU, and this node writes it. On
// another node than the writer it answers with an *api.NotLeaderError
// naming the writer, which the API forwards to.
func (p *Plane) snapshotTarget(name string) (cluster.LU, error) {
	rec, err := p.opts.Metadata.GetLU(name)
	if errors.Is(err, cluster.ErrNotFound) {
		return cluster.LU{}, notFound(name)
	}
	if err != nil {
		return cluster.LU{}, p.APIError(err)
	}
	switch {
	case rec.SnapshotOf != "":
		return cluster.LU{}, fmt.Errorf("%w: %s is a snapshot of %s; snapshot or roll back %s instead", api.ErrInvalid, name, rec.SnapshotOf, rec.SnapshotOf)
	case rec.Image != "" || rec.ReadOnly:
		return cluster.LU{}, fmt.Errorf("%w: %s is a read-only image disk: it never changes, so it needs no snapshot (clone it: lupool lu create NAME --from %s)", api.ErrInvalid, name, name)
	case rec.Kind != cluster.KindFile:
		return cluster.LU{}, fmt.Errorf("%w: %s is a %s LU; only file LUs have snapshots", api.ErrInvalid, name, rec.Kind)
	}
	if rec.Writer != p.opts.NodeID {
		nodes, err := p.opts.Metadata.Nodes()
		if err != nil {
			return cluster.LU{}, p.APIError(err)
		}
		nl := &api.NotLeaderError{LeaderID: rec.Writer}
		for _, n := range nodes {
			if n.ID == rec.Writer {
				nl.LeaderAPI, nl.LeaderPeer = n.APIAddr, n.PeerAddr
			}
		}
		return cluster.LU{}, nl
	}
	return rec, nil
}

// proposeSnapshot records snap, frozen by this node (the LU's writer).
func (p *Plane) proposeSnapshot(ctx context.Context, meta SnapshotMetadata, snap cluster.LU) error {
	if p.opts.ProposeSnapshot != nil {
		return p.opts.ProposeSnapshot(ctx, snap)
	}
	return meta.SnapshotLU(ctx, cluster.Proposer{NodeID: p.opts.NodeID}, snap)
}

// RecordSnapshot records, on the metadata leader, a snapshot that the
// calling node (named by its certificate) froze as the LU's writer: the
// leader side of ProposeSnapshot. The metadata's rules check that the
// caller writes the LU and that every listed copy is in sync.
func (p *Plane) RecordSnapshot(ctx context.Context, name string, req api.SnapshotRecordRequest) error {
	meta, _, err := p.snapshots()
	if err != nil {
		return err
	}
	by := api.CallerFrom(ctx).Node
	if by == "" {
		return fmt.Errorf("%w: snapshot records come from the LU's writer node", api.ErrForbidden)
	}
	if err := rules.SnapshotName(name, req.Snapshot); err != nil {
		return fmt.Errorf("%w: snapshot name %q: %w", api.ErrInvalid, req.Snapshot, err)
	}
	rec, err := p.opts.Metadata.GetLU(name)
	if errors.Is(err, cluster.ErrNotFound) {
		return notFound(name)
	}
	if err != nil {
		return p.APIError(err)
	}
	snap := snapshotRecord(rec, req.Snapshot, by, req.Copies, p.opts.Now())
	if err := meta.SnapshotLU(ctx, cluster.Proposer{NodeID: by}, snap); err != nil {
		return p.APIError(err)
	}
	return nil
}

// snapshotRecord is the record of snapshot snap of LU rec, frozen by its
// writer on the nodes froze.
func snapshotRecord(rec cluster.LU, snap, writer string, froze []string, now time.Time) cluster.LU {
	out := cluster.LU{Name: rules.SnapshotLUName(rec.Name, snap), SnapshotOf: rec.Name, ReadOnly: true, SizeBytes: rec.SizeBytes,
		Kind: cluster.KindFile, Copies: len(froze), CreatedOn: writer, Writer: writer, Epoch: 1, CreatedAt: now.UTC(),
		Description: "snapshot of " + rec.Name}
	for _, n := range froze {
		out.Replicas = append(out.Replicas, cluster.Replica{NodeID: n, State: cluster.ReplicaInSync})
	}
	return out
}

// SnapshotLU freezes LU name at a flush point on every copy (see
// replication/snapshot.go) and records the snapshot, a read-only LU
// name@snap held by the copies that froze.
func (p *Plane) SnapshotLU(ctx context.Context, name string, req api.SnapshotRequest) (api.LU, error) {
	meta, taker, err := p.snapshots()
	if err != nil {
		return api.LU{}, err
	}
	if err := rules.SnapshotName(name, req.Name); err != nil {
		return api.LU{}, fmt.Errorf("%w: snapshot name %q: %w", api.ErrInvalid, req.Name, err)
	}
	snapName := rules.SnapshotLUName(name, req.Name)
	rec, err := p.snapshotTarget(name)
	if err != nil {
		return api.LU{}, err
	}
	if _, err := p.opts.Metadata.GetLU(snapName); err == nil {
		return api.LU{}, fmt.Errorf("%w: %s has a snapshot %s; pick another name, or delete it first (lupool snapshot delete %s %s)", api.ErrExists, name, req.Name, name, req.Name)
	}
	existing, err := meta.Snapshots(name)
	if err != nil {
		return api.LU{}, p.APIError(err)
	}
	limit := rules.SnapshotsMax
	if rec.Base != "" {
		limit--
	}
	if len(existing) >= limit {
		return api.LU{}, fmt.Errorf("%w: %s has %d snapshots, at most %d; delete one first (lupool snapshot delete %s SNAP)", api.ErrInvalid, name, len(existing), limit, name)
	}
	for _, r := range rec.Replicas {
		if r.State != cluster.ReplicaInSync {
			return api.LU{}, fmt.Errorf("%w: the copy of %s on %s is %s; a snapshot needs every copy in sync, so that all freeze at the same point: wait for the resync (lupool lu show %s)",
				api.ErrBusy, name, r.NodeID, r.State, name)
		}
	}
	froze, err := taker.Snapshot(ctx, name, req.Name)
	if err != nil {
		return api.LU{}, p.snapshotError(err)
	}
	snap := snapshotRecord(rec, req.Name, p.opts.NodeID, froze, p.opts.Now())
	if err := p.proposeSnapshot(ctx, meta, snap); err != nil {
		return api.LU{}, fmt.Errorf("%s froze on %s, but its record failed (the frozen layers stay on those nodes until deleted by hand): %w",
			snapName, strings.Join(froze, ", "), p.APIError(err))
	}
	// Recorded through the leader: wait until this node applied it.
	for deadline := time.Now().Add(5 * time.Second); ; {
		if _, err := p.opts.Metadata.GetLU(snapName); err == nil || !errors.Is(err, cluster.ErrNotFound) || time.Now().After(deadline) {
			break
		}
		select {
		case <-ctx.Done():
			return api.LU{}, ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
	return p.afterChange(ctx, snapName)
}

func (p *Plane) snapshotError(err error) error {
	switch {
	case errors.Is(err, replication.ErrCopyNotInSync):
		return fmt.Errorf("%w: %v", api.ErrBusy, err)
	case errors.Is(err, replication.ErrNotWriter):
		return fmt.Errorf("%w: %v (the writer is changing; retry shortly)", api.ErrUnavailable, err)
	}
	return err
}

// ListSnapshots returns LU name's snapshots.
func (p *Plane) ListSnapshots(ctx context.Context, name string) ([]api.LU, error) {
	meta, _, err := p.snapshots()
	if err != nil {
		return nil, err
	}
	if _, err := p.opts.Metadata.GetLU(name); errors.Is(err, cluster.ErrNotFound) {
		return nil, notFound(name)
	}
	recs, err := meta.Snapshots(name)
	if err != nil {
		return nil, p.APIError(err)
	}
	out := make([]api.LU, 0, len(recs))
	for _, r := range recs {
		out = append(out, p.toAPI(r))
	}
	return out, nil
}

// DeleteSnapshot deletes snapshot snap of LU name: every node holding it
// merges it into the layers that read it, then removes it. Refused while
// clients are attached to the snapshot's export.
func (p *Plane) DeleteSnapshot(ctx context.Context, name, snap string) error {
	if _, _, err := p.snapshots(); err != nil {
		return err
	}
	if err := rules.SnapshotName(name, snap); err != nil {
		return fmt.Errorf("%w: snapshot name %q: %w", api.ErrInvalid, snap, err)
	}
	snapName := rules.SnapshotLUName(name, snap)
	rec, err := p.opts.Metadata.GetLU(snapName)
	if errors.Is(err, cluster.ErrNotFound) || err == nil && rec.SnapshotOf != name {
		return fmt.Errorf("%w: %s has no snapshot %s (see lupool snapshot list %s)", api.ErrNotFound, name, snap, name)
	}
	if err != nil {
		return p.APIError(err)
	}
	if n, where := p.clusterConnections(ctx, snapName); n > 0 {
		return fmt.Errorf("%w: snapshot %s has %d client connection(s) attached (%s); detach them first", api.ErrBusy, snapName, n, strings.Join(where, ", "))
	}
	if err := p.opts.Metadata.DeleteLU(ctx, snapName); err != nil {
		return p.APIError(err)
	}
	return p.opts.Replicas.Sync(ctx)
}

// RollbackLU makes LU name read what its snapshot req.Snapshot holds, on
// every copy. Refused while clients are attached to the LU unless
// req.Force. Snapshots taken after req.Snapshot stay.
func (p *Plane) RollbackLU(ctx context.Context, name string, req api.RollbackRequest) (api.LU, error) {
	_, taker, err := p.snapshots()
	if err != nil {
		return api.LU{}, err
	}
	if err := rules.SnapshotName(name, req.Snapshot); err != nil {
		return api.LU{}, fmt.Errorf("%w: snapshot name %q: %w", api.ErrInvalid, req.Snapshot, err)
	}
	snapName := rules.SnapshotLUName(name, req.Snapshot)
	if _, err := p.snapshotTarget(name); err != nil {
		return api.LU{}, err
	}
	snap, err := p.opts.Metadata.GetLU(snapName)
	if errors.Is(err, cluster.ErrNotFound) || err == nil && snap.SnapshotOf != name {
		return api.LU{}, fmt.Errorf("%w: %s has no snapshot %s (see lupool snapshot list %s)", api.ErrNotFound, name, req.Snapshot, name)
	}
	if err != nil {
		return api.LU{}, p.APIError(err)
	}
	if !req.Force {
		if n, where := p.clusterConnections(ctx, name); n > 0 {
			return api.LU{}, fmt.Errorf("%w: LU %s has %d client connection(s) attached (%s); detach them first, or roll back with --force (their next reads see the snapshot's content)",
				api.ErrBusy, name, n, strings.Join(where, ", "))
		}
	}
	if err := taker.Rollback(ctx, name, snapName); err != nil {
		return api.LU{}, p.snapshotError(err)
	}
	return p.GetLU(ctx, name)
}

var _ api.SnapshotBackend = (*Plane)(nil)
