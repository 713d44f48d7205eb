package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/cluster/peerlink"
	"github.com/lupool/lupool/internal/rules"
	"github.com/lupool/lupool/server/api"
	"github.com/lupool/lupool/server/nbd"
)

// peers reaches the other nodes' peer ports, over mutual TLS: every call
// there is authenticated by this node's certificate, and the other end
// checks it is a member.
type peers struct {
	self string
	link *peerlink.Link // immutable; never nil
	node *cluster.Node  // immutable; never nil
}

// peerAddr returns the peer address recorded for node id.
func (p *peers) peerAddr(id string) (string, bool) {
	nodes, err := p.node.Nodes()
	if err != nil {
		return "", false
	}
	return nodePeerAddr(nodes, id)
}

// nodePeerAddr returns the peer address recorded for node id.
func nodePeerAddr(nodes []cluster.NodeInfo, id string) (string, bool) {
	for _, n := range nodes {
		if n.ID == id && n.PeerAddr != "" {
			return n.PeerAddr, true
		}
	}
	return "", false
}

// RegionHashes asks node, at its peer address, for the hashes of its own
// copy of an LU (control.Peers).
func (p *peers) RegionHashes(ctx context.Context, node, peerAddr, name string, offsetBytes, regionBytes int64, count int) ([]string, error) {
	c, err := p.client(node, peerAddr)
	if err != nil {
		return nil, err
	}
	h, err := c.RegionHashes(ctx, name, offsetBytes, regionBytes, count)
	return h.Hashes, err
}

// Connections asks node, at its peer address, how many NBD clients are
// attached to an LU through it (control.Peers).
func (p *peers) Connections(ctx context.Context, node, peerAddr, name string) (int, error) {
	c, err := p.client(node, peerAddr)
	if err != nil {
		return 0, err
	}
	l, err := c.GetLU(ctx, name)
	return l.Connections, err
}

// PoolStatus asks node, at its peer address, for its storage pool
// (control.Peers).
func (p *peers) PoolStatus(ctx context.Context, node, peerAddr string) (api.PoolStatus, error) {
	c, err := p.client(node, peerAddr)
	if err != nil {
		return api.PoolStatus{}, err
	}
	return c.PoolStatus(ctx)
}

// probe is the primary's liveness check of a member (cluster.Options.Probe):
// its peer port answers /healthz over mutual TLS, proving its identity.
// The peer port carries the replication streams too, so a node that
// answers can serve its copies.
func (p *peers) probe(ctx context.Context, id string) error {
	c, err := p.clientOf(id)
	if err != nil {
		return err
	}
	return c.Healthz(ctx)
}

// confirmLease asks the metadata leader for a read lease on this node's
// copy of LU name at epoch (replication.ManagerOptions.ConfirmLease):
// directly when this node leads, else on the leader's peer port.
func (p *peers) confirmLease(ctx context.Context, name string, epoch uint64) error {
	err := p.node.ConfirmCopy(ctx, name, p.self, epoch)
	if !errors.Is(err, cluster.ErrNotLeader) {
		return err
	}
	leader, _ := p.node.Leader()
	if leader == "" || leader == p.self {
		return err
	}
	c, cerr := p.clientOf(leader)
	if cerr != nil {
		return cerr
	}
	return c.ConfirmLease(ctx, name, epoch)
}

// liveness returns the primary's liveness view of the members: this
// node's own when it leads, else the leader's, asked on its peer port.
func (p *peers) liveness(ctx context.Context) ([]api.NodeLiveness, error) {
	if p.node.IsLeader() {
		return localLiveness(p.node)
	}
	leader, _ := p.node.Leader()
	if leader == "" {
		return nil, fmt.Errorf("no primary known")
	}
	c, err := p.clientOf(leader)
	if err != nil {
		return nil, err
	}
	return c.Liveness(ctx)
}

// localLiveness is this node's own liveness view.
func localLiveness(n *cluster.Node) ([]api.NodeLiveness, error) {
	view, err := n.Liveness()
	if err != nil {
		return nil, err
	}
	out := make([]api.NodeLiveness, 0, len(view))
	for _, nl := range view {
		out = append(out, api.NodeLiveness{ID: nl.ID, State: nl.State, LastHeard: nl.LastHeard})
	}
	return out, nil
}

// watchMajority sends this node's NBD clients elsewhere (nbd.Server.Shed)
// while it has not been part of the metadata majority for longer than
// after, and serves them again once it is: a node cut off from the
// majority cannot confirm read leases or record copy changes, and the
// majority fails its LUs over; clients that reconnect (lupool attach)
// move to a node of the majority. Back in the majority, it records a
// QuorumLost and a QuorumRegained event (a node cut off cannot record
// anything until then). It returns when ctx ends.
//
// A process that did not run for a while (frozen by SIGSTOP, or starved)
// heard nothing meanwhile either: on waking it gives the majority after to
// answer again, from then, before it sends anyone away, instead of taking
// its own sleep for a partition.
func watchMajority(ctx context.Context, node *cluster.Node, srv *nbd.Server, after time.Duration, gauge prometheus.Gauge,
	emit func(cluster.Event), log *slog.Logger) {
	started := time.Now()
	var lostContact time.Time
	every := after / 10
	tick := time.NewTicker(every)
	defer tick.Stop()
	last := started
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if now := time.Now(); now.Sub(last) > 3*every {
			log.Warn("this process did not run for a while; waiting for the metadata majority again before sending clients elsewhere",
				"did_not_run_for", now.Sub(last).Round(time.Millisecond))
			started = now
		}
		last = time.Now()
		contact := node.QuorumContact()
		if contact.Before(started) {
			contact = started
		}
		cut := time.Since(contact) > after
		if cut != srv.Shedding() {
			if cut {
				log.Warn("cut off from the metadata majority: sending NBD clients elsewhere", "silent_for", time.Since(contact).Round(time.Millisecond))
				gauge.Set(1)
				lostContact = contact
			} else {
				log.Info("back in the metadata majority: serving NBD clients again")
				gauge.Set(0)
				emit(cluster.Event{Kind: cluster.EventQuorumLost, Details: map[string]string{
					"last_contact": lostContact.UTC().Format(time.RFC3339Nano)}})
				emit(cluster.Event{Kind: cluster.EventQuorumRegained, Details: map[string]string{
					"cut_off_ms": strconv.FormatInt(time.Since(lostContact).Milliseconds(), 10)}})
			}
			srv.Shed(cut)
		}
	}
}

// certBound reports whether id has a member record and whether certSHA256
// is the certificate that record is bound to (a record written before
// bindings existed binds none).
func (p *peers) certBound(id, certSHA256 string) (member, bound bool) {
	rec, member := p.node.MemberCert(id)
	return member, member && rec != "" && rec == certSHA256
}

// client returns an API client for node id's peer port at addr; the
// server must prove it is node id.
func (p *peers) client(id, addr string) (*api.Client, error) {
	return api.NewClientWith("https://"+addr, api.ClientOptions{HTTP: p.link.HTTPClient(id)})
}

// clientOf is client with the recorded peer address of id.
func (p *peers) clientOf(id string) (*api.Client, error) {
	addr, ok := p.peerAddr(id)
	if !ok {
		return nil, fmt.Errorf("node %s has no recorded peer address", id)
	}
	return p.client(id, addr)
}

// httpClient is for the API handler's forwarding to the leader.
func (p *peers) httpClient(id string) *http.Client { return p.link.HTTPClient(id) }

// onLeader makes a proposal of this node's on the metadata leader: local
// proposes it here; while that answers cluster.ErrNotLeader, remote sends
// it to the leader's peer port (never through a third node, which would
// become the proposer), following leadership changes every pause until
// ctx ends. refused turns the leader's refusal (a status below 500) into
// the caller's error; what names the proposal in the error when ctx ends.
func (p *peers) onLeader(ctx context.Context, what string, pause time.Duration, local func() error,
	remote func(*api.Client) error, refused func(leader string, se *api.StatusError, err error) error) error {
	for {
		err := local()
		if !errors.Is(err, cluster.ErrNotLeader) {
			return err
		}
		if leader, _ := p.node.Leader(); leader != "" && leader != p.self {
			var c *api.Client
			if c, err = p.clientOf(leader); err == nil {
				err = remote(c)
			}
			var se *api.StatusError
			switch {
			case err == nil:
				return nil
			case errors.As(err, &se) && se.StatusCode < 500:
				return refused(leader, se, err)
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w: %s: %v", cluster.ErrNotLeader, what, err)
		case <-time.After(pause):
		}
	}
}

// changeCopies records a change of rec's copy states, proposed by this
// node: directly when it leads the metadata log, else on the leader's
// peer port (never through a third node, which would become the
// proposer). It follows leadership changes until ctx ends.
func (p *peers) changeCopies(ctx context.Context, rec cluster.LU, expected uint64) error {
	change := cluster.CopyChange{Name: rec.Name, ExpectedEpoch: expected, Epoch: rec.Epoch, Writer: rec.Writer,
		Copies: rec.Copies, Replicas: append([]cluster.Replica(nil), rec.Replicas...)}
	req := api.CopyChangeRequest{ExpectedEpoch: expected, Epoch: rec.Epoch, Writer: rec.Writer, Copies: rec.Copies}
	for _, r := range rec.Replicas {
		req.Replicas = append(req.Replicas, api.Replica{Node: r.NodeID, State: r.State})
	}
	return p.onLeader(ctx, "copy change of "+rec.Name, 100*time.Millisecond,
		func() error { return p.node.ChangeCopies(ctx, cluster.Proposer{NodeID: p.self}, change) },
		func(c *api.Client) error {
			_, err := c.ChangeCopies(ctx, rec.Name, req)
			return err
		},
		func(leader string, se *api.StatusError, err error) error {
			switch se.StatusCode {
			case http.StatusPreconditionFailed:
				return fmt.Errorf("%w: %v", cluster.ErrEpochChanged, err)
			case http.StatusForbidden:
				return fmt.Errorf("%w: %v", cluster.ErrIllegalChange, err)
			}
			return fmt.Errorf("leader %s refused the copy change: %w", leader, err)
		})
}

// recordSnapshot records a snapshot this node froze as the LU's writer
// (control.Options.ProposeSnapshot): directly when it leads the metadata
// log, else on the leader's peer port, which names this node by its
// certificate. It follows leadership changes until ctx ends.
func (p *peers) recordSnapshot(ctx context.Context, snap cluster.LU) error {
	req := api.SnapshotRecordRequest{}
	_, req.Snapshot, _ = rules.SplitSnapshotLU(snap.Name)
	for _, r := range snap.Replicas {
		req.Copies = append(req.Copies, r.NodeID)
	}
	return p.onLeader(ctx, "snapshot "+snap.Name, 50*time.Millisecond,
		func() error { return p.node.SnapshotLU(ctx, cluster.Proposer{NodeID: p.self}, snap) },
		func(c *api.Client) error { return c.RecordSnapshot(ctx, snap.SnapshotOf, req) },
		func(leader string, _ *api.StatusError, err error) error {
			return fmt.Errorf("leader %s refused the snapshot record: %w", leader, err)
		})
}

// proposeMove records a move monitor's operation as this node
// (replication.MoveMonitorOptions.Propose): directly when it leads the
// metadata log, else on the leader's peer port. It follows leadership
// changes until ctx ends.
func (p *peers) proposeMove(ctx context.Context, op cluster.MoveOp) error {
	return p.onLeader(ctx, fmt.Sprintf("move %s of %s", op.Op, op.LU), 20*time.Millisecond,
		func() error { return p.node.ProposeMove(ctx, cluster.Proposer{NodeID: p.self}, op) },
		func(c *api.Client) error {
			return c.ProposeMoveOp(ctx, op.LU, api.MoveOpRequest{Op: op.Op, Role: op.Role, Step: op.Step, Reason: op.Reason})
		},
		func(leader string, se *api.StatusError, err error) error {
			switch se.StatusCode {
			case http.StatusForbidden:
				return fmt.Errorf("%w: %v", cluster.ErrIllegalMove, err)
			case http.StatusNotFound:
				return fmt.Errorf("%w: %v", cluster.ErrNoMove, err)
			}
			return fmt.Errorf("leader %s refused the move operation: %w", leader, err)
		})
}

// register is the second step of joining (and how a member records new
// addresses of its own): ask the leader, on its peer port, to add this
// node (identified by its certificate) with req's addresses. members are
// where to start looking for the leader.
func register(ctx context.Context, link *peerlink.Link, members []api.Node, req api.RegisterNodeRequest, log *slog.Logger) error {
	deadline := time.Now().Add(2 * time.Minute)
	var lastErr error
	for attempt := 0; ; attempt++ {
		for i := 0; i < len(members); i++ {
			m := members[i]
			if m.PeerAddr == "" {
				continue
			}
			c, err := api.NewClientWith("https://"+m.PeerAddr, api.ClientOptions{HTTP: link.HTTPClient(m.ID)})
			if err != nil {
				return err
			}
			_, err = c.RegisterNode(ctx, req)
			if err == nil {
				log.Info("registered with the metadata leader", "leader", m.ID)
				return nil
			}
			lastErr = err
			var se *api.StatusError
			if errors.As(err, &se) && se.LeaderPeer != "" && se.LeaderID != m.ID && len(members) < 16 {
				// A follower named the leader: try it next.
				members = append(members, api.Node{ID: se.LeaderID, PeerAddr: se.LeaderPeer})
				continue
			}
			if errors.As(err, &se) && se.StatusCode < 500 {
				return fmt.Errorf("node %s refused to register this node: %w", m.ID, err)
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("could not register with the metadata leader within 2 minutes: %w", lastErr)
		}
		if attempt%5 == 0 {
			log.Info("registering with the metadata leader; retrying", "err", lastErr)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Second):
		}
	}
}
