package control

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/internal/rules"
	"github.com/lupool/lupool/lu"
	"github.com/lupool/lupool/server/api"
)

// GetLU returns an LU as recorded, with this node's view of it (its
// clients, its copies' dirty bytes, its volume's allocation).
func (p *Plane) GetLU(_ context.Context, name string) (api.LU, error) {
	rec, err := p.opts.Metadata.GetLU(name)
	if err != nil {
		if errors.Is(err, cluster.ErrNotFound) {
			return api.LU{}, notFound(name)
		}
		return api.LU{}, p.APIError(err)
	}
	return p.toAPI(rec), nil
}

// ListLUs returns every LU, as GetLU does.
func (p *Plane) ListLUs(context.Context) ([]api.LU, error) {
	recs, err := p.opts.Metadata.ListLUs()
	if err != nil {
		return nil, err
	}
	out := make([]api.LU, 0, len(recs))
	for _, rec := range recs {
		out = append(out, p.toAPI(rec))
	}
	return out, nil
}

func (p *Plane) toAPI(rec cluster.LU) api.LU {
	out := api.LU{
		Name:        rec.Name,
		Description: rec.Description,
		SizeBytes:   rec.SizeBytes,
		Copies:      rec.Copies,
		Kind:        rec.Kind,
		Writer:      rec.Writer,
		Epoch:       rec.Epoch,
		CreatedAt:   rec.CreatedAt,
		Replicas:    []api.Replica{},
		QoS:         apiQoS(rec.QoS),
		Image:       rec.Image,
		ReadOnly:    rec.ReadOnly,
		Base:        rec.Base,
		SnapshotOf:  rec.SnapshotOf,
	}
	// Every node exports every LU: these are this node's clients.
	out.Connections = p.opts.Connections.Connections(rec.Name)
	dirty := p.opts.Replicas.DirtyBytes(rec.Name)
	for _, r := range rec.Replicas {
		rep := api.Replica{Node: r.NodeID, State: r.State}
		if n, ok := dirty[r.NodeID]; ok {
			rep.DirtyBytes = &n
		}
		out.Replicas = append(out.Replicas, rep)
	}
	if vol, ok := p.opts.Replicas.Volume(rec.Name); ok {
		// A clone's volume counts its own blocks only: the image's are
		// counted once, on the image's disks.
		out.AllocatedBytes = vol.AllocatedBytes()
	}
	p.scrubStatus(&out)
	out.Move = p.luMove(rec.Name)
	return out
}

// ResizeLU changes an LU's size. Where this node holds the LU's volume, a
// shrink is refused while the part it would cut off holds data, and a grow
// is refused past the pool's overcommit limit (ErrNoSpace naming the
// numbers).
func (p *Plane) ResizeLU(ctx context.Context, name string, sizeBytes int64) (api.LU, error) {
	if err := rules.Size(sizeBytes); err != nil {
		return api.LU{}, fmt.Errorf("%w: size_bytes %d: %w (the CLI rounds up for you)", api.ErrInvalid, sizeBytes, err)
	}
	rec, err := p.opts.Metadata.GetLU(name)
	if err != nil {
		return p.GetLU(ctx, name)
	}
	if rec.Image != "" {
		return api.LU{}, fmt.Errorf("%w: %q is a disk of image %s, which never changes size; clone it with a larger --size instead", api.ErrInvalid, name, rec.Image)
	}
	if vol, ok := p.opts.Replicas.Volume(name); ok {
		if sizeBytes < rec.SizeBytes {
			if err := checkTailUnallocated(ctx, vol, sizeBytes, rec.SizeBytes); err != nil {
				return api.LU{}, err
			}
		}
		if err := p.checkOvercommit(lu.Kind(rec.Kind), sizeBytes-rec.SizeBytes); err != nil {
			return api.LU{}, err
		}
	}
	if grow := sizeBytes - rec.SizeBytes; grow > 0 && lu.Kind(rec.Kind) == lu.KindMemory {
		// Every other node that holds a copy grows it in its memory too
		// (this node's own room was checked just above).
		nodes, err := p.opts.Metadata.Nodes()
		if err != nil {
			return api.LU{}, p.APIError(err)
		}
		var others []cluster.Replica
		for _, r := range rec.Replicas {
			if r.NodeID != p.opts.NodeID {
				others = append(others, r)
			}
		}
		if err := p.checkMemoryBudgets(ctx, nodes, others, "", grow); err != nil {
			return api.LU{}, err
		}
	}
	if err := p.opts.Metadata.ResizeLU(ctx, name, sizeBytes); err != nil {
		return api.LU{}, p.APIError(err)
	}
	return p.afterChange(ctx, name)
}

// checkTailUnallocated refuses a shrink that would cut off written data.
func checkTailUnallocated(ctx context.Context, vol lu.Volume, newSize, oldSize int64) error {
	var ext []blockdev.Extent
	for off := newSize; off < oldSize; {
		var err error
		ext, err = vol.Extents(ctx, off, oldSize-off, ext[:0])
		if err != nil {
			return err
		}
		if len(ext) == 0 {
			return fmt.Errorf("control: %d to %d: the volume reported no extents", off, oldSize)
		}
		for _, e := range ext {
			if e.Flags&blockdev.ExtentHole == 0 {
				return fmt.Errorf("%w: cannot shrink to %d bytes: data is allocated at offset %d in the part that would be cut off; trim it first (for example with blkdiscard or nbdsh h.trim)", api.ErrInvalid, newSize, off)
			}
			off += e.LengthBytes
		}
	}
	return nil
}

// DeleteLU removes an LU. Unless force, it is refused (ErrBusy) while NBD
// clients are attached to it through any node that answers.
func (p *Plane) DeleteLU(ctx context.Context, name string, force bool) error {
	lu, err := p.GetLU(ctx, name)
	if err != nil {
		return err
	}
	if lu.Image != "" {
		return fmt.Errorf("%w: %q is a disk of image %s; delete the image instead (lupool image delete %s)", api.ErrInvalid, name, lu.Image, lu.Image)
	}
	if !force {
		if n, where := p.clusterConnections(ctx, name); n > 0 {
			return fmt.Errorf("%w: LU %q has %d client connection(s) attached (%s); detach them, or delete with --force to end their I/O",
				api.ErrBusy, name, n, strings.Join(where, ", "))
		}
	}
	if err := p.opts.Metadata.DeleteLU(ctx, name); err != nil {
		return p.APIError(err)
	}
	return p.opts.Replicas.Sync(ctx)
}

// ClusterConnections counts the NBD clients attached to an LU through any
// node, and says where ("2 on n1"); see clusterConnections.
func (p *Plane) ClusterConnections(ctx context.Context, name string) (int, []string) {
	return p.clusterConnections(ctx, name)
}

// clusterConnections counts the NBD clients attached to an LU through any
// node (every node exports every LU); a node that does not answer within
// PeerTimeout is left out of the count.
func (p *Plane) clusterConnections(ctx context.Context, name string) (int, []string) {
	total, where := 0, []string(nil)
	if n := p.opts.Connections.Connections(name); n > 0 {
		total, where = n, append(where, fmt.Sprintf("%d on %s", n, p.opts.NodeID))
	}
	nodes, err := p.opts.Metadata.Nodes()
	if err != nil {
		return total, where
	}
	for _, n := range nodes {
		if n.ID == p.opts.NodeID || n.PeerAddr == "" {
			continue
		}
		qctx, cancel := context.WithTimeout(ctx, p.opts.PeerTimeout)
		c, err := p.opts.Peers.Connections(qctx, n.ID, n.PeerAddr, name)
		cancel()
		if err == nil && c > 0 {
			total += c
			where = append(where, fmt.Sprintf("%d on %s", c, n.ID))
		}
	}
	return total, where
}

// PoolStatus is this node's storage pool, as the API shows it.
func (p *Plane) PoolStatus(context.Context) (api.PoolStatus, error) {
	st := p.opts.Pool.Status()
	out := api.PoolStatus{
		Node:                   p.opts.NodeID,
		CapacityBytes:          st.CapacityBytes,
		FreeBytes:              st.FreeBytes,
		AllocatedBytes:         st.AllocatedBytes,
		ProvisionedBytes:       st.ProvisionedBytes,
		MemoryAllocatedBytes:   st.MemoryAllocatedBytes,
		MemoryProvisionedBytes: st.MemoryProvisionedBytes,
		MemoryBudgetBytes:      st.MemoryBudgetBytes,
		MemoryReservedBytes:    st.MemoryReservedBytes,
		MemoryFreeBytes:        st.MemoryFreeBytes,
		OvercommitRatio:        p.opts.OvercommitRatio,
		Level:                  string(st.Level),
		LUs:                    st.Volumes,
		Dirs:                   []api.PoolDir{},
	}
	warn, critical := p.opts.Pool.Thresholds()
	out.Thresholds = &api.Thresholds{WarnPercent: warn, CriticalPercent: critical}
	for _, d := range st.Dirs {
		out.Dirs = append(out.Dirs, api.PoolDir{Path: d.Path, CapacityBytes: d.CapacityBytes, FreeBytes: d.FreeBytes,
			AllocatedBytes: d.AllocatedBytes, ProvisionedBytes: d.ProvisionedBytes, Volumes: d.Volumes})
	}
	return out, nil
}
