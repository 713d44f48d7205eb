package api

import (
	"context"
	"net/http"
	"net/url"
	"time"
)

// MoveRequest is the body of POST /v1/lus/{name}/move: hand the LU's
// writer role to node To, which must hold an in-sync copy. With Wait the
// answer comes once the move ended (done or rolled back), else once it is
// recorded.
type MoveRequest struct {
	To   string `json:"to"`
	Wait bool   `json:"wait,omitempty"`
}

// MoveResult is the answer to a move request.
type MoveResult struct {
	LU   string `json:"lu"`
	From string `json:"from"`
	To   string `json:"to"`
	// Outcome is "requested" (not waited for), "done" or "rolled-back".
	Outcome string `json:"outcome"`
	// Reason says why a move was rolled back.
	Reason string `json:"reason,omitempty"`
	// Writer is the LU's writer after the move.
	Writer string `json:"writer,omitempty"`
	// Seconds is how long the move took (waited for).
	Seconds float64 `json:"seconds,omitempty"`
}

// Move is a planned writer move in progress (GET /v1/moves, and an LU's
// move in GET /v1/lus/{name}).
type Move struct {
	LU         string        `json:"lu"`
	From       string        `json:"from"`
	To         string        `json:"to"`
	Epoch      uint64        `json:"epoch"`
	State      string        `json:"state"`
	Monitors   []MoveMonitor `json:"monitors"`
	StartedAt  time.Time     `json:"started_at"`
	AgeSeconds float64       `json:"age_seconds"`
}

// MoveMonitor is one monitor of a move and its last recorded step.
type MoveMonitor struct {
	Role string    `json:"role"`
	Node string    `json:"node"`
	Step string    `json:"step"`
	At   time.Time `json:"at"`
}

// MoveOpRequest is the body of POST /v1/internal/lus/{name}/move-op: a
// node's move monitor records an operation (cluster.MoveOp) as the
// calling node.
type MoveOpRequest struct {
	Op     string `json:"op"`
	Role   string `json:"role"`
	Step   string `json:"step,omitempty"`
	Reason string `json:"reason,omitempty"`
}

// MoveLU asks for a planned move of an LU's writer role to node to.
func (c *Client) MoveLU(ctx context.Context, name string, req MoveRequest) (MoveResult, error) {
	var out MoveResult
	err := c.do(ctx, http.MethodPost, "/v1/lus/"+url.PathEscape(name)+"/move", req, &out)
	return out, err
}

// ListMoves returns the moves in progress.
func (c *Client) ListMoves(ctx context.Context) ([]Move, error) {
	var out []Move
	err := c.do(ctx, http.MethodGet, "/v1/moves", nil, &out)
	return out, err
}

// ProposeMoveOp records a move operation as the calling node (its
// certificate), on the metadata leader's peer port.
func (c *Client) ProposeMoveOp(ctx context.Context, name string, req MoveOpRequest) error {
	return c.do(ctx, http.MethodPost, "/v1/internal/lus/"+url.PathEscape(name)+"/move-op", req, nil)
}

func (h *Handler) moveLU(ctx context.Context, r *http.Request, body []byte) (int, any, error) {
	var req MoveRequest
	if err := decode(body, &req); err != nil {
		return 0, nil, err
	}
	res, err := h.opts.Backend.MoveLU(ctx, r.PathValue("name"), req)
	return http.StatusOK, res, err
}

func (h *Handler) listMoves(w http.ResponseWriter, r *http.Request) {
	moves, err := h.opts.Backend.ListMoves(r.Context())
	h.reply(w, moves, err)
}

func (h *Handler) proposeMoveOp(ctx context.Context, r *http.Request, body []byte) (int, any, error) {
	var req MoveOpRequest
	if err := decode(body, &req); err != nil {
		return 0, nil, err
	}
	return http.StatusNoContent, nil, h.opts.Backend.ProposeMoveOp(ctx, r.PathValue("name"), req)
}
