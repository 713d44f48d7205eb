package copyset

import (
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cockroachdb/datadriven"
)

// TestInteraction walks testdata/: each file drives one copy set (sim)
// with these commands, in the style of etcd-io/raft's interaction tests:
//
//	init nodes=n1,n2,n3 [copies=n1,n2] writer=n1 primary=n3 lease=1000 failover=2000 ack-timeout=300 [meta-leases] [unsafe=RULE]
//	write node=N block=B         the writer N applies and sends a write
//	read node=N block=B          N serves a read from its volume, or refuses
//	deliver                      hand over every deliverable message
//	drop from=A to=B             lose the messages queued from A to B
//	partition A,B C              cut every link between the groups
//	cut a=A b=B                  cut the one link between A and B
//	heal                         join every link
//	elect node=N                 the metadata leader moves to N
//	resync node=N                the writer copies its volume to N, in sync again
//	crash node=N / restart node=N
//	freeze node=N / thaw node=N  SIGSTOP / SIGCONT: N's messages wait
//	tick ms=M [deliver=false]    advance the clock in steps of 10 ms,
//	                             delivering in each step unless told not to
//	state                        the record and every node
//
// unsafe= turns one rule off (sim.unsafe lists them).
//
// Every command prints what happened. A read that misses an acknowledged
// write prints STALE READ and fails the test, unless the file turned a
// rule off with unsafe= (then it must print one: the check can fail).
func TestInteraction(t *testing.T) {
	datadriven.Walk(t, "testdata", func(t *testing.T, path string) {
		var s *sim
		datadriven.RunTest(t, path, func(t *testing.T, d *datadriven.TestData) string {
			if d.Cmd != "init" && s == nil {
				d.Fatalf(t, "%s before init", d.Cmd)
			}
			if s != nil {
				s.out.Reset()
			}
			switch d.Cmd {
			case "init":
				s = initSim(t, d)
				return s.state()
			case "write":
				s.doWrite(arg(t, d, "node"), argInt(t, d, "block"))
			case "read":
				s.doRead(arg(t, d, "node"), argInt(t, d, "block"))
			case "deliver":
				s.deliver()
			case "drop":
				from, to := arg(t, d, "from"), arg(t, d, "to")
				var keep []msg
				for _, m := range s.queue {
					if m.from != from || m.to != to {
						keep = append(keep, m)
					}
				}
				s.logf("dropped %d messages %s->%s", len(s.queue)-len(keep), from, to)
				s.queue = keep
			case "partition":
				var groups [][]string
				for _, a := range d.CmdArgs {
					groups = append(groups, strings.Split(a.Key, ","))
				}
				s.partition(groups)
			case "cut":
				a, b := arg(t, d, "a"), arg(t, d, "b")
				if a > b {
					a, b = b, a
				}
				s.cut[[2]string{a, b}] = true
				s.logf("cut %s-%s", a, b)
			case "elect":
				s.elect(arg(t, d, "node"))
			case "resync":
				s.resync(arg(t, d, "node"))
			case "heal":
				s.cut = map[[2]string]bool{}
				s.logf("healed")
			case "crash", "restart", "freeze", "thaw":
				n := s.nodes[arg(t, d, "node")]
				switch d.Cmd {
				case "crash":
					// The applied record (epoch, copy state) is on disk.
					n.up, n.writer, n.pending = false, false, nil
				case "restart":
					s.restart(n.id)
				case "freeze":
					n.frozen = true
				case "thaw":
					n.frozen = false
				}
				s.logf("%s: %s", n.id, d.Cmd)
			case "tick":
				deliver := true
				if d.HasArg("deliver") {
					var v string
					d.ScanArgs(t, "deliver", &v)
					deliver = v != "false"
				}
				for range argInt(t, d, "ms") / stepMs {
					s.step(deliver)
				}
			case "state":
				return s.state()
			default:
				d.Fatalf(t, "unknown command %s", d.Cmd)
			}
			if s.stale > 0 && s.unsafe == "" {
				t.Errorf("%s: a read missed an acknowledged write:\n%s", d.Pos, s.out.String())
			}
			return s.out.String()
		})
		if s != nil && s.unsafe != "" && s.stale == 0 {
			t.Errorf("%s turned off %s but no stale read was seen: the check could not fail", path, s.unsafe)
		}
	})
}

func initSim(t *testing.T, d *datadriven.TestData) *sim {
	nodes := strings.Split(arg(t, d, "nodes"), ",")
	p := Params{ReadLease: time.Duration(argInt(t, d, "lease")) * time.Millisecond,
		FailoverAfter: time.Duration(argInt(t, d, "failover")) * time.Millisecond}
	if err := p.Validate(); err != nil {
		d.Fatalf(t, "%v", err)
	}
	unsafe := ""
	if d.HasArg("unsafe") {
		d.ScanArgs(t, "unsafe", &unsafe)
	}
	copies := nodes
	if d.HasArg("copies") {
		copies = strings.Split(arg(t, d, "copies"), ",")
	}
	return newSim(p, nodes, copies, arg(t, d, "writer"), arg(t, d, "primary"), int64(argInt(t, d, "ack-timeout")), d.HasArg("meta-leases"), unsafe)
}

func (s *sim) partition(groups [][]string) {
	s.cut = map[[2]string]bool{}
	group := map[string]int{}
	for i, g := range groups {
		for _, id := range g {
			group[id] = i
		}
	}
	for _, a := range s.ids {
		for _, b := range s.ids {
			if a < b && group[a] != group[b] {
				s.cut[[2]string{a, b}] = true
			}
		}
	}
	s.logf("partitioned %v", groups)
}

func arg(t *testing.T, d *datadriven.TestData, key string) string {
	var v string
	d.ScanArgs(t, key, &v)
	return v
}

func argInt(t *testing.T, d *datadriven.TestData, key string) int {
	v, err := strconv.Atoi(arg(t, d, key))
	if err != nil {
		d.Fatalf(t, "%s: %v", key, err)
	}
	return v
}
