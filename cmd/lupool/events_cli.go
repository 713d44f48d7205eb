package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"sort"
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
