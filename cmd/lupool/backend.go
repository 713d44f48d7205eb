package main

import (
	"context"
	"fmt"
	"log/slog"
	"sync/atomic"

	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/control"
	"github.com/lupool/lupool/server/api"
)

// daemonBackend serves the HTTP API of this node: the LU calls are the
// control plane's (package control), the membership and security calls
// are in security.go.
type daemonBackend struct {
	ctl    *control.Plane // immutable; never nil
	node   *cluster.Node  // immutable; never nil
	nodeID string
	ready  atomic.Bool

	ident *identity    // immutable; never nil
	peers *peers       // immutable; never nil
	data  string       // the data directory
	log   *slog.Logger // immutable; never nil
	// localAdminHash is the SHA-256 of DATA/admin.token, used until the
	// metadata holds the cluster's (the first start of the first node).
	localAdminHash string
}

var _ api.Backend = (*daemonBackend)(nil)

// apiError maps metadata errors onto the API's sentinels.
func (b *daemonBackend) apiError(err error) error { return b.ctl.APIError(err) }

// notLeader names the leader for the API to forward to.
func (b *daemonBackend) notLeader() error { return b.ctl.NotLeader() }

func (b *daemonBackend) CreateLU(ctx context.Context, req api.CreateLURequest) (api.LU, error) {
	return b.ctl.CreateLU(ctx, req)
}

func (b *daemonBackend) ListLUs(ctx context.Context) ([]api.LU, error) { return b.ctl.ListLUs(ctx) }

func (b *daemonBackend) GetLU(ctx context.Context, name string) (api.LU, error) {
	return b.ctl.GetLU(ctx, name)
}

func (b *daemonBackend) ResizeLU(ctx context.Context, name string, size int64) (api.LU, error) {
	return b.ctl.ResizeLU(ctx, name, size)
}

func (b *daemonBackend) DeleteLU(ctx context.Context, name string, force bool) error {
	return b.ctl.DeleteLU(ctx, name, force)
}

func (b *daemonBackend) PoolStatus(ctx context.Context) (api.PoolStatus, error) {
	return b.ctl.PoolStatus(ctx)
}

func (b *daemonBackend) AddCopy(ctx context.Context, name string, req api.AddCopyRequest) (api.LU, error) {
	return b.ctl.AddCopy(ctx, name, req)
}

func (b *daemonBackend) RegionHashes(ctx context.Context, name string, offsetBytes, regionBytes int64, count int) (api.RegionHashes, error) {
	return b.ctl.RegionHashes(ctx, name, offsetBytes, regionBytes, count)
}

func (b *daemonBackend) VerifyLU(ctx context.Context, name string, req api.VerifyRequest) (api.VerifyReport, error) {
	return b.ctl.VerifyLU(ctx, name, req)
}

func (b *daemonBackend) SetQoS(ctx context.Context, name string, q api.QoS) (api.LU, error) {
	return b.ctl.SetQoS(ctx, name, q)
}

func (b *daemonBackend) ScrubLU(ctx context.Context, name string) (api.ScrubReport, error) {
	return b.ctl.ScrubLU(ctx, name)
}

func (b *daemonBackend) Nodes(ctx context.Context) ([]api.Node, error) { return b.ctl.Nodes(ctx) }

func (b *daemonBackend) Status(ctx context.Context) (api.Status, error) { return b.ctl.Status(ctx) }

func (b *daemonBackend) Ready() error {
	if !b.ready.Load() {
		return fmt.Errorf("%w: node is starting or stopping", api.ErrUnavailable)
	}
	if id, _ := b.node.Leader(); id == "" {
		return fmt.Errorf("%w: no metadata leader", api.ErrUnavailable)
	}
	return nil
}

// MoveLU records a planned writer move (leader only; the API forwards).
func (b *daemonBackend) MoveLU(ctx context.Context, name string, req api.MoveRequest) (api.MoveResult, error) {
	return b.ctl.MoveLU(ctx, name, req.To, req.Wait)
}

func (b *daemonBackend) ListMoves(ctx context.Context) ([]api.Move, error) {
	return b.ctl.ListMoves(ctx)
}

// ProposeMoveOp records a move monitor's operation as the calling node
// (its certificate). Leader only, never forwarded.
func (b *daemonBackend) ProposeMoveOp(ctx context.Context, name string, req api.MoveOpRequest) error {
	id := api.CallerFrom(ctx).Node
	if id == "" {
		return fmt.Errorf("%w: move operations come from nodes", api.ErrForbidden)
	}
	if !b.node.IsLeader() {
		return b.notLeader()
	}
	return b.ctl.ProposeMoveOp(ctx, id, name, req)
}
