package api

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"runtime/debug"
	"strconv"
	"strings"
	"time"
)

// maxBodyBytes bounds every request body; API bodies are small JSON objects.
const maxBodyBytes = 1 << 20

// forwardedHeader marks a request forwarded to the leader, so a leader that
// changed in between does not forward it again (no loops).
const forwardedHeader = "X-Lupool-Forwarded"

// Options configure a Handler.
type Options struct {
	Backend Backend // required
	// NodeID fills CreateLURequest.Node when the client left it empty.
	NodeID string
	// Metrics, when set, is served at /metrics (for example
	// promhttp.HandlerFor(registry, ...)); the caller owns the registry.
	Metrics http.Handler
	// Debug, when set, is served under /debug/ (the daemon puts Go's
	// profiler there with --debug-pprof).
	Debug  http.Handler
	Logger *slog.Logger
	// CheckToken reports whether token is the cluster's admin token.
	// Nil refuses every token.
	CheckToken func(token string) bool
	// PeerNode returns the node id the request's connection proved with a
	// certificate (the peer port), if any.
	PeerNode func(r *http.Request) (string, bool)
	// IsMember reports whether a node id belongs to the cluster; a node
	// certificate of a non-member gets 403. Nil means none is.
	IsMember func(id string) bool
	// PeerClient returns the client for requests to node id's peer port
	// (mutual TLS; URLs are https://PEER_ADDR/...), used to forward
	// mutating requests to the leader. Nil forwards over plain HTTP to the
	// leader's API address with the caller's Authorization header (tests).
	PeerClient func(nodeID string) *http.Client
	// ProtectProbes requires the admin token (or a node certificate) on
	// /healthz, /readyz and /metrics too.
	ProtectProbes bool
	// Upgrades maps a path to the handler of a raw stream that replaces
	// HTTP on the connection after "101 Switching Protocols" (the
	// replication streams between nodes). Only member nodes may open one;
	// peer is their node id. The handler owns conn; br may hold bytes
	// already read from it.
	Upgrades map[string]func(peer string, conn net.Conn, br *bufio.Reader)
	// Events, when set, serves the event log: GET /v1/events (admin) and
	// POST /v1/internal/events (member nodes reporting an event).
	Events EventSource
	// Alerts, when set, serves GET and PUT /v1/pool/alerts.
	Alerts AlertStore
	// Paging, when set, serves paging space for VMs under /v1/paging.
	Paging PagingBackend
	// Images, when set, serves images under /v1/images and flatten.
	Images ImageBackend
	// Snapshots, when set, serves LU snapshots and rollback
	// (/v1/lus/{name}/snapshots, /v1/lus/{name}/rollback).
	Snapshots SnapshotBackend
	// EC, when set, serves erasure-coded images (convert, verify,
	// rebuild) and adds their layout to the images' answers.
	EC ECBackend
	// FFDC, when set, serves the failure data capture bundles.
	FFDC FFDCStore
	// OnPanic, when set, is called (on the request's goroutine) after a
	// panic in a request was recovered and answered 500.
	OnPanic func(r *http.Request, recovered any, stack []byte)
}

// Handler serves the API.
type Handler struct {
	opts Options
	mux  *http.ServeMux
}

var _ http.Handler = (*Handler)(nil)

// NewHandler returns the API handler.
func NewHandler(opts Options) (*Handler, error) {
	if opts.Backend == nil {
		return nil, errors.New("api: Options.Backend is required")
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.CheckToken == nil {
		opts.CheckToken = func(string) bool { return false }
	}
	if opts.PeerNode == nil {
		opts.PeerNode = func(*http.Request) (string, bool) { return "", false }
	}
	if opts.IsMember == nil {
		opts.IsMember = func(string) bool { return false }
	}
	h := &Handler{opts: opts, mux: http.NewServeMux()}
	admin := func(pattern string, fn http.HandlerFunc) { h.mux.HandleFunc(pattern, h.authorize(accessAdmin, fn)) }
	node := func(pattern string, fn http.HandlerFunc) { h.mux.HandleFunc(pattern, h.authorize(accessNode, fn)) }
	probe := func(pattern string, fn http.HandlerFunc) {
		if opts.ProtectProbes {
			admin(pattern, fn)
			return
		}
		h.mux.HandleFunc(pattern, h.authorize(accessOpen, fn))
	}
	admin("GET /v1/lus", h.listLUs)
	admin("POST /v1/lus", h.mutating(h.createLU))
	admin("GET /v1/lus/{name}", h.getLU)
	admin("POST /v1/lus/{name}/resize", h.mutating(h.resizeLU))
	admin("POST /v1/lus/{name}/qos", h.mutating(h.setQoS))
	admin("DELETE /v1/lus/{name}", h.mutating(h.deleteLU))
	admin("GET /v1/pool", h.poolStatus)
	admin("GET /v1/nodes", h.nodes)
	admin("GET /v1/status", h.status)
	admin("DELETE /v1/nodes/{id}", h.mutating(h.removeNode))
	admin("POST /v1/lus/{name}/copies", h.mutating(h.addCopy))
	admin("POST /v1/lus/{name}/move", h.mutating(h.moveLU))
	admin("GET /v1/moves", h.listMoves)
	admin("GET /v1/lus/{name}/hashes", h.regionHashes)
	admin("POST /v1/lus/{name}/verify", h.verifyLU)
	// A scrub runs on the LU's writer: the backend names it with a
	// NotLeaderError and the request is forwarded there.
	admin("POST /v1/lus/{name}/scrub", h.mutating(h.scrubLU))
	admin("POST /v1/cluster/join-tokens", h.mutating(h.createJoinToken))
	admin("GET /v1/cluster/join-tokens", h.listJoinTokens)
	admin("DELETE /v1/cluster/join-tokens/{id}", h.mutating(h.revokeJoinToken))
	admin("POST /v1/cluster/admin-token", h.mutating(h.rotateAdminToken))
	// The join token in the body is the credential.
	h.mux.HandleFunc("POST /v1/join", h.authorize(accessOpen, h.mutating(h.join)))
	// Node-only: proposals whose proposer is the caller's certificate are
	// never forwarded (the leader would see the forwarding node instead).
	node("POST /v1/internal/lus/{name}/copy-change", h.local(h.changeCopies))
	node("POST /v1/internal/lus/{name}/lease", h.local(h.confirmLease))
	node("POST /v1/internal/lus/{name}/move-op", h.local(h.proposeMoveOp))
	node("GET /v1/internal/liveness", h.liveness)
	// A joining node is not a member yet: its certificate is its credential.
	h.mux.HandleFunc("POST /v1/internal/nodes", h.authorize(accessCert, h.local(h.registerNode)))
	if opts.Events != nil {
		admin("GET /v1/events", h.events)
		node("POST /v1/internal/events", h.local(h.appendEvent))
		admin("POST /v1/events/subscribers", h.mutating(h.addSubscriber))
		admin("GET /v1/events/subscribers", h.mutating(h.subscribers))
		admin("DELETE /v1/events/subscribers/{id}", h.mutating(h.removeSubscriber))
	}
	// The status page: static files only; its data comes from the /v1
	// calls above, with the admin token (ui.go).
	ui := uiHandler()
	h.mux.HandleFunc("GET /ui/", h.authorize(accessOpen, ui.ServeHTTP))
	h.mux.HandleFunc("GET /ui", h.authorize(accessOpen, func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, uiRoot, http.StatusMovedPermanently)
	}))
	if opts.FFDC != nil {
		admin("POST /v1/ffdc", h.mutating(h.collectFFDC))
		admin("GET /v1/ffdc", h.listFFDC)
		admin("GET /v1/ffdc/{id}", h.getFFDC)
		node("GET /v1/internal/ffdc/parts", h.ffdcParts)
		node("POST /v1/internal/ffdc", h.storeFFDC)
	}
	if opts.Paging != nil {
		h.registerPaging(admin)
	}
	if opts.Images != nil {
		h.registerImages(admin)
	}
	if opts.Snapshots != nil {
		h.registerSnapshots(admin, node)
	}
	if opts.EC != nil {
		h.registerEC(admin)
	}
	if opts.Alerts != nil {
		admin("GET /v1/pool/alerts", h.poolAlerts)
		admin("PUT /v1/pool/alerts", h.mutating(h.setPoolAlerts))
	}
	for path, fn := range opts.Upgrades {
		node("GET "+path, upgrade(fn))
	}
	probe("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	probe("GET /readyz", h.ready)
	if opts.Metrics != nil {
		probe("GET /metrics", opts.Metrics.ServeHTTP)
	}
	if opts.Debug != nil {
		admin("/debug/", opts.Debug.ServeHTTP)
	}
	h.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, fmt.Sprintf("no such endpoint: %s %s (see README.md, HTTP API)", r.Method, r.URL.Path))
	})
	return h, nil
}

// ServeHTTP implements http.Handler. A panic in a request is recovered,
// logged with its stack, answered 500 (if nothing was written yet) and
// reported to Options.OnPanic; http.ErrAbortHandler passes through.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	defer func() {
		v := recover()
		if v == nil {
			return
		}
		if v == http.ErrAbortHandler {
			panic(v)
		}
		stack := debug.Stack()
		h.opts.Logger.Error("panic in an API request", "method", r.Method, "path", r.URL.Path, "panic", fmt.Sprint(v), "stack", string(stack))
		writeError(w, http.StatusInternalServerError, "internal error (the node logged it and captured failure data)")
		if h.opts.OnPanic != nil {
			h.opts.OnPanic(r, v, stack)
		}
	}()
	h.mux.ServeHTTP(w, r)
}

// mutatingFunc handles a mutating request whose body was read into body.
type mutatingFunc func(ctx context.Context, r *http.Request, body []byte) (status int, result any, err error)

// mutating reads the body (bounded), runs fn, and forwards the request to
// the leader when fn reports that this node is not the leader.
func (h *Handler) mutating(fn mutatingFunc) http.HandlerFunc { return h.runMutating(fn, true) }

// runMutating is mutating; with forwardOK false a NotLeaderError is
// answered 503 with the leader's id and peer address instead (see local).
func (h *Handler) runMutating(fn mutatingFunc, forwardOK bool) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBodyBytes))
		if err != nil {
			writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("request body over %d bytes or unreadable: %v", maxBodyBytes, err))
			return
		}
		status, result, err := fn(r.Context(), r, body)
		var nl *NotLeaderError
		switch {
		case errors.As(err, &nl) && !forwardOK:
			if nl.LeaderID == "" {
				w.Header().Set("Retry-After", "1")
			}
			writeJSON(w, http.StatusServiceUnavailable, NotLeaderBody{Error: cleanMessage(err), LeaderID: nl.LeaderID, LeaderPeer: nl.LeaderPeer})
			return
		case errors.As(err, &nl) && nl.LeaderID != "" && r.Header.Get(forwardedHeader) == "":
			h.forward(w, r, nl, body)
			return
		}
		if err != nil {
			h.fail(w, err)
			return
		}
		if result == nil {
			w.WriteHeader(status)
			return
		}
		writeJSON(w, status, result)
	}
}

// forward replays the request against the leader and copies its answer.
// Over the peer port the leader authenticates this node by its
// certificate, and takes this node as the request's origin (a new LU's
// writer is placed where the request arrived).
func (h *Handler) forward(w http.ResponseWriter, r *http.Request, nl *NotLeaderError, body []byte) {
	var u string
	var client *http.Client
	if h.opts.PeerClient != nil {
		if nl.LeaderPeer != "" {
			u, client = "https://"+nl.LeaderPeer+r.URL.RequestURI(), h.opts.PeerClient(nl.LeaderID)
		}
		if client == nil {
			h.fail(w, fmt.Errorf("%w: no connection to the peer port of leader %s yet; retry shortly (%w)", ErrUnavailable, nl.LeaderID, ErrNotApplied))
			return
		}
	} else {
		u, client = "http://"+nl.LeaderAPI+r.URL.RequestURI(), &http.Client{Timeout: 30 * time.Second}
	}
	req, err := http.NewRequestWithContext(r.Context(), r.Method, u, bytes.NewReader(body))
	if err != nil {
		h.fail(w, fmt.Errorf("%w: forwarding to leader %s: %v", ErrUnavailable, nl.LeaderID, err))
		return
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set(forwardedHeader, "1")
	if h.opts.PeerClient == nil {
		req.Header.Set("Authorization", r.Header.Get("Authorization"))
	}
	resp, err := client.Do(req)
	if err != nil {
		h.fail(w, fmt.Errorf("%w: leader %s unreachable: %v", ErrUnavailable, nl.LeaderID, err))
		return
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); ct != "" {
		w.Header().Set("Content-Type", ct)
	}
	w.WriteHeader(resp.StatusCode)
	_, _ = io.Copy(w, resp.Body)
}

// decode parses a JSON body strictly: unknown fields and trailing data are
// errors that name the problem.
func decode(body []byte, v any) error {
	if len(bytes.TrimSpace(body)) == 0 {
		return fmt.Errorf("%w: request body is empty; send a JSON object", ErrInvalid)
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%w: malformed JSON body: %v", ErrInvalid, err)
	}
	if dec.More() {
		return fmt.Errorf("%w: malformed JSON body: data after the object", ErrInvalid)
	}
	return nil
}

func (h *Handler) createLU(ctx context.Context, r *http.Request, body []byte) (int, any, error) {
	var req CreateLURequest
	if err := decode(body, &req); err != nil {
		return 0, nil, err
	}
	req.Node = h.writerNode(ctx, req.Node)
	lu, err := h.opts.Backend.CreateLU(ctx, req)
	return http.StatusCreated, lu, err
}

// writerNode is where a create places its writer: the node the request
// names, else the member that forwarded it, else this node.
func (h *Handler) writerNode(ctx context.Context, named string) string {
	if named != "" {
		return named
	}
	if caller := CallerFrom(ctx).Node; caller != "" {
		return caller
	}
	return h.opts.NodeID
}

func (h *Handler) resizeLU(ctx context.Context, r *http.Request, body []byte) (int, any, error) {
	var req ResizeLURequest
	if err := decode(body, &req); err != nil {
		return 0, nil, err
	}
	lu, err := h.opts.Backend.ResizeLU(ctx, r.PathValue("name"), req.SizeBytes)
	return http.StatusOK, lu, err
}

func (h *Handler) setQoS(ctx context.Context, r *http.Request, body []byte) (int, any, error) {
	var req QoS
	if err := decode(body, &req); err != nil {
		return 0, nil, err
	}
	lu, err := h.opts.Backend.SetQoS(ctx, r.PathValue("name"), req)
	return http.StatusOK, lu, err
}

func (h *Handler) deleteLU(ctx context.Context, r *http.Request, _ []byte) (int, any, error) {
	force := false
	if v := r.URL.Query().Get("force"); v != "" {
		var err error
		if force, err = strconv.ParseBool(v); err != nil {
			return 0, nil, fmt.Errorf("%w: force=%q: use true or false", ErrInvalid, v)
		}
	}
	return http.StatusNoContent, nil, h.opts.Backend.DeleteLU(ctx, r.PathValue("name"), force)
}

func (h *Handler) join(ctx context.Context, _ *http.Request, body []byte) (int, any, error) {
	var req JoinRequest
	if err := decode(body, &req); err != nil {
		return 0, nil, err
	}
	if req.Token == "" || req.ID == "" || req.PublicKeyPEM == "" {
		return 0, nil, fmt.Errorf("%w: join needs token, id and public_key_pem (lupool serve --join ADDR --join-token TOKEN sends them)", ErrInvalid)
	}
	resp, err := h.opts.Backend.Join(ctx, req)
	return http.StatusOK, resp, err
}

func (h *Handler) registerNode(ctx context.Context, _ *http.Request, body []byte) (int, any, error) {
	var req RegisterNodeRequest
	if err := decode(body, &req); err != nil {
		return 0, nil, err
	}
	if req.PeerAddr == "" || req.APIAddr == "" {
		return 0, nil, fmt.Errorf("%w: register needs peer_addr and api_addr", ErrInvalid)
	}
	nodes, err := h.opts.Backend.RegisterNode(ctx, req)
	return http.StatusOK, nodes, err
}

func (h *Handler) removeNode(ctx context.Context, r *http.Request, _ []byte) (int, any, error) {
	return http.StatusNoContent, nil, h.opts.Backend.RemoveNode(ctx, r.PathValue("id"))
}

func (h *Handler) changeCopies(ctx context.Context, r *http.Request, body []byte) (int, any, error) {
	var req CopyChangeRequest
	if err := decode(body, &req); err != nil {
		return 0, nil, err
	}
	if req.ExpectedEpoch == 0 || len(req.Replicas) == 0 {
		return 0, nil, fmt.Errorf("%w: a copy change needs expected_epoch >= 1 and at least one replica", ErrInvalid)
	}
	lu, err := h.opts.Backend.ChangeCopies(ctx, r.PathValue("name"), req)
	return http.StatusOK, lu, err
}

func (h *Handler) confirmLease(ctx context.Context, r *http.Request, body []byte) (int, any, error) {
	var req LeaseRequest
	if err := decode(body, &req); err != nil {
		return 0, nil, err
	}
	if req.Epoch == 0 {
		return 0, nil, fmt.Errorf("%w: a lease request needs epoch >= 1", ErrInvalid)
	}
	return http.StatusNoContent, nil, h.opts.Backend.ConfirmLease(ctx, r.PathValue("name"), req)
}

func (h *Handler) liveness(w http.ResponseWriter, r *http.Request) {
	view, err := h.opts.Backend.Liveness(r.Context())
	h.reply(w, view, err)
}

func (h *Handler) createJoinToken(ctx context.Context, _ *http.Request, body []byte) (int, any, error) {
	var req JoinTokenRequest
	if len(bytes.TrimSpace(body)) > 0 {
		if err := decode(body, &req); err != nil {
			return 0, nil, err
		}
	}
	if req.TTLSeconds < 0 {
		return 0, nil, fmt.Errorf("%w: ttl_seconds %d: must be 0 (24 hours) or more", ErrInvalid, req.TTLSeconds)
	}
	tok, err := h.opts.Backend.CreateJoinToken(ctx, req)
	return http.StatusCreated, tok, err
}

func (h *Handler) listJoinTokens(w http.ResponseWriter, r *http.Request) {
	toks, err := h.opts.Backend.ListJoinTokens(r.Context())
	h.reply(w, toks, err)
}

func (h *Handler) revokeJoinToken(ctx context.Context, r *http.Request, _ []byte) (int, any, error) {
	return http.StatusNoContent, nil, h.opts.Backend.RevokeJoinToken(ctx, r.PathValue("id"))
}

func (h *Handler) rotateAdminToken(ctx context.Context, _ *http.Request, _ []byte) (int, any, error) {
	tok, err := h.opts.Backend.RotateAdminToken(ctx)
	return http.StatusOK, tok, err
}

func (h *Handler) addCopy(ctx context.Context, r *http.Request, body []byte) (int, any, error) {
	var req AddCopyRequest
	if err := decode(body, &req); err != nil {
		return 0, nil, err
	}
	lu, err := h.opts.Backend.AddCopy(ctx, r.PathValue("name"), req)
	return http.StatusOK, lu, err
}

func (h *Handler) regionHashes(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	num := func(key string, def int64) (int64, error) {
		v := q.Get(key)
		if v == "" {
			return def, nil
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n < 0 {
			return 0, fmt.Errorf("%w: %s=%q: want a non-negative integer", ErrInvalid, key, v)
		}
		return n, nil
	}
	offset, err1 := num("offset", 0)
	region, err2 := num("region", 1<<20)
	count, err3 := num("count", 1024)
	if err := errors.Join(err1, err2, err3); err != nil {
		h.fail(w, err)
		return
	}
	hashes, err := h.opts.Backend.RegionHashes(r.Context(), r.PathValue("name"), offset, region, int(count))
	h.reply(w, hashes, err)
}

// verifyLU runs on the node that received it (it reads, it changes
// nothing), so it is not forwarded to the leader.
func (h *Handler) verifyLU(w http.ResponseWriter, r *http.Request) {
	var req VerifyRequest
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBodyBytes))
	if err == nil && len(bytes.TrimSpace(body)) > 0 {
		err = decode(body, &req)
	}
	if err != nil {
		h.fail(w, err)
		return
	}
	report, err := h.opts.Backend.VerifyLU(r.Context(), r.PathValue("name"), req)
	h.reply(w, report, err)
}

func (h *Handler) scrubLU(ctx context.Context, r *http.Request, _ []byte) (int, any, error) {
	report, err := h.opts.Backend.ScrubLU(ctx, r.PathValue("name"))
	return http.StatusOK, report, err
}

// upgrade hands the connection of an "Upgrade" request to fn, with the
// caller's node id.
func upgrade(fn func(string, net.Conn, *bufio.Reader)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		peer := CallerFrom(r.Context()).Node
		token := r.Header.Get("Upgrade")
		if token == "" || !strings.EqualFold(r.Header.Get("Connection"), "Upgrade") {
			writeError(w, http.StatusUpgradeRequired, "this endpoint carries a node-to-node stream; send Connection: Upgrade")
			return
		}
		hj, ok := w.(http.Hijacker)
		if !ok {
			writeError(w, http.StatusInternalServerError, "connection cannot be taken over")
			return
		}
		conn, brw, err := hj.Hijack()
		if err != nil {
			return
		}
		_ = conn.SetDeadline(time.Time{})
		if _, err := io.WriteString(conn, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: "+token+"\r\n\r\n"); err != nil {
			conn.Close()
			return
		}
		fn(peer, conn, brw.Reader)
	}
}

func (h *Handler) listLUs(w http.ResponseWriter, r *http.Request) {
	lus, err := h.opts.Backend.ListLUs(r.Context())
	h.reply(w, lus, err)
}

func (h *Handler) getLU(w http.ResponseWriter, r *http.Request) {
	lu, err := h.opts.Backend.GetLU(r.Context(), r.PathValue("name"))
	h.reply(w, lu, err)
}

func (h *Handler) poolStatus(w http.ResponseWriter, r *http.Request) {
	st, err := h.opts.Backend.PoolStatus(r.Context())
	h.reply(w, st, err)
}

func (h *Handler) nodes(w http.ResponseWriter, r *http.Request) {
	nodes, err := h.opts.Backend.Nodes(r.Context())
	h.reply(w, nodes, err)
}

func (h *Handler) status(w http.ResponseWriter, r *http.Request) {
	st, err := h.opts.Backend.Status(r.Context())
	h.reply(w, st, err)
}

func (h *Handler) ready(w http.ResponseWriter, _ *http.Request) {
	if err := h.opts.Backend.Ready(); err != nil {
		writeError(w, http.StatusServiceUnavailable, err.Error())
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"status": "ready"})
}

func (h *Handler) reply(w http.ResponseWriter, v any, err error) {
	if err != nil {
		h.fail(w, err)
		return
	}
	writeJSON(w, http.StatusOK, v)
}

// statusOf is the one table from sentinel errors to HTTP status codes.
func statusOf(err error) int {
	switch {
	case errors.Is(err, ErrInvalid):
		return http.StatusBadRequest
	case errors.Is(err, ErrNotFound):
		return http.StatusNotFound
	case errors.Is(err, ErrExists), errors.Is(err, ErrBusy):
		return http.StatusConflict
	case errors.Is(err, ErrNoSpace):
		return http.StatusInsufficientStorage
	case errors.Is(err, ErrStale):
		return http.StatusPreconditionFailed
	case errors.Is(err, ErrUnauthorized):
		return http.StatusUnauthorized
	case errors.Is(err, ErrForbidden):
		return http.StatusForbidden
	case errors.Is(err, ErrUnavailable):
		return http.StatusServiceUnavailable
	default:
		return http.StatusInternalServerError
	}
}

func (h *Handler) fail(w http.ResponseWriter, err error) {
	status := statusOf(err)
	if notApplied(err) {
		w.Header().Set("Retry-After", "1")
	}
	if status == http.StatusInternalServerError {
		h.opts.Logger.Error("api request failed", "err", err)
	}
	writeError(w, status, cleanMessage(err))
}

// notApplied reports whether err left everything as it was, so that the
// same request may be sent again (ErrNotApplied).
func notApplied(err error) bool {
	var nl *NotLeaderError
	return errors.Is(err, ErrNotApplied) || errors.As(err, &nl) && nl.LeaderID == ""
}

// cleanMessage drops our own package prefixes so users read the reason.
func cleanMessage(err error) string {
	msg := err.Error()
	for _, p := range []string{"api: ", "cluster: ", "lu: ", "paging: "} {
		msg = strings.ReplaceAll(msg, p, "")
	}
	return msg
}

func writeError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, ErrorBody{Error: msg})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}
