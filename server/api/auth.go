package api

import (
	"fmt"
	"net/http"
	"strings"
)

// access is who may call an endpoint.
type access int

const (
	// accessOpen: anyone (probes; join, whose body carries the credential).
	accessOpen access = iota
	// accessAdmin: the admin token, or a member node's certificate (a
	// request another node forwards to the leader).
	accessAdmin
	// accessNode: a member node's certificate only.
	accessNode
	// accessCert: any node certificate of the cluster CA, member or not
	// yet (a joining node registering itself).
	accessCert
)

// Messages of refused requests: they say what to pass.
const (
	msgNoToken = "this API needs the cluster's admin token: pass --token-file FILE or set LUPOOL_TOKEN " +
		"(the first node wrote it to DATA/admin.token), or send the header Authorization: Bearer TOKEN"
	msgBadToken = "the admin token given is not this cluster's: check --token-file or LUPOOL_TOKEN " +
		"(DATA/admin.token on the first node; after lupool cluster rotate-admin-token only the new one works)"
	msgNodeOnly = "this endpoint is for cluster nodes: connect to a node's peer port with a node certificate"
)

// authorize authenticates the request for level and runs fn with the
// caller in the context (CallerFrom). A node certificate counts only for
// a member; the admin token only on the bearer header.
func (h *Handler) authorize(level access, fn http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var c Caller
		if id, ok := h.opts.PeerNode(r); ok {
			if level != accessCert && !h.opts.IsMember(id) {
				h.opts.Logger.Warn("request from a node certificate of a non-member refused", "node", id, "path", r.URL.Path)
				writeError(w, http.StatusForbidden, fmt.Sprintf("node %q is not a member of this cluster", id))
				return
			}
			c.Node = id
		}
		token, hasToken := bearer(r)
		if hasToken {
			if !h.opts.CheckToken(token) {
				h.unauthorized(w, r, msgBadToken)
				return
			}
			c.Admin = true
		}
		switch {
		case level == accessAdmin && c.Node == "" && !c.Admin:
			h.unauthorized(w, r, msgNoToken)
			return
		case (level == accessNode || level == accessCert) && c.Node == "":
			writeError(w, http.StatusForbidden, msgNodeOnly)
			return
		}
		fn(w, r.WithContext(WithCaller(r.Context(), c)))
	}
}

func (h *Handler) unauthorized(w http.ResponseWriter, r *http.Request, msg string) {
	h.opts.Logger.Info("unauthenticated API request refused", "method", r.Method, "path", r.URL.Path, "remote", r.RemoteAddr)
	w.Header().Set("WWW-Authenticate", `Bearer realm="lupool"`)
	writeError(w, http.StatusUnauthorized, msg)
}

// bearer returns the token of an "Authorization: Bearer TOKEN" header.
func bearer(r *http.Request) (string, bool) {
	v := r.Header.Get("Authorization")
	if v == "" {
		return "", false
	}
	scheme, token, ok := strings.Cut(v, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", true // present but malformed: counts as a wrong token
	}
	return strings.TrimSpace(token), true
}

// NotLeaderBody is the JSON answer of a node-only request that reached a
// node which is not the leader: the caller sends it to LeaderPeer itself.
type NotLeaderBody struct {
	Error      string `json:"error"`
	LeaderID   string `json:"leader_id,omitempty"`
	LeaderPeer string `json:"leader_peer,omitempty"`
}

// local is mutating without forwarding: the request must reach the leader
// directly, because its proposer is the caller's certificate. A follower
// answers 503 with the leader's id and peer address.
func (h *Handler) local(fn mutatingFunc) http.HandlerFunc { return h.runMutating(fn, false) }
