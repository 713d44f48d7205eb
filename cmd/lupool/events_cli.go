package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strings"
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
	return newGroupCommand("events", "the pool's event log", "admin", watch)
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
