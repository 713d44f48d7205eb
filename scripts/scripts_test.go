// Package scripts holds no code: its tests check the install layout that
// `make install` lays out and the systemd unit it installs (README.md,
// "Running as a service").
package scripts

import (
	"bytes"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

// needTool returns the path of a program the test drives. Without it the
// test is skipped, except in CI (CI=true), where a missing tool fails:
// ./scripts/install-test-deps.sh installs every one.
func needTool(t *testing.T, name string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err == nil {
		return path
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("%s not found (CI=true: a missing tool fails; ./scripts/install-test-deps.sh installs it): %v", name, err)
	}
	t.Skipf("%s not found; ./scripts/install-test-deps.sh installs it: %v", name, err)
	return ""
}

// repoRoot is the module root: the Makefile and scripts/ live there.
func repoRoot(t *testing.T) string {
	t.Helper()
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "Makefile")); err != nil {
		t.Fatalf("no Makefile above the scripts package: %v", err)
	}
	return root
}

// runMake runs make in the repository with vars (NAME=value) and returns
// its output. A parent make's flags (make test runs go test) are dropped.
func runMake(t *testing.T, vars ...string) string {
	t.Helper()
	cmd := exec.Command("make", append([]string{"--no-print-directory"}, vars...)...)
	cmd.Dir = repoRoot(t)
	for _, kv := range os.Environ() {
		switch name, _, _ := strings.Cut(kv, "="); name {
		case "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "DESTDIR", "PREFIX", "SYSTEMDUNITDIR", "BIN":
		default:
			cmd.Env = append(cmd.Env, kv)
		}
	}
	start := time.Now()
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("make %s: %v\n%s", strings.Join(vars, " "), err, out)
	}
	t.Logf("make %s: %v", strings.Join(vars, " "), time.Since(start).Round(time.Millisecond))
	return string(out)
}

// layout lists every path under root (relative, "/"-separated) with its
// permission bits, and a "/" suffix on directories.
func layout(t *testing.T, root string) map[string]fs.FileMode {
	t.Helper()
	got := map[string]fs.FileMode{}
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil || path == root {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, path)
		rel = filepath.ToSlash(rel)
		if d.IsDir() {
			rel += "/"
		} else if !info.Mode().IsRegular() {
			t.Errorf("%s is neither a file nor a directory: %v", rel, info.Mode())
		}
		got[rel] = info.Mode().Perm()
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return got
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestMakeInstall checks that `make install DESTDIR=...` lays out exactly
// the binary, the unit, the config and the data directory with their
// modes; that a second install keeps an operator's config; that PREFIX
// moves the binary and the unit's ExecStart; and that `make uninstall`
// removes the binary and the unit but keeps config and data.
func TestMakeInstall(t *testing.T) {
	needTool(t, "make")
	needTool(t, "install")
	needTool(t, "sed")
	root := repoRoot(t)
	tmp := t.TempDir()
	dest := filepath.Join(tmp, "root")
	bin := "BIN=" + filepath.Join(tmp, "build", "lupool") // keeps bin/ of the checkout as it is

	runMake(t, "install", "DESTDIR="+dest, bin)
	// Files and the directories install creates for them; the parents'
	// modes follow the umask, so only the leaves' modes are checked.
	wantModes := map[string]fs.FileMode{
		"usr/local/bin/lupool":              0o755,
		"lib/systemd/system/lupool.service": 0o644,
		"etc/lupool/":                       0o755,
		"etc/lupool/lupool.json":            0o640,
		"var/lib/lupool/":                   0o700,
	}
	parents := []string{"usr/", "usr/local/", "usr/local/bin/", "lib/", "lib/systemd/", "lib/systemd/system/", "etc/", "var/", "var/lib/"}
	got := layout(t, dest)
	for path, mode := range wantModes {
		if m, ok := got[path]; !ok {
			t.Errorf("make install did not create %s", path)
		} else if m != mode {
			t.Errorf("%s has mode %04o, want %04o", path, m, mode)
		}
	}
	for path := range got {
		if _, ok := wantModes[path]; !ok && !slices.Contains(parents, path) {
			t.Errorf("make install created %s, which it should not", path)
		}
	}
	for _, p := range parents {
		if _, ok := got[p]; !ok {
			t.Errorf("make install did not create %s", p)
		}
	}
	if !bytes.Equal(readFile(t, filepath.Join(dest, "lib/systemd/system/lupool.service")), readFile(t, filepath.Join(root, "scripts/lupool.service"))) {
		t.Error("the installed unit differs from scripts/lupool.service (with the default PREFIX it must be the same)")
	}
	confPath := filepath.Join(dest, "etc/lupool/lupool.json")
	if !bytes.Equal(readFile(t, confPath), readFile(t, filepath.Join(root, "scripts/lupool.example.json"))) {
		t.Error("the installed config differs from scripts/lupool.example.json")
	}
	out, err := exec.Command(filepath.Join(dest, "usr/local/bin/lupool"), "help").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "lupool serve") {
		t.Errorf("the installed binary does not run: lupool help: %v\n%s", err, out)
	}

	// An operator's config survives a second install, and so do the
	// modes they chose for it and for the data directory.
	operator := []byte(`{"data": "/var/lib/lupool", "nbd": "192.0.2.10:10809"}` + "\n")
	if err := os.WriteFile(confPath, operator, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(confPath, 0o600); err != nil {
		t.Fatal(err)
	}
	out2 := runMake(t, "install", "DESTDIR="+dest, bin)
	if !bytes.Equal(readFile(t, confPath), operator) {
		t.Errorf("a second make install overwrote the operator's config:\n%s", out2)
	}
	if !strings.Contains(out2, "keeping ") {
		t.Errorf("a second make install does not say it keeps the config:\n%s", out2)
	}
	if m := layout(t, dest)["etc/lupool/lupool.json"]; m != 0o600 {
		t.Errorf("a second make install changed the config's mode to %04o", m)
	}

	// PREFIX=/usr: the binary in /usr/bin, and the unit starts it there.
	destUsr := filepath.Join(tmp, "root-usr")
	runMake(t, "install", "DESTDIR="+destUsr, "PREFIX=/usr", bin)
	if _, err := os.Stat(filepath.Join(destUsr, "usr/bin/lupool")); err != nil {
		t.Errorf("PREFIX=/usr: %v", err)
	}
	unit := string(readFile(t, filepath.Join(destUsr, "lib/systemd/system/lupool.service")))
	if !slices.Contains(strings.Split(unit, "\n"), "ExecStart=/usr/bin/lupool serve --config /etc/lupool/lupool.json") {
		t.Errorf("PREFIX=/usr: the unit's ExecStart does not name /usr/bin/lupool:\n%s", regexp.MustCompile(`(?m)^ExecStart=.*$`).FindString(unit))
	}

	runMake(t, "uninstall", "DESTDIR="+dest)
	got = layout(t, dest)
	for _, gone := range []string{"usr/local/bin/lupool", "lib/systemd/system/lupool.service"} {
		if _, ok := got[gone]; ok {
			t.Errorf("make uninstall left %s", gone)
		}
	}
	for _, kept := range []string{"etc/lupool/lupool.json", "var/lib/lupool/"} {
		if _, ok := got[kept]; !ok {
			t.Errorf("make uninstall removed %s (the operator's config and the LU data stay)", kept)
		}
	}
}

// TestSystemdUnitVerifies runs systemd-analyze verify on scripts/lupool.service.
// verify insists that ExecStart's program exists and is executable, so it
// runs on a copy of the unit (same file name) whose ExecStart names a
// freshly built binary. (--root=DESTDIR after make install does not work:
// verify then looks for sysinit.target and the other default dependencies
// inside DESTDIR.) systemd-analyze exits 0 on unknown keys and bad values,
// printing a warning, so any output fails the test too.
func TestSystemdUnitVerifies(t *testing.T) {
	analyze := needTool(t, "systemd-analyze")
	root := repoRoot(t)
	tmp := t.TempDir()
	bin := filepath.Join(tmp, "lupool")
	build := exec.Command("go", "build", "-o", bin, "./cmd/lupool")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}

	unit := string(readFile(t, filepath.Join(root, "scripts/lupool.service")))
	const exec0 = "ExecStart=/usr/local/bin/lupool "
	if strings.Count(unit, "\n"+exec0) != 1 {
		t.Fatalf("scripts/lupool.service: want exactly one line starting %q (make install rewrites it for PREFIX)", exec0)
	}
	unit = strings.Replace(unit, "\n"+exec0, "\nExecStart="+bin+" ", 1)
	unitPath := filepath.Join(tmp, "verify", "lupool.service")
	if err := os.MkdirAll(filepath.Dir(unitPath), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(unitPath, []byte(unit), 0o644); err != nil {
		t.Fatal(err)
	}

	cmd := exec.Command(analyze, "verify", unitPath)
	cmd.Env = append(os.Environ(), "SYSTEMD_LOG_LEVEL=info", "SYSTEMD_COLORS=0", "SYSTEMD_PAGER=")
	start := time.Now()
	out, err := cmd.CombinedOutput()
	t.Logf("systemd-analyze verify: %v, output %q", time.Since(start).Round(time.Millisecond), out)
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Fatalf("systemd-analyze verify %s: %v\n%s", unitPath, err, out)
	}
}
