package api

import (
	"encoding/json"
	"errors"
	"net/http"
	"reflect"
	"strings"
	"testing"
)

// FuzzBearer: whatever the Authorization header holds, bearer reports it
// present exactly when it is not empty, and an admin route accepts it
// exactly when it is "Bearer" (any case), one space, then the admin token
// (surrounding white space allowed); everything else is a 401.
// Seeds: testdata/fuzz/FuzzBearer.
func FuzzBearer(f *testing.F) {
	for _, s := range []string{"", "Bearer " + testToken, "bearer  " + testToken + " ", "Bearer", "Bearer ", "Basic x",
		"Bearer" + testToken, "Bearer\t" + testToken, testToken, "BEARER " + testToken + "\x00"} {
		f.Add(s)
	}
	h, err := NewHandler(Options{Backend: newMemBackend(), CheckToken: checkTestToken})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, v string) {
		r, _ := http.NewRequest(http.MethodGet, "/", nil)
		r.Header.Set("Authorization", v)
		token, present := bearer(r)
		if present != (v != "") {
			t.Fatalf("bearer(%q) present = %v", v, present)
		}
		if token != "" && !strings.Contains(v, token) {
			t.Fatalf("bearer(%q) = %q, not part of the header", v, token)
		}
		accept := len(v) > len("Bearer ") && strings.EqualFold(v[:len("Bearer ")], "bearer ") &&
			strings.TrimSpace(v[len("Bearer "):]) == testToken
		w := serve(h, http.MethodGet, "/v1/pool", "", "Authorization", v)
		switch {
		case accept && w.Code != http.StatusOK:
			t.Fatalf("Authorization %q: %d %q, want 200", v, w.Code, w.Body.String())
		case !accept && w.Code != http.StatusUnauthorized:
			t.Fatalf("Authorization %q: %d, want 401", v, w.Code)
		}
	})
}

// FuzzDecodeJoinRequest: decode either refuses a body with ErrInvalid or
// yields a JoinRequest that survives a JSON round trip; POST /v1/join
// calls the backend exactly when the body decodes and carries token, id
// and public key, and answers 400 otherwise.
// Seeds: testdata/fuzz/FuzzDecodeJoinRequest.
func FuzzDecodeJoinRequest(f *testing.F) {
	for _, s := range []string{
		`{"token":"join-secret","id":"n9","public_key_pem":"PEM","hosts":["a","b"]}`,
		`{"token":"t","id":"n9"}`,
		`{"token":"t","id":"n9","public_key_pem":"P","extra":1}`,
		`{"token":"t"} {}`,
		`{"token":"t","id":"n1","public_key_pem":"P"}`,
		``, `null`, `[]`, `{"hosts":null}`, `{"token":"\u0000","id":"\ud800","public_key_pem":"x"}`,
	} {
		f.Add([]byte(s))
	}
	b := newMemBackend()
	h, err := NewHandler(Options{Backend: b})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		var req JoinRequest
		err := decode(body, &req)
		if err != nil && !errors.Is(err, ErrInvalid) {
			t.Fatalf("decode(%q) = %v, not ErrInvalid", body, err)
		}
		if err == nil {
			again, merr := json.Marshal(req)
			if merr != nil {
				t.Fatalf("marshal %+v: %v", req, merr)
			}
			var back JoinRequest
			if len(req.Hosts) == 0 {
				req.Hosts = nil // "hosts":[] and no hosts mean the same (omitempty)
			}
			if err := decode(again, &back); err != nil || !reflect.DeepEqual(back, req) {
				t.Fatalf("round trip of %q: %+v (%v), want %+v", again, back, err, req)
			}
		}
		complete := err == nil && req.Token != "" && req.ID != "" && req.PublicKeyPEM != ""

		before := b.callCount("Join")
		w := serve(h, http.MethodPost, "/v1/join", string(body))
		if calls := b.callCount("Join") - before; calls != map[bool]int{true: 1, false: 0}[complete] {
			t.Fatalf("body %q: Join called %d times, complete request %v", body, calls, complete)
		}
		if !complete && w.Code != http.StatusBadRequest {
			t.Fatalf("body %q: %d %q, want 400", body, w.Code, w.Body.String())
		}
	})
}
