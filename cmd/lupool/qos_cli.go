package main

import (
	"context"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/lupool/lupool/internal/units"
	"github.com/lupool/lupool/server/api"
)

// qosFlags are the QoS limit flags of lu create and lu set, as typed.
type qosFlags struct {
	iops, readIOPS, writeIOPS string
	bps, readBPS, writeBPS    string
	burst                     string
}

func (q *qosFlags) add(fs *pflag.FlagSet) {
	fs.StringVar(&q.iops, "iops-limit", "", "limit reads and writes each to this many requests per second (0: no limit)")
	fs.StringVar(&q.readIOPS, "read-iops-limit", "", "limit reads to this many per second (0: no limit)")
	fs.StringVar(&q.writeIOPS, "write-iops-limit", "", "limit writes, trims and zeroes to this many per second (0: no limit)")
	fs.StringVar(&q.bps, "bps-limit", "", "limit reads and writes each to this many bytes per second, e.g. 200M (0: no limit)")
	fs.StringVar(&q.readBPS, "read-bps-limit", "", "limit reads to this many bytes per second (0: no limit)")
	fs.StringVar(&q.writeBPS, "write-bps-limit", "", "limit writes to this many bytes per second (0: no limit)")
	fs.StringVar(&q.burst, "qos-burst", "", "how much unused allowance a quiet LU saves up, as time at its rate (default 100ms)")
}

// apply sets in q the limits whose flags were given on c; it reports
// whether any was.
func (q *qosFlags) apply(c *cobra.Command, out *api.QoS) (bool, error) {
	changed := func(name string) bool { return c.Flags().Changed(name) }
	count := func(name, v string, dst ...*int64) error {
		if !changed(name) {
			return nil
		}
		n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		if err != nil || n < 0 {
			return usageErrorf("--%s %q: want a whole number of requests per second, 0 for no limit", name, v)
		}
		for _, d := range dst {
			*d = n
		}
		return nil
	}
	size := func(name, v string, dst ...*int64) error {
		if !changed(name) {
			return nil
		}
		n, err := units.ParseSize(v)
		if err != nil || n < 0 {
			return usageErrorf("--%s %q: want bytes per second such as 200M, 0 for no limit", name, v)
		}
		for _, d := range dst {
			*d = n
		}
		return nil
	}
	// Both-ways flags first, so that a read- or write- flag given with
	// them wins.
	for _, err := range []error{
		count("iops-limit", q.iops, &out.ReadIOPS, &out.WriteIOPS),
		count("read-iops-limit", q.readIOPS, &out.ReadIOPS),
		count("write-iops-limit", q.writeIOPS, &out.WriteIOPS),
		size("bps-limit", q.bps, &out.ReadBytesPerSecond, &out.WriteBytesPerSecond),
		size("read-bps-limit", q.readBPS, &out.ReadBytesPerSecond),
		size("write-bps-limit", q.writeBPS, &out.WriteBytesPerSecond),
	} {
		if err != nil {
			return false, err
		}
	}
	if changed("qos-burst") {
		d, err := time.ParseDuration(q.burst)
		if err != nil || d < 0 {
			return false, usageErrorf("--qos-burst %q: want a duration such as 100ms or 1s", q.burst)
		}
		out.BurstMillis = d.Milliseconds()
	}
	for _, name := range []string{"iops-limit", "read-iops-limit", "write-iops-limit", "bps-limit", "read-bps-limit", "write-bps-limit", "qos-burst"} {
		if changed(name) {
			return true, nil
		}
	}
	return false, nil
}

// newLUSetCommand is lu set: change an LU's QoS limits online.
func newLUSetCommand(cf *clientFlags, stdout io.Writer) *cobra.Command {
	var q qosFlags
	set := &cobra.Command{
		Use:   "set NAME [--iops-limit N] [--bps-limit SIZE] ...",
		Short: "change an LU's QoS limits online (every node serving it applies them)",
		Long: `Change an LU's client I/O limits online. Only the limits named change; 0
lifts one. Every node that serves the LU (its writer and every node it is
attached through) applies the same limits to the requests it receives; a
request over a limit waits, it never fails.`,
		Example:           "  lupool lu set vm1 --iops-limit 2000\n  lupool lu set vm1 --write-bps-limit 100M --qos-burst 500ms\n  lupool lu set vm1 --iops-limit 0 --bps-limit 0",
		Args:              exactArgs(1, "lu set needs exactly one LU name"),
		ValidArgsFunction: cf.completeLUNames,
		RunE: func(c *cobra.Command, args []string) error {
			var probe api.QoS
			given, err := q.apply(c, &probe)
			if err != nil {
				return err
			}
			if !given {
				return usageErrorf("lu set needs a limit to change, e.g. --iops-limit 2000 (see lupool lu set --help)")
			}
			return cf.call(c, luTimeout, func(ctx context.Context, cl *api.Client) error {
				cur, err := cl.GetLU(ctx, args[0])
				if err != nil {
					return err
				}
				var next api.QoS
				if cur.QoS != nil {
					next = *cur.QoS
				}
				if _, err := q.apply(c, &next); err != nil {
					return err
				}
				lu, err := cl.SetQoS(ctx, args[0], next)
				if err != nil {
					return err
				}
				return printLUs(stdout, cf.output, []api.LU{lu}, true)
			})
		},
	}
	q.add(set.Flags())
	return set
}

// qosText is an LU's limits in a line, or "" for none.
func qosText(q *api.QoS) string {
	if q == nil {
		return ""
	}
	var parts []string
	add := func(what string, v int64, size bool) {
		if v == 0 {
			return
		}
		if size {
			parts = append(parts, what+" "+units.Format(v)+"/s")
		} else {
			parts = append(parts, what+" "+strconv.FormatInt(v, 10)+"/s")
		}
	}
	add("reads", q.ReadIOPS, false)
	add("writes", q.WriteIOPS, false)
	add("read bytes", q.ReadBytesPerSecond, true)
	add("write bytes", q.WriteBytesPerSecond, true)
	if len(parts) == 0 {
		return ""
	}
	burst := time.Duration(q.BurstMillis) * time.Millisecond
	if burst == 0 {
		burst = 100 * time.Millisecond
	}
	return strings.Join(parts, ", ") + " (burst " + burst.String() + ")"
}
