package main

import (
	"bufio"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lupool/lupool/internal/realclient"
	"github.com/lupool/lupool/server/api"
)

// readmeCommand is one command line of a ```sh block of the README.
type readmeCommand struct {
	line int    // 1-based line in README.md
	text string // as written, continuation lines joined
}

// readmeCommands returns the command lines of README.md's sh blocks.
func readmeCommands(t *testing.T) []readmeCommand {
	t.Helper()
	f, err := os.Open(filepath.Join("..", "..", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var cmds []readmeCommand
	inBlock, n := false, 0
	var cur *readmeCommand
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		n++
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "```sh"):
			inBlock = true
			continue
		case strings.HasPrefix(line, "```"):
			inBlock = false
			continue
		case !inBlock || strings.TrimSpace(line) == "" || strings.HasPrefix(strings.TrimSpace(line), "#"):
			continue
		}
		if cur == nil {
			cmds = append(cmds, readmeCommand{line: n})
			cur = &cmds[len(cmds)-1]
		}
		body, more := strings.CutSuffix(strings.TrimRight(line, " "), "\\")
		cur.text += body
		if !more {
			cur = nil
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return cmds
}

// readmeNotRun says why a README command is not run here, or "".
func readmeNotRun(cmd string) string {
	switch {
	case strings.HasPrefix(cmd, "make "):
		return "the two make commands are this test (serve with defaults) and the suite itself"
	case strings.Contains(cmd, "/dev/nbd"):
		return "no kernel NBD module on the build machines (the hand-off is tested by protocol in server/nbdkernel)"
	case strings.Contains(cmd, "qemu-system"):
		return "booting a guest is not a README check"
	case strings.HasPrefix(cmd, "systemctl ") || strings.HasPrefix(cmd, "journalctl "):
		return "needs systemd as PID 1 (the unit is checked with systemd-analyze verify in package scripts)"
	}
	return ""
}

// TestREADMEExamples runs every command of the README's sh blocks, the way
// the README shows them: `make run`'s daemon (lupool serve with defaults)
// in a fresh directory, and each command from that directory with bin/lupool
// and the real clients, in README order. Each must exit 0. The fio example
// runs 2 s instead of 30 s.
func TestREADMEExamples(t *testing.T) {
	needTools(t, "nbdinfo", "fio", "bash")
	needDefaultPortsFree(t)
	cmds := readmeCommands(t)
	work := t.TempDir()
	if err := os.MkdirAll(filepath.Join(work, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(lupoolBin, filepath.Join(work, "bin", "lupool")); err != nil {
		t.Fatal(err)
	}
	began := time.Now()
	d := serveInDir(t, work, "127.0.0.1:10810", nil)
	ready := time.Now()
	defer func() {
		stopAt := time.Now()
		d.stop(syscall.SIGTERM)
		t.Logf("daemon ready after %v, stopped in %v", ready.Sub(began).Round(time.Millisecond), time.Since(stopAt).Round(time.Millisecond))
	}()

	ran := map[string]bool{}
	shorter := regexp.MustCompile(`--runtime=\d+`)
	for _, c := range cmds {
		if why := readmeNotRun(c.text); why != "" {
			t.Logf("README.md:%d not run (%s): %s", c.line, why, c.text)
			continue
		}
		text := shorter.ReplaceAllString(c.text, "--runtime=2")
		sh := exec.Command("bash", "-c", "set -o pipefail; "+text)
		sh.Dir = work
		sh.Env = []string{"PATH=" + filepath.Join(work, "bin") + ":" + os.Getenv("PATH"), "HOME=" + work}
		began := time.Now()
		out, err := sh.CombinedOutput()
		if err != nil {
			t.Errorf("README.md:%d: %s\n%v\n%s", c.line, c.text, err, out)
			continue
		}
		t.Logf("README.md:%d ran in %v", c.line, time.Since(began).Round(time.Millisecond))
		fields := strings.Fields(c.text)
		if len(fields) > 1 && strings.HasSuffix(fields[0], "lupool") {
			ran[strings.Join(subcommandWords(fields[1:]), " ")] = true
		}
	}
	// The README shows every day-to-day command, and this test ran them.
	for _, want := range []string{"status", "lu create", "lu list", "lu show", "lu resize", "lu verify", "lu delete",
		"pool status", "node list", "cluster join-token", "cluster join-token list", "version", "lu"} {
		if !ran[want] {
			t.Errorf("no README example of lupool %s ran (ran: %v)", want, ran)
		}
	}
	// And they did what they say: swap0 was resized, scratch deleted.
	var lus []luJSON
	out := d.cliIn(work, "lu", "list", "-o", "json")
	if err := json.Unmarshal([]byte(out), &lus); err != nil || len(lus) != 1 || lus[0].Name != "swap0" || lus[0].SizeBytes != 16<<30 {
		t.Errorf("after the README's examples: %v %s; want only swap0 at 16 GiB", err, out)
	}
}

// subcommandWords are the leading words of a lupool command line that name
// its (sub)command: up to the first flag or argument that is not a command.
func subcommandWords(args []string) []string {
	root := newRootCommand(nil, nil)
	var words []string
	c := root
	for i := 0; i < len(args); i++ {
		a := args[i]
		if strings.HasPrefix(a, "-") {
			if !strings.Contains(a, "=") && (a == "--api" || a == "-o" || a == "--token-file" || a == "--ca-file") {
				i++ // the global flag's value
			}
			continue
		}
		next, _, err := c.Find([]string{a})
		if err != nil || next == c {
			break
		}
		words, c = append(words, a), next
	}
	return words
}

// cliIn runs the CLI in dir with only PATH and HOME in the environment (as
// a user in that directory would) and returns stdout; it must succeed.
func (d *daemon) cliIn(dir string, args ...string) string {
	d.t.Helper()
	cmd := exec.Command(lupoolBin, args...)
	cmd.Dir = dir
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + dir}
	out, err := cmd.Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		d.t.Fatalf("lupool %s: %v\n%s%s", strings.Join(args, " "), err, out, stderr)
	}
	return string(out)
}

// TestCLIGlobalFlagsEitherPosition: --api, --token-file and -o work before
// and after the subcommand (no LUPOOL_* in the environment), with the same
// answer.
func TestCLIGlobalFlagsEitherPosition(t *testing.T) {
	alongside(t)
	d := newDaemon(t, "g1")
	d.start()
	d.mustCLI("lu", "create", "gf", "--size", "1M")
	dir := t.TempDir()
	global := []string{"--api", d.api, "--token-file", d.tokenFile(), "-o", "json"}
	for _, sub := range [][]string{{"lu", "list"}, {"lu", "show", "gf"}, {"status"}, {"node", "list"}} {
		before := d.cliIn(dir, append(append([]string(nil), global...), sub...)...)
		after := d.cliIn(dir, append(append([]string(nil), sub...), global...)...)
		mixed := d.cliIn(dir, append(append([]string{sub[0], "--api=" + d.api}, sub[1:]...), "--token-file="+d.tokenFile(), "--output=json")...)
		if !json.Valid([]byte(before)) || !strings.Contains(before, `"`) {
			t.Errorf("lupool %v before: not JSON: %q", sub, before)
		}
		if sub[0] != "status" && (before != after || before != mixed) {
			t.Errorf("lupool %v: flags before, after and mixed answer differently:\n%s\n%s\n%s", sub, before, after, mixed)
		}
	}
	// Shell completion of an LU name asks the API.
	out := d.cliIn(dir, "__complete", "--api", d.api, "--token-file", d.tokenFile(), "lu", "show", "")
	if !strings.Contains(out, "gf\t1.0M file") {
		t.Errorf("completing lu show NAME: %q, want gf with its size and kind", out)
	}
}

// TestStatusOneScreen: `lupool status` on a 3-node pool names the primary,
// every node up with its pool, and the LUs healthy; with a copy's node
// killed, it still answers, reports that node unreachable and the 2-copy
// LU degraded once the writer recorded the copy out of sync.
func TestStatusOneScreen(t *testing.T) {
	alongside(t)
	n1 := newDaemon(t, "s1")
	n1.start()
	n2 := newJoiner(t, "s2", n1)
	n2.start()
	n3 := newJoiner(t, "s3", n1)
	n3.start()
	n1.mustCLI("lu", "create", "solo", "--size", "1M")
	n1.mustCLI("lu", "create", "pair", "--size", "4M", "--copies", "2")

	st := statusOf(t, n2)
	if st.Primary != "s1" || st.Node != "s2" || len(st.Nodes) != 3 {
		t.Fatalf("status from s2: primary %q node %q nodes %d; want s1, s2, 3", st.Primary, st.Node, len(st.Nodes))
	}
	for _, n := range st.Nodes {
		if n.State != api.NodeUp || n.Pool == nil || n.Pool.CapacityBytes <= 0 || n.Pool.Node != n.ID {
			t.Errorf("node %s: state %s pool %+v; want up with its own pool", n.ID, n.State, n.Pool)
		}
	}
	if st.LUs.Total != 2 || st.LUs.Healthy != 2 || st.Pool.NodesCounted != 3 || st.Pool.ProvisionedBytes != 1<<20+2*(4<<20) {
		t.Errorf("status: lus %+v pool %+v; want 2 healthy, 3 nodes counted, 9 MiB provisioned", st.LUs, st.Pool)
	}
	table := n2.mustCLI("status")
	for _, w := range []string{"primary: s1", "s1", "s2", "s3", "leader", "up", "LUs: 2 total, 2 healthy, 0 resyncing, 0 degraded"} {
		if !strings.Contains(table, w) {
			t.Errorf("lupool status lacks %q:\n%s", w, table)
		}
	}

	// The copy node (s2: the fewest copies, ties by id) goes away; a
	// write makes the writer record its copy out of sync.
	var pair luJSON
	if err := json.Unmarshal([]byte(n1.mustCLI("lu", "show", "pair", "-o", "json")), &pair); err != nil || pair.Writer != "s1" {
		t.Fatalf("pair: %v %+v; want writer s1", err, pair)
	}
	n2.stop(syscall.SIGKILL)
	out, err := realclient.Nbdsh(t, n1.uri("pair"), `h.pwrite(b"x" * 4096, 0)`).CombinedOutput()
	if err != nil {
		t.Fatalf("write with the copy node gone: %v %s", err, out)
	}
	st = statusOf(t, n1)
	for _, n := range st.Nodes {
		want := map[string]string{"s1": api.NodeUp, "s2": api.NodeUnreachable, "s3": api.NodeUp}[n.ID]
		if n.State != want || (want == api.NodeUnreachable) != (n.Error != "") {
			t.Errorf("after s2 died: node %s state %s error %q; want %s", n.ID, n.State, n.Error, want)
		}
	}
	if st.LUs.Degraded != 1 || st.LUs.Healthy != 1 || len(st.LUs.NotHealthy) != 1 || st.LUs.NotHealthy[0].Name != "pair" || st.Pool.NodesCounted != 2 {
		t.Errorf("after s2 died: lus %+v pool %+v; want pair degraded, 2 nodes counted", st.LUs, st.Pool)
	}
	table = n1.mustCLI("status")
	for _, w := range []string{"unreachable", "s2 did not answer", "1 degraded", "pair", "s2 out-of-sync"} {
		if !strings.Contains(table, w) {
			t.Errorf("lupool status after s2 died lacks %q:\n%s", w, table)
		}
	}
}

func statusOf(t *testing.T, d *daemon) api.Status {
	t.Helper()
	var st api.Status
	out := d.mustCLI("status", "-o", "json")
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("status -o json: %v %q", err, out)
	}
	return st
}
