package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"strings"
	"sync/atomic"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/internal/units"
	"github.com/lupool/lupool/lu"
	"github.com/lupool/lupool/replication"
	"github.com/lupool/lupool/server/api"
	"github.com/lupool/lupool/server/nbd"
)

// daemonBackend serves the HTTP API from the metadata, the pool, the
// replication manager and the NBD engine of this node.
type daemonBackend struct {
	node       *cluster.Node
	pool       *lu.Pool
	mgr        *replication.Manager
	nbd        *nbd.Server
	nodeID     string
	overcommit float64
	ready      atomic.Bool

	ident *identity    // immutable; never nil
	peers *peers       // immutable; never nil
	data  string       // the data directory
	log   *slog.Logger // immutable; never nil
	// localAdminHash is the SHA-256 of DATA/admin.token, used until the
	// metadata holds the cluster's (the first start of the first node).
	localAdminHash string
}

var _ api.Backend = (*daemonBackend)(nil)

var luNameRE = regexp.MustCompile(`^[A-Za-z0-9._-]{1,128}$`)

func checkName(name string) error {
	if !luNameRE.MatchString(name) || name == "." || name == ".." {
		return fmt.Errorf("%w: LU name %q: use 1 to 128 of A-Z a-z 0-9 . _ - (not . or ..)", api.ErrInvalid, name)
	}
	return nil
}

func checkSize(size int64) error {
	if size <= 0 || size%512 != 0 {
		return fmt.Errorf("%w: size_bytes %d: must be a positive multiple of 512 (the CLI rounds up for you)", api.ErrInvalid, size)
	}
	return nil
}

// apiError maps metadata errors onto the API's sentinels.
func (b *daemonBackend) apiError(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, cluster.ErrNotLeader):
		return b.notLeader()
	case errors.Is(err, cluster.ErrExists):
		return fmt.Errorf("%w: %v", api.ErrExists, err)
	case errors.Is(err, cluster.ErrNotFound):
		return fmt.Errorf("%w: %v", api.ErrNotFound, err)
	case errors.Is(err, cluster.ErrInvalid):
		return fmt.Errorf("%w: %v", api.ErrInvalid, err)
	case errors.Is(err, cluster.ErrEpochChanged):
		return fmt.Errorf("%w: %v; try again", api.ErrStale, err)
	case errors.Is(err, cluster.ErrIllegalChange), errors.Is(err, cluster.ErrForeignRecord):
		return fmt.Errorf("%w: %v", api.ErrForbidden, err)
	case errors.Is(err, cluster.ErrMember):
		return fmt.Errorf("%w: %v", api.ErrExists, err)
	}
	return err
}

// notLeader names the leader for the API to forward to.
func (b *daemonBackend) notLeader() error {
	leaderID, leaderAPI := b.node.Leader()
	if leaderID == "" {
		return &api.NotLeaderError{}
	}
	peer, _ := b.peers.peerAddr(leaderID)
	return &api.NotLeaderError{LeaderID: leaderID, LeaderAPI: leaderAPI, LeaderPeer: peer}
}

// checkOvercommit refuses growing the local pool's provisioned bytes by
// more than its overcommit limit allows, naming the numbers.
func (b *daemonBackend) checkOvercommit(kind lu.Kind, growBytes int64) error {
	if kind != lu.KindFile || growBytes <= 0 {
		return nil
	}
	st := b.pool.Status()
	limit := int64(float64(st.CapacityBytes) * b.overcommit)
	if st.ProvisionedBytes+growBytes > limit {
		return b.overcommitError(growBytes)
	}
	return nil
}

// overcommitError says by how much a create or grow of growBytes would
// pass the overcommit limit and what to do.
func (b *daemonBackend) overcommitError(growBytes int64) error {
	st := b.pool.Status()
	limit := int64(float64(st.CapacityBytes) * b.overcommit)
	return fmt.Errorf("%w: pool would be provisioned to %s (%d bytes) but its limit is %s (%.1f x capacity %s); free space, add a data directory, or raise --overcommit",
		api.ErrNoSpace, units.Format(st.ProvisionedBytes+growBytes), st.ProvisionedBytes+growBytes,
		units.Format(limit), b.overcommit, units.Format(st.CapacityBytes))
}

func (b *daemonBackend) CreateLU(ctx context.Context, req api.CreateLURequest) (api.LU, error) {
	if err := checkName(req.Name); err != nil {
		return api.LU{}, err
	}
	if err := checkSize(req.SizeBytes); err != nil {
		return api.LU{}, err
	}
	if req.Kind == "" {
		req.Kind = string(lu.KindFile)
	}
	if req.Kind != string(lu.KindFile) && req.Kind != string(lu.KindMemory) {
		return api.LU{}, fmt.Errorf("%w: kind %q: use file or memory", api.ErrInvalid, req.Kind)
	}
	if req.Copies == 0 {
		req.Copies = 1
	}
	if req.Copies < 1 {
		return api.LU{}, fmt.Errorf("%w: copies %d: must be 1 or more", api.ErrInvalid, req.Copies)
	}
	if req.Node == "" {
		req.Node = b.nodeID
	}
	nodes, err := b.node.Nodes()
	if err != nil {
		return api.LU{}, err
	}
	if !knownNode(nodes, req.Node) && req.Node != b.nodeID {
		return api.LU{}, fmt.Errorf("%w: node %q is not a member of this cluster (see lupool node list)", api.ErrInvalid, req.Node)
	}
	if req.Copies > cluster.CopiesMax {
		return api.LU{}, fmt.Errorf("%w: copies %d: at most %d", api.ErrInvalid, req.Copies, cluster.CopiesMax)
	}
	if _, err := b.node.GetLU(req.Name); err == nil {
		return api.LU{}, fmt.Errorf("%w: an LU named %q exists; pick another name or delete it first", api.ErrExists, req.Name)
	}
	if req.Node == b.nodeID {
		// Hold the room until the volume exists: creates racing each
		// other cannot all pass the limit.
		if err := b.pool.Reserve(req.Name, req.SizeBytes, lu.Kind(req.Kind), time.Minute); err != nil {
			if errors.Is(err, lu.ErrOvercommit) {
				return api.LU{}, b.overcommitError(req.SizeBytes)
			}
			return api.LU{}, err
		}
	}
	replicas, err := b.place(nodes, req.Node, req.Copies)
	if err != nil {
		return api.LU{}, err
	}
	rec := cluster.LU{
		Name:        req.Name,
		Description: req.Description,
		SizeBytes:   req.SizeBytes,
		Kind:        req.Kind,
		Copies:      req.Copies,
		CreatedOn:   req.Node,
		Writer:      req.Node,
		Epoch:       1,
		Replicas:    replicas,
		CreatedAt:   time.Now().UTC(),
	}
	if err := b.node.CreateLU(ctx, rec); err != nil {
		b.pool.Release(req.Name)
		return api.LU{}, b.apiError(err)
	}
	out, err := b.afterChange(ctx, req.Name)
	if err != nil || req.Node != b.nodeID {
		return out, err
	}
	if _, ok := b.mgr.Volume(req.Name); !ok {
		// The volume could not be made here after all: take the LU back
		// out rather than leave one that no client can attach.
		cause := b.mgr.LastError()
		if derr := b.node.DeleteLU(ctx, req.Name); derr != nil {
			return api.LU{}, fmt.Errorf("LU %q was recorded but its volume could not be created (%v), and removing it failed: %w", req.Name, cause, derr)
		}
		if errors.Is(cause, lu.ErrOvercommit) {
			return api.LU{}, b.overcommitError(req.SizeBytes)
		}
		return api.LU{}, fmt.Errorf("LU %q: its volume could not be created, so it was not kept: %v", req.Name, cause)
	}
	return out, nil
}

// place picks copies distinct nodes for a new LU: the writer first, then
// the members holding the fewest copies (ties by id). Every copy starts in
// sync: a new LU reads as zeros everywhere. Runs on the metadata leader
// (creates are forwarded there), the pool's primary node.
func (b *daemonBackend) place(nodes []cluster.NodeInfo, writer string, copies int) ([]cluster.Replica, error) {
	replicas := []cluster.Replica{{NodeID: writer, State: cluster.ReplicaInSync}}
	if copies == 1 {
		return replicas, nil
	}
	lus, err := b.node.ListLUs()
	if err != nil {
		return nil, err
	}
	picked, err := cluster.PickNodes(nodes, lus, map[string]bool{writer: true}, copies-1)
	if err != nil {
		return nil, fmt.Errorf("%w: copies %d needs %d nodes (%v); add nodes or ask for fewer copies (see lupool node list)",
			api.ErrInvalid, copies, copies, err)
	}
	for _, id := range picked {
		replicas = append(replicas, cluster.Replica{NodeID: id, State: cluster.ReplicaInSync})
	}
	return replicas, nil
}

// afterChange waits until this node's volumes follow the change just
// applied, then returns the LU as recorded.
func (b *daemonBackend) afterChange(ctx context.Context, name string) (api.LU, error) {
	if err := b.mgr.Sync(ctx); err != nil {
		return api.LU{}, err
	}
	return b.GetLU(ctx, name)
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

func knownNode(nodes []cluster.NodeInfo, id string) bool {
	for _, n := range nodes {
		if n.ID == id {
			return true
		}
	}
	return false
}

func (b *daemonBackend) toAPI(rec cluster.LU) api.LU {
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
	}
	// Every node exports every LU: these are this node's clients.
	out.Connections = b.nbd.Connections(rec.Name)
	dirty := b.mgr.DirtyBytes(rec.Name)
	for _, r := range rec.Replicas {
		rep := api.Replica{Node: r.NodeID, State: r.State}
		if n, ok := dirty[r.NodeID]; ok {
			rep.DirtyBytes = &n
		}
		out.Replicas = append(out.Replicas, rep)
	}
	if vol, ok := b.mgr.Volume(rec.Name); ok {
		out.AllocatedBytes = vol.AllocatedBytes()
	}
	return out
}

func (b *daemonBackend) ListLUs(context.Context) ([]api.LU, error) {
	recs, err := b.node.ListLUs()
	if err != nil {
		return nil, err
	}
	out := make([]api.LU, 0, len(recs))
	for _, rec := range recs {
		out = append(out, b.toAPI(rec))
	}
	return out, nil
}

func (b *daemonBackend) GetLU(_ context.Context, name string) (api.LU, error) {
	rec, err := b.node.GetLU(name)
	if err != nil {
		if errors.Is(err, cluster.ErrNotFound) {
			return api.LU{}, fmt.Errorf("%w: no LU named %q (see lupool lu list)", api.ErrNotFound, name)
		}
		return api.LU{}, b.apiError(err)
	}
	return b.toAPI(rec), nil
}

func (b *daemonBackend) ResizeLU(ctx context.Context, name string, size int64) (api.LU, error) {
	if err := checkSize(size); err != nil {
		return api.LU{}, err
	}
	rec, err := b.node.GetLU(name)
	if err != nil {
		return b.GetLU(ctx, name)
	}
	if vol, ok := b.mgr.Volume(name); ok {
		if size < rec.SizeBytes {
			if err := checkTailUnallocated(ctx, vol, size, rec.SizeBytes); err != nil {
				return api.LU{}, err
			}
		}
		if err := b.checkOvercommit(lu.Kind(rec.Kind), size-rec.SizeBytes); err != nil {
			return api.LU{}, err
		}
	}
	if err := b.node.ResizeLU(ctx, name, size); err != nil {
		return api.LU{}, b.apiError(err)
	}
	return b.afterChange(ctx, name)
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
		for _, e := range ext {
			if e.Flags&blockdev.ExtentHole == 0 {
				return fmt.Errorf("%w: cannot shrink to %d bytes: data is allocated at offset %d in the part that would be cut off; trim it first (for example with blkdiscard or nbdsh h.trim)", api.ErrInvalid, newSize, off)
			}
			off += e.LengthBytes
		}
	}
	return nil
}

func (b *daemonBackend) DeleteLU(ctx context.Context, name string, force bool) error {
	if _, err := b.GetLU(ctx, name); err != nil {
		return err
	}
	if !force {
		if n, where := b.clusterConnections(ctx, name); n > 0 {
			return fmt.Errorf("%w: LU %q has %d client connection(s) attached (%s); detach them, or delete with --force to end their I/O",
				api.ErrBusy, name, n, strings.Join(where, ", "))
		}
	}
	if err := b.node.DeleteLU(ctx, name); err != nil {
		return b.apiError(err)
	}
	return b.mgr.Sync(ctx)
}

// clusterConnections counts the NBD clients attached to an LU through any
// node (every node exports every LU); a node that does not answer within
// 2 s is left out of the count.
func (b *daemonBackend) clusterConnections(ctx context.Context, name string) (int, []string) {
	total, where := 0, []string(nil)
	if n := b.nbd.Connections(name); n > 0 {
		total, where = n, append(where, fmt.Sprintf("%d on %s", n, b.nodeID))
	}
	nodes, err := b.node.Nodes()
	if err != nil {
		return total, where
	}
	for _, n := range nodes {
		if n.ID == b.nodeID || n.PeerAddr == "" {
			continue
		}
		c, err := b.peers.client(n.ID, n.PeerAddr)
		if err != nil {
			continue
		}
		qctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		lu, err := c.GetLU(qctx, name)
		cancel()
		if err == nil && lu.Connections > 0 {
			total += lu.Connections
			where = append(where, fmt.Sprintf("%d on %s", lu.Connections, n.ID))
		}
	}
	return total, where
}

func (b *daemonBackend) PoolStatus(context.Context) (api.PoolStatus, error) {
	st := b.pool.Status()
	out := api.PoolStatus{
		Node:                   b.nodeID,
		CapacityBytes:          st.CapacityBytes,
		FreeBytes:              st.FreeBytes,
		AllocatedBytes:         st.AllocatedBytes,
		ProvisionedBytes:       st.ProvisionedBytes,
		MemoryAllocatedBytes:   st.MemoryAllocatedBytes,
		MemoryProvisionedBytes: st.MemoryProvisionedBytes,
		OvercommitRatio:        b.overcommit,
		Level:                  string(st.Level),
		LUs:                    len(b.pool.Names()),
		Dirs:                   []api.PoolDir{},
	}
	for _, d := range st.Dirs {
		out.Dirs = append(out.Dirs, api.PoolDir{Path: d.Path, CapacityBytes: d.CapacityBytes, FreeBytes: d.FreeBytes,
			AllocatedBytes: d.AllocatedBytes, ProvisionedBytes: d.ProvisionedBytes, Volumes: d.Volumes})
	}
	return out, nil
}

func (b *daemonBackend) Nodes(context.Context) ([]api.Node, error) {
	nodes, err := b.node.Nodes()
	if err != nil {
		return nil, err
	}
	out := make([]api.Node, 0, len(nodes))
	for _, n := range nodes {
		out = append(out, api.Node{ID: n.ID, PeerAddr: n.PeerAddr, APIAddr: n.APIAddr, NBDAddr: n.NBDAddr, Voter: n.Suffrage == "voter",
			Leader: n.Leader, CertSHA256: n.CertSHA256})
	}
	return out, nil
}

func (b *daemonBackend) Ready() error {
	if !b.ready.Load() {
		return fmt.Errorf("%w: node is starting or stopping", api.ErrUnavailable)
	}
	if id, _ := b.node.Leader(); id == "" {
		return fmt.Errorf("%w: no metadata leader", api.ErrUnavailable)
	}
	return nil
}

// AddCopy places a new copy of an LU on a node (leader only; the API
// forwards it there). The copy starts "new": the writer rebuilds it from
// the allocated extents, then it goes out-of-sync → resyncing → in-sync.
func (b *daemonBackend) AddCopy(ctx context.Context, name string, req api.AddCopyRequest) (api.LU, error) {
	rec, err := b.node.GetLU(name)
	if err != nil {
		return b.GetLU(ctx, name)
	}
	nodes, err := b.node.Nodes()
	if err != nil {
		return api.LU{}, err
	}
	if req.Node == "" {
		lus, err := b.node.ListLUs()
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
	if len(rec.Replicas) >= cluster.CopiesMax {
		return api.LU{}, fmt.Errorf("%w: LU %q has %d copies, the most allowed", api.ErrInvalid, name, len(rec.Replicas))
	}
	replicas := append(append([]cluster.Replica(nil), rec.Replicas...), cluster.Replica{NodeID: req.Node, State: cluster.ReplicaNew})
	change := cluster.CopyChange{Name: name, ExpectedEpoch: rec.Epoch, Epoch: rec.Epoch + 1, Writer: rec.Writer,
		Copies: len(replicas), Replicas: replicas}
	// Adding a copy is the primary's placement decision (this runs on the
	// leader; the API forwards it here).
	if err := b.node.ChangeCopies(ctx, cluster.Proposer{NodeID: b.nodeID, Primary: true}, change); err != nil {
		return api.LU{}, b.apiError(err)
	}
	return b.afterChange(ctx, name)
}

// RegionHashes hashes regions of this node's copy of an LU.
func (b *daemonBackend) RegionHashes(ctx context.Context, name string, offsetBytes, regionBytes int64, count int) (api.RegionHashes, error) {
	if _, err := b.GetLU(ctx, name); err != nil {
		return api.RegionHashes{}, err
	}
	hashes, err := b.mgr.RegionHashes(ctx, name, offsetBytes, regionBytes, count)
	switch {
	case errors.Is(err, replication.ErrNoCopy):
		return api.RegionHashes{}, fmt.Errorf("%w: %v", api.ErrNotFound, err)
	case errors.Is(err, blockdev.ErrInvalid):
		return api.RegionHashes{}, fmt.Errorf("%w: %v", api.ErrInvalid, err)
	case err != nil:
		return api.RegionHashes{}, err
	}
	return api.RegionHashes{Node: b.nodeID, OffsetBytes: offsetBytes, RegionBytes: regionBytes, Hashes: hashes}, nil
}

// verifyRechecks is how many times a region that differs is hashed again
// before it is reported: a write in flight while the copies were hashed
// makes them differ for a moment.
const verifyRechecks = 3

// VerifyLU compares every copy of an LU region by region, asking each
// copy's node for the hashes of its own copy.
func (b *daemonBackend) VerifyLU(ctx context.Context, name string, req api.VerifyRequest) (api.VerifyReport, error) {
	rec, err := b.node.GetLU(name)
	if err != nil {
		_, err := b.GetLU(ctx, name)
		return api.VerifyReport{}, err
	}
	region := req.RegionBytes
	if region == 0 {
		region = 1 << 20
	}
	if region < 4096 || region > 64<<20 || region%4096 != 0 {
		return api.VerifyReport{}, fmt.Errorf("%w: region %d bytes: use a multiple of 4K from 4K to 64M", api.ErrInvalid, region)
	}
	nodes, err := b.node.Nodes()
	if err != nil {
		return api.VerifyReport{}, err
	}
	report := api.VerifyReport{Name: name, RegionBytes: region, Mismatches: []api.RegionMismatch{}, Skipped: map[string]string{}}
	hashesOf := func(node string, off int64, count int) ([]string, error) {
		if node == b.nodeID {
			h, err := b.RegionHashes(ctx, name, off, region, count)
			return h.Hashes, err
		}
		addr, ok := nodePeerAddr(nodes, node)
		if !ok {
			return nil, fmt.Errorf("node %s has no known peer address", node)
		}
		c, err := b.peers.client(node, addr)
		if err != nil {
			return nil, err
		}
		h, err := c.RegionHashes(ctx, name, off, region, count)
		return h.Hashes, err
	}
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
			h, err := hashesOf(node, off, batch)
			if err != nil {
				report.Skipped[node] = err.Error()
				continue
			}
			all[node] = h
		}
		n := (min(off+batch*region, rec.SizeBytes) - off + region - 1) / region
		report.Regions += n
		for i := int64(0); i < n; i++ {
			if m, ok := b.regionDiffers(all, i, off+i*region, hashesOf); ok {
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
// differs is hashed again (up to verifyRechecks times) and reported only if
// it still differs.
func (b *daemonBackend) regionDiffers(all map[string][]string, i, off int64, hashesOf func(string, int64, int) ([]string, error)) (api.RegionMismatch, bool) {
	hashes := map[string]string{}
	for node, h := range all {
		if int(i) < len(h) {
			hashes[node] = h[i]
		}
	}
	for attempt := 0; ; attempt++ {
		first, same := "", true
		for _, h := range hashes {
			if first == "" {
				first = h
			}
			same = same && h == first
		}
		if same {
			return api.RegionMismatch{}, false
		}
		if attempt == verifyRechecks {
			return api.RegionMismatch{OffsetBytes: off, Hashes: hashes}, true
		}
		time.Sleep(100 * time.Millisecond)
		for node := range hashes {
			if h, err := hashesOf(node, off, 1); err == nil && len(h) == 1 {
				hashes[node] = h[0]
			}
		}
	}
}
