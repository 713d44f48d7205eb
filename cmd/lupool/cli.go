package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/lupool/lupool/cluster/pki"
	"github.com/lupool/lupool/internal/rules"
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

// clientFlags are the global flags of every command that talks to the
// API; they may come before or after the subcommand.
type clientFlags struct {
	api       string
	output    string
	tokenFile string
	caFile    string
	// tokenFrom is the file the token was read from ("" for LUPOOL_TOKEN).
	tokenFrom string
}

// register adds the client flags to root as persistent (global) flags.
func (cf *clientFlags) register(root *cobra.Command) {
	fs := root.PersistentFlags()
	fs.StringVar(&cf.api, "api", envOr("LUPOOL_API", defaultAPI), "lupool API address HOST:PORT or URL (env LUPOOL_API); off loopback it is https")
	fs.StringVarP(&cf.output, "output", "o", "table", "output format: table or json")
	fs.StringVar(&cf.tokenFile, "token-file", envOr("LUPOOL_TOKEN_FILE", ""),
		"file holding the admin token (env LUPOOL_TOKEN_FILE; LUPOOL_TOKEN gives the token itself; default "+defaultTokenFile+")")
	fs.StringVar(&cf.caFile, "ca-file", envOr("LUPOOL_CA_FILE", defaultCAFile), "cluster CA certificate trusted for https (env LUPOOL_CA_FILE)")
	_ = root.RegisterFlagCompletionFunc("output", cobra.FixedCompletions([]string{"table", "json"}, cobra.ShellCompDirectiveNoFileComp))
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

// call runs fn with an API client. Its context ends with the command's
// (Ctrl-C), or after timeout when that is positive.
func (cf *clientFlags) call(c *cobra.Command, timeout time.Duration, fn func(ctx context.Context, cl *api.Client) error) error {
	cl, err := cf.client()
	if err != nil {
		return err
	}
	ctx := c.Context()
	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	return fn(ctx, cl)
}

// show fetches a value with get (a method expression such as
// (*api.Client).PoolStatus) and prints it: as JSON with -o json, else with
// table.
func show[T any](cf *clientFlags, c *cobra.Command, w io.Writer, get func(*api.Client, context.Context) (T, error), table func(io.Writer, T) error) error {
	return cf.call(c, 0, func(ctx context.Context, cl *api.Client) error {
		v, err := get(cl, ctx)
		if err != nil {
			return err
		}
		if cf.output == "json" {
			return printJSON(w, v)
		}
		return table(w, v)
	})
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
	rounded, changed, err := rules.RoundSize(n)
	if err != nil {
		return 0, usageErrorf("--size %v", err)
	}
	if changed {
		fmt.Fprintf(notice, "note: size %s rounded up to %d bytes (a multiple of %d)\n", s, rounded, rules.SectorBytes)
	}
	return rounded, nil
}

// luTimeout bounds one LU command (a create waits for its volume, a verify
// hashes every copy).
const luTimeout = 2 * time.Minute

func newLUCommand(cf *clientFlags, stdout, stderr io.Writer) *cobra.Command {
	var (
		size, kind, description, node, region, from string
		copies                                      int
		force                                       bool
		createQoS                                   qosFlags
	)
	call := func(c *cobra.Command, fn func(ctx context.Context, cl *api.Client) error) error {
		return cf.call(c, luTimeout, fn)
	}
	oneLU := func(verb string) cobra.PositionalArgs {
		return exactArgs(1, "lu "+verb+" needs exactly one LU name")
	}
	names := cf.completeLUNames

	create := &cobra.Command{
		Use:   "create NAME --size SIZE",
		Short: "create a thin LU; attachable as soon as this returns",
		Long: `Create a thin LU: it takes no space until written. Sizes take binary
units (512, 64K, 10G, 1T) and are rounded up to 512 bytes. Names are 1 to
128 of A-Z a-z 0-9 . _ -.`,
		Example: "  lupool lu create swap0 --size 8G\n  lupool lu create scratch --size 1G --kind memory --copies 2\n  lupool lu create vm1 --size 20G --iops-limit 5000 --bps-limit 200M\n  lupool lu create vm2 --from debian12/0 --size 40G",
		Args:    oneLU("create"),
		RunE: func(c *cobra.Command, args []string) error {
			var n int64
			var err error
			if from == "" || size != "" {
				if n, err = parseLUSize(size, stderr); err != nil {
					return err
				}
			}
			if err := rules.Copies(copies); err != nil {
				return usageErrorf("--copies %v, got %d", err, copies)
			}
			var q api.QoS
			limited, err := createQoS.apply(c, &q)
			if err != nil {
				return err
			}
			if from != "" && c.Flags().Changed("kind") && kind != "file" {
				return usageErrorf("--from makes a linked clone, a file LU; drop --kind %s", kind)
			}
			if from != "" && !c.Flags().Changed("kind") {
				kind = ""
			}
			req := api.CreateLURequest{Name: args[0], SizeBytes: n, Copies: copies, Kind: kind, Description: description, From: from}
			if limited {
				req.QoS = &q
			}
			return call(c, func(ctx context.Context, cl *api.Client) error {
				lu, err := cl.CreateLU(ctx, req)
				if err != nil {
					return err
				}
				return printLUs(stdout, cf.output, []api.LU{lu}, true)
			})
		},
	}
	create.Flags().StringVar(&size, "size", "", "size with a unit: 512, 64K, 10G, 1T (rounded up to 512 bytes)")
	create.Flags().IntVar(&copies, "copies", 1, "number of synchronous copies on distinct nodes")
	create.Flags().StringVar(&kind, "kind", "file", "file (sparse file, durable) or memory (RAM, lost on restart)")
	create.Flags().StringVar(&description, "description", "", "free text shown in NBD export lists")
	create.Flags().StringVar(&from, "from", "", "make a linked clone of an image disk IMAGE/N, at once (--size defaults to the disk's)")
	createQoS.add(create.Flags())
	_ = create.RegisterFlagCompletionFunc("kind", cobra.FixedCompletions([]string{"file", "memory"}, cobra.ShellCompDirectiveNoFileComp))

	list := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "list LUs with size, allocated bytes, kind, copies, writer and clients",
		Args:    exactArgs(0, "lu list takes no arguments"),
		RunE: func(c *cobra.Command, _ []string) error {
			return call(c, func(ctx context.Context, cl *api.Client) error {
				lus, err := cl.ListLUs(ctx)
				if err != nil {
					return err
				}
				return printLUs(stdout, cf.output, lus, false)
			})
		},
	}

	show := &cobra.Command{
		Use:               "show NAME",
		Short:             "show one LU and the state of each of its copies",
		Args:              oneLU("show"),
		ValidArgsFunction: names,
		RunE: func(c *cobra.Command, args []string) error {
			return call(c, func(ctx context.Context, cl *api.Client) error {
				lu, err := cl.GetLU(ctx, args[0])
				if err != nil {
					return err
				}
				return printLUs(stdout, cf.output, []api.LU{lu}, true)
			})
		},
	}

	resize := &cobra.Command{
		Use:   "resize NAME --size SIZE",
		Short: "grow online; shrink only when the cut-off tail holds no data",
		Long: `Grow an LU online, or shrink it when the part cut off holds no data.
Clients see the new size when they reconnect (NBD has no resize notice).`,
		Args:              oneLU("resize"),
		ValidArgsFunction: names,
		RunE: func(c *cobra.Command, args []string) error {
			n, err := parseLUSize(size, stderr)
			if err != nil {
				return err
			}
			return call(c, func(ctx context.Context, cl *api.Client) error {
				lu, err := cl.ResizeLU(ctx, args[0], n)
				if err != nil {
					return err
				}
				return printLUs(stdout, cf.output, []api.LU{lu}, true)
			})
		},
	}
	resize.Flags().StringVar(&size, "size", "", "new size with a unit")

	del := &cobra.Command{
		Use:               "delete NAME",
		Aliases:           []string{"rm"},
		Short:             "delete an LU; refused while clients are attached unless --force",
		Args:              oneLU("delete"),
		ValidArgsFunction: names,
		RunE: func(c *cobra.Command, args []string) error {
			return call(c, func(ctx context.Context, cl *api.Client) error {
				if err := cl.DeleteLU(ctx, args[0], force); err != nil {
					return err
				}
				if cf.output == "json" {
					return printJSON(stdout, map[string]string{"deleted": args[0]})
				}
				fmt.Fprintf(stdout, "deleted %s\n", args[0])
				return nil
			})
		},
	}
	del.Flags().BoolVar(&force, "force", false, "delete even while clients are attached (their I/O ends with an error)")

	addCopy := &cobra.Command{
		Use:   "add-copy NAME",
		Short: "add a copy on another node (rebuilt while writes go on)",
		Long: `Add a copy of an LU on NODE (default: the node holding the fewest copies).
It starts new; the writer rebuilds it from the allocated extents while
writes go on, then it is in-sync.`,
		Args:              oneLU("add-copy"),
		ValidArgsFunction: names,
		RunE: func(c *cobra.Command, args []string) error {
			return call(c, func(ctx context.Context, cl *api.Client) error {
				lu, err := cl.AddCopy(ctx, args[0], node)
				if err != nil {
					return err
				}
				return printLUs(stdout, cf.output, []api.LU{lu}, true)
			})
		},
	}
	addCopy.Flags().StringVar(&node, "node", "", "node to place the new copy on (default: the node holding the fewest copies)")

	verify := &cobra.Command{
		Use:   "verify NAME",
		Short: "compare the in-sync copies by hash; exit 1 if they differ",
		Long: `Hash every in-sync copy region by region and compare. Lists the regions
that differ and exits 1 if any (a region that differs is re-checked 3
times, so a write in flight is not reported).`,
		Args:              oneLU("verify"),
		ValidArgsFunction: names,
		RunE: func(c *cobra.Command, args []string) error {
			n, err := units.ParseSize(region)
			if err != nil {
				return usageErrorf("--region: %s", strings.TrimPrefix(err.Error(), "units: "))
			}
			if err := rules.Region(n); err != nil {
				return usageErrorf("--region %s: %v", region, err)
			}
			return call(c, func(ctx context.Context, cl *api.Client) error {
				report, err := cl.VerifyLU(ctx, args[0], n)
				if err != nil {
					return err
				}
				return printVerify(stdout, cf.output, report)
			})
		},
	}
	verify.Flags().StringVar(&region, "region", "1M", "comparison unit, 4K to 64M")

	scrub := &cobra.Command{
		Use:   "scrub NAME",
		Short: "compare the copies with the writer now and repair the regions that differ",
		Long: `Scrub an LU now, on its writer (any node forwards the request there):
compare every in-sync copy with the writer region by region by hash,
compare a region that differs again once no write to it is in flight, and
rewrite it from the writer (whose data is authoritative). Lists the
repaired regions. The schedule (lupool serve --scrub-interval) does the same
once per interval for every LU.`,
		Args:              oneLU("scrub"),
		ValidArgsFunction: names,
		RunE: func(c *cobra.Command, args []string) error {
			return call(c, func(ctx context.Context, cl *api.Client) error {
				report, err := cl.ScrubLU(ctx, args[0])
				if err != nil {
					return err
				}
				return printScrub(stdout, cf.output, report)
			})
		},
	}

	flatten := &cobra.Command{
		Use:               "flatten NAME",
		Short:             "copy a linked clone's image blocks into it and cut the link, while clients go on writing",
		Args:              oneLU("flatten"),
		ValidArgsFunction: names,
		RunE: func(c *cobra.Command, args []string) error {
			return cf.call(c, 0, func(ctx context.Context, cl *api.Client) error {
				lu, err := cl.FlattenLU(ctx, args[0])
				if err != nil {
					return err
				}
				return printLUs(stdout, cf.output, []api.LU{lu}, true)
			})
		},
	}

	snapshot, rollback := newLUSnapshotCommands(cf, stdout) // snapshot.go
	return newGroupCommand("lu", "create, list, resize, limit, delete, copy, move, verify, scrub, flatten, snapshot and roll back LUs", "admin",
		create, list, show, resize, newLUSetCommand(cf, stdout), del, addCopy, newLUMoveCommand(cf, stdout), verify, scrub, flatten, snapshot, rollback)
}

// completeLUNames completes an LU name argument from the API (quietly
// nothing when the API cannot be reached).
func (cf *clientFlags) completeLUNames(c *cobra.Command, args []string, _ string) ([]string, cobra.ShellCompDirective) {
	if len(args) > 0 {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	cl, err := cf.client()
	if err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	ctx, cancel := context.WithTimeout(c.Context(), 2*time.Second)
	defer cancel()
	lus, err := cl.ListLUs(ctx)
	if err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	names := make([]string, 0, len(lus))
	for _, lu := range lus {
		names = append(names, lu.Name+"\t"+units.Format(lu.SizeBytes)+" "+lu.Kind)
	}
	return names, cobra.ShellCompDirectiveNoFileComp
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

func printScrub(w io.Writer, output string, r api.ScrubReport) error {
	if output == "json" {
		return printJSON(w, r)
	}
	fmt.Fprintf(w, "scrubbed %s: %d regions of %s on %d copies in %.1fs, %d repaired\n", r.Name, r.Regions,
		units.Format(r.RegionBytes), len(r.Copies), r.TookSeconds, len(r.Repairs))
	for _, rp := range r.Repairs {
		fmt.Fprintf(w, "repaired copy on %s at offset %d (%s)\n", rp.Copy, rp.OffsetBytes, units.Format(rp.LengthBytes))
	}
	for node, why := range r.Skipped {
		fmt.Fprintf(w, "skipped copy on %s: %s\n", node, why)
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
		if q := qosText(lu.QoS); q != "" {
			fmt.Fprintf(w, "\nlimits: %s\n", q)
		}
		if lu.Image != "" {
			state := "importing (writable)"
			if lu.ReadOnly {
				state = "read-only"
			}
			fmt.Fprintf(w, "\ndisk of image %s, %s\n", lu.Image, state)
		}
		if lu.Base != "" {
			fmt.Fprintf(w, "\nlinked clone of %s (allocated counts the clone's own blocks)\n", lu.Base)
		}
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "\nCOPY ON NODE\tSTATE\tLACKS\tSCRUB REPAIRS")
		for _, r := range lu.Replicas {
			lacks, repaired := "-", "-"
			if r.DirtyBytes != nil {
				lacks = units.Format(*r.DirtyBytes)
			}
			if r.RepairedRegions != nil {
				repaired = strconv.FormatInt(*r.RepairedRegions, 10)
			}
			if r.Degraded {
				repaired += " (degraded)"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", r.Node, r.State, lacks, repaired)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
		if m := lu.Move; m != nil {
			fmt.Fprintf(w, "\nmoving: writer %s → %s, %s for %s (epoch %d)\nmonitors: %s\n", m.From, m.To, m.State,
				(time.Duration(m.AgeSeconds * float64(time.Second))).Round(time.Millisecond), m.Epoch, monitorsText(m.Monitors))
		}
		if sc := lu.Scrub; sc != nil {
			last := "never, since the writer started"
			if sc.LastFinished != nil {
				last = fmt.Sprintf("%s (%d regions repaired)", sc.LastFinished.Format(time.RFC3339), sc.LastRepaired)
			}
			fmt.Fprintf(w, "\nlast scrub: %s\n", last)
			if sc.Running {
				fmt.Fprintf(w, "scrub running: %d of %d regions\n", sc.RegionsDone, sc.RegionsTotal)
			}
		}
		return nil
	}
	return nil
}

func newPoolCommand(cf *clientFlags, stdout io.Writer) *cobra.Command {
	status := &cobra.Command{
		Use:   "status",
		Short: "this node's capacity, free, allocated and provisioned bytes and usage level",
		Args:  exactArgs(0, "pool status takes no arguments"),
		RunE: func(c *cobra.Command, _ []string) error {
			return show(cf, c, stdout, (*api.Client).PoolStatus, printPoolStatus)
		},
	}
	return newGroupCommand("pool", "the storage pool of a node", "admin", status, newPoolAlertCommand(cf, stdout))
}

func printPoolStatus(stdout io.Writer, st api.PoolStatus) error {
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "node\t%s\n", st.Node)
	fmt.Fprintf(tw, "level\t%s\n", st.Level)
	fmt.Fprintf(tw, "capacity\t%s\n", units.Format(st.CapacityBytes))
	fmt.Fprintf(tw, "free\t%s\n", units.Format(st.FreeBytes))
	fmt.Fprintf(tw, "allocated (LU data)\t%s\n", units.Format(st.AllocatedBytes))
	fmt.Fprintf(tw, "provisioned (LU sizes)\t%s (overcommit limit %.1fx capacity)\n", units.Format(st.ProvisionedBytes), st.OvercommitRatio)
	fmt.Fprintf(tw, "memory LUs\t%s allocated of %s provisioned\n", units.Format(st.MemoryAllocatedBytes), units.Format(st.MemoryProvisionedBytes))
	if st.MemoryBudgetBytes > 0 {
		fmt.Fprintf(tw, "memory budget\t%s free of %s (%s provisioned, %s being created)\n", units.Format(st.MemoryFreeBytes),
			units.Format(st.MemoryBudgetBytes), units.Format(st.MemoryProvisionedBytes), units.Format(st.MemoryReservedBytes))
	}
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

func newNodeCommand(cf *clientFlags, stdout io.Writer) *cobra.Command {
	list := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "cluster members and the metadata leader (the primary)",
		Args:    exactArgs(0, "node list takes no arguments"),
		RunE: func(c *cobra.Command, _ []string) error {
			nodes := func(cl *api.Client, ctx context.Context) ([]api.Node, error) {
				nodes, err := cl.Nodes(ctx)
				if nodes == nil {
					nodes = []api.Node{}
				}
				return nodes, err
			}
			return show(cf, c, stdout, nodes, printNodes)
		},
	}
	remove := &cobra.Command{
		Use:   "remove ID",
		Short: "take a node out of the cluster; its certificate stops working",
		Args:  exactArgs(1, "node remove needs one node id"),
		RunE: func(c *cobra.Command, args []string) error {
			return cf.call(c, 0, func(ctx context.Context, cl *api.Client) error {
				if err := cl.RemoveNode(ctx, args[0]); err != nil {
					return err
				}
				fmt.Fprintf(stdout, "node %s removed; its certificate no longer admits it\n", args[0])
				return nil
			})
		},
	}
	return newGroupCommand("node", "cluster members", "admin", list, remove)
}

func printNodes(w io.Writer, nodes []api.Node) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tROLE\tLIVENESS\tAPI\tNBD\tPEER")
	for _, n := range nodes {
		live := n.Liveness
		if live == "" {
			live = "unknown"
		}
		if n.LastHeard != nil && live != "alive" && live != "unknown" {
			live += fmt.Sprintf(" (%s ago)", time.Since(*n.LastHeard).Round(100*time.Millisecond))
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", n.ID, nodeRole(n), live, n.APIAddr, n.NBDAddr, n.PeerAddr)
	}
	return tw.Flush()
}

// nodeRole is a node's part in the metadata cluster, as node list shows it.
func nodeRole(n api.Node) string {
	role := "follower"
	if n.Leader {
		role = "leader"
	}
	if n.NBDAddr == "" {
		role += " (witness)"
	}
	if !n.Voter {
		role += " (non-voter)"
	}
	return role
}
