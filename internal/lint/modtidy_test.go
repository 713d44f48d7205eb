package lint

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestGoModTidy fails when `go mod tidy` would change go.mod or go.sum,
// and prints the change. `go mod tidy -diff` writes nothing: it prints the
// diff and exits non-zero.
//
// tidy looks at the test dependencies of every dependency, more modules
// than a build fetches, so on a fresh machine it needs the module proxy.
// Under -short it runs from the module cache alone (GOPROXY=off) and skips
// when the cache lacks a module; without -short it may download.
func TestGoModTidy(t *testing.T) {
	root := moduleRoot(t)
	cmd := exec.Command("go", "mod", "tidy", "-diff")
	cmd.Dir = root
	cmd.Env = os.Environ()
	if testing.Short() {
		cmd.Env = append(cmd.Env, "GOPROXY=off")
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err == nil {
		return
	}
	var exit *exec.ExitError
	if !errors.As(err, &exit) {
		t.Fatalf("go mod tidy -diff: %v", err)
	}
	if stdout.Len() == 0 {
		// No diff: tidy itself failed.
		if testing.Short() && strings.Contains(stderr.String(), "GOPROXY=off") {
			t.Skipf("-short: the module cache lacks a module tidy needs and the proxy is off:\n%s", stderr.String())
		}
		t.Fatalf("go mod tidy -diff failed:\n%s", stderr.String())
	}
	t.Fatalf("go.mod/go.sum are not tidy; run `go mod tidy` in %s. It would change:\n%s", root, stdout.String())
}

// moduleRoot returns the directory of the main module's go.mod.
func moduleRoot(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		t.Fatalf("go env GOMOD: %v", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		t.Fatalf("go env GOMOD = %q: not inside the module", gomod)
	}
	return filepath.Dir(gomod)
}
