package api

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
)

// PagingBackend serves paging space for VMs (Options.Paging): the daemon
// wires it to package paging. Errors wrap this package's sentinels.
type PagingBackend interface {
	// RequestPaging creates a VM's paging space, or returns it when it is
	// there already with the same size and kind (Existed).
	RequestPaging(ctx context.Context, req PagingRequest) (PagingSpace, error)
	// ReleasePaging frees it; ErrBusy while clients are attached, unless
	// force.
	ReleasePaging(ctx context.Context, vm string, force bool) error
	ListPaging(ctx context.Context) ([]PagingSpace, error)
	ShowPaging(ctx context.Context, vm string) (PagingSpace, error)
	// MigratePaging moves a VM's writer to node to (the planned writer
	// move) ahead of a live migration of the VM, and returns the space as
	// it is then; a NotLeaderError is forwarded to the leader.
	MigratePaging(ctx context.Context, vm, to string) (PagingSpace, error)
}

// PagingMigrateRequest is the body of POST /v1/paging/{vm}/migrate.
type PagingMigrateRequest struct {
	// To is the node of the VM's new host; it must hold an in-sync copy.
	To string `json:"to"`
}

// PagingRequest is the body of POST /v1/paging.
type PagingRequest struct {
	VM        string `json:"vm"`
	SizeBytes int64  `json:"size_bytes"`
	// Host is the node where the writer goes (the VM's host); empty means
	// the node that received the request (on the leader: the member that
	// forwarded it).
	Host string `json:"host,omitempty"`
	// Copies: 0 means 2 when the pool has two storage nodes, else 1.
	Copies int `json:"copies,omitempty"`
	// Kind is "memory" (default) or "file".
	Kind string `json:"kind,omitempty"`
	// Socket is the unix socket of the attach lines (default
	// /run/lupool/LU.sock).
	Socket string `json:"socket,omitempty"`
}

// PagingSpace is one VM's paging space (package paging's Space).
type PagingSpace struct {
	VM             string          `json:"vm"`
	LU             string          `json:"lu"`
	SizeBytes      int64           `json:"size_bytes"`
	AllocatedBytes int64           `json:"allocated_bytes"`
	Kind           string          `json:"kind"`
	Copies         int             `json:"copies"`
	Host           string          `json:"host"`
	Epoch          uint64          `json:"epoch"`
	Replicas       []PagingReplica `json:"replicas"`
	Clients        int             `json:"clients"`
	ClientsWhere   []string        `json:"clients_where,omitempty"`
	Existed        bool            `json:"existed,omitempty"`
	Notes          []string        `json:"notes,omitempty"`
	Attach         PagingAttach    `json:"attach"`
}

// PagingReplica is one copy of paging space and its state.
type PagingReplica struct {
	Node  string `json:"node"`
	State string `json:"state"`
}

// PagingAttach says how to attach paging space.
type PagingAttach struct {
	URI          string `json:"uri"`
	LupoolAttach string `json:"lupool_attach"`
	Socket       string `json:"socket"`
	NBDClient    string `json:"nbd_client"`
	QEMUDrive    string `json:"qemu_drive"`
}

func (h *Handler) registerPaging(admin func(string, http.HandlerFunc)) {
	admin("POST /v1/paging", h.mutating(h.requestPaging))
	admin("GET /v1/paging", func(w http.ResponseWriter, r *http.Request) {
		out, err := h.opts.Paging.ListPaging(r.Context())
		h.reply(w, out, err)
	})
	admin("GET /v1/paging/{vm}", func(w http.ResponseWriter, r *http.Request) {
		out, err := h.opts.Paging.ShowPaging(r.Context(), r.PathValue("vm"))
		h.reply(w, out, err)
	})
	admin("DELETE /v1/paging/{vm}", h.mutating(h.releasePaging))
	admin("POST /v1/paging/{vm}/migrate", h.mutating(h.migratePaging))
}

func (h *Handler) migratePaging(ctx context.Context, r *http.Request, body []byte) (int, any, error) {
	var req PagingMigrateRequest
	if err := decode(body, &req); err != nil {
		return 0, nil, err
	}
	if req.To == "" {
		return 0, nil, fmt.Errorf("%w: migrate needs the node of the VM's new host (\"to\")", ErrInvalid)
	}
	sp, err := h.opts.Paging.MigratePaging(ctx, r.PathValue("vm"), req.To)
	return http.StatusOK, sp, err
}

func (h *Handler) requestPaging(ctx context.Context, _ *http.Request, body []byte) (int, any, error) {
	var req PagingRequest
	if err := decode(body, &req); err != nil {
		return 0, nil, err
	}
	req.Host = h.writerNode(ctx, req.Host)
	sp, err := h.opts.Paging.RequestPaging(ctx, req)
	status := http.StatusCreated
	if sp.Existed {
		status = http.StatusOK
	}
	return status, sp, err
}

func (h *Handler) releasePaging(ctx context.Context, r *http.Request, _ []byte) (int, any, error) {
	force := false
	if v := r.URL.Query().Get("force"); v != "" {
		var err error
		if force, err = strconv.ParseBool(v); err != nil {
			return 0, nil, fmt.Errorf("%w: force=%q: use true or false", ErrInvalid, v)
		}
	}
	return http.StatusNoContent, nil, h.opts.Paging.ReleasePaging(ctx, r.PathValue("vm"), force)
}

// RequestPaging asks for a VM's paging space (POST /v1/paging).
func (c *Client) RequestPaging(ctx context.Context, req PagingRequest) (PagingSpace, error) {
	var out PagingSpace
	err := c.do(ctx, http.MethodPost, "/v1/paging", req, &out)
	return out, err
}

// ReleasePaging frees a VM's paging space (DELETE /v1/paging/{vm}).
func (c *Client) ReleasePaging(ctx context.Context, vm string, force bool) error {
	path := "/v1/paging/" + url.PathEscape(vm)
	if force {
		path += "?force=true"
	}
	return c.do(ctx, http.MethodDelete, path, nil, nil)
}

// ListPaging lists every VM's paging space (GET /v1/paging).
func (c *Client) ListPaging(ctx context.Context) ([]PagingSpace, error) {
	var out []PagingSpace
	err := c.do(ctx, http.MethodGet, "/v1/paging", nil, &out)
	return out, err
}

// ShowPaging shows a VM's paging space (GET /v1/paging/{vm}).
func (c *Client) ShowPaging(ctx context.Context, vm string) (PagingSpace, error) {
	var out PagingSpace
	err := c.do(ctx, http.MethodGet, "/v1/paging/"+url.PathEscape(vm), nil, &out)
	return out, err
}

// MigratePaging moves a VM's writer to node to ahead of a live migration
// (POST /v1/paging/{vm}/migrate) and waits until the move ends.
func (c *Client) MigratePaging(ctx context.Context, vm, to string) (PagingSpace, error) {
	var out PagingSpace
	err := c.do(ctx, http.MethodPost, "/v1/paging/"+url.PathEscape(vm)+"/migrate", PagingMigrateRequest{To: to}, &out)
	return out, err
}
