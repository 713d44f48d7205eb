package api

import (
	"context"
	"net/http"
	"net/url"
	"time"
)

// ImageBackend serves images and linked clones (Options.Images): the
// daemon wires it to package control. Errors wrap this package's
// sentinels.
type ImageBackend interface {
	// CreateImage records a new image, importing, with one empty,
	// writable LU per disk (IMAGE/0, IMAGE/1, ...), and waits until this
	// node exports them when it holds their writer.
	CreateImage(ctx context.Context, req CreateImageRequest) (Image, error)
	// ImageReady records an importing image's content hashes (checked by
	// the importer against the stored copy) and makes its disks
	// read-only.
	ImageReady(ctx context.Context, name string, req ImageReadyRequest) (Image, error)
	ListImages(ctx context.Context) ([]Image, error)
	GetImage(ctx context.Context, name string) (Image, error)
	// DeleteImage removes an image and its disks (ErrBusy while linked
	// clones read them).
	DeleteImage(ctx context.Context, name string) error
	// FlattenLU copies a linked clone's base blocks into it and cuts the
	// link; the clone stays online.
	FlattenLU(ctx context.Context, name string) (LU, error)
}

// CreateImageRequest is the body of POST /v1/images.
type CreateImageRequest struct {
	Name string `json:"name"`
	// Copies of every disk; 0 means 1.
	Copies int                `json:"copies,omitempty"`
	Disks  []ImageDiskRequest `json:"disks"`
	// Node is where the disks' writer lives; empty means the node that
	// received the request.
	Node string `json:"node,omitempty"`
}

// ImageDiskRequest is one disk of a new image.
type ImageDiskRequest struct {
	// SizeBytes is the source's size; the LU is rounded up to 512 bytes.
	SizeBytes int64  `json:"size_bytes"`
	Source    string `json:"source,omitempty"`
}

// ImageReadyRequest is the body of POST /v1/images/{name}/ready: one
// entry per disk, in order.
type ImageReadyRequest struct {
	Disks []ImageDiskHash `json:"disks"`
}

// ImageDiskHash is a disk's content hash and what its import sent.
type ImageDiskHash struct {
	SHA256    string `json:"sha256"`
	SentBytes int64  `json:"sent_bytes"`
	// SourceBytes is the source's size, which the hash covers (the LU is
	// rounded up to 512 bytes).
	SourceBytes int64 `json:"source_bytes"`
}

// Image is one image.
type Image struct {
	Name string `json:"name"`
	// State is "importing" or "ready".
	State  string      `json:"state"`
	Copies int         `json:"copies"`
	Disks  []ImageDisk `json:"disks"`
	// Clones are the LUs that read one of its disks.
	Clones []string `json:"clones"`
	// EC is the erasure-coded layout; nil for a mirrored image.
	EC        *ImageEC  `json:"ec,omitempty"`
	CreatedAt time.Time `json:"created_at"`
}

// ImageDisk is one disk of an image.
type ImageDisk struct {
	LU        string `json:"lu"`
	SizeBytes int64  `json:"size_bytes"`
	// AllocatedBytes is what the disk's copy on the answering node holds
	// (0 when that node holds none).
	AllocatedBytes int64     `json:"allocated_bytes"`
	Source         string    `json:"source,omitempty"`
	SHA256         string    `json:"sha256,omitempty"`
	SentBytes      int64     `json:"sent_bytes"`
	Writer         string    `json:"writer"`
	Replicas       []Replica `json:"replicas"`
}

func (h *Handler) registerImages(admin func(string, http.HandlerFunc)) {
	admin("POST /v1/images", h.mutating(func(ctx context.Context, r *http.Request, body []byte) (int, any, error) {
		var req CreateImageRequest
		if err := decode(body, &req); err != nil {
			return 0, nil, err
		}
		req.Node = h.writerNode(ctx, req.Node)
		out, err := h.opts.Images.CreateImage(ctx, req)
		return http.StatusCreated, out, err
	}))
	admin("POST /v1/images/{name}/ready", h.mutating(func(ctx context.Context, r *http.Request, body []byte) (int, any, error) {
		var req ImageReadyRequest
		if err := decode(body, &req); err != nil {
			return 0, nil, err
		}
		out, err := h.opts.Images.ImageReady(ctx, r.PathValue("name"), req)
		return http.StatusOK, out, err
	}))
	admin("GET /v1/images", func(w http.ResponseWriter, r *http.Request) {
		out, err := h.opts.Images.ListImages(r.Context())
		for i := range out {
			if err == nil {
				err = h.addEC(r.Context(), &out[i])
			}
		}
		h.reply(w, out, err)
	})
	admin("GET /v1/images/{name}", func(w http.ResponseWriter, r *http.Request) {
		out, err := h.opts.Images.GetImage(r.Context(), r.PathValue("name"))
		if err == nil {
			err = h.addEC(r.Context(), &out)
		}
		h.reply(w, out, err)
	})
	admin("DELETE /v1/images/{name}", h.mutating(func(ctx context.Context, r *http.Request, _ []byte) (int, any, error) {
		return http.StatusNoContent, nil, h.opts.Images.DeleteImage(ctx, r.PathValue("name"))
	}))
	admin("POST /v1/lus/{name}/flatten", h.mutating(func(ctx context.Context, r *http.Request, _ []byte) (int, any, error) {
		out, err := h.opts.Images.FlattenLU(ctx, r.PathValue("name"))
		return http.StatusOK, out, err
	}))
}

// CreateImage records a new image (POST /v1/images).
func (c *Client) CreateImage(ctx context.Context, req CreateImageRequest) (Image, error) {
	var out Image
	err := c.do(ctx, http.MethodPost, "/v1/images", req, &out)
	return out, err
}

// ImageReady records an image's hashes (POST /v1/images/{name}/ready).
func (c *Client) ImageReady(ctx context.Context, name string, req ImageReadyRequest) (Image, error) {
	var out Image
	err := c.do(ctx, http.MethodPost, "/v1/images/"+url.PathEscape(name)+"/ready", req, &out)
	return out, err
}

// ListImages lists the images (GET /v1/images).
func (c *Client) ListImages(ctx context.Context) ([]Image, error) {
	var out []Image
	err := c.do(ctx, http.MethodGet, "/v1/images", nil, &out)
	return out, err
}

// GetImage shows an image (GET /v1/images/{name}).
func (c *Client) GetImage(ctx context.Context, name string) (Image, error) {
	var out Image
	err := c.do(ctx, http.MethodGet, "/v1/images/"+url.PathEscape(name), nil, &out)
	return out, err
}

// DeleteImage removes an image (DELETE /v1/images/{name}).
func (c *Client) DeleteImage(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, "/v1/images/"+url.PathEscape(name), nil, nil)
}

// FlattenLU flattens a linked clone (POST /v1/lus/{name}/flatten).
func (c *Client) FlattenLU(ctx context.Context, name string) (LU, error) {
	var out LU
	err := c.do(ctx, http.MethodPost, "/v1/lus/"+url.PathEscape(name)+"/flatten", struct{}{}, &out)
	return out, err
}
