package api

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"time"
)

// FFDCInfo describes one failure data capture bundle (GET /v1/ffdc).
type FFDCInfo struct {
	ID            string    `json:"id"`
	CorrelationID string    `json:"correlation_id"`
	Node          string    `json:"node"`
	Nodes         []string  `json:"nodes,omitempty"`
	Trigger       string    `json:"trigger"`
	Reason        string    `json:"reason,omitempty"`
	CreatedAt     time.Time `json:"created_at"`
	Bytes         int64     `json:"bytes"`
	Complete      bool      `json:"complete"`
}

// FFDCRequest is the body of POST /v1/ffdc.
type FFDCRequest struct {
	// AllNodes gathers every member's parts into the one bundle.
	AllNodes bool   `json:"all_nodes,omitempty"`
	Reason   string `json:"reason,omitempty"`
}

// FFDCStore is what the FFDC endpoints serve (Options.FFDC).
type FFDCStore interface {
	// CollectFFDC builds and stores a bundle (on the primary; a
	// NotLeaderError elsewhere makes the handler forward the request).
	CollectFFDC(ctx context.Context, req FFDCRequest) (FFDCInfo, error)
	ListFFDC(ctx context.Context) ([]FFDCInfo, error)
	// GetFFDC returns a complete bundle (tar.gz).
	GetFFDC(ctx context.Context, id string) (FFDCInfo, []byte, error)
	// FFDCParts builds this node's parts of a bundle (tar.gz), for the
	// node that gathers an --all-nodes bundle.
	FFDCParts(ctx context.Context, correlationID, trigger, reason string) ([]byte, error)
	// StoreFFDC stores a bundle the calling member built (CallerFrom(ctx).Node).
	StoreFFDC(ctx context.Context, info FFDCInfo, data []byte) error
}

// ffdcBodyMax bounds a bundle a node sends to the leader.
const ffdcBodyMax = 16 << 20

func (h *Handler) collectFFDC(ctx context.Context, _ *http.Request, body []byte) (int, any, error) {
	var req FFDCRequest
	if len(body) > 0 {
		if err := decode(body, &req); err != nil {
			return 0, nil, err
		}
	}
	info, err := h.opts.FFDC.CollectFFDC(ctx, req)
	return http.StatusCreated, info, err
}

func (h *Handler) listFFDC(w http.ResponseWriter, r *http.Request) {
	list, err := h.opts.FFDC.ListFFDC(r.Context())
	if list == nil {
		list = []FFDCInfo{}
	}
	h.reply(w, list, err)
}

func (h *Handler) getFFDC(w http.ResponseWriter, r *http.Request) {
	info, data, err := h.opts.FFDC.GetFFDC(r.Context(), r.PathValue("id"))
	if err != nil {
		h.fail(w, err)
		return
	}
	w.Header().Set("Content-Type", "application/gzip")
	w.Header().Set("Content-Disposition", fmt.Sprintf("attachment; filename=%q", info.ID+".tar.gz"))
	w.Header().Set("Content-Length", strconv.Itoa(len(data)))
	_, _ = w.Write(data)
}

func (h *Handler) ffdcParts(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	data, err := h.opts.FFDC.FFDCParts(r.Context(), q.Get("correlation_id"), q.Get("trigger"), q.Get("reason"))
	if err != nil {
		h.fail(w, err)
		return
	}
	w.Header().Set("Content-Type", "application/gzip")
	_, _ = w.Write(data)
}

// storeFFDC takes a bundle a member built: the body is the tar.gz, the
// query its description. Like the other node-only proposals it is never
// forwarded (the leader must see the producing node's certificate).
func (h *Handler) storeFFDC(w http.ResponseWriter, r *http.Request) {
	data, err := io.ReadAll(http.MaxBytesReader(w, r.Body, ffdcBodyMax))
	if err != nil {
		writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("bundle over %d bytes or unreadable: %v", ffdcBodyMax, err))
		return
	}
	q := r.URL.Query()
	info := FFDCInfo{ID: q.Get("id"), CorrelationID: q.Get("correlation_id"), Trigger: q.Get("trigger"), Reason: q.Get("reason"),
		Node: CallerFrom(r.Context()).Node}
	err = h.opts.FFDC.StoreFFDC(r.Context(), info, data)
	var nl *NotLeaderError
	if errors.As(err, &nl) {
		writeJSON(w, http.StatusServiceUnavailable, NotLeaderBody{Error: cleanMessage(err), LeaderID: nl.LeaderID, LeaderPeer: nl.LeaderPeer})
		return
	}
	if err != nil {
		h.fail(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// CollectFFDC builds and stores a bundle (on every node with AllNodes).
func (c *Client) CollectFFDC(ctx context.Context, req FFDCRequest) (FFDCInfo, error) {
	var out FFDCInfo
	err := c.do(ctx, http.MethodPost, "/v1/ffdc", req, &out)
	return out, err
}

// ListFFDC lists the bundles in the repository.
func (c *Client) ListFFDC(ctx context.Context) ([]FFDCInfo, error) {
	var out []FFDCInfo
	err := c.do(ctx, http.MethodGet, "/v1/ffdc", nil, &out)
	return out, err
}

// GetFFDC downloads a bundle into w.
func (c *Client) GetFFDC(ctx context.Context, id string, w io.Writer) error {
	return c.raw(ctx, http.MethodGet, "/v1/ffdc/"+url.PathEscape(id), nil, w)
}

// FFDCParts asks a node for its parts of a bundle (node-only).
func (c *Client) FFDCParts(ctx context.Context, correlationID, trigger, reason string, w io.Writer) error {
	q := url.Values{"correlation_id": {correlationID}, "trigger": {trigger}, "reason": {reason}}
	return c.raw(ctx, http.MethodGet, "/v1/internal/ffdc/parts?"+q.Encode(), nil, w)
}

// StoreFFDC sends a bundle this node built to the leader (node-only).
func (c *Client) StoreFFDC(ctx context.Context, info FFDCInfo, data []byte) error {
	q := url.Values{"id": {info.ID}, "correlation_id": {info.CorrelationID}, "trigger": {info.Trigger}, "reason": {info.Reason}}
	return c.raw(ctx, http.MethodPost, "/v1/internal/ffdc?"+q.Encode(), data, io.Discard)
}
