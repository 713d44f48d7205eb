// Package realclient helps tests find and run the real NBD clients
// (nbdsh, nbdinfo, nbdcopy, qemu-img, fio) the way a user would.
//
// A test that needs a tool the machine lacks skips, except in CI (the
// environment variable CI is "true"), where it fails: there a skip would
// look like a pass while the tool was never run. Every such skip goes
// through [Missing] (or [Require] and [LookPath], which call it). A skip for
// another reason (-short, a measurement that means nothing under -race, a
// busy port) is a plain t.Skip.
package realclient

import (
	"fmt"
	"os"
	"os/exec"
	"testing"
)

// installHint names the script that installs every test dependency.
const installHint = "run ./scripts/install-test-deps.sh"

// InCI reports whether the tests run in CI: the environment variable CI is
// "true" (as .ci/run and the usual CI services set it).
func InCI() bool { return os.Getenv("CI") == "true" }

// Missing ends the test because something it needs from the machine (a
// tool, a Python module, the right to mount) is absent: t.Fatalf in CI,
// t.Skipf elsewhere. The message says what is missing.
func Missing(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if InCI() {
		t.Fatalf("%s (CI=true: a missing test dependency fails the test instead of skipping it)", msg)
		return
	}
	t.Skipf("%s", msg)
}

// LookPath returns the path of tool in PATH, or ends the test through
// Missing.
func LookPath(t testing.TB, tool string) string {
	t.Helper()
	p, err := exec.LookPath(tool)
	if err != nil {
		Missing(t, "%s not installed (%s): %v", tool, installHint, err)
		return ""
	}
	return p
}

// Require ends the test through Missing unless every tool is in PATH.
func Require(t testing.TB, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		LookPath(t, tool)
	}
}

// NbdshPython returns a Python interpreter that can import libnbd's nbd
// module, or ends the test through Missing. nbdsh is "python3 -m nbd"; running it through
// the interpreter found here avoids a python3 earlier in PATH (pyenv, venv)
// that lacks Debian's python3-libnbd.
func NbdshPython(t testing.TB) string {
	t.Helper()
	candidates := []string{"/usr/bin/python3"}
	if p, err := exec.LookPath("python3"); err == nil {
		candidates = append([]string{p}, candidates...)
	}
	for _, p := range candidates {
		if err := exec.Command(p, "-c", "import nbd").Run(); err == nil {
			return p
		}
	}
	Missing(t, "no python3 with the nbd module (python3-libnbd); %s", installHint)
	return ""
}

// Nbdsh returns a command that runs nbdsh connected to uri with script.
func Nbdsh(t testing.TB, uri, script string) *exec.Cmd {
	t.Helper()
	return exec.Command(NbdshPython(t), "-m", "nbd", "-u", uri, "-c", script)
}

// MountTmpfs mounts a fresh tmpfs of the given size (e.g. "64m") and
// unmounts it when the test ends. When mount is refused (not root) it ends
// the test through [Missing]: a skip, a failure in CI.
func MountTmpfs(t testing.TB, size string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "lupool-tmpfs-")
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size, "tmpfs", dir).CombinedOutput()
	if err != nil {
		_ = os.Remove(dir)
		Missing(t, "cannot mount a tmpfs (needs root): %v: %s", err, out)
		return ""
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", dir, err, out)
			return
		}
		_ = os.Remove(dir)
	})
	return dir
}
