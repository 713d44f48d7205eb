package api

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
)

// SnapshotBackend serves LU snapshots (Options.Snapshots): the control
// plane. A snapshot is a read-only LU named LU@SNAP (LU.SnapshotOf names
// its LU), exported over NBD under that name.
type SnapshotBackend interface {
	// SnapshotLU freezes LU name's content at a flush point as snapshot
	// req.Name and returns the snapshot's LU.
	SnapshotLU(ctx context.Context, name string, req SnapshotRequest) (LU, error)
	// ListSnapshots returns LU name's snapshots, oldest name first.
	ListSnapshots(ctx context.Context, name string) ([]LU, error)
	// DeleteSnapshot deletes snapshot snap of LU name, merging it into
	// the layers that read it.
	DeleteSnapshot(ctx context.Context, name, snap string) error
	// RollbackLU makes LU name read what its snapshot req.Snapshot holds.
	RollbackLU(ctx context.Context, name string, req RollbackRequest) (LU, error)
	// RecordSnapshot records, on the leader, a snapshot the calling node
	// (CallerFrom: its certificate) froze as the LU's writer.
	RecordSnapshot(ctx context.Context, name string, req SnapshotRecordRequest) error
}

// SnapshotRecordRequest is the body of POST
// /v1/internal/lus/{name}/snapshot-record (node only, peer port): the
// LU's writer froze snapshot Snapshot on the nodes Copies and asks the
// leader to record it.
type SnapshotRecordRequest struct {
	Snapshot string   `json:"snapshot"`
	Copies   []string `json:"copies"`
}

// SnapshotRequest is the body of POST /v1/lus/{name}/snapshots.
type SnapshotRequest struct {
	// Name is the snapshot's name, SNAP (its LU is LU@SNAP).
	Name string `json:"name"`
}

// RollbackRequest is the body of POST /v1/lus/{name}/rollback.
type RollbackRequest struct {
	// Snapshot is the snapshot's name, SNAP.
	Snapshot string `json:"snapshot"`
	// Force rolls back while clients are attached (they then read the
	// snapshot's content under their feet).
	Force bool `json:"force,omitempty"`
}

func (h *Handler) registerSnapshots(admin, node func(string, http.HandlerFunc)) {
	node("POST /v1/internal/lus/{name}/snapshot-record", h.local(func(ctx context.Context, r *http.Request, body []byte) (int, any, error) {
		var req SnapshotRecordRequest
		if err := decode(body, &req); err != nil {
			return 0, nil, err
		}
		if req.Snapshot == "" || len(req.Copies) == 0 {
			return 0, nil, fmt.Errorf("%w: a snapshot record needs the snapshot's name and the copies that froze", ErrInvalid)
		}
		return http.StatusNoContent, nil, h.opts.Snapshots.RecordSnapshot(ctx, r.PathValue("name"), req)
	}))
	admin("POST /v1/lus/{name}/snapshots", h.mutating(func(ctx context.Context, r *http.Request, body []byte) (int, any, error) {
		var req SnapshotRequest
		if err := decode(body, &req); err != nil {
			return 0, nil, err
		}
		out, err := h.opts.Snapshots.SnapshotLU(ctx, r.PathValue("name"), req)
		return http.StatusCreated, out, err
	}))
	admin("GET /v1/lus/{name}/snapshots", func(w http.ResponseWriter, r *http.Request) {
		out, err := h.opts.Snapshots.ListSnapshots(r.Context(), r.PathValue("name"))
		h.reply(w, out, err)
	})
	admin("DELETE /v1/lus/{name}/snapshots/{snap}", h.mutating(func(ctx context.Context, r *http.Request, _ []byte) (int, any, error) {
		return http.StatusNoContent, nil, h.opts.Snapshots.DeleteSnapshot(ctx, r.PathValue("name"), r.PathValue("snap"))
	}))
	admin("POST /v1/lus/{name}/rollback", h.mutating(func(ctx context.Context, r *http.Request, body []byte) (int, any, error) {
		var req RollbackRequest
		if err := decode(body, &req); err != nil {
			return 0, nil, err
		}
		out, err := h.opts.Snapshots.RollbackLU(ctx, r.PathValue("name"), req)
		return http.StatusOK, out, err
	}))
}

// SnapshotLU takes a snapshot (POST /v1/lus/{name}/snapshots).
func (c *Client) SnapshotLU(ctx context.Context, name, snap string) (LU, error) {
	var out LU
	err := c.do(ctx, http.MethodPost, "/v1/lus/"+url.PathEscape(name)+"/snapshots", SnapshotRequest{Name: snap}, &out)
	return out, err
}

// ListSnapshots lists an LU's snapshots (GET /v1/lus/{name}/snapshots).
func (c *Client) ListSnapshots(ctx context.Context, name string) ([]LU, error) {
	var out []LU
	err := c.do(ctx, http.MethodGet, "/v1/lus/"+url.PathEscape(name)+"/snapshots", nil, &out)
	return out, err
}

// DeleteSnapshot deletes a snapshot (DELETE /v1/lus/{name}/snapshots/{snap}).
func (c *Client) DeleteSnapshot(ctx context.Context, name, snap string) error {
	return c.do(ctx, http.MethodDelete, "/v1/lus/"+url.PathEscape(name)+"/snapshots/"+url.PathEscape(snap), nil, nil)
}

// RollbackLU rolls an LU back to a snapshot (POST /v1/lus/{name}/rollback).
func (c *Client) RollbackLU(ctx context.Context, name string, req RollbackRequest) (LU, error) {
	var out LU
	err := c.do(ctx, http.MethodPost, "/v1/lus/"+url.PathEscape(name)+"/rollback", req, &out)
	return out, err
}

// RecordSnapshot asks the leader (this client must point at its peer
// port, with the writer node's certificate) to record a snapshot the
// writer froze.
func (c *Client) RecordSnapshot(ctx context.Context, name string, req SnapshotRecordRequest) error {
	return c.do(ctx, http.MethodPost, "/v1/internal/lus/"+url.PathEscape(name)+"/snapshot-record", req, nil)
}
