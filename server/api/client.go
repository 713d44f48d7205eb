package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// Client calls a lupool node's API. It is what the CLI uses, and what
// nodes use towards each other's peer ports.
type Client struct {
	base  string
	http  *http.Client
	token string
}

// ClientOptions configure a Client.
type ClientOptions struct {
	// Token is sent as "Authorization: Bearer Token" when not empty.
	Token string
	// HTTP is the client to use (for https: one that trusts the cluster
	// CA, or a node's mutual-TLS client); nil means a plain client with a
	// 60 s timeout.
	HTTP *http.Client
}

// StatusError is an error response from the API.
type StatusError struct {
	StatusCode int
	Message    string
	// LeaderID and LeaderPeer are set on a 503 from a node-only endpoint
	// that reached a follower: where to send the request instead.
	LeaderID, LeaderPeer string
}

func (e *StatusError) Error() string { return e.Message }

// NewClient returns a client for the API at addr ("host:port" or a URL)
// without credentials.
func NewClient(addr string) (*Client, error) { return NewClientWith(addr, ClientOptions{}) }

// NewClientWith returns a client for the API at addr ("host:port", which
// means http://, or an http:// or https:// URL).
func NewClientWith(addr string, opts ClientOptions) (*Client, error) {
	if addr == "" {
		return nil, errors.New("api address is empty: pass --api HOST:PORT or set LUPOOL_API")
	}
	if !strings.Contains(addr, "://") {
		addr = "http://" + addr
	}
	u, err := url.Parse(addr)
	if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
		return nil, fmt.Errorf("api address %q is not HOST:PORT, http://HOST:PORT or https://HOST:PORT", addr)
	}
	hc := opts.HTTP
	if hc == nil {
		hc = &http.Client{Timeout: 60 * time.Second}
	}
	return &Client{base: strings.TrimRight(u.String(), "/"), http: hc, token: opts.Token}, nil
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var payload []byte
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		payload = b
	}
	// A 503 with Retry-After changed nothing (ErrNotApplied: no leader is
	// known yet, an election is under way): send the request again, for
	// up to retryUnavailableFor or until ctx ends.
	deadline := time.Now().Add(retryUnavailableFor)
	for backoff := 100 * time.Millisecond; ; backoff = min(2*backoff, time.Second) {
		retry, err := c.once(ctx, method, path, payload, in != nil, out)
		if !retry || time.Now().Add(backoff).After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(backoff):
		}
	}
}

// retryUnavailableFor bounds how long Client retries a request the server
// did not apply (503 with Retry-After): longer than a metadata election.
const retryUnavailableFor = 10 * time.Second

// once sends one request; retry says the server did not apply it and asked
// for it again.
func (c *Client) once(ctx context.Context, method, path string, payload []byte, hasBody bool, out any) (retry bool, err error) {
	var body io.Reader
	if hasBody {
		body = bytes.NewReader(payload)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return false, err
	}
	if hasBody {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return false, fmt.Errorf("cannot reach the lupool API at %s (is `lupool serve` running? set --api or LUPOOL_API): %w", c.base, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return false, err
	}
	if resp.StatusCode >= 300 {
		retry := resp.StatusCode == http.StatusServiceUnavailable && resp.Header.Get("Retry-After") != ""
		var eb NotLeaderBody
		if json.Unmarshal(data, &eb) == nil && eb.Error != "" {
			return retry, &StatusError{StatusCode: resp.StatusCode, Message: eb.Error, LeaderID: eb.LeaderID, LeaderPeer: eb.LeaderPeer}
		}
		return retry, &StatusError{StatusCode: resp.StatusCode, Message: fmt.Sprintf("%s %s: %s", method, path, resp.Status)}
	}
	if out != nil && len(data) > 0 {
		return false, json.Unmarshal(data, out)
	}
	return false, nil
}

// ConfirmLease asks the leader (this client must point at its peer port)
// for a metadata read lease on the calling node's copy of LU name.
func (c *Client) ConfirmLease(ctx context.Context, name string, epoch uint64) error {
	return c.do(ctx, http.MethodPost, "/v1/internal/lus/"+url.PathEscape(name)+"/lease", LeaseRequest{Epoch: epoch}, nil)
}

// Liveness asks a node (the primary, on its peer port) for its liveness
// view of the members.
func (c *Client) Liveness(ctx context.Context) ([]NodeLiveness, error) {
	var out []NodeLiveness
	err := c.do(ctx, http.MethodGet, "/v1/internal/liveness", nil, &out)
	return out, err
}

// raw sends body (if any) as application/octet-stream and copies the
// answer's body to w; errors are like do's.
func (c *Client) raw(ctx context.Context, method, path string, body []byte, w io.Writer) error {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, rd)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/octet-stream")
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("cannot reach the lupool API at %s: %w", c.base, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		data, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		var eb NotLeaderBody
		if json.Unmarshal(data, &eb) == nil && eb.Error != "" {
			return &StatusError{StatusCode: resp.StatusCode, Message: eb.Error, LeaderID: eb.LeaderID, LeaderPeer: eb.LeaderPeer}
		}
		return &StatusError{StatusCode: resp.StatusCode, Message: fmt.Sprintf("%s %s: %s", method, path, resp.Status)}
	}
	_, err = io.Copy(w, resp.Body)
	return err
}

// CreateLU creates an LU.
func (c *Client) CreateLU(ctx context.Context, req CreateLURequest) (LU, error) {
	var lu LU
	err := c.do(ctx, http.MethodPost, "/v1/lus", req, &lu)
	return lu, err
}

// ChangeCopies proposes a new epoch, writer and copy states of an LU to
// the leader (node-only: the caller's certificate is the proposer); a
// StatusError with status 412 says the epoch moved on, 503 with LeaderPeer
// names the leader to ask instead.
func (c *Client) ChangeCopies(ctx context.Context, name string, req CopyChangeRequest) (LU, error) {
	var lu LU
	err := c.do(ctx, http.MethodPost, "/v1/internal/lus/"+url.PathEscape(name)+"/copy-change", req, &lu)
	return lu, err
}

// RegisterNode adds the calling node as a voter, or records its own new
// addresses (node-only).
func (c *Client) RegisterNode(ctx context.Context, req RegisterNodeRequest) ([]Node, error) {
	var nodes []Node
	err := c.do(ctx, http.MethodPost, "/v1/internal/nodes", req, &nodes)
	return nodes, err
}

// RemoveNode removes a node from the cluster.
func (c *Client) RemoveNode(ctx context.Context, id string) error {
	return c.do(ctx, http.MethodDelete, "/v1/nodes/"+url.PathEscape(id), nil, nil)
}

// CreateJoinToken makes a join token valid for ttlSeconds (0: 24 hours).
func (c *Client) CreateJoinToken(ctx context.Context, ttlSeconds int64) (JoinTokenCreated, error) {
	var out JoinTokenCreated
	err := c.do(ctx, http.MethodPost, "/v1/cluster/join-tokens", JoinTokenRequest{TTLSeconds: ttlSeconds}, &out)
	return out, err
}

// ListJoinTokens lists the join tokens (never their secrets).
func (c *Client) ListJoinTokens(ctx context.Context) ([]JoinTokenInfo, error) {
	var out []JoinTokenInfo
	err := c.do(ctx, http.MethodGet, "/v1/cluster/join-tokens", nil, &out)
	return out, err
}

// RevokeJoinToken revokes the join token with that id.
func (c *Client) RevokeJoinToken(ctx context.Context, id string) error {
	return c.do(ctx, http.MethodDelete, "/v1/cluster/join-tokens/"+url.PathEscape(id), nil, nil)
}

// RotateAdminToken replaces the admin token and returns the new one.
func (c *Client) RotateAdminToken(ctx context.Context) (AdminToken, error) {
	var out AdminToken
	err := c.do(ctx, http.MethodPost, "/v1/cluster/admin-token", nil, &out)
	return out, err
}

// AddCopy places a new copy of an LU on a node.
func (c *Client) AddCopy(ctx context.Context, name, node string) (LU, error) {
	var lu LU
	err := c.do(ctx, http.MethodPost, "/v1/lus/"+url.PathEscape(name)+"/copies", AddCopyRequest{Node: node}, &lu)
	return lu, err
}

// RegionHashes hashes count regions of the node's own copy of an LU.
func (c *Client) RegionHashes(ctx context.Context, name string, offsetBytes, regionBytes int64, count int) (RegionHashes, error) {
	var out RegionHashes
	path := fmt.Sprintf("/v1/lus/%s/hashes?offset=%d&region=%d&count=%d", url.PathEscape(name), offsetBytes, regionBytes, count)
	err := c.do(ctx, http.MethodGet, path, nil, &out)
	return out, err
}

// VerifyLU compares an LU's copies region by region.
func (c *Client) VerifyLU(ctx context.Context, name string, regionBytes int64) (VerifyReport, error) {
	var out VerifyReport
	err := c.do(ctx, http.MethodPost, "/v1/lus/"+url.PathEscape(name)+"/verify", VerifyRequest{RegionBytes: regionBytes}, &out)
	return out, err
}

// ScrubLU scrubs an LU on its writer and returns the report.
func (c *Client) ScrubLU(ctx context.Context, name string) (ScrubReport, error) {
	var out ScrubReport
	err := c.do(ctx, http.MethodPost, "/v1/lus/"+url.PathEscape(name)+"/scrub", struct{}{}, &out)
	return out, err
}

// ListLUs lists every LU.
func (c *Client) ListLUs(ctx context.Context) ([]LU, error) {
	var lus []LU
	err := c.do(ctx, http.MethodGet, "/v1/lus", nil, &lus)
	return lus, err
}

// GetLU shows one LU.
func (c *Client) GetLU(ctx context.Context, name string) (LU, error) {
	var lu LU
	err := c.do(ctx, http.MethodGet, "/v1/lus/"+url.PathEscape(name), nil, &lu)
	return lu, err
}

// SetQoS replaces an LU's QoS limits.
func (c *Client) SetQoS(ctx context.Context, name string, q QoS) (LU, error) {
	var lu LU
	err := c.do(ctx, http.MethodPost, "/v1/lus/"+url.PathEscape(name)+"/qos", q, &lu)
	return lu, err
}

// ResizeLU changes an LU's size.
func (c *Client) ResizeLU(ctx context.Context, name string, sizeBytes int64) (LU, error) {
	var lu LU
	err := c.do(ctx, http.MethodPost, "/v1/lus/"+url.PathEscape(name)+"/resize", ResizeLURequest{SizeBytes: sizeBytes}, &lu)
	return lu, err
}

// DeleteLU deletes an LU.
func (c *Client) DeleteLU(ctx context.Context, name string, force bool) error {
	path := "/v1/lus/" + url.PathEscape(name)
	if force {
		path += "?force=true"
	}
	return c.do(ctx, http.MethodDelete, path, nil, nil)
}

// PoolStatus returns the node's pool status.
func (c *Client) PoolStatus(ctx context.Context) (PoolStatus, error) {
	var st PoolStatus
	err := c.do(ctx, http.MethodGet, "/v1/pool", nil, &st)
	return st, err
}

// Status returns the cluster's one-screen view (GET /v1/status).
func (c *Client) Status(ctx context.Context) (Status, error) {
	var out Status
	err := c.do(ctx, http.MethodGet, "/v1/status", nil, &out)
	return out, err
}

// Nodes lists the cluster's nodes.
func (c *Client) Nodes(ctx context.Context) ([]Node, error) {
	var nodes []Node
	err := c.do(ctx, http.MethodGet, "/v1/nodes", nil, &nodes)
	return nodes, err
}

// Join asks for a node certificate with a join token (the first step of
// joining a cluster).
func (c *Client) Join(ctx context.Context, req JoinRequest) (JoinResponse, error) {
	var out JoinResponse
	err := c.do(ctx, http.MethodPost, "/v1/join", req, &out)
	return out, err
}

// Healthz returns nil when the server answers /healthz (it is alive).
func (c *Client) Healthz(ctx context.Context) error {
	return c.do(ctx, http.MethodGet, "/healthz", nil, nil)
}

// Ready returns nil when the node answers /readyz with 200.
func (c *Client) Ready(ctx context.Context) error {
	return c.do(ctx, http.MethodGet, "/readyz", nil, nil)
}
