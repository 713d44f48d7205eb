package cluster

import (
	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus"
)

// collector reads Stats on every scrape. It is built unregistered: the
// daemon registers it on its own registry.
type collector struct {
	n        *Node // immutable; never nil
	state    *prometheus.Desc
	term     *prometheus.Desc
	applied  *prometheus.Desc
	commit   *prometheus.Desc
	last     *prometheus.Desc
	rejected *prometheus.Desc
	lus      *prometheus.Desc
	nodes    *prometheus.Desc
	applies  *prometheus.Desc
	skips    *prometheus.Desc
	fails    *prometheus.Desc
	live     *prometheus.Desc
	lastSeq  *prometheus.Desc
	subLag   *prometheus.Desc
	subFails *prometheus.Desc
}

var _ prometheus.Collector = (*collector)(nil)

// Collectors returns the node's Prometheus collectors, unregistered:
//
//	lupool_raft_state              gauge: 0 follower, 1 candidate, 2 leader, 3 shutdown
//	lupool_raft_term               gauge
//	lupool_raft_applied_index      gauge (the state machine's recorded index)
//	lupool_raft_commit_index       gauge
//	lupool_raft_last_log_index     gauge
//	lupool_raft_rejected_commands_total counter
//	lupool_raft_nodes              gauge: members in the raft configuration
//	lupool_lus                     gauge: LUs in the table
//	lupool_raft_applied_since_start_total counter: commands applied by this process
//	lupool_raft_skipped_since_start_total counter: entries skipped as applied before a restart
//	lupool_events_total{kind}      counter: events stored since start
//	lupool_moves_total{outcome}    counter: planned writer moves ended since start (done, rolled-back)
//	lupool_events_last_seq         gauge: the newest event's seq
//	lupool_event_subscriber_lag_events{subscriber}      gauge, on the primary: events after the acknowledged position
//	lupool_event_delivery_failures_total{subscriber}    counter, on the primary: failed deliveries since it became primary
func (n *Node) Collectors() []prometheus.Collector {
	return []prometheus.Collector{n.fsm.eventsTotal, n.fsm.movesTotal, &collector{
		lastSeq: prometheus.NewDesc("lupool_events_last_seq", "Seq of the newest event in the event log.", nil, nil),
		subLag: prometheus.NewDesc("lupool_event_subscriber_lag_events",
			"Events after a registered caller's acknowledged position (reported by the primary).", []string{"subscriber"}, nil),
		subFails: prometheus.NewDesc("lupool_event_delivery_failures_total",
			"Failed deliveries to a registered caller since this node became primary.", []string{"subscriber"}, nil),
		n:        n,
		state:    prometheus.NewDesc("lupool_raft_state", "Raft state of this node: 0 follower, 1 candidate, 2 leader, 3 shutdown.", nil, nil),
		term:     prometheus.NewDesc("lupool_raft_term", "Current raft term.", nil, nil),
		applied:  prometheus.NewDesc("lupool_raft_applied_index", "Last raft index applied to the metadata state machine.", nil, nil),
		commit:   prometheus.NewDesc("lupool_raft_commit_index", "Last raft index known committed.", nil, nil),
		last:     prometheus.NewDesc("lupool_raft_last_log_index", "Last raft index in the local log.", nil, nil),
		rejected: prometheus.NewDesc("lupool_raft_rejected_commands_total", "Commands the state machine refused (invalid, illegal or unknown).", nil, nil),
		lus:      prometheus.NewDesc("lupool_lus", "Number of LUs in the metadata table.", nil, nil),
		nodes:    prometheus.NewDesc("lupool_raft_nodes", "Members of the raft configuration.", nil, nil),
		applies: prometheus.NewDesc("lupool_raft_applied_since_start_total",
			"Commands applied to the metadata state machine by this process.", nil, nil),
		fails: prometheus.NewDesc("lupool_failovers_total",
			"Writers this node promoted as primary because the old writer was dead, since this process started.", nil, nil),
		live: prometheus.NewDesc("lupool_node_liveness",
			"1 for each member's state in the primary's liveness view (alive, suspect, dead); only the primary reports it.",
			[]string{"node", "state"}, nil),
		skips: prometheus.NewDesc("lupool_raft_skipped_since_start_total",
			"Log entries skipped because the state already held them (after a restart).", nil, nil),
	}}
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.state, c.term, c.applied, c.commit, c.last, c.rejected, c.lus, c.nodes, c.applies, c.skips,
		c.fails, c.live, c.lastSeq, c.subLag, c.subFails} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	s := c.n.Stats()
	var state float64
	switch c.n.raft.State() {
	case raft.Follower:
		state = 0
	case raft.Candidate:
		state = 1
	case raft.Leader:
		state = 2
	default:
		state = 3
	}
	gauge := func(d *prometheus.Desc, v float64) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v)
	}
	gauge(c.state, state)
	gauge(c.term, float64(s.Term))
	gauge(c.applied, float64(s.FSMIndex))
	gauge(c.commit, float64(s.CommitIndex))
	gauge(c.last, float64(s.LastLogIndex))
	ch <- prometheus.MustNewConstMetric(c.rejected, prometheus.CounterValue, float64(s.Rejected))
	gauge(c.lus, float64(s.LUs))
	gauge(c.nodes, float64(s.NodeCount))
	ch <- prometheus.MustNewConstMetric(c.applies, prometheus.CounterValue, float64(s.AppliedSinceOpen))
	ch <- prometheus.MustNewConstMetric(c.skips, prometheus.CounterValue, float64(s.SkippedSinceOpen))
	ch <- prometheus.MustNewConstMetric(c.fails, prometheus.CounterValue, float64(c.n.failovers.Load()))
	if view, err := c.n.Liveness(); err == nil {
		for _, nl := range view {
			if nl.State == LiveUnknown {
				continue
			}
			for _, st := range []string{LiveAlive, LiveSuspect, LiveDead} {
				v := 0.0
				if st == nl.State {
					v = 1
				}
				ch <- prometheus.MustNewConstMetric(c.live, prometheus.GaugeValue, v, nl.ID, st)
			}
		}
	}
	last := c.n.LastEventSeq()
	gauge(c.lastSeq, float64(last))
	status := c.n.DeliveryStatus()
	if len(status) == 0 {
		return
	}
	subs, err := c.n.Subscribers()
	if err != nil {
		return
	}
	for _, s := range subs {
		st, ok := status[s.ID]
		if !ok {
			continue
		}
		ch <- prometheus.MustNewConstMetric(c.subLag, prometheus.GaugeValue, float64(last-min(last, s.AckedSeq)), s.ID)
		ch <- prometheus.MustNewConstMetric(c.subFails, prometheus.CounterValue, float64(st.Failures), s.ID)
	}
}
