// Command lupool is the lupool daemon (`lupool serve`) and its CLI, which
// talks to a daemon's HTTP API (`--api` or LUPOOL_API).
//
//	lupool serve [--data DIR] [--nbd ADDR] [--api ADDR] [--peer ADDR] [--join API_ADDR --join-token TOKEN]
//	lupool lu create NAME --size SIZE [--copies N] [--kind file|memory] [--description TEXT]
//	lupool lu list | show NAME | resize NAME --size SIZE | delete NAME [--force]
//	lupool lu add-copy NAME [--node NODE] | verify NAME [--region SIZE]
//	lupool pool status
//	lupool node list | remove ID
//	lupool cluster join-token [--ttl D] | join-token list | join-token revoke ID | rotate-admin-token
//	lupool attach EXPORT /dev/nbdX [--nbd ADDR]
//
// This package is wiring only: flags and config, start and stop, and the CLI
// calling the API.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

const usage = `lupool — thin, redundant block storage over NBD

Usage:
  lupool serve [flags]                 run a node (see 'lupool serve -h')
  lupool lu create NAME --size SIZE [--copies N] [--kind file|memory] [--description TEXT]
  lupool lu list
  lupool lu show NAME
  lupool lu resize NAME --size SIZE
  lupool lu delete NAME [--force]
  lupool lu add-copy NAME [--node NODE]  add a copy (rebuilt while writes go on)
  lupool lu verify NAME [--region 1M]  compare the in-sync copies by hash; exit 1 if they differ
  lupool pool status
  lupool node list
  lupool node remove ID                take a node out; its certificate stops working
  lupool cluster join-token [--ttl 24h]  print a token a new node joins with
  lupool cluster join-token list | revoke ID
  lupool cluster rotate-admin-token    replace the admin token (rewrites --token-file)
  lupool attach EXPORT /dev/nbdX [--nbd HOST:PORT]

Client commands take --api HOST:PORT (default $LUPOOL_API or 127.0.0.1:10810),
--token-file FILE (default $LUPOOL_TOKEN_FILE, $LUPOOL_TOKEN, or
./lupool-data/admin.token), --ca-file FILE for an https API, and -o table|json.
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

// run executes one command line and returns the process exit code:
// 0 success, 1 failure, 2 bad usage.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	var err error
	switch args[0] {
	case "serve":
		err = serveCommand(ctx, args[1:], stderr)
	case "lu":
		err = luCommand(ctx, args[1:], stdout)
	case "pool":
		err = poolCommand(ctx, args[1:], stdout)
	case "node":
		err = nodeCommand(ctx, args[1:], stdout)
	case "cluster":
		err = clusterCommand(ctx, args[1:], stdout)
	case "attach":
		err = attachCommand(ctx, args[1:], stderr)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		err = usageErrorf("unknown command %q", args[0])
	}
	if err == nil {
		return 0
	}
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	fmt.Fprintln(stderr, "lupool:", err)
	var ue *usageError
	if errors.As(err, &ue) {
		fmt.Fprintln(stderr, "run 'lupool help' for usage")
		return 2
	}
	return 1
}

// usageError is a mistake in the command line itself.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usageErrorf(format string, args ...any) error {
	return &usageError{msg: fmt.Sprintf(format, args...)}
}

// parseInterspersed parses flags that may come before or after positional
// arguments ("lu create NAME --size 1G") and returns the positionals.
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, err
			}
			return nil, &usageError{msg: err.Error()}
		}
		args = fs.Args()
		if len(args) == 0 {
			return positional, nil
		}
		positional = append(positional, args[0])
		args = args[1:]
	}
}
