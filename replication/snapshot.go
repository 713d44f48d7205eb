package replication

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/internal/rules"
	"github.com/lupool/lupool/replication/replproto"
)

// Snapshots and rollbacks of an LU with copies (issue 15, item 3).
//
// The writer takes its Mirror's gate exclusively, as a planned move's
// quiesce does: new writes, trims, zeroes and flushes wait, and those in
// flight drain (each holds the gate shared to its end, asynchronous writes
// included). Copies are synchronous, so every in-sync copy then holds every
// acknowledged write and none is in flight. The writer flushes (its volume
// and every copy), freezes its own volume (lu.Pool.Snapshot), and sends each
// copy a Snapshot marker (replproto.TypeSnapshot) on the LU's stream; each
// copy freezes its volume when the marker arrives, between the same writes.
// Only then does the gate open again. Writes wait for the flush, a few
// renames and one round trip to each copy.
//
// A snapshot needs every copy in sync: one that is out of sync, new or
// resyncing lacks writes the writer holds, so its snapshot would be taken
// at another point; Snapshot refuses (ErrCopyNotInSync) and says to wait
// for the resync. A copy that fails its marker (it went away meanwhile) is
// left out of the snapshot: the caller records the snapshot with the
// copies that froze (Snapshot returns them), never with one that did not.
//
// Rollback goes the same way with a Rollback marker. The writer rolls back
// its own volume first; a copy that fails the marker may hold the newer
// content, so it is recorded out of sync with the whole LU dirty, and the
// resync rewrites it from the writer.

// ErrCopyNotInSync is returned by Snapshot and Rollback while a copy of
// the LU is not in sync.
var ErrCopyNotInSync = errors.New("replication: a copy of the LU is not in sync")

// Snapshot freezes LU name's content at a flush point as snapshot snap
// (its LU name is name@snap) on this node, its writer, and on every copy,
// and returns the nodes whose copies froze, this one first.
func (m *Manager) Snapshot(ctx context.Context, name, snap string) ([]string, error) {
	if err := rules.SnapshotName(name, snap); err != nil {
		return nil, err
	}
	snapName := rules.SnapshotLUName(name, snap)
	mi, began, err := m.quiesceForMarker(ctx, name)
	if err != nil {
		return nil, err
	}
	defer mi.gate.Unlock()
	flushed := time.Now()
	if _, err := m.opts.Pool.Snapshot(ctx, name, snap); err != nil {
		return nil, fmt.Errorf("snapshot the writer's volume of %s: %w", name, err)
	}
	frozen := time.Now()
	froze := []string{m.opts.NodeID}
	for node, err := range mi.sendMarker(replproto.TypeSnapshot, snapName) {
		if err != nil {
			m.opts.Logger.Warn("a copy did not take the snapshot; it is left out of it", "lu", name, "snapshot", snapName, "node", node, "err", err)
			continue
		}
		froze = append(froze, node)
	}
	m.opts.Logger.Info("snapshot taken at a flush point", "lu", name, "snapshot", snapName, "copies", froze,
		"writes_held", time.Since(began), "drain_flush", flushed.Sub(began), "freeze_here", frozen.Sub(flushed), "freeze_copies", time.Since(frozen))
	return froze, nil
}

// Rollback makes LU name read what its snapshot snapName (name@SNAP) holds,
// on this node, its writer, and on every copy (see above).
func (m *Manager) Rollback(ctx context.Context, name, snapName string) error {
	if of, _, ok := rules.SplitSnapshotLU(snapName); !ok || of != name {
		return fmt.Errorf("%q is not a snapshot of %s (LU@SNAP)", snapName, name)
	}
	mi, _, err := m.quiesceForMarker(ctx, name)
	if err != nil {
		return err
	}
	defer mi.gate.Unlock()
	if err := m.opts.Pool.Rollback(ctx, name, snapName); err != nil {
		return fmt.Errorf("roll back the writer's volume of %s: %w", name, err)
	}
	var errs []error
	for node, err := range mi.sendMarker(replproto.TypeRollback, snapName) {
		if err == nil {
			continue
		}
		for _, l := range mi.linkSet() {
			if l.node == node {
				if merr := mi.copyMissed(l, 0, mi.local.Size(), err); merr != nil {
					errs = append(errs, merr)
				}
			}
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("rolled back here, but a copy that missed it could not be recorded out of sync: %w", errors.Join(errs...))
	}
	m.opts.Logger.Info("rolled back to a snapshot", "lu", name, "snapshot", snapName)
	return nil
}

// quiesceForMarker returns the LU's Mirror with its gate held exclusively
// (no operation in flight, none starting), every copy in sync, and the
// volume and every copy flushed, and when it began to hold writes. The
// caller unlocks mi.gate.
func (m *Manager) quiesceForMarker(ctx context.Context, name string) (*Mirror, time.Time, error) {
	mi, ok := m.writerMirror(name)
	if !ok {
		return nil, time.Time{}, fmt.Errorf("%w: %s (ask its writer node)", ErrNotWriter, name)
	}
	// A first flush while writes go on writes back most of what the page
	// cache holds, so the one under the gate, which writes wait for, is
	// short.
	if err := mi.Flush(ctx); err != nil {
		return nil, time.Time{}, fmt.Errorf("flush %s before the snapshot: %w", name, err)
	}
	held := time.Now()
	mi.gate.Lock()
	m.opts.Logger.Debug("snapshot: writes drained", "lu", name, "drain", time.Since(held))
	ok = false
	defer func() {
		if !ok {
			mi.gate.Unlock()
		}
	}()
	if mi.handedOver.Load() || mi.fenced() {
		return nil, time.Time{}, fmt.Errorf("%w: %s moved to another writer meanwhile", ErrNotWriter, name)
	}
	for _, l := range mi.linkSet() {
		if st := copyState(l.state.Load()); st != stInSync || l.conn.Load() == nil {
			return nil, time.Time{}, fmt.Errorf("%w: the copy of %s on %s is %s; wait until it is in sync (lupool lu show %s) and try again",
				ErrCopyNotInSync, name, l.node, st.replicaState(), name)
		}
	}
	if err := mi.apply(ctx, replproto.Header{Type: replproto.TypeFlush}, nil, 0, 0, 0); err != nil {
		return nil, time.Time{}, fmt.Errorf("flush %s before the snapshot: %w", name, err)
	}
	ok = true
	return mi, held, nil
}

// sendMarker sends a Snapshot or Rollback marker naming snapName to every
// copy and returns each copy's answer. mi.gate is held exclusively.
func (mi *Mirror) sendMarker(typ replproto.Type, snapName string) map[string]error {
	f := mi.send(replproto.Header{Type: typ}, replproto.AppendSnapshot(nil, snapName))
	out := make(map[string]error, len(f.links))
	for i, l := range f.links {
		if f.calls[i] == nil {
			out[l.node] = ErrPeerDown
			continue
		}
		_, out[l.node] = f.conns[i].wait(f.calls[i])
		f.calls[i] = nil
	}
	return out
}

// applyMarker runs a Snapshot or Rollback marker from the writer on this
// node's copy of the LU the stream serves.
func (m *Manager) applyMarker(ctx context.Context, tgt target, typ replproto.Type, payload []byte) error {
	if tgt.role != replproto.RoleCopy {
		return fmt.Errorf("%w: %v on a client stream", blockdev.ErrInvalid, typ)
	}
	snapName, of, err := replproto.ParseSnapshot(payload)
	if err != nil {
		return err
	}
	if of != tgt.name {
		return fmt.Errorf("%w: %v of %q on the stream of %s", blockdev.ErrInvalid, typ, snapName, tgt.name)
	}
	if typ == replproto.TypeRollback {
		return m.opts.Pool.Rollback(ctx, of, snapName)
	}
	_, snap, _ := rules.SplitSnapshotLU(snapName)
	_, err = m.opts.Pool.Snapshot(ctx, of, snap)
	return err
}

// isImageDisk reports whether an overlay's base name is an image disk
// (a linked clone's base, which a flatten may cut) rather than one of the
// LU's own snapshots (which stay until deleted).
func isImageDisk(baseName string) bool {
	_, _, ok := rules.SplitImageLU(baseName)
	return ok
}

// deleteVolume deletes the local volume name; a snapshot is merged into
// the LU that reads it first (lu.Pool.DeleteSnapshot), while writes to the
// LU go on.
func (m *Manager) deleteVolume(name string) error {
	if of, _, ok := rules.SplitSnapshotLU(name); ok {
		ctx, cancel := m.untilQuit()
		defer cancel()
		return m.opts.Pool.DeleteSnapshot(ctx, of, name)
	}
	return m.opts.Pool.Delete(name)
}
