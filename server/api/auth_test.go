package api

import (
	"bufio"
	"go/ast"
	"go/parser"
	"go/token"
	"net"
	"net/http"
	"net/http/httptest"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
)

// route is one endpoint of NewHandler with a request that reaches its
// backend call when authorized.
type route struct {
	pattern string // exactly as registered in NewHandler
	method  string
	path    string
	body    string
	access  access
	// backend is the memBackend method the request calls; "" when it calls
	// none (then reached is the status that shows it passed authorize).
	backend string
	reached int
}

// upgradePath is the Upgrades entry routeTable's handler registers.
const upgradePath = "/v1/internal/stream"

// routeTable lists every route of NewHandler. TestRouteTableComplete fails
// when NewHandler registers a pattern that is missing here, so a new
// route cannot skip the authentication tests.
var routeTable = []route{
	{pattern: "GET /v1/lus", method: "GET", path: "/v1/lus", access: accessAdmin, backend: "ListLUs"},
	{pattern: "POST /v1/lus", method: "POST", path: "/v1/lus", body: `{"name":"t","size_bytes":4096}`, access: accessAdmin, backend: "CreateLU"},
	{pattern: "GET /v1/lus/{name}", method: "GET", path: "/v1/lus/a", access: accessAdmin, backend: "GetLU"},
	{pattern: "POST /v1/lus/{name}/qos", method: "POST", path: "/v1/lus/a/qos", body: `{"write_iops":100}`, access: accessAdmin, backend: "SetQoS"},
	{pattern: "POST /v1/lus/{name}/resize", method: "POST", path: "/v1/lus/a/resize", body: `{"size_bytes":8192}`, access: accessAdmin, backend: "ResizeLU"},
	{pattern: "DELETE /v1/lus/{name}", method: "DELETE", path: "/v1/lus/a", access: accessAdmin, backend: "DeleteLU"},
	{pattern: "GET /v1/pool", method: "GET", path: "/v1/pool", access: accessAdmin, backend: "PoolStatus"},
	{pattern: "GET /v1/nodes", method: "GET", path: "/v1/nodes", access: accessAdmin, backend: "Nodes"},
	{pattern: "GET /v1/status", method: "GET", path: "/v1/status", access: accessAdmin, backend: "Status"},
	{pattern: "DELETE /v1/nodes/{id}", method: "DELETE", path: "/v1/nodes/n1", access: accessAdmin, backend: "RemoveNode"},
	{pattern: "POST /v1/lus/{name}/move", method: "POST", path: "/v1/lus/a/move", body: `{"to":"n1"}`, access: accessAdmin, backend: "MoveLU"},
	{pattern: "GET /v1/moves", method: "GET", path: "/v1/moves", access: accessAdmin, backend: "ListMoves"},
	{pattern: "POST /v1/lus/{name}/copies", method: "POST", path: "/v1/lus/a/copies", body: `{"node":"n2"}`, access: accessAdmin, backend: "AddCopy"},
	{pattern: "GET /v1/lus/{name}/hashes", method: "GET", path: "/v1/lus/a/hashes?count=2", access: accessAdmin, backend: "RegionHashes"},
	{pattern: "POST /v1/lus/{name}/verify", method: "POST", path: "/v1/lus/a/verify", body: `{}`, access: accessAdmin, backend: "VerifyLU"},
	{pattern: "POST /v1/lus/{name}/scrub", method: "POST", path: "/v1/lus/a/scrub", body: `{}`, access: accessAdmin, backend: "ScrubLU"},
	{pattern: "POST /v1/cluster/join-tokens", method: "POST", path: "/v1/cluster/join-tokens", body: `{"ttl_seconds":60}`, access: accessAdmin, backend: "CreateJoinToken"},
	{pattern: "GET /v1/cluster/join-tokens", method: "GET", path: "/v1/cluster/join-tokens", access: accessAdmin, backend: "ListJoinTokens"},
	{pattern: "DELETE /v1/cluster/join-tokens/{id}", method: "DELETE", path: "/v1/cluster/join-tokens/t1", access: accessAdmin, backend: "RevokeJoinToken"},
	{pattern: "POST /v1/cluster/admin-token", method: "POST", path: "/v1/cluster/admin-token", access: accessAdmin, backend: "RotateAdminToken"},
	{pattern: "POST /v1/join", method: "POST", path: "/v1/join", body: `{"token":"join-secret","id":"n9","public_key_pem":"PEM"}`, access: accessOpen, backend: "Join"},
	{pattern: "POST /v1/internal/lus/{name}/copy-change", method: "POST", path: "/v1/internal/lus/a/copy-change",
		body: `{"expected_epoch":1,"epoch":2,"writer":"n2","copies":1,"replicas":[{"node":"n2","state":"in-sync"}]}`, access: accessNode, backend: "ChangeCopies"},
	{pattern: "POST /v1/internal/lus/{name}/lease", method: "POST", path: "/v1/internal/lus/a/lease",
		body: `{"epoch":1}`, access: accessNode, backend: "ConfirmLease"},
	{pattern: "POST /v1/internal/lus/{name}/move-op", method: "POST", path: "/v1/internal/lus/a/move-op",
		body: `{"op":"step","role":"target","step":"ready"}`, access: accessNode, backend: "ProposeMoveOp"},
	{pattern: "GET /v1/internal/liveness", method: "GET", path: "/v1/internal/liveness", access: accessNode, backend: "Liveness"},
	{pattern: "POST /v1/internal/nodes", method: "POST", path: "/v1/internal/nodes", body: `{"peer_addr":"p:1","api_addr":"a:1"}`, access: accessCert, backend: "RegisterNode"},
	// Through a ResponseRecorder (no Connection: Upgrade), an authorized
	// request gets to upgrade's own check: 426.
	{pattern: "GET " + upgradePath, method: "GET", path: upgradePath, access: accessNode, reached: http.StatusUpgradeRequired},
	{pattern: "GET /v1/events", method: "GET", path: "/v1/events?follow=false", access: accessAdmin, reached: http.StatusOK},
	{pattern: "POST /v1/internal/events", method: "POST", path: "/v1/internal/events", body: `{"kind":"PoolThreshold"}`, access: accessNode, backend: "AppendEvent"},
	{pattern: "POST /v1/events/subscribers", method: "POST", path: "/v1/events/subscribers", body: `{"to":"tcp://h:1"}`, access: accessAdmin, backend: "AddSubscriber"},
	{pattern: "GET /v1/events/subscribers", method: "GET", path: "/v1/events/subscribers", access: accessAdmin, backend: "Subscribers"},
	{pattern: "DELETE /v1/events/subscribers/{id}", method: "DELETE", path: "/v1/events/subscribers/s1", access: accessAdmin, backend: "RemoveSubscriber"},
	{pattern: "GET /v1/pool/alerts", method: "GET", path: "/v1/pool/alerts", access: accessAdmin, backend: "PoolAlerts"},
	{pattern: "PUT /v1/pool/alerts", method: "PUT", path: "/v1/pool/alerts", body: `{"threshold_percent":80,"critical_percent":90}`, access: accessAdmin, backend: "SetPoolAlerts"},
	{pattern: "POST /v1/ffdc", method: "POST", path: "/v1/ffdc", body: `{}`, access: accessAdmin, backend: "CollectFFDC"},
	{pattern: "GET /v1/ffdc", method: "GET", path: "/v1/ffdc", access: accessAdmin, backend: "ListFFDC"},
	{pattern: "GET /v1/ffdc/{id}", method: "GET", path: "/v1/ffdc/f1", access: accessAdmin, backend: "GetFFDC"},
	{pattern: "GET /v1/internal/ffdc/parts", method: "GET", path: "/v1/internal/ffdc/parts?correlation_id=c", access: accessNode, backend: "FFDCParts"},
	{pattern: "POST /v1/internal/ffdc", method: "POST", path: "/v1/internal/ffdc?id=x", body: "gz", access: accessNode, backend: "StoreFFDC"},
	{pattern: "GET /ui/", method: "GET", path: "/ui/", access: accessOpen, reached: http.StatusOK},
	{pattern: "GET /ui", method: "GET", path: "/ui", access: accessOpen, reached: http.StatusMovedPermanently},
	{pattern: "GET /healthz", method: "GET", path: "/healthz", access: accessOpen, reached: http.StatusOK},
	{pattern: "GET /readyz", method: "GET", path: "/readyz", access: accessOpen, backend: "Ready"},
	{pattern: "GET /metrics", method: "GET", path: "/metrics", access: accessOpen, backend: "Metrics"},
	{pattern: "/debug/", method: "GET", path: "/debug/pprof/", access: accessAdmin, backend: "Debug"},
}

// probe reports whether the route is one ProtectProbes closes.
func (rt route) probe() bool {
	return rt.path == "/healthz" || rt.path == "/readyz" || rt.path == "/metrics"
}

// routeHandler is a handler with every optional route registered over a
// fresh backend that holds LU "a" (writer n2, the member node the table
// uses; epoch 1) and join token t1.
func routeHandler(t *testing.T, protectProbes bool) (*Handler, *memBackend) {
	t.Helper()
	b := newMemBackend()
	b.putLU(LU{Name: "a", SizeBytes: 4096, Copies: 2, Writer: "n2", Epoch: 1, Replicas: []Replica{{Node: "n2", State: "in-sync"}, {Node: "n1", State: "in-sync"}}})
	b.mu.Lock()
	b.tokens["t1"] = JoinTokenInfo{ID: "t1"}
	b.mu.Unlock()
	h := newTestHandler(t, Options{
		Backend:       b,
		NodeID:        "n1",
		Metrics:       b.counted("Metrics"),
		Debug:         b.counted("Debug"),
		ProtectProbes: protectProbes,
		Events:        b,
		Alerts:        b,
		FFDC:          b,
		Upgrades: map[string]func(string, net.Conn, *bufio.Reader){
			upgradePath: func(_ string, conn net.Conn, _ *bufio.Reader) { conn.Close() },
		},
	})
	return h, b
}

// routePattern matches the string literals of NewHandler that are mux
// patterns: "/..." or "METHOD /...".
var routePattern = regexp.MustCompile(`^([A-Z]+ )?/\S*$`)

// registeredPatterns returns the route patterns written as string literals
// in NewHandler (handler.go), whatever helper registers them. The
// catch-all "/" and the Upgrades prefix ("GET " + path) are not literals
// of this shape and are covered on their own.
func registeredPatterns(t *testing.T) []string {
	t.Helper()
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, "handler.go", nil, 0)
	if err != nil {
		t.Fatalf("parse handler.go: %v", err)
	}
	var fn *ast.FuncDecl
	for _, d := range f.Decls {
		if fd, ok := d.(*ast.FuncDecl); ok && fd.Name.Name == "NewHandler" && fd.Recv == nil {
			fn = fd
		}
	}
	if fn == nil {
		t.Fatal("handler.go has no func NewHandler; update registeredPatterns")
	}
	var out []string
	ast.Inspect(fn.Body, func(n ast.Node) bool {
		lit, ok := n.(*ast.BasicLit)
		if !ok || lit.Kind != token.STRING {
			return true
		}
		s, err := strconv.Unquote(lit.Value)
		if err == nil && s != "/" && routePattern.MatchString(s) {
			out = append(out, s)
		}
		return true
	})
	sort.Strings(out)
	return out
}

// TestRouteTableComplete: routeTable and NewHandler name the same routes,
// and every route in the table exists (an authorized request does not get
// the catch-all 404).
func TestRouteTableComplete(t *testing.T) {
	inTable := map[string]bool{}
	for _, rt := range routeTable {
		if inTable[rt.pattern] {
			t.Errorf("routeTable lists %q twice", rt.pattern)
		}
		inTable[rt.pattern] = true
	}
	registered := registeredPatterns(t)
	if len(registered) < 10 {
		t.Fatalf("found only %d patterns in NewHandler (%v); the source scan is broken", len(registered), registered)
	}
	for _, p := range registered {
		if !inTable[p] {
			t.Errorf("NewHandler registers %q but routeTable has no entry: add one so its authentication is tested", p)
		}
		delete(inTable, p)
	}
	delete(inTable, "GET "+upgradePath) // registered as "GET " + path
	for p := range inTable {
		t.Errorf("routeTable lists %q, which NewHandler does not register", p)
	}

	h, _ := routeHandler(t, false)
	for _, rt := range routeTable {
		w := serve(h, rt.method, rt.path, rt.body, append(bearerHeader(testToken), testPeerHeader, "n2")...)
		if w.Code == http.StatusNotFound && strings.Contains(errorText(w), "no such endpoint") {
			t.Errorf("%s: %s %s got the catch-all 404; fix the table's path", rt.pattern, rt.method, rt.path)
		}
	}
}

// TestAuthTable runs every route with every kind of credential and checks
// the answer and whether the backend was reached, with which caller.
func TestAuthTable(t *testing.T) {
	type outcome int
	const (
		reach        outcome = iota // passes authorize; caller checked
		unauthorized                // 401 with WWW-Authenticate, backend untouched
		forbidden                   // 403, backend untouched
	)
	type cred struct {
		name  string
		hdr   []string
		want  func(route) outcome
		token bool // refused for a bad token: the message names what to pass
	}
	// byAccess gives the outcome for accessOpen, accessAdmin, accessNode
	// and accessCert routes, in that order.
	byAccess := func(open, admin, node, cert outcome) func(route) outcome {
		return func(rt route) outcome {
			switch rt.access {
			case accessOpen:
				return open
			case accessAdmin:
				return admin
			case accessNode:
				return node
			case accessCert:
				return cert
			}
			t.Fatalf("route %s: access level %d has no outcomes in TestAuthTable", rt.pattern, rt.access)
			return reach
		}
	}
	always := func(o outcome) func(route) outcome { return func(route) outcome { return o } }
	creds := []cred{
		{name: "none", want: byAccess(reach, unauthorized, forbidden, forbidden)},
		{name: "wrong token", hdr: bearerHeader("not-" + testToken), want: always(unauthorized), token: true},
		{name: "token with prefix", hdr: bearerHeader(testToken + "x"), want: always(unauthorized), token: true},
		{name: "basic scheme", hdr: []string{"Authorization", "Basic x"}, want: always(unauthorized), token: true},
		{name: "basic with the token", hdr: []string{"Authorization", "Basic " + testToken}, want: always(unauthorized), token: true},
		{name: "bearer alone", hdr: []string{"Authorization", "Bearer"}, want: always(unauthorized), token: true},
		{name: "bearer empty", hdr: []string{"Authorization", "Bearer "}, want: always(unauthorized), token: true},
		{name: "bearer glued", hdr: []string{"Authorization", "Bearer" + testToken}, want: always(unauthorized), token: true},
		{name: "token only", hdr: []string{"Authorization", testToken}, want: always(unauthorized), token: true},
		{name: "admin token", hdr: bearerHeader(testToken), want: byAccess(reach, reach, forbidden, forbidden)},
		{name: "admin token lower-case scheme", hdr: []string{"Authorization", "bearer " + testToken}, want: byAccess(reach, reach, forbidden, forbidden)},
		// A node certificate of the cluster CA whose id is not a member (a
		// joining node) may only register itself.
		{name: "non-member node", hdr: []string{testPeerHeader, "mallory"}, want: byAccess(forbidden, forbidden, forbidden, reach)},
		{name: "non-member node with admin token", hdr: append([]string{testPeerHeader, "mallory"}, bearerHeader(testToken)...),
			want: byAccess(forbidden, forbidden, forbidden, reach)},
		{name: "member node", hdr: []string{testPeerHeader, "n2"}, want: always(reach)},
		{name: "member node with wrong token", hdr: append([]string{testPeerHeader, "n2"}, bearerHeader("wrong")...), want: always(unauthorized), token: true},
		{name: "member node with admin token", hdr: append([]string{testPeerHeader, "n2"}, bearerHeader(testToken)...), want: always(reach)},
	}
	for _, rt := range routeTable {
		for _, c := range creds {
			t.Run(rt.pattern+"/"+c.name, func(t *testing.T) {
				h, b := routeHandler(t, false)
				w := serve(h, rt.method, rt.path, rt.body, c.hdr...)
				want := c.want(rt)
				switch want {
				case unauthorized:
					checkUnauthorized(t, w, c.token)
				case forbidden:
					if w.Code != http.StatusForbidden || errorText(w) == "" {
						t.Fatalf("answered %d %q, want 403 with a JSON error", w.Code, w.Body.String())
					}
				case reach:
					if w.Code == http.StatusUnauthorized || w.Code == http.StatusForbidden {
						t.Fatalf("answered %d %q, want the request to pass", w.Code, w.Body.String())
					}
				}
				if rt.backend == "" {
					if want == reach && w.Code != rt.reached {
						t.Fatalf("answered %d %q, want %d (past authorize)", w.Code, w.Body.String(), rt.reached)
					}
					return
				}
				calls := b.callCount(rt.backend)
				if want != reach {
					if n := b.totalCalls(); n != 0 {
						t.Fatalf("refused request reached the backend (%d calls)", n)
					}
					return
				}
				if calls != 1 || w.Code >= 300 {
					t.Fatalf("%s called %d times, answer %d %q; want 1 call and success", rt.backend, calls, w.Code, w.Body.String())
				}
				if rt.backend == "Ready" {
					return // no context, no caller
				}
				wantCaller := Caller{}
				for i := 0; i+1 < len(c.hdr); i += 2 {
					switch {
					case c.hdr[i] == testPeerHeader:
						wantCaller.Node = c.hdr[i+1]
					case c.hdr[i] == "Authorization":
						wantCaller.Admin = true // reached with a token: the right one
					}
				}
				if got := b.callerOf(rt.backend); got != wantCaller {
					t.Fatalf("backend saw caller %+v, want %+v", got, wantCaller)
				}
			})
		}
	}
}

func checkUnauthorized(t *testing.T, w *httptest.ResponseRecorder, badToken bool) {
	t.Helper()
	msg := errorText(w)
	if w.Code != http.StatusUnauthorized {
		t.Fatalf("answered %d %q, want 401", w.Code, w.Body.String())
	}
	if ct := w.Header().Get("Content-Type"); ct != "application/json" {
		t.Errorf("401 Content-Type %q, want application/json", ct)
	}
	if !strings.Contains(msg, "--token-file") || !strings.Contains(msg, "LUPOOL_TOKEN") {
		t.Errorf("401 error %q must name --token-file and LUPOOL_TOKEN", msg)
	}
	if badToken && !strings.Contains(msg, "not this cluster's") {
		t.Errorf("401 for a bad token %q must say the token given is wrong", msg)
	}
	if !badToken && !strings.Contains(msg, "Authorization: Bearer") {
		t.Errorf("401 for a missing token %q must show the header to send", msg)
	}
	if got := w.Header().Get("WWW-Authenticate"); !strings.HasPrefix(got, "Bearer ") {
		t.Errorf("401 WWW-Authenticate %q, want a Bearer challenge", got)
	}
}

// TestProbesProtected: probes are open by default (checked in
// TestAuthTable); with ProtectProbes they need the admin token or a
// member node.
func TestProbesProtected(t *testing.T) {
	for _, rt := range routeTable {
		if !rt.probe() {
			continue
		}
		h, b := routeHandler(t, true)
		w := serve(h, rt.method, rt.path, "")
		checkUnauthorized(t, w, false)
		if n := b.totalCalls(); n != 0 {
			t.Fatalf("%s: refused probe reached the backend (%d calls)", rt.path, n)
		}
		checkUnauthorized(t, serve(h, rt.method, rt.path, "", bearerHeader("wrong")...), true)
		for _, hdr := range [][]string{bearerHeader(testToken), {testPeerHeader, "n3"}} {
			if w := serve(h, rt.method, rt.path, "", hdr...); w.Code != http.StatusOK {
				t.Errorf("%s with %v: %d %q, want 200", rt.path, hdr, w.Code, w.Body.String())
			}
		}
		if w := serve(h, rt.method, rt.path, "", testPeerHeader, "mallory"); w.Code != http.StatusForbidden {
			t.Errorf("%s from a non-member: %d, want 403", rt.path, w.Code)
		}
		// Open by default, even with ProtectProbes false on a fresh handler.
		open, _ := routeHandler(t, false)
		if w := serve(open, rt.method, rt.path, ""); w.Code != http.StatusOK {
			t.Errorf("%s without ProtectProbes: %d %q, want 200 with no credential", rt.path, w.Code, w.Body.String())
		}
	}
}
