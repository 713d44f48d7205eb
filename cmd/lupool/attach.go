package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"

	"github.com/lupool/lupool/server/nbdkernel"
)

// attachCommand attaches an export to a kernel NBD device, as an
// alternative to nbd-client. It blocks until the device is detached.
func attachCommand(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("attach", flag.ContinueOnError)
	fs.SetOutput(stderr)
	def := os.Getenv("LUPOOL_NBD")
	if def == "" {
		def = "127.0.0.1:10809"
	}
	addr := fs.String("nbd", def, "NBD server address HOST:PORT (env LUPOOL_NBD)")
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 2 {
		return usageErrorf("attach needs EXPORT and DEVICE, e.g. lupool attach swap0 /dev/nbd0")
	}
	if err := nbdkernel.CheckAvailable(pos[1]); err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(stderr, nil))
	fmt.Fprintf(stderr, "attaching %s from %s to %s; stop with Ctrl-C\n", pos[0], *addr, pos[1])
	return nbdkernel.Attach(ctx, nbdkernel.Options{Addr: *addr, Export: pos[0], Device: pos[1], Logger: log})
}
