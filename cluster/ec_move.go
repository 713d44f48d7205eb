package cluster

import (
	"context"
	"errors"
	"fmt"
	"strconv"

	"github.com/cockroachdb/pebble/v2"
)

// Rebuilding a lost node's shard onto another node: image.ec.shard.add
// records a new, empty shard LU on the target node as the shard's pending
// replacement (ECShard.Pending); the rebuilding node writes the shard into
// it from the other shards; image.ec.shard.swap makes it the shard and
// deletes the old shard's LU in the same command. Until the swap, reads
// keep using the old shard (reconstructing around it while its node is
// down); a failed rebuild leaves the pending LU, which the next
// image.ec.shard.add for that shard and node takes over again, and which
// image.delete removes with the image.

// ECShardMove is the body of image.ec.shard.add and image.ec.shard.swap.
type ECShardMove struct {
	Image string `json:"image"`
	Disk  int    `json:"disk"`
	Shard int    `json:"shard"`
	// Node is the target node (shard.add only).
	Node string `json:"node,omitempty"`
}

// ECMovedShardLUName names the replacement of shard i of disk d on node.
func ECMovedShardLUName(image string, disk, shard int, node string) string {
	return ECShardLUName(image, disk, shard) + "." + node
}

// shardOf finds the layout's disk and shard of a move, checked.
func (f *fsm) shardOf(m ECShardMove) (ECLayout, *ECShard, error) {
	l, err := f.getEC(m.Image)
	if err != nil {
		return ECLayout{}, nil, err
	}
	if l.State != ECReady {
		return ECLayout{}, nil, fmt.Errorf("%w: image %q's layout is %s; shards move once it is ready", ErrInvalid, l.Image, l.State)
	}
	if m.Disk < 0 || m.Disk >= len(l.Disks) || m.Shard < 0 || m.Shard >= len(l.Disks[m.Disk].Shards) {
		return ECLayout{}, nil, fmt.Errorf("%w: image %q has no shard %d of disk %d", ErrInvalid, l.Image, m.Shard, m.Disk)
	}
	return l, &l.Disks[m.Disk].Shards[m.Shard], nil
}

// checkShardAdd checks an image.ec.shard.add and returns the new LU
// record (nil when the pending one is there already).
func (f *fsm) checkShardAdd(m ECShardMove, lu LU, members map[string]bool) (ECLayout, error) {
	l, s, err := f.shardOf(m)
	if err != nil {
		return ECLayout{}, err
	}
	disk := l.Disks[m.Disk]
	if !members[m.Node] {
		return ECLayout{}, fmt.Errorf("%w: target %q is no member", ErrInvalid, m.Node)
	}
	for i, o := range disk.Shards {
		if o.Node == m.Node {
			return ECLayout{}, fmt.Errorf("%w: %s holds shard %d of %s already; each shard of a stripe needs its own node", ErrInvalid, m.Node, i, disk.LU)
		}
		if o.Pending != nil && i != m.Shard && o.Pending.Node == m.Node {
			return ECLayout{}, fmt.Errorf("%w: %s takes shard %d of %s already", ErrInvalid, m.Node, i, disk.LU)
		}
	}
	want := ECMovedShardLUName(l.Image, m.Disk, m.Shard, m.Node)
	switch {
	case s.Pending != nil && s.Pending.Node != m.Node:
		return ECLayout{}, fmt.Errorf("%w: shard %d of %s is being rebuilt on %s already", ErrInvalid, m.Shard, disk.LU, s.Pending.Node)
	case lu.Name != want || lu.Copies != 1 || lu.Writer != m.Node || lu.Kind != KindFile || lu.Image != "" || lu.Base != "" || lu.ReadOnly:
		return ECLayout{}, fmt.Errorf("%w: a moved shard is a one-copy file LU %q written on %s", ErrInvalid, want, m.Node)
	case lu.SizeBytes != disk.ShardBytes:
		return ECLayout{}, fmt.Errorf("%w: shard LU %q is %d bytes, the layout says %d", ErrInvalid, lu.Name, lu.SizeBytes, disk.ShardBytes)
	}
	if err := validateLU(&lu); err != nil {
		return ECLayout{}, err
	}
	if err := checkCreate(lu, members); err != nil {
		return ECLayout{}, err
	}
	return l, nil
}

func (f *fsm) applyECShardAdd(b *pebble.Batch, c *command, index uint64) applyResult {
	if !c.Primary || c.ECMove == nil || c.LU == nil {
		return applyResult{err: fmt.Errorf("%w: %s comes from the primary with a move and an LU", ErrInvalid, c.Type)}
	}
	members, err := memberSet(f.db)
	if err != nil {
		return applyResult{err: err}
	}
	lu := *c.LU
	lu.CreatedAt, lu.UpdatedAt = c.At, c.At
	l, err := f.checkShardAdd(*c.ECMove, lu, members)
	if err != nil {
		return applyResult{err: err}
	}
	s := &l.Disks[c.ECMove.Disk].Shards[c.ECMove.Shard]
	if s.Pending != nil {
		return applyResult{} // there already: the rebuild runs again into it
	}
	if _, err := f.mustGetLU(lu.Name); err == nil {
		return applyResult{err: fmt.Errorf("%w: LU %q exists", ErrInvalid, lu.Name)}
	} else if !errors.Is(err, ErrNotFound) {
		return applyResult{err: err}
	}
	s.Pending = &ECShard{LU: lu.Name, Node: lu.Writer}
	l.UpdatedAt = c.At
	if err := putJSON(b, ecPrefix+l.Image, l); err != nil {
		return applyResult{err: err}
	}
	return f.putLU(b, lu, Created, index)
}

// applyECShardSwap makes a shard's pending replacement the shard and
// deletes the old shard's LU.
func (f *fsm) applyECShardSwap(b *pebble.Batch, c *command, index uint64) applyResult {
	if !c.Primary || c.ECMove == nil {
		return applyResult{err: fmt.Errorf("%w: %s comes from the primary with a move", ErrInvalid, c.Type)}
	}
	l, s, err := f.shardOf(*c.ECMove)
	if err != nil {
		return applyResult{err: err}
	}
	if s.Pending == nil {
		return applyResult{err: fmt.Errorf("%w: shard %d of disk %d of %q has no rebuilt replacement", ErrInvalid, c.ECMove.Shard, c.ECMove.Disk, l.Image)}
	}
	old := *s
	*s = *s.Pending
	l.UpdatedAt = c.At
	if err := putJSON(b, ecPrefix+l.Image, l); err != nil {
		return applyResult{err: err}
	}
	var res applyResult
	if lu, err := f.mustGetLU(old.LU); err == nil {
		if err := b.Delete([]byte(luPrefix+lu.Name), nil); err != nil {
			return applyResult{err: err}
		}
		res.addChange(Change{Kind: Deleted, LU: lu, Index: index})
	} else if !errors.Is(err, ErrNotFound) {
		return applyResult{err: err}
	}
	res.events = append(res.events, Event{Time: c.At, Kind: EventECShardMoved, Node: s.Node, By: c.By, Details: map[string]string{
		"image": l.Image, "disk": l.Disks[c.ECMove.Disk].LU, "shard": strconv.Itoa(c.ECMove.Shard), "from": old.Node, "to": s.Node,
	}})
	return res
}

// AddECShard records a pending replacement of a shard on a new node.
func (n *Node) AddECShard(ctx context.Context, m ECShardMove, lu LU) error {
	lu = withDefaults(lu, m.Node)
	members, err := n.membersWithSelf(ctx, nil)
	if err != nil {
		return err
	}
	var pre error
	if rerr := n.readDB(func() error { _, pre = n.fsm.checkShardAdd(m, lu, members); return nil }); rerr != nil {
		return rerr
	}
	if pre != nil {
		return pre
	}
	_, err = n.propose(ctx, &command{Type: cmdECShardAdd, ECMove: &m, LU: &lu, By: n.opts.NodeID, Primary: true})
	return err
}

// SwapECShard makes a shard's rebuilt replacement the shard.
func (n *Node) SwapECShard(ctx context.Context, m ECShardMove) error {
	_, err := n.propose(ctx, &command{Type: cmdECShardSwap, ECMove: &m, By: n.opts.NodeID, Primary: true})
	return err
}
