package lu

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// mapFileSuffix names a clone's map: <dir>/<name>.lumap.0 and .1, beside
// its data file <dir>/<name>.lu.
const mapFileSuffix = ".lumap"

// Clone errors.
var (
	// ErrHasClones is returned by Pool.Delete for a volume that linked
	// clones read from; delete or flatten them first.
	ErrHasClones = errors.New("lu: volume has linked clones")
	// ErrCloneBase is returned by Pool.CreateClone for a base that cannot
	// carry a clone (a memory volume, or a clone smaller than its base).
	ErrCloneBase = errors.New("lu: cannot clone this volume")
)

// CreateClone makes name a linked clone of the pool volume base: an
// Overlay whose data file and map sit in base's directory, reading every
// block from base until the clone writes it. It costs a few system calls
// whatever the size. sizeBytes 0 means base's size; a clone may be larger
// than its base (the tail reads zeros), not smaller. The clone counts its
// whole size against the overcommit limit like any volume; the pool never
// writes base, and the caller keeps base read-only (clients must not write
// it while clones read it).
func (p *Pool) CreateClone(name, base string, sizeBytes int64) (*Overlay, error) {
	if err := ValidateName(name); err != nil {
		return nil, err
	}
	o, err := p.createClone(name, base, sizeBytes)
	if err != nil {
		return nil, err
	}
	p.opts.Logger.Info("lu: clone created", "name", name, "base", base, "size_bytes", o.Size())
	p.CheckThresholds()
	return o, nil
}

func (p *Pool) createClone(name, base string, sizeBytes int64) (*Overlay, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.mu.closed {
		return nil, ErrPoolClosed
	}
	delete(p.mu.reserved, name)
	if _, ok := p.mu.vols[name]; ok {
		return nil, fmt.Errorf("%w: %q", ErrExists, name)
	}
	b, ok := p.mu.vols[base]
	if !ok {
		return nil, fmt.Errorf("%w: base %q", ErrNotFound, base)
	}
	if b.dir < 0 {
		return nil, fmt.Errorf("%w: %q is a memory volume", ErrCloneBase, base)
	}
	baseVol, ok := b.vol.(Base)
	if !ok {
		return nil, fmt.Errorf("%w: %q reports no allocation", ErrCloneBase, base)
	}
	if sizeBytes == 0 {
		sizeBytes = b.vol.Size()
	}
	if sizeBytes < b.vol.Size() {
		return nil, fmt.Errorf("%w: clone of %d bytes is smaller than %q (%d bytes)", ErrCloneBase, sizeBytes, base, b.vol.Size())
	}
	stats, err := p.statfsAll()
	if err != nil {
		return nil, err
	}
	if err := p.checkOvercommitLocked(stats, name, sizeBytes); err != nil {
		return nil, err
	}
	data, err := createFileVolume(p.opts.FS, p.volumePath(b.dir, name), sizeBytes)
	if err != nil {
		return nil, err
	}
	o, err := CreateOverlay(OverlayOptions{Data: data, Base: baseVol, BaseName: base, FS: p.opts.FS, MapPath: p.mapPath(b.dir, name)})
	if err != nil {
		_ = data.Close()
		_ = p.opts.FS.Remove(data.path)
		return nil, err
	}
	p.mu.vols[name] = poolEntry{vol: o, dir: b.dir}
	return o, nil
}

func (p *Pool) mapPath(dir int, name string) string {
	return filepath.Join(p.dirs[dir], fileNameOf(name)+mapFileSuffix)
}

// clonesOfLocked returns the names of the volumes whose base is vol,
// sorted. p.mu must be held.
func (p *Pool) clonesOfLocked(vol Volume) []string {
	var out []string
	for n, e := range p.mu.vols {
		if o := overlayOf(e.vol); o != nil {
			o.mu.RLock()
			base := o.mu.base
			o.mu.RUnlock()
			if base != nil && base == Base(vol) {
				out = append(out, n)
			}
		}
	}
	sort.Strings(out)
	return out
}

// Clones returns the names of the linked clones that read from name.
func (p *Pool) Clones(name string) []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	e, ok := p.mu.vols[name]
	if !ok {
		return nil
	}
	return p.clonesOfLocked(e.vol)
}

// removeOverlayFiles deletes a clone's data file and map slots.
func (p *Pool) removeOverlayFiles(o *Overlay, dir int) error {
	o.mu.RLock()
	fv, _ := o.mu.data.(*FileVolume)
	mf := o.mu.mapFile
	o.mu.RUnlock()
	var err error
	if fv != nil {
		if rerr := p.opts.FS.Remove(fv.path); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
			err = ioError("remove", fv.path, rerr)
		}
	}
	if mf != nil {
		for i := range mf.files {
			if rerr := p.opts.FS.Remove(slotPath(mf.path, i)); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
				err = errors.Join(err, ioError("remove", slotPath(mf.path, i), rerr))
			}
		}
	}
	if serr := p.opts.FS.SyncDir(p.dirs[dir]); serr != nil {
		err = errors.Join(err, ioError("sync directory", p.dirs[dir], serr))
	}
	return err
}

// pendingClone is a clone found on disk whose base may not be open yet.
type pendingClone struct {
	name, dataPath, mapPath string
	dir                     int
}

// isClone reports whether the volume file of name in dir has a map beside
// it (names holds the directory's entries).
func isClone(names map[string]bool, name string) bool {
	stem := fileNameOf(name)
	return names[stem+mapFileSuffix+".0"] || names[stem+mapFileSuffix+".1"]
}

// openClones opens the clones found on disk once their bases are open,
// bases first. A clone whose base is missing, or that is part of a cycle,
// fails OpenPool: its data stays on disk untouched.
func (p *Pool) openClones(pending []pendingClone) error {
	for len(pending) > 0 {
		var next []pendingClone
		for _, c := range pending {
			baseName, err := OverlayBaseName(p.opts.FS, c.mapPath)
			if err != nil {
				return fmt.Errorf("lu: pool: reopen clone %q: %w", c.name, err)
			}
			var base Base // nil: a flattened clone reads nothing below
			if baseName != "" {
				b, ok := p.mu.vols[baseName]
				if !ok {
					next = append(next, c)
					continue
				}
				if base, ok = b.vol.(Base); !ok {
					return fmt.Errorf("lu: pool: reopen clone %q: %w: base %q", c.name, ErrCloneBase, baseName)
				}
			}
			data, err := openFileVolume(p.opts.FS, c.dataPath)
			if err != nil {
				return fmt.Errorf("lu: pool: reopen clone %q: %w", c.name, err)
			}
			o, err := OpenOverlay(OverlayOptions{Data: data, Base: base, BaseName: baseName, FS: p.opts.FS, MapPath: c.mapPath})
			if err != nil {
				_ = data.Close()
				return fmt.Errorf("lu: pool: reopen clone %q: %w", c.name, err)
			}
			p.mu.vols[c.name] = poolEntry{vol: o, dir: c.dir, snapshot: isSnapshotName(c.name)}
		}
		if len(next) == len(pending) {
			names := make([]string, len(next))
			for i, c := range next {
				names[i] = c.name
			}
			return fmt.Errorf("lu: pool: clones %s: base volume missing (or a cycle); their files are left as they are", strings.Join(names, ", "))
		}
		pending = next
	}
	return nil
}
