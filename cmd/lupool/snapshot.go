package main

import (
	"context"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/lupool/lupool/server/api"
)

// newLUSnapshotCommands makes "lu snapshot" and "lu rollback".
func newLUSnapshotCommands(cf *clientFlags, stdout io.Writer) (snapshot, rollback *cobra.Command) {
	snapshot = &cobra.Command{
		Use:   "snapshot NAME SNAP",
		Short: "freeze an LU's content as a read-only snapshot, exported as NAME@SNAP",
		Long: `Freeze an LU's content, in constant time, as the read-only snapshot SNAP: writes
in flight are drained and flushed first, new writes wait meanwhile (on every
copy: all freeze between the same writes). The snapshot is a read-only LU
named NAME@SNAP and exported over NBD under that name, so it can be copied
out (nbdcopy nbd://HOST/NAME@SNAP out.img) while the LU is written. Every
copy of the LU must be in sync. At most 14 snapshots per LU.`,
		Example: "  lupool lu snapshot vm1 before-upgrade\n  nbdcopy nbd://localhost/vm1@before-upgrade vm1.img",
		Args:    exactArgs(2, "lu snapshot needs an LU name and a snapshot name"),
		RunE: func(c *cobra.Command, args []string) error {
			return cf.call(c, 0, func(ctx context.Context, cl *api.Client) error {
				lu, err := cl.SnapshotLU(ctx, args[0], args[1])
				if err != nil {
					return err
				}
				return printLUs(stdout, cf.output, []api.LU{lu}, true)
			})
		},
	}
	var force bool
	rollback = &cobra.Command{
		Use:   "rollback NAME SNAP",
		Short: "make an LU read what its snapshot SNAP holds; refused while clients are attached unless --force",
		Long: `Roll an LU back to its snapshot SNAP, on every copy: what was written since
is dropped. Snapshots taken after SNAP stay. Refused while NBD clients are
attached to the LU, unless --force (their next reads return the snapshot's
content, which a mounted file system does not expect).`,
		Example: "  lupool lu rollback vm1 before-upgrade",
		Args:    exactArgs(2, "lu rollback needs an LU name and a snapshot name"),
		RunE: func(c *cobra.Command, args []string) error {
			return cf.call(c, 0, func(ctx context.Context, cl *api.Client) error {
				lu, err := cl.RollbackLU(ctx, args[0], api.RollbackRequest{Snapshot: args[1], Force: force})
				if err != nil {
					return err
				}
				return printLUs(stdout, cf.output, []api.LU{lu}, true)
			})
		},
	}
	rollback.Flags().BoolVar(&force, "force", false, "roll back even while clients are attached")
	return snapshot, rollback
}

// newSnapshotCommand makes "snapshot list" and "snapshot delete".
func newSnapshotCommand(cf *clientFlags, stdout io.Writer) *cobra.Command {
	list := &cobra.Command{
		Use:     "list NAME",
		Aliases: []string{"ls"},
		Short:   "list an LU's snapshots",
		Args:    exactArgs(1, "snapshot list needs exactly one LU name"),
		RunE: func(c *cobra.Command, args []string) error {
			return cf.call(c, 0, func(ctx context.Context, cl *api.Client) error {
				lus, err := cl.ListSnapshots(ctx, args[0])
				if err != nil {
					return err
				}
				return printLUs(stdout, cf.output, lus, false)
			})
		},
	}
	del := &cobra.Command{
		Use:     "delete NAME SNAP",
		Aliases: []string{"rm"},
		Short:   "delete a snapshot, merging it into the layers that read it",
		Args:    exactArgs(2, "snapshot delete needs an LU name and a snapshot name"),
		RunE: func(c *cobra.Command, args []string) error {
			return cf.call(c, 0, func(ctx context.Context, cl *api.Client) error {
				if err := cl.DeleteSnapshot(ctx, args[0], args[1]); err != nil {
					return err
				}
				name := args[0] + "@" + args[1]
				if cf.output == "json" {
					return printJSON(stdout, map[string]string{"deleted": name})
				}
				fmt.Fprintf(stdout, "deleted %s\n", name)
				return nil
			})
		},
	}
	return newGroupCommand("snapshot", "list and delete LU snapshots (take them with lupool lu snapshot)", "admin", list, del)
}
