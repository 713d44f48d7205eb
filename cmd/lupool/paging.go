package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/lupool/lupool/control"
	"github.com/lupool/lupool/internal/units"
	"github.com/lupool/lupool/paging"
	"github.com/lupool/lupool/server/api"
)

// pagingLUs adapts the control plane to package paging.
type pagingLUs struct {
	ctl *control.Plane // immutable; never nil
}

var _ paging.LUs = pagingLUs{}

func fromAPILU(l api.LU) paging.LU {
	out := paging.LU{Name: l.Name, Description: l.Description, Kind: l.Kind, Writer: l.Writer,
		SizeBytes: l.SizeBytes, AllocatedBytes: l.AllocatedBytes, Copies: l.Copies, Epoch: l.Epoch}
	for _, r := range l.Replicas {
		out.Replicas = append(out.Replicas, paging.Copy{Node: r.Node, State: r.State})
	}
	return out
}

func (a pagingLUs) Create(ctx context.Context, s paging.CreateSpec) (paging.LU, error) {
	l, err := a.ctl.CreateLU(ctx, api.CreateLURequest{Name: s.Name, Description: s.Description, Kind: s.Kind,
		SizeBytes: s.SizeBytes, Copies: s.Copies, Node: s.Node})
	return fromAPILU(l), err
}

func (a pagingLUs) Get(ctx context.Context, name string) (paging.LU, error) {
	l, err := a.ctl.GetLU(ctx, name)
	if errors.Is(err, api.ErrNotFound) {
		return paging.LU{}, fmt.Errorf("%w: %w", paging.ErrNotFound, err)
	}
	return fromAPILU(l), err
}

func (a pagingLUs) List(ctx context.Context) ([]paging.LU, error) {
	lus, err := a.ctl.ListLUs(ctx)
	out := make([]paging.LU, 0, len(lus))
	for _, l := range lus {
		out = append(out, fromAPILU(l))
	}
	return out, err
}

func (a pagingLUs) Delete(ctx context.Context, name string, force bool) error {
	return a.ctl.DeleteLU(ctx, name, force)
}

func (a pagingLUs) Clients(ctx context.Context, name string) (int, []string) {
	return a.ctl.ClusterConnections(ctx, name)
}

// Nodes are the storage nodes: a witness records no NBD address.
func (a pagingLUs) Nodes(ctx context.Context) ([]paging.Node, error) {
	nodes, err := a.ctl.Nodes(ctx)
	if err != nil {
		return nil, err
	}
	var out []paging.Node
	for _, n := range nodes {
		if n.NBDAddr != "" {
			out = append(out, paging.Node{ID: n.ID, NBDAddr: n.NBDAddr, APIAddr: n.APIAddr})
		}
	}
	return out, nil
}

// pagingBackend serves the API's paging calls with package paging.
type pagingBackend struct {
	svc *paging.Service // immutable; never nil
}

var _ api.PagingBackend = pagingBackend{}

// apiSentinel pairs a paging error with the API sentinel that chooses
// its status code; its text is the paging error's.
type apiSentinel struct{ err, sentinel error }

func (e apiSentinel) Error() string   { return e.err.Error() }
func (e apiSentinel) Unwrap() []error { return []error{e.err, e.sentinel} }

// pagingAPIError maps package paging's sentinels onto the API's; errors
// from the control plane already carry theirs.
func pagingAPIError(err error) error {
	for _, m := range []struct{ from, to error }{
		{paging.ErrInvalid, api.ErrInvalid},
		{paging.ErrNotFound, api.ErrNotFound},
		{paging.ErrExists, api.ErrExists},
		{paging.ErrBusy, api.ErrBusy},
		{paging.ErrUnsupported, api.ErrInvalid},
	} {
		if errors.Is(err, m.from) && !errors.Is(err, m.to) {
			return apiSentinel{err: err, sentinel: m.to}
		}
	}
	return err
}

func toAPISpace(s paging.Space) api.PagingSpace {
	out := api.PagingSpace{VM: s.VM, LU: s.LU, SizeBytes: s.SizeBytes, AllocatedBytes: s.AllocatedBytes, Kind: s.Kind,
		Copies: s.Copies, Host: s.Host, Epoch: s.Epoch, Replicas: []api.PagingReplica{}, Clients: s.Clients,
		ClientsWhere: s.ClientsWhere, Existed: s.Existed, Notes: s.Notes,
		Attach: api.PagingAttach{URI: s.Attach.URI, LupoolAttach: s.Attach.Lupool, Socket: s.Attach.Socket,
			NBDClient: s.Attach.NBDClient, QEMUDrive: s.Attach.QEMUDrive}}
	for _, r := range s.Replicas {
		out.Replicas = append(out.Replicas, api.PagingReplica{Node: r.Node, State: r.State})
	}
	return out
}

func (b pagingBackend) RequestPaging(ctx context.Context, req api.PagingRequest) (api.PagingSpace, error) {
	s, err := b.svc.Request(ctx, paging.Request{VM: req.VM, SizeBytes: req.SizeBytes, Host: req.Host,
		Copies: req.Copies, Kind: req.Kind, Socket: req.Socket})
	return toAPISpace(s), pagingAPIError(err)
}

func (b pagingBackend) MigratePaging(ctx context.Context, vm, to string) (api.PagingSpace, error) {
	s, err := b.svc.Migrate(ctx, vm, to)
	return toAPISpace(s), pagingAPIError(err)
}

// pagingMover is paging's Mover: the planned writer move of the control
// plane, waited for. Away from the leader it returns the NotLeaderError
// that makes the API forward the migrate request there.
type pagingMover struct {
	ctl *control.Plane // immutable; never nil
}

func (m pagingMover) MoveWriter(ctx context.Context, lu, to string) error {
	res, err := m.ctl.MoveLU(ctx, lu, to, true)
	if err != nil {
		return err
	}
	if res.Outcome != "done" {
		return fmt.Errorf("%w: the move of %s to %s %s: %s", api.ErrUnavailable, lu, to, res.Outcome, res.Reason)
	}
	return nil
}

func (b pagingBackend) ReleasePaging(ctx context.Context, vm string, force bool) error {
	return pagingAPIError(b.svc.Release(ctx, vm, force))
}

func (b pagingBackend) ListPaging(ctx context.Context) ([]api.PagingSpace, error) {
	list, err := b.svc.List(ctx)
	out := make([]api.PagingSpace, 0, len(list))
	for _, s := range list {
		out = append(out, toAPISpace(s))
	}
	return out, pagingAPIError(err)
}

func (b pagingBackend) ShowPaging(ctx context.Context, vm string) (api.PagingSpace, error) {
	s, err := b.svc.Show(ctx, vm)
	return toAPISpace(s), pagingAPIError(err)
}

// newPagingCommand is `lupool paging`: paging space for VMs.
func newPagingCommand(cf *clientFlags, stdout, stderr io.Writer) *cobra.Command {
	var (
		size, host, kind, socket string
		copies                   int
		force                    bool
	)
	call := func(c *cobra.Command, fn func(ctx context.Context, cl *api.Client) error) error {
		return cf.call(c, luTimeout, fn)
	}
	oneVM := func(verb string) cobra.PositionalArgs {
		return exactArgs(1, "paging "+verb+" needs exactly one VM id")
	}
	request := &cobra.Command{
		Use:   "request VM --size SIZE",
		Short: "paging space for a VM: a thin LU with its writer on the VM's host and a copy on another node",
		Long: `Ask for paging (swap) space for a VM. The LU is named paging-VM; asking
again for the same VM and size returns it unchanged. Its writer is on
--host (default: the node asked), a redundant copy on another node (the
default when the pool has two nodes; the answer says when it cannot). Kind
memory (the default) holds both copies in the memory of two nodes, within
each node's --memory-budget. The answer says how to attach it: lupool
attach (rides over node loss), nbd-client, QEMU.`,
		Example: "  lupool paging request vm42 --size 8G\n  lupool paging request vm42 --size 8G --host n2 -o json",
		Args:    oneVM("request"),
		RunE: func(c *cobra.Command, args []string) error {
			n, err := parseLUSize(size, stderr)
			if err != nil {
				return err
			}
			req := api.PagingRequest{VM: args[0], SizeBytes: n, Host: host, Copies: copies, Kind: kind, Socket: socket}
			return call(c, func(ctx context.Context, cl *api.Client) error {
				sp, err := cl.RequestPaging(ctx, req)
				if err != nil {
					return err
				}
				if cf.output == "json" {
					return printJSON(stdout, sp)
				}
				return printPagingSpace(stdout, sp)
			})
		},
	}
	request.Flags().StringVar(&size, "size", "", "least size of the paging space, e.g. 8G (required)")
	request.Flags().StringVar(&host, "host", "", "node of the VM's host, where the writer goes (default: the node asked)")
	request.Flags().IntVar(&copies, "copies", 0, "copies on distinct nodes (default 2 when the pool has two nodes, else 1)")
	request.Flags().StringVar(&kind, "kind", "memory", "memory (RAM of the nodes, within --memory-budget) or file (sparse files)")
	request.Flags().StringVar(&socket, "socket", "", "unix socket the attach lines use (default /run/lupool/LU.sock)")
	_ = request.RegisterFlagCompletionFunc("kind", cobra.FixedCompletions([]string{"memory", "file"}, cobra.ShellCompDirectiveNoFileComp))

	release := &cobra.Command{
		Use:   "release VM",
		Short: "free a VM's paging space (refused while attached unless --force)",
		Args:  oneVM("release"),
		RunE: func(c *cobra.Command, args []string) error {
			return call(c, func(ctx context.Context, cl *api.Client) error {
				if err := cl.ReleasePaging(ctx, args[0], force); err != nil {
					return err
				}
				fmt.Fprintf(stdout, "released the paging space of VM %s\n", args[0])
				return nil
			})
		},
	}
	release.Flags().BoolVar(&force, "force", false, "release even while clients are attached (their I/O then fails)")

	list := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "every VM's paging space",
		Args:    exactArgs(0, "paging list takes no arguments"),
		RunE: func(c *cobra.Command, _ []string) error {
			return show(cf, c, stdout, (*api.Client).ListPaging, printPagingList)
		},
	}
	showCmd := &cobra.Command{
		Use:   "show VM",
		Short: "a VM's paging space: size, allocated, copies and their states, host, clients, how to attach",
		Args:  oneVM("show"),
		RunE: func(c *cobra.Command, args []string) error {
			get := func(cl *api.Client, ctx context.Context) (api.PagingSpace, error) { return cl.ShowPaging(ctx, args[0]) }
			return show(cf, c, stdout, get, printPagingSpace)
		},
	}
	var to string
	migrate := &cobra.Command{
		Use:   "migrate VM --to NODE",
		Short: "move a VM's writer to its new host ahead of a live migration (the planned writer move)",
		Long: `Moves the writer of a VM's paging space to NODE, which must hold an in-sync
copy, without an I/O error for its clients, and waits until the move is done
or rolled back. Run it before the VM's live migration to NODE's host.`,
		Example: "  lupool paging migrate vm42 --to n2",
		Args:    oneVM("migrate"),
		RunE: func(c *cobra.Command, args []string) error {
			if to == "" {
				return usageErrorf("paging migrate needs --to NODE, the node of the VM's new host")
			}
			return call(c, func(ctx context.Context, cl *api.Client) error {
				sp, err := cl.MigratePaging(ctx, args[0], to)
				if err != nil {
					return err
				}
				if cf.output == "json" {
					return printJSON(stdout, sp)
				}
				return printPagingSpace(stdout, sp)
			})
		},
	}
	migrate.Flags().StringVar(&to, "to", "", "node of the VM's new host (it must hold an in-sync copy)")
	return newGroupCommand("paging", "paging (swap) space for VMs", "host", request, release, list, showCmd, migrate)
}

func copiesText(reps []api.PagingReplica) string {
	parts := make([]string, len(reps))
	for i, r := range reps {
		parts[i] = r.Node + ":" + r.State
	}
	return strings.Join(parts, ",")
}

func printPagingList(stdout io.Writer, list []api.PagingSpace) error {
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "VM\tLU\tSIZE\tALLOCATED\tKIND\tHOST\tCOPIES\tCLIENTS")
	for _, s := range list {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\n", s.VM, s.LU, units.Format(s.SizeBytes),
			units.Format(s.AllocatedBytes), s.Kind, s.Host, copiesText(s.Replicas), s.Clients)
	}
	return tw.Flush()
}

func printPagingSpace(stdout io.Writer, s api.PagingSpace) error {
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "vm\t%s\n", s.VM)
	fmt.Fprintf(tw, "lu\t%s\n", s.LU)
	fmt.Fprintf(tw, "size\t%s\n", units.Format(s.SizeBytes))
	fmt.Fprintf(tw, "allocated\t%s\n", units.Format(s.AllocatedBytes))
	fmt.Fprintf(tw, "kind\t%s\n", s.Kind)
	fmt.Fprintf(tw, "host (writer)\t%s\n", s.Host)
	fmt.Fprintf(tw, "copies\t%d (%s)\n", s.Copies, copiesText(s.Replicas))
	clients := fmt.Sprint(s.Clients)
	if len(s.ClientsWhere) > 0 {
		clients += " (" + strings.Join(s.ClientsWhere, ", ") + ")"
	}
	fmt.Fprintf(tw, "clients\t%s\n", clients)
	fmt.Fprintf(tw, "nbd uri\t%s\n", s.Attach.URI)
	fmt.Fprintf(tw, "attach\t%s\n", s.Attach.LupoolAttach)
	fmt.Fprintf(tw, "nbd-client\t%s\n", s.Attach.NBDClient)
	fmt.Fprintf(tw, "qemu\t-drive %s\n", s.Attach.QEMUDrive)
	for _, n := range s.Notes {
		fmt.Fprintf(tw, "note\t%s\n", n)
	}
	return tw.Flush()
}
