package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os/exec"
	"runtime"
	"strings"
	"testing"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// runCLI runs one command line in process (no daemon is needed for help,
// usage errors, completion and version).
func runCLI(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var out, errOut bytes.Buffer
	code = run(context.Background(), args, &out, &errOut)
	return out.String(), errOut.String(), code
}

// commandPaths lists every command of the tree as its argument words
// ("lu create"), the root as an empty slice.
func commandPaths(c *cobra.Command, prefix []string) [][]string {
	paths := [][]string{prefix}
	for _, s := range c.Commands() {
		if s.Hidden || s.Name() == "help" {
			continue
		}
		paths = append(paths, commandPaths(s, append(append([]string(nil), prefix...), s.Name()))...)
	}
	return paths
}

// TestCLIHelpEveryCommand: -h and --help on every command and group exit 0
// and list each of its own flags and the global ones.
func TestCLIHelpEveryCommand(t *testing.T) {
	root := newRootCommand(&bytes.Buffer{}, &bytes.Buffer{})
	paths := commandPaths(root, nil)
	if len(paths) < 20 {
		t.Fatalf("only %d commands in the tree: %v", len(paths), paths)
	}
	for _, path := range paths {
		cmd, _, err := root.Find(path)
		if err != nil {
			t.Fatalf("find %v: %v", path, err)
		}
		for _, help := range []string{"--help", "-h"} {
			out, errOut, code := runCLI(t, append(append([]string(nil), path...), help)...)
			name := strings.Join(append([]string{"lupool"}, path...), " ")
			if code != 0 || !strings.Contains(out, "Usage:") {
				t.Errorf("%s %s: exit %d, stdout %q, stderr %q; want 0 and a usage", name, help, code, out, errOut)
				continue
			}
			cmd.LocalFlags().VisitAll(func(f *pflag.Flag) {
				if !strings.Contains(out, "--"+f.Name) {
					t.Errorf("%s %s does not list its flag --%s:\n%s", name, help, f.Name, out)
				}
			})
			if path != nil && path[0] != "serve" && !strings.Contains(out, "--token-file") {
				t.Errorf("%s %s does not list the global flags:\n%s", name, help, out)
			}
		}
	}
	// `lupool help lu create` is the same as `lupool lu create --help`.
	a, _, code := runCLI(t, "help", "lu", "create")
	b, _, _ := runCLI(t, "lu", "create", "--help")
	if code != 0 || a != b {
		t.Errorf("lupool help lu create: exit %d, differs from lu create --help", code)
	}
}

// TestCLIUsageErrors: a command line that is wrong exits 2 and says what
// to fix; nothing reaches an API (there is none here).
func TestCLIUsageErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want []string
	}{
		{nil, []string{"Usage:", "lupool [command]"}},
		{[]string{"lsit"}, []string{`unknown command "lsit"`, "Did you mean this?", "lupool lu list", "lupool node list"}},
		{[]string{"lu", "lsit"}, []string{`unknown lu subcommand "lsit"`, "lupool lu list"}},
		{[]string{"lu", "frobnicate"}, []string{`unknown lu subcommand "frobnicate": use add-copy, create, delete, flatten, list, move, resize, rollback, scrub, set, show, snapshot or verify`}},
		{[]string{"cluster", "join-tokn"}, []string{"lupool cluster join-token"}},
		{[]string{"satus"}, []string{"lupool status"}},
		{[]string{"lu"}, []string{"lu needs a subcommand"}},
		{[]string{"node"}, []string{"node needs a subcommand: list or remove"}},
		{[]string{"lu", "show"}, []string{"lu show needs exactly one LU name, got 0 arguments"}},
		{[]string{"lu", "list", "extra"}, []string{`lu list takes no arguments, got "extra"`}},
		{[]string{"lu", "create", "x", "--bogus"}, []string{"unknown flag: --bogus", "lupool lu create --help"}},
		{[]string{"lu", "create", "x"}, []string{"--size is required"}},
		{[]string{"lu", "create", "x", "--size", "10X"}, []string{"like 512, 64K, 10G"}},
		{[]string{"lu", "create", "x", "--size", "1M", "--copies", "0"}, []string{"--copies must be 1 or more"}},
		{[]string{"lu", "create", "x", "--size", "1M", "--copies", "two"}, []string{`invalid argument "two" for "--copies"`}},
		{[]string{"lu", "list", "-o", "yaml"}, []string{`-o "yaml": use table or json`}},
		{[]string{"-o", "yaml", "lu", "list"}, []string{`-o "yaml": use table or json`}},
		{[]string{"lu", "verify", "x", "--region", "big"}, []string{"--region"}},
		{[]string{"lu", "verify", "x", "--region", "6K"}, []string{"--region 6K: use a multiple of 4K from 4K to 64M"}},
		{[]string{"lu", "create", "x", "--size", "2048P"}, []string{"--size must be at most 1 EiB"}},
		{[]string{"lu", "create", "x", "--size", "0"}, []string{"--size must be larger than zero"}},
		{[]string{"lu", "create", "x", "--size", "1M", "--copies", "17"}, []string{"--copies at most 16, got 17"}},
		{[]string{"cluster", "join-token", "--ttl", "10ms"}, []string{"give at least 1s"}},
		{[]string{"cluster", "join-token", "extra"}, []string{"takes no arguments (subcommands: list, revoke ID)"}},
		{[]string{"attach", "swap0"}, []string{"attach needs LU and either --listen ADDR or a device"}},
		{[]string{"attach", "swap0", "/dev/nbd0", "--listen", "unix:/tmp/x"}, []string{"attach needs LU and either --listen ADDR or a device"}},
		{[]string{"serve", "extra"}, []string{"serve takes no arguments"}},
		{[]string{"serve", "--bogus"}, []string{"unknown flag: --bogus"}},
		{[]string{"completion", "tcsh"}, []string{"tcsh"}},
		{[]string{"image", "import", "x"}, []string{"image import needs a name and at least one source"}},
		{[]string{"image", "import", "a/b", "/dev/null"}, []string{`image name "a/b"`, "A-Z a-z 0-9"}},
		{[]string{"image", "import", "x", "/nonexistent/disk.raw"}, []string{"source /nonexistent/disk.raw: no such file or directory", "raw, qcow2 or vmdk"}},
		{[]string{"image", "import", "x", "nbd://"}, []string{"no host", "nbd://HOST[:PORT]/EXPORT"}},
		{[]string{"image", "import", "x", "/dev/null", "--copies", "0"}, []string{"--copies must be 1 or more"}},
		{[]string{"image", "import", "x", "/dev/null", "--rate", "fast"}, []string{"--rate"}},
		{[]string{"lu", "create", "x", "--from", "img/0", "--kind", "memory"}, []string{"--from makes a linked clone"}},
	} {
		out, errOut, code := runCLI(t, tc.args...)
		if code != exitUsage {
			t.Errorf("lupool %s: exit %d, want %d (stdout %q, stderr %q)", strings.Join(tc.args, " "), code, exitUsage, out, errOut)
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(errOut, w) {
				t.Errorf("lupool %s: stderr %q does not say %q", strings.Join(tc.args, " "), errOut, w)
			}
		}
		if out != "" {
			t.Errorf("lupool %s: a usage error wrote to stdout: %q", strings.Join(tc.args, " "), out)
		}
	}
}

// TestCLICompletion: the bash script loads in bash and registers the
// completion; the completer lists subcommands and flag values; zsh and
// fish scripts are produced.
func TestCLICompletion(t *testing.T) {
	bash, err := exec.LookPath("bash")
	if err != nil {
		t.Fatalf("bash: %v", err)
	}
	// The script as lupool prints it, sourced the way users do:
	// source <(lupool completion bash).
	cmd := exec.Command(bash, "-c", `source <("$0" completion bash) && complete -p lupool`, lupoolBin)
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "-F __start_lupool lupool") {
		t.Fatalf("source <(lupool completion bash): %v\n%s", err, out)
	}
	for _, shell := range []string{"zsh", "fish", "powershell"} {
		if out, _, code := runCLI(t, "completion", shell); code != 0 || !strings.Contains(out, "lupool") {
			t.Errorf("completion %s: exit %d, %d bytes", shell, code, len(out))
		}
	}
	for _, tc := range []struct {
		args []string
		want []string
	}{
		{[]string{"__complete", "lu", ""}, []string{"create", "list", "show", "resize", "delete", "add-copy", "verify"}},
		{[]string{"__complete", "cluster", "join-token", ""}, []string{"list", "revoke"}},
		{[]string{"__complete", "lu", "create", "x", "--kind", ""}, []string{"file", "memory"}},
		{[]string{"__complete", "lu", "list", "-o", ""}, []string{"table", "json"}},
		{[]string{"__complete", "st"}, []string{"status"}},
	} {
		out, _, code := runCLI(t, tc.args...)
		for _, w := range tc.want {
			if code != 0 || !strings.Contains(out, w+"\t") && !strings.Contains(out, w+"\n") {
				t.Errorf("lupool %s: exit %d, completions %q lack %q", strings.Join(tc.args, " "), code, out, w)
			}
		}
	}
}

// TestCLIVersion: version (and --version) name the Go version and
// platform; -o json gives the same as fields.
func TestCLIVersion(t *testing.T) {
	out, _, code := runCLI(t, "version")
	if code != 0 || !strings.HasPrefix(out, "lupool ") || !strings.Contains(out, runtime.Version()) || !strings.Contains(out, runtime.GOOS+"/"+runtime.GOARCH) {
		t.Errorf("lupool version: exit %d %q", code, out)
	}
	if alt, _, code := runCLI(t, "--version"); code != 0 || alt != out {
		t.Errorf("lupool --version: exit %d %q, want %q", code, alt, out)
	}
	js, _, code := runCLI(t, "version", "-o", "json")
	var v buildVersion
	if err := json.Unmarshal([]byte(js), &v); code != 0 || err != nil || v.GoVersion != runtime.Version() || v.Version == "" {
		t.Errorf("lupool version -o json: exit %d %v %q", code, err, js)
	}
	// The binary under test, built from a git checkout, names its commit.
	head, err := exec.Command("git", "rev-parse", "HEAD").Output()
	if err != nil {
		t.Logf("not a git checkout here (%v): the commit is not checked", err)
		return
	}
	bin, err := exec.Command(lupoolBin, "version").Output()
	if err != nil || !strings.Contains(string(bin), "commit "+strings.TrimSpace(string(head))) {
		t.Errorf("lupool version of the binary under test: %v %q, want commit %s", err, bin, head)
	}
}
