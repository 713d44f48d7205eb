package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/lupool/lupool/server/api"
)

// newEventsCommand is `lupool events`: the pool's event log.
func newEventsCommand(cf *clientFlags, stdout io.Writer) *cobra.Command {
	var after uint64
	var kinds string
	var tail int
	var follow bool
	watch := &cobra.Command{
		Use:   "watch",
		Short: "stream the pool's events (LU changes, copy states, resyncs, pool alerts, elections)",
		Long: `Streams the event log, oldest first, and keeps following it until Ctrl-C.
Without --after it starts with the latest --tail events; with --after SEQ
it resumes exactly after event SEQ. -o json prints one JSON object per line
(seq, time, kind, lu, node, by, details).`,
		Args: exactArgs(0, "events watch takes no arguments"),
		RunE: func(c *cobra.Command, _ []string) error {
			var from *uint64
			if c.Flags().Changed("after") {
				from = &after
			}
			return cf.call(c, 0, func(ctx context.Context, cl *api.Client) error {
				enc := json.NewEncoder(stdout)
				return cl.WatchEvents(ctx, from, tail, kinds, follow, func(ev api.Event) error {
					if cf.output == "json" {
						return enc.Encode(ev)
					}
					_, err := fmt.Fprintln(stdout, formatEvent(ev))
					return err
				})
			})
		},
	}
	watch.Flags().Uint64Var(&after, "after", 0, "resume right after this event sequence number")
	watch.Flags().StringVar(&kinds, "kind", "", "only these event kinds (comma-separated, e.g. LUCreated,CopyStateChanged)")
	watch.Flags().IntVar(&tail, "tail", 10, "without --after: start with this many of the latest events")
	watch.Flags().BoolVar(&follow, "follow", true, "keep streaming new events (false: print the stored ones and exit)")
	var subKinds, subTo, subID string
	subscribe := &cobra.Command{
		Use:   "subscribe",
		Short: "register a caller: the primary sends it every event of its kinds, at least once, in order",
		Long: `Registers a caller with the pool. The primary delivers every event of the
given kinds (all kinds without --kind), in seq order and at least once, and
records the caller's acknowledged position in the metadata, so a new primary
resumes there. tcp://HOST:PORT: each event is one JSON line; the caller
acknowledges by writing back the seq of the last event it took, one per line.
http(s)://URL: each batch is POSTed as JSON lines; a 2xx answer acknowledges it.`,
		Args: exactArgs(0, "events subscribe takes no arguments; give --to"),
		RunE: func(c *cobra.Command, _ []string) error {
			if subTo == "" {
				return usageErrorf("events subscribe needs --to tcp://HOST:PORT or an http(s) URL")
			}
			req := api.SubscribeRequest{ID: subID, To: subTo}
			for k := range api.ParseKinds(subKinds) {
				req.Kinds = append(req.Kinds, k)
			}
			sort.Strings(req.Kinds)
			return cf.call(c, 0, func(ctx context.Context, cl *api.Client) error {
				s, err := cl.AddSubscriber(ctx, req)
				if err != nil {
					return err
				}
				if cf.output == "json" {
					return printJSON(stdout, s)
				}
				fmt.Fprintf(stdout, "subscriber %s: events after %d go to %s\n", s.ID, s.AckedSeq, s.To)
				return nil
			})
		},
	}
	subscribe.Flags().StringVar(&subKinds, "kind", "", "event kinds to deliver (comma-separated; default every kind)")
	subscribe.Flags().StringVar(&subTo, "to", "", "where: tcp://HOST:PORT, http://HOST:PORT/PATH or https://...")
	subscribe.Flags().StringVar(&subID, "id", "", "the subscriber's name (default: made up)")
	unsubscribe := &cobra.Command{
		Use:   "unsubscribe ID",
		Short: "drop a registered caller",
		Args:  exactArgs(1, "events unsubscribe needs one subscriber id"),
		RunE: func(c *cobra.Command, args []string) error {
			return cf.call(c, 0, func(ctx context.Context, cl *api.Client) error {
				if err := cl.RemoveSubscriber(ctx, args[0]); err != nil {
					return err
				}
				fmt.Fprintf(stdout, "subscriber %s removed\n", args[0])
				return nil
			})
		},
	}
	subscribers := &cobra.Command{
		Use:   "subscribers",
		Short: "the registered callers, their positions and how delivery goes",
		Args:  exactArgs(0, "events subscribers takes no arguments"),
		RunE: func(c *cobra.Command, _ []string) error {
			return show(cf, c, stdout, (*api.Client).Subscribers, printSubscribers)
		},
	}
	return newGroupCommand("events", "the pool's event log and its registered callers", "admin", watch, subscribe, unsubscribe, subscribers)
}

func printSubscribers(w io.Writer, subs []api.Subscriber) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tTO\tKINDS\tACKED\tSTATE\tDELIVERED\tFAILURES\tLAST ERROR")
	for _, s := range subs {
		kinds := strings.Join(s.Kinds, ",")
		if kinds == "" {
			kinds = "all"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%d\t%d\t%s\n", s.ID, s.To, kinds, s.AckedSeq, s.State, s.Delivered, s.Failures, s.LastError)
	}
	return tw.Flush()
}

// formatEvent is one event as a line: seq, time, kind, lu, node, details.
func formatEvent(ev api.Event) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d  %s  %s", ev.Seq, ev.Time.UTC().Format(time.RFC3339), ev.Kind)
	if ev.LU != "" {
		fmt.Fprintf(&b, "  lu=%s", ev.LU)
	}
	if ev.Node != "" {
		fmt.Fprintf(&b, "  node=%s", ev.Node)
	}
	keys := make([]string, 0, len(ev.Details))
	for k := range ev.Details {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(&b, "  %s=%s", k, ev.Details[k])
	}
	return b.String()
}

// newPoolAlertCommand is `lupool pool alert`: the pool's alert thresholds.
func newPoolAlertCommand(cf *clientFlags, stdout io.Writer) *cobra.Command {
	var threshold, critical float64
	var overcommit string
	set := &cobra.Command{
		Use:   "set",
		Short: "set the usage threshold (warn), the critical level and the overcommit alert of every node's pool",
		Long: `Stores the pool's alert thresholds in the metadata. Every node then reports a
PoolThreshold event when its pool's usage crosses --threshold (warn) or
--critical, or falls back below (ok), and OvercommitApproached when its
provisioned LU bytes reach --overcommit of its capacity (300% or 3: three
times the capacity; 0 turns it off). Flags not given keep their values.`,
		Args: exactArgs(0, "pool alert set takes no arguments; give --threshold, --critical or --overcommit"),
		RunE: func(c *cobra.Command, _ []string) error {
			return cf.call(c, 0, func(ctx context.Context, cl *api.Client) error {
				a, err := cl.PoolAlerts(ctx)
				if err != nil {
					return err
				}
				if c.Flags().Changed("threshold") {
					a.ThresholdPercent = threshold
				}
				if c.Flags().Changed("critical") {
					a.CriticalPercent = critical
				}
				if a.CriticalPercent < a.ThresholdPercent {
					a.CriticalPercent = min(100, a.ThresholdPercent)
				}
				if c.Flags().Changed("overcommit") {
					if a.OvercommitPercent, err = parsePercentOrRatio(overcommit); err != nil {
						return usageErrorf("--overcommit %q: %v", overcommit, err)
					}
				}
				if a, err = cl.SetPoolAlerts(ctx, a); err != nil {
					return err
				}
				return printAlerts(stdout, cf.output, a)
			})
		},
	}
	set.Flags().Float64Var(&threshold, "threshold", 0, "usage (percent of capacity) from which a node's pool warns")
	set.Flags().Float64Var(&critical, "critical", 0, "usage (percent of capacity) from which a node's pool is critical")
	set.Flags().StringVar(&overcommit, "overcommit", "", "provisioned bytes over capacity that raise an alert: 300% or 3 (0: none)")
	show := &cobra.Command{
		Use:   "show",
		Short: "the pool's alert thresholds",
		Args:  exactArgs(0, "pool alert show takes no arguments"),
		RunE: func(c *cobra.Command, _ []string) error {
			return cf.call(c, 0, func(ctx context.Context, cl *api.Client) error {
				a, err := cl.PoolAlerts(ctx)
				if err != nil {
					return err
				}
				return printAlerts(stdout, cf.output, a)
			})
		},
	}
	return newGroupCommand("alert", "the pool's alert thresholds (events when crossed)", "", set, show)
}

// parsePercentOrRatio reads "300%" as 300 and "3" as 300 (a ratio).
func parsePercentOrRatio(s string) (float64, error) {
	s = strings.TrimSpace(s)
	if p, ok := strings.CutSuffix(s, "%"); ok {
		f, err := strconv.ParseFloat(p, 64)
		if err != nil || f < 0 {
			return 0, fmt.Errorf("want a percentage such as 300%%")
		}
		return f, nil
	}
	f, err := strconv.ParseFloat(s, 64)
	if err != nil || f < 0 {
		return 0, fmt.Errorf("want a percentage such as 300%% or a ratio such as 3")
	}
	return 100 * f, nil
}

func printAlerts(w io.Writer, output string, a api.PoolAlerts) error {
	if output == "json" {
		return printJSON(w, a)
	}
	over := "off"
	if a.OvercommitPercent > 0 {
		over = strconv.FormatFloat(a.OvercommitPercent, 'f', -1, 64) + "% of capacity provisioned"
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "threshold (warn)\t%g%% used\n", a.ThresholdPercent)
	fmt.Fprintf(tw, "critical\t%g%% used\n", a.CriticalPercent)
	fmt.Fprintf(tw, "overcommit alert\t%s\n", over)
	return tw.Flush()
}
