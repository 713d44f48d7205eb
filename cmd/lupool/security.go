package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/cluster/peerlink"
	"github.com/lupool/lupool/cluster/pki"
	"github.com/lupool/lupool/server/api"
)

// checkToken reports whether token is the cluster's admin token: its
// SHA-256 is compared in constant time with the one in the metadata (or,
// before the metadata holds one, with DATA/admin.token's).
func (b *daemonBackend) checkToken(token string) bool {
	if token == "" {
		return false
	}
	hash, found, err := b.node.Setting(settingAdminTokenHash)
	if err != nil {
		b.log.Error("cannot read the admin token hash", "err", err)
		return false
	}
	if !found {
		hash = b.localAdminHash
	}
	return pki.SecretMatches(hash, token)
}

// recordIdentity puts the cluster id and the admin token's hash in the
// metadata when they are not there yet (the first start of the first
// node, and pools that predate them). Leader only.
func (b *daemonBackend) recordIdentity(ctx context.Context) error {
	if _, found, err := b.node.Setting(settingClusterID); err != nil {
		return err
	} else if !found {
		if err := b.node.SetSetting(ctx, settingClusterID, clusterIDOf(b.data)); err != nil {
			return err
		}
	}
	if b.ident.ca.Key != nil {
		if holder, _, err := b.node.Setting(settingCAHolder); err != nil {
			return err
		} else if holder != b.nodeID {
			if err := b.node.SetSetting(ctx, settingCAHolder, b.nodeID); err != nil {
				return err
			}
		}
	}
	if _, found, err := b.node.Setting(settingAdminTokenHash); err != nil || found || b.localAdminHash == "" {
		return err
	}
	return b.node.SetSetting(ctx, settingAdminTokenHash, b.localAdminHash)
}

// Join is the first step of joining: check the join token, refuse an id
// that is already a member (or was removed), and sign a certificate for
// the joiner's own key. Only the node holding the CA key (the one that
// created the cluster) signs; any other node forwards the request there.
// The certificate alone admits nothing: the joiner becomes a member when
// it registers with it (RegisterNode), and its record is then bound to
// that certificate, so a second certificate for the same id (two racing
// joins) is never a member's.
func (b *daemonBackend) Join(ctx context.Context, req api.JoinRequest) (api.JoinResponse, error) {
	if b.ident.ca.Key == nil {
		holder, found, err := b.node.Setting(settingCAHolder)
		if err != nil {
			return api.JoinResponse{}, err
		}
		peer, ok := b.peers.peerAddr(holder)
		if !found || !ok {
			return api.JoinResponse{}, fmt.Errorf("%w: this node cannot sign certificates and the node holding the cluster CA key is not known; join through the node that created the cluster", api.ErrUnavailable)
		}
		// Forwarded like a request for the leader (api's NotLeaderError
		// names where to send it).
		return api.JoinResponse{}, &api.NotLeaderError{LeaderID: holder, LeaderPeer: peer}
	}
	tok, err := pki.ParseJoinToken(req.Token)
	if err != nil {
		return api.JoinResponse{}, fmt.Errorf("%w: %v", api.ErrUnauthorized, err)
	}
	if err := b.checkJoinToken(tok); err != nil {
		b.log.Warn("join refused", "node", req.ID, "token", tok.ID, "err", err)
		return api.JoinResponse{}, err
	}
	if b.node.IsMember(req.ID) {
		b.log.Warn("join refused: the id is a member's", "node", req.ID, "token", tok.ID)
		return api.JoinResponse{}, fmt.Errorf("%w: node id %q is already a member of this cluster; a node keeps its id for life: restart that node with its own data directory, or join this one with another --node-id", api.ErrExists, req.ID)
	}
	if _, removed, err := b.node.Setting(settingRemovedNode + req.ID); err != nil {
		return api.JoinResponse{}, err
	} else if removed {
		return api.JoinResponse{}, fmt.Errorf("%w: node id %q was removed from this cluster; join with another --node-id", api.ErrExists, req.ID)
	}
	pub, err := pki.ParsePublicKeyPEM([]byte(req.PublicKeyPEM))
	if err != nil {
		return api.JoinResponse{}, fmt.Errorf("%w: public_key_pem: %v", api.ErrInvalid, err)
	}
	certPEM, err := b.ident.ca.IssueNode(req.ID, pub, req.Hosts)
	if err != nil {
		return api.JoinResponse{}, fmt.Errorf("%w: %v", api.ErrInvalid, err)
	}
	nodes, err := b.Nodes(ctx)
	if err != nil {
		return api.JoinResponse{}, err
	}
	clusterID, _, _ := b.node.Setting(settingClusterID)
	b.log.Info("issued a node certificate to a joining node", "node", req.ID, "token", tok.ID)
	leader, _ := b.node.Leader()
	return api.JoinResponse{ClusterID: clusterID, CACertPEM: string(b.ident.ca.CertPEM),
		NodeCertPEM: string(certPEM), LeaderID: leader, Members: nodes}, nil
}

// joinTokenCatchUp bounds how long a follower waits for a join token it
// does not know yet to be applied (it was made through the leader).
const joinTokenCatchUp = 2 * time.Second

// checkJoinToken checks a parsed join token against the metadata.
func (b *daemonBackend) checkJoinToken(tok pki.JoinToken) error {
	if tok.CAFingerprint != b.ident.ca.Fingerprint() {
		return fmt.Errorf("%w: the join token is for another cluster (CA %s; this cluster's is %s)", api.ErrUnauthorized, tok.CAFingerprint, b.ident.ca.Fingerprint())
	}
	v, found, err := b.node.Setting(settingJoinToken + tok.ID)
	// The token may have been made through another node (the leader)
	// moments ago, and this node (the CA holder, a follower now) not have
	// applied it yet: wait for it a little before calling it unknown.
	for deadline := time.Now().Add(joinTokenCatchUp); err == nil && !found && !b.node.IsLeader() && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
		v, found, err = b.node.Setting(settingJoinToken + tok.ID)
	}
	if err != nil {
		return err
	}
	if !found {
		return fmt.Errorf("%w: unknown join token %s: make one with lupool cluster join-token", api.ErrUnauthorized, tok.ID)
	}
	var rec joinTokenRecord
	if err := json.Unmarshal([]byte(v), &rec); err != nil {
		return fmt.Errorf("join token %s: corrupt record: %w", tok.ID, err)
	}
	switch {
	case !pki.SecretMatches(rec.SecretSHA256, tok.Secret):
		return fmt.Errorf("%w: join token %s: wrong secret", api.ErrUnauthorized, tok.ID)
	case rec.Revoked:
		return fmt.Errorf("%w: join token %s was revoked: make a new one with lupool cluster join-token", api.ErrUnauthorized, tok.ID)
	case time.Now().After(rec.ExpiresAt):
		return fmt.Errorf("%w: join token %s expired at %s: make a new one with lupool cluster join-token", api.ErrUnauthorized, tok.ID, rec.ExpiresAt.Format(time.RFC3339))
	}
	return nil
}

// RegisterNode is the second step of joining, on the leader: the caller's
// certificate names it; a new node becomes a voter, a member updates its
// own addresses. No node can register another's.
func (b *daemonBackend) RegisterNode(ctx context.Context, req api.RegisterNodeRequest) ([]api.Node, error) {
	id := api.CallerFrom(ctx).Node
	if id == "" {
		return nil, fmt.Errorf("%w: registering needs a node certificate", api.ErrForbidden)
	}
	if !b.node.IsLeader() {
		return nil, b.notLeader()
	}
	if _, removed, err := b.node.Setting(settingRemovedNode + id); err != nil {
		return nil, err
	} else if removed {
		return nil, fmt.Errorf("%w: node %q was removed from this cluster", api.ErrForbidden, id)
	}
	cert, _ := peerlink.PeerCertSHA256(ctx)
	if cert == "" {
		return nil, fmt.Errorf("%w: registering needs a node certificate on the peer port", api.ErrForbidden)
	}
	var err error
	if b.node.IsMember(id) {
		if cur, ok := b.peers.peerAddr(id); ok && cur != req.PeerAddr {
			return nil, fmt.Errorf("%w: node %s is recorded at peer address %s, not %s: a member cannot move its peer address (remove it with lupool node remove and join it again)", api.ErrInvalid, id, cur, req.PeerAddr)
		}
		err = b.node.RegisterNode(ctx, cluster.Proposer{NodeID: id}, cluster.NodeAddrs{ID: id, PeerAddr: req.PeerAddr,
			APIAddr: req.APIAddr, NBDAddr: req.NBDAddr, CertSHA256: cert})
	} else {
		err = b.node.AddVoter(ctx, id, req.PeerAddr, req.APIAddr, req.NBDAddr, cert)
	}
	if err != nil {
		return nil, b.apiError(err)
	}
	b.log.Info("node registered", "node", id, "peer", req.PeerAddr, "api", req.APIAddr)
	return b.Nodes(ctx)
}

// RemoveNode takes a node out of the cluster and bars its certificate.
func (b *daemonBackend) RemoveNode(ctx context.Context, id string) error {
	if id == b.nodeID && b.node.IsLeader() {
		return fmt.Errorf("%w: node %s is the metadata leader; remove it through another node after it steps down, or stop it first", api.ErrInvalid, id)
	}
	if !b.node.IsMember(id) {
		return fmt.Errorf("%w: node %q is not a member (see lupool node list)", api.ErrNotFound, id)
	}
	if !b.node.IsLeader() {
		return b.notLeader()
	}
	lus, err := b.node.ListLUs()
	if err != nil {
		return err
	}
	for _, l := range lus {
		for _, r := range l.Replicas {
			if r.NodeID == id && (l.Writer == id || len(l.Replicas) == 1) {
				return fmt.Errorf("%w: node %s holds the only or writing copy of LU %q; delete or move that LU first", api.ErrBusy, id, l.Name)
			}
		}
	}
	if err := b.node.SetSetting(ctx, settingRemovedNode+id, time.Now().UTC().Format(time.RFC3339)); err != nil {
		return b.apiError(err)
	}
	return b.apiError(b.node.RemoveServer(ctx, id))
}

// ChangeCopies records a copy-state change proposed by the calling node
// (its certificate), under the metadata's rules. Leader only, never
// forwarded.
func (b *daemonBackend) ChangeCopies(ctx context.Context, name string, req api.CopyChangeRequest) (api.LU, error) {
	id := api.CallerFrom(ctx).Node
	if id == "" {
		return api.LU{}, fmt.Errorf("%w: copy changes come from nodes", api.ErrForbidden)
	}
	if !b.node.IsLeader() {
		return api.LU{}, b.notLeader()
	}
	change := cluster.CopyChange{Name: name, ExpectedEpoch: req.ExpectedEpoch, Epoch: req.Epoch, Writer: req.Writer, Copies: req.Copies}
	for _, r := range req.Replicas {
		change.Replicas = append(change.Replicas, cluster.Replica{NodeID: r.Node, State: r.State})
	}
	if err := b.node.ChangeCopies(ctx, cluster.Proposer{NodeID: id}, change); err != nil {
		if errors.Is(err, cluster.ErrIllegalChange) {
			b.log.Warn("copy change refused", "lu", name, "by", id, "err", err)
		}
		return api.LU{}, b.apiError(err)
	}
	return b.GetLU(ctx, name)
}

// Liveness is this node's liveness view (the primary's on the primary).
func (b *daemonBackend) Liveness(context.Context) ([]api.NodeLiveness, error) {
	return localLiveness(b.node)
}

// ConfirmLease grants the calling node (its certificate) a metadata read
// lease on its copy of an LU. Leader only, never forwarded.
func (b *daemonBackend) ConfirmLease(ctx context.Context, name string, req api.LeaseRequest) error {
	id := api.CallerFrom(ctx).Node
	if id == "" {
		return fmt.Errorf("%w: read leases are for nodes", api.ErrForbidden)
	}
	if !b.node.IsLeader() {
		return b.notLeader()
	}
	if err := b.node.ConfirmCopy(ctx, name, id, req.Epoch); err != nil {
		if errors.Is(err, cluster.ErrNotInSync) {
			return fmt.Errorf("%w: %v", api.ErrStale, err)
		}
		return b.apiError(err)
	}
	return nil
}

// CreateJoinToken makes a join token; the metadata keeps its hash.
func (b *daemonBackend) CreateJoinToken(ctx context.Context, req api.JoinTokenRequest) (api.JoinTokenCreated, error) {
	if !b.node.IsLeader() {
		return api.JoinTokenCreated{}, b.notLeader()
	}
	ttl := time.Duration(req.TTLSeconds) * time.Second
	if ttl == 0 {
		ttl = joinTokenTTLDflt
	}
	tok, err := pki.NewJoinToken(b.ident.ca.Fingerprint())
	if err != nil {
		return api.JoinTokenCreated{}, err
	}
	now := time.Now().UTC()
	rec := joinTokenRecord{SecretSHA256: pki.HashSecret(tok.Secret), CreatedAt: now, ExpiresAt: now.Add(ttl)}
	v, err := json.Marshal(rec)
	if err != nil {
		return api.JoinTokenCreated{}, err
	}
	if err := b.node.SetSetting(ctx, settingJoinToken+tok.ID, string(v)); err != nil {
		return api.JoinTokenCreated{}, b.apiError(err)
	}
	b.log.Info("join token created", "token", tok.ID, "expires", rec.ExpiresAt)
	return api.JoinTokenCreated{ID: tok.ID, Token: tok.String(), ExpiresAt: rec.ExpiresAt}, nil
}

// ListJoinTokens lists join tokens, newest first.
func (b *daemonBackend) ListJoinTokens(context.Context) ([]api.JoinTokenInfo, error) {
	all, err := b.node.Settings(settingJoinToken)
	if err != nil {
		return nil, err
	}
	out := []api.JoinTokenInfo{}
	now := time.Now()
	for key, v := range all {
		var rec joinTokenRecord
		if err := json.Unmarshal([]byte(v), &rec); err != nil {
			continue
		}
		out = append(out, api.JoinTokenInfo{ID: strings.TrimPrefix(key, settingJoinToken), CreatedAt: rec.CreatedAt,
			ExpiresAt: rec.ExpiresAt, Revoked: rec.Revoked, Expired: now.After(rec.ExpiresAt)})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].CreatedAt.After(out[j].CreatedAt) })
	return out, nil
}

// RevokeJoinToken marks a join token revoked.
func (b *daemonBackend) RevokeJoinToken(ctx context.Context, id string) error {
	if !b.node.IsLeader() {
		return b.notLeader()
	}
	v, found, err := b.node.Setting(settingJoinToken + id)
	if err != nil {
		return err
	}
	if !found {
		return fmt.Errorf("%w: no join token %q (see lupool cluster join-token list)", api.ErrNotFound, id)
	}
	var rec joinTokenRecord
	if err := json.Unmarshal([]byte(v), &rec); err != nil {
		return fmt.Errorf("join token %s: corrupt record: %w", id, err)
	}
	rec.Revoked = true
	nv, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	if err := b.node.SetSetting(ctx, settingJoinToken+id, string(nv)); err != nil {
		return b.apiError(err)
	}
	b.log.Info("join token revoked", "token", id)
	return nil
}

// RotateAdminToken makes a new admin token; the old one stops working as
// soon as the change is applied. The leader's DATA/admin.token, if it has
// one, is rewritten.
func (b *daemonBackend) RotateAdminToken(ctx context.Context) (api.AdminToken, error) {
	if !b.node.IsLeader() {
		return api.AdminToken{}, b.notLeader()
	}
	token, err := pki.NewAdminToken()
	if err != nil {
		return api.AdminToken{}, err
	}
	if err := b.node.SetSetting(ctx, settingAdminTokenHash, pki.HashSecret(token)); err != nil {
		return api.AdminToken{}, b.apiError(err)
	}
	path := filepath.Join(b.data, adminTokenName)
	if _, err := readTrimmed(path); err == nil {
		if err := writeSecret(path, token+"\n"); err != nil {
			b.log.Error("admin token rotated but not written to the data directory", "file", path, "err", err)
		}
	}
	b.log.Warn("admin token rotated: the old one no longer works")
	return api.AdminToken{Token: token}, nil
}
