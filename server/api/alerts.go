package api

import (
	"context"
	"fmt"
	"net/http"
)

// PoolAlerts are the pool's alert thresholds (GET and PUT /v1/pool/alerts,
// `lupool pool alert`), kept in the metadata for every node: each node
// reports a PoolThreshold event when its pool's usage crosses
// ThresholdPercent (warn), CriticalPercent (critical) or falls back below
// (ok), and OvercommitApproached when its provisioned bytes reach
// OvercommitPercent of its capacity.
type PoolAlerts struct {
	ThresholdPercent float64 `json:"threshold_percent"`
	CriticalPercent  float64 `json:"critical_percent"`
	// OvercommitPercent: 0 means no overcommit alert.
	OvercommitPercent float64 `json:"overcommit_percent"`
}

// Validate says what is wrong with a, if anything.
func (a PoolAlerts) Validate() error {
	switch {
	case a.ThresholdPercent <= 0 || a.ThresholdPercent > 100:
		return fmt.Errorf("%w: threshold %g%%: want more than 0 and at most 100", ErrInvalid, a.ThresholdPercent)
	case a.CriticalPercent < a.ThresholdPercent || a.CriticalPercent > 100:
		return fmt.Errorf("%w: critical %g%%: want between the threshold %g%% and 100", ErrInvalid, a.CriticalPercent, a.ThresholdPercent)
	case a.OvercommitPercent < 0:
		return fmt.Errorf("%w: overcommit %g%%: want 0 (none) or more", ErrInvalid, a.OvercommitPercent)
	}
	return nil
}

// AlertStore keeps the pool's alert thresholds (Options.Alerts).
type AlertStore interface {
	PoolAlerts(ctx context.Context) (PoolAlerts, error)
	// SetPoolAlerts runs on the primary (a NotLeaderError elsewhere makes
	// the handler forward the request).
	SetPoolAlerts(ctx context.Context, a PoolAlerts) (PoolAlerts, error)
}

func (h *Handler) poolAlerts(w http.ResponseWriter, r *http.Request) {
	a, err := h.opts.Alerts.PoolAlerts(r.Context())
	h.reply(w, a, err)
}

func (h *Handler) setPoolAlerts(ctx context.Context, _ *http.Request, body []byte) (int, any, error) {
	var a PoolAlerts
	if err := decode(body, &a); err != nil {
		return 0, nil, err
	}
	if err := a.Validate(); err != nil {
		return 0, nil, err
	}
	out, err := h.opts.Alerts.SetPoolAlerts(ctx, a)
	return http.StatusOK, out, err
}

// PoolAlerts reads the pool's alert thresholds.
func (c *Client) PoolAlerts(ctx context.Context) (PoolAlerts, error) {
	var out PoolAlerts
	err := c.do(ctx, http.MethodGet, "/v1/pool/alerts", nil, &out)
	return out, err
}

// SetPoolAlerts stores the pool's alert thresholds.
func (c *Client) SetPoolAlerts(ctx context.Context, a PoolAlerts) (PoolAlerts, error) {
	var out PoolAlerts
	err := c.do(ctx, http.MethodPut, "/v1/pool/alerts", a, &out)
	return out, err
}
