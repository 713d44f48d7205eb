package main

import (
	"context"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/lupool/lupool/internal/units"
	"github.com/lupool/lupool/replication/ec"
	"github.com/lupool/lupool/server/api"
)

// ecTimeout bounds convert, verify and rebuild, which read or write a
// whole image.
const ecTimeout = 6 * time.Hour

// parseECFlag checks --ec K+M; empty means none.
func parseECFlag(s string) (ec.Geometry, error) {
	if s == "" {
		return ec.Geometry{}, nil
	}
	g, err := ec.ParseGeometry(s)
	if err != nil {
		return ec.Geometry{}, usageErrorf("--ec %q: give data+parity shards per stripe, e.g. --ec 2+1 (K 1 to %d, M 1 to %d)", s, ec.DataShardsMax, ec.ParityShardsMax)
	}
	return g, nil
}

// checkECNodes refuses --ec K+M on a pool of fewer than K+M nodes before
// anything is created.
func checkECNodes(ctx context.Context, cl *api.Client, g ec.Geometry) error {
	nodes, err := cl.Nodes(ctx)
	if err != nil {
		return err
	}
	if len(nodes) < g.Shards() {
		return usageErrorf("--ec %s puts each of %d shards on its own node; the pool has %d node(s)", g, g.Shards(), len(nodes))
	}
	return nil
}

// newImageECCommands are `lupool image convert`, `verify` and `rebuild`.
func newImageECCommands(cf *clientFlags, stdout io.Writer) []*cobra.Command {
	call := func(c *cobra.Command, fn func(ctx context.Context, cl *api.Client) error) error {
		return cf.call(c, ecTimeout, fn)
	}
	var ecFlag string
	convert := &cobra.Command{
		Use:   "convert NAME --ec K+M",
		Short: "erasure-code a ready image: K data + M parity shards per stripe, each on its own node",
		Long: `Convert a ready (read-only) image to erasure coding: its disks are cut
into stripes of K data shards and M parity shards of 64 KiB, each shard of
a stripe on its own node, every chunk checksummed. Any K of the K+M nodes
serve every read; the mirrored disks are dropped once the shards are
written and read back. Needs at least K+M nodes.`,
		Example: "  lupool image convert debian12 --ec 2+1",
		Args:    exactArgs(1, "image convert needs exactly one image name"),
		RunE: func(c *cobra.Command, args []string) error {
			g, err := parseECFlag(ecFlag)
			if err != nil {
				return err
			}
			if ecFlag == "" {
				return usageErrorf("image convert needs --ec K+M, e.g. --ec 2+1")
			}
			return call(c, func(ctx context.Context, cl *api.Client) error {
				if err := checkECNodes(ctx, cl, g); err != nil {
					return err
				}
				img, err := cl.ConvertImage(ctx, args[0], api.ConvertImageRequest{K: g.K, M: g.M})
				if err != nil {
					return err
				}
				return printImages(stdout, cf.output, []api.Image{img}, true)
			})
		},
	}
	convert.Flags().StringVar(&ecFlag, "ec", "", "data+parity shards per stripe, e.g. 2+1")
	verify := &cobra.Command{
		Use:   "verify NAME",
		Short: "check every shard chunk of an erasure-coded image against its checksum, and every stripe's parity",
		Args:  exactArgs(1, "image verify needs exactly one image name"),
		RunE: func(c *cobra.Command, args []string) error {
			return call(c, func(ctx context.Context, cl *api.Client) error {
				r, err := cl.VerifyImage(ctx, args[0])
				if err != nil {
					return err
				}
				if err := printECVerify(stdout, cf.output, r); err != nil {
					return err
				}
				if !r.Clean {
					return fmt.Errorf("image %s has bad shards; repair them with lupool image rebuild %s", args[0], args[0])
				}
				return nil
			})
		},
	}
	var from, to string
	rebuild := &cobra.Command{
		Use:   "rebuild NAME [--from NODE --to NODE]",
		Short: "rewrite an erasure-coded image's bad or lost shards from the others",
		Long: `Rebuild an erasure-coded image's shards from the others: bad chunks are
rewritten in place, a shard whose superblock is gone or bad is rewritten
whole on its node. With --from and --to, every shard on the lost node
--from is rebuilt on node --to (which holds no other shard of the disk)
and moved there.`,
		Example: "  lupool image rebuild debian12\n  lupool image rebuild debian12 --from n2 --to n4",
		Args:    exactArgs(1, "image rebuild needs exactly one image name"),
		RunE: func(c *cobra.Command, args []string) error {
			if (from == "") != (to == "") {
				return usageErrorf("give both --from NODE (the lost one) and --to NODE, or neither")
			}
			return cf.call(c, ecTimeout, func(ctx context.Context, cl *api.Client) error {
				r, err := cl.RebuildImage(ctx, args[0], api.RebuildImageRequest{From: from, To: to})
				if err != nil {
					return err
				}
				if cf.output == "json" {
					return printJSON(stdout, r)
				}
				for _, d := range r.Disks {
					fmt.Fprintf(stdout, "%s: %d shard(s) rewritten whole %v, %d chunk(s) repaired, moved %v\n", d.LU, len(d.RebuiltShards), d.RebuiltShards, d.RepairedChunks, d.MovedShards)
				}
				return nil
			})
		},
	}
	rebuild.Flags().StringVar(&from, "from", "", "the lost node whose shards are rebuilt elsewhere")
	rebuild.Flags().StringVar(&to, "to", "", "the node that takes them")
	return []*cobra.Command{convert, verify, rebuild}
}

func printECVerify(w io.Writer, output string, r api.ECVerifyReport) error {
	if output == "json" {
		return printJSON(w, r)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "DISK\tSTRIPES\tSTATE\tFAULTS\tPARITY MISMATCHES")
	for _, d := range r.Disks {
		state := "clean"
		if !d.Clean {
			state = "BAD"
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%d\t%d\n", d.LU, d.Stripes, state, d.FaultCount, len(d.ParityMismatches))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, d := range r.Disks {
		for _, f := range d.Faults {
			where := fmt.Sprintf("stripe %d", f.Stripe)
			if f.Stripe < 0 {
				where = "whole shard"
			}
			fmt.Fprintf(w, "%s: shard %d (%s on %s), %s: %s\n", d.LU, f.Shard, f.ShardLU, f.Node, where, f.Error)
		}
	}
	return nil
}

// printImageEC prints an image's erasure-coded layout under image show.
func printImageEC(w io.Writer, l *api.ImageEC) {
	if l == nil {
		return
	}
	fmt.Fprintf(w, "\nerasure-coded %d+%d (%s): usable %s, raw %s (%.2fx)\n", l.K, l.M, l.State,
		units.Format(l.UsableBytes), units.Format(l.RawBytes), float64(l.RawBytes)/float64(max(l.UsableBytes, 1)))
	for _, d := range l.Disks {
		for _, s := range d.Shards {
			kind := "data"
			if s.Index >= l.K {
				kind = "parity"
			}
			fmt.Fprintf(w, "  %s shard %d (%s): %s on %s\n", d.LU, s.Index, kind, s.LU, s.Node)
		}
	}
}
