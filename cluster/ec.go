package cluster

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/cockroachdb/pebble/v2"

	"github.com/lupool/lupool/internal/rules"
)

// Erasure-coded images (issue 16). A ready image can be converted to
// erasure coding: its record gets a layout ("meta/ec/" + image) of K data
// and M parity shards per stripe, and each of its disks gets K+M shard
// LUs, plain one-copy file LUs named ECShardLUName(IMAGE, disk, shard),
// shard i of a disk on its own node. image.ec.create records the layout
// (encoding) with the shard LUs; the node that converts writes the shards
// (package replication/ec) and proposes image.ec.ready, which drops the
// disks' mirrored LUs (IMAGE/N) in the same command: from then on every
// node serves IMAGE/N from the shards. image.ec.abort removes a layout
// that is still encoding with its shard LUs; image.delete removes a
// layout and its shards with the image. Shard LUs are internal: no one
// creates or deletes them through lu.create or lu.delete.

// EC layout states.
const (
	ECEncoding = "encoding"
	ECReady    = "ready"
)

const ecPrefix = "meta/ec/"

// ecShardPrefix starts every shard LU's name.
const ecShardPrefix = ".ec."

// ErrECNotFound is returned by GetEC when an image has no EC layout.
var ErrECNotFound = errors.New("cluster: image is not erasure-coded")

// ECLayout is an erasure-coded image's layout.
type ECLayout struct {
	Image string `json:"image"`
	// K data and M parity shards per stripe.
	K     int      `json:"k"`
	M     int      `json:"m"`
	State string   `json:"state"`
	Disks []ECDisk `json:"disks"`
	// CreatedOn is the node that encodes.
	CreatedOn string    `json:"created_on"`
	CreatedAt time.Time `json:"created_at"`
	UpdatedAt time.Time `json:"updated_at"`
}

// ECDisk is one disk's shards.
type ECDisk struct {
	// LU is the disk's name, IMAGE/N: its export.
	LU        string `json:"lu"`
	SizeBytes int64  `json:"size_bytes"`
	// ShardBytes is each shard LU's size (superblock and chunks).
	ShardBytes int64 `json:"shard_bytes"`
	// ImageID (32 hex digits) is written in every shard's superblock.
	ImageID string `json:"image_id"`
	// Shards, K+M of them in shard order.
	Shards []ECShard `json:"shards"`
}

// ECShard is where one shard lives.
type ECShard struct {
	LU   string `json:"lu"`
	Node string `json:"node"`
	// Pending is the shard's replacement on another node while a rebuild
	// writes it (ec_move.go); nil otherwise.
	Pending *ECShard `json:"pending,omitempty"`
}

// ECShardLUName names shard i of disk d of an image.
func ECShardLUName(image string, disk, shard int) string {
	return fmt.Sprintf("%s%s.%d.%d", ecShardPrefix, image, disk, shard)
}

// IsECShardLU reports whether name is a shard LU's.
func IsECShardLU(name string) bool { return strings.HasPrefix(name, ecShardPrefix) }

// RawBytes is what the layout's shards take: K+M shards per disk.
func (l ECLayout) RawBytes() int64 {
	var n int64
	for _, d := range l.Disks {
		n += d.ShardBytes * int64(len(d.Shards))
	}
	return n
}

// checkECGeometry checks K and M and that the pool has K+M members.
func checkECGeometry(k, m, members int) error {
	if err := rules.ECGeometry(k, m); err != nil {
		return fmt.Errorf("%w: --ec %d+%d: %w", ErrInvalid, k, m, err)
	}
	if k+m > members {
		return fmt.Errorf("%w: --ec %d+%d puts each of %d shards on its own node; the pool has %d nodes", ErrInvalid, k, m, k+m, members)
	}
	return nil
}

func (f *fsm) getEC(image string) (ECLayout, error) {
	var l ECLayout
	found, err := getJSON(f.db, ecPrefix+image, &l)
	if err != nil {
		return ECLayout{}, err
	}
	if !found {
		return ECLayout{}, fmt.Errorf("%w: %q", ErrECNotFound, image)
	}
	return l, nil
}

// checkNewEC checks an image.ec.create: a ready image without a layout,
// no clone reading it, K and M in range with K+M members, each disk's
// shards on distinct members and its shard LUs one-copy file LUs on
// them.
func (f *fsm) checkNewEC(l ECLayout, lus []LU, members map[string]bool) error {
	img, err := f.getImage(l.Image)
	if err != nil {
		return err
	}
	if img.State != ImageReady {
		return fmt.Errorf("%w: image %q is %s; only a ready (read-only) image is converted", ErrInvalid, img.Name, img.State)
	}
	if _, err := f.getEC(l.Image); err == nil {
		return fmt.Errorf("%w: image %q is erasure-coded already", ErrInvalid, l.Image)
	} else if !errors.Is(err, ErrECNotFound) {
		return err
	}
	if err := checkECGeometry(l.K, l.M, len(members)); err != nil {
		return err
	}
	if l.State != ECEncoding {
		return fmt.Errorf("%w: a new layout is %q, not %q", ErrInvalid, ECEncoding, l.State)
	}
	all, err := listLUs(f.db)
	if err != nil {
		return err
	}
	disks := map[string]bool{}
	for _, d := range img.Disks {
		disks[d.LU] = true
	}
	if clones := clonesOf(all, disks); len(clones) > 0 {
		return fmt.Errorf("%w: %q is read by clones %v; flatten or delete them before converting", ErrHasClones, img.Name, clones)
	}
	if len(l.Disks) != len(img.Disks) || len(lus) != len(l.Disks)*(l.K+l.M) {
		return fmt.Errorf("%w: image %q has %d disks; the layout %d with %d shard LUs", ErrInvalid, img.Name, len(img.Disks), len(l.Disks), len(lus))
	}
	for d, disk := range l.Disks {
		if err := f.checkECDisk(img, d, disk, l, lus[d*(l.K+l.M):(d+1)*(l.K+l.M)], members); err != nil {
			return err
		}
	}
	return nil
}

func (f *fsm) checkECDisk(img Image, d int, disk ECDisk, l ECLayout, lus []LU, members map[string]bool) error {
	if disk.LU != img.Disks[d].LU || disk.SizeBytes != img.Disks[d].SizeBytes {
		return fmt.Errorf("%w: layout disk %d is %q of %d bytes; the image's is %q of %d", ErrInvalid, d, disk.LU, disk.SizeBytes, img.Disks[d].LU, img.Disks[d].SizeBytes)
	}
	if id, err := hex.DecodeString(disk.ImageID); err != nil || len(id) != 16 {
		return fmt.Errorf("%w: disk %q: image id %q is not 32 hex digits", ErrInvalid, disk.LU, disk.ImageID)
	}
	if disk.ShardBytes*int64(l.K) < disk.SizeBytes {
		return fmt.Errorf("%w: disk %q: %d shards of %d bytes cannot hold %d", ErrInvalid, disk.LU, l.K, disk.ShardBytes, disk.SizeBytes)
	}
	if len(disk.Shards) != l.K+l.M {
		return fmt.Errorf("%w: disk %q has %d shards, %d+%d wants %d", ErrInvalid, disk.LU, len(disk.Shards), l.K, l.M, l.K+l.M)
	}
	used := map[string]int{}
	for i, s := range disk.Shards {
		lu := lus[i]
		if prev, dup := used[s.Node]; dup {
			return fmt.Errorf("%w: disk %q: shards %d and %d are both on %s; each shard of a stripe needs its own node", ErrInvalid, disk.LU, prev, i, s.Node)
		}
		used[s.Node] = i
		switch {
		case !members[s.Node]:
			return fmt.Errorf("%w: disk %q: shard %d on %q, which is no member", ErrInvalid, disk.LU, i, s.Node)
		case s.LU != ECShardLUName(l.Image, d, i) || lu.Name != s.LU:
			return fmt.Errorf("%w: disk %q: shard %d is LU %q (record %q), want %q", ErrInvalid, disk.LU, i, s.LU, lu.Name, ECShardLUName(l.Image, d, i))
		case lu.Copies != 1 || lu.Writer != s.Node || lu.Kind != KindFile || lu.Image != "" || lu.Base != "" || lu.ReadOnly:
			return fmt.Errorf("%w: shard LU %q must be a one-copy file LU written on %s", ErrInvalid, lu.Name, s.Node)
		case lu.SizeBytes != disk.ShardBytes:
			return fmt.Errorf("%w: shard LU %q is %d bytes, the layout says %d", ErrInvalid, lu.Name, lu.SizeBytes, disk.ShardBytes)
		}
		if err := validateLU(&lu); err != nil {
			return err
		}
		if err := checkCreate(lu, members); err != nil {
			return err
		}
		if _, err := f.mustGetLU(lu.Name); err == nil {
			return fmt.Errorf("%w: shard LU %q exists", ErrInvalid, lu.Name)
		} else if !errors.Is(err, ErrNotFound) {
			return err
		}
	}
	return nil
}

func (f *fsm) applyCreateEC(b *pebble.Batch, c *command, index uint64) applyResult {
	if !c.Primary {
		return applyResult{err: fmt.Errorf("%w: %q proposes an EC layout; only the primary does", ErrForeignRecord, c.By)}
	}
	l := *c.EC
	l.CreatedAt, l.UpdatedAt = c.At, c.At
	members, err := memberSet(f.db)
	if err != nil {
		return applyResult{err: err}
	}
	lus := make([]LU, len(c.LUs))
	for i, lu := range c.LUs {
		lu.CreatedAt, lu.UpdatedAt = c.At, c.At
		lus[i] = lu
	}
	if err := f.checkNewEC(l, lus, members); err != nil {
		return applyResult{err: err}
	}
	if err := putJSON(b, ecPrefix+l.Image, l); err != nil {
		return applyResult{err: err}
	}
	var res applyResult
	for _, lu := range lus {
		r := f.putLU(b, lu, Created, index)
		if r.err != nil {
			return r
		}
		res.addChange(*r.change)
	}
	res.events = append(res.events, Event{Time: c.At, Kind: EventECEncoding, By: c.By, Details: map[string]string{
		"image": l.Image, "ec": strconv.Itoa(l.K) + "+" + strconv.Itoa(l.M),
	}})
	return res
}

// applyECReady makes an encoding layout ready and drops the mirrored
// disks' LUs.
func (f *fsm) applyECReady(b *pebble.Batch, c *command, index uint64) applyResult {
	if !c.Primary {
		return applyResult{err: fmt.Errorf("%w: %q proposes an EC layout ready; only the primary does", ErrForeignRecord, c.By)}
	}
	l, err := f.getEC(c.Name)
	if err != nil {
		return applyResult{err: err}
	}
	if l.State != ECEncoding {
		return applyResult{err: fmt.Errorf("%w: image %q's layout is %s already", ErrInvalid, l.Image, l.State)}
	}
	all, err := listLUs(f.db)
	if err != nil {
		return applyResult{err: err}
	}
	disks := map[string]bool{}
	for _, d := range l.Disks {
		disks[d.LU] = true
	}
	if clones := clonesOf(all, disks); len(clones) > 0 {
		return applyResult{err: fmt.Errorf("%w: %q is read by clones %v made while it encoded; delete them and convert again", ErrHasClones, l.Image, clones)}
	}
	l.State, l.UpdatedAt = ECReady, c.At
	if err := putJSON(b, ecPrefix+l.Image, l); err != nil {
		return applyResult{err: err}
	}
	var res applyResult
	for _, lu := range all {
		if !disks[lu.Name] {
			continue
		}
		if err := b.Delete([]byte(luPrefix+lu.Name), nil); err != nil {
			return applyResult{err: err}
		}
		res.addChange(Change{Kind: Deleted, LU: lu, Index: index})
	}
	res.events = append(res.events, Event{Time: c.At, Kind: EventECReady, By: c.By, Details: map[string]string{
		"image": l.Image, "ec": strconv.Itoa(l.K) + "+" + strconv.Itoa(l.M), "raw_bytes": strconv.FormatInt(l.RawBytes(), 10),
	}})
	return res
}

// applyECAbort removes a layout still encoding, with its shard LUs.
func (f *fsm) applyECAbort(b *pebble.Batch, c *command, index uint64) applyResult {
	if !c.Primary {
		return applyResult{err: fmt.Errorf("%w: %q aborts an EC layout; only the primary does", ErrForeignRecord, c.By)}
	}
	l, err := f.getEC(c.Name)
	if err != nil {
		return applyResult{err: err}
	}
	if l.State != ECEncoding {
		return applyResult{err: fmt.Errorf("%w: image %q's layout is %s; only an encoding one is aborted", ErrInvalid, l.Image, l.State)}
	}
	var res applyResult
	if err := f.deleteECLocked(b, l, &res, index); err != nil {
		return applyResult{err: err}
	}
	return res
}

// deleteECLocked deletes a layout and its shard LUs in b.
func (f *fsm) deleteECLocked(b *pebble.Batch, l ECLayout, res *applyResult, index uint64) error {
	if err := b.Delete([]byte(ecPrefix+l.Image), nil); err != nil {
		return err
	}
	for _, d := range l.Disks {
		var names []string
		for _, s := range d.Shards {
			names = append(names, s.LU)
			if s.Pending != nil {
				names = append(names, s.Pending.LU)
			}
		}
		for _, name := range names {
			lu, err := f.mustGetLU(name)
			if errors.Is(err, ErrNotFound) {
				continue
			}
			if err != nil {
				return err
			}
			if err := b.Delete([]byte(luPrefix+lu.Name), nil); err != nil {
				return err
			}
			res.addChange(Change{Kind: Deleted, LU: lu, Index: index})
		}
	}
	return nil
}

// deleteImageEC is image.delete's hook: the image's layout and shards go
// with it.
func (f *fsm) deleteImageEC(b *pebble.Batch, image string, res *applyResult, index uint64) error {
	l, err := f.getEC(image)
	if errors.Is(err, ErrECNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	return f.deleteECLocked(b, l, res, index)
}

// checkNotECShard refuses lu.create and lu.delete of a shard LU.
func checkNotECShard(name string) error {
	if IsECShardLU(name) {
		return fmt.Errorf("%w: %q is an erasure-coded image's shard: names starting %q are the pool's own", ErrInvalid, name, ecShardPrefix)
	}
	return nil
}

func listEC(r reader) ([]ECLayout, error) {
	var out []ECLayout
	err := scan(r, ecPrefix, func(k, v []byte) error {
		var l ECLayout
		if err := json.Unmarshal(v, &l); err != nil {
			return fmt.Errorf("cluster: decode %s: %w", k, err)
		}
		out = append(out, l)
		return nil
	})
	return out, err
}

// PlanEC places the shards of every disk of an image: shard i of disk d on
// nodes[(d+i) mod len(nodes)], so each stripe's K+M shards sit on K+M
// distinct nodes and disks spread their data shards. nodes are the
// candidates in preference order.
func PlanEC(image string, k, m int, nodes []string, disks []ImageDisk, shardBytes func(sizeBytes int64) int64, imageIDs []string) (ECLayout, []LU, error) {
	if err := checkECGeometry(k, m, len(nodes)); err != nil {
		return ECLayout{}, nil, err
	}
	if len(imageIDs) != len(disks) {
		return ECLayout{}, nil, fmt.Errorf("%w: %d image ids for %d disks", ErrInvalid, len(imageIDs), len(disks))
	}
	l := ECLayout{Image: image, K: k, M: m, State: ECEncoding}
	var lus []LU
	for d, disk := range disks {
		ed := ECDisk{LU: disk.LU, SizeBytes: disk.SizeBytes, ShardBytes: shardBytes(disk.SizeBytes), ImageID: imageIDs[d]}
		for i := 0; i < k+m; i++ {
			node := nodes[(d+i)%len(nodes)]
			name := ECShardLUName(image, d, i)
			ed.Shards = append(ed.Shards, ECShard{LU: name, Node: node})
			lus = append(lus, LU{Name: name, SizeBytes: ed.ShardBytes, Kind: KindFile, Copies: 1, CreatedOn: node, Writer: node, Epoch: 1,
				Description: fmt.Sprintf("shard %d of %s (%d+%d)", i, disk.LU, k, m),
				Replicas:    []Replica{{NodeID: node, State: ReplicaInSync}}})
		}
		l.Disks = append(l.Disks, ed)
	}
	return l, lus, nil
}

// CreateEC records an encoding layout with its shard LUs (one command).
func (n *Node) CreateEC(ctx context.Context, l ECLayout, lus []LU) error {
	members, err := n.membersWithSelf(ctx, nil)
	if err != nil {
		return err
	}
	var pre error
	if rerr := n.readDB(func() error { pre = n.fsm.checkNewEC(l, lus, members); return nil }); rerr != nil {
		return rerr
	}
	if pre != nil {
		return pre
	}
	_, err = n.propose(ctx, &command{Type: cmdECCreate, EC: &l, LUs: lus, By: n.opts.NodeID, Primary: true})
	return err
}

// MarkECReady makes an image's layout ready and drops its mirrored disks.
func (n *Node) MarkECReady(ctx context.Context, image string) error {
	_, err := n.propose(ctx, &command{Type: cmdECReady, Name: image, By: n.opts.NodeID, Primary: true})
	return err
}

// AbortEC removes an encoding layout and its shard LUs.
func (n *Node) AbortEC(ctx context.Context, image string) error {
	_, err := n.propose(ctx, &command{Type: cmdECAbort, Name: image, By: n.opts.NodeID, Primary: true})
	return err
}

// GetEC returns an image's layout, or ErrECNotFound.
func (n *Node) GetEC(image string) (l ECLayout, err error) {
	err = n.readDB(func() error {
		l, err = n.fsm.getEC(image)
		return err
	})
	return l, err
}

// ListEC returns every layout, sorted by image.
func (n *Node) ListEC() (ls []ECLayout, err error) {
	err = n.readDB(func() error {
		ls, err = listEC(n.db)
		return err
	})
	return ls, err
}
