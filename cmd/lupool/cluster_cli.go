package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"text/tabwriter"
	"time"
)

// clusterCommand runs `lupool cluster ...`: join tokens and the admin
// token.
func clusterCommand(ctx context.Context, args []string, stdout io.Writer) error {
	if len(args) == 0 {
		return usageErrorf("cluster needs a subcommand: join-token [list|revoke ID] or rotate-admin-token")
	}
	switch args[0] {
	case "join-token":
		if len(args) > 1 && args[1] == "list" {
			return joinTokenList(ctx, args[2:], stdout)
		}
		if len(args) > 1 && args[1] == "revoke" {
			return joinTokenRevoke(ctx, args[2:], stdout)
		}
		return joinTokenCreate(ctx, args[1:], stdout)
	case "rotate-admin-token":
		return rotateAdminToken(ctx, args[1:], stdout)
	}
	return usageErrorf("unknown cluster subcommand %q: use join-token or rotate-admin-token", args[0])
}

func joinTokenCreate(ctx context.Context, args []string, stdout io.Writer) error {
	fs, cf := newClientFlagSet("cluster join-token", os.Stderr)
	ttl := fs.Duration("ttl", 24*time.Hour, "how long the token may be used to join, e.g. 1h")
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 0 {
		return usageErrorf("cluster join-token takes no arguments (subcommands: list, revoke ID)")
	}
	if *ttl < time.Second {
		return usageErrorf("--ttl %v: give at least 1s, e.g. 1h", *ttl)
	}
	c, err := cf.client()
	if err != nil {
		return err
	}
	tok, err := c.CreateJoinToken(ctx, int64(ttl.Seconds()))
	if err != nil {
		return err
	}
	if cf.output == "json" {
		return printJSON(stdout, tok)
	}
	fmt.Fprintln(stdout, tok.Token)
	fmt.Fprintf(os.Stderr, "join token %s, valid until %s; on the new node: lupool serve --join %s --join-token TOKEN ...\n",
		tok.ID, tok.ExpiresAt.Local().Format(time.RFC3339), cf.api)
	return nil
}

func joinTokenList(ctx context.Context, args []string, stdout io.Writer) error {
	fs, cf := newClientFlagSet("cluster join-token list", os.Stderr)
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 0 {
		return usageErrorf("cluster join-token list takes no arguments")
	}
	c, err := cf.client()
	if err != nil {
		return err
	}
	toks, err := c.ListJoinTokens(ctx)
	if err != nil {
		return err
	}
	if cf.output == "json" {
		return printJSON(stdout, toks)
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
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

func joinTokenRevoke(ctx context.Context, args []string, stdout io.Writer) error {
	fs, cf := newClientFlagSet("cluster join-token revoke", os.Stderr)
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usageErrorf("cluster join-token revoke needs the token id (see lupool cluster join-token list)")
	}
	c, err := cf.client()
	if err != nil {
		return err
	}
	if err := c.RevokeJoinToken(ctx, pos[0]); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "join token %s revoked\n", pos[0])
	return nil
}

func rotateAdminToken(ctx context.Context, args []string, stdout io.Writer) error {
	fs, cf := newClientFlagSet("cluster rotate-admin-token", os.Stderr)
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 0 {
		return usageErrorf("cluster rotate-admin-token takes no arguments")
	}
	c, err := cf.client()
	if err != nil {
		return err
	}
	tok, err := c.RotateAdminToken(ctx)
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
	fmt.Fprintln(os.Stderr, "admin token rotated; the old one no longer works")
	return nil
}
