package main

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/lupool/lupool/internal/units"
	"github.com/lupool/lupool/server/api"
)

func newStatusCommand(cf *clientFlags, stdout io.Writer) *cobra.Command {
	return &cobra.Command{
		Use:   "status",
		Short: "one screen: nodes and their state, the primary, LUs by health, pool usage",
		Long: `One screen for an operator: every node and whether it answers, the primary
(the metadata leader, which runs placement and failure handling), LUs by
health (healthy, resyncing, degraded) with the ones that are not healthy,
and each node's pool usage against its thresholds.`,
		GroupID: "admin",
		Args:    exactArgs(0, "status takes no arguments"),
		RunE: func(c *cobra.Command, _ []string) error {
			return show(cf, c, stdout, (*api.Client).Status, printStatus)
		},
	}
}

func printStatus(w io.Writer, st api.Status) error {
	primary := st.Primary
	if primary == "" {
		primary = "none (no metadata quorum: changes are refused)"
	}
	fmt.Fprintf(w, "primary: %s    (answered by %s)\n\n", primary, st.Node)

	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tROLE\tSTATE\tPOOL\tUSED\tCAPACITY\tALLOCATED\tPROVISIONED\tNBD")
	for _, n := range st.Nodes {
		level, used, capacity, allocated, provisioned := "-", "-", "-", "-", "-"
		if p := n.Pool; p != nil {
			level, used = p.Level, usedPercent(p.CapacityBytes, p.FreeBytes)
			capacity, allocated, provisioned = units.Format(p.CapacityBytes), units.Format(p.AllocatedBytes), units.Format(p.ProvisionedBytes)
			if t := p.Thresholds; t != nil {
				used += fmt.Sprintf(" (warn %g%%, critical %g%%)", t.WarnPercent, t.CriticalPercent)
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", n.ID, nodeRole(n.Node), n.State, level, used, capacity, allocated, provisioned, n.NBDAddr)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, n := range st.Nodes {
		if n.Error != "" {
			fmt.Fprintf(w, "%s did not answer: %s\n", n.ID, n.Error)
		}
	}

	p := st.Pool
	fmt.Fprintf(w, "\npool: %s of %s used, %s allocated to LUs, %s provisioned, level %s (%d of %d nodes counted)\n",
		usedPercent(p.CapacityBytes, p.FreeBytes), units.Format(p.CapacityBytes), units.Format(p.AllocatedBytes),
		units.Format(p.ProvisionedBytes), p.Level, p.NodesCounted, len(st.Nodes))

	l := st.LUs
	fmt.Fprintf(w, "LUs: %d total, %d healthy, %d resyncing, %d degraded\n", l.Total, l.Healthy, l.Resyncing, l.Degraded)
	if len(l.NotHealthy) == 0 {
		return nil
	}
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "\nLU\tHEALTH\tWRITER\tCOPIES")
	for _, h := range l.NotHealthy {
		copies := make([]string, 0, len(h.Replicas))
		for _, r := range h.Replicas {
			copies = append(copies, r.Node+" "+r.State)
		}
		if missing := h.Copies - len(h.Replicas); missing > 0 {
			copies = append(copies, fmt.Sprintf("%d missing", missing))
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", h.Name, h.Health, h.Writer, strings.Join(copies, ", "))
	}
	return tw.Flush()
}

// usedPercent is the share of capacity in use, "37%".
func usedPercent(capacity, free int64) string {
	if capacity <= 0 {
		return "-"
	}
	return fmt.Sprintf("%.0f%%", 100*float64(capacity-free)/float64(capacity))
}
