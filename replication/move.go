package replication

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/replication/replproto"
)

// Planned writer moves (cluster/move.go has the record and its rules).
//
// The handover, on the source (the writer):
//
//  1. it pings the target's copy (a target that does not answer now would
//     only be made the writer to fail over back);
//  2. it records the move syncing and quiesces its Mirror: it takes the
//     mirror's gate exclusively, so new writes, trims, zeroes and flushes
//     (from its own clients and forwarded ones alike) wait, and those in
//     flight drain. Copies are synchronous, so once drained every in-sync
//     copy, the target's included, holds every acknowledged write, and
//     none is in flight: that is the final sync. Reads go on;
//  3. it proposes the switch: one log entry makes the target the writer at
//     epoch+1, keeps its own copy in sync, and records the move switching;
//  4. applying that entry swaps its role device to a Forwarder and
//     retires the Mirror, whose held requests then run again on the new
//     role (forwarded to the target). The pause a client sees is from 2 to
//     here (lupool_move_pause_seconds).
//
// The target, applying the switch, becomes the writer without the
// failover's distrust (takeOverClean): the record says the handover was
// clean (LU.HandoverEpoch), so it waits for no old writer's lease (the old
// writer is an in-sync copy: a write the new writer acknowledges is in
// its volume first, or it was recorded out of sync and its leases waited
// out, as for any copy) and compares nothing. Reads go on being served
// locally on every in-sync copy throughout.
//
// If the switch is refused (the LU changed: a copy fell out of sync, a
// failover) or does not land within SwitchTimeout, the source resumes as
// the writer and the move is rolled back: held requests run on the same
// Mirror and no client sees an error. A switch whose outcome is unknown
// is safe too: the copies refuse the old epoch once it lands, and a
// refused request runs again on the new role.

// takeOverClean prepares a node that became the writer by a clean
// handover: the copies in sync stay in sync with nothing to resend; only
// the copies not in sync, whose missing regions the old writer knew and
// this node does not, are compared by region hashes.
func (mi *Mirror) takeOverClean(links []*copyLink) error {
	for _, l := range links {
		if st := copyState(l.state.Load()); st != stInSync && st != stNew {
			if err := l.dirty.setUnknown(); err != nil {
				return err
			}
		}
	}
	mi.m.opts.Logger.Info("this node is the LU's writer now, by a planned move; its in-sync copies are trusted",
		"lu", mi.name, "epoch", mi.epoch.Load())
	return nil
}

// resume ends a quiesce, once: handedOver says the move switched (what
// waited runs again on the new role) rather than rolled back.
func (mi *Mirror) resume(handedOver bool) {
	if !mi.quiesced.CompareAndSwap(true, false) {
		return
	}
	if handedOver {
		mi.handedOver.Store(true)
	}
	mi.gate.Unlock()
}

// rerunWrite runs a write that waited out a handover on the LU's current
// role device and completes it.
func (mi *Mirror) rerunWrite(ctx context.Context, p []byte, off int64, flags blockdev.Flags, done blockdev.Completion) {
	err := error(errRetired)
	if rd := mi.m.exportedDevice(mi.name); rd != nil && rd.cur.Load().dev != device(mi) {
		err = rd.WriteAt(ctx, p, off, flags)
	}
	if fl := done.Complete(err); fl != nil {
		fl.FlushReplies()
	}
}

// exportedDevice returns the role device the front end serves for name.
func (m *Manager) exportedDevice(name string) *roleDevice {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.mu.exported[name]
}

// writerMirror returns this node's Mirror of name, if it writes it.
func (m *Manager) writerMirror(name string) (*Mirror, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	mi, ok := m.mu.devices[name].(*Mirror)
	return mi, ok
}

// ErrNotWriter is returned by HandOver when this node does not write the LU.
var ErrNotWriter = errors.New("replication: this node is not the LU's writer")

// HandOver is the source's side of a planned move of LU name to node to
// (see above): it pings the target's copy (within pingTimeout), quiesces
// the LU's Mirror, calls doSwitch (which records the switch) and waits
// until this node applied it and retired the Mirror, at most
// switchTimeout. It returns the pause: how long writes were held. When
// doSwitch fails, or the switch is not applied here in time, the Mirror
// resumes (the caller rolls the move back, or lets the record decide).
func (m *Manager) HandOver(ctx context.Context, name, to string, pingTimeout, switchTimeout time.Duration,
	doSwitch func(context.Context) error) (time.Duration, error) {
	mi, ok := m.writerMirror(name)
	if !ok {
		return 0, fmt.Errorf("%w: %s", ErrNotWriter, name)
	}
	if err := mi.pingCopy(to, pingTimeout); err != nil {
		return 0, err
	}
	return mi.handOver(ctx, switchTimeout, doSwitch)
}

// handOver quiesces mi, records the switch and waits until mi is retired.
func (mi *Mirror) handOver(ctx context.Context, switchTimeout time.Duration, doSwitch func(context.Context) error) (time.Duration, error) {
	name := mi.name
	start := time.Now()
	mi.gate.Lock()
	mi.quiesced.Store(true)
	sctx, cancel := context.WithTimeout(ctx, switchTimeout)
	err := doSwitch(sctx)
	cancel()
	if err != nil {
		mi.resume(false)
		return time.Since(start), err
	}
	select {
	case <-mi.stop: // retired: close resumed it, handed over
	case <-time.After(switchTimeout):
		// Not applied here in time: run what waited on this mirror;
		// once the switch lands, the copies refuse it and it runs again.
		mi.resume(false)
		return time.Since(start), fmt.Errorf("replication: the switch of %s was recorded but not applied here within %v", name, switchTimeout)
	}
	return time.Since(start), nil
}

// pingCopy checks, within timeout, that the copy on node is in sync and
// answers.
func (mi *Mirror) pingCopy(node string, timeout time.Duration) error {
	for _, l := range mi.linkSet() {
		if l.node != node {
			continue
		}
		if st := copyState(l.state.Load()); st != stInSync {
			return fmt.Errorf("replication: the copy of %s on %s is %s", mi.name, node, st.replicaState())
		}
		c := l.conn.Load()
		if c == nil || c.broken() {
			return fmt.Errorf("replication: no stream to the copy of %s on %s", mi.name, node)
		}
		answer := make(chan error, 1)
		go func() {
			_, err := c.do(replproto.Header{Type: replproto.TypePing, Epoch: mi.epoch.Load()}, nil, nil)
			answer <- err
		}()
		select {
		case err := <-answer:
			if err != nil {
				return fmt.Errorf("replication: the copy of %s on %s does not answer: %w", mi.name, node, err)
			}
			return nil
		case <-time.After(timeout):
			return fmt.Errorf("replication: the copy of %s on %s did not answer within %v", mi.name, node, timeout)
		}
	}
	return fmt.Errorf("replication: %s has no copy on %s", mi.name, node)
}

// MoveMonitorOptions configure a node's move monitor.
type MoveMonitorOptions struct {
	NodeID  string   // required
	Manager *Manager // required
	// Moves returns the moves in progress from the local applied state
	// (cluster.Node.Moves). Required.
	Moves func() ([]cluster.Move, error)
	// Propose records a move operation as this node, through the
	// metadata leader. Required.
	Propose func(ctx context.Context, op cluster.MoveOp) error
	Logger  *slog.Logger
	// Interval is how often the monitor looks at the moves (default 50 ms).
	Interval time.Duration
	// PingTimeout bounds the source's check of the target (default 500 ms).
	PingTimeout time.Duration
	// SwitchTimeout bounds recording and applying the switch while
	// writes wait (default 2 s).
	SwitchTimeout time.Duration
}

// MoveMonitor is a node's monitor of the planned moves it is the source
// or the target of: it runs the source's handover, and records each
// monitor's steps; it completes a move that switched (target) and rolls
// back one that cannot switch (source or target). The primary's monitor
// is in package cluster.
type MoveMonitor struct {
	opts  MoveMonitorOptions
	pause prometheus.Histogram
	stop  chan struct{}
	wg    sync.WaitGroup

	mu struct {
		sync.Mutex
		// recorded holds the steps recorded per move (LU + start time):
		// each is recorded once.
		recorded map[string]bool // guarded by mu
		// handing names the LUs whose handover runs.
		handing map[string]bool // guarded by mu
	}
}

// StartMoveMonitor starts a node's move monitor; Close stops it.
func StartMoveMonitor(opts MoveMonitorOptions) (*MoveMonitor, error) {
	if opts.NodeID == "" || opts.Manager == nil || opts.Moves == nil || opts.Propose == nil {
		return nil, errors.New("replication: MoveMonitorOptions needs NodeID, Manager, Moves and Propose")
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Interval == 0 {
		opts.Interval = 50 * time.Millisecond
	}
	if opts.PingTimeout == 0 {
		opts.PingTimeout = 500 * time.Millisecond
	}
	if opts.SwitchTimeout == 0 {
		opts.SwitchTimeout = 2 * time.Second
	}
	mm := &MoveMonitor{opts: opts, stop: make(chan struct{}),
		pause: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "lupool_move_pause_seconds",
			Help:    "How long a planned writer move held an LU's writes on this node (its source): quiesce, drain, switch.",
			Buckets: []float64{.005, .01, .025, .05, .075, .1, .15, .25, .5, 1, 2.5},
		})}
	mm.mu.recorded = map[string]bool{}
	mm.mu.handing = map[string]bool{}
	mm.wg.Add(1)
	go mm.loop()
	return mm, nil
}

// Collectors returns the monitor's metrics, unregistered.
func (mm *MoveMonitor) Collectors() []prometheus.Collector { return []prometheus.Collector{mm.pause} }

// Close stops the monitor and waits for a handover in progress.
func (mm *MoveMonitor) Close() {
	select {
	case <-mm.stop:
	default:
		close(mm.stop)
	}
	mm.wg.Wait()
}

func (mm *MoveMonitor) loop() {
	defer mm.wg.Done()
	tick := time.NewTicker(mm.opts.Interval)
	defer tick.Stop()
	for {
		select {
		case <-mm.stop:
			return
		case <-tick.C:
		}
		moves, err := mm.opts.Moves()
		if err != nil {
			continue
		}
		live := map[string]bool{}
		for _, m := range moves {
			key := moveKey(m)
			live[key] = true
			switch mm.opts.NodeID {
			case m.From:
				mm.source(m, key)
			case m.To:
				mm.target(m, key)
			}
		}
		mm.forget(live)
	}
}

func moveKey(m cluster.Move) string { return m.LU + "@" + m.StartedAt.Format(time.RFC3339Nano) }

// forget drops what it recorded of moves that ended.
func (mm *MoveMonitor) forget(live map[string]bool) {
	mm.mu.Lock()
	defer mm.mu.Unlock()
	for k := range mm.mu.recorded {
		if key, _, _ := cutLast(k, '#'); !live[key] {
			delete(mm.mu.recorded, k)
		}
	}
}

func cutLast(s string, sep byte) (string, string, bool) {
	for i := len(s) - 1; i >= 0; i-- {
		if s[i] == sep {
			return s[:i], s[i+1:], true
		}
	}
	return s, "", false
}

// once reports whether step of move key is not yet recorded, and marks it.
func (mm *MoveMonitor) once(key, step string) bool {
	mm.mu.Lock()
	defer mm.mu.Unlock()
	k := key + "#" + step
	if mm.mu.recorded[k] {
		return false
	}
	mm.mu.recorded[k] = true
	return true
}

func (mm *MoveMonitor) unmark(key, step string) {
	mm.mu.Lock()
	defer mm.mu.Unlock()
	delete(mm.mu.recorded, key+"#"+step)
}

func (mm *MoveMonitor) propose(op cluster.MoveOp) error {
	ctx, cancel := context.WithTimeout(context.Background(), mm.opts.SwitchTimeout)
	defer cancel()
	err := mm.opts.Propose(ctx, op)
	if err != nil && !errors.Is(err, cluster.ErrNoMove) {
		mm.opts.Logger.Warn("move monitor: cannot record", "lu", op.LU, "op", op.Op, "role", op.Role, "err", err)
	}
	return err
}

// unchanged reports whether the LU is still at the writer and epoch the
// move started from, per this node's applied records.
func (mm *MoveMonitor) unchanged(m cluster.Move) (bool, string) {
	rec, ok := mm.opts.Manager.record(m.LU)
	if !ok {
		return false, "the LU is gone"
	}
	if writerOf(rec) != m.From || rec.Epoch != m.Epoch {
		return false, fmt.Sprintf("the LU changed since the move started (writer %s epoch %d, was %s epoch %d)",
			writerOf(rec), rec.Epoch, m.From, m.Epoch)
	}
	return true, ""
}

// source is the source monitor's pass over move m.
func (mm *MoveMonitor) source(m cluster.Move, key string) {
	op := cluster.MoveOp{LU: m.LU, Role: cluster.MonitorSource}
	switch m.State {
	case cluster.MoveRequested:
		mm.mu.Lock()
		busy := mm.mu.handing[m.LU]
		mm.mu.handing[m.LU] = true
		mm.mu.Unlock()
		if busy {
			return
		}
		mm.wg.Add(1)
		go func() {
			defer mm.wg.Done()
			defer func() {
				mm.mu.Lock()
				delete(mm.mu.handing, m.LU)
				mm.mu.Unlock()
			}()
			mm.handOver(m)
		}()
	case cluster.MoveSyncing:
		mm.mu.Lock()
		busy := mm.mu.handing[m.LU]
		mm.mu.Unlock()
		if !busy && mm.once(key, "abandoned") {
			// Syncing, and no handover runs here: this node restarted
			// mid-handover, or its switch had an unknown outcome that
			// did not land. It writes as before; roll back.
			op.Op, op.Step, op.Reason = cluster.MoveOpRollBack, "rolled back", "the source's handover ended without a switch"
			if mm.propose(op) != nil {
				mm.unmark(key, "abandoned")
			}
		}
	case cluster.MoveSwitching:
		if _, writes := mm.opts.Manager.writerMirror(m.LU); !writes && mm.once(key, "handed-over") {
			op.Op, op.Step = cluster.MoveOpStep, "handed-over"
			if mm.propose(op) != nil {
				mm.unmark(key, "handed-over")
			}
		}
	}
}

// handOver runs the source's side of move m (requested).
func (mm *MoveMonitor) handOver(m cluster.Move) {
	op := cluster.MoveOp{LU: m.LU, Role: cluster.MonitorSource}
	rollback := func(reason string) {
		op.Op, op.Step, op.Reason = cluster.MoveOpRollBack, "rolled back", reason
		mm.propose(op)
	}
	if ok, why := mm.unchanged(m); !ok {
		rollback(why)
		return
	}
	mi, ok := mm.opts.Manager.writerMirror(m.LU)
	if !ok {
		rollback("the source does not write the LU")
		return
	}
	// Before anything is held: a target that does not answer now would
	// only be made the writer to fail over back.
	if err := mi.pingCopy(m.To, mm.opts.PingTimeout); err != nil {
		rollback("the target's copy does not answer the source: " + err.Error())
		return
	}
	op.Op, op.Step = cluster.MoveOpSync, "quiescing"
	if err := mm.propose(op); err != nil {
		if !errors.Is(err, cluster.ErrNoMove) {
			rollback("cannot record syncing: " + err.Error())
		}
		return
	}
	pause, err := mi.handOver(context.Background(), mm.opts.SwitchTimeout,
		func(ctx context.Context) error {
			return mm.opts.Propose(ctx, cluster.MoveOp{LU: m.LU, Op: cluster.MoveOpSwitch, Role: cluster.MonitorSource, Step: "drained"})
		})
	mm.pause.Observe(pause.Seconds())
	if err != nil {
		// Always safe: the state machine refuses a rollback once the
		// switch is recorded (then the next pass sees it switching).
		mm.opts.Logger.Warn("move: handover failed; this node writes as before", "lu", m.LU, "to", m.To, "pause", pause, "err", err)
		rollback("the switch did not complete: " + err.Error())
		return
	}
	mm.opts.Logger.Info("move: handed the writer role over", "lu", m.LU, "to", m.To, "pause", pause)
}

// target is the target monitor's pass over move m.
func (mm *MoveMonitor) target(m cluster.Move, key string) {
	op := cluster.MoveOp{LU: m.LU, Role: cluster.MonitorTarget}
	switch m.State {
	case cluster.MoveRequested, cluster.MoveSyncing:
		if ok, why := mm.unchanged(m); !ok && mm.once(key, "gave-up") {
			op.Op, op.Step, op.Reason = cluster.MoveOpRollBack, "rolled back", why
			if mm.propose(op) != nil {
				mm.unmark(key, "gave-up")
			}
			return
		}
		if mm.once(key, "ready") {
			op.Op, op.Step = cluster.MoveOpStep, "ready"
			if mm.propose(op) != nil {
				mm.unmark(key, "ready")
			}
		}
	case cluster.MoveSwitching:
		mi, writes := mm.opts.Manager.writerMirror(m.LU)
		if !writes || mi.epoch.Load() <= m.Epoch || !mm.once(key, "took-over") {
			return
		}
		op.Op, op.Step = cluster.MoveOpComplete, "took-over"
		if mm.propose(op) != nil {
			mm.unmark(key, "took-over")
		}
	}
}
