// Package replication turns the replicated LU table into servable devices
// on this node: it keeps the local volumes (package lu) in step with the
// metadata (package cluster) and hands each LU that has a copy here to the
// front end as a blockdev.Device.
//
// Every node exports every LU. The LU's writer serves it through a
// [Mirror] (local volume plus synchronous copies on other nodes, none for a
// one-copy LU, so copies can be added online); every other node serves it
// through a [Forwarder], which reads its own copy while that copy is in
// sync and sends everything else to the writer. Copies talk over
// replication streams (package replproto) that ride on each node's API
// address (StreamPath, an HTTP upgrade).
//
// # Copy states
//
//	                 add-copy / lost at start
//	                          │
//	                          ▼
//	   ┌─────────────────── new ──(writer records every allocated extent dirty)──┐
//	   │                                                                        ▼
//	in-sync ──(a write, flush or ping fails; epoch+1; before the ack)──▶ out-of-sync
//	   ▲                                                                        │
//	   │                                                    (stream reopens)    │
//	   └──(no dirty block left; flushed; epoch+1)── resyncing ◀─────────────────┘
//	                                                    │ fails: back to out-of-sync
//
// Only the writer moves a copy between states (and the copy itself, to new,
// when it finds its data gone at start; and the primary, which replaces a
// copy that stays out-of-sync or new for --replace-after). Every change goes
// through the metadata log, conditional on the epoch it was decided from.
//
// # Read leases
//
// Invariant: no node serves a read that misses an acknowledged write.
//
// The rules are pure functions in package copyset, whose interaction
// tests drive a whole copy set through lost messages, partitions, freezes
// and crashes and check this invariant after every read.
//
// A copy serves reads from its own volume only while its record says in
// sync and it holds a lease: ReadLease from one of its own ping-answer
// times that the writer echoed back in a later ping (copyLease; the writer
// pings every copy in sync about every ReadLease/4, and twice when a
// stream opens), or, while the writer is silent, the metadata leader
// confirmed that its copy is in sync at the current epoch
// (ManagerOptions.ConfirmLease; lease.go), ReadLease from when it asked.
// Frames do not renew the lease on arrival: one that waited in a buffer
// while the copy was frozen would stretch it past what the writer waits.
// With ManagerOptions.PairLeases, one heartbeat per node pair does what
// the per-LU pings do for every LU the two nodes share (pairlease.go has
// the rules, pairlink.go the driver): the writer enrolls each copy in
// sync there, and drops it before it computes the wait after losing it.
// A writer that loses a copy records it out of sync and then acknowledges
// nothing, neither the operation the copy missed nor any later one, until
// ReadLease has passed since the copy last answered, and since the record
// (the copy may hold a metadata lease confirmed just before it): a copy
// cut off from the writer, or one whose metadata lags, stops reading
// locally before it could return stale data.
//
// The writer reads its own volume only while every other copy in sync
// answered a frame it sent within ReadLease (Mirror.readable), or the
// metadata confirms it still is the writer. A copy promoted to writer (a
// failover: the primary promotes only ReadLease after it last confirmed
// the old writer a lease) waits ReadLease after the last frame it answered
// the old writer before it acknowledges anything, so an old writer that
// is frozen or cut off stops reading before the new one acknowledges a
// write it lacks; the old writer cannot acknowledge either, since its
// copies refuse the old epoch and the metadata its changes. This assumes
// the nodes' clocks advance at the same rate.
//
// # Roles and failover
//
// The front end serves each LU through one roleDevice for the LU's life on
// this node; a role change (this node becomes the writer, or stops being
// it) swaps the device underneath and runs requests in flight on the old
// one again on the new one. A Forwarder whose writer does not answer
// retries until the metadata names a new writer (FailoverWait). A promoted
// writer knows nothing of what its copies lack (it keeps no dirty records
// for an LU it did not write: DirtyStore's writer key), so it compares
// every other copy by region hashes, and records the other in-sync copies
// out of sync first (the old writer's last writes may have reached one
// copy and not another).
//
// A planned move (move.go) is the exception: the old writer quiesced and
// drained before the switch, so the record marks the handover clean
// (cluster.LU.HandoverEpoch) and the new writer trusts the in-sync copies,
// the old writer's among them, without a lease wait or a compare. Each
// node's MoveMonitor runs its side of a move and records its steps.
//
// # Durability
//
// A write acknowledged by a Mirror is in the writer's volume and in every
// copy recorded in sync: for file LUs in each node's page cache, for memory
// LUs in each node's memory. FUA and Flush reach every in-sync copy: for
// file LUs the data is then on disk on every one of them. A copy that fails
// is recorded out of sync through the metadata log before the operation
// that it missed is acknowledged, and the missed range is recorded (synced)
// in the writer's dirty-region store.
//
// # Ordering
//
// Metadata changes arrive from the cluster's apply goroutine through
// Node.Watch. The Manager queues them and applies them on its own goroutine,
// in order, so a slow volume operation never stalls the metadata log and no
// lock is held across the two packages. Every operation is idempotent
// (create if missing, resize to the recorded size, delete if present), so a
// start-up reconcile that overlaps queued changes converges to the latest
// state. Sync waits until everything queued before it was applied: the API
// calls it so that an LU is attachable as soon as its create returns.
package replication

import (
	"context"
	"errors"
	"fmt"
	"github.com/lupool/lupool/internal/bufpool"
	"github.com/lupool/lupool/internal/rules"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/internal/copyset"
	"github.com/lupool/lupool/lu"
	"github.com/lupool/lupool/replication/replproto"
)

// ErrClosed is returned by Sync and Reconcile after Close.
var ErrClosed = errors.New("replication: manager closed")

// ErrNoCopy is returned by RegionHashes when this node holds no copy of the
// LU.
var ErrNoCopy = errors.New("replication: no copy of the LU on this node")

// ManagerOptions configure a Manager.
type ManagerOptions struct {
	NodeID string   // required: this node's id
	Pool   *lu.Pool // required: this node's storage
	Logger *slog.Logger
	// Export is called when an LU with a copy here becomes servable.
	Export func(name, description string, dev blockdev.Device)
	// Unexport is called before an LU's local volume is closed; it must
	// end the front end's use of the device (forcibly: the LU is going).
	Unexport func(name string)
	// Deleted is called once a deleted LU is unexported and its local
	// volume gone, for the front end to forget it (its metric series).
	Deleted func(name string)
	// ResyncDone, when set, is called after a copy of an LU this node
	// writes was caught up and recorded in sync, with the bytes the resync
	// sent and how long it took (the daemon reports a ResyncBytes event).
	// It must not block.
	ResyncDone func(name, copyNode string, sentBytes int64, took time.Duration)

	// UpdateLU records a change of an LU's epoch and copy states through
	// the metadata leader, applied only if the recorded epoch is still
	// expectedEpoch (else an error matching cluster.ErrEpochChanged).
	// Required for LUs with more than one copy.
	UpdateLU func(ctx context.Context, rec cluster.LU, expectedEpoch uint64) error
	// NodeAPI returns the address where a node serves replication
	// streams (in the daemon: its peer address, mutual TLS). Required for
	// LUs with more than one copy.
	NodeAPI func(nodeID string) (string, bool)
	// Dial opens a connection to node nodeID at addr (from NodeAPI) that
	// carries HTTP: in the daemon a mutual-TLS connection whose server
	// certificate names nodeID. Nil means plain TCP (tests).
	Dial func(ctx context.Context, nodeID, addr string) (net.Conn, error)
	// IsMember reports whether a node id belongs to the cluster; a stream
	// whose authenticated peer is not a member is refused. Nil means every
	// peer is a member (tests).
	IsMember func(nodeID string) bool
	// PeerHashes returns the hex SHA-256 of count consecutive regions of
	// regionBytes from offsetBytes of node's copy of LU lu (the
	// region-hash resync compares them with the local copy). Nil means
	// unavailable.
	PeerHashes func(ctx context.Context, node, lu string, offsetBytes, regionBytes int64, count int) ([]string, error)
	// Dirty persists dirty regions of file LUs; nil keeps them in memory
	// only (a writer restart then forgets which regions a copy lacks).
	Dirty *DirtyStore
	// RegionBytes is the dirty-region size (default 1 MiB); inside a region
	// the writer tracks 4 KiB blocks in memory.
	RegionBytes int64
	// ActivityLogRegions is how many regions an LU's activity log keeps
	// (actlog.go; default rules.ActivityLogRegionsDefault).
	ActivityLogRegions int
	// AckTimeout bounds the wait for a copy's answer (default 5 s); a copy
	// that does not answer in time is recorded out of sync.
	AckTimeout time.Duration
	// MetadataTimeout bounds recording a copy state change (default 10 s).
	MetadataTimeout time.Duration
	// RetryInterval is how often a writer tries to reach copies it has no
	// stream to (default 500 ms).
	RetryInterval time.Duration
	// ResyncBytesPerSecond throttles resync; 0 means unthrottled.
	ResyncBytesPerSecond int64
	// ReadLease is how long a copy may serve reads from its own volume
	// after it last heard from the writer (default 1 s). A writer that
	// loses a copy waits this long after its last exchange with it before
	// it acknowledges a write the copy missed, so no node reads stale data
	// from a copy that has not yet learnt it is out of sync.
	ReadLease time.Duration
	// ConfirmLease asks the metadata leader to confirm that this node's
	// copy of LU lu is in sync at epoch (cluster.Node.ConfirmCopy): a read
	// lease valid ReadLease from when it was asked. A copy uses it to go
	// on reading locally while the writer is unreachable, the writer while
	// its copies do not answer. Nil: no metadata leases.
	ConfirmLease func(ctx context.Context, lu string, epoch uint64) error
	// FailoverWait bounds how long a forwarded request keeps retrying
	// while the writer is unreachable or the LU moves to a new writer
	// (default 15 s, well above the primary's --failover-after); after
	// that the client gets EIO.
	FailoverWait time.Duration
	// PairLeases renews the read leases of every LU this node writes with
	// copies on another node by one heartbeat per node pair (pairlease.go)
	// instead of one ping loop per LU. Off by default while it is new;
	// every node serves the heartbeat either way.
	PairLeases bool
}

// EnsureDefaults fills unset fields.
func (o *ManagerOptions) EnsureDefaults() {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Export == nil {
		o.Export = func(string, string, blockdev.Device) {}
	}
	if o.Unexport == nil {
		o.Unexport = func(string) {}
	}
	if o.Deleted == nil {
		o.Deleted = func(string) {}
	}
	if o.UpdateLU == nil {
		o.UpdateLU = func(context.Context, cluster.LU, uint64) error {
			return errors.New("replication: no metadata writer configured")
		}
	}
	if o.NodeAPI == nil {
		o.NodeAPI = func(string) (string, bool) { return "", false }
	}
	if o.Dial == nil {
		o.Dial = func(ctx context.Context, _, addr string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "tcp", addr)
		}
	}
	if o.IsMember == nil {
		o.IsMember = func(string) bool { return true }
	}
	if o.RegionBytes == 0 {
		o.RegionBytes = defaultRegionLen
	}
	if o.ActivityLogRegions == 0 {
		o.ActivityLogRegions = rules.ActivityLogRegionsDefault
	}
	if o.AckTimeout == 0 {
		// A killed copy resets its connections at once; the timeout only
		// matters for a copy that hangs. Long enough for a GC pause or a
		// busy disk, short enough that a client's I/O does not time out.
		o.AckTimeout = 5 * time.Second
	}
	if o.MetadataTimeout == 0 {
		o.MetadataTimeout = 10 * time.Second
	}
	if o.RetryInterval == 0 {
		o.RetryInterval = 500 * time.Millisecond
	}
	if o.ReadLease == 0 {
		o.ReadLease = time.Second
	}
	if o.FailoverWait == 0 {
		o.FailoverWait = 15 * time.Second
	}
}

// Manager keeps local volumes in step with the LU table.
type Manager struct {
	opts ManagerOptions

	mu struct {
		sync.Mutex
		cond    *sync.Cond
		queue   []work               // guarded by mu; pending work in order
		queued  uint64               // guarded by mu; work items ever queued
		done    uint64               // guarded by mu; work items ever finished
		closed  bool                 // guarded by mu
		volumes map[string]lu.Volume // guarded by mu; local copies
		devices map[string]device    // guarded by mu; the device of this node's role for each LU
		// exported holds what the front end serves for each LU: a
		// roleDevice over devices[name], kept across role changes.
		exported map[string]*roleDevice // guarded by mu
		// lost names LUs whose copy here lost its data at start and waits
		// to be recorded new (then rebuilt); it refuses the writer's stream.
		lost map[string]bool // guarded by mu
		// retired is the writer's device this node had for an LU until
		// another node became its writer: a copy answers the new
		// writer's Log request once its writes in flight have ended.
		retired map[string]*Mirror // guarded by mu
		// leftover names the LUs whose activity log this node keeps
		// from a time as their writer (actlog.go), until its copy is
		// recorded in sync again. Guarded by mu.
		leftover  map[string]bool
		lastError error // guarded by mu; the last failure, for status
	}
	// recs is the latest record of every LU, updated from the metadata's
	// apply goroutine (Enqueue) so that streams check epochs against the
	// newest applied state.
	recs struct {
		sync.Mutex
		m map[string]cluster.LU // guarded by recs
	}
	// leases maps an LU name to this node's copy lease from the writer
	// (*copyLease).
	leases sync.Map
	// metaLeases maps an LU name to its metadata read lease (*metaLease).
	metaLeases sync.Map
	// pairs are this node's heartbeats to copy nodes (PairLeases).
	pairs struct {
		sync.Mutex
		m map[string]*pairLink // guarded by pairs
	}
	// clock is the base of monotonic times kept as integers.
	clock       time.Time
	bufs        bufpool.Pool
	asyncWrites sync.Pool // of *asyncWrite
	reruns      sync.Pool // of *rerunCompletion
	metrics     *metrics
	stopped     chan struct{}
	// quit is closed by Close; bg counts the manager's background
	// goroutines (recording a lost copy, renewing a metadata lease), which
	// Close waits for.
	quit chan struct{}
	bg   sync.WaitGroup
	// changes counts metadata changes applied to local volumes by kind
	// (created, resized, deleted) since this process started; after a
	// restart it shows whether old log entries were applied again.
	changes *prometheus.CounterVec
	// background is the node's budget of background work (budget.go);
	// nil: none.
	background atomic.Pointer[Budget]
}

// work is one queued item: a metadata change, or a full reconcile.
type work struct {
	change    *cluster.Change
	reconcile []cluster.LU
}

// NewManager starts a manager. Call Close to stop it.
func NewManager(opts ManagerOptions) (*Manager, error) {
	if opts.NodeID == "" || opts.Pool == nil {
		return nil, errors.New("replication: ManagerOptions needs NodeID and Pool")
	}
	opts.EnsureDefaults()
	if err := rules.DirtyRegion(opts.RegionBytes); err != nil {
		return nil, fmt.Errorf("replication: dirty region size %d: %w", opts.RegionBytes, err)
	}
	m := &Manager{opts: opts, stopped: make(chan struct{}), quit: make(chan struct{}), metrics: newMetrics(), clock: time.Now()}
	m.recs.m = map[string]cluster.LU{}
	m.pairs.m = map[string]*pairLink{}
	m.changes = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "lupool_lu_changes_applied_total",
		Help: "LU metadata changes applied to this node's volumes since the process started.",
	}, []string{"change"})
	m.mu.cond = sync.NewCond(&m.mu.Mutex)
	m.mu.volumes = map[string]lu.Volume{}
	m.mu.devices = map[string]device{}
	m.mu.exported = map[string]*roleDevice{}
	m.mu.lost = map[string]bool{}
	m.mu.retired = map[string]*Mirror{}
	m.mu.leftover = map[string]bool{}
	if opts.Dirty != nil {
		names, err := opts.Dirty.activeLUs()
		if err != nil {
			return nil, fmt.Errorf("replication: read the activity logs: %w", err)
		}
		for _, name := range names {
			m.mu.leftover[name] = true
		}
	}
	go m.loop()
	return m, nil
}

// goBackground runs fn on a goroutine that Close waits for; after Close it
// runs nothing and returns false.
func (m *Manager) goBackground(fn func()) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.mu.closed {
		return false
	}
	m.bg.Go(fn)
	return true
}

// Enqueue queues a metadata change; it never blocks on volume work, so it
// is safe to call from the cluster's apply goroutine (Node.Watch).
func (m *Manager) Enqueue(ch cluster.Change) {
	m.noteRecord(ch)
	m.push(work{change: &ch})
}

func (m *Manager) noteRecord(ch cluster.Change) {
	m.recs.Lock()
	if ch.Kind == cluster.Deleted {
		delete(m.recs.m, ch.LU.Name)
		m.metrics.forgetLU(ch.LU.Name)
	} else {
		m.setRecordLocked(ch.LU)
	}
	m.recs.Unlock()
	// After the record: a heartbeat that checks it from now on sees it.
	m.pairRecordChanged(ch.LU.Name, writerOf(ch.LU), ch.Kind == cluster.Deleted || !holdsCopy(ch.LU, m.opts.NodeID))
}

// now is the monotonic time since the manager started.
func (m *Manager) now() int64 { return int64(time.Since(m.clock)) }

// copyLease is what a copy knows of its read lease from the writer. Both
// fields are Manager.now times.
//
// from is the latest of this node's own ping-answer times that the writer
// echoed back in a later ping (TypePing's offset): the writer received
// that answer, so it will not acknowledge anything this copy misses until
// ReadLease after it (copyset.AckAfterCopyLoss), and the copy reads
// locally until from + ReadLease (copyset.CopyMayRead). A frame that
// waited in a socket buffer (this node was frozen, the network held it)
// echoes an old time and cannot stretch the lease past what the writer
// promised, which a lease counted from the frame's arrival would.
//
// answered is when this copy last answered any frame of the writer: the
// writer's own read lease may run until ReadLease after it, which a copy
// promoted to writer waits out (waitOutWriterLease, copyset.TakeOverAt).
//
// pair is the LU's place in a heartbeat session of its writer's node
// (pairlease.go), which renews the lease of every LU it holds at once.
type copyLease struct {
	from, answered atomic.Int64
	pair           pairCopyLease
}

func (m *Manager) copyLeaseOf(name string) *copyLease {
	v, ok := m.leases.Load(name)
	if !ok {
		l := &copyLease{}
		l.from.Store(copyset.Never)
		l.answered.Store(copyset.Never)
		l.pair.answered.Store(copyset.Never)
		v, _ = m.leases.LoadOrStore(name, l)
	}
	return v.(*copyLease)
}

// answeredWriter notes that this node's copy of name just answered a frame
// of the writer.
func (m *Manager) answeredWriter(name string) {
	m.copyLeaseOf(name).answered.Store(m.now())
}

// renewLeaseFrom moves the copy lease of name to echo, one of this node's
// ping-answer times that the writer echoed; an echo from the future (a
// writer echoing a time of this node's previous run) is ignored.
func (m *Manager) renewLeaseFrom(name string, echo int64) {
	if echo <= 0 || echo > m.now() {
		return
	}
	l := m.copyLeaseOf(name)
	for {
		cur := l.from.Load()
		if echo <= cur || l.from.CompareAndSwap(cur, echo) {
			return
		}
	}
}

// leaseValid reports whether this node's copy of name holds a read lease
// from the writer (the metadata must also say it is in sync).
func (m *Manager) leaseValid(name string) bool {
	v, ok := m.leases.Load(name)
	if !ok {
		return false
	}
	l := v.(*copyLease)
	return copyset.LeaseHolds(copyset.Params{ReadLease: m.opts.ReadLease}, m.now(), max(l.from.Load(), l.pair.leaseFrom()))
}

// record returns the latest applied record of an LU.
func (m *Manager) record(name string) (cluster.LU, bool) {
	m.recs.Lock()
	defer m.recs.Unlock()
	rec, ok := m.recs.m[name]
	return rec, ok
}

// Reconcile queues a full pass over lus (the whole table) and waits for it.
// With cluster.Node.ListAndWatch the table and the changes that follow it
// line up exactly; a plain Watch registered before ListLUs also converges.
func (m *Manager) Reconcile(ctx context.Context, lus []cluster.LU) error {
	m.recs.Lock()
	for _, rec := range lus {
		if old, ok := m.recs.m[rec.Name]; !ok || old.Epoch <= rec.Epoch {
			m.setRecordLocked(rec)
		}
	}
	m.recs.Unlock()
	for _, rec := range lus {
		m.pairRecordChanged(rec.Name, writerOf(rec), !holdsCopy(rec, m.opts.NodeID))
	}
	m.push(work{reconcile: lus})
	return m.Sync(ctx)
}

func (m *Manager) push(w work) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.mu.closed {
		return
	}
	m.mu.queue = append(m.mu.queue, w)
	m.mu.queued++
	m.mu.cond.Broadcast()
}

// Sync waits until every item queued before the call has been applied.
func (m *Manager) Sync(ctx context.Context) error {
	m.mu.Lock()
	target, closed := m.mu.queued, m.mu.closed
	m.mu.Unlock()
	if closed {
		return ErrClosed
	}
	stop := context.AfterFunc(ctx, func() {
		m.mu.Lock()
		m.mu.cond.Broadcast()
		m.mu.Unlock()
	})
	defer stop()
	m.mu.Lock()
	defer m.mu.Unlock()
	for m.mu.done < target {
		if m.mu.closed {
			return ErrClosed
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		m.mu.cond.Wait()
	}
	return nil
}

func (m *Manager) loop() {
	defer close(m.stopped)
	for {
		m.mu.Lock()
		for len(m.mu.queue) == 0 && !m.mu.closed {
			m.mu.cond.Wait()
		}
		if m.mu.closed {
			m.mu.Unlock()
			return
		}
		w := m.mu.queue[0]
		m.mu.queue[0] = work{}
		m.mu.queue = m.mu.queue[1:]
		m.mu.Unlock()

		m.do(w)

		m.mu.Lock()
		m.mu.done++
		m.mu.cond.Broadcast()
		m.mu.Unlock()
	}
}

func (m *Manager) do(w work) {
	if w.change == nil {
		m.reconcile(w.reconcile)
		return
	}
	ch := w.change
	var err error
	switch ch.Kind {
	case cluster.Created:
		m.changes.WithLabelValues("created").Inc()
		err = m.follow(ch.LU)
	case cluster.Resized, cluster.Updated:
		m.changes.WithLabelValues(ch.Kind.String()).Inc()
		err = m.follow(ch.LU)
	case cluster.Deleted:
		m.changes.WithLabelValues("deleted").Inc()
		err = m.remove(ch.LU.Name)
		m.opts.Deleted(ch.LU.Name)
	default:
		err = fmt.Errorf("unknown change kind %v", ch.Kind)
	}
	m.recordErr(ch.LU.Name, err)
}

func (m *Manager) recordErr(name string, err error) {
	if err == nil {
		return
	}
	m.opts.Logger.Error("local volume out of step with metadata", "lu", name, "err", err)
	m.mu.Lock()
	m.mu.lastError = fmt.Errorf("LU %s: %w", name, err)
	m.mu.Unlock()
}

// holdsCopy reports whether rec has a copy on node.
func holdsCopy(rec cluster.LU, node string) bool {
	for _, r := range rec.Replicas {
		if r.NodeID == node {
			return true
		}
	}
	return false
}

// holdsOwnCopy reports whether rec has a copy on this node.
func (m *Manager) holdsOwnCopy(rec cluster.LU) bool { return holdsCopy(rec, m.opts.NodeID) }

// writerOf returns the node that applies rec's writes.
func writerOf(rec cluster.LU) string {
	switch {
	case rec.Writer != "":
		return rec.Writer
	case rec.CreatedOn != "":
		return rec.CreatedOn
	case len(rec.Replicas) > 0:
		return rec.Replicas[0].NodeID
	}
	return ""
}

// device is what an LU is exported as on this node: the local volume
// (writer, one copy), a *Mirror (writer, more copies) or a *Forwarder.
type device interface {
	blockdev.Device
}

// ensureVolume makes the local volume match rec: created (or reopened) at
// the recorded size. reconciling marks a start-up pass, where a missing
// file volume means its data is gone (or it was never created because the
// node stopped right after the metadata change): it is created empty, and
// said loudly.
func (m *Manager) ensureVolume(rec cluster.LU, reconciling bool) (vol lu.Volume, lost bool, err error) {
	m.mu.Lock()
	vol, ok := m.mu.volumes[rec.Name]
	m.mu.Unlock()
	if !ok {
		if vol, ok = m.opts.Pool.Get(rec.Name); !ok {
			if reconciling && lu.Kind(rec.Kind) == lu.KindFile {
				m.opts.Logger.Error("volume file of LU missing at start; creating it empty", "lu", rec.Name)
			}
			// At start, a copy that the metadata says holds data but whose
			// volume is gone (a memory LU, or a lost file) is lost.
			lost = reconciling && len(rec.Replicas) > 1 && replicaState(rec, m.opts.NodeID) != cluster.ReplicaNew
			vol, err = m.createVolume(rec)
			if err != nil {
				return nil, false, fmt.Errorf("create volume: %w", err)
			}
		} else if vol.Kind() != lu.Kind(rec.Kind) {
			return nil, false, fmt.Errorf("volume kind %s does not match metadata kind %s", vol.Kind(), rec.Kind)
		}
		m.mu.Lock()
		m.mu.volumes[rec.Name] = vol
		m.mu.Unlock()
	}
	if o, ok := vol.(*lu.Overlay); ok && rec.Base == "" && isImageDisk(o.BaseName()) {
		m.flattenLater(rec.Name, o)
	}
	if vol.Size() != rec.SizeBytes {
		if err := m.opts.Pool.Resize(rec.Name, rec.SizeBytes); err != nil {
			return vol, lost, fmt.Errorf("resize volume to %d bytes: %w", rec.SizeBytes, err)
		}
	}
	return vol, lost, nil
}

// createVolume makes rec's local volume: a linked clone of the image disk
// rec.Base (which this node holds: a clone's copies are placed on nodes
// holding its base), or a new empty volume.
func (m *Manager) createVolume(rec cluster.LU) (lu.Volume, error) {
	if rec.Base != "" {
		return m.opts.Pool.CreateClone(rec.Name, rec.Base, rec.SizeBytes)
	}
	return m.opts.Pool.Create(rec.Name, rec.SizeBytes, lu.Kind(rec.Kind))
}

// untilQuit returns a context that ends when the manager closes (or on
// cancel), for background work that must stop with it.
func (m *Manager) untilQuit() (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		select {
		case <-m.quit:
			cancel()
		case <-ctx.Done():
		}
	}()
	return ctx, cancel
}

// flattenLater copies the base blocks of a clone whose record no longer
// names a base into its local volume, in the background (the node that
// recorded the flatten did its own copy first; this is every other copy).
func (m *Manager) flattenLater(name string, o *lu.Overlay) {
	m.goBackground(func() {
		ctx, cancel := m.untilQuit()
		defer cancel()
		// A second flatten of the same volume (a later change came while
		// the first ran) finds the link cut and fails harmlessly.
		if err := o.Flatten(ctx); err != nil && o.BaseName() != "" {
			m.recordErr(name, fmt.Errorf("flatten the local copy: %w", err))
		}
	})
}

// replicaState returns node's copy state in rec, or "".
func replicaState(rec cluster.LU, node string) string {
	for _, r := range rec.Replicas {
		if r.NodeID == node {
			return r.State
		}
	}
	return ""
}

// ensure makes this node hold rec's copy if rec places one here, and
// exports the LU as the device its role calls for.
func (m *Manager) ensure(rec cluster.LU, reconciling bool) error {
	var vol lu.Volume
	lost := false
	if holdsCopy(rec, m.opts.NodeID) {
		var err error
		if vol, lost, err = m.ensureVolume(rec, reconciling); err != nil {
			return err
		}
	} else if err := m.removeVolume(rec.Name); err != nil {
		return err
	}
	m.mu.Lock()
	old := m.mu.devices[rec.Name]
	if lost {
		m.mu.lost[rec.Name] = true
	} else if m.mu.lost[rec.Name] && replicaState(rec, m.opts.NodeID) == cluster.ReplicaNew {
		delete(m.mu.lost, rec.Name)
	}
	m.mu.Unlock()
	writer := writerOf(rec) == m.opts.NodeID && vol != nil
	switch d := old.(type) {
	case *Mirror:
		if writer && d.local == vol {
			d.observe(rec)
			return nil
		}
	case *Forwarder:
		if !writer && d.local == vol {
			d.observe(rec)
			return nil
		}
	}
	var next device
	switch {
	case writer:
		fw, wasCopy := old.(*Forwarder)
		former := ""
		if wasCopy {
			former = fw.writer()
		}
		mir, err := m.newMirror(rec, vol, lost, wasCopy && vol != nil, former)
		if err != nil {
			return err
		}
		next = mir
	default:
		if lost {
			m.opts.Logger.Warn("copy lost at start (its volume is gone); asking for a rebuild", "lu", rec.Name)
			m.goBackground(func() { m.recordLost(rec) })
		}
		next = m.newForwarder(rec, vol)
	}
	m.mu.Lock()
	rd, exported := m.mu.exported[rec.Name]
	m.mu.devices[rec.Name] = next
	if mir, ok := old.(*Mirror); ok && !writer {
		// Retired below: a new writer's Log question waits for it
		// (logReply), so these are set with the device, not after.
		m.mu.retired[rec.Name] = mir
		if mir.al != nil {
			m.mu.leftover[rec.Name] = true
		}
	}
	if !exported {
		rd = newRoleDevice(rec.Name, next, &m.reruns, &m.bufs)
		m.mu.exported[rec.Name] = rd
	}
	m.mu.Unlock()
	if exported {
		// A role change: clients stay connected; what they had in flight
		// on the old device runs again on the new one.
		retired := rd.swap(next)
		closeDevice(retired.dev)
		m.opts.Logger.Info("this node's role for the LU changed", "lu", rec.Name, "writer", writer, "epoch", rec.Epoch)
	}
	if _, wasWriter := old.(*Mirror); !writer && (wasWriter || reconciling) {
		// Not the writer (any more): its records of what the copies
		// lacked are stale; a later turn as writer starts from none.
		if err := m.dropWriterRecords(rec, !wasWriter); err != nil {
			return err
		}
	}
	if !writer && replicaState(rec, m.opts.NodeID) == cluster.ReplicaInSync {
		if err := m.dropLeftoverLog(rec.Name); err != nil {
			return err
		}
	}
	if !exported {
		m.opts.Export(rec.Name, rec.Description, rd)
	}
	return nil
}

// hasLeftoverLog reports whether this node keeps an activity log of LU
// name from an earlier run or an earlier turn as its writer.
func (m *Manager) hasLeftoverLog(name string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.mu.leftover[name]
}

// dropLeftoverLog forgets the activity log this node kept from a time as
// the LU's writer: its copy is in sync again, so the log names nothing it
// may differ in.
func (m *Manager) dropLeftoverLog(name string) error {
	m.mu.Lock()
	had := m.mu.leftover[name]
	delete(m.mu.leftover, name)
	m.mu.Unlock()
	if !had || m.opts.Dirty == nil {
		return nil
	}
	if err := m.opts.Dirty.clearActive(name); err != nil {
		return fmt.Errorf("drop the activity log of a former writer: %w", err)
	}
	return nil
}

// logReply answers a writer's Log request for LU name: the regions this
// copy may differ in from its time as the LU's writer, once what its
// retired writer's device had in flight has ended.
func (m *Manager) logReply(name string) ([]byte, error) {
	// The record names the asking node the writer (the stream was let
	// in), but this node may not have applied that role change yet: its
	// own writer device must be retired first, and its writes drained.
	for deadline := time.Now().Add(m.opts.AckTimeout); ; {
		m.mu.Lock()
		_, writing := m.mu.devices[name].(*Mirror)
		if rd := m.mu.exported[name]; rd != nil {
			// The front end's operations reach the new device only
			// from the swap on.
			_, serving := rd.cur.Load().dev.(*Mirror)
			writing = writing || serving
		}
		m.mu.Unlock()
		if !writing {
			break
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("%w: %s has not yet retired its writer device for %s", blockdev.ErrIO, m.opts.NodeID, name)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := m.drainRetired(name); err != nil {
		return nil, err
	}
	rec, _ := m.record(name)
	m.mu.Lock()
	had := m.mu.leftover[name]
	m.mu.Unlock()
	switch {
	case m.opts.Dirty == nil || lu.Kind(rec.Kind) != lu.KindFile:
		// No log is kept: the new writer treats a former writer of such
		// an LU as unknown itself (takeOver).
		return replproto.AppendLog(nil, true, nil), nil
	case m.opts.Dirty.Doubt() != nil:
		return replproto.AppendLog(nil, false, nil), nil
	case !had:
		return replproto.AppendLog(nil, true, nil), nil
	}
	ranges, err := m.opts.Dirty.loadActive(name)
	if errors.Is(err, ErrDirtyCorrupt) || len(ranges) > logReplyRangesMax {
		return replproto.AppendLog(nil, false, nil), nil
	}
	if err != nil {
		return nil, err
	}
	return replproto.AppendLog(nil, true, ranges), nil
}

// drainRetired waits (at most AckTimeout) until the writer's device this
// node retired for LU name has no operation in flight: a write it issued
// to the local volume before it learnt it was deposed must land before the
// new writer compares or resyncs anything here.
func (m *Manager) drainRetired(name string) error {
	m.mu.Lock()
	mi := m.mu.retired[name]
	m.mu.Unlock()
	if mi == nil {
		return nil
	}
	if !mi.drain(m.opts.AckTimeout) {
		return fmt.Errorf("%w: the former writer's device of %s on %s still has operations in flight", blockdev.ErrIO, name, m.opts.NodeID)
	}
	m.mu.Lock()
	if m.mu.retired[name] == mi {
		delete(m.mu.retired, name)
	}
	m.mu.Unlock()
	return nil
}

// closeDevice stops a role's device.
func closeDevice(dev device) {
	switch d := dev.(type) {
	case *Mirror:
		d.close()
	case *Forwarder:
		d.close()
	}
}

// dropWriterRecords forgets the dirty records this node kept as rec's
// writer.
// onlyIfWriter skips an LU without a writer key (at start, so that a
// start does not sync the store once per LU).
func (m *Manager) dropWriterRecords(rec cluster.LU, onlyIfWriter bool) error {
	if m.opts.Dirty == nil || lu.Kind(rec.Kind) != lu.KindFile {
		return nil
	}
	if onlyIfWriter {
		if isWriter, err := m.opts.Dirty.isWriter(rec.Name); err != nil || !isWriter {
			return err
		}
	}
	if err := m.opts.Dirty.dropLU(rec.Name); err != nil {
		return fmt.Errorf("drop the dirty records of a former writer: %w", err)
	}
	return nil
}

// unexport ends the front end's use of dev and stops it.
func (m *Manager) unexport(name string, dev device) {
	m.opts.Unexport(name)
	m.mu.Lock()
	if m.mu.devices[name] == dev {
		delete(m.mu.devices, name)
		if rd := m.mu.exported[name]; rd != nil {
			rd.retire()
			delete(m.mu.exported, name)
		}
	}
	m.mu.Unlock()
	closeDevice(dev)
}

// removeVolume deletes the local volume of name, if any.
func (m *Manager) removeVolume(name string) error {
	m.mu.Lock()
	vol, ok := m.mu.volumes[name]
	dev := m.mu.devices[name]
	m.mu.Unlock()
	if ok && dev != nil {
		// The exported device uses the volume: stop it first.
		if d, isFwd := dev.(*Forwarder); !isFwd || d.local == vol {
			m.unexport(name, dev)
		}
	}
	m.mu.Lock()
	delete(m.mu.volumes, name)
	m.mu.Unlock()
	if _, exists := m.opts.Pool.Get(name); !exists {
		return nil
	}
	if err := m.deleteVolume(name); err != nil {
		if errors.Is(err, lu.ErrHasClones) {
			// An image whose clones here still flatten (their records
			// no longer name it): it goes once they are done.
			m.deleteAfterClones(name)
			return nil
		}
		return fmt.Errorf("delete volume: %w", err)
	}
	return nil
}

// deleteAfterClones deletes the local volume name once no clone here reads
// it any more (their flattens finish in the background).
func (m *Manager) deleteAfterClones(name string) {
	m.opts.Logger.Info("volume still read by local clones that flatten; deleting it once they are done", "volume", name)
	m.goBackground(func() {
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-m.quit:
				return
			case <-tick.C:
			}
			if len(m.opts.Pool.Clones(name)) > 0 {
				continue
			}
			if err := m.opts.Pool.Delete(name); err != nil && !errors.Is(err, lu.ErrNotFound) {
				m.recordErr(name, fmt.Errorf("delete volume after its clones flattened: %w", err))
			}
			return
		}
	})
}

// remove unexports name and deletes its local volume and dirty records.
func (m *Manager) remove(name string) error {
	m.mu.Lock()
	dev := m.mu.devices[name]
	m.mu.Unlock()
	if dev != nil {
		m.unexport(name, dev)
	}
	if mir, ok := dev.(*Mirror); ok {
		for _, l := range mir.linkSet() {
			if err := l.dirty.reset(); err != nil {
				m.opts.Logger.Warn("cannot drop dirty regions of a deleted LU", "lu", name, "copy", l.node, "err", err)
			}
		}
	}
	return m.removeVolume(name)
}

// follow makes this node serve rec as its role calls for.
func (m *Manager) follow(rec cluster.LU) error {
	return m.ensure(rec, false)
}

// reconcile brings every local volume in line with the whole table. Volumes
// that the table does not know are left alone and reported: deleting data
// because metadata is missing is never done silently.
func (m *Manager) reconcile(lus []cluster.LU) {
	known := map[string]bool{}
	for _, rec := range lus {
		known[rec.Name] = true
		m.recordErr(rec.Name, m.ensure(rec, true))
	}
	for _, name := range m.opts.Pool.Names() {
		if !known[name] {
			m.opts.Logger.Warn("volume in the pool has no LU in the metadata; left in place", "volume", name)
		}
	}
}

// Collectors returns the manager's metrics, unregistered.
func (m *Manager) Collectors() []prometheus.Collector {
	cc := copyCollector{m: m, state: prometheus.NewDesc("lupool_replication_copy_state",
		"1 for the state each copy of an LU this node writes is in (in-sync, resyncing, out-of-sync), else 0.",
		[]string{"lu", "copy", "state"}, nil)}
	return append([]prometheus.Collector{m.changes, cc}, m.metrics.collectors()...)
}

// Volume returns the local volume (copy) of an LU on this node.
func (m *Manager) Volume(name string) (lu.Volume, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	v, ok := m.mu.volumes[name]
	return v, ok
}

// mirror returns the LU's device if this node is its writer.
func (m *Manager) mirror(name string) (blockdev.Device, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	d, ok := m.mu.devices[name].(*Mirror)
	return d, ok
}

// DirtyBytes returns, for an LU this node writes, the bytes each other
// copy lacks (what a resync still has to send); nil elsewhere.
func (m *Manager) DirtyBytes(name string) map[string]int64 {
	mir, ok := m.mirror(name)
	if !ok {
		return nil
	}
	out := map[string]int64{}
	for _, l := range mir.(*Mirror).linkSet() {
		out[l.node] = l.dirty.dirtyBytes()
	}
	return out
}

// isLost reports whether this node's copy of name lost its data at start
// and is not yet recorded new.
func (m *Manager) isLost(name string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.mu.lost[name]
}

// recordLost records this node's lost copy of rec as new (epoch + 1), so
// that the writer rebuilds it; it retries until the record says so, the
// LU is gone, or the manager closes.
func (m *Manager) recordLost(rec cluster.LU) {
	for attempt := 0; ; attempt++ {
		cur, ok := m.record(rec.Name)
		if !ok || !m.isLost(rec.Name) {
			return
		}
		if replicaState(cur, m.opts.NodeID) == cluster.ReplicaNew {
			return
		}
		next := cloneLU(cur)
		for i := range next.Replicas {
			if next.Replicas[i].NodeID == m.opts.NodeID {
				next.Replicas[i].State = cluster.ReplicaNew
			}
		}
		next.Epoch++
		ctx, cancel := context.WithTimeout(context.Background(), m.opts.MetadataTimeout)
		err := m.opts.UpdateLU(ctx, next, cur.Epoch)
		cancel()
		if err == nil {
			return
		}
		m.opts.Logger.Warn("cannot record lost copy as new; retrying", "lu", rec.Name, "err", err)
		select {
		case <-m.quit:
			return
		case <-time.After(min(time.Duration(attempt+1)*200*time.Millisecond, 5*time.Second)):
		}
	}
}

// LastError returns the most recent failure to follow the metadata, or nil.
func (m *Manager) LastError() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.mu.lastError
}

// Flush makes every local volume durable.
func (m *Manager) Flush(ctx context.Context) error {
	m.mu.Lock()
	vols := make([]lu.Volume, 0, len(m.mu.volumes))
	for _, v := range m.mu.volumes {
		vols = append(vols, v)
	}
	m.mu.Unlock()
	var errs []error
	for _, v := range vols {
		if err := v.Flush(ctx); err != nil && !errors.Is(err, blockdev.ErrShutdown) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Close stops the manager's goroutines and every writer's streams; queued
// work is dropped (the next start reconciles from the metadata). Volumes
// stay open: the pool owns them.
func (m *Manager) Close() error {
	m.mu.Lock()
	if !m.mu.closed {
		close(m.quit)
	}
	m.mu.closed = true
	m.mu.queue = nil
	m.mu.cond.Broadcast()
	devs := make([]device, 0, len(m.mu.devices))
	for _, d := range m.mu.devices {
		devs = append(devs, d)
	}
	for _, rd := range m.mu.exported {
		rd.retire()
	}
	m.mu.Unlock()
	<-m.stopped
	for _, d := range devs {
		closeDevice(d)
	}
	// The operations still in flight on a writer's device (their copies'
	// answers, the settling of a copy that failed) end before the stores
	// they record in close: the caller closes the dirty store next.
	for _, d := range devs {
		if mi, ok := d.(*Mirror); ok && !mi.drain(m.opts.MetadataTimeout+m.opts.AckTimeout) {
			m.opts.Logger.Warn("writer's device closed with operations still in flight", "lu", mi.name)
		}
	}
	m.bg.Wait()
	return nil
}
