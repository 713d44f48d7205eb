package main

import (
	"io"
	"os"

	"github.com/spf13/cobra"
)

// newServeCommand is `lupool serve`: its flags are also environment
// variables (LUPOOL_<NAME>) and keys of a JSON config file (--config).
func newServeCommand(stderr io.Writer) *cobra.Command {
	c := &cobra.Command{
		Use:   "serve",
		Short: "run a node (every flag is also LUPOOL_<NAME> and a --config key)",
		Long: `Run a lupool node until SIGTERM or Ctrl-C.

Every flag is also an environment variable LUPOOL_<NAME> (LUPOOL_NBD_MAX_CONNS
for --nbd-max-conns) and a key of an optional JSON config file (--config;
nbd_max_conns). Flags win over the environment, which wins over the file.
With no flags at all it runs a single-node pool with data in ./lupool-data.`,
		Example: `  lupool serve
  lupool serve --data ./node2 --nbd 127.0.0.1:20809 --api 127.0.0.1:20810 --peer 127.0.0.1:20811 \
      --join 127.0.0.1:10810 --join-token "$(lupool cluster join-token)"`,
		GroupID: "daemon",
		Args:    exactArgs(0, "serve takes no arguments"),
	}
	sf := addServeFlags(c.Flags(), os.Getenv)
	c.RunE = func(c *cobra.Command, _ []string) error {
		cfg, err := sf.resolve(os.Getenv)
		if err != nil {
			return err
		}
		return serveCommand(c.Context(), cfg, stderr)
	}
	return c
}
