package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// uiSnapshot is what the status page shows after one render (it logs one
// "lupool-ui {...}" line per render on the console).
type uiSnapshot struct {
	Render  int                          `json:"render"`
	Primary string                       `json:"primary"`
	Nodes   []string                     `json:"nodes"`
	LUs     map[string]map[string]string `json:"lus"`
	Seq     uint64                       `json:"seq"`
}

// browser is a headless Chromium showing the status page.
type browser struct {
	cmd  *exec.Cmd
	mu   sync.Mutex
	seen []uiSnapshot // guarded by mu
	done chan struct{}
}

func chromiumArgs(t *testing.T, extra ...string) []string {
	return append([]string{"--headless", "--no-sandbox", "--disable-gpu", "--user-data-dir=" + t.TempDir()}, extra...)
}

func startBrowser(t *testing.T, url string) *browser {
	t.Helper()
	b := &browser{done: make(chan struct{})}
	b.cmd = exec.Command("chromium", chromiumArgs(t, "--enable-logging=stderr", "--v=0", url)...)
	stderr, err := b.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := b.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(b.done)
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			i := strings.Index(line, `"lupool-ui {`)
			j := strings.LastIndex(line, `}", source:`)
			if i < 0 || j < i {
				continue
			}
			var s uiSnapshot
			if json.Unmarshal([]byte(line[i+len(`"lupool-ui `):j+1]), &s) == nil {
				b.mu.Lock()
				b.seen = append(b.seen, s)
				b.mu.Unlock()
			}
		}
	}()
	t.Cleanup(b.stop)
	return b
}

func (b *browser) stop() {
	if b.cmd.ProcessState == nil {
		_ = b.cmd.Process.Kill()
		<-b.done
		_ = b.cmd.Wait()
	}
}

// waitFor waits until a render matches, and returns it.
func (b *browser) waitFor(t *testing.T, what string, within time.Duration, match func(uiSnapshot) bool) uiSnapshot {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		b.mu.Lock()
		for _, s := range b.seen {
			if match(s) {
				b.mu.Unlock()
				return s
			}
		}
		n := len(b.seen)
		var last uiSnapshot
		if n > 0 {
			last = b.seen[n-1]
		}
		b.mu.Unlock()
		if time.Now().After(deadline) {
			t.Fatalf("the status page never showed %s within %v (%d renders; last %+v)", what, within, n, last)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func hasNode(s uiSnapshot, node, state string) bool {
	for _, n := range s.Nodes {
		if n == node+":"+state {
			return true
		}
	}
	return false
}

// artifactDir is where tests leave files for people to look at:
// $LUPOOL_TEST_ARTIFACTS, else TMPDIR/lupool-test-artifacts.
func artifactDir(t *testing.T) string {
	t.Helper()
	dir := os.Getenv("LUPOOL_TEST_ARTIFACTS")
	if dir == "" {
		dir = filepath.Join(os.TempDir(), "lupool-test-artifacts")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// TestStatusPageChromium: the status page in headless Chromium loads with
// the admin token, shows the nodes and LUs of a running three-node pool,
// updates by itself when an LU is created and when a copy goes out of
// sync (its node killed while the LU is written; three nodes keep a quorum), and its final state is
// in the DOM and a screenshot (saved as a test artefact).
func TestStatusPageChromium(t *testing.T) {
	needTools(t, "chromium", "fio")
	n1, n2, n3 := cluster3(t)
	n1.mustCLI("lu", "create", "pre", "--size", "16M", "--copies", "2")
	copyNode := ""
	for _, r := range n1.showLU("pre").Replicas {
		if r.Node != "n1" {
			copyNode = r.Node
		}
	}
	victim := map[string]*daemon{"n2": n2, "n3": n3}[copyNode]
	if victim == nil {
		t.Fatalf("copy of pre on %q", copyNode)
	}
	url := "http://" + n1.api + "/ui/#token=" + n1.token()

	b := startBrowser(t, url)
	b.waitFor(t, "the nodes and LU pre in sync", 60*time.Second, func(s uiSnapshot) bool {
		return s.Primary == "n1" && hasNode(s, "n1", "up") && hasNode(s, "n2", "up") && hasNode(s, "n3", "up") &&
			s.LUs["pre"]["n1"] == "in-sync" && s.LUs["pre"][copyNode] == "in-sync"
	})
	n1.mustCLI("lu", "create", "live", "--size", "8M")
	b.waitFor(t, "the new LU", 20*time.Second, func(s uiSnapshot) bool { return s.LUs["live"] != nil })
	victim.stop(syscall.SIGKILL)
	fio(t, "--name=w", "--uri="+n1.uri("pre"), "--rw=write", "--bs=64k", "--size=1M")
	b.waitFor(t, "the copy out of sync and its node unreachable", 30*time.Second, func(s uiSnapshot) bool {
		return s.LUs["pre"][copyNode] == "out-of-sync" && hasNode(s, copyNode, "unreachable")
	})
	b.stop()

	// The final state, as a DOM and a screenshot.
	out, err := exec.Command("chromium", chromiumArgs(t, "--virtual-time-budget=3000", "--dump-dom", url)...).Output()
	if err != nil {
		t.Fatalf("chromium --dump-dom: %v", err)
	}
	dom := string(out)
	for _, want := range []string{`data-node="n1"`, `data-node="n2"`, `data-node="n3"`, `data-lu="pre"`, `data-lu="live"`,
		`data-copy="` + copyNode + `" data-state="out-of-sync"`, `data-kind="LUCreated"`, `data-kind="CopyStateChanged"`, "primary: n1"} {
		if !strings.Contains(dom, want) {
			t.Errorf("the page's DOM lacks %s", want)
		}
	}
	shot := filepath.Join(artifactDir(t), "status-page.png")
	cmd := exec.Command("chromium", chromiumArgs(t, "--virtual-time-budget=3000", "--window-size=1280,1000", "--screenshot="+shot, url)...)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("chromium --screenshot: %v\n%s", err, out)
	}
	png, err := os.ReadFile(shot)
	if err != nil || !bytes.HasPrefix(png, []byte("\x89PNG")) || len(png) < 10000 {
		t.Fatalf("screenshot %s: %d bytes, %v", shot, len(png), err)
	}
	t.Logf("screenshot of the status page: %s (%d bytes)", shot, len(png))
}
