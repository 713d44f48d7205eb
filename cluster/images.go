package cluster

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/lupool/lupool/internal/rules"
)

// Images and linked clones (issue 15). An image is a record
// ("meta/image/" + name) and one read-only LU per disk, named IMAGE/0,
// IMAGE/1, ... in source order. image.create records the image as
// importing together with its disks' LUs (writable, so that the importer
// can fill them); image.ready records the disks' content hashes and makes
// the LUs read-only in the same command; image.delete removes the record
// and its LUs together, and is refused while a linked clone reads one of
// them. A linked clone is an LU whose Base names a disk of a ready image
// and whose copies all sit on nodes holding a copy of that disk (every
// copy reads the image locally). lu.flatten cuts a clone's link once every
// copy holds the image's blocks itself.

// Image states, as stored in Image.State.
const (
	ImageImporting = "importing"
	ImageReady     = "ready"
)

const imagePrefix = "meta/image/"

var (
	// ErrImageNotFound is returned by GetImage, MarkImageReady and
	// DeleteImage when no image has that name.
	ErrImageNotFound = errors.New("cluster: image not found")
	// ErrImageExists is returned by CreateImage when an image or an LU
	// of its disks' names exists.
	ErrImageExists = errors.New("cluster: image already exists")
	// ErrHasClones is returned by DeleteImage while linked clones read
	// one of the image's disks.
	ErrHasClones = errors.New("cluster: image has linked clones")
)

// Image is one image's record.
type Image struct {
	Name string `json:"name"`
	// State is ImageImporting or ImageReady.
	State string `json:"state"`
	// Copies is the copy count of every disk's LU.
	Copies int         `json:"copies"`
	Disks  []ImageDisk `json:"disks"`
	// CreatedOn is the node whose API created it.
	CreatedOn string    `json:"created_on,omitempty"`
	CreatedAt time.Time `json:"created_at"`
	UpdatedAt time.Time `json:"updated_at"`
}

// ImageDisk is one disk of an image.
type ImageDisk struct {
	// LU is the disk's LU, IMAGE/N for the disk's index N.
	LU        string `json:"lu"`
	SizeBytes int64  `json:"size_bytes"`
	// Source is what the importer read (a path or URI), for people.
	Source string `json:"source,omitempty"`
	// SHA256 is the content hash (package blockcopy's definition, hex)
	// of the source, checked against the stored copy; set by image.ready.
	SHA256 string `json:"sha256,omitempty"`
	// SentBytes is what the import wrote (holes and zero blocks are not).
	SentBytes int64 `json:"sent_bytes,omitempty"`
}

// validateImageFields checks an LU record's image fields: an image's disk
// is named IMAGE/N after its image; only such a disk is read-only; a clone
// names an image disk as its base and is no disk itself.
func validateImageFields(lu *LU) error {
	image, _, isDisk := rules.SplitImageLU(lu.Name)
	switch {
	case isDisk && lu.Image != image:
		return fmt.Errorf("%w: LU name %q is an image disk's; only image import creates it", ErrInvalid, lu.Name)
	case !isDisk && lu.Image != "":
		return fmt.Errorf("%w: LU %q of image %q must be named %s/N", ErrInvalid, lu.Name, lu.Image, lu.Image)
	case lu.ReadOnly && lu.Image == "" && lu.SnapshotOf == "":
		return fmt.Errorf("%w: only an image's disks and snapshots are read-only", ErrInvalid)
	}
	if lu.Base != "" {
		if _, _, ok := rules.SplitImageLU(lu.Base); !ok {
			return fmt.Errorf("%w: base %q: a linked clone's base is an image disk IMAGE/N", ErrInvalid, lu.Base)
		}
		if lu.Image != "" {
			return fmt.Errorf("%w: an image's disk %q cannot be a linked clone", ErrInvalid, lu.Name)
		}
		if lu.Kind != KindFile {
			return fmt.Errorf("%w: a linked clone is a file LU, not %s", ErrInvalid, lu.Kind)
		}
	}
	return nil
}

func (f *fsm) getImage(name string) (Image, error) {
	var img Image
	found, err := getJSON(f.db, imagePrefix+name, &img)
	if err != nil {
		return Image{}, err
	}
	if !found {
		return Image{}, fmt.Errorf("%w: %q", ErrImageNotFound, name)
	}
	return img, nil
}

func listImages(r reader) ([]Image, error) {
	var out []Image
	err := scan(r, imagePrefix, func(k, v []byte) error {
		var img Image
		if err := json.Unmarshal(v, &img); err != nil {
			return fmt.Errorf("cluster: decode %s: %w", k, err)
		}
		out = append(out, img)
		return nil
	})
	return out, err
}

// checkPlainCreate checks an lu.create beyond validateLU: image disks are
// made only by image.create; a clone's base is a disk of a ready image,
// every copy of the clone sits on a node holding a copy of the base, and
// the clone is at least as large.
func (f *fsm) checkPlainCreate(lu LU) error {
	if lu.SnapshotOf != "" {
		return fmt.Errorf("%w: LU %q: snapshots are created by lu snapshot only", ErrInvalid, lu.Name)
	}
	if err := checkNotECShard(lu.Name); err != nil {
		return err
	}
	if lu.Image != "" || lu.ReadOnly {
		return fmt.Errorf("%w: LU %q: image disks are created by image import only", ErrInvalid, lu.Name)
	}
	if lu.Base == "" {
		return nil
	}
	base, err := f.mustGetLU(lu.Base)
	if errors.Is(err, ErrNotFound) {
		return fmt.Errorf("%w: base %q: no such image disk (see lupool image list)", ErrInvalid, lu.Base)
	}
	if err != nil {
		return err
	}
	return checkClone(lu, base)
}

// checkClone checks a clone's record against its base's.
func checkClone(lu, base LU) error {
	if base.Image == "" || !base.ReadOnly {
		return fmt.Errorf("%w: base %q is not a disk of a ready image", ErrInvalid, base.Name)
	}
	if lu.SizeBytes < base.SizeBytes {
		return fmt.Errorf("%w: a clone of %q needs at least %d bytes (its size), not %d", ErrInvalid, base.Name, base.SizeBytes, lu.SizeBytes)
	}
	for _, r := range lu.Replicas {
		if !holdsCopyOn(base, r.NodeID) {
			return fmt.Errorf("%w: clone %q has a copy on %s, which holds no copy of image disk %q (a clone's copies read the image locally)",
				ErrInvalid, lu.Name, r.NodeID, base.Name)
		}
	}
	return nil
}

func holdsCopyOn(lu LU, node string) bool {
	for _, r := range lu.Replicas {
		if r.NodeID == node {
			return true
		}
	}
	return false
}

func replicaStateOn(lu LU, node string) string {
	for _, r := range lu.Replicas {
		if r.NodeID == node {
			return r.State
		}
	}
	return ""
}

// checkResize refuses resizing an image disk, and shrinking a clone
// below its base.
func (f *fsm) checkResize(lu LU, sizeBytes int64) error {
	if lu.SnapshotOf != "" {
		return fmt.Errorf("%w: %q is a snapshot and is never resized", ErrInvalid, lu.Name)
	}
	if lu.ReadOnly || lu.Image != "" {
		return fmt.Errorf("%w: %q is a disk of image %q and is never resized", ErrInvalid, lu.Name, lu.Image)
	}
	if err := f.checkNoSnapshots(lu.Name, "resize"); err != nil {
		return err
	}
	if lu.Base == "" || sizeBytes >= lu.SizeBytes {
		return nil
	}
	return fmt.Errorf("%w: %q is a linked clone of %q; it can grow, not shrink (flatten it first)", ErrInvalid, lu.Name, lu.Base)
}

// checkNewImage checks an image.create body: a new image name, one to
// ImageDisksMax disks named IMAGE/0, IMAGE/1, ... whose LU records are
// valid new LUs of the image, writable, and each with the image's copy
// count.
func (f *fsm) checkNewImage(img Image, lus []LU, members map[string]bool) error {
	if err := rules.ImageName(img.Name); err != nil {
		return fmt.Errorf("%w: image name %q: %w", ErrInvalid, img.Name, err)
	}
	if _, err := f.getImage(img.Name); err == nil {
		return fmt.Errorf("%w: %q", ErrImageExists, img.Name)
	} else if !errors.Is(err, ErrImageNotFound) {
		return err
	}
	if img.State != ImageImporting {
		return fmt.Errorf("%w: a new image is %q, not %q", ErrInvalid, ImageImporting, img.State)
	}
	if len(img.Disks) == 0 || len(img.Disks) > rules.ImageDisksMax || len(lus) != len(img.Disks) {
		return fmt.Errorf("%w: image %q has %d disks and %d LUs; use 1 to %d sources", ErrInvalid, img.Name, len(img.Disks), len(lus), rules.ImageDisksMax)
	}
	if err := rules.Copies(img.Copies); err != nil {
		return fmt.Errorf("%w: copies %d: %w", ErrInvalid, img.Copies, err)
	}
	for i, d := range img.Disks {
		lu := lus[i]
		want := rules.ImageLUName(img.Name, i)
		switch {
		case d.LU != want || lu.Name != want:
			return fmt.Errorf("%w: disk %d of image %q is %q (LU %q), want %q", ErrInvalid, i, img.Name, d.LU, lu.Name, want)
		case lu.Image != img.Name || lu.ReadOnly || lu.Base != "" || lu.Kind != KindFile:
			return fmt.Errorf("%w: LU %q must be a writable file LU of image %q while it imports", ErrInvalid, lu.Name, img.Name)
		case lu.SizeBytes != d.SizeBytes:
			return fmt.Errorf("%w: LU %q is %d bytes, its disk %d", ErrInvalid, lu.Name, lu.SizeBytes, d.SizeBytes)
		case lu.Copies != img.Copies:
			return fmt.Errorf("%w: LU %q has %d copies, its image %d", ErrInvalid, lu.Name, lu.Copies, img.Copies)
		case d.SHA256 != "":
			return fmt.Errorf("%w: disk %q has a hash before it was imported", ErrInvalid, d.LU)
		}
		if err := validateLU(&lu); err != nil {
			return err
		}
		if err := checkCreate(lu, members); err != nil {
			return err
		}
		if _, err := f.mustGetLU(lu.Name); err == nil {
			return fmt.Errorf("%w: LU %q exists", ErrImageExists, lu.Name)
		} else if !errors.Is(err, ErrNotFound) {
			return err
		}
	}
	return nil
}

func (f *fsm) applyCreateImage(b *pebble.Batch, c *command, index uint64) applyResult {
	img := *c.Image
	img.CreatedAt, img.UpdatedAt = c.At, c.At
	if !c.Primary {
		return applyResult{err: fmt.Errorf("%w: %q proposes image %q; only the primary creates images", ErrForeignRecord, c.By, img.Name)}
	}
	lus := make([]LU, len(c.LUs))
	for i, lu := range c.LUs {
		lu.CreatedAt, lu.UpdatedAt = c.At, c.At
		lus[i] = lu
	}
	members, err := memberSet(f.db)
	if err != nil {
		return applyResult{err: err}
	}
	if err := f.checkNewImage(img, lus, members); err != nil {
		return applyResult{err: err}
	}
	if err := putJSON(b, imagePrefix+img.Name, img); err != nil {
		return applyResult{err: err}
	}
	var res applyResult
	for _, lu := range lus {
		r := f.putLU(b, lu, Created, index)
		if r.err != nil {
			return r
		}
		res.addChange(*r.change)
		res.events = append(res.events, Event{Time: c.At, Kind: EventLUCreated, LU: lu.Name, Node: lu.Writer, By: c.By, Details: map[string]string{
			"size_bytes": strconv.FormatInt(lu.SizeBytes, 10), "copies": strconv.Itoa(lu.Copies), "kind": lu.Kind, "writer": lu.Writer, "image": img.Name,
		}})
	}
	return res
}

// applyImageReady records an importing image's hashes and makes its disks
// read-only.
func (f *fsm) applyImageReady(b *pebble.Batch, c *command, index uint64) applyResult {
	if !c.Primary {
		return applyResult{err: fmt.Errorf("%w: %q proposes image %q ready; only the primary does", ErrForeignRecord, c.By, c.Image.Name)}
	}
	img, err := f.getImage(c.Image.Name)
	if err != nil {
		return applyResult{err: err}
	}
	if img.State != ImageImporting {
		return applyResult{err: fmt.Errorf("%w: image %q is %s already", ErrInvalid, img.Name, img.State)}
	}
	if len(c.Image.Disks) != len(img.Disks) {
		return applyResult{err: fmt.Errorf("%w: image %q has %d disks, the command %d", ErrInvalid, img.Name, len(img.Disks), len(c.Image.Disks))}
	}
	var res applyResult
	for i, d := range c.Image.Disks {
		if d.LU != img.Disks[i].LU || d.SizeBytes != img.Disks[i].SizeBytes {
			return applyResult{err: fmt.Errorf("%w: disk %d is %q of %d bytes, the command says %q of %d", ErrInvalid, i, img.Disks[i].LU, img.Disks[i].SizeBytes, d.LU, d.SizeBytes)}
		}
		if h, err := hex.DecodeString(d.SHA256); err != nil || len(h) != 32 {
			return applyResult{err: fmt.Errorf("%w: disk %q: content hash %q is not 64 hex digits", ErrInvalid, d.LU, d.SHA256)}
		}
		if d.SentBytes < 0 || d.SentBytes > d.SizeBytes {
			return applyResult{err: fmt.Errorf("%w: disk %q: %d bytes sent of %d", ErrInvalid, d.LU, d.SentBytes, d.SizeBytes)}
		}
		img.Disks[i].SHA256, img.Disks[i].SentBytes = d.SHA256, d.SentBytes
		lu, err := f.mustGetLU(d.LU)
		if err != nil {
			return applyResult{err: err}
		}
		lu.ReadOnly, lu.UpdatedAt = true, c.At
		r := f.putLU(b, lu, Updated, index)
		if r.err != nil {
			return r
		}
		res.addChange(*r.change)
	}
	img.State, img.UpdatedAt = ImageReady, c.At
	if err := putJSON(b, imagePrefix+img.Name, img); err != nil {
		return applyResult{err: err}
	}
	return res
}

// clonesOf returns the LUs whose base is one of names.
func clonesOf(lus []LU, names map[string]bool) []string {
	var out []string
	for _, lu := range lus {
		if lu.Base != "" && names[lu.Base] {
			out = append(out, lu.Name)
		}
	}
	return out
}

func (f *fsm) applyDeleteImage(b *pebble.Batch, c *command, index uint64) applyResult {
	if !c.Primary {
		return applyResult{err: fmt.Errorf("%w: %q proposes deleting image %q; only the primary does", ErrForeignRecord, c.By, c.Name)}
	}
	img, err := f.getImage(c.Name)
	if err != nil {
		return applyResult{err: err}
	}
	lus, err := listLUs(f.db)
	if err != nil {
		return applyResult{err: err}
	}
	disks := map[string]bool{}
	for _, d := range img.Disks {
		disks[d.LU] = true
	}
	if clones := clonesOf(lus, disks); len(clones) > 0 {
		return applyResult{err: fmt.Errorf("%w: %q is read by %v; delete or flatten them first (lupool lu flatten NAME)", ErrHasClones, img.Name, clones)}
	}
	if err := b.Delete([]byte(imagePrefix+img.Name), nil); err != nil {
		return applyResult{err: err}
	}
	var res applyResult
	if err := f.deleteImageEC(b, img.Name, &res, index); err != nil {
		return applyResult{err: err}
	}
	for _, lu := range lus {
		if !disks[lu.Name] {
			continue
		}
		if err := b.Delete([]byte(luPrefix+lu.Name), nil); err != nil {
			return applyResult{err: err}
		}
		res.addChange(Change{Kind: Deleted, LU: lu, Index: index})
		res.events = append(res.events, Event{Time: c.At, Kind: EventLUDeleted, LU: lu.Name, By: c.By, Details: map[string]string{"image": img.Name}})
	}
	return res
}

// applyFlatten cuts a clone's link to its base (its copies hold every
// block of it by then).
func (f *fsm) applyFlatten(b *pebble.Batch, c *command, index uint64) applyResult {
	lu, err := f.mustGetLU(c.Name)
	if err != nil {
		return applyResult{err: err}
	}
	if lu.Base == "" {
		return applyResult{err: fmt.Errorf("%w: %q is not a linked clone", ErrInvalid, lu.Name)}
	}
	lu.Base, lu.UpdatedAt = "", c.At
	return f.putLU(b, lu, Updated, index)
}

// CreateImage records a new image, importing, with its disks' LUs (one
// command). Returns ErrImageExists, ErrInvalid or ErrNotLeader.
func (n *Node) CreateImage(ctx context.Context, img Image, lus []LU) error {
	for i := range lus {
		lus[i] = withDefaults(lus[i], n.opts.NodeID)
	}
	var replicas []Replica
	for _, lu := range lus {
		replicas = append(replicas, lu.Replicas...)
	}
	members, err := n.membersWithSelf(ctx, replicas)
	if err != nil {
		return err
	}
	var pre error
	if rerr := n.readDB(func() error { pre = n.fsm.checkNewImage(img, lus, members); return nil }); rerr != nil {
		return rerr
	}
	if pre != nil {
		return pre
	}
	_, err = n.propose(ctx, &command{Type: cmdCreateImage, Image: &img, LUs: lus, By: n.opts.NodeID, Primary: true})
	return err
}

// MarkImageReady records an importing image's disk hashes and makes its
// disks read-only.
func (n *Node) MarkImageReady(ctx context.Context, img Image) error {
	_, err := n.propose(ctx, &command{Type: cmdImageReady, Image: &img, By: n.opts.NodeID, Primary: true})
	return err
}

// DeleteImage removes an image and its disks' LUs; ErrHasClones while
// clones read them.
func (n *Node) DeleteImage(ctx context.Context, name string) error {
	_, err := n.propose(ctx, &command{Type: cmdDeleteImage, Name: name, By: n.opts.NodeID, Primary: true})
	return err
}

// FlattenLU records that a clone no longer reads its base.
func (n *Node) FlattenLU(ctx context.Context, name string) error {
	_, err := n.propose(ctx, &command{Type: cmdFlattenLU, Name: name, By: n.opts.NodeID, Primary: true})
	return err
}

// GetImage returns an image's record, or ErrImageNotFound.
func (n *Node) GetImage(name string) (img Image, err error) {
	err = n.readDB(func() error {
		img, err = n.fsm.getImage(name)
		return err
	})
	return img, err
}

// ListImages returns the images sorted by name.
func (n *Node) ListImages() (imgs []Image, err error) {
	err = n.readDB(func() error {
		imgs, err = listImages(n.db)
		return err
	})
	return imgs, err
}

// checkImageCopies keeps clones next to their images through copy
// changes: a clone's new copy goes only on a node holding a copy of its
// base, and an image disk's copy stays while a clone's copy on that node
// reads it.
func (f *fsm) checkImageCopies(old LU, ch CopyChange) error {
	if old.Base != "" {
		base, err := f.mustGetLU(old.Base)
		if err != nil {
			return err
		}
		for _, r := range ch.Replicas {
			if !holdsCopyOn(old, r.NodeID) && replicaStateOn(base, r.NodeID) != ReplicaInSync {
				return illegal(old.Name, ruleCloneBase, "new copy on %s, which holds no in-sync copy of its image disk %q", r.NodeID, base.Name)
			}
		}
	}
	if old.Image == "" {
		return nil
	}
	kept := map[string]bool{}
	for _, r := range ch.Replicas {
		kept[r.NodeID] = true
	}
	lus, err := listLUs(f.db)
	if err != nil {
		return err
	}
	for _, lu := range lus {
		if lu.Base != old.Name {
			continue
		}
		for _, r := range lu.Replicas {
			if !kept[r.NodeID] {
				return illegal(old.Name, ruleCloneBase, "the copy on %s is read by clone %q's copy there", r.NodeID, lu.Name)
			}
		}
	}
	return nil
}
