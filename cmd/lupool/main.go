// Command lupool is the lupool daemon (`lupool serve`) and its CLI, which
// talks to a daemon's HTTP API (`--api` or LUPOOL_API).
//
//	lupool serve [--data DIR] [--nbd ADDR] [--api ADDR] [--peer ADDR] [--join API_ADDR --join-token TOKEN]
//	lupool status
//	lupool lu create NAME --size SIZE [--copies N] [--kind file|memory] [--description TEXT] [--iops-limit N] [--bps-limit SIZE] ...
//	lupool lu list | show NAME | resize NAME --size SIZE | set NAME --iops-limit N ... | delete NAME [--force]
//	lupool lu add-copy NAME [--node NODE] | verify NAME [--region SIZE] | scrub NAME
//	lupool pool status
//	lupool node list | remove ID
//	lupool cluster join-token [--ttl D] | join-token list | join-token revoke ID | rotate-admin-token
//	lupool attach EXPORT /dev/nbdX [--nbd ADDR]
//	lupool version | completion bash|zsh|fish|powershell
//
// The command line is spf13/cobra (global flags before or after the
// subcommand, help on every command, shell completion, suggestions for
// mistyped commands). This package is wiring only: flags and config, start
// and stop, and the CLI calling the API.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"

	"github.com/spf13/cobra"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

// Exit codes: the same for every command.
const (
	exitOK     = 0 // done
	exitFailed = 1 // refused or failed
	exitUsage  = 2 // the command line is wrong
)

// run executes one command line and returns the process exit code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	root := newRootCommand(stdout, stderr)
	root.SetArgs(args)
	cmd, err := root.ExecuteContextC(ctx)
	if err == nil {
		return exitOK
	}
	if errors.Is(err, errUsageShown) {
		return exitUsage
	}
	fmt.Fprintln(stderr, "lupool:", err)
	var ue *usageError
	if errors.As(err, &ue) {
		path := "lupool"
		if cmd != nil {
			path = cmd.CommandPath()
		}
		fmt.Fprintf(stderr, "run '%s --help' for usage\n", path)
		return exitUsage
	}
	return exitFailed
}

// usageError is a mistake in the command line itself (exit code 2).
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usageErrorf(format string, args ...any) error {
	return &usageError{msg: fmt.Sprintf(format, args...)}
}

// errUsageShown is returned after the usage was printed for a bare
// `lupool`: exit 2 with nothing more to say.
var errUsageShown = errors.New("usage shown")

// newRootCommand builds the whole command tree. Every command writes to
// stdout and stderr given here; nothing is kept outside the tree.
func newRootCommand(stdout, stderr io.Writer) *cobra.Command {
	cf := &clientFlags{}
	root := &cobra.Command{
		Use:   "lupool",
		Short: "thin, redundant block storage over NBD",
		Long: `lupool — thin, redundant block storage over NBD.

Run a node with 'lupool serve'; every other command talks to a node's API
(--api, default $LUPOOL_API or ` + defaultAPI + `) with the cluster's admin token
(--token-file, default $LUPOOL_TOKEN_FILE, $LUPOOL_TOKEN, or
` + defaultTokenFile + `). Global flags go before or after the subcommand.
Exit codes: 0 done, 1 refused or failed, 2 the command line is wrong.`,
		SilenceErrors: true,
		SilenceUsage:  true,
		// A bare `lupool` prints the usage on stderr and exits 2;
		// anything else unknown gets suggestions from the whole tree.
		Args: func(c *cobra.Command, args []string) error {
			if len(args) == 0 {
				return nil
			}
			return unknownCommand(c, args[0])
		},
		RunE: func(c *cobra.Command, _ []string) error {
			c.SetOut(stderr)
			_ = c.Usage()
			return errUsageShown
		},
		// -o is checked before any command runs, so a typo costs nothing.
		PersistentPreRunE: func(*cobra.Command, []string) error {
			if cf.output != "table" && cf.output != "json" {
				return usageErrorf("-o %q: use table or json", cf.output)
			}
			return nil
		},
		Version: readBuildVersion().String(),
	}
	root.SetVersionTemplate("{{.Version}}\n")
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error {
		return &usageError{msg: err.Error()}
	})
	cf.register(root)
	root.AddGroup(&cobra.Group{ID: "daemon", Title: "Running a node:"},
		&cobra.Group{ID: "admin", Title: "Managing the pool:"},
		&cobra.Group{ID: "host", Title: "On a host that uses LUs:"})
	root.AddCommand(
		newServeCommand(stderr),
		newStatusCommand(cf, stdout),
		newLUCommand(cf, stdout, stderr),
		newImageCommand(cf, stdout, stderr),
		newSnapshotCommand(cf, stdout),
		newPoolCommand(cf, stdout),
		newMoveCommand(cf, stdout),
		newNodeCommand(cf, stdout),
		newEventsCommand(cf, stdout),
		newFFDCCommand(cf, stdout),
		newClusterCommand(cf, stdout, stderr),
		newAttachCommand(cf, stderr),
		newPagingCommand(cf, stdout, stderr),
		newVersionCommand(cf, stdout),
	)
	root.SetHelpCommandGroupID("admin")
	root.SetCompletionCommandGroupID("admin")
	// cobra's own completion command, made now so that it refuses a shell
	// it does not know like every other group.
	root.InitDefaultCompletionCmd()
	if c, _, err := root.Find([]string{"completion"}); err == nil && c != root {
		refuseWithoutSubcommand(c)
	}
	return root
}

// newGroupCommand is a command that only holds subcommands: without one it
// is a usage error that lists them, and a mistyped one gets suggestions.
func newGroupCommand(use, short, groupID string, subs ...*cobra.Command) *cobra.Command {
	g := &cobra.Command{
		Use:     use,
		Short:   short,
		GroupID: groupID,
	}
	g.AddCommand(subs...)
	refuseWithoutSubcommand(g)
	return g
}

// refuseWithoutSubcommand makes g, a command that only holds subcommands,
// a usage error without one (listing them) or with a mistyped one
// (suggesting the nearest).
func refuseWithoutSubcommand(g *cobra.Command) {
	g.Args = func(c *cobra.Command, args []string) error {
		if len(args) == 0 {
			return usageErrorf("%s needs a subcommand: %s", c.Name(), subcommandList(c))
		}
		return unknownCommand(c, args[0])
	}
	g.RunE = func(*cobra.Command, []string) error { return nil } // Args always refuses
}

// subcommandList names c's visible subcommands: "create, list or show".
func subcommandList(c *cobra.Command) string {
	var names []string
	for _, s := range c.Commands() {
		if s.IsAvailableCommand() {
			names = append(names, s.Name())
		}
	}
	if len(names) < 2 {
		return strings.Join(names, "")
	}
	return strings.Join(names[:len(names)-1], ", ") + " or " + names[len(names)-1]
}

// unknownCommand is the usage error for a word that names no subcommand
// of c, with the commands it may have meant, searched in the whole tree
// below c ("lupool lsit" suggests "lupool lu list").
func unknownCommand(c *cobra.Command, word string) error {
	what := "command"
	if c.HasParent() {
		what = strings.TrimPrefix(c.CommandPath(), c.Root().Name()+" ") + " subcommand"
	}
	msg := fmt.Sprintf("unknown %s %q: use %s", what, word, subcommandList(c))
	if s := suggest(c, word); len(s) > 0 {
		msg += "\n\nDid you mean this?\n\t" + strings.Join(s, "\n\t")
	}
	return &usageError{msg: msg}
}

// suggest returns the command paths below c whose name is close to word
// (cobra's Levenshtein rule, distance 2, or a prefix), nearest first.
func suggest(c *cobra.Command, word string) []string {
	type hit struct {
		path  string
		depth int
	}
	var hits []hit
	var walk func(*cobra.Command, int)
	walk = func(p *cobra.Command, depth int) {
		for _, s := range p.Commands() {
			if !s.IsAvailableCommand() {
				continue
			}
			if close := closeWord(word, s.Name()); close {
				hits = append(hits, hit{s.CommandPath(), depth})
			}
			walk(s, depth+1)
		}
	}
	walk(c, 0)
	sort.SliceStable(hits, func(i, j int) bool { return hits[i].depth < hits[j].depth })
	out := make([]string, 0, len(hits))
	for _, h := range hits {
		out = append(out, h.path)
	}
	return out
}

// closeWord is cobra's suggestion rule: a prefix, or at most two edits.
func closeWord(typed, name string) bool {
	typed, name = strings.ToLower(typed), strings.ToLower(name)
	return strings.HasPrefix(name, typed) || levenshtein(typed, name) <= 2
}

// levenshtein is the edit distance of two short command words.
func levenshtein(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

// exactArgs refuses any other number of positional arguments than n, with
// msg (which says what to give) as a usage error.
func exactArgs(n int, msg string) cobra.PositionalArgs {
	return func(_ *cobra.Command, args []string) error {
		if len(args) != n {
			if n == 0 {
				return usageErrorf("%s, got %q", msg, strings.Join(args, " "))
			}
			return usageErrorf("%s, got %d arguments", msg, len(args))
		}
		return nil
	}
}
