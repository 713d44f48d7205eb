package control

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/internal/rules"
	"github.com/lupool/lupool/replication"
	"github.com/lupool/lupool/server/api"
)

// AddCopy places a new copy of an LU on req.Node, or, when it is empty, on
// the member without a copy that holds the fewest copies. Leader only (the
// API forwards it there): adding a copy is the primary's placement
// decision. The copy starts "new": the writer rebuilds it from the
// allocated extents, then it goes out-of-sync → resyncing → in-sync.
func (p *Plane) AddCopy(ctx context.Context, name string, req api.AddCopyRequest) (api.LU, error) {
	rec, err := p.opts.Metadata.GetLU(name)
	if err != nil {
		return p.GetLU(ctx, name)
	}
	nodes, err := p.opts.Metadata.Nodes()
	if err != nil {
		return api.LU{}, err
	}
	if req.Node == "" {
		lus, err := p.opts.Metadata.ListLUs()
		if err != nil {
			return api.LU{}, err
		}
		exclude := map[string]bool{}
		for _, r := range rec.Replicas {
			exclude[r.NodeID] = true
		}
		picked, err := cluster.PickNodes(nodes, lus, exclude, 1)
		if err != nil {
			return api.LU{}, fmt.Errorf("%w: no node without a copy of %q to place one on (%v)", api.ErrInvalid, name, err)
		}
		req.Node = picked[0]
	}
	if !knownNode(nodes, req.Node) {
		return api.LU{}, fmt.Errorf("%w: node %q is not a member of this cluster (see lupool node list)", api.ErrInvalid, req.Node)
	}
	for _, r := range rec.Replicas {
		if r.NodeID == req.Node {
			return api.LU{}, fmt.Errorf("%w: LU %q already has a copy on %s", api.ErrExists, name, req.Node)
		}
	}
	if rules.Copies(len(rec.Replicas)+1) != nil {
		return api.LU{}, fmt.Errorf("%w: LU %q has %d copies, the most allowed", api.ErrInvalid, name, len(rec.Replicas))
	}
	replicas := append(append([]cluster.Replica(nil), rec.Replicas...), cluster.Replica{NodeID: req.Node, State: cluster.ReplicaNew})
	change := cluster.CopyChange{Name: name, ExpectedEpoch: rec.Epoch, Epoch: rec.Epoch + 1, Writer: rec.Writer,
		Copies: len(replicas), Replicas: replicas}
	if err := p.opts.Metadata.ChangeCopies(ctx, cluster.Proposer{NodeID: p.opts.NodeID, Primary: true}, change); err != nil {
		return api.LU{}, p.APIError(err)
	}
	return p.afterChange(ctx, name)
}

// RegionHashes hashes regions of this node's copy of an LU.
func (p *Plane) RegionHashes(ctx context.Context, name string, offsetBytes, regionBytes int64, count int) (api.RegionHashes, error) {
	if _, err := p.GetLU(ctx, name); err != nil {
		return api.RegionHashes{}, err
	}
	hashes, err := p.opts.Replicas.RegionHashes(ctx, name, offsetBytes, regionBytes, count)
	switch {
	case errors.Is(err, replication.ErrNoCopy):
		return api.RegionHashes{}, fmt.Errorf("%w: %v", api.ErrNotFound, err)
	case errors.Is(err, blockdev.ErrInvalid):
		return api.RegionHashes{}, fmt.Errorf("%w: %v", api.ErrInvalid, err)
	case err != nil:
		return api.RegionHashes{}, err
	}
	return api.RegionHashes{Node: p.opts.NodeID, OffsetBytes: offsetBytes, RegionBytes: regionBytes, Hashes: hashes}, nil
}

// hashesFunc returns count region hashes of node's copy from off.
type hashesFunc func(ctx context.Context, node string, off int64, count int) ([]string, error)

// VerifyLU compares every in-sync copy of an LU region by region, asking
// each copy's node for the hashes of its own copy. Copies that are not in
// sync, or whose node does not answer, are skipped with the reason. A
// region that differs is hashed again (Options.Rechecks times) before it
// is reported.
func (p *Plane) VerifyLU(ctx context.Context, name string, req api.VerifyRequest) (api.VerifyReport, error) {
	rec, err := p.opts.Metadata.GetLU(name)
	if err != nil {
		_, err := p.GetLU(ctx, name)
		return api.VerifyReport{}, err
	}
	region := req.RegionBytes
	if region == 0 {
		region = rules.RegionBytesDefault
	}
	if err := rules.Region(region); err != nil {
		return api.VerifyReport{}, fmt.Errorf("%w: region %d bytes: %w", api.ErrInvalid, region, err)
	}
	nodes, err := p.opts.Metadata.Nodes()
	if err != nil {
		return api.VerifyReport{}, err
	}
	hashesOf := func(ctx context.Context, node string, off int64, count int) ([]string, error) {
		if node == p.opts.NodeID {
			h, err := p.RegionHashes(ctx, name, off, region, count)
			return h.Hashes, err
		}
		addr, ok := peerAddr(nodes, node)
		if !ok {
			return nil, fmt.Errorf("node %s has no known peer address", node)
		}
		return p.opts.Peers.RegionHashes(ctx, node, addr, name, off, region, count)
	}
	return p.verify(ctx, rec, region, hashesOf)
}

func (p *Plane) verify(ctx context.Context, rec cluster.LU, region int64, hashesOf hashesFunc) (api.VerifyReport, error) {
	report := api.VerifyReport{Name: rec.Name, RegionBytes: region, Mismatches: []api.RegionMismatch{}, Skipped: map[string]string{}}
	var copies []string
	for _, r := range rec.Replicas {
		if r.State == cluster.ReplicaInSync {
			copies = append(copies, r.NodeID)
		} else {
			report.Skipped[r.NodeID] = "copy is " + r.State + ": it is known to lack data"
		}
	}
	report.Copies = copies
	const batch = replication.RegionHashesMax
	for off := int64(0); off < rec.SizeBytes; off += batch * region {
		all := map[string][]string{}
		for _, node := range copies {
			if _, skipped := report.Skipped[node]; skipped {
				continue
			}
			h, err := hashesOf(ctx, node, off, batch)
			if err != nil {
				report.Skipped[node] = err.Error()
				continue
			}
			all[node] = h
		}
		n := (min(off+batch*region, rec.SizeBytes) - off + region - 1) / region
		report.Regions += n
		for i := int64(0); i < n; i++ {
			m, differs, err := p.regionDiffers(ctx, all, i, off+i*region, hashesOf)
			if err != nil {
				return api.VerifyReport{}, err
			}
			if differs {
				report.Mismatches = append(report.Mismatches, m)
			}
		}
	}
	report.Equal = len(report.Mismatches) == 0 && len(report.Skipped) == 0
	if len(report.Skipped) == 0 {
		report.Skipped = nil
	}
	return report, nil
}

// regionDiffers compares region i of every copy's hashes; a region that
// differs is hashed again (up to Options.Rechecks times, RecheckInterval
// apart) and reported only if it still differs. It fails only when ctx
// ends.
func (p *Plane) regionDiffers(ctx context.Context, all map[string][]string, i, off int64, hashesOf hashesFunc) (api.RegionMismatch, bool, error) {
	hashes := map[string]string{}
	for node, h := range all {
		if int(i) < len(h) {
			hashes[node] = h[i]
		}
	}
	for attempt := 0; ; attempt++ {
		if allSame(hashes) {
			return api.RegionMismatch{}, false, nil
		}
		if attempt == p.opts.Rechecks {
			return api.RegionMismatch{OffsetBytes: off, Hashes: hashes}, true, nil
		}
		t := time.NewTimer(p.opts.RecheckInterval)
		select {
		case <-ctx.Done():
			t.Stop()
			return api.RegionMismatch{}, false, ctx.Err()
		case <-t.C:
		}
		for node := range hashes {
			if h, err := hashesOf(ctx, node, off, 1); err == nil && len(h) == 1 {
				hashes[node] = h[0]
			}
		}
	}
}

func allSame(hashes map[string]string) bool {
	first, same := "", true
	for _, h := range hashes {
		if first == "" {
			first = h
		}
		same = same && h == first
	}
	return same
}
