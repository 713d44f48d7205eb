package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/lu"
	"github.com/lupool/lupool/server/api"
)

// eventSource serves the event log of the metadata (api.EventSource).
type eventSource struct {
	node *cluster.Node     // immutable; never nil
	ctl  func(error) error // immutable: maps metadata errors to the API's
}

var _ api.EventSource = (*eventSource)(nil)

func toAPIEvent(ev cluster.Event) api.Event {
	return api.Event{Seq: ev.Seq, Time: ev.Time, Kind: ev.Kind, LU: ev.LU, Node: ev.Node, By: ev.By, Details: ev.Details}
}

func (s *eventSource) Events(after uint64, limit int) ([]api.Event, error) {
	evs, err := s.node.Events(after, limit)
	if err != nil {
		return nil, s.ctl(err)
	}
	out := make([]api.Event, len(evs))
	for i, ev := range evs {
		out[i] = toAPIEvent(ev)
	}
	return out, nil
}

func (s *eventSource) LastEventSeq() uint64 { return s.node.LastEventSeq() }

func (s *eventSource) EventsChanged() <-chan struct{} { return s.node.EventsChanged() }

// AppendEvent records an event a member reported (the caller's certificate
// is the proposer: it reports about itself only).
func (s *eventSource) AppendEvent(ctx context.Context, ev api.Event) error {
	by := api.CallerFrom(ctx).Node
	if by == "" {
		return fmt.Errorf("%w: only member nodes report events", api.ErrForbidden)
	}
	err := s.node.AppendEvent(ctx, cluster.Proposer{NodeID: by},
		cluster.Event{Kind: ev.Kind, LU: ev.LU, Node: ev.Node, Details: ev.Details})
	return s.ctl(err)
}

// AddSubscriber registers a caller (on the primary; elsewhere the
// NotLeaderError makes the API forward the request).
func (s *eventSource) AddSubscriber(ctx context.Context, req api.SubscribeRequest) (api.Subscriber, error) {
	if !s.node.IsLeader() {
		return api.Subscriber{}, s.ctl(cluster.ErrNotLeader)
	}
	id := req.ID
	if id == "" {
		var b [4]byte
		if _, err := rand.Read(b[:]); err != nil {
			return api.Subscriber{}, err
		}
		id = "sub-" + hex.EncodeToString(b[:])
	}
	sub, err := s.node.AddSubscriber(ctx, cluster.Subscriber{ID: id, Kinds: req.Kinds, To: req.To})
	if err != nil {
		return api.Subscriber{}, s.ctl(err)
	}
	return toAPISubscriber(sub, nil), nil
}

func (s *eventSource) RemoveSubscriber(ctx context.Context, id string) error {
	if !s.node.IsLeader() {
		return s.ctl(cluster.ErrNotLeader)
	}
	return s.ctl(s.node.RemoveSubscriber(ctx, id))
}

// Subscribers lists the registered callers with the delivery state this
// node, the primary, keeps.
func (s *eventSource) Subscribers(context.Context) ([]api.Subscriber, error) {
	if !s.node.IsLeader() {
		return nil, s.ctl(cluster.ErrNotLeader)
	}
	subs, err := s.node.Subscribers()
	if err != nil {
		return nil, s.ctl(err)
	}
	status := s.node.DeliveryStatus()
	out := make([]api.Subscriber, 0, len(subs))
	for _, sub := range subs {
		var st *cluster.DeliveryStatus
		if v, ok := status[sub.ID]; ok {
			st = &v
		}
		out = append(out, toAPISubscriber(sub, st))
	}
	return out, nil
}

func toAPISubscriber(s cluster.Subscriber, st *cluster.DeliveryStatus) api.Subscriber {
	out := api.Subscriber{ID: s.ID, Kinds: s.Kinds, To: s.To, CreatedAt: s.CreatedAt, AckedSeq: s.AckedSeq}
	if st != nil {
		out.State, out.Delivered, out.Failures, out.LastError, out.NextRetry = st.State, st.Delivered, st.Failures, st.LastError, st.NextRetry
	}
	return out
}

// Emitter limits.
const (
	emitterQueueMax     = 1024
	emitterAttemptsMax  = 20
	emitterBackoffFirst = 100 * time.Millisecond
	emitterBackoffMax   = 5 * time.Second
)

// eventEmitter records the events this node observes (pool thresholds,
// FFDC bundles) in the metadata's event log without blocking whoever
// observed them: emit queues the event (at most emitterQueueMax; beyond
// that it is dropped and counted), and one goroutine proposes each in
// order, directly when this node leads the metadata, else on the leader's
// peer port, retrying with backoff across leader changes.
type eventEmitter struct {
	self    string
	node    *cluster.Node // immutable; never nil
	peers   *peers        // immutable; never nil
	log     *slog.Logger  // immutable; never nil
	queue   chan cluster.Event
	dropped atomic.Uint64
	failed  atomic.Uint64
	done    chan struct{}
	stop    context.CancelFunc
}

func newEventEmitter(self string, node *cluster.Node, p *peers, log *slog.Logger) *eventEmitter {
	ctx, cancel := context.WithCancel(context.Background())
	e := &eventEmitter{self: self, node: node, peers: p, log: log, queue: make(chan cluster.Event, emitterQueueMax),
		done: make(chan struct{}), stop: cancel}
	go e.run(ctx)
	return e
}

// emit queues ev (its Node defaults to this node); it never blocks.
func (e *eventEmitter) emit(ev cluster.Event) {
	if ev.Node == "" {
		ev.Node = e.self
	}
	select {
	case e.queue <- ev:
	default:
		e.dropped.Add(1)
		e.log.Warn("event queue full: event dropped", "kind", ev.Kind, "dropped", e.dropped.Load())
	}
}

// close stops the emitter; events still queued are not sent.
func (e *eventEmitter) close() {
	e.stop()
	<-e.done
}

func (e *eventEmitter) run(ctx context.Context) {
	defer close(e.done)
	for {
		select {
		case <-ctx.Done():
			return
		case ev := <-e.queue:
			if err := e.send(ctx, ev); err != nil && ctx.Err() == nil {
				e.failed.Add(1)
				e.log.Warn("could not record an event", "kind", ev.Kind, "err", err)
			}
		}
	}
}

// send proposes ev until it is recorded, refused, or out of attempts.
func (e *eventEmitter) send(ctx context.Context, ev cluster.Event) error {
	backoff := emitterBackoffFirst
	var err error
	for attempt := 0; attempt < emitterAttemptsMax; attempt++ {
		actx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err = e.node.AppendEvent(actx, cluster.Proposer{NodeID: e.self}, ev)
		if errors.Is(err, cluster.ErrNotLeader) {
			if leader, _ := e.node.Leader(); leader != "" {
				var c *api.Client
				if c, err = e.peers.clientOf(leader); err == nil {
					err = c.AppendEvent(actx, api.Event{Kind: ev.Kind, LU: ev.LU, Node: ev.Node, Details: ev.Details})
				}
			}
		}
		cancel()
		var se *api.StatusError
		switch {
		case err == nil:
			return nil
		case errors.Is(err, cluster.ErrInvalid), errors.Is(err, cluster.ErrForeignRecord):
			return err // a retry would be refused again
		case errors.As(err, &se) && se.StatusCode < 500:
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, emitterBackoffMax)
	}
	return fmt.Errorf("gave up after %d attempts: %w", emitterAttemptsMax, err)
}

// settingPoolAlerts is the metadata setting holding the pool's alert
// thresholds (api.PoolAlerts as JSON; lupool pool alert set).
const settingPoolAlerts = "pool.alerts"

// alertLimits are the levels the alert loop compares the pool with.
type alertLimits struct {
	warnPercent, criticalPercent float64
	// overcommitPercent: 0 means no overcommit alert.
	overcommitPercent float64
}

// alertStore keeps the pool's alert thresholds in the metadata.
type alertStore struct {
	node *cluster.Node     // immutable; never nil
	pool *lu.Pool          // immutable; never nil
	ctl  func(error) error // immutable: maps metadata errors to the API's
}

var _ api.AlertStore = (*alertStore)(nil)

// PoolAlerts returns the stored thresholds, or the pool's own (its
// --warn/--critical defaults, no overcommit alert) when none are stored.
func (s *alertStore) PoolAlerts(context.Context) (api.PoolAlerts, error) {
	warn, crit := s.pool.Thresholds()
	a := api.PoolAlerts{ThresholdPercent: warn, CriticalPercent: crit}
	v, found, err := s.node.Setting(settingPoolAlerts)
	if err != nil {
		return a, s.ctl(err)
	}
	if found {
		if err := json.Unmarshal([]byte(v), &a); err != nil {
			return a, fmt.Errorf("the stored pool alerts %q: %w", v, err)
		}
	}
	return a, nil
}

func (s *alertStore) SetPoolAlerts(ctx context.Context, a api.PoolAlerts) (api.PoolAlerts, error) {
	if err := a.Validate(); err != nil {
		return api.PoolAlerts{}, err
	}
	data, err := json.Marshal(a)
	if err != nil {
		return api.PoolAlerts{}, err
	}
	if err := s.node.SetSetting(ctx, settingPoolAlerts, string(data)); err != nil {
		return api.PoolAlerts{}, s.ctl(err)
	}
	return a, nil
}

// limits is what the alert loop compares the pool with now.
func (s *alertStore) limits() alertLimits {
	a, _ := s.PoolAlerts(context.Background())
	return alertLimits{warnPercent: a.ThresholdPercent, criticalPercent: max(a.CriticalPercent, a.ThresholdPercent),
		overcommitPercent: a.OvercommitPercent}
}

// alertWatcher compares this node's pool with the alert limits and emits
// PoolThreshold on every level change (ok, warn, critical) and
// OvercommitApproached when the provisioned bytes reach the overcommit
// alert (and again with state=ok when they fall below).
type alertWatcher struct {
	mu         sync.Mutex
	level      string // guarded by mu; "ok" at start
	overcommit bool   // guarded by mu
}

func (a *alertWatcher) check(st lu.PoolStatus, l alertLimits, emit func(cluster.Event)) {
	if st.CapacityBytes <= 0 {
		return
	}
	used := 100 * float64(st.CapacityBytes-st.FreeBytes) / float64(st.CapacityBytes)
	level := string(lu.LevelOK)
	switch {
	case used >= l.criticalPercent:
		level = string(lu.LevelCritical)
	case used >= l.warnPercent:
		level = string(lu.LevelWarn)
	}
	ratio := 100 * float64(st.ProvisionedBytes) / float64(st.CapacityBytes)
	over := l.overcommitPercent > 0 && ratio >= l.overcommitPercent
	a.mu.Lock()
	from, wasOver := a.level, a.overcommit
	a.level, a.overcommit = level, over
	a.mu.Unlock()
	if from == "" {
		from = string(lu.LevelOK)
	}
	if level != from {
		emit(cluster.Event{Kind: cluster.EventPoolThreshold, Details: map[string]string{
			"level": level, "from": from, "used_percent": strconv.FormatFloat(used, 'f', 1, 64),
			"warn_percent": strconv.FormatFloat(l.warnPercent, 'f', -1, 64), "critical_percent": strconv.FormatFloat(l.criticalPercent, 'f', -1, 64),
		}})
	}
	if over != wasOver {
		state := "approached"
		if !over {
			state = "ok"
		}
		emit(cluster.Event{Kind: cluster.EventOvercommitApproached, Details: map[string]string{
			"state": state, "provisioned_percent": strconv.FormatFloat(ratio, 'f', 1, 64),
			"alert_percent": strconv.FormatFloat(l.overcommitPercent, 'f', -1, 64),
		}})
	}
}

// alertLoop checks the pool every interval until ctx ends.
func alertLoop(ctx context.Context, interval time.Duration, store *alertStore, emit func(cluster.Event)) {
	var a alertWatcher
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		a.check(store.pool.Status(), store.limits(), emit)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
