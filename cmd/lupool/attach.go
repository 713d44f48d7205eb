package main

import (
	"fmt"
	"io"
	"log/slog"

	"github.com/spf13/cobra"

	"github.com/lupool/lupool/server/nbdkernel"
)

// newAttachCommand attaches an export to a kernel NBD device, as an
// alternative to nbd-client. It blocks until the device is detached.
func newAttachCommand(stderr io.Writer) *cobra.Command {
	var addr string
	c := &cobra.Command{
		Use:   "attach EXPORT /dev/nbdX",
		Short: "attach an LU to a kernel NBD device (like nbd-client); blocks until detached",
		Long: `Attach an export to a kernel NBD device, as nbd-client does, and stay until
the device is detached (Ctrl-C detaches). Needs the nbd kernel module
(modprobe nbd) and root.`,
		Example: "  lupool attach swap0 /dev/nbd0 && mkswap /dev/nbd0 && swapon /dev/nbd0",
		GroupID: "host",
		Args:    exactArgs(2, "attach needs EXPORT and DEVICE, e.g. lupool attach swap0 /dev/nbd0"),
		RunE: func(c *cobra.Command, args []string) error {
			if err := nbdkernel.CheckAvailable(args[1]); err != nil {
				return err
			}
			log := slog.New(slog.NewTextHandler(stderr, nil))
			fmt.Fprintf(stderr, "attaching %s from %s to %s; stop with Ctrl-C\n", args[0], addr, args[1])
			return nbdkernel.Attach(c.Context(), nbdkernel.Options{Addr: addr, Export: args[0], Device: args[1], Logger: log})
		},
	}
	c.Flags().StringVar(&addr, "nbd", envOr("LUPOOL_NBD", "127.0.0.1:10809"), "NBD server address HOST:PORT (env LUPOOL_NBD)")
	return c
}
