package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/lupool/lupool/server/api"
)

// newLUMoveCommand is `lupool lu move NAME --to NODE [--wait]`.
func newLUMoveCommand(cf *clientFlags, stdout io.Writer) *cobra.Command {
	var to string
	var wait bool
	c := &cobra.Command{
		Use:   "move NAME --to NODE [--wait]",
		Short: "hand the LU's writer role to a node holding an in-sync copy, without a client error",
		Long: `Hand the writer role of an LU to NODE, which must hold an in-sync copy.
Clients stay connected: the writer holds new writes for a moment, drains
those in flight and hands over; what it held runs on the new writer. If
the move cannot finish (a node dies, a copy falls out of sync) it is rolled
back and the old writer goes on. --wait returns once the move ended and
exits 1 if it was rolled back. lupool move list shows moves in progress.`,
		Args:              exactArgs(1, "lu move needs exactly one LU name"),
		ValidArgsFunction: cf.completeLUNames,
		RunE: func(c *cobra.Command, args []string) error {
			if to == "" {
				return usageErrorf("lu move needs --to NODE (a node holding an in-sync copy; see lupool lu show %s)", args[0])
			}
			return cf.call(c, luTimeout, func(ctx context.Context, cl *api.Client) error {
				res, err := cl.MoveLU(ctx, args[0], api.MoveRequest{To: to, Wait: wait})
				if err != nil {
					return err
				}
				if cf.output == "json" {
					if err := printJSON(stdout, res); err != nil {
						return err
					}
				} else {
					switch res.Outcome {
					case "done":
						fmt.Fprintf(stdout, "moved %s: writer %s → %s in %.3f s\n", res.LU, res.From, res.To, res.Seconds)
					default:
						fmt.Fprintf(stdout, "moving %s: writer %s → %s (see lupool move list)\n", res.LU, res.From, res.To)
					}
				}
				if res.Outcome == "rolled-back" {
					return fmt.Errorf("move of %s from %s to %s rolled back: %s; %s writes it", res.LU, res.From, res.To, res.Reason, res.Writer)
				}
				return nil
			})
		},
	}
	c.Flags().StringVar(&to, "to", "", "the node to hand the writer role to")
	c.Flags().BoolVar(&wait, "wait", false, "wait until the move ended; exit 1 if it was rolled back")
	return c
}

// newMoveCommand is `lupool move list`.
func newMoveCommand(cf *clientFlags, stdout io.Writer) *cobra.Command {
	list := &cobra.Command{
		Use:   "list",
		Short: "planned writer moves in progress, their state and monitors",
		Args:  exactArgs(0, "move list takes no arguments"),
		RunE: func(c *cobra.Command, _ []string) error {
			return show(cf, c, stdout, (*api.Client).ListMoves, printMoves)
		},
	}
	return newGroupCommand("move", "planned writer moves in progress (start one with lupool lu move)", "admin", list)
}

func printMoves(w io.Writer, moves []api.Move) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "LU\tFROM\tTO\tSTATE\tAGE\tMONITORS")
	for _, m := range moves {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", m.LU, m.From, m.To, m.State,
			(time.Duration(m.AgeSeconds * float64(time.Second))).Round(time.Millisecond), monitorsText(m.Monitors))
	}
	return tw.Flush()
}

// monitorsText is "source n1: quiescing, target n2: ready, primary n3: watching".
func monitorsText(mons []api.MoveMonitor) string {
	parts := make([]string, 0, len(mons))
	for _, mon := range mons {
		parts = append(parts, fmt.Sprintf("%s %s: %s", mon.Role, mon.Node, mon.Step))
	}
	return strings.Join(parts, ", ")
}
