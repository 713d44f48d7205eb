package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"reflect"
	"sync"
	"testing"
)

// pagingTwin records the paging calls the handler makes and answers
// like package paging: size 0 is ErrInvalid, an unknown VM ErrNotFound.
type pagingTwin struct {
	mu    sync.Mutex
	calls []PagingRequest
}

var _ PagingBackend = (*pagingTwin)(nil)

func (p *pagingTwin) RequestPaging(_ context.Context, req PagingRequest) (PagingSpace, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.calls = append(p.calls, req)
	if req.SizeBytes <= 0 {
		return PagingSpace{}, fmt.Errorf("%w: size %d bytes", ErrInvalid, req.SizeBytes)
	}
	return PagingSpace{VM: req.VM, LU: "paging-" + req.VM, SizeBytes: req.SizeBytes, Host: req.Host, Existed: req.VM == "old"}, nil
}

func (p *pagingTwin) ReleasePaging(_ context.Context, vm string, force bool) error {
	if vm != "vm1" {
		return fmt.Errorf("%w: VM %q has no paging space", ErrNotFound, vm)
	}
	if !force {
		return fmt.Errorf("%w: clients attached", ErrBusy)
	}
	return nil
}

func (p *pagingTwin) ListPaging(context.Context) ([]PagingSpace, error) { return []PagingSpace{}, nil }

func (p *pagingTwin) ShowPaging(_ context.Context, vm string) (PagingSpace, error) {
	return PagingSpace{}, fmt.Errorf("%w: VM %q has no paging space", ErrNotFound, vm)
}

func (p *pagingTwin) MigratePaging(_ context.Context, vm, _ string) (PagingSpace, error) {
	return PagingSpace{}, fmt.Errorf("%w: VM %q has no paging space", ErrNotFound, vm)
}

func pagingHandler(t testing.TB) (*Handler, *pagingTwin) {
	t.Helper()
	twin := &pagingTwin{}
	h, err := NewHandler(Options{Backend: newMemBackend(), CheckToken: checkTestToken, NodeID: "self", Paging: twin})
	if err != nil {
		t.Fatal(err)
	}
	return h, twin
}

// TestPagingRoutes: status codes of the paging calls, the host filled in
// with this node, 201 for new space and 200 for space already there.
func TestPagingRoutes(t *testing.T) {
	h, twin := pagingHandler(t)
	auth := []string{"Authorization", "Bearer " + testToken}
	for _, c := range []struct {
		method, path, body string
		want               int
	}{
		{http.MethodPost, "/v1/paging", `{"vm":"vm1","size_bytes":4096}`, http.StatusCreated},
		{http.MethodPost, "/v1/paging", `{"vm":"old","size_bytes":4096}`, http.StatusOK},
		{http.MethodPost, "/v1/paging", `{"vm":"vm1","size_bytes":0}`, http.StatusBadRequest},
		{http.MethodPost, "/v1/paging", `{"vm":"vm1","size":1}`, http.StatusBadRequest},
		{http.MethodGet, "/v1/paging", "", http.StatusOK},
		{http.MethodGet, "/v1/paging/ghost", "", http.StatusNotFound},
		{http.MethodDelete, "/v1/paging/vm1", "", http.StatusConflict},
		{http.MethodDelete, "/v1/paging/vm1?force=true", "", http.StatusNoContent},
		{http.MethodDelete, "/v1/paging/vm1?force=maybe", "", http.StatusBadRequest},
		{http.MethodDelete, "/v1/paging/ghost?force=true", "", http.StatusNotFound},
	} {
		if w := serve(h, c.method, c.path, c.body, auth...); w.Code != c.want {
			t.Errorf("%s %s %s: %d %s, want %d", c.method, c.path, c.body, w.Code, w.Body.String(), c.want)
		}
	}
	if w := serve(h, http.MethodGet, "/v1/paging", ""); w.Code != http.StatusUnauthorized {
		t.Errorf("without the admin token: %d", w.Code)
	}
	if len(twin.calls) != 3 || twin.calls[0].Host != "self" {
		t.Errorf("backend calls %+v: want 3 (the malformed body never reaches it), host self", twin.calls)
	}
}

// FuzzPagingRequest: POST /v1/paging calls the backend exactly once with
// the decoded request (its host filled in with this node when empty)
// when the body decodes, and never otherwise (400).
// Seeds: testdata/fuzz/FuzzPagingRequest.
func FuzzPagingRequest(f *testing.F) {
	for _, s := range []string{
		`{"vm":"vm1","size_bytes":8589934592}`,
		`{"vm":"vm1","size_bytes":4096,"host":"n2","copies":2,"kind":"memory","socket":"/run/x.sock"}`,
		`{"vm":"vm1","size_bytes":-1}`, `{"vm":"vm1","size_bytes":1.5}`, `{"vm":1}`,
		`{"vm":"a"} {}`, ``, `null`, `[]`, `{"vm":"\ud800","size_bytes":4096,"extra":0}`,
	} {
		f.Add([]byte(s))
	}
	h, twin := pagingHandler(f)
	f.Fuzz(func(t *testing.T, body []byte) {
		var req PagingRequest
		err := decode(body, &req)
		if err != nil && !errors.Is(err, ErrInvalid) {
			t.Fatalf("decode(%q) = %v, not ErrInvalid", body, err)
		}
		twin.mu.Lock()
		before := len(twin.calls)
		twin.mu.Unlock()
		w := serve(h, http.MethodPost, "/v1/paging", string(body), "Authorization", "Bearer "+testToken)
		twin.mu.Lock()
		calls := twin.calls[before:]
		twin.mu.Unlock()
		if err != nil {
			if len(calls) != 0 || w.Code != http.StatusBadRequest {
				t.Fatalf("body %q: %d calls, status %d; want none and 400", body, len(calls), w.Code)
			}
			return
		}
		if req.Host == "" {
			req.Host = "self"
		}
		if len(calls) != 1 || !reflect.DeepEqual(calls[0], req) {
			t.Fatalf("body %q: calls %+v, want one with %+v", body, calls, req)
		}
		if w.Code == http.StatusCreated || w.Code == http.StatusOK {
			var sp PagingSpace
			if err := json.Unmarshal(w.Body.Bytes(), &sp); err != nil || sp.VM != req.VM {
				t.Fatalf("body %q: answer %q (%v)", body, w.Body.String(), err)
			}
		}
	})
}
