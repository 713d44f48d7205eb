package control

import (
	"context"
	"errors"
	"fmt"

	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/replication"
	"github.com/lupool/lupool/replication/replproto"
	"github.com/lupool/lupool/server/api"
)

// Scrubs scrubs the LUs this node writes (replication.Scrubber).
type Scrubs interface {
	// Scrub compares and repairs every in-sync copy of an LU this node
	// writes (replproto.ErrNotWriter if it does not,
	// replication.ErrScrubRunning if a scrub of it runs).
	Scrub(ctx context.Context, name string) (replication.ScrubReport, error)
	// Status is an LU's scrub state; false if this node does not write it.
	Status(name string) (replication.ScrubStatus, bool)
}

var _ Scrubs = (*replication.Scrubber)(nil)

// ScrubLU scrubs an LU on its writer: on any other node it answers with an
// *api.NotLeaderError naming the writer (the API forwards the request
// there, as it forwards metadata changes to the leader).
func (p *Plane) ScrubLU(ctx context.Context, name string) (api.ScrubReport, error) {
	rec, err := p.opts.Metadata.GetLU(name)
	if err != nil {
		if errors.Is(err, cluster.ErrNotFound) {
			return api.ScrubReport{}, notFound(name)
		}
		return api.ScrubReport{}, p.APIError(err)
	}
	if len(rec.Replicas) < 2 {
		return api.ScrubReport{}, fmt.Errorf("%w: LU %s has one copy: there is nothing to compare it with", api.ErrInvalid, name)
	}
	if rec.Writer != p.opts.NodeID {
		nodes, err := p.opts.Metadata.Nodes()
		if err != nil {
			return api.ScrubReport{}, p.APIError(err)
		}
		nl := &api.NotLeaderError{LeaderID: rec.Writer}
		for _, n := range nodes {
			if n.ID == rec.Writer {
				nl.LeaderAPI, nl.LeaderPeer = n.APIAddr, n.PeerAddr
			}
		}
		return api.ScrubReport{}, nl
	}
	if p.opts.Scrubs == nil {
		return api.ScrubReport{}, fmt.Errorf("%w: this node does not scrub", api.ErrUnavailable)
	}
	report, err := p.opts.Scrubs.Scrub(ctx, name)
	switch {
	case errors.Is(err, replication.ErrScrubRunning):
		return api.ScrubReport{}, fmt.Errorf("%w: %v", api.ErrBusy, err)
	case errors.Is(err, replproto.ErrNotWriter):
		return api.ScrubReport{}, fmt.Errorf("%w: %v (the writer is starting; retry shortly)", api.ErrUnavailable, err)
	case err != nil:
		return api.ScrubReport{}, err
	}
	out := api.ScrubReport{Name: report.Name, RegionBytes: report.RegionBytes, Regions: report.Regions,
		Copies: report.Copies, Repairs: []api.ScrubRepair{}, Skipped: report.Skipped,
		TookSeconds: report.Finished.Sub(report.Started).Seconds()}
	if out.Copies == nil {
		out.Copies = []string{}
	}
	if len(out.Skipped) == 0 {
		out.Skipped = nil
	}
	for _, r := range report.Repairs {
		out.Repairs = append(out.Repairs, api.ScrubRepair{Copy: r.Copy, OffsetBytes: r.OffsetBytes, LengthBytes: r.LengthBytes})
	}
	return out, nil
}

// scrubStatus fills out's scrub state and each copy's repair count when
// this node writes the LU.
func (p *Plane) scrubStatus(out *api.LU) {
	if p.opts.Scrubs == nil || len(out.Replicas) < 2 {
		return // a one-copy LU has nothing to scrub
	}
	st, ok := p.opts.Scrubs.Status(out.Name)
	if !ok {
		return
	}
	s := &api.ScrubStatus{Running: st.Running, RegionsDone: st.RegionsDone, RegionsTotal: st.RegionsTotal,
		LastRepaired: st.LastRepaired}
	if !st.LastFinished.IsZero() {
		t := st.LastFinished
		s.LastFinished = &t
	}
	out.Scrub = s
	for i, r := range out.Replicas {
		if n, ok := st.Repaired[r.Node]; ok {
			out.Replicas[i].RepairedRegions = &n
		}
		for _, d := range st.Degraded {
			out.Replicas[i].Degraded = out.Replicas[i].Degraded || d == r.Node
		}
	}
}
