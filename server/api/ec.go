package api

import (
	"context"
	"net/http"
	"net/url"
)

// ECBackend serves erasure-coded images (Options.EC): the daemon wires it
// to package control. Errors wrap this package's sentinels.
type ECBackend interface {
	// ConvertImage erasure-codes a ready image: K data and M parity
	// shards per stripe, each shard of a stripe on its own node; the
	// mirrored disks go once every shard is written and read back.
	ConvertImage(ctx context.Context, name string, req ConvertImageRequest) (Image, error)
	// VerifyImage reads every shard chunk and checks its checksum and
	// every stripe's parity.
	VerifyImage(ctx context.Context, name string) (ECVerifyReport, error)
	// RebuildImage rewrites bad chunks and shards from the others; with
	// req.From and req.To it rebuilds the shards on node From (lost) onto
	// node To and moves them there.
	RebuildImage(ctx context.Context, name string, req RebuildImageRequest) (ECRebuildReport, error)
	// Layout returns an image's EC layout, or nil for a mirrored image.
	Layout(ctx context.Context, name string) (*ImageEC, error)
}

// ConvertImageRequest is the body of POST /v1/images/{name}/ec.
type ConvertImageRequest struct {
	K int `json:"k"`
	M int `json:"m"`
}

// ImageEC is an erasure-coded image's layout and space.
type ImageEC struct {
	K     int    `json:"k"`
	M     int    `json:"m"`
	State string `json:"state"`
	// UsableBytes is the disks' size; RawBytes what their K+M shards take
	// (provisioned), (K+M)/K of it plus the superblocks.
	UsableBytes int64         `json:"usable_bytes"`
	RawBytes    int64         `json:"raw_bytes"`
	Disks       []ImageECDisk `json:"disks"`
}

// ImageECDisk is one disk's shards.
type ImageECDisk struct {
	LU     string         `json:"lu"`
	Shards []ImageECShard `json:"shards"`
}

// ImageECShard is one shard: its LU and node.
type ImageECShard struct {
	Index int    `json:"index"`
	LU    string `json:"lu"`
	Node  string `json:"node"`
}

// ECVerifyReport is the answer of POST /v1/images/{name}/verify.
type ECVerifyReport struct {
	Image string         `json:"image"`
	Clean bool           `json:"clean"`
	Disks []ECDiskReport `json:"disks"`
}

// ECDiskReport is one disk's verify finding.
type ECDiskReport struct {
	LU      string `json:"lu"`
	Stripes int64  `json:"stripes"`
	Clean   bool   `json:"clean"`
	// FaultCount counts every fault; Faults lists the first ones.
	FaultCount       int64     `json:"fault_count"`
	Faults           []ECFault `json:"faults,omitempty"`
	ParityMismatches []int64   `json:"parity_mismatches,omitempty"`
}

// ECFault is one bad shard chunk (Stripe -1: the whole shard).
type ECFault struct {
	Shard   int    `json:"shard"`
	ShardLU string `json:"shard_lu"`
	Node    string `json:"node"`
	Stripe  int64  `json:"stripe"`
	Error   string `json:"error"`
}

// RebuildImageRequest is the body of POST /v1/images/{name}/rebuild.
type RebuildImageRequest struct {
	// From and To, both or neither: move the shards on From to To.
	From string `json:"from,omitempty"`
	To   string `json:"to,omitempty"`
}

// ECRebuildReport is the answer of POST /v1/images/{name}/rebuild.
type ECRebuildReport struct {
	Image string               `json:"image"`
	Disks []ECDiskRebuildStats `json:"disks"`
}

// ECDiskRebuildStats says what a rebuild of one disk wrote.
type ECDiskRebuildStats struct {
	LU            string   `json:"lu"`
	RebuiltShards []string `json:"rebuilt_shards"`
	// MovedShards are the shards rebuilt onto another node (their new LUs).
	MovedShards    []string `json:"moved_shards,omitempty"`
	RepairedChunks int64    `json:"repaired_chunks"`
}

func (h *Handler) registerEC(admin func(string, http.HandlerFunc)) {
	admin("POST /v1/images/{name}/ec", h.mutating(func(ctx context.Context, r *http.Request, body []byte) (int, any, error) {
		var req ConvertImageRequest
		if err := decode(body, &req); err != nil {
			return 0, nil, err
		}
		out, err := h.opts.EC.ConvertImage(ctx, r.PathValue("name"), req)
		return http.StatusOK, out, err
	}))
	admin("POST /v1/images/{name}/verify", h.mutating(func(ctx context.Context, r *http.Request, _ []byte) (int, any, error) {
		out, err := h.opts.EC.VerifyImage(ctx, r.PathValue("name"))
		return http.StatusOK, out, err
	}))
	admin("POST /v1/images/{name}/rebuild", h.mutating(func(ctx context.Context, r *http.Request, body []byte) (int, any, error) {
		var req RebuildImageRequest
		if len(body) > 0 {
			if err := decode(body, &req); err != nil {
				return 0, nil, err
			}
		}
		out, err := h.opts.EC.RebuildImage(ctx, r.PathValue("name"), req)
		return http.StatusOK, out, err
	}))
}

// addEC fills an image's EC layout when it has one.
func (h *Handler) addEC(ctx context.Context, img *Image) error {
	if h.opts.EC == nil {
		return nil
	}
	l, err := h.opts.EC.Layout(ctx, img.Name)
	img.EC = l
	return err
}

// ConvertImage erasure-codes an image (POST /v1/images/{name}/ec).
func (c *Client) ConvertImage(ctx context.Context, name string, req ConvertImageRequest) (Image, error) {
	var out Image
	err := c.do(ctx, http.MethodPost, "/v1/images/"+url.PathEscape(name)+"/ec", req, &out)
	return out, err
}

// VerifyImage checks an EC image's shards (POST /v1/images/{name}/verify).
func (c *Client) VerifyImage(ctx context.Context, name string) (ECVerifyReport, error) {
	var out ECVerifyReport
	err := c.do(ctx, http.MethodPost, "/v1/images/"+url.PathEscape(name)+"/verify", nil, &out)
	return out, err
}

// RebuildImage repairs an EC image's shards (POST /v1/images/{name}/rebuild).
func (c *Client) RebuildImage(ctx context.Context, name string, req RebuildImageRequest) (ECRebuildReport, error) {
	var out ECRebuildReport
	err := c.do(ctx, http.MethodPost, "/v1/images/"+url.PathEscape(name)+"/rebuild", req, &out)
	return out, err
}
