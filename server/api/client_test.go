package api

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
)

// TestClientSendsToken: NewClientWith sends its token as a bearer header
// on every call, NewClient sends none, and the handler refuses the latter
// with a message saying what to pass.
func TestClientSendsToken(t *testing.T) {
	var mu sync.Mutex
	var seen []string // guarded by mu
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen = append(seen, r.Header.Get("Authorization"))
		mu.Unlock()
		writeJSON(w, http.StatusOK, []LU{})
	}))
	defer srv.Close()
	ctx := context.Background()
	with, err := NewClientWith(srv.URL, ClientOptions{Token: "tok-1"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := with.ListLUs(ctx); err != nil {
		t.Fatal(err)
	}
	if err := with.DeleteLU(ctx, "x", true); err != nil {
		t.Fatal(err)
	}
	without, err := NewClient(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := without.ListLUs(ctx); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	got := strings.Join(seen, "|")
	mu.Unlock()
	if want := "Bearer tok-1|Bearer tok-1|"; got != want {
		t.Fatalf("Authorization headers %q, want %q", got, want)
	}

	b := newMemBackend()
	api, _ := newTestServer(t, b, "n1")
	anon, err := NewClient(api.URL)
	if err != nil {
		t.Fatal(err)
	}
	_, err = anon.CreateLU(ctx, CreateLURequest{Name: "a", SizeBytes: 512})
	var se *StatusError
	if !errors.As(err, &se) || se.StatusCode != http.StatusUnauthorized || !strings.Contains(se.Message, "LUPOOL_TOKEN") {
		t.Fatalf("create without a token: %v, want 401 naming LUPOOL_TOKEN", err)
	}
	wrong, err := NewClientWith(api.URL, ClientOptions{Token: "wrong"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := wrong.CreateLU(ctx, CreateLURequest{Name: "a", SizeBytes: 512}); statusOfErr(t, err) != http.StatusUnauthorized {
		t.Fatalf("create with a wrong token: %v, want 401", err)
	}
	if n := b.totalCalls(); n != 0 {
		t.Fatalf("refused clients reached the backend (%d calls)", n)
	}
}

// TestClientStatusErrors: a 503 NotLeaderBody fills LeaderID and
// LeaderPeer; other JSON errors leave them empty; a non-JSON error names
// the request and the status.
func TestClientStatusErrors(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/v1/internal/lus/a/copy-change":
			writeJSON(w, http.StatusServiceUnavailable, NotLeaderBody{Error: "not the leader", LeaderID: "n1", LeaderPeer: "10.0.0.1:7001"})
		case "/v1/lus/a":
			writeError(w, http.StatusNotFound, `no LU named "a"`)
		default:
			w.WriteHeader(http.StatusBadGateway)
			_, _ = w.Write([]byte("<html>proxy error</html>"))
		}
	}))
	defer srv.Close()
	c, err := NewClientWith(srv.URL, ClientOptions{Token: "t"})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	var se *StatusError

	_, err = c.ChangeCopies(ctx, "a", CopyChangeRequest{ExpectedEpoch: 1})
	if !errors.As(err, &se) || *se != (StatusError{StatusCode: 503, Message: "not the leader", LeaderID: "n1", LeaderPeer: "10.0.0.1:7001"}) {
		t.Fatalf("not-leader answer: %#v", err)
	}
	_, err = c.GetLU(ctx, "a")
	if !errors.As(err, &se) || *se != (StatusError{StatusCode: 404, Message: `no LU named "a"`}) {
		t.Fatalf("not-found answer: %#v", err)
	}
	_, err = c.ListLUs(ctx)
	if !errors.As(err, &se) || se.StatusCode != http.StatusBadGateway || !strings.Contains(se.Message, "GET /v1/lus") || !strings.Contains(se.Message, "502") {
		t.Fatalf("non-JSON answer: %#v, want 502 naming GET /v1/lus", err)
	}
}

// TestClientAddress: the accepted address forms, and refusals that name
// them.
func TestClientAddress(t *testing.T) {
	for _, tc := range []struct{ addr, base string }{
		{"127.0.0.1:7000", "http://127.0.0.1:7000"},
		{"http://h:1", "http://h:1"},
		{"https://h:1/", "https://h:1"},
	} {
		c, err := NewClientWith(tc.addr, ClientOptions{})
		if err != nil {
			t.Errorf("NewClientWith(%q): %v", tc.addr, err)
			continue
		}
		if c.base != tc.base {
			t.Errorf("NewClientWith(%q): base %q, want %q", tc.addr, c.base, tc.base)
		}
	}
	for _, tc := range []struct {
		addr string
		want []string
	}{
		{"", []string{"--api", "LUPOOL_API"}},
		{"ftp://x", []string{`"ftp://x"`, "HOST:PORT", "http://HOST:PORT", "https://HOST:PORT"}},
		{"http://", []string{"HOST:PORT"}},
		{"unix:///run/lupool.sock", []string{"https://HOST:PORT"}},
	} {
		_, err := NewClientWith(tc.addr, ClientOptions{Token: "t"})
		if err == nil {
			t.Errorf("NewClientWith(%q) accepted", tc.addr)
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("NewClientWith(%q): %q does not name %q", tc.addr, err, w)
			}
		}
	}
}
