// Package replication turns the replicated LU table into servable devices
// on this node: it keeps the local volumes (package lu) in step with the
// metadata (package cluster) and hands each LU that has a copy here to the
// front end as a blockdev.Device.
//
// Today every LU has one copy, on its writer; the synchronous fan-out of
// writes to further copies, dirty-region tracking and resync grow here.
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
	"log/slog"
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/lu"
)

// ErrClosed is returned by Sync and Reconcile after Close.
var ErrClosed = errors.New("replication: manager closed")

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
}

// Manager keeps local volumes in step with the LU table.
type Manager struct {
	opts ManagerOptions

	mu struct {
		sync.Mutex
		cond      *sync.Cond
		queue     []work               // guarded by mu; pending work in order
		queued    uint64               // guarded by mu; work items ever queued
		done      uint64               // guarded by mu; work items ever finished
		closed    bool                 // guarded by mu
		volumes   map[string]lu.Volume // guarded by mu; LUs served from this node
		lastError error                // guarded by mu; the last failure, for status
	}
	stopped chan struct{}
	// changes counts metadata changes applied to local volumes by kind
	// (created, resized, deleted) since this process started; after a
	// restart it shows whether old log entries were applied again.
	changes *prometheus.CounterVec
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
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Export == nil {
		opts.Export = func(string, string, blockdev.Device) {}
	}
	if opts.Unexport == nil {
		opts.Unexport = func(string) {}
	}
	m := &Manager{opts: opts, stopped: make(chan struct{})}
	m.changes = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "lupool_lu_changes_applied_total",
		Help: "LU metadata changes applied to this node's volumes since the process started.",
	}, []string{"change"})
	m.mu.cond = sync.NewCond(&m.mu.Mutex)
	m.mu.volumes = map[string]lu.Volume{}
	go m.loop()
	return m, nil
}

// Enqueue queues a metadata change; it never blocks on volume work, so it
// is safe to call from the cluster's apply goroutine (Node.Watch).
func (m *Manager) Enqueue(ch cluster.Change) {
	m.push(work{change: &ch})
}

// Reconcile queues a full pass over lus (the whole table) and waits for it.
// With cluster.Node.ListAndWatch the table and the changes that follow it
// line up exactly; a plain Watch registered before ListLUs also converges.
func (m *Manager) Reconcile(ctx context.Context, lus []cluster.LU) error {
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
	default:
		err = fmt.Errorf("unknown change kind %v", ch.Kind)
	}
	m.record(ch.LU.Name, err)
}

func (m *Manager) record(name string, err error) {
	if err == nil {
		return
	}
	m.opts.Logger.Error("local volume out of step with metadata", "lu", name, "err", err)
	m.mu.Lock()
	m.mu.lastError = fmt.Errorf("LU %s: %w", name, err)
	m.mu.Unlock()
}

// holdsCopy reports whether rec has a copy on this node.
func (m *Manager) holdsCopy(rec cluster.LU) bool {
	for _, r := range rec.Replicas {
		if r.NodeID == m.opts.NodeID {
			return true
		}
	}
	return false
}

// ensure makes the local volume match rec: created (or reopened) and
// exported, at the recorded size. reconciling marks a start-up pass, where a
// missing file volume means its data is gone (or it was never created
// because the node stopped right after the metadata change): it is created
// empty, and said loudly.
func (m *Manager) ensure(rec cluster.LU, reconciling bool) error {
	if !m.holdsCopy(rec) {
		return nil
	}
	m.mu.Lock()
	vol, ok := m.mu.volumes[rec.Name]
	m.mu.Unlock()
	if !ok {
		var err error
		if vol, ok = m.opts.Pool.Get(rec.Name); !ok {
			if reconciling && lu.Kind(rec.Kind) == lu.KindFile {
				m.opts.Logger.Error("volume file of LU missing at start; creating it empty", "lu", rec.Name)
			}
			vol, err = m.opts.Pool.Create(rec.Name, rec.SizeBytes, lu.Kind(rec.Kind))
			if err != nil {
				return fmt.Errorf("create volume: %w", err)
			}
		} else if vol.Kind() != lu.Kind(rec.Kind) {
			return fmt.Errorf("volume kind %s does not match metadata kind %s", vol.Kind(), rec.Kind)
		}
		m.mu.Lock()
		m.mu.volumes[rec.Name] = vol
		m.mu.Unlock()
		defer m.opts.Export(rec.Name, rec.Description, vol)
	}
	if vol.Size() != rec.SizeBytes {
		if err := m.opts.Pool.Resize(rec.Name, rec.SizeBytes); err != nil {
			return fmt.Errorf("resize volume to %d bytes: %w", rec.SizeBytes, err)
		}
	}
	return nil
}

// remove unexports and deletes the local volume of name, if any.
func (m *Manager) remove(name string) error {
	m.mu.Lock()
	_, ok := m.mu.volumes[name]
	delete(m.mu.volumes, name)
	m.mu.Unlock()
	if ok {
		m.opts.Unexport(name)
	}
	if _, exists := m.opts.Pool.Get(name); !exists {
		return nil
	}
	if err := m.opts.Pool.Delete(name); err != nil {
		return fmt.Errorf("delete volume: %w", err)
	}
	return nil
}

// follow makes this node hold rec's volume if rec places a copy here, and
// not hold it otherwise.
func (m *Manager) follow(rec cluster.LU) error {
	if !m.holdsCopy(rec) {
		return m.remove(rec.Name)
	}
	return m.ensure(rec, false)
}

// reconcile brings every local volume in line with the whole table. Volumes
// that the table does not know are left alone and reported: deleting data
// because metadata is missing is never done silently.
func (m *Manager) reconcile(lus []cluster.LU) {
	known := map[string]bool{}
	for _, rec := range lus {
		known[rec.Name] = true
		if !m.holdsCopy(rec) {
			if err := m.remove(rec.Name); err != nil {
				m.record(rec.Name, err)
			}
			continue
		}
		m.record(rec.Name, m.ensure(rec, true))
	}
	for _, name := range m.opts.Pool.Names() {
		if !known[name] {
			m.opts.Logger.Warn("volume in the pool has no LU in the metadata; left in place", "volume", name)
		}
	}
}

// Collectors returns the manager's metrics, unregistered.
func (m *Manager) Collectors() []prometheus.Collector {
	return []prometheus.Collector{m.changes}
}

// Volume returns the local volume of an LU served from this node.
func (m *Manager) Volume(name string) (lu.Volume, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	v, ok := m.mu.volumes[name]
	return v, ok
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

// Close stops the manager's goroutine; queued work is dropped (the next
// start reconciles from the metadata). Volumes stay open: the pool owns them.
func (m *Manager) Close() error {
	m.mu.Lock()
	m.mu.closed = true
	m.mu.queue = nil
	m.mu.cond.Broadcast()
	m.mu.Unlock()
	<-m.stopped
	return nil
}
