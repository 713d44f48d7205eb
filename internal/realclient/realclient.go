// Package realclient helps tests find and run the real NBD clients
// (nbdsh, nbdinfo, nbdcopy, qemu-img, fio) the way a user would.
package realclient

import (
	"os/exec"
	"testing"
)

// NbdshPython returns a Python interpreter that can import libnbd's nbd
// module, or skips the test. nbdsh is "python3 -m nbd"; running it through
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
	t.Skip("no python3 with the nbd module (python3-libnbd); run ./scripts/install-test-deps.sh")
	return ""
}

// Nbdsh returns a command that runs nbdsh connected to uri with script.
func Nbdsh(t testing.TB, uri, script string) *exec.Cmd {
	t.Helper()
	return exec.Command(NbdshPython(t), "-m", "nbd", "-u", uri, "-c", script)
}
