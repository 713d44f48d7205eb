package api

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// testToken is the admin token every test handler accepts.
const testToken = "admin-token-for-tests"

// testPeerHeader stands in for a client certificate: testPeerNode trusts
// it as the connection's node id. Only tests do this; the daemon's
// PeerNode reads the verified certificate of the TLS connection.
const testPeerHeader = "X-Test-Peer-Node"

func testPeerNode(r *http.Request) (string, bool) {
	id := r.Header.Get(testPeerHeader)
	return id, id != ""
}

func checkTestToken(token string) bool { return token == testToken }

// members returns an Options.IsMember that accepts exactly ids.
func members(ids ...string) func(string) bool {
	return func(id string) bool {
		for _, m := range ids {
			if m == id {
				return true
			}
		}
		return false
	}
}

// newTestHandler returns a handler over opts with the test credentials
// filled in where opts leaves them nil: the admin token testToken, node
// identity from testPeerHeader, and members n1, n2 and n3.
func newTestHandler(t *testing.T, opts Options) *Handler {
	t.Helper()
	if opts.CheckToken == nil {
		opts.CheckToken = checkTestToken
	}
	if opts.PeerNode == nil {
		opts.PeerNode = testPeerNode
	}
	if opts.IsMember == nil {
		opts.IsMember = members("n1", "n2", "n3")
	}
	h, err := NewHandler(opts)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// newTestServer serves b on an httptest server and returns a client that
// carries the admin token.
func newTestServer(t *testing.T, b Backend, nodeID string) (*httptest.Server, *Client) {
	t.Helper()
	return newTestServerWith(t, Options{Backend: b, NodeID: nodeID})
}

func newTestServerWith(t *testing.T, opts Options) (*httptest.Server, *Client) {
	t.Helper()
	srv := httptest.NewServer(newTestHandler(t, opts))
	t.Cleanup(srv.Close)
	c, err := NewClientWith(srv.URL, ClientOptions{Token: testToken})
	if err != nil {
		t.Fatal(err)
	}
	return srv, c
}

// peerTransport plays a node's mutual-TLS client in tests: it sends
// https:// requests over plain HTTP and adds testPeerHeader naming node.
type peerTransport struct {
	node string
	base http.RoundTripper
}

func (p *peerTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	if r.URL.Scheme == "https" {
		r.URL.Scheme = "http"
	}
	r.Header.Set(testPeerHeader, p.node)
	return p.base.RoundTrip(r)
}

// peerHTTPClient returns a client that proves node as its identity (to a
// handler whose PeerNode is testPeerNode).
func peerHTTPClient(t *testing.T, node string) *http.Client {
	t.Helper()
	tr := &http.Transport{}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: &peerTransport{node: node, base: tr}}
}

// serve runs one request through h and returns the recorded answer. hdr
// is a list of header name, value pairs.
func serve(h http.Handler, method, path, body string, hdr ...string) *httptest.ResponseRecorder {
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	r := httptest.NewRequest(method, path, rd)
	for i := 0; i+1 < len(hdr); i += 2 {
		r.Header.Set(hdr[i], hdr[i+1])
	}
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	return w
}

// send makes one request to a server at base with the given headers.
func send(t *testing.T, base, method, path, body string, hdr ...string) *http.Response {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	r, err := http.NewRequest(method, base+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		r.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(r)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

// errorText decodes the {"error": ...} body of a recorded answer ("" if
// the body is not one).
func errorText(w *httptest.ResponseRecorder) string {
	var eb ErrorBody
	if json.Unmarshal(w.Body.Bytes(), &eb) != nil {
		return ""
	}
	return eb.Error
}

func jsonDecode(resp *http.Response, v any) error { return json.NewDecoder(resp.Body).Decode(v) }

func decodeResp(resp *http.Response, v any) error {
	defer resp.Body.Close()
	return jsonDecode(resp, v)
}

func bearerHeader(token string) []string { return []string{"Authorization", "Bearer " + token} }
