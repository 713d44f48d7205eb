package cluster

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/lupool/lupool/internal/copyset"
)

// Writer failover (issue 19): the primary (the metadata leader) keeps a
// liveness view of every member and, when an LU's writer has been dead for
// Options.FailoverAfter, records an in-sync copy on a live node as the new
// writer (epoch + 1, the old writer's copy out of sync), through the same
// checked command as every copy change (CheckCopyChange: only the primary
// moves the writer, and only to a copy that was in sync).
//
// # Liveness
//
// Every ProbeInterval the leader calls Options.Probe for each member (in
// the daemon: a request to the node's peer port, which also carries the
// replication streams, so a node that answers can serve its copies). A
// node answered within SuspectAfter is alive; one silent longer is
// suspect; one silent for FailoverAfter is dead. A new leader knows nothing
// of the old one's view: it counts every member as last heard when it took
// over, so it fails nothing over before FailoverAfter has passed.
//
// # Read leases granted by the metadata
//
// A copy in sync serves reads from its own volume while it holds a lease:
// from the writer's frames (package replication), or, while the writer is
// unreachable, from the metadata (ConfirmCopy: a leader-verified read that
// its copy is in sync at the current epoch, valid ReadLease from when the
// copy asked). Two rules keep every such lease from outliving the truth:
//   - the writer, after it records a copy out of sync, waits ReadLease
//     before it acknowledges anything that copy missed (package
//     replication);
//   - the primary promotes a new writer only ReadLease after it last
//     granted the old writer a lease (the writer uses metadata leases too,
//     when its copies do not answer).
// Both assume the nodes' clocks advance at the same rate.

// Liveness states of a node in the primary's view.
const (
	LiveAlive   = "alive"
	LiveSuspect = "suspect"
	LiveDead    = "dead"
	// LiveUnknown: this node is not the primary, or liveness probing is off.
	LiveUnknown = "unknown"
)

// ErrNotInSync is returned by ConfirmCopy when the node's copy is not in
// sync at the epoch asked about (or the LU moved on to another epoch).
var ErrNotInSync = errors.New("cluster: copy not in sync at that epoch")

// NodeLiveness is one member in the primary's liveness view.
type NodeLiveness struct {
	ID    string `json:"id"`
	State string `json:"state"`
	// LastHeard is when the node last answered a probe (for a node not
	// heard since this primary took over: when it took over).
	LastHeard time.Time `json:"last_heard"`
}

// watch is the primary's liveness view and failover loop state.
type watch struct {
	mu struct {
		sync.Mutex
		leading   bool                 // guarded by mu
		lastHeard map[string]time.Time // guarded by mu
		// granted maps a node id to when this leader last confirmed it a
		// metadata read lease (ConfirmCopy).
		granted map[string]time.Time // guarded by mu
		// reported is each member's state as last reported in an event
		// during this term (alive at take-over).
		reported map[string]string // guarded by mu
	}
}

func newWatch() *watch {
	w := &watch{}
	w.mu.lastHeard = map[string]time.Time{}
	w.mu.granted = map[string]time.Time{}
	w.mu.reported = map[string]string{}
	return w
}

// lead starts or ends this node's term as primary.
func (w *watch) lead(leading bool, now time.Time, members []string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if leading == w.mu.leading {
		return
	}
	w.mu.leading = leading
	clear(w.mu.lastHeard)
	clear(w.mu.reported)
	if leading {
		for _, id := range members {
			w.mu.lastHeard[id] = now
		}
		// Grants of an earlier term are unknown: count them as made now.
		for _, id := range members {
			w.mu.granted[id] = now
		}
	}
}

func (w *watch) heard(id string, at time.Time) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.mu.leading && at.After(w.mu.lastHeard[id]) {
		w.mu.lastHeard[id] = at
	}
}

func (w *watch) grant(id string, at time.Time) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if at.After(w.mu.granted[id]) {
		w.mu.granted[id] = at
	}
}

// view returns the liveness of members at now.
func (w *watch) view(members []string, self string, now time.Time, suspectAfter, deadAfter time.Duration) []NodeLiveness {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := make([]NodeLiveness, 0, len(members))
	for _, id := range members {
		nl := NodeLiveness{ID: id, State: LiveUnknown}
		if w.mu.leading {
			last, ok := w.mu.lastHeard[id]
			if !ok {
				last = now // joined during this term: heard at join
				w.mu.lastHeard[id] = now
			}
			if id == self {
				last = now // the primary itself; no time to report
			} else {
				nl.LastHeard = last
			}
			switch silent := now.Sub(last); {
			case silent >= deadAfter:
				nl.State = LiveDead
			case silent >= suspectAfter:
				nl.State = LiveSuspect
			default:
				nl.State = LiveAlive
			}
		}
		out = append(out, nl)
	}
	return out
}

// transitions returns the members whose state in view differs from the
// one last reported this term (alive when none was), and records it.
func (w *watch) transitions(view []NodeLiveness) (changed []NodeLiveness, from []string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, nl := range view {
		if nl.State == LiveUnknown {
			continue
		}
		prev, ok := w.mu.reported[nl.ID]
		if !ok {
			prev = LiveAlive
		}
		if prev != nl.State {
			changed, from = append(changed, nl), append(from, prev)
			w.mu.reported[nl.ID] = nl.State
		}
	}
	return changed, from
}

func (w *watch) grantedAt(id string) time.Time {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.mu.granted[id]
}

// memberIDs returns the ids of the members with a record that can hold
// copies (voters and non-voters).
func (n *Node) memberIDs() ([]string, error) {
	nodes, err := n.Nodes()
	if err != nil {
		return nil, err
	}
	var ids []string
	for _, node := range nodes {
		if node.Suffrage == suffrageVoter || node.Suffrage == suffrageNonvoter {
			ids = append(ids, node.ID)
		}
	}
	sort.Strings(ids)
	return ids, nil
}

// Liveness returns the primary's liveness view of every member; on a node
// that is not the primary every state is LiveUnknown.
func (n *Node) Liveness() ([]NodeLiveness, error) {
	ids, err := n.memberIDs()
	if err != nil {
		return nil, err
	}
	return n.watch.view(ids, n.opts.NodeID, time.Now(), n.opts.SuspectAfter, n.opts.FailoverAfter), nil
}

// ConfirmCopy grants node a metadata read lease on its copy of LU name:
// it returns nil when, at this leader and after every committed entry is
// applied (a barrier), the LU is at epoch and node's copy is in sync (the
// writer's copy is always in sync). The lease is valid ReadLease from when
// the caller asked. ErrNotInSync otherwise; ErrNotLeader off the leader.
func (n *Node) ConfirmCopy(ctx context.Context, name, node string, epoch uint64) error {
	if err := n.Barrier(ctx); err != nil {
		return err
	}
	rec, err := n.GetLU(name)
	if err != nil {
		return err
	}
	if rec.Epoch != epoch {
		return fmt.Errorf("%w: %s is at epoch %d, not %d", ErrNotInSync, name, rec.Epoch, epoch)
	}
	for _, r := range rec.Replicas {
		if r.NodeID == node && r.State == ReplicaInSync {
			if !n.IsLeader() {
				return fmt.Errorf("%w: lost leadership while confirming", ErrNotLeader)
			}
			n.watch.grant(node, time.Now())
			return nil
		}
	}
	return fmt.Errorf("%w: the copy of %s on %s is not in sync at epoch %d", ErrNotInSync, name, node, epoch)
}

// QuorumContact returns when this node last knew itself part of the
// metadata majority: now while it leads (a leader that cannot reach a
// majority steps down within LeaderLeaseTimeout), else when it last heard
// from the leader (zero if never since it started).
func (n *Node) QuorumContact() time.Time {
	if n.IsLeader() {
		return time.Now()
	}
	return n.raft.LastContact()
}

// failoverLoop is the primary's liveness probe and writer failover loop.
func (n *Node) failoverLoop() {
	defer n.wg.Done()
	tick := time.NewTicker(n.opts.ProbeInterval)
	defer tick.Stop()
	for {
		select {
		case <-n.closed:
			return
		case now := <-tick.C:
			ids, err := n.memberIDs()
			if err != nil {
				if !errors.Is(err, ErrClosed) {
					n.log.Warn("liveness: cannot list members", "err", err)
				}
				continue
			}
			leading := n.IsLeader()
			n.watch.lead(leading, now, ids)
			if !leading {
				continue
			}
			n.probeAll(ids)
			now = time.Now()
			view := n.watch.view(ids, n.opts.NodeID, now, n.opts.SuspectAfter, n.opts.FailoverAfter)
			if err := n.failoverPass(view, now); err != nil && !errors.Is(err, ErrClosed) {
				n.log.Warn("failover pass failed", "err", err)
			}
			n.reportLiveness(view, now)
		}
	}
}

// probeAll probes every other member at once and waits for the answers
// (each bounded by ProbeTimeout).
func (n *Node) probeAll(ids []string) {
	var wg sync.WaitGroup
	for _, id := range ids {
		if id == n.opts.NodeID {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), n.opts.ProbeTimeout)
			defer cancel()
			if err := n.opts.Probe(ctx, id); err == nil {
				n.watch.heard(id, time.Now())
			}
		}()
	}
	wg.Wait()
}

// reportLiveness records an event (NodeSuspect, NodeDead, NodeBack) for
// every member whose state changed since it was last reported.
func (n *Node) reportLiveness(view []NodeLiveness, now time.Time) {
	changed, from := n.watch.transitions(view)
	for i, nl := range changed {
		kind := map[string]string{LiveSuspect: EventNodeSuspect, LiveDead: EventNodeDead, LiveAlive: EventNodeBack}[nl.State]
		ev := Event{Kind: kind, Node: nl.ID, Details: map[string]string{"from": from[i],
			"silent_ms": strconv.FormatInt(now.Sub(nl.LastHeard).Milliseconds(), 10)}}
		ctx, cancel := context.WithTimeout(context.Background(), n.opts.ApplyTimeout)
		err := n.AppendEvent(ctx, Proposer{NodeID: n.opts.NodeID, Primary: true}, ev)
		cancel()
		if err != nil && !errors.Is(err, ErrClosed) {
			n.log.Warn("cannot record a liveness event", "node", nl.ID, "kind", kind, "err", err)
		}
	}
}

// failoverPass promotes a new writer for every LU whose writer is dead.
func (n *Node) failoverPass(view []NodeLiveness, now time.Time) error {
	state := map[string]string{}
	anyDead := false
	for _, nl := range view {
		state[nl.ID] = nl.State
		anyDead = anyDead || nl.State == LiveDead
	}
	if !anyDead {
		return nil // the common case: no need to read the LU table every tick
	}
	lus, err := n.ListLUs()
	if err != nil {
		return err
	}
	written := map[string]int{}
	for _, rec := range lus {
		written[rec.Writer]++
	}
	for _, rec := range lus {
		if len(rec.Replicas) < 2 || state[rec.Writer] != LiveDead {
			continue
		}
		// The copy set's promotion rule: the writer silent for
		// FailoverAfter, and no metadata read lease of its may still hold.
		confirmed := copyset.Never
		if at := n.watch.grantedAt(rec.Writer); !at.IsZero() {
			confirmed = at.UnixNano()
		}
		p := copyset.Params{ReadLease: n.opts.ReadLease, FailoverAfter: n.opts.FailoverAfter}
		heard := copyset.Never
		if at := n.lastHeard(view, rec.Writer); !at.IsZero() {
			heard = at.UnixNano()
		}
		if !copyset.MayPromote(p, now.UnixNano(), heard, confirmed) {
			continue
		}
		next, ok := promotion(rec, state, written)
		if !ok {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), n.opts.ApplyTimeout)
		err := n.ChangeCopies(ctx, Proposer{NodeID: n.opts.NodeID, Primary: true}, next)
		cancel()
		if err != nil {
			n.log.Warn("cannot fail the writer over", "lu", rec.Name, "old", rec.Writer, "new", next.Writer, "err", err)
			continue
		}
		written[next.Writer]++
		n.failovers.Add(1)
		n.log.Warn("writer failed over", "lu", rec.Name, "old", rec.Writer, "new", next.Writer, "epoch", next.Epoch,
			"reason", "writer dead", "silent_for", now.Sub(n.lastHeard(view, rec.Writer)).Round(time.Millisecond))
	}
	return nil
}

func (n *Node) lastHeard(view []NodeLiveness, id string) time.Time {
	for _, nl := range view {
		if nl.ID == id {
			return nl.LastHeard
		}
	}
	return time.Time{}
}

// promotion returns the copy change that makes an in-sync copy on a live
// node rec's writer: the one whose node writes the fewest LUs, ties by id.
// The old writer's copy is recorded out of sync (it may hold writes it
// applied but never acknowledged; the new writer compares it by region
// hashes when it comes back).
func promotion(rec LU, state map[string]string, written map[string]int) (CopyChange, bool) {
	var best string
	for _, r := range rec.Replicas {
		if r.NodeID == rec.Writer || r.State != ReplicaInSync || state[r.NodeID] != LiveAlive {
			continue
		}
		if best == "" || written[r.NodeID] < written[best] || written[r.NodeID] == written[best] && r.NodeID < best {
			best = r.NodeID
		}
	}
	if best == "" {
		return CopyChange{}, false
	}
	next := CopyChange{Name: rec.Name, ExpectedEpoch: rec.Epoch, Epoch: rec.Epoch + 1, Writer: best, Copies: rec.Copies}
	for _, r := range rec.Replicas {
		if r.NodeID == rec.Writer {
			r.State = ReplicaOutOfSync
		}
		next.Replicas = append(next.Replicas, r)
	}
	return next, true
}
