package lu

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/lupool/lupool/lu/lufs"

	"github.com/lupool/lupool/internal/rules"
)

// Snapshots of pool volumes (issue 15, item 3). A snapshot of volume L
// named S is the pool volume L@S (rules.SnapshotLUName; files L+S.lu and,
// for an overlay layer, L+S.lumap.*): Pool.Snapshot renames L's current
// files to L+S (so the snapshot costs a few renames and an empty map, not
// a copy), and L becomes a new, empty overlay at L's paths that reads every
// block from L@S. A plain file volume becomes an overlay in place (its
// FileVolume forwards every call to the overlay from then on), so whoever
// holds it (a replication Mirror, the front end) keeps using the same
// value. Pool.Rollback points L back at one of its snapshots; later
// snapshots stay. Pool.DeleteSnapshot merges a snapshot into the layers
// that read it (L, a later snapshot) and deletes it.
//
// The caller drains and holds the volume's writes while Snapshot and
// Rollback run (replication's Mirror does, at a flush point).
//
// An interrupted snapshot (a crash, a failed step) is finished or undone
// (intent files, below).

// Snapshot errors.
var (
	// ErrNotSnapshot is returned by Rollback and DeleteSnapshot for a
	// volume that is not a snapshot of the LU.
	ErrNotSnapshot = errors.New("lu: not a snapshot of this volume")
	// ErrSnapshotInUse is returned by DeleteSnapshot for a snapshot that
	// a later snapshot or a clone reads.
	ErrSnapshotInUse = errors.New("lu: snapshot is read by another layer")
)

// isSnapshotName reports whether a volume's name is a snapshot's, LU@SNAP.
func isSnapshotName(name string) bool {
	_, _, ok := rules.SplitSnapshotLU(name)
	return ok
}

// overlayOf returns the overlay a volume is: an *Overlay, or a FileVolume
// that a snapshot made an overlay; nil for a plain volume.
func overlayOf(v Volume) *Overlay {
	switch x := v.(type) {
	case *Overlay:
		return x
	case *FileVolume:
		return x.overlay()
	}
	return nil
}

// Snapshot freezes volume name's current content as the new pool volume
// name@snap (see above) and returns it. name must be a file volume; its
// writes must be held by the caller. On error before the renames nothing
// changed.
func (p *Pool) Snapshot(ctx context.Context, name, snap string) (Volume, error) {
	if err := rules.SnapshotName(name, snap); err != nil {
		return nil, fmt.Errorf("%w: snapshot %q of %q: %w", ErrInvalidName, snap, name, err)
	}
	snapName := rules.SnapshotLUName(name, snap)
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.mu.closed {
		return nil, ErrPoolClosed
	}
	e, ok := p.mu.vols[name]
	if !ok {
		return nil, fmt.Errorf("%w: %q", ErrNotFound, name)
	}
	if _, ok := p.mu.vols[snapName]; ok {
		return nil, fmt.Errorf("%w: %q", ErrExists, snapName)
	}
	if e.dir < 0 {
		return nil, fmt.Errorf("%w: %q is a memory volume; only file volumes have snapshots", ErrCloneBase, name)
	}
	if err := e.vol.Flush(ctx); err != nil {
		return nil, err
	}
	o := overlayOf(e.vol)
	fv, plain := e.vol.(*FileVolume)
	if o == nil && !plain {
		return nil, fmt.Errorf("%w: %q cannot be snapshotted", ErrCloneBase, name)
	}
	if err := p.writeIntentLocked(e.dir, name, snapName); err != nil {
		return nil, err
	}
	var frozen Volume
	var err error
	if o != nil {
		frozen, err = p.snapshotOverlayLocked(ctx, o, e.dir, name, snapName)
	} else {
		frozen, err = p.snapshotFileLocked(fv, e.dir, name, snapName)
	}
	if serr := p.settleIntentLocked(e.dir, name, snapName); serr != nil {
		err = errors.Join(err, serr)
	}
	if err != nil {
		return nil, err
	}
	p.mu.vols[snapName] = poolEntry{vol: frozen, dir: e.dir, snapshot: true}
	p.opts.Logger.Info("lu: snapshot taken", "volume", name, "snapshot", snapName)
	return frozen, nil
}

// renameLocked renames volume from's files (data, and map slots when
// withMap) to volume to's in directory dir and syncs the directory.
func (p *Pool) renameLocked(dir int, from, to string, withMap bool) error {
	pairs := [][2]string{{p.volumePath(dir, from), p.volumePath(dir, to)}}
	if withMap {
		for i := range 2 {
			pairs = append(pairs, [2]string{slotPath(p.mapPath(dir, from), i), slotPath(p.mapPath(dir, to), i)})
		}
	}
	for _, pr := range pairs {
		if err := p.opts.FS.Rename(pr[0], pr[1]); err != nil && !(withMap && errors.Is(err, os.ErrNotExist) && strings.Contains(pr[0], mapFileSuffix)) {
			return ioError("rename", pr[0], err)
		}
	}
	if err := p.opts.FS.SyncDir(p.dirs[dir]); err != nil {
		return ioError("sync directory", p.dirs[dir], err)
	}
	return nil
}

// snapshotFileLocked: a plain file volume's file becomes snapName; fv
// becomes an overlay over it.
func (p *Pool) snapshotFileLocked(fv *FileVolume, dir int, name, snapName string) (Volume, error) {
	if err := p.renameLocked(dir, name, snapName, false); err != nil {
		return nil, err
	}
	base, err := openFileVolume(p.opts.FS, p.volumePath(dir, snapName))
	if err != nil {
		return nil, err
	}
	data, err := createFileVolume(p.opts.FS, p.volumePath(dir, name), fv.Size())
	if err != nil {
		_ = base.Close()
		return nil, err
	}
	o, err := CreateOverlay(OverlayOptions{Data: data, Base: base, BaseName: snapName, FS: p.opts.FS, MapPath: p.mapPath(dir, name)})
	if err != nil {
		_ = data.Close()
		_ = base.Close()
		return nil, err
	}
	fv.over.Store(o)
	return base, nil
}

// snapshotOverlayLocked: overlay o's layer (data and map) becomes
// snapName, frozen; o gets a new empty layer at name's paths.
func (p *Pool) snapshotOverlayLocked(ctx context.Context, o *Overlay, dir int, name, snapName string) (Volume, error) {
	if o.Depth()+1 > MaxChainDepth {
		return nil, fmt.Errorf("%w: %d layers, at most %d; delete a snapshot first", ErrChainTooDeep, o.Depth()+1, MaxChainDepth)
	}
	if err := p.renameLocked(dir, name, snapName, true); err != nil {
		return nil, err
	}
	data, err := createFileVolume(p.opts.FS, p.volumePath(dir, name), o.Size())
	if err != nil {
		return nil, err
	}
	frozen, err := o.Snapshot(ctx, OverlayOptions{Data: data, BaseName: snapName, FS: p.opts.FS, MapPath: p.mapPath(dir, name)})
	if err != nil {
		_ = data.Close()
		return nil, err
	}
	// frozen still names its files by their old paths: reopen it from
	// the new ones and link o to the reopened layer.
	frozen.mu.RLock()
	below, belowName := frozen.mu.base, frozen.mu.baseName
	frozen.mu.RUnlock()
	fdata, err := openFileVolume(p.opts.FS, p.volumePath(dir, snapName))
	if err != nil {
		return nil, err
	}
	re, err := OpenOverlay(OverlayOptions{Data: fdata, Base: below, BaseName: belowName, FS: p.opts.FS, MapPath: p.mapPath(dir, snapName)})
	if err != nil {
		_ = fdata.Close()
		return nil, err
	}
	if err := o.relink(ctx, frozen, re, snapName); err != nil {
		_ = re.Close()
		return nil, err
	}
	if err := frozen.Close(); err != nil {
		p.opts.Logger.Warn("lu: close the renamed snapshot layer", "snapshot", snapName, "err", err)
	}
	return re, nil
}

// Rollback makes volume name read exactly what its snapshot snapName
// holds (the blocks written since are dropped); snapshots taken after
// snapName stay as they are. The caller holds the volume's writes.
func (p *Pool) Rollback(ctx context.Context, name, snapName string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	e, ok := p.mu.vols[name]
	if !ok {
		return fmt.Errorf("%w: %q", ErrNotFound, name)
	}
	s, ok := p.mu.vols[snapName]
	lu, _, isSnap := rules.SplitSnapshotLU(snapName)
	if !ok || !isSnap || lu != name {
		return fmt.Errorf("%w: %q of %q", ErrNotSnapshot, snapName, name)
	}
	o := overlayOf(e.vol)
	base, isBase := s.vol.(Base)
	if o == nil || !isBase {
		return fmt.Errorf("%w: %q of %q", ErrNotSnapshot, snapName, name)
	}
	if err := o.Rollback(ctx, base, snapName); err != nil {
		return err
	}
	p.opts.Logger.Info("lu: rolled back", "volume", name, "snapshot", snapName)
	return nil
}

// DeleteSnapshot merges snapshot snapName into every layer that reads it
// (the volume name, a later snapshot of it; each keeps reading what it
// read, a later snapshot stays frozen) and deletes it, while writes to
// name go on. A snapshot that a linked clone reads is refused with
// ErrSnapshotInUse.
func (p *Pool) DeleteSnapshot(ctx context.Context, name, snapName string) error {
	if lu, _, ok := rules.SplitSnapshotLU(snapName); !ok || lu != name {
		return fmt.Errorf("%w: %q of %q", ErrNotSnapshot, snapName, name)
	}
	p.mu.Lock()
	s, ok := p.mu.vols[snapName]
	var readers []*Overlay
	var names []string
	if ok {
		names = p.clonesOfLocked(s.vol)
		for _, r := range names {
			readers = append(readers, overlayOf(p.mu.vols[r].vol))
		}
	}
	p.mu.Unlock()
	if !ok {
		return fmt.Errorf("%w: %q", ErrNotFound, snapName)
	}
	for _, r := range names {
		if of, _, isSnap := rules.SplitSnapshotLU(r); r != name && (!isSnap || of != name) {
			return fmt.Errorf("%w: %q is read by %s; delete or flatten that first", ErrSnapshotInUse, snapName, r)
		}
	}
	_, layered := s.vol.(*Overlay)
	for i, o := range readers {
		var err error
		if layered {
			err = o.MergeBase(ctx)
		} else {
			err = o.Flatten(ctx) // a plain snapshot is the bottom of the chain
		}
		if err != nil {
			return fmt.Errorf("lu: merge snapshot %q into %q: %w", snapName, names[i], err)
		}
	}
	return p.Delete(snapName)
}

// Crash safety of Snapshot. Before its first rename, Snapshot writes an
// intent file <dir>/<L>.snapshot-intent naming the snapshot (L@S), synced;
// it removes the file once L's new map names L@S as its base. OpenPool
// finds a leftover intent before it opens any volume (recoverIntents): if
// L's map names L@S the snapshot completed and the intent goes; else no
// write reached L's new layer (its map did not exist yet), so the new
// files go and L+S's files are renamed back to L's. The same undo runs
// when Snapshot fails half way.

// intentSuffix names a snapshot's intent file: <L>.snapshot-intent. Part
// of the on-disk format.
const intentSuffix = ".snapshot-intent"

func (p *Pool) intentPath(dir int, name string) string {
	return filepath.Join(p.dirs[dir], fileNameOf(name)+intentSuffix)
}

// writeIntentLocked records that name's snapshot snapName is being taken.
func (p *Pool) writeIntentLocked(dir int, name, snapName string) error {
	path := p.intentPath(dir, name)
	f, err := p.opts.FS.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return ioError("create", path, err)
	}
	_, err = f.WriteAt([]byte(snapName), 0)
	if err == nil {
		err = f.Sync()
	}
	err = errors.Join(err, f.Close())
	if err == nil {
		err = p.opts.FS.SyncDir(p.dirs[dir])
	}
	if err != nil {
		_ = p.opts.FS.Remove(path)
		return ioError("write", path, err)
	}
	return nil
}

// readIntent returns the snapshot an intent file names.
func readIntent(fsys lufs.FS, path string) (string, error) {
	f, err := fsys.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return "", err
	}
	defer f.Close()
	buf := make([]byte, rules.NameLengthMax+1)
	n, err := f.ReadAt(buf, 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return "", err
	}
	return string(buf[:n]), nil
}

// settleIntentLocked finishes or undoes the snapshot the intent of name in
// directory dir records (see above) and removes the intent.
func (p *Pool) settleIntentLocked(dir int, name, snapName string) error {
	fsys := p.opts.FS
	mapPath := p.mapPath(dir, name)
	exists := func(path string) bool { _, err := fsys.Stat(path); return err == nil }
	if base, err := OverlayBaseName(fsys, mapPath); err != nil || base != snapName {
		// Not complete: the snapshot's files (those renamed so far) go
		// back to name's, replacing what was made for the new layer.
		from := []string{p.volumePath(dir, snapName), slotPath(p.mapPath(dir, snapName), 0), slotPath(p.mapPath(dir, snapName), 1)}
		to := []string{p.volumePath(dir, name), slotPath(mapPath, 0), slotPath(mapPath, 1)}
		// Nothing renamed yet (no L+S data file): no new map was made
		// either (never before the renames), so nothing to undo.
		if exists(from[0]) {
			for i := range from {
				if !exists(from[i]) {
					continue
				}
				if exists(to[i]) {
					if err := fsys.Remove(to[i]); err != nil {
						return ioError("remove", to[i], err)
					}
				}
				if err := fsys.Rename(from[i], to[i]); err != nil {
					return ioError("rename", from[i], err)
				}
			}
		}
		p.opts.Logger.Warn("lu: an interrupted snapshot was undone", "volume", name, "snapshot", snapName)
	}
	path := p.intentPath(dir, name)
	if err := fsys.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return ioError("remove", path, err)
	}
	if err := fsys.SyncDir(p.dirs[dir]); err != nil {
		return ioError("sync directory", p.dirs[dir], err)
	}
	return nil
}

// recoverIntents settles the snapshot intents left in directory dir, whose
// entries are names; it reports whether it changed the directory.
func (p *Pool) recoverIntents(dir int, names []string) (bool, error) {
	changed := false
	for _, file := range names {
		stem, ok := strings.CutSuffix(file, intentSuffix)
		if !ok {
			continue
		}
		name := nameOfFile(stem)
		snapName, err := readIntent(p.opts.FS, filepath.Join(p.dirs[dir], file))
		if err != nil {
			return changed, fmt.Errorf("lu: pool: read snapshot intent %s: %w", file, err)
		}
		if of, _, ok := rules.SplitSnapshotLU(snapName); !ok || of != name {
			return changed, fmt.Errorf("lu: pool: snapshot intent %s names %q, not a snapshot of %q; remove it by hand", file, snapName, name)
		}
		if err := p.settleIntentLocked(dir, name, snapName); err != nil {
			return changed, fmt.Errorf("lu: pool: settle the interrupted snapshot %s: %w", snapName, err)
		}
		changed = true
	}
	return changed, nil
}
