package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/lupool/lupool/cluster/pki"
	"github.com/lupool/lupool/internal/units"
	"github.com/lupool/lupool/server/api"
)

const defaultAPI = "127.0.0.1:10810"

// Where the CLI finds its credentials by default: the files the first
// node of `make run` writes.
const (
	defaultTokenFile = "./lupool-data/admin.token"
	defaultCAFile    = "./lupool-data/pki/ca.crt"
)

// clientFlags are shared by every command that talks to the API.
type clientFlags struct {
	api       string
	output    string
	tokenFile string
	caFile    string
	// tokenFrom is the file the token was read from ("" for LUPOOL_TOKEN).
	tokenFrom string
}

func newClientFlagSet(name string, out io.Writer) (*flag.FlagSet, *clientFlags) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(out)
	cf := &clientFlags{}
	def := os.Getenv("LUPOOL_API")
	if def == "" {
		def = defaultAPI
	}
	fs.StringVar(&cf.api, "api", def, "lupool API address HOST:PORT or URL (env LUPOOL_API); off loopback it is https")
	fs.StringVar(&cf.output, "o", "table", "output format: table or json")
	fs.StringVar(&cf.tokenFile, "token-file", envOr("LUPOOL_TOKEN_FILE", ""),
		"file holding the admin token (env LUPOOL_TOKEN_FILE; LUPOOL_TOKEN gives the token itself; default "+defaultTokenFile+")")
	fs.StringVar(&cf.caFile, "ca-file", envOr("LUPOOL_CA_FILE", defaultCAFile), "cluster CA certificate trusted for https (env LUPOOL_CA_FILE)")
	return fs, cf
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

// token finds the admin token: --token-file, else LUPOOL_TOKEN, else the
// default file if it exists (else none: the API then says what to pass).
func (cf *clientFlags) token() (string, error) {
	path := cf.tokenFile
	if path == "" {
		if t := strings.TrimSpace(os.Getenv("LUPOOL_TOKEN")); t != "" {
			return t, nil
		}
		if _, err := os.Stat(defaultTokenFile); err != nil {
			return "", nil
		}
		path = defaultTokenFile
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("--token-file: %w", err)
	}
	cf.tokenFrom = path
	return strings.TrimSpace(string(b)), nil
}

// apiURL is the API address as a URL: a bare HOST:PORT is http on
// loopback and https elsewhere (the daemon serves HTTPS off loopback).
func apiURL(addr string) string {
	if strings.Contains(addr, "://") || addr == "" {
		return addr
	}
	if isLoopback(addr) {
		return "http://" + addr
	}
	return "https://" + addr
}

func (cf *clientFlags) client() (*api.Client, error) {
	if cf.output != "table" && cf.output != "json" {
		return nil, usageErrorf("-o %q: use table or json", cf.output)
	}
	token, err := cf.token()
	if err != nil {
		return nil, err
	}
	u := apiURL(cf.api)
	opts := api.ClientOptions{Token: token}
	if strings.HasPrefix(u, "https://") {
		pem, err := os.ReadFile(cf.caFile)
		var ca *pki.CA
		if err == nil {
			ca, err = pki.ParseCA(pem, nil)
		}
		if err != nil {
			return nil, fmt.Errorf("https API: cannot read the cluster CA %s (give --ca-file; it is DATA/pki/ca.crt on a node): %w", cf.caFile, err)
		}
		opts.HTTP = &http.Client{Timeout: 60 * time.Second, Transport: &http.Transport{TLSClientConfig: pki.ClientTLS(ca.Pool(), nil, "")}}
	}
	return api.NewClientWith(u, opts)
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// parseLUSize parses a --size value and rounds it up to 512 bytes, saying so.
func parseLUSize(s string, notice io.Writer) (int64, error) {
	if s == "" {
		return 0, usageErrorf("--size is required, e.g. --size 10G")
	}
	n, err := units.ParseSize(s)
	if err != nil {
		return 0, usageErrorf("--size: %s", strings.TrimPrefix(err.Error(), "units: "))
	}
	if n == 0 {
		return 0, usageErrorf("--size must be larger than zero")
	}
	rounded, changed := units.RoundUp(n, 512)
	if changed {
		fmt.Fprintf(notice, "note: size %s rounded up to %d bytes (a multiple of 512)\n", s, rounded)
	}
	return rounded, nil
}

func luCommand(ctx context.Context, args []string, stdout io.Writer) error {
	if len(args) == 0 {
		return usageErrorf("lu needs a subcommand: create, list, show, resize, delete, add-copy or verify")
	}
	sub, args := args[0], args[1:]
	fs, cf := newClientFlagSet("lu "+sub, os.Stderr)
	var size, kind, description, node, region string
	var copies int
	var force bool
	switch sub {
	case "create":
		fs.StringVar(&size, "size", "", "size with a unit: 512, 64K, 10G, 1T (rounded up to 512 bytes)")
		fs.IntVar(&copies, "copies", 1, "number of synchronous copies on distinct nodes")
		fs.StringVar(&kind, "kind", "file", "file (sparse file, durable) or memory (RAM, lost on restart)")
		fs.StringVar(&description, "description", "", "free text shown in NBD export lists")
	case "resize":
		fs.StringVar(&size, "size", "", "new size with a unit")
	case "delete":
		fs.BoolVar(&force, "force", false, "delete even while clients are attached (their I/O ends with an error)")
	case "add-copy":
		fs.StringVar(&node, "node", "", "node to place the new copy on (default: the node holding the fewest copies)")
	case "verify":
		fs.StringVar(&region, "region", "1M", "comparison unit, 4K to 64M")
	case "list", "show":
	default:
		return usageErrorf("unknown lu subcommand %q: use create, list, show, resize, delete, add-copy or verify", sub)
	}
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	wantArgs := 1
	if sub == "list" {
		wantArgs = 0
	}
	if len(pos) != wantArgs {
		if wantArgs == 0 {
			return usageErrorf("lu list takes no arguments, got %q", strings.Join(pos, " "))
		}
		return usageErrorf("lu %s needs exactly one LU name, got %d arguments", sub, len(pos))
	}
	c, err := cf.client()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	switch sub {
	case "create":
		n, err := parseLUSize(size, os.Stderr)
		if err != nil {
			return err
		}
		if copies < 1 {
			return usageErrorf("--copies must be 1 or more, got %d", copies)
		}
		lu, err := c.CreateLU(ctx, api.CreateLURequest{Name: pos[0], SizeBytes: n, Copies: copies, Kind: kind, Description: description})
		if err != nil {
			return err
		}
		return printLUs(stdout, cf.output, []api.LU{lu}, true)
	case "list":
		lus, err := c.ListLUs(ctx)
		if err != nil {
			return err
		}
		return printLUs(stdout, cf.output, lus, false)
	case "show":
		lu, err := c.GetLU(ctx, pos[0])
		if err != nil {
			return err
		}
		return printLUs(stdout, cf.output, []api.LU{lu}, true)
	case "add-copy":
		lu, err := c.AddCopy(ctx, pos[0], node)
		if err != nil {
			return err
		}
		return printLUs(stdout, cf.output, []api.LU{lu}, true)
	case "verify":
		n, err := units.ParseSize(region)
		if err != nil {
			return usageErrorf("--region: %s", strings.TrimPrefix(err.Error(), "units: "))
		}
		report, err := c.VerifyLU(ctx, pos[0], n)
		if err != nil {
			return err
		}
		return printVerify(stdout, cf.output, report)
	case "resize":
		n, err := parseLUSize(size, os.Stderr)
		if err != nil {
			return err
		}
		lu, err := c.ResizeLU(ctx, pos[0], n)
		if err != nil {
			return err
		}
		return printLUs(stdout, cf.output, []api.LU{lu}, true)
	default: // delete
		if err := c.DeleteLU(ctx, pos[0], force); err != nil {
			return err
		}
		if cf.output == "json" {
			return printJSON(stdout, map[string]string{"deleted": pos[0]})
		}
		fmt.Fprintf(stdout, "deleted %s\n", pos[0])
		return nil
	}
}

// errDiverged is returned by lu verify when copies differ or could not be
// compared; the report was printed.
var errDiverged = errors.New("copies differ or could not all be compared")

func printVerify(w io.Writer, output string, r api.VerifyReport) error {
	if output == "json" {
		if err := printJSON(w, r); err != nil {
			return err
		}
	} else {
		fmt.Fprintf(w, "%s: %d regions of %s compared on copies %s\n", r.Name, r.Regions, units.Format(r.RegionBytes), strings.Join(r.Copies, ", "))
		for node, why := range r.Skipped {
			fmt.Fprintf(w, "skipped %s: %s\n", node, why)
		}
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		if len(r.Mismatches) > 0 {
			fmt.Fprintln(tw, "DIFFERS AT OFFSET\tNODE\tSHA-256")
		}
		for _, m := range r.Mismatches {
			for _, node := range r.Copies {
				if h, ok := m.Hashes[node]; ok {
					fmt.Fprintf(tw, "%d\t%s\t%s\n", m.OffsetBytes, node, h)
				}
			}
		}
		if err := tw.Flush(); err != nil {
			return err
		}
		if r.Equal {
			fmt.Fprintln(w, "all copies equal")
		}
	}
	if !r.Equal {
		return errDiverged
	}
	return nil
}

func printLUs(w io.Writer, output string, lus []api.LU, single bool) error {
	if output == "json" {
		if single && len(lus) == 1 {
			return printJSON(w, lus[0])
		}
		if lus == nil {
			lus = []api.LU{}
		}
		return printJSON(w, lus)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tSIZE\tALLOCATED\tKIND\tCOPIES\tWRITER\tEPOCH\tCLIENTS")
	for _, lu := range lus {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\t%d\t%d\n", lu.Name, units.Format(lu.SizeBytes),
			units.Format(lu.AllocatedBytes), lu.Kind, lu.Copies, lu.Writer, lu.Epoch, lu.Connections)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if single && len(lus) == 1 {
		lu := lus[0]
		if lu.Description != "" {
			fmt.Fprintf(w, "\ndescription: %s\n", lu.Description)
		}
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "\nCOPY ON NODE\tSTATE\tLACKS")
		for _, r := range lu.Replicas {
			lacks := "-"
			if r.DirtyBytes != nil {
				lacks = units.Format(*r.DirtyBytes)
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\n", r.Node, r.State, lacks)
		}
		return tw.Flush()
	}
	return nil
}

func poolCommand(ctx context.Context, args []string, stdout io.Writer) error {
	if len(args) == 0 || args[0] != "status" {
		return usageErrorf("pool needs the subcommand status")
	}
	fs, cf := newClientFlagSet("pool status", os.Stderr)
	pos, err := parseInterspersed(fs, args[1:])
	if err != nil {
		return err
	}
	if len(pos) != 0 {
		return usageErrorf("pool status takes no arguments")
	}
	c, err := cf.client()
	if err != nil {
		return err
	}
	st, err := c.PoolStatus(ctx)
	if err != nil {
		return err
	}
	if cf.output == "json" {
		return printJSON(stdout, st)
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "node\t%s\n", st.Node)
	fmt.Fprintf(tw, "level\t%s\n", st.Level)
	fmt.Fprintf(tw, "capacity\t%s\n", units.Format(st.CapacityBytes))
	fmt.Fprintf(tw, "free\t%s\n", units.Format(st.FreeBytes))
	fmt.Fprintf(tw, "allocated (LU data)\t%s\n", units.Format(st.AllocatedBytes))
	fmt.Fprintf(tw, "provisioned (LU sizes)\t%s (overcommit limit %.1fx capacity)\n", units.Format(st.ProvisionedBytes), st.OvercommitRatio)
	fmt.Fprintf(tw, "memory LUs\t%s allocated of %s provisioned\n", units.Format(st.MemoryAllocatedBytes), units.Format(st.MemoryProvisionedBytes))
	fmt.Fprintf(tw, "LUs\t%d\n", st.LUs)
	if err := tw.Flush(); err != nil {
		return err
	}
	tw = tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "\nDIRECTORY\tCAPACITY\tFREE\tALLOCATED\tPROVISIONED\tVOLUMES")
	for _, d := range st.Dirs {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\n", d.Path, units.Format(d.CapacityBytes), units.Format(d.FreeBytes),
			units.Format(d.AllocatedBytes), units.Format(d.ProvisionedBytes), d.Volumes)
	}
	return tw.Flush()
}

func nodeCommand(ctx context.Context, args []string, stdout io.Writer) error {
	if len(args) > 0 && args[0] == "remove" {
		fs, cf := newClientFlagSet("node remove", os.Stderr)
		pos, err := parseInterspersed(fs, args[1:])
		if err != nil {
			return err
		}
		if len(pos) != 1 {
			return usageErrorf("node remove needs one node id")
		}
		c, err := cf.client()
		if err != nil {
			return err
		}
		if err := c.RemoveNode(ctx, pos[0]); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "node %s removed; its certificate no longer admits it\n", pos[0])
		return nil
	}
	if len(args) == 0 || args[0] != "list" {
		return usageErrorf("node needs the subcommand list or remove")
	}
	fs, cf := newClientFlagSet("node list", os.Stderr)
	pos, err := parseInterspersed(fs, args[1:])
	if err != nil {
		return err
	}
	if len(pos) != 0 {
		return usageErrorf("node list takes no arguments")
	}
	c, err := cf.client()
	if err != nil {
		return err
	}
	nodes, err := c.Nodes(ctx)
	if err != nil {
		return err
	}
	if cf.output == "json" {
		if nodes == nil {
			nodes = []api.Node{}
		}
		return printJSON(stdout, nodes)
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tROLE\tAPI\tNBD\tPEER")
	for _, n := range nodes {
		role := "follower"
		if n.Leader {
			role = "leader"
		}
		if !n.Voter {
			role += " (non-voter)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", n.ID, role, n.APIAddr, n.NBDAddr, n.PeerAddr)
	}
	return tw.Flush()
}
