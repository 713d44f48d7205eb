package replication

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/lu"
	"github.com/lupool/lupool/replication/replproto"
)

// Forwarder is the device of an LU on a node that is not its writer. Reads
// come from the local copy while this node's copy is in sync, else from the
// writer; writes, trims, zeroes and flushes always go to the writer, which
// applies them to every in-sync copy (this node's included) before it
// answers, so a read here after an acknowledged write sees it.
type Forwarder struct {
	name  string
	m     *Manager
	local lu.Volume // nil when this node holds no copy

	// localReads is true while this node's copy is in sync.
	localReads atomic.Bool
	// sizeBytes and writer follow the metadata; guarded by mu.
	mu struct {
		sync.Mutex
		sizeBytes int64
		writer    string
		epoch     uint64
		// changed is closed (and replaced) when a new record arrives, to
		// wake requests waiting out a failover.
		changed chan struct{}
	}
	connMu sync.Mutex // serializes dialing
	conn   atomic.Pointer[peerConn]
	// stop is closed when the forwarder is replaced (this node's role
	// changed): requests waiting out a failover end with errRetired.
	stop     chan struct{}
	stopOnce sync.Once

	// Children of the manager's counters, resolved once.
	readLocal, readWriter, writesForwarded prometheus.Counter
	// failoverRetries counts requests sent again while the writer was
	// unreachable or moving.
	failoverRetries prometheus.Counter
}

var (
	_ blockdev.Device   = (*Forwarder)(nil)
	_ blockdev.Trimmer  = (*Forwarder)(nil)
	_ blockdev.Zeroer   = (*Forwarder)(nil)
	_ blockdev.Extenter = (*Forwarder)(nil)
)

func (m *Manager) newForwarder(rec cluster.LU, local lu.Volume) *Forwarder {
	f := &Forwarder{name: rec.Name, m: m, local: local, stop: make(chan struct{}),
		readLocal:       m.luCounter(m.metrics.reads, nil, rec.Name, "local"),
		readWriter:      m.luCounter(m.metrics.reads, nil, rec.Name, "writer"),
		writesForwarded: m.luCounter(m.metrics.forwardedWrites, nil, rec.Name),
		failoverRetries: m.luCounter(m.metrics.failoverRetries, nil, rec.Name)}
	f.observe(rec)
	return f
}

// writer returns the LU's writer as this forwarder last saw it.
func (f *Forwarder) writer() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.mu.writer
}

// observe follows a new record of the LU.
func (f *Forwarder) observe(rec cluster.LU) {
	inSync := false
	for _, r := range rec.Replicas {
		if r.NodeID == f.m.opts.NodeID && r.State == cluster.ReplicaInSync {
			inSync = true
		}
	}
	f.localReads.Store(inSync && f.local != nil)
	f.mu.Lock()
	writerMoved := f.mu.writer != "" && f.mu.writer != writerOf(rec)
	f.mu.sizeBytes, f.mu.writer, f.mu.epoch = rec.SizeBytes, writerOf(rec), rec.Epoch
	if f.mu.changed != nil {
		close(f.mu.changed)
	}
	f.mu.changed = make(chan struct{})
	f.mu.Unlock()
	if writerMoved {
		f.dropConn()
	}
}

func (f *Forwarder) close() {
	f.stopOnce.Do(func() { close(f.stop) })
	f.dropConn()
}

func (f *Forwarder) dropConn() {
	if c := f.conn.Swap(nil); c != nil {
		c.Close()
	}
}

// client returns a stream to the LU's writer, dialing if needed.
func (f *Forwarder) client(ctx context.Context) (*peerConn, error) {
	if c := f.conn.Load(); c != nil && !c.broken() {
		return c, nil
	}
	f.connMu.Lock()
	defer f.connMu.Unlock()
	if c := f.conn.Load(); c != nil && !c.broken() {
		return c, nil
	}
	f.mu.Lock()
	writer, epoch, size := f.mu.writer, f.mu.epoch, f.mu.sizeBytes
	f.mu.Unlock()
	addr, ok := f.m.opts.NodeAPI(writer)
	if !ok {
		return nil, fmt.Errorf("%w: writer %s of %s has no known address", blockdev.ErrIO, writer, f.name)
	}
	hello := replproto.Hello{Role: replproto.RoleClient, LU: f.name, Node: f.m.opts.NodeID}
	c, _, err := f.m.dialStream(ctx, writer, addr, hello, epoch, size)
	if err != nil {
		return nil, fmt.Errorf("%w: reach writer %s of %s: %v", blockdev.ErrIO, writer, f.name, err)
	}
	f.conn.Store(c)
	return c, nil
}

// forward sends one request to the writer and waits for its answer.
// Every request is idempotent on a block device (a write that may have
// landed lands again with the same bytes, and concurrent unacknowledged
// writes have no order to keep), so a request is sent again, and never
// answered with an error, while the writer is unreachable or the LU moves
// to a new writer (a failover or a planned move): a stream that broke is
// dialed again, a writer that is gone is retried until the metadata names
// a new one, and an error from a writer that was fenced meanwhile (the
// epoch moved on) is retried on the new one. After FailoverWait without a
// writer the request fails with EIO.
func (f *Forwarder) forward(ctx context.Context, h replproto.Header, payload, dst []byte) error {
	var deadline time.Time // set at the first failure: no clock read on the common path
	var err error
	for attempt := 0; ; attempt++ {
		f.mu.Lock()
		epoch, changed := f.mu.epoch, f.mu.changed
		f.mu.Unlock()
		var c *peerConn
		if c, err = f.client(ctx); err == nil {
			h.Epoch = epoch
			if _, err = c.do(h, payload, dst); err == nil {
				return nil
			}
			retry := errors.Is(err, ErrPeerDown) || errors.Is(err, replproto.ErrNotWriter) ||
				errors.Is(err, replproto.ErrStaleEpoch) || errors.Is(err, blockdev.ErrShutdown)
			if retry {
				f.conn.CompareAndSwap(c, nil)
				c.Close()
			} else if !errors.Is(err, blockdev.ErrIO) || !f.fencedSince(changed) {
				return err // the writer's answer: out of range, no space, ...
			}
		}
		select {
		case <-f.stop:
			return errRetired
		default:
		}
		if deadline.IsZero() {
			deadline = time.Now().Add(f.m.opts.FailoverWait)
		}
		if ctx.Err() != nil || time.Now().After(deadline) {
			break
		}
		if attempt == 0 {
			continue // a broken stream: dial again at once
		}
		f.failoverRetries.Inc()
		// Wait for a new record (the writer moved) or a short while.
		select {
		case <-changed:
		case <-time.After(min(time.Duration(attempt)*5*time.Millisecond, 100*time.Millisecond)):
			// Soon at first: a planned move's new writer is ready within
			// milliseconds of the record that names it.
		case <-ctx.Done():
		case <-f.stop:
			return errRetired
		}
	}
	if errors.Is(err, blockdev.ErrIO) {
		return err
	}
	return fmt.Errorf("%w: %v", blockdev.ErrIO, err)
}

// fencedSince reports whether the LU's record changed since changed was
// current, waiting briefly for it: a writer that could not complete a
// request because it was replaced answers EIO, possibly before this node
// applied the record that replaced it.
func (f *Forwarder) fencedSince(changed chan struct{}) bool {
	select {
	case <-changed:
		return true
	case <-time.After(f.m.opts.ReadLease):
		return false
	case <-f.stop:
		return true // the role device runs it again on the new device
	}
}

// Size implements blockdev.Device.
func (f *Forwarder) Size() int64 {
	if f.local != nil {
		return f.local.Size()
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.mu.sizeBytes
}

// Caps implements blockdev.Device. A flush goes to the writer, which
// flushes every copy whoever wrote: multi-conn holds.
func (f *Forwarder) Caps() blockdev.Caps {
	c := blockdev.Caps{MultiConn: true, BlockSizeBytes: lu.BlockSizeBytes}
	if f.local != nil {
		c = f.local.Caps()
		c.MultiConn = true
	}
	return c
}

// readsLocally reports whether reads may come from the local copy: the
// metadata says it is in sync and the writer was heard within the lease
// (so the writer has not yet acknowledged a write this copy missed).
//
// While the writer is unreachable (its lease lapsed), a metadata read
// lease takes over: the metadata leader confirms the copy is still in sync
// at this epoch.
func (f *Forwarder) readsLocally() bool {
	if !f.localReads.Load() {
		return false
	}
	if f.m.leaseValid(f.name) {
		return true
	}
	f.mu.Lock()
	epoch := f.mu.epoch
	f.mu.Unlock()
	return f.m.metaLeaseValid(f.name, epoch)
}

// ReadAt implements blockdev.Device.
func (f *Forwarder) ReadAt(ctx context.Context, p []byte, off int64) error {
	if f.readsLocally() {
		f.readLocal.Add(float64(len(p)))
		return f.local.ReadAt(ctx, p, off)
	}
	for done := 0; done < len(p); {
		n := min(len(p)-done, replproto.LengthMax)
		h := replproto.Header{Type: replproto.TypeRead, Offset: uint64(off) + uint64(done), Length: uint32(n)}
		if err := f.forward(ctx, h, nil, p[done:done+n]); err != nil {
			return err
		}
		done += n
	}
	f.readWriter.Add(float64(len(p)))
	return nil
}

// WriteAt implements blockdev.Device.
func (f *Forwarder) WriteAt(ctx context.Context, p []byte, off int64, flags blockdev.Flags) error {
	h := replproto.Header{Type: replproto.TypeWrite, Flags: wireFlags(flags), Offset: uint64(off), Length: uint32(len(p))}
	if err := f.forward(ctx, h, p, nil); err != nil {
		return err
	}
	f.writesForwarded.Add(float64(len(p)))
	return nil
}

func (f *Forwarder) rangeOp(ctx context.Context, typ replproto.Type, off, length int64, flags blockdev.Flags) error {
	for done := int64(0); done < length || length == 0; {
		n := min(length-done, replproto.LengthMax)
		h := replproto.Header{Type: typ, Flags: wireFlags(flags), Offset: uint64(off + done), Length: uint32(n)}
		if err := f.forward(ctx, h, nil, nil); err != nil {
			return err
		}
		done += n
		if length == 0 {
			break
		}
	}
	return nil
}

// Trim implements blockdev.Trimmer.
func (f *Forwarder) Trim(ctx context.Context, off, length int64, flags blockdev.Flags) error {
	return f.rangeOp(ctx, replproto.TypeTrim, off, length, flags)
}

// WriteZeroes implements blockdev.Zeroer.
func (f *Forwarder) WriteZeroes(ctx context.Context, off, length int64, flags blockdev.Flags) error {
	return f.rangeOp(ctx, replproto.TypeZero, off, length, flags)
}

// Flush implements blockdev.Device.
func (f *Forwarder) Flush(ctx context.Context) error {
	return f.forward(ctx, replproto.Header{Type: replproto.TypeFlush}, nil, nil)
}

// Extents implements blockdev.Extenter: the local copy's allocation while
// it is in sync; otherwise the whole range is reported allocated (the
// stream carries no allocation queries).
func (f *Forwarder) Extents(ctx context.Context, off, length int64, dst []blockdev.Extent) ([]blockdev.Extent, error) {
	if f.readsLocally() {
		return f.local.Extents(ctx, off, length, dst)
	}
	return append(dst, blockdev.Extent{LengthBytes: length}), nil
}
