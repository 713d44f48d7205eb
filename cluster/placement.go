package cluster

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"time"
)

// ErrNoPlacement is returned by PickNodes when too few nodes can take a
// copy.
var ErrNoPlacement = errors.New("cluster: not enough nodes for the copies")

// PickNodes chooses n distinct nodes for new copies among nodes (members
// with an API and an NBD address, voters or non-voters; a witness records
// no NBD address) that are not in exclude: those
// holding the fewest copies in lus first, ties by id. It is the pool's one
// placement rule, used on create, add-copy and replacement.
func PickNodes(nodes []NodeInfo, lus []LU, exclude map[string]bool, n int) ([]string, error) {
	load := map[string]int{}
	for _, rec := range lus {
		for _, r := range rec.Replicas {
			load[r.NodeID]++
		}
	}
	var candidates []string
	for _, node := range nodes {
		// A node without an NBD address is a witness (metadata only).
		usable := node.APIAddr != "" && node.NBDAddr != "" && (node.Suffrage == suffrageVoter || node.Suffrage == suffrageNonvoter)
		if usable && !exclude[node.ID] {
			candidates = append(candidates, node.ID)
		}
	}
	if len(candidates) < n {
		return nil, fmt.Errorf("%w: %d needed, %d usable", ErrNoPlacement, n, len(candidates))
	}
	sort.Slice(candidates, func(i, j int) bool {
		if load[candidates[i]] != load[candidates[j]] {
			return load[candidates[i]] < load[candidates[j]]
		}
		return candidates[i] < candidates[j]
	})
	return candidates[:n], nil
}

// replacer is the primary's control loop that replaces a copy which stayed
// out of sync (or new, never built) for Options.ReplaceAfter: the copy is
// dropped and a new one placed on another node, which the writer then
// rebuilds. The loop proposes as the primary (Proposer.Primary), through
// ChangeCopies, so the state machine's rules apply. A copy that is resyncing makes progress and is left alone; the
// writer is never replaced here. The clock starts when this node, as
// leader, first sees the copy in that state, so a leadership change only
// delays a replacement.
type replacer struct {
	n     *Node
	after time.Duration
	// since maps "lu\x00node" to when the copy was first seen lagging.
	since map[string]time.Time
}

func (n *Node) replaceLoop() {
	defer n.wg.Done()
	r := &replacer{n: n, after: n.opts.ReplaceAfter, since: map[string]time.Time{}}
	tick := time.NewTicker(min(r.after/4, 5*time.Second))
	defer tick.Stop()
	for {
		select {
		case <-n.closed:
			return
		case now := <-tick.C:
			if !n.IsLeader() {
				clear(r.since)
				continue
			}
			if err := r.pass(now); err != nil && !errors.Is(err, ErrClosed) {
				n.log.Warn("copy replacement pass failed", "err", err)
			}
		}
	}
}

// pass replaces at most one copy per LU per tick.
func (r *replacer) pass(now time.Time) error {
	lus, err := r.n.ListLUs()
	if err != nil {
		return err
	}
	nodes, err := r.n.Nodes()
	if err != nil {
		return err
	}
	seen := map[string]bool{}
	for _, rec := range lus {
		for _, rep := range rec.Replicas {
			key := rec.Name + "\x00" + rep.NodeID
			lagging := rep.NodeID != rec.Writer && (rep.State == ReplicaOutOfSync || rep.State == ReplicaNew)
			if !lagging {
				continue
			}
			seen[key] = true
			first, ok := r.since[key]
			if !ok {
				r.since[key] = now
				continue
			}
			if now.Sub(first) < r.after {
				continue
			}
			if err := r.replace(rec, rep.NodeID, nodes, lus); err != nil {
				r.n.log.Warn("cannot replace a lagging copy", "lu", rec.Name, "copy", rep.NodeID, "lagging_for", now.Sub(first).Round(time.Second), "err", err)
				continue
			}
			delete(r.since, key)
			break
		}
	}
	for key := range r.since {
		if !seen[key] {
			delete(r.since, key)
		}
	}
	return nil
}

func (r *replacer) replace(rec LU, old string, nodes []NodeInfo, lus []LU) error {
	exclude := map[string]bool{}
	for _, rep := range rec.Replicas {
		exclude[rep.NodeID] = true
	}
	picked, err := PickNodes(nodes, lus, exclude, 1)
	if err != nil {
		return err
	}
	next := CopyChange{Name: rec.Name, ExpectedEpoch: rec.Epoch, Epoch: rec.Epoch + 1, Writer: rec.Writer}
	for _, rep := range rec.Replicas {
		if rep.NodeID == old {
			rep = Replica{NodeID: picked[0], State: ReplicaNew}
		}
		next.Replicas = append(next.Replicas, rep)
	}
	next.Copies = len(next.Replicas)
	ctx, cancel := context.WithTimeout(context.Background(), r.n.opts.ApplyTimeout)
	defer cancel()
	if err := r.n.ChangeCopies(ctx, Proposer{NodeID: r.n.opts.NodeID, Primary: true}, next); err != nil {
		return err
	}
	r.n.log.Warn("replaced a copy that stayed out of sync", "lu", rec.Name, "old", old, "new", picked[0],
		"after", r.after, "epoch", next.Epoch)
	return nil
}
