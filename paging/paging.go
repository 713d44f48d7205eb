// Package paging hands out paging (swap) space to virtual machines: a VM's
// host asks the pool for a thin LU of a minimum size, gets one whose
// writer is on the VM's host and whose redundant copy sits on another
// node, and attaches it through `lupool attach` (which rides over node
// loss), nbd-client or QEMU.
//
// A paging LU is an ordinary LU with a profile:
//
//   - its name is "paging-" + the VM id, and its description
//     "paging space of VM " + the VM id (both mark it as paging space:
//     Request, Release, List and Show see no other LU);
//   - kind memory by default (two copies in the memory of two nodes: swap
//     need not survive a power loss of the whole pool, but must survive a
//     node), file on request; memory LUs draw on each node's memory
//     budget (lu.PoolOptions.MemoryBudgetBytes, `lupool serve
//     --memory-budget`), and a request past it is refused before anything
//     is recorded;
//   - two copies when the pool has two storage nodes or more, else one
//     (and the answer says so).
//
// Request is idempotent, keyed by the VM id: asking again for the same VM
// and size returns the LU already there. Release refuses while clients are
// attached unless forced. Migrate (moving the writer to the VM's new host
// ahead of a live migration) goes through a Mover: the planned writer move
// of the cluster, wired by cmd/lupool when it exists.
//
// The package knows nothing of the HTTP API or the CLI: cmd/lupool adapts
// the control plane to LUs and maps this package's sentinels onto the
// API's. The swap safety of a process (locked memory, PR_SET_IO_FLUSHER)
// is in swapsafe.go.
package paging

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"

	"github.com/lupool/lupool/internal/rules"
)

// Sentinel errors, matched with errors.Is. Errors from LUs are passed on
// wrapped, so their own sentinels still match.
var (
	// ErrInvalid is returned for a request that cannot be served as
	// given (a bad VM id, size 0, copies the pool cannot hold).
	ErrInvalid = errors.New("paging: invalid request")
	// ErrNotFound is returned when a VM has no paging space.
	ErrNotFound = errors.New("paging: not found")
	// ErrExists is returned when a request conflicts with what is there
	// (the VM's paging space has another size or kind, or an LU that is
	// not paging space holds the name).
	ErrExists = errors.New("paging: conflicts with existing paging space")
	// ErrBusy is returned by Release while clients are attached.
	ErrBusy = errors.New("paging: in use")
	// ErrUnsupported is returned by Migrate while no Mover is wired.
	ErrUnsupported = errors.New("paging: not supported by this node")
)

// Profile of a paging LU.
const (
	// NamePrefix precedes the VM id in a paging LU's name.
	NamePrefix = "paging-"
	// DescriptionPrefix precedes the VM id in a paging LU's description.
	DescriptionPrefix = "paging space of VM "
	// KindMemory and KindFile are the LU kinds paging space may have.
	KindMemory = "memory"
	KindFile   = "file"
	// DefaultCopies is the copy count when the pool has enough nodes.
	DefaultCopies = 2
	// SocketDir is where the attach command given back serves the LU.
	SocketDir = "/run/lupool"
)

// LU is an LU as the control plane records it, with the asking node's
// view of its allocation.
type LU struct {
	Name, Description, Kind, Writer string
	SizeBytes, AllocatedBytes       int64
	Copies                          int
	Epoch                           uint64
	Replicas                        []Copy
}

// Copy is one copy of an LU and its state (in-sync, out-of-sync, ...).
type Copy struct {
	Node  string `json:"node"`
	State string `json:"state"`
}

// Node is a member of the pool that can hold copies.
type Node struct {
	ID      string
	NBDAddr string // HOST:PORT of its NBD server
	APIAddr string
}

// CreateSpec is what Request asks the control plane to create.
type CreateSpec struct {
	Name, Description, Kind string
	SizeBytes               int64
	Copies                  int
	// Node is the writer's node.
	Node string
}

// LUs is the control plane as this package uses it (cmd/lupool adapts
// control.Plane). Get returns an error matching ErrNotFound for an unknown
// name. Implementations must be safe for concurrent use.
type LUs interface {
	Create(ctx context.Context, spec CreateSpec) (LU, error)
	Get(ctx context.Context, name string) (LU, error)
	List(ctx context.Context) ([]LU, error)
	// Delete removes an LU; force ends its clients' I/O.
	Delete(ctx context.Context, name string, force bool) error
	// Clients counts the NBD clients attached to an LU through every node
	// and says where ("1 on n1").
	Clients(ctx context.Context, name string) (int, []string)
	// Nodes lists the members that can hold copies (not witnesses).
	Nodes(ctx context.Context) ([]Node, error)
}

// Mover moves an LU's writer to another node holding an in-sync copy
// without an I/O error for its clients (the planned writer move).
type Mover interface {
	MoveWriter(ctx context.Context, lu, to string) error
}

// Request is a VM's request for paging space.
type Request struct {
	VM        string `json:"vm"`
	SizeBytes int64  `json:"size_bytes"`
	// Host is the node of the VM's host, where the writer goes; empty
	// means the node that received the request.
	Host string `json:"host,omitempty"`
	// Copies is 1 or more; 0 means DefaultCopies when the pool has that
	// many storage nodes, else 1.
	Copies int `json:"copies,omitempty"`
	// Kind is KindMemory (default) or KindFile.
	Kind string `json:"kind,omitempty"`
	// Socket is the unix socket the attach command given back listens
	// on; empty means SocketDir/LU.sock.
	Socket string `json:"socket,omitempty"`
}

// Space is a VM's paging space.
type Space struct {
	VM             string `json:"vm"`
	LU             string `json:"lu"`
	SizeBytes      int64  `json:"size_bytes"`
	AllocatedBytes int64  `json:"allocated_bytes"`
	Kind           string `json:"kind"`
	Copies         int    `json:"copies"`
	// Host is the node of the LU's writer.
	Host     string `json:"host"`
	Epoch    uint64 `json:"epoch"`
	Replicas []Copy `json:"replicas"`
	// Clients are the NBD clients attached through every node, and
	// ClientsWhere where they are.
	Clients      int      `json:"clients"`
	ClientsWhere []string `json:"clients_where,omitempty"`
	// Existed is true when Request found the space already there.
	Existed bool `json:"existed,omitempty"`
	// Notes say what the answer decided for the caller (fewer copies
	// than asked for by default, a writer on another host).
	Notes  []string `json:"notes,omitempty"`
	Attach Attach   `json:"attach"`
}

// Attach says how to attach paging space.
type Attach struct {
	// URI is the NBD URI of the LU on its writer's node.
	URI string `json:"uri"`
	// Lupool is the `lupool attach` command serving it on Socket: the
	// recommended way, it rides over node loss.
	Lupool string `json:"lupool_attach"`
	Socket string `json:"socket"`
	// NBDClient is the nbd-client line for a kernel swap device.
	NBDClient string `json:"nbd_client"`
	// QEMUDrive is QEMU's -drive argument for the socket of Lupool.
	QEMUDrive string `json:"qemu_drive"`
}

// Options configure a Service.
type Options struct {
	// LUs is the control plane. Required.
	LUs LUs
	// NodeID is this node's id: the host of a request that names none.
	// Required.
	NodeID string
	// Mover, when set, makes Migrate work; nil answers ErrUnsupported.
	Mover Mover
	// Metrics, when set, counts requests and releases by result.
	Metrics *Metrics
	// Notify, when set, is told of every paging space made by Request
	// and freed by Release (the daemon turns them into the events
	// PagingRequested and PagingReleased). It must not block.
	Notify func(Notice)
}

// Notice is a change of a VM's paging space.
type Notice struct {
	// Kind is NoticeRequested or NoticeReleased.
	Kind      string
	VM, LU    string
	SizeBytes int64
}

// Notice kinds.
const (
	NoticeRequested = "requested"
	NoticeReleased  = "released"
)

func (s *Service) notify(n Notice) {
	if s.opts.Notify != nil {
		s.opts.Notify(n)
	}
}

// Service serves paging requests. It holds no state of its own (the LU
// table is the record) and is safe for concurrent use.
type Service struct {
	opts Options // immutable
}

// New returns a Service.
func New(opts Options) (*Service, error) {
	if opts.LUs == nil || opts.NodeID == "" {
		return nil, errors.New("paging: options: LUs and NodeID are required")
	}
	return &Service{opts: opts}, nil
}

// LUName is the name of VM's paging LU.
func LUName(vm string) string { return NamePrefix + vm }

// checkVM validates a VM id: its LU name must pass the LU name rule.
func checkVM(vm string) error {
	if vm == "" {
		return fmt.Errorf("%w: no VM id; give the VM's id, e.g. vm42", ErrInvalid)
	}
	if err := rules.Name(LUName(vm)); err != nil {
		return fmt.Errorf("%w: VM id %q: %w (the LU name %s+VM id must pass it; at most %d characters)",
			ErrInvalid, vm, err, NamePrefix, rules.NameLengthMax-len(NamePrefix))
	}
	return nil
}

// isPaging reports whether lu is paging space, and whose.
func isPaging(lu LU) (vm string, ok bool) {
	vm, ok = strings.CutPrefix(lu.Name, NamePrefix)
	return vm, ok && lu.Description == DescriptionPrefix+vm
}

// Request creates VM's paging space, or returns it when it is already
// there with the same size and kind. Bad input, copies the pool cannot
// hold and a memory budget too small are refused before anything is
// recorded.
func (s *Service) Request(ctx context.Context, req Request) (Space, error) {
	sp, err := s.request(ctx, req)
	s.opts.Metrics.request(sp, err)
	return sp, err
}

func (s *Service) request(ctx context.Context, req Request) (Space, error) {
	if err := checkVM(req.VM); err != nil {
		return Space{}, err
	}
	if err := rules.Size(req.SizeBytes); err != nil {
		return Space{}, fmt.Errorf("%w: size %d bytes: %w", ErrInvalid, req.SizeBytes, err)
	}
	if req.Kind == "" {
		req.Kind = KindMemory
	}
	if req.Kind != KindMemory && req.Kind != KindFile {
		return Space{}, fmt.Errorf("%w: kind %q: use memory or file", ErrInvalid, req.Kind)
	}
	if req.Copies < 0 || req.Copies > rules.CopiesMax {
		return Space{}, fmt.Errorf("%w: copies %d: use 1 to %d (0: the default)", ErrInvalid, req.Copies, rules.CopiesMax)
	}
	if req.Host == "" {
		req.Host = s.opts.NodeID
	}
	nodes, err := s.opts.LUs.Nodes(ctx)
	if err != nil {
		return Space{}, err
	}
	host, ok := findNode(nodes, req.Host)
	if !ok {
		return Space{}, fmt.Errorf("%w: host %q is not a storage node of this pool (nodes: %s; see lupool node list)",
			ErrInvalid, req.Host, nodeIDs(nodes))
	}
	name := LUName(req.VM)
	existing, err := s.opts.LUs.Get(ctx, name)
	switch {
	case err == nil:
		return s.existing(ctx, req, existing, nodes)
	case !errors.Is(err, ErrNotFound):
		return Space{}, err
	}
	copies, notes, err := chooseCopies(req.Copies, nodes)
	if err != nil {
		return Space{}, err
	}
	lu, err := s.opts.LUs.Create(ctx, CreateSpec{Name: name, Description: DescriptionPrefix + req.VM,
		Kind: req.Kind, SizeBytes: req.SizeBytes, Copies: copies, Node: host.ID})
	if err != nil {
		return Space{}, fmt.Errorf("paging space of VM %q: %w", req.VM, err)
	}
	s.notify(Notice{Kind: NoticeRequested, VM: req.VM, LU: lu.Name, SizeBytes: lu.SizeBytes})
	sp := s.space(ctx, req.VM, lu, nodes, req.Socket)
	sp.Notes = notes
	return sp, nil
}

// existing answers a request for paging space that is already there.
func (s *Service) existing(ctx context.Context, req Request, lu LU, nodes []Node) (Space, error) {
	if _, ok := isPaging(lu); !ok {
		return Space{}, fmt.Errorf("%w: an LU named %q exists and is not paging space; delete or rename it (lupool lu delete %s)",
			ErrExists, lu.Name, lu.Name)
	}
	if lu.SizeBytes != req.SizeBytes || lu.Kind != req.Kind {
		return Space{}, fmt.Errorf("%w: VM %q has paging space of %d bytes, kind %s; asked for %d bytes, kind %s: release it first (lupool paging release %s)",
			ErrExists, req.VM, lu.SizeBytes, lu.Kind, req.SizeBytes, req.Kind, req.VM)
	}
	sp := s.space(ctx, req.VM, lu, nodes, req.Socket)
	sp.Existed = true
	sp.Notes = append(sp.Notes, "the VM already had this paging space; nothing was changed")
	if lu.Writer != req.Host {
		sp.Notes = append(sp.Notes, fmt.Sprintf("its writer is on %s, not on host %s", lu.Writer, req.Host))
	}
	if req.Copies != 0 && req.Copies != lu.Copies {
		sp.Notes = append(sp.Notes, fmt.Sprintf("it keeps %d copies, not the %d asked for", lu.Copies, req.Copies))
	}
	return sp, nil
}

// chooseCopies applies the copy rule: an explicit count must fit the
// storage nodes; the default is DefaultCopies, or fewer (with a note)
// when the pool has fewer nodes.
func chooseCopies(asked int, nodes []Node) (int, []string, error) {
	if asked == 0 {
		if len(nodes) >= DefaultCopies {
			return DefaultCopies, nil, nil
		}
		return len(nodes), []string{fmt.Sprintf(
			"one copy only: the pool has %d storage node(s), so the paging space does not survive the loss of %s; add a node and run lupool lu add-copy",
			len(nodes), nodeIDs(nodes))}, nil
	}
	if asked > len(nodes) {
		return 0, nil, fmt.Errorf("%w: copies %d needs %d storage nodes and the pool has %d (%s): no node for copy %d; add a node or ask for --copies %d",
			ErrInvalid, asked, asked, len(nodes), nodeIDs(nodes), len(nodes)+1, len(nodes))
	}
	return asked, nil, nil
}

// Release frees VM's paging space. It is refused with ErrBusy while
// clients are attached through any node, unless force (which ends their
// I/O).
func (s *Service) Release(ctx context.Context, vm string, force bool) error {
	err := s.release(ctx, vm, force)
	s.opts.Metrics.release(err)
	return err
}

func (s *Service) release(ctx context.Context, vm string, force bool) error {
	lu, err := s.get(ctx, vm)
	if err != nil {
		return err
	}
	if !force {
		if n, where := s.opts.LUs.Clients(ctx, lu.Name); n > 0 {
			return fmt.Errorf("%w: paging space of VM %q has %d client(s) attached (%s); stop the VM or detach them first, or release with --force to end their I/O",
				ErrBusy, vm, n, strings.Join(where, ", "))
		}
	}
	if err := s.opts.LUs.Delete(ctx, lu.Name, force); err != nil {
		return fmt.Errorf("paging space of VM %q: %w", vm, err)
	}
	s.notify(Notice{Kind: NoticeReleased, VM: vm, LU: lu.Name, SizeBytes: lu.SizeBytes})
	return nil
}

// Show returns VM's paging space.
func (s *Service) Show(ctx context.Context, vm string) (Space, error) {
	lu, err := s.get(ctx, vm)
	if err != nil {
		return Space{}, err
	}
	nodes, err := s.opts.LUs.Nodes(ctx)
	if err != nil {
		return Space{}, err
	}
	return s.space(ctx, vm, lu, nodes, ""), nil
}

// List returns every VM's paging space, by VM id.
func (s *Service) List(ctx context.Context) ([]Space, error) {
	lus, err := s.opts.LUs.List(ctx)
	if err != nil {
		return nil, err
	}
	nodes, err := s.opts.LUs.Nodes(ctx)
	if err != nil {
		return nil, err
	}
	out := []Space{}
	for _, lu := range lus {
		if vm, ok := isPaging(lu); ok {
			out = append(out, s.space(ctx, vm, lu, nodes, ""))
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].VM < out[j].VM })
	return out, nil
}

// get returns VM's paging LU (ErrNotFound naming the VM).
func (s *Service) get(ctx context.Context, vm string) (LU, error) {
	if err := checkVM(vm); err != nil {
		return LU{}, err
	}
	lu, err := s.opts.LUs.Get(ctx, LUName(vm))
	if errors.Is(err, ErrNotFound) {
		return LU{}, fmt.Errorf("%w: VM %q has no paging space (see lupool paging list)", ErrNotFound, vm)
	}
	if err != nil {
		return LU{}, err
	}
	if _, ok := isPaging(lu); !ok {
		return LU{}, fmt.Errorf("%w: VM %q has no paging space: the LU %q is not paging space (see lupool paging list)", ErrNotFound, vm, lu.Name)
	}
	return lu, nil
}

// space builds the answer for lu, with the attach lines for its writer's
// node.
func (s *Service) space(ctx context.Context, vm string, lu LU, nodes []Node, socket string) Space {
	sp := Space{VM: vm, LU: lu.Name, SizeBytes: lu.SizeBytes, AllocatedBytes: lu.AllocatedBytes, Kind: lu.Kind,
		Copies: lu.Copies, Host: lu.Writer, Epoch: lu.Epoch, Replicas: append([]Copy{}, lu.Replicas...)}
	sp.Clients, sp.ClientsWhere = s.opts.LUs.Clients(ctx, lu.Name)
	var nbdAddr, apiAddr string
	if n, ok := findNode(nodes, lu.Writer); ok {
		nbdAddr, apiAddr = n.NBDAddr, n.APIAddr
	}
	sp.Attach = AttachLines(lu.Name, nbdAddr, apiAddr, socket)
	return sp
}

// AttachLines are the ways to attach LU name served by a node at nbdAddr
// (HOST:PORT) whose API is apiAddr, with the endpoint on socket (empty:
// SocketDir/NAME.sock).
func AttachLines(name, nbdAddr, apiAddr, socket string) Attach {
	if socket == "" {
		socket = SocketDir + "/" + name + ".sock"
	}
	host, port := nbdAddr, "10809"
	if i := strings.LastIndex(nbdAddr, ":"); i >= 0 {
		host, port = nbdAddr[:i], nbdAddr[i+1:]
	}
	lupool := "lupool attach " + name + " --listen unix:" + socket
	if apiAddr != "" {
		lupool = "lupool --api " + apiAddr + " attach " + name + " --listen unix:" + socket
	}
	return Attach{
		URI:    "nbd://" + nbdAddr + "/" + name,
		Lupool: lupool,
		Socket: socket,
		// 4 KiB blocks (a page), a swap device (nbd-client locks itself in
		// memory), no request timeout (a failover is a pause, not an
		// error). nbd-client cannot move to another node when this one
		// is lost: lupool attach LU /dev/nbdX can.
		NBDClient: fmt.Sprintf("nbd-client -N %s -b 4096 -swap -timeout 0 %s %s /dev/nbd0", name, host, port),
		// discard=unmap passes the guest's swap discards on as TRIM.
		QEMUDrive: "file=nbd:unix:" + socket + ":exportname=" + name + ",format=raw,if=virtio,cache=none,discard=unmap",
	}
}

// Migrate moves VM's writer to node to, ahead of a live migration of the
// VM to that host, through the planned writer move (Options.Mover). Until
// cmd/lupool wires a Mover it answers ErrUnsupported.
func (s *Service) Migrate(ctx context.Context, vm, to string) (Space, error) {
	lu, err := s.get(ctx, vm)
	if err != nil {
		return Space{}, err
	}
	if s.opts.Mover == nil {
		return Space{}, fmt.Errorf("%w: moving the writer of paging space (planned writer moves) is not built into this node", ErrUnsupported)
	}
	if lu.Writer != to {
		if err := s.opts.Mover.MoveWriter(ctx, lu.Name, to); err != nil {
			return Space{}, fmt.Errorf("paging space of VM %q: move to %s: %w", vm, to, err)
		}
	}
	return s.Show(ctx, vm)
}

func findNode(nodes []Node, id string) (Node, bool) {
	for _, n := range nodes {
		if n.ID == id {
			return n, true
		}
	}
	return Node{}, false
}

func nodeIDs(nodes []Node) string {
	ids := make([]string, len(nodes))
	for i, n := range nodes {
		ids[i] = n.ID
	}
	if len(ids) == 0 {
		return "none"
	}
	return strings.Join(ids, ", ")
}
