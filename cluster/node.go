// Package cluster keeps lupool's replicated metadata: the LU table, the
// node records and pool settings, changed only through a hashicorp/raft log
// and applied to Pebble on every node (DESIGN.md, decision 3).
//
// A Node owns one Pebble instance under Options.Dir/pebble holding both the
// raft log and stable store (package raftpebble, keys "raft/") and the state
// machine (keys "meta/", see fsm.go), plus raft snapshots under
// Options.Dir/snapshots. A fresh node with Options.Bootstrap becomes a
// one-member cluster; other nodes start without Bootstrap and are added by
// the leader's AddVoter.
//
// Writes (CreateLU, ResizeLU, DeleteLU, ChangeCopies, RegisterNode,
// AddVoter, RemoveServer, RegisterSelf, SetSetting) run on the leader only
// and return ErrNotLeader elsewhere, or ErrOutcomeUnknown when the command
// may or may not have been applied; reads (GetLU, ListLUs, Nodes, Setting)
// read the local applied state, which on a follower may lag the leader by
// a few entries (Barrier on the leader waits for everything committed).
// ListAndWatch gives the table and then every applied change, in order.
package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/hashicorp/raft"
	"github.com/lupool/lupool/cluster/raftpebble"
)

// lockFileName is the file under Options.Dir that one Node at a time holds
// locked (fcntl), so a second process on the same directory fails fast.
const lockFileName = "cluster.lock"

// ErrNoState is returned by Open with Options.ExpectState when the node
// holds no raft state (no log, no term, no snapshot).
var ErrNoState = errors.New("cluster: no metadata state")

// Options configures a Node.
type Options struct {
	// Dir is where the node's state lives; created if missing.
	Dir string
	// NodeID is the stable raft server id; the daemon persists it.
	NodeID string
	// PeerAddr is the raft transport bind address, e.g. 127.0.0.1:10811.
	// Port 0 picks a free port (tests); PeerAddress reports the result.
	PeerAddr string
	// PeerAdvertise is the address other nodes dial; empty means the bound
	// PeerAddr (which must then not be a wildcard address).
	PeerAdvertise string
	// APIAddr and NBDAddr are stored in this node's record for clients.
	APIAddr string
	NBDAddr string
	// CertSHA256 is the fingerprint of this node's certificate, stored in
	// its record (peers accept only that certificate for this node).
	CertSHA256 string
	// Bootstrap makes a node without any raft state a one-member cluster.
	Bootstrap bool
	// ExpectState makes Open fail with ErrNoState when the node has no
	// raft state: the daemon sets it for a node that once belonged to a
	// cluster, so an emptied or unreadable metadata directory is reported
	// instead of starting over.
	ExpectState bool
	// StreamLayer, when set, carries raft's traffic (the daemon passes a
	// mutual-TLS layer, package peerlink); nil means plain TCP on PeerAddr.
	// With a StreamLayer, PeerAddr is only recorded, the layer listens.
	StreamLayer raft.StreamLayer
	// Transport, when set, carries raft's traffic instead of a network
	// transport: tests pass raft.NewInmemTransport and cut or heal links
	// in-process (partition_test.go). PeerAddr and StreamLayer are then
	// unused; the transport's LocalAddr is this node's raft address. The
	// node closes it on Close when it has a Close method (raft.WithClose).
	Transport raft.Transport
	// Logger receives the node's and raft's logs; nil means discard.
	Logger *slog.Logger
	// FS is where Pebble keeps its files; nil means the OS file system.
	// Tests pass vfs.NewCrashableMem(). Snapshots always use the OS.
	FS vfs.FS

	// Raft timing. Defaults suit loopback and tests (elections in well
	// under a second); raise them for real networks.
	HeartbeatTimeout   time.Duration
	ElectionTimeout    time.Duration
	LeaderLeaseTimeout time.Duration
	CommitTimeout      time.Duration
	// SnapshotInterval and SnapshotThreshold: raft checks every interval
	// and snapshots when more than threshold entries were applied since the
	// last snapshot; TrailingLogs entries stay in the log after compaction.
	SnapshotInterval  time.Duration
	SnapshotThreshold uint64
	TrailingLogs      uint64
	// ApplyTimeout bounds a write when the context has no deadline.
	ApplyTimeout time.Duration
	// ReplaceAfter, when positive, makes the leader replace a copy that
	// stayed out of sync (or new) this long by a new copy on another node.
	ReplaceAfter time.Duration
	// LUsPerNodeMax is the most LU copies this node, as the proposer of a
	// create or copy change, lets one node hold (0: rules.LUsPerNodeMax;
	// at most that).
	LUsPerNodeMax int

	// Probe, when set, is how the leader checks that a member is alive
	// (the daemon asks the node's peer port); with FailoverAfter positive
	// it turns on the liveness view and writer failover (failover.go).
	Probe func(ctx context.Context, nodeID string) error
	// ProbeInterval is how often the leader probes every member (default
	// 200 ms); ProbeTimeout bounds one probe (default 500 ms).
	ProbeInterval time.Duration
	ProbeTimeout  time.Duration
	// SuspectAfter: a member silent this long is suspect (default 600 ms).
	SuspectAfter time.Duration
	// FailoverAfter: a member silent this long is dead, and the LUs it
	// writes get a new writer; 0 turns failover off. It must exceed
	// ReadLease.
	FailoverAfter time.Duration
	// ReadLease is how long a read lease lasts (the replication package's
	// ReadLease; default 1 s): the primary promotes a new writer only this
	// long after it last confirmed the old one a metadata lease.
	ReadLease time.Duration
	// MoveTimeout bounds a planned writer move (move.go): the primary
	// rolls back a move not switched this long after it started, and
	// completes one that switched (default 15 s).
	MoveTimeout time.Duration
	// EventsMax and EventsMaxAge bound the event log (events.go): the
	// primary prunes the oldest events beyond EventsMax events or older
	// than EventsMaxAge, checking every EventRetentionEvery. Zero means
	// 100000 events, 30 days, one minute; negative means no limit.
	EventsMax           int
	EventsMaxAge        time.Duration
	EventRetentionEvery time.Duration
	// DeliveryAckTimeout bounds how long a registered caller may take to
	// acknowledge a batch of events (zero means 10 s).
	DeliveryAckTimeout time.Duration
}

// EnsureDefaults fills unset fields.
func (o *Options) EnsureDefaults() {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.FS == nil {
		o.FS = vfs.Default
	}
	if o.HeartbeatTimeout == 0 {
		// Loopback round trips are microseconds; 500 ms leaves room for
		// GC pauses and -race on a loaded 2-core machine, and still elects
		// a leader within about a second.
		o.HeartbeatTimeout = 500 * time.Millisecond
	}
	if o.ElectionTimeout == 0 {
		o.ElectionTimeout = o.HeartbeatTimeout
	}
	if o.LeaderLeaseTimeout == 0 {
		// The most raft.ValidateConfig allows: a leader that cannot reach a
		// quorum for this long steps down. Shorter makes a loaded machine
		// (CPU starvation under -race) flap leadership.
		o.LeaderLeaseTimeout = o.HeartbeatTimeout
	}
	if o.MoveTimeout == 0 {
		// Far above a handover (a drain and one log entry), far below a
		// client's I/O timeout.
		o.MoveTimeout = 15 * time.Second
	}
	if o.ProbeInterval == 0 {
		o.ProbeInterval = 200 * time.Millisecond
	}
	if o.ProbeTimeout == 0 {
		o.ProbeTimeout = 500 * time.Millisecond
	}
	if o.SuspectAfter == 0 {
		o.SuspectAfter = 600 * time.Millisecond
	}
	if o.ReadLease == 0 {
		o.ReadLease = time.Second
	}
	if o.CommitTimeout == 0 {
		o.CommitTimeout = 20 * time.Millisecond
	}
	if o.SnapshotInterval == 0 {
		o.SnapshotInterval = 30 * time.Second
	}
	if o.SnapshotThreshold == 0 {
		// Metadata entries are small; 8192 keeps the log under a few MiB.
		o.SnapshotThreshold = 8192
	}
	if o.TrailingLogs == 0 {
		// Enough for a briefly absent follower to catch up from the log
		// instead of a snapshot.
		o.TrailingLogs = 1024
	}
	if o.ApplyTimeout == 0 {
		o.ApplyTimeout = 10 * time.Second
	}
	if o.EventsMax == 0 {
		o.EventsMax = defaultEventsMax
	}
	if o.EventsMaxAge == 0 {
		o.EventsMaxAge = defaultEventsMaxAge
	}
	if o.DeliveryAckTimeout <= 0 {
		o.DeliveryAckTimeout = deliveryAckTimeout
	}
	if o.EventRetentionEvery <= 0 {
		o.EventRetentionEvery = eventRetentionEvery
	}
}

// Validate reports the first unusable setting.
func (o *Options) Validate() error {
	switch {
	case o.Dir == "":
		return errors.New("cluster: Options.Dir is empty")
	case o.NodeID == "":
		return errors.New("cluster: Options.NodeID is empty")
	case o.PeerAddr == "":
		return errors.New("cluster: Options.PeerAddr is empty")
	case o.LeaderLeaseTimeout > o.HeartbeatTimeout:
		return fmt.Errorf("cluster: LeaderLeaseTimeout %v exceeds HeartbeatTimeout %v", o.LeaderLeaseTimeout, o.HeartbeatTimeout)
	case o.FailoverAfter > 0 && o.FailoverAfter <= o.ReadLease:
		return fmt.Errorf("cluster: FailoverAfter %v must exceed ReadLease %v (a dead writer's copies may still serve reads until their leases run out)", o.FailoverAfter, o.ReadLease)
	case o.ElectionTimeout < o.HeartbeatTimeout:
		return fmt.Errorf("cluster: ElectionTimeout %v is below HeartbeatTimeout %v", o.ElectionTimeout, o.HeartbeatTimeout)
	}
	host, _, err := net.SplitHostPort(o.PeerAddr)
	if err != nil {
		return fmt.Errorf("cluster: PeerAddr %q: %w", o.PeerAddr, err)
	}
	if ip := net.ParseIP(host); (host == "" || ip != nil && ip.IsUnspecified()) && o.PeerAdvertise == "" {
		return fmt.Errorf("cluster: PeerAddr %q listens on every address; set PeerAdvertise to the address other nodes should dial", o.PeerAddr)
	}
	return nil
}

// Node is one member of the metadata cluster. Its methods are safe for
// concurrent use.
type Node struct {
	opts  Options                 // immutable after Open
	log   *slog.Logger            // immutable; never nil
	db    *pebble.DB              // immutable; closed by Close
	lock  io.Closer               // immutable; held on Dir/cluster.lock until Close
	fsm   *fsm                    // immutable
	trans raft.Transport          // immutable; closed by Close
	raft  *raft.Raft              // immutable
	snaps *raft.FileSnapshotStore // immutable

	// dbMu keeps Pebble open while a read method uses it: readers hold it
	// shared and check closed; Close holds it exclusively to close Pebble.
	dbMu      sync.RWMutex
	closeOnce sync.Once
	closeErr  error         // written once by Close
	closed    chan struct{} // closed by Close
	wg        sync.WaitGroup
	// registering is set while a goroutine writes this node's record
	// after an election (at most one at a time).
	registering atomic.Bool
	// watch is the primary's liveness view (failover.go); never nil.
	watch *watch
	// failovers counts writers this node promoted as primary.
	failovers atomic.Uint64
	// announcedTerm is the last term this node recorded PrimaryElected for.
	announcedTerm atomic.Uint64
	// delivery sends events to the registered callers while this node is
	// the primary (delivery.go).
	delivery *delivery // immutable after start
}

// Open opens (or creates) the node's state and starts raft.
func Open(opts Options) (*Node, error) {
	opts.EnsureDefaults()
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	log := opts.Logger.With("component", "cluster", "node", opts.NodeID)
	if err := os.MkdirAll(opts.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("cluster: create %s: %w", opts.Dir, err)
	}
	pebbleDir := filepath.Join(opts.Dir, "pebble")
	if err := mkdirAllSynced(opts.FS, pebbleDir); err != nil {
		return nil, err
	}
	lockPath := filepath.Join(opts.Dir, lockFileName)
	lock, err := opts.FS.Lock(lockPath)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v; is another lupool running on %s?", ErrLocked, lockPath, err, opts.Dir)
	}
	db, err := pebble.Open(pebbleDir, &pebble.Options{FS: opts.FS, Logger: pebbleLogger{log}})
	if err != nil {
		_ = lock.Close()
		return nil, fmt.Errorf("cluster: open pebble in %s: %w", pebbleDir, err)
	}
	n := &Node{opts: opts, log: log, db: db, lock: lock, closed: make(chan struct{}), watch: newWatch()}
	if err := n.start(); err != nil {
		_ = n.closeTransport()
		_ = db.Close()
		_ = lock.Close()
		return nil, err
	}
	return n, nil
}

func (n *Node) start() error {
	opts := &n.opts
	store, err := raftpebble.New(n.db)
	if err != nil {
		return err
	}
	if n.fsm, err = newFSM(n.db, n.log); err != nil {
		return err
	}
	hlog := newHclog(n.log)
	n.snaps, err = raft.NewFileSnapshotStoreWithLogger(opts.Dir, 2 /* retain */, hlog.Named("snapshots"))
	if err != nil {
		return fmt.Errorf("cluster: snapshot store in %s: %w", opts.Dir, err)
	}
	if err := n.catchUpFromSnapshot(); err != nil {
		return err
	}
	var advertise net.Addr
	if opts.PeerAdvertise != "" {
		if advertise, err = net.ResolveTCPAddr("tcp", opts.PeerAdvertise); err != nil {
			return fmt.Errorf("cluster: PeerAdvertise %q: %w", opts.PeerAdvertise, err)
		}
	}
	switch {
	case opts.Transport != nil:
		n.trans = opts.Transport
	case opts.StreamLayer != nil:
		n.trans = raft.NewNetworkTransportWithConfig(&raft.NetworkTransportConfig{
			Stream: opts.StreamLayer, MaxPool: 3, Timeout: 10 * time.Second, Logger: hlog.Named("transport"),
		})
	default:
		n.trans, err = raft.NewTCPTransportWithLogger(opts.PeerAddr, advertise, 3 /* maxPool */, 10*time.Second, hlog.Named("transport"))
	}
	if err != nil {
		return fmt.Errorf("cluster: raft transport on %s: %w", opts.PeerAddr, err)
	}
	cfg := raft.DefaultConfig()
	cfg.LocalID = raft.ServerID(opts.NodeID)
	cfg.HeartbeatTimeout = opts.HeartbeatTimeout
	cfg.ElectionTimeout = opts.ElectionTimeout
	cfg.LeaderLeaseTimeout = opts.LeaderLeaseTimeout
	cfg.CommitTimeout = opts.CommitTimeout
	cfg.SnapshotInterval = opts.SnapshotInterval
	cfg.SnapshotThreshold = opts.SnapshotThreshold
	cfg.TrailingLogs = opts.TrailingLogs
	// The state in Pebble is at least as new as any snapshot: restoring
	// one on start would roll it back and re-apply entries.
	cfg.NoSnapshotRestoreOnStart = true
	cfg.Logger = hlog
	notify := make(chan bool, 1)
	cfg.NotifyCh = notify
	if err := raft.ValidateConfig(cfg); err != nil {
		return fmt.Errorf("cluster: raft config: %w", err)
	}
	has, err := raft.HasExistingState(store, store, n.snaps)
	if err != nil {
		return fmt.Errorf("cluster: read raft state: %w", err)
	}
	if !has && opts.ExpectState {
		return fmt.Errorf("%w in %s", ErrNoState, opts.Dir)
	}
	if !has && opts.Bootstrap {
		conf := raft.Configuration{Servers: []raft.Server{{
			Suffrage: raft.Voter, ID: cfg.LocalID, Address: n.trans.LocalAddr(),
		}}}
		if err := raft.BootstrapCluster(cfg, store, store, n.snaps, n.trans, conf); err != nil {
			return fmt.Errorf("cluster: bootstrap: %w", err)
		}
		n.log.Info("bootstrapped a one-member cluster", "peer", n.trans.LocalAddr())
	}
	n.raft, err = raft.NewRaft(cfg, n.fsm, store, store, n.snaps, n.trans)
	if err != nil {
		return fmt.Errorf("cluster: start raft: %w", err)
	}
	n.wg.Add(1)
	go n.leaderLoop(notify)
	if n.opts.ReplaceAfter > 0 {
		n.wg.Add(1)
		go n.replaceLoop()
	}
	if n.opts.Probe != nil && n.opts.FailoverAfter > 0 {
		n.wg.Add(1)
		go n.failoverLoop()
	}
	n.wg.Add(1)
	go n.moveLoop()
	n.wg.Add(1)
	go n.retentionLoop()
	n.delivery = &delivery{n: n, workers: map[string]*deliveryWorker{}, status: map[string]DeliveryStatus{}}
	n.wg.Add(1)
	go n.delivery.loop()
	n.log.Info("raft started", "peer", n.trans.LocalAddr(), "existing_state", has,
		"fsm_index", n.fsm.applied.Load(), "lus", n.fsm.luCount.Load())
	return nil
}

// catchUpFromSnapshot restores the newest local snapshot into the state
// machine when the state in Pebble is older than it. Raft does not restore
// on start (NoSnapshotRestoreOnStart) and may have deleted the log entries
// the snapshot covers, so a crash after a follower stored an installed
// snapshot but before it applied it would otherwise lose those entries.
func (n *Node) catchUpFromSnapshot() error {
	metas, err := n.snaps.List()
	if err != nil {
		return fmt.Errorf("cluster: list snapshots: %w", err)
	}
	if len(metas) == 0 {
		return nil
	}
	meta, rc, err := n.snaps.Open(metas[0].ID)
	if err != nil {
		return fmt.Errorf("cluster: open snapshot %s: %w", metas[0].ID, err)
	}
	data, err := io.ReadAll(rc)
	_ = rc.Close()
	if err != nil {
		return fmt.Errorf("cluster: read snapshot %s: %w", meta.ID, err)
	}
	snapApplied, err := snapshotAppliedIndex(data)
	if err != nil {
		return fmt.Errorf("cluster: snapshot %s: %w", meta.ID, err)
	}
	if snapApplied <= n.fsm.applied.Load() {
		return nil
	}
	n.log.Warn("metadata state is older than the latest snapshot; restoring the snapshot",
		"snapshot", meta.ID, "snapshot_fsm_index", snapApplied, "fsm_index", n.fsm.applied.Load())
	return n.fsm.Restore(io.NopCloser(bytes.NewReader(data)))
}

// Close shuts raft down, then the transport, then Pebble. It is safe to
// call more than once.
func (n *Node) Close() error {
	n.closeOnce.Do(func() {
		close(n.closed)
		var errs []error
		if err := n.raft.Shutdown().Error(); err != nil {
			errs = append(errs, fmt.Errorf("cluster: raft shutdown: %w", err))
		}
		n.wg.Wait()
		if err := n.closeTransport(); err != nil {
			errs = append(errs, fmt.Errorf("cluster: transport close: %w", err))
		}
		n.dbMu.Lock()
		err := n.db.Close()
		n.dbMu.Unlock()
		if err != nil {
			errs = append(errs, fmt.Errorf("cluster: pebble close: %w", err))
		}
		if err := n.lock.Close(); err != nil {
			errs = append(errs, fmt.Errorf("cluster: unlock: %w", err))
		}
		n.closeErr = errors.Join(errs...)
	})
	return n.closeErr
}

// readDB runs fn with Pebble guaranteed open, or returns ErrClosed.
func (n *Node) readDB(fn func() error) error {
	n.dbMu.RLock()
	defer n.dbMu.RUnlock()
	if n.isClosed() {
		return ErrClosed
	}
	return fn()
}

func (n *Node) isClosed() bool {
	select {
	case <-n.closed:
		return true
	default:
		return false
	}
}

// leaderLoop keeps the leader's own node record current: whenever this
// node becomes leader it writes its addresses if the record differs, so
// Leader() on every node can name the leader's API address.
func (n *Node) leaderLoop(notify <-chan bool) {
	defer n.wg.Done()
	for {
		select {
		case <-n.closed:
			return
		case isLeader := <-notify:
			// Never block here: raft's main loop waits for this receive.
			if !isLeader || !n.registering.CompareAndSwap(false, true) {
				continue
			}
			n.wg.Add(1) // safe: this goroutine's own count keeps wg above zero
			go func() {
				defer n.wg.Done()
				defer n.registering.Store(false)
				if err := n.ensureSelfRecord(); err != nil && !errors.Is(err, ErrClosed) {
					n.log.Warn("could not record this node's addresses as leader", "err", err)
				}
				if err := n.announcePrimary(); err != nil && !errors.Is(err, ErrClosed) {
					n.log.Warn("could not record the PrimaryElected event", "err", err)
				}
			}()
		}
	}
}

// announcePrimary records a PrimaryElected event for this node's term.
func (n *Node) announcePrimary() error {
	ctx, cancel := context.WithTimeout(context.Background(), n.opts.ApplyTimeout)
	defer cancel()
	go func() {
		select {
		case <-n.closed:
			cancel()
		case <-ctx.Done():
		}
	}()
	term := n.raft.CurrentTerm()
	if n.announcedTerm.Load() == term {
		return nil // raft told of this term's leadership twice
	}
	err := n.AppendEvent(ctx, Proposer{NodeID: n.opts.NodeID, Primary: true}, Event{Kind: EventPrimaryElected, Node: n.opts.NodeID,
		Details: map[string]string{"term": strconv.FormatUint(term, 10)}})
	if err == nil {
		n.announcedTerm.Store(term)
	}
	return err
}

func (n *Node) ensureSelfRecord() error {
	ctx, cancel := context.WithTimeout(context.Background(), n.opts.ApplyTimeout)
	defer cancel()
	go func() {
		select {
		case <-n.closed:
			cancel()
		case <-ctx.Done():
		}
	}()
	if err := n.Barrier(ctx); err != nil {
		return err
	}
	var rec nodeRecord
	found, err := getJSON(n.db, nodePrefix+n.opts.NodeID, &rec)
	if err != nil {
		return err
	}
	if found && rec.PeerAddr == n.PeerAddress() && rec.APIAddr == n.opts.APIAddr && rec.NBDAddr == n.opts.NBDAddr &&
		rec.CertSHA256 == n.opts.CertSHA256 {
		return nil
	}
	return n.RegisterSelf(ctx)
}

// ID returns this node's id.
func (n *Node) ID() string { return n.opts.NodeID }

// closeTransport closes the raft transport when it can be closed (every
// network transport can; an in-memory one of Options.Transport can too).
func (n *Node) closeTransport() error {
	if c, ok := n.trans.(raft.WithClose); ok {
		return c.Close()
	}
	return nil
}

// PeerAddress returns the raft transport's address (useful with port 0).
func (n *Node) PeerAddress() string { return string(n.trans.LocalAddr()) }

// WaitLeader waits until the cluster has a leader known to this node.
func (n *Node) WaitLeader(ctx context.Context) error {
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for {
		if n.isClosed() {
			return ErrClosed
		}
		if addr, _ := n.raft.LeaderWithID(); addr != "" {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("cluster: waiting for a leader: %w", ctx.Err())
		case <-t.C:
		}
	}
}

// IsLeader reports whether this node is the raft leader.
func (n *Node) IsLeader() bool { return n.raft.State() == raft.Leader }

// Leader returns the leader's node id and API address; empty when unknown
// (the API address is empty until the leader's record is written, see
// RegisterSelf).
func (n *Node) Leader() (id, apiAddr string) {
	_, sid := n.raft.LeaderWithID()
	if sid == "" {
		return "", ""
	}
	_ = n.readDB(func() error {
		var rec nodeRecord
		if found, err := getJSON(n.db, nodePrefix+string(sid), &rec); err == nil && found {
			apiAddr = rec.APIAddr
		}
		return nil
	})
	return string(sid), apiAddr
}

// propose runs a command through the log and returns its result. When the
// context ends or leadership is lost after the command was appended, the
// error wraps ErrOutcomeUnknown: the command may still be applied.
func (n *Node) propose(ctx context.Context, c *command) (*Change, error) {
	if n.isClosed() {
		return nil, ErrClosed
	}
	if n.raft.State() != raft.Leader {
		return nil, ErrNotLeader
	}
	c.At = time.Now().UTC()
	data, err := encodeCommand(c)
	if err != nil {
		return nil, err
	}
	timeout := n.opts.ApplyTimeout
	if d, ok := ctx.Deadline(); ok {
		timeout = time.Until(d)
	}
	f := n.raft.Apply(data, timeout)
	done := make(chan error, 1)
	go func() { done <- f.Error() }()
	select {
	case <-ctx.Done():
		return nil, fmt.Errorf("%w: %s: %w", ErrOutcomeUnknown, c.Type, ctx.Err())
	case err := <-done:
		if errors.Is(err, raft.ErrNotLeader) || errors.Is(err, raft.ErrLeadershipTransferInProgress) {
			return nil, fmt.Errorf("%w: %s: %v", ErrNotLeader, c.Type, err)
		}
		if errors.Is(err, raft.ErrLeadershipLost) {
			return nil, fmt.Errorf("%w: %s: %v", ErrOutcomeUnknown, c.Type, err)
		}
		if errors.Is(err, raft.ErrRaftShutdown) {
			return nil, ErrClosed
		}
		if err != nil {
			return nil, fmt.Errorf("cluster: %s: %w", c.Type, err)
		}
	}
	res, ok := f.Response().(applyResult)
	if !ok {
		return nil, fmt.Errorf("cluster: %s: unexpected apply response %T", c.Type, f.Response())
	}
	return res.change, res.err
}

// CreateLU adds lu to the table. Zero fields get defaults: Kind "file",
// Copies 1, CreatedOn and Writer this node, Epoch 1, and for one copy the
// writer's copy in sync; CreatedAt is set by the leader. Every copy must be
// in sync on a member (a node with a record), the writer's first, and
// Copies must equal the number of copies. When this node holds a copy and
// has no record yet (a freshly bootstrapped node), its record is written
// first. The primary proposes it (the admin operation it runs). Returns
// ErrExists, ErrInvalid or ErrNotLeader.
func (n *Node) CreateLU(ctx context.Context, lu LU) error {
	lu = withDefaults(lu, n.opts.NodeID)
	if err := validateLU(&lu); err != nil {
		return err
	}
	if _, err := n.GetLU(lu.Name); err == nil {
		return fmt.Errorf("%w: %q", ErrExists, lu.Name)
	}
	if len(lu.Replicas) == 0 {
		return checkCreate(lu, nil) // says what to fix
	}
	members, err := n.membersWithSelf(ctx, lu.Replicas)
	if err != nil {
		return err
	}
	if err := checkCreate(lu, members); err != nil {
		return err
	}
	_, err = n.propose(ctx, &command{Type: cmdCreateLU, LU: &lu, By: n.opts.NodeID, Primary: true, LUsPerNodeMax: n.opts.LUsPerNodeMax})
	return err
}

// ResizeLU sets the size of an LU. Returns ErrNotFound, ErrInvalid or
// ErrNotLeader. Shrinking is allowed here; the caller decides policy.
func (n *Node) ResizeLU(ctx context.Context, name string, sizeBytes int64) error {
	if err := ValidateName(name); err != nil {
		return err
	}
	if err := ValidateSize(sizeBytes); err != nil {
		return err
	}
	if _, err := n.GetLU(name); err != nil {
		return err
	}
	_, err := n.propose(ctx, &command{Type: cmdResizeLU, Name: name, SizeBytes: sizeBytes, By: n.opts.NodeID, Primary: true})
	return err
}

// SetQoS replaces an LU's QoS limits (a zero QoS lifts them). The primary
// proposes it (the admin operation it runs). Returns ErrNotFound,
// ErrInvalid or ErrNotLeader.
func (n *Node) SetQoS(ctx context.Context, name string, q QoS) error {
	if err := ValidateName(name); err != nil {
		return err
	}
	if err := ValidateQoS(q); err != nil {
		return err
	}
	if _, err := n.GetLU(name); err != nil {
		return err
	}
	_, err := n.propose(ctx, &command{Type: cmdSetQoS, Name: name, QoS: &q, By: n.opts.NodeID, Primary: true})
	return err
}

// DeleteLU removes an LU from the table. Returns ErrNotFound or
// ErrNotLeader.
func (n *Node) DeleteLU(ctx context.Context, name string) error {
	if err := ValidateName(name); err != nil {
		return err
	}
	if _, err := n.GetLU(name); err != nil {
		return err
	}
	_, err := n.propose(ctx, &command{Type: cmdDeleteLU, Name: name, By: n.opts.NodeID, Primary: true})
	return err
}

// ChangeCopies proposes c on behalf of by and waits until it is applied.
// Leader only. The caller sets by from the requester's authenticated
// identity (its certificate) or, for the primary's own control loops and
// admin operations, Proposer{NodeID: n.ID(), Primary: true}; never from a
// request body.
//
// Apply decides with CheckCopyChange against the committed state, so two
// racing proposers from one epoch cannot both win. The same check runs
// first against this node's applied state when that is at least at
// c.ExpectedEpoch, to refuse an illegal change without a log entry.
// Returns ErrEpochChanged (read the LU again, recompute, retry),
// ErrIllegalChange (with the rule), ErrNotFound, ErrInvalid, ErrNotLeader
// or ErrOutcomeUnknown.
func (n *Node) ChangeCopies(ctx context.Context, by Proposer, c CopyChange) error {
	if err := ValidateName(c.Name); err != nil {
		return err
	}
	if by.NodeID == "" {
		return fmt.Errorf("%w: a copy change needs the proposer's node id", ErrInvalid)
	}
	old, err := n.GetLU(c.Name)
	if err != nil {
		return err
	}
	c.Replicas = append([]Replica(nil), c.Replicas...)
	// A local epoch below the expected one means this node has not applied
	// everything committed yet: leave the verdict to Apply.
	if old.Epoch >= c.ExpectedEpoch {
		members, err := n.membersWithSelf(ctx, c.Replicas)
		if err != nil {
			return err
		}
		if err := CheckCopyChange(old, c, by, members); err != nil {
			return err
		}
	}
	_, err = n.propose(ctx, &command{Type: cmdCopies, Change: &c, By: by.NodeID, Primary: by.Primary, LUsPerNodeMax: n.opts.LUsPerNodeMax})
	return err
}

// GetLU reads one LU from the local applied state. Returns ErrNotFound.
func (n *Node) GetLU(name string) (lu LU, err error) {
	err = n.readDB(func() error {
		lu, err = n.fsm.mustGetLU(name)
		return err
	})
	return lu, err
}

// ListLUs returns the local applied LU table sorted by name.
func (n *Node) ListLUs() (lus []LU, err error) {
	err = n.readDB(func() error {
		lus, err = listLUs(n.db) // key order is name order
		return err
	})
	return lus, err
}

// SetSetting stores a pool setting through the log (leader only).
func (n *Node) SetSetting(ctx context.Context, key, value string) error {
	if key == "" {
		return fmt.Errorf("%w: empty setting name", ErrInvalid)
	}
	_, err := n.propose(ctx, &command{Type: cmdSetSetting, Name: key, Value: value, By: n.opts.NodeID, Primary: true})
	return err
}

// Setting reads a pool setting from the local applied state.
func (n *Node) Setting(key string) (value string, found bool, err error) {
	err = n.readDB(func() error {
		v, c, err := n.db.Get([]byte(settingPrefix + key))
		if errors.Is(err, pebble.ErrNotFound) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("cluster: read setting %q: %w", key, err)
		}
		defer c.Close()
		value, found = string(v), true
		return nil
	})
	return value, found, err
}

// RegisterSelf records this node's addresses in the node table, proposed
// by this node for its own record. Call it on the leader after WaitLeader
// (and again whenever addresses change); a follower re-registers through
// the leader, which calls RegisterNode. Returns ErrNotLeader.
func (n *Node) RegisterSelf(ctx context.Context) error {
	rec := nodeRecord{ID: n.opts.NodeID, PeerAddr: n.PeerAddress(), APIAddr: n.opts.APIAddr, NBDAddr: n.opts.NBDAddr,
		CertSHA256: n.opts.CertSHA256}
	_, err := n.propose(ctx, &command{Type: cmdUpsertNode, Node: &rec, By: n.opts.NodeID})
	return err
}

// RegisterNode records a member's own addresses, proposed on its behalf by
// the leader: by is the requester's authenticated identity, and it may
// write only its own record (by.NodeID == rec.ID; checked here and again
// in Apply). Leader only. Returns ErrForeignRecord, ErrInvalid or
// ErrNotLeader.
func (n *Node) RegisterNode(ctx context.Context, by Proposer, rec NodeAddrs) error {
	if rec.ID == "" || rec.PeerAddr == "" {
		return fmt.Errorf("%w: a node record needs a node id and a peer address", ErrInvalid)
	}
	if by.NodeID != rec.ID {
		return fmt.Errorf("%w: %q proposes addresses for %q", ErrForeignRecord, by.NodeID, rec.ID)
	}
	nr := nodeRecord{ID: rec.ID, PeerAddr: rec.PeerAddr, APIAddr: rec.APIAddr, NBDAddr: rec.NBDAddr, CertSHA256: rec.CertSHA256}
	_, err := n.propose(ctx, &command{Type: cmdUpsertNode, Node: &nr, By: by.NodeID, Primary: by.Primary})
	return err
}

// IsMember reports whether id has a node record in the local applied state
// or is in the raft configuration. It is false after Close.
func (n *Node) IsMember(id string) bool {
	if id == "" || n.isClosed() {
		return false
	}
	if _, in, err := n.configServer(id); err == nil && in {
		return true
	}
	found := false
	_ = n.readDB(func() (err error) {
		var rec nodeRecord
		found, err = getJSON(n.db, nodePrefix+id, &rec)
		return err
	})
	return found
}

// MemberCert returns the certificate fingerprint recorded for member id
// (from the local applied state); ok is false when id has no record.
func (n *Node) MemberCert(id string) (certSHA256 string, ok bool) {
	if id == "" || n.isClosed() {
		return "", false
	}
	var rec nodeRecord
	var found bool
	_ = n.readDB(func() (err error) {
		found, err = getJSON(n.db, nodePrefix+id, &rec)
		return err
	})
	return rec.CertSHA256, found
}

// configServer returns id's entry in the latest raft configuration.
func (n *Node) configServer(id string) (raft.Server, bool, error) {
	f := n.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return raft.Server{}, false, fmt.Errorf("cluster: raft configuration: %w", err)
	}
	for _, s := range f.Configuration().Servers {
		if string(s.ID) == id {
			return s, true, nil
		}
	}
	return raft.Server{}, false, nil
}

// AddVoter adds a new node to the raft configuration as a voter and records
// its addresses (a join: the record is written only if none exists).
// Leader only. An id that already belongs to a member (in the configuration
// or with a record) is refused with ErrMember before raft is touched,
// except for a retry of the same join (the same peer address), which
// finishes whatever the first attempt left undone and is otherwise a
// no-op. Returns ErrMember, ErrInvalid, ErrNotLeader or ErrOutcomeUnknown.
func (n *Node) AddVoter(ctx context.Context, id, peerAddr, apiAddr, nbdAddr, certSHA256 string) error {
	if id == "" || peerAddr == "" {
		return fmt.Errorf("%w: AddVoter needs a node id and a peer address", ErrInvalid)
	}
	if n.isClosed() {
		return ErrClosed
	}
	if n.raft.State() != raft.Leader {
		return ErrNotLeader
	}
	server, inConfig, err := n.configServer(id)
	if err != nil {
		return err
	}
	var rec nodeRecord
	var hasRecord bool
	if err := n.readDB(func() (err error) {
		hasRecord, err = getJSON(n.db, nodePrefix+id, &rec)
		return err
	}); err != nil {
		return err
	}
	if inConfig && string(server.Address) != peerAddr {
		return fmt.Errorf("%w: %q is in the raft configuration at %s, not %s; remove it first to rejoin it",
			ErrMember, id, server.Address, peerAddr)
	}
	if hasRecord && rec.PeerAddr != peerAddr {
		return fmt.Errorf("%w: %q is recorded at %s, not %s; remove it first to rejoin it",
			ErrMember, id, rec.PeerAddr, peerAddr)
	}
	if hasRecord && rec.CertSHA256 != certSHA256 {
		return fmt.Errorf("%w: %q is recorded with another certificate; remove it first to rejoin it", ErrMember, id)
	}
	if !inConfig {
		timeout := n.opts.ApplyTimeout
		if d, ok := ctx.Deadline(); ok {
			timeout = time.Until(d)
		}
		if err := n.raft.AddVoter(raft.ServerID(id), raft.ServerAddress(peerAddr), 0, timeout).Error(); err != nil {
			if errors.Is(err, raft.ErrNotLeader) || errors.Is(err, raft.ErrLeadershipLost) {
				return fmt.Errorf("%w: add voter %s: %v", ErrNotLeader, id, err)
			}
			return fmt.Errorf("cluster: add voter %s at %s: %w", id, peerAddr, err)
		}
	}
	if hasRecord {
		return nil // the same join again: its record is there
	}
	nr := nodeRecord{ID: id, PeerAddr: peerAddr, APIAddr: apiAddr, NBDAddr: nbdAddr, CertSHA256: certSHA256}
	_, err = n.propose(ctx, &command{Type: cmdUpsertNode, Node: &nr, Join: true, By: n.opts.NodeID, Primary: true})
	return err
}

// RemoveServer removes a node from the raft configuration and deletes its
// record (proposed by the primary). Leader only.
func (n *Node) RemoveServer(ctx context.Context, id string) error {
	if n.isClosed() {
		return ErrClosed
	}
	if n.raft.State() != raft.Leader {
		return ErrNotLeader
	}
	timeout := n.opts.ApplyTimeout
	if d, ok := ctx.Deadline(); ok {
		timeout = time.Until(d)
	}
	if err := n.raft.RemoveServer(raft.ServerID(id), 0, timeout).Error(); err != nil {
		return fmt.Errorf("cluster: remove server %s: %w", id, err)
	}
	_, err := n.propose(ctx, &command{Type: cmdRemoveNode, Name: id, By: n.opts.NodeID, Primary: true})
	return err
}

// Nodes lists the raft configuration's members merged with their records,
// sorted by id; nodes with a record but no longer in the configuration
// are listed with Suffrage "none".
func (n *Node) Nodes() ([]NodeInfo, error) {
	if n.isClosed() {
		return nil, ErrClosed
	}
	f := n.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return nil, fmt.Errorf("cluster: raft configuration: %w", err)
	}
	var recs map[string]nodeRecord
	err := n.readDB(func() (err error) {
		recs, err = listNodeRecords(n.db)
		return err
	})
	if err != nil {
		return nil, err
	}
	_, leader := n.raft.LeaderWithID()
	var out []NodeInfo
	for _, s := range f.Configuration().Servers {
		info := NodeInfo{ID: string(s.ID), PeerAddr: string(s.Address), Leader: s.ID == leader}
		switch s.Suffrage {
		case raft.Voter:
			info.Suffrage = suffrageVoter
		case raft.Nonvoter:
			info.Suffrage = suffrageNonvoter
		default:
			info.Suffrage = suffrageStaging
		}
		if rec, ok := recs[info.ID]; ok {
			info.APIAddr, info.NBDAddr, info.UpdatedAt, info.CertSHA256 = rec.APIAddr, rec.NBDAddr, rec.UpdatedAt, rec.CertSHA256
			delete(recs, info.ID)
		}
		out = append(out, info)
	}
	for _, rec := range recs {
		out = append(out, NodeInfo{ID: rec.ID, PeerAddr: rec.PeerAddr, APIAddr: rec.APIAddr,
			NBDAddr: rec.NBDAddr, Suffrage: suffrageUnlisted, UpdatedAt: rec.UpdatedAt, CertSHA256: rec.CertSHA256})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

// Stats returns raft's state and indexes.
func (n *Node) Stats() Stats {
	s := Stats{
		State:        n.raft.State().String(),
		Term:         n.raft.CurrentTerm(),
		LastLogIndex: n.raft.LastIndex(),
		CommitIndex:  n.raft.CommitIndex(),
		AppliedIndex: n.raft.AppliedIndex(),
		FSMIndex:     n.fsm.applied.Load(),
		Rejected:     n.fsm.rejected.Load(),
		LUs:          n.fsm.luCount.Load(),

		AppliedSinceOpen: n.fsm.appliedSinceOpen.Load(),
		SkippedSinceOpen: n.fsm.skippedSinceOpen.Load(),
	}
	_, leader := n.raft.LeaderWithID()
	s.LeaderID = string(leader)
	if !n.isClosed() {
		if f := n.raft.GetConfiguration(); f.Error() == nil {
			s.NodeCount = len(f.Configuration().Servers)
		}
	}
	return s
}

// Watch registers fn, called in apply order after each applied LU change
// (and with the differences after a snapshot restore), from raft's apply
// goroutine: fn must not block for long and must not call write methods
// of this Node. The returned func unregisters fn.
func (n *Node) Watch(fn func(Change)) (cancel func()) {
	return n.fsm.watch(fn)
}

// ListAndWatch returns the LU table and registers fn for every change
// applied after that table, with nothing missed or seen twice: call it once
// after Open to build the exports, then follow the changes. fn runs like a
// Watch callback and must not call ListAndWatch or Watch.
func (n *Node) ListAndWatch(fn func(Change)) (lus []LU, cancel func(), err error) {
	err = n.readDB(func() error {
		lus, cancel, err = n.fsm.listAndWatch(fn)
		return err
	})
	return lus, cancel, err
}

// Barrier waits until every entry committed before the call is applied on
// this node. Leader only (ErrNotLeader otherwise); after a new leader is
// elected it makes local reads reflect all earlier writes.
func (n *Node) Barrier(ctx context.Context) error {
	if n.isClosed() {
		return ErrClosed
	}
	timeout := n.opts.ApplyTimeout
	if d, ok := ctx.Deadline(); ok {
		timeout = time.Until(d)
	}
	if err := n.raft.Barrier(timeout).Error(); err != nil {
		if errors.Is(err, raft.ErrNotLeader) || errors.Is(err, raft.ErrLeadershipLost) {
			return fmt.Errorf("%w: barrier: %v", ErrNotLeader, err)
		}
		return fmt.Errorf("cluster: barrier: %w", err)
	}
	return nil
}

// Snapshot asks raft for a snapshot now (and so a log compaction). Tests
// and operators use it; raft also snapshots on its own schedule.
func (n *Node) Snapshot() error {
	if err := n.raft.Snapshot().Error(); err != nil {
		return fmt.Errorf("cluster: snapshot: %w", err)
	}
	return nil
}

// mkdirAllSynced creates dir and its parents and syncs every directory on
// the way up, so that after a crash the new directory entries exist (Pebble
// syncs what it creates inside dir, not dir's own entry in its parent).
func mkdirAllSynced(fs vfs.FS, dir string) error {
	if err := fs.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("cluster: create %s: %w", dir, err)
	}
	for d := filepath.Clean(dir); ; d = filepath.Dir(d) {
		f, err := fs.OpenDir(d)
		if err != nil {
			return fmt.Errorf("cluster: open directory %s: %w", d, err)
		}
		err = f.Sync()
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("cluster: sync directory %s: %w", d, err)
		}
		if parent := filepath.Dir(d); parent == d {
			return nil
		}
	}
}

// pebbleLogger sends Pebble's logs to slog (info lines at debug).
type pebbleLogger struct{ log *slog.Logger }

func (l pebbleLogger) Infof(format string, args ...any) {
	l.log.Debug(fmt.Sprintf(format, args...), "component", "pebble")
}
func (l pebbleLogger) Errorf(format string, args ...any) {
	l.log.Error(fmt.Sprintf(format, args...), "component", "pebble")
}
func (l pebbleLogger) Fatalf(format string, args ...any) {
	l.log.Error(fmt.Sprintf(format, args...), "component", "pebble")
	os.Exit(1)
}
