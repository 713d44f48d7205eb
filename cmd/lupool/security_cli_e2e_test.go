package main

import (
	"encoding/json"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestSecurityCLICommands runs the README's security commands against
// real nodes: the CLI over HTTPS with --ca-file, join-token list,
// rotate-admin-token (the old token stops working, the token file holds
// the new one), node remove (the node leaves, its id cannot join again),
// and --open-probes=false.
func TestSecurityCLICommands(t *testing.T) {
	alongside(t)
	n1 := newDaemon(t, "n1")
	n1.start()
	n2 := newJoiner(t, "n2", n1)
	n2.start()

	// HTTPS with the cluster CA; without the CA the CLI says what to give.
	https := "https://" + n1.api
	ca := filepath.Join(n1.certDir(), "ca.crt")
	if out := n1.mustCLI("lu", "create", "s", "--size", "1M", "--api", https, "--ca-file", ca); !strings.Contains(out, "s ") {
		t.Fatalf("lu create over https: %q", out)
	}
	if _, errOut, code := n1.cli("lu", "list", "--api", https, "--ca-file", filepath.Join(t.TempDir(), "none.crt")); code != 1 || !strings.Contains(errOut, "--ca-file") {
		t.Fatalf("https without the CA: exit %d, %q; want 1 naming --ca-file", code, errOut)
	}

	// Probes closed by --open-probes=false: the token opens them.
	closed := newDaemon(t, "closed", "--open-probes=false")
	cmd := exec.Command(lupoolBin, "serve", "--data", closed.data, "--nbd", closed.nbd, "--api", closed.api, "--peer", closed.peer,
		"--node-id", closed.id, "--open-probes=false")
	cmd.Stdout, cmd.Stderr = &closed.log, &closed.log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	for deadline := time.Now().Add(time.Minute); ; {
		if tok, err := os.ReadFile(closed.tokenFile()); err == nil {
			r, err := http.NewRequest("GET", "http://"+closed.api+"/readyz", nil)
			if err != nil {
				t.Fatal(err)
			}
			r.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(tok)))
			if resp, err := http.DefaultClient.Do(r); err == nil {
				resp.Body.Close()
				if resp.StatusCode == http.StatusOK {
					break
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("node with --open-probes=false not ready (with the token) after a minute:\n%s", closed.logs())
		}
		time.Sleep(100 * time.Millisecond)
	}
	for _, path := range []string{"/metrics", "/readyz", "/healthz"} {
		if r := rawHTTP(t, nil, "GET", "http://"+closed.api+path, "", ""); r.status != http.StatusUnauthorized {
			t.Fatalf("%s without a token and --open-probes=false: %d, want 401", path, r.status)
		}
		if r := rawHTTP(t, nil, "GET", "http://"+closed.api+path, "", "Bearer "+closed.token()); r.status != http.StatusOK {
			t.Fatalf("%s with the token: %d", path, r.status)
		}
	}

	// join-token list shows the token n2 joined with, never its secret.
	var toks []struct {
		ID      string `json:"id"`
		Revoked bool   `json:"revoked"`
	}
	out := n1.mustCLI("cluster", "join-token", "list", "-o", "json")
	if err := json.Unmarshal([]byte(out), &toks); err != nil || len(toks) == 0 || strings.Contains(out, "secret") {
		t.Fatalf("join-token list: %v, %q", err, out)
	}

	// rotate-admin-token: the file the CLI read gets the new token.
	old := n1.token()
	file := filepath.Join(t.TempDir(), "admin.token")
	if err := os.WriteFile(file, []byte(old+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if out := n1.mustCLI("cluster", "rotate-admin-token", "--token-file", file); !strings.Contains(out, file) {
		t.Fatalf("rotate-admin-token: %q, want it to name %s", out, file)
	}
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	fresh := strings.TrimSpace(string(b))
	if fresh == old || fresh != n1.token() {
		t.Fatalf("after rotation: token file %q, leader's DATA/admin.token %q, old %q", fresh, n1.token(), old)
	}
	if r := rawHTTP(t, nil, "GET", "http://"+n1.api+"/v1/lus", "", "Bearer "+old); r.status != http.StatusUnauthorized {
		t.Fatalf("n1: the old admin token after rotation: %d, want 401", r.status)
	}
	// The follower learns the new hash through the log.
	for deadline := time.Now().Add(10 * time.Second); ; {
		oldStatus := rawHTTP(t, nil, "GET", "http://"+n2.api+"/v1/lus", "", "Bearer "+old).status
		newStatus := rawHTTP(t, nil, "GET", "http://"+n2.api+"/v1/lus", "", "Bearer "+fresh).status
		if oldStatus == http.StatusUnauthorized && newStatus == http.StatusOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("n2 10 s after the rotation: old token %d, new token %d; want 401 and 200", oldStatus, newStatus)
		}
		time.Sleep(100 * time.Millisecond)
	}

	// node remove: n2 leaves and its id cannot join again.
	n1.mustCLI("node", "remove", "n2")
	var nodes []struct{ ID string }
	if err := json.Unmarshal([]byte(n1.mustCLI("node", "list", "-o", "json")), &nodes); err != nil || len(nodes) != 1 || nodes[0].ID != "n1" {
		t.Fatalf("node list after removing n2: %+v, %v", nodes, err)
	}
	api, args := joinArgs(t, "n2", n1, n1.joinToken())
	out, code, ready := serveExpectFail(t, time.Minute, api, args...)
	if code == 0 || ready || !strings.Contains(out, "was removed") {
		t.Fatalf("rejoining a removed id: exit %d, ready %v, output %q; want a refusal naming the removal", code, ready, out)
	}
}
