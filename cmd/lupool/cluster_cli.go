package main

import (
	"context"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/lupool/lupool/server/api"
)

// newClusterCommand is `lupool cluster ...`: join tokens and the admin
// token.
func newClusterCommand(cf *clientFlags, stdout, stderr io.Writer) *cobra.Command {
	var ttl time.Duration
	joinToken := &cobra.Command{
		Use:   "join-token",
		Short: "print a token a new node joins with (list, revoke ID manage them)",
		Long: `Print a join token for a new node. On the new node:
  LUPOOL_JOIN_TOKEN=TOKEN lupool serve --join API_ADDR ...
A token may be used until its TTL runs out; 'list' and 'revoke ID' manage them.`,
		Args: exactArgs(0, "cluster join-token takes no arguments (subcommands: list, revoke ID)"),
		RunE: func(c *cobra.Command, _ []string) error {
			if ttl < time.Second {
				return usageErrorf("--ttl %v: give at least 1s, e.g. 1h", ttl)
			}
			create := func(cl *api.Client, ctx context.Context) (api.JoinTokenCreated, error) {
				return cl.CreateJoinToken(ctx, int64(ttl.Seconds()))
			}
			return show(cf, c, stdout, create, func(w io.Writer, tok api.JoinTokenCreated) error {
				fmt.Fprintln(w, tok.Token)
				fmt.Fprintf(stderr, "join token %s, valid until %s; on the new node: lupool serve --join %s --join-token TOKEN ...\n",
					tok.ID, tok.ExpiresAt.Local().Format(time.RFC3339), cf.api)
				return nil
			})
		},
	}
	joinToken.Flags().DurationVar(&ttl, "ttl", 24*time.Hour, "how long the token may be used to join, e.g. 1h")

	list := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "join tokens with their state (valid, expired, revoked)",
		Args:    exactArgs(0, "cluster join-token list takes no arguments"),
		RunE: func(c *cobra.Command, _ []string) error {
			return show(cf, c, stdout, (*api.Client).ListJoinTokens, printJoinTokens)
		},
	}
	revoke := &cobra.Command{
		Use:   "revoke ID",
		Short: "revoke a join token (see lupool cluster join-token list)",
		Args:  exactArgs(1, "cluster join-token revoke needs the token id (see lupool cluster join-token list)"),
		RunE: func(c *cobra.Command, args []string) error {
			return cf.call(c, 0, func(ctx context.Context, cl *api.Client) error {
				if err := cl.RevokeJoinToken(ctx, args[0]); err != nil {
					return err
				}
				fmt.Fprintf(stdout, "join token %s revoked\n", args[0])
				return nil
			})
		},
	}
	joinToken.AddCommand(list, revoke)

	rotate := &cobra.Command{
		Use:   "rotate-admin-token",
		Short: "replace the admin token (rewrites --token-file)",
		Args:  exactArgs(0, "cluster rotate-admin-token takes no arguments"),
		RunE: func(c *cobra.Command, _ []string) error {
			return rotateAdminToken(c, cf, stdout, stderr)
		},
	}
	return newGroupCommand("cluster", "join tokens and the admin token", "admin", joinToken, rotate)
}

func printJoinTokens(w io.Writer, toks []api.JoinTokenInfo) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tCREATED\tEXPIRES\tSTATE")
	for _, t := range toks {
		state := "valid"
		switch {
		case t.Revoked:
			state = "revoked"
		case t.Expired:
			state = "expired"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", t.ID, t.CreatedAt.Local().Format(time.RFC3339), t.ExpiresAt.Local().Format(time.RFC3339), state)
	}
	return tw.Flush()
}

func rotateAdminToken(c *cobra.Command, cf *clientFlags, stdout, stderr io.Writer) error {
	var tok api.AdminToken
	err := cf.call(c, 0, func(ctx context.Context, cl *api.Client) (err error) {
		tok, err = cl.RotateAdminToken(ctx)
		return err
	})
	if err != nil {
		return err
	}
	if cf.tokenFrom != "" {
		if err := writeSecret(cf.tokenFrom, tok.Token+"\n"); err != nil {
			return fmt.Errorf("the admin token was rotated but %s could not be rewritten (%v); the new token is: %s", cf.tokenFrom, err, tok.Token)
		}
	}
	if cf.output == "json" {
		return printJSON(stdout, tok)
	}
	if cf.tokenFrom != "" {
		fmt.Fprintf(stdout, "admin token rotated; the new one is in %s (the old one no longer works)\n", cf.tokenFrom)
		return nil
	}
	fmt.Fprintln(stdout, tok.Token)
	fmt.Fprintln(stderr, "admin token rotated; the old one no longer works")
	return nil
}
