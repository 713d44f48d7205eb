package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/lupool/lupool/internal/units"
	"github.com/lupool/lupool/server/api"
)

// newFFDCCommand is `lupool ffdc`: failure data capture bundles.
func newFFDCCommand(cf *clientFlags, stdout io.Writer) *cobra.Command {
	var allNodes bool
	var reason string
	collect := &cobra.Command{
		Use:   "collect",
		Short: "capture a failure data bundle now (logs, goroutines, metrics, metadata, config, version, raft state)",
		Long: `Builds a bundle (tar.gz) on the primary, with every member's parts when
--all-nodes is given, and stores it in the replicated FFDC repository: every
node lists and serves it, and an FFDCCaptured event announces it.`,
		Args: exactArgs(0, "ffdc collect takes no arguments"),
		RunE: func(c *cobra.Command, _ []string) error {
			return cf.call(c, 2*time.Minute, func(ctx context.Context, cl *api.Client) error {
				info, err := cl.CollectFFDC(ctx, api.FFDCRequest{AllNodes: allNodes, Reason: reason})
				if err != nil {
					return err
				}
				if cf.output == "json" {
					return printJSON(stdout, info)
				}
				fmt.Fprintf(stdout, "bundle %s (%s, nodes %s, correlation id %s)\n", info.ID, units.Format(info.Bytes),
					strings.Join(info.Nodes, ","), info.CorrelationID)
				return nil
			})
		},
	}
	collect.Flags().BoolVar(&allNodes, "all-nodes", false, "gather every member's parts into the bundle")
	collect.Flags().StringVar(&reason, "reason", "", "why (kept in the bundle's manifest)")
	list := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "the bundles in the FFDC repository",
		Args:    exactArgs(0, "ffdc list takes no arguments"),
		RunE: func(c *cobra.Command, _ []string) error {
			get := func(cl *api.Client, ctx context.Context) ([]api.FFDCInfo, error) {
				l, err := cl.ListFFDC(ctx)
				if l == nil {
					l = []api.FFDCInfo{}
				}
				return l, err
			}
			return show(cf, c, stdout, get, printFFDCList)
		},
	}
	get := &cobra.Command{
		Use:   "get ID -o FILE",
		Short: "download a bundle (tar.gz) to FILE (- for stdout)",
		Args:  exactArgs(1, "ffdc get needs one bundle id"),
		// -o names the file here, not the output format.
		PersistentPreRunE: func(*cobra.Command, []string) error { return nil },
		RunE: func(c *cobra.Command, args []string) error {
			path := cf.output
			if !c.Flags().Changed("output") || path == "" || path == "table" || path == "json" {
				return usageErrorf("ffdc get %s needs -o FILE (or -o - for stdout)", args[0])
			}
			return cf.call(c, 2*time.Minute, func(ctx context.Context, cl *api.Client) error {
				if path == "-" {
					return cl.GetFFDC(ctx, args[0], stdout)
				}
				tmp := path + ".part"
				f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
				if err != nil {
					return err
				}
				err = cl.GetFFDC(ctx, args[0], f)
				if cerr := f.Close(); err == nil {
					err = cerr
				}
				if err == nil {
					err = os.Rename(tmp, path)
				}
				if err != nil {
					_ = os.Remove(tmp)
				}
				return err
			})
		},
	}
	return newGroupCommand("ffdc", "failure data capture bundles, kept in the replicated repository", "admin", collect, list, get)
}

func printFFDCList(w io.Writer, list []api.FFDCInfo) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tCREATED\tTRIGGER\tNODES\tSIZE\tCORRELATION\tREASON")
	for _, b := range list {
		nodes := strings.Join(b.Nodes, ",")
		if !b.Complete {
			nodes += " (incomplete)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", b.ID, b.CreatedAt.UTC().Format(time.RFC3339), b.Trigger, nodes,
			units.Format(b.Bytes), b.CorrelationID, b.Reason)
	}
	return tw.Flush()
}
