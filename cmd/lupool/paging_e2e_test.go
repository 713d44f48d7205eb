package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// pagingJSON is `lupool paging request/show -o json`.
type pagingJSON struct {
	VM             string `json:"vm"`
	LU             string `json:"lu"`
	SizeBytes      int64  `json:"size_bytes"`
	AllocatedBytes int64  `json:"allocated_bytes"`
	Kind           string `json:"kind"`
	Copies         int    `json:"copies"`
	Host           string `json:"host"`
	Replicas       []struct {
		Node  string `json:"node"`
		State string `json:"state"`
	} `json:"replicas"`
	Clients int      `json:"clients"`
	Existed bool     `json:"existed"`
	Notes   []string `json:"notes"`
	Attach  struct {
		URI          string `json:"uri"`
		LupoolAttach string `json:"lupool_attach"`
		Socket       string `json:"socket"`
		NBDClient    string `json:"nbd_client"`
		QEMUDrive    string `json:"qemu_drive"`
	} `json:"attach"`
}

func (d *daemon) paging(args ...string) pagingJSON {
	d.t.Helper()
	var p pagingJSON
	out := d.mustCLI(append(append([]string{"paging"}, args...), "-o", "json")...)
	if err := json.Unmarshal([]byte(out), &p); err != nil {
		d.t.Fatalf("paging %v: %v\n%s", args, err, out)
	}
	return p
}

// mustFail runs a client command that must fail with a message holding
// want.
func (d *daemon) mustFail(want string, args ...string) {
	d.t.Helper()
	out, errOut, code := d.cli(args...)
	if code == 0 || !strings.Contains(errOut, want) {
		d.t.Fatalf("lupool %s: exit %d, stderr %q, stdout %q; want a failure saying %q", strings.Join(args, " "), code, errOut, out, want)
	}
}

type poolJSON struct {
	MemoryProvisionedBytes int64 `json:"memory_provisioned_bytes"`
	MemoryBudgetBytes      int64 `json:"memory_budget_bytes"`
	MemoryReservedBytes    int64 `json:"memory_reserved_bytes"`
	MemoryFreeBytes        int64 `json:"memory_free_bytes"`
	MemoryAllocatedBytes   int64 `json:"memory_allocated_bytes"`
}

func (d *daemon) pool() poolJSON {
	d.t.Helper()
	var p poolJSON
	if err := json.Unmarshal([]byte(d.mustCLI("pool", "status", "-o", "json")), &p); err != nil {
		d.t.Fatal(err)
	}
	return p
}

// TestPagingCLI: paging space end to end through the real binary on one
// node, then two: defaults and notes, idempotent requests, bad input that
// changes nothing, the memory budget (refused past it, freed by release),
// release refused while a client is attached.
func TestPagingCLI(t *testing.T) {
	n1 := newDaemon(t, "n1", "--memory-budget", "512M")
	n1.start()

	// One node: copies 2 has no second node; the default says it is one.
	n1.mustFail("no node for copy 2", "paging", "request", "vm0", "--size", "16M", "--copies", "2")
	n1.mustFail("--size must be larger than zero", "paging", "request", "vm0", "--size", "0")
	resp := n1.request("POST", "/v1/paging", `{"vm":"vm0","size_bytes":0}`)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(body), "size 0 bytes") {
		t.Fatalf("API request with size 0: %d %s", resp.StatusCode, body)
	}
	n1.mustFail(`VM "ghost" has no paging space`, "paging", "show", "ghost")
	n1.mustFail(`VM "ghost" has no paging space`, "paging", "release", "ghost")
	n1.mustFail("VM id", "paging", "request", "bad/id", "--size", "16M")
	if lus := n1.listLUs(); len(lus) != 0 {
		t.Fatalf("refused requests left LUs: %+v", lus)
	}
	one := n1.paging("request", "vm0", "--size", "16M")
	if one.Copies != 1 || len(one.Notes) == 0 || !strings.Contains(one.Notes[0], "one copy only") {
		t.Fatalf("default copies on one node: %+v", one)
	}
	n1.mustCLI("paging", "release", "vm0")

	n2 := newJoiner(t, "n2", n1, "--memory-budget", "64M")
	n2.start()
	waitNodes(t, n1, 2)

	// Two nodes: two copies by default, the writer on the node asked, the
	// attach lines for it; a second request is the same space.
	p := n1.paging("request", "vm1", "--size", "32M")
	if p.LU != "paging-vm1" || p.Copies != 2 || p.Host != "n1" || p.Kind != "memory" || p.SizeBytes != 32<<20 ||
		len(p.Replicas) != 2 || p.Replicas[1].Node != "n2" || p.Existed {
		t.Fatalf("request: %+v", p)
	}
	if p.Attach.URI != "nbd://"+n1.nbd+"/paging-vm1" || !strings.Contains(p.Attach.LupoolAttach, "attach paging-vm1 --listen unix:/run/lupool/paging-vm1.sock") ||
		!strings.Contains(p.Attach.NBDClient, "-N paging-vm1 -b 4096") || !strings.HasPrefix(p.Attach.QEMUDrive, "file=nbd:unix:/run/lupool/paging-vm1.sock:exportname=paging-vm1,") {
		t.Fatalf("attach lines: %+v", p.Attach)
	}
	again := n2.paging("request", "vm1", "--size", "32M")
	if !again.Existed || again.LU != p.LU || again.Host != "n1" || len(n1.listLUs()) != 1 {
		t.Fatalf("second request: %+v, LUs %+v", again, n1.listLUs())
	}
	n1.mustFail("release it first", "paging", "request", "vm1", "--size", "64M")

	// n2's budget is 64M and holds vm1's copy (32M): 40M more is refused
	// naming n2, and leaves nothing behind.
	if st := n2.pool(); st.MemoryBudgetBytes != 64<<20 || st.MemoryFreeBytes != 32<<20 {
		t.Fatalf("n2 pool with vm1's copy: %+v", st)
	}
	n1.mustFail("memory budget of node n2", "paging", "request", "vm2", "--size", "40M")
	if lus := n1.listLUs(); len(lus) != 1 {
		t.Fatalf("a request past the budget left LUs: %+v", lus)
	}
	if st := n1.pool(); st.MemoryProvisionedBytes != 32<<20 || st.MemoryReservedBytes != 0 {
		t.Fatalf("n1 pool after a refused request: %+v", st)
	}
	// The writer's own budget too: n1 has 480M left.
	n2.mustFail("memory budget of node n1", "paging", "request", "vm3", "--size", "500M", "--host", "n1", "--copies", "1")
	// Release frees it.
	n1.mustCLI("paging", "release", "vm1")
	waitFor(t, "n2's budget freed", func() bool { return n2.pool().MemoryFreeBytes == 64<<20 })
	// Asked of n2 (a follower: forwarded to the leader), the writer goes
	// on n2.
	p2 := n2.paging("request", "vm2", "--size", "40M")
	if p2.Host != "n2" || p2.Copies != 2 || p2.Existed {
		t.Fatalf("request through n2: %+v", p2)
	}
	// Migrate moves the writer to the VM's next host (the planned writer
	// move, asked of n2, run by the leader), and back; bad input changes
	// nothing.
	n2.mustFail("needs --to NODE", "paging", "migrate", "vm2")
	n2.mustFail(`VM "ghost" has no paging space`, "paging", "migrate", "ghost", "--to", "n1")
	n2.mustFail("n9", "paging", "migrate", "vm2", "--to", "n9")
	if got := n1.paging("show", "vm2"); got.Host != "n2" {
		t.Fatalf("a refused migrate moved the writer: %+v", got)
	}
	moved := n2.paging("migrate", "vm2", "--to", "n1")
	if moved.Host != "n1" || moved.Copies != 2 || len(moved.Replicas) != 2 {
		t.Fatalf("migrate to n1: %+v", moved)
	}
	for _, r := range moved.Replicas {
		if r.State != "in-sync" {
			t.Fatalf("a copy is %s after a planned move: %+v", r.State, moved)
		}
	}
	if back := n1.paging("migrate", "vm2", "--to", "n2"); back.Host != "n2" {
		t.Fatalf("migrate back to n2: %+v", back)
	}
	if same := n1.paging("migrate", "vm2", "--to", "n2"); same.Host != "n2" {
		t.Fatalf("migrate to the host it is on: %+v", same)
	}

	// Release is refused while a client is attached, and says where.
	a := startAttach(t, n1, "paging-vm2", "unix:"+filepath.Join(t.TempDir(), "vm2.sock"))
	waitFor(t, "the endpoint counted as a client", func() bool { return n1.paging("show", "vm2").Clients > 0 })
	n1.mustFail("client(s) attached", "paging", "release", "vm2")
	if n := len(n1.listLUs()); n != 1 {
		t.Fatalf("refused release changed the LUs: %d", n)
	}
	list := n1.mustCLI("paging", "list")
	if !strings.Contains(list, "paging-vm2") || !strings.Contains(list, "n2:in-sync") {
		t.Fatalf("paging list:\n%s", list)
	}
	n1.mustCLI("paging", "release", "vm2", "--force")
	_ = a
	if out := n1.mustCLI("paging", "list", "-o", "json"); strings.TrimSpace(out) != "[]" {
		t.Fatalf("paging list after release: %s", out)
	}
	// Each paging space made and freed is an event (vm0, vm1, vm2); the
	// second request of vm1 made nothing.
	var events string
	waitFor(t, "the paging events", func() bool {
		events = n1.mustCLI("events", "watch", "--kind", "PagingRequested,PagingReleased", "--follow=false", "--tail", "100", "-o", "json")
		return strings.Count(events, `"PagingReleased"`) == 3
	})
	if strings.Count(events, `"PagingRequested"`) != 3 || !strings.Contains(events, `"vm":"vm2"`) {
		t.Fatalf("paging events:\n%s", events)
	}
	// n1 answered every request but vm1's second (n2's) and vm3 (refused
	// on n2 before it reached n1).
	m1, m2 := n1.metrics(), n2.metrics()
	for _, c := range []struct {
		text, name, result string
		want               float64
	}{
		{m1, "lupool_paging_requests_total", `result="created"`, 3},
		{m1, "lupool_paging_requests_total", `result="invalid"`, 3},
		{m2, "lupool_paging_requests_total", `result="existed"`, 1},
		{m1, "lupool_paging_releases_total", `result="released"`, 3},
		{m1, "lupool_paging_releases_total", `result="busy"`, 1},
	} {
		if got := metricValue(c.text, c.name, c.result); got != c.want {
			t.Errorf("%s{%s} = %v, want %v", c.name, c.result, got, c.want)
		}
	}
}

// waitNodes waits until d lists n members.
func waitNodes(t *testing.T, d *daemon, n int) {
	t.Helper()
	waitFor(t, fmt.Sprintf("%d nodes", n), func() bool {
		var nodes []struct {
			ID      string `json:"id"`
			NBDAddr string `json:"nbd_addr"`
		}
		if err := json.Unmarshal([]byte(d.mustCLI("node", "list", "-o", "json")), &nodes); err != nil {
			t.Fatal(err)
		}
		k := 0
		for _, node := range nodes {
			if node.NBDAddr != "" {
				k++
			}
		}
		return k == n
	})
}

func waitFor(t *testing.T, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("waited 30s for %s", what)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// taskFlags returns the kernel's PF_* flags of every thread of pid
// (/proc/PID/task/*/stat, field 9).
func taskFlags(t *testing.T, pid int) []uint64 {
	t.Helper()
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		t.Fatal(err)
	}
	var out []uint64
	for _, task := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/stat", pid, task.Name()))
		if err != nil {
			continue // the thread ended
		}
		// The command name (field 2) is in parentheses and may hold spaces.
		rest := string(b[strings.LastIndexByte(string(b), ')')+2:])
		fields := strings.Fields(rest)
		flags, err := strconv.ParseUint(fields[6], 10, 64)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, flags)
	}
	return out
}

// pfMemallocNoIO is the thread flag PR_SET_IO_FLUSHER sets.
const pfMemallocNoIO = 0x00080000

// checkSwapSafe checks the real process pid: its memory is locked (VmLck
// in /proc/PID/status at least half of VmRSS) and it is an I/O flusher, or
// its log warns that it could not be.
func checkSwapSafe(t *testing.T, who string, pid int, log func() string) {
	t.Helper()
	var lck, rss int64
	// The process locks its memory, then logs it.
	waitFor(t, who+" locking its memory and saying so", func() bool {
		lck, rss = procStatusBytes(t, pid, "VmLck"), procStatusBytes(t, pid, "VmRSS")
		l := log()
		return lck > 0 && strings.Contains(l, "swap safety") &&
			(strings.Contains(l, "io_flusher=true") || strings.Contains(l, "not an I/O flusher"))
	})
	if lck < rss/2 {
		t.Errorf("%s: VmLck %d KiB of VmRSS %d KiB", who, lck>>10, rss>>10)
	}
	if !strings.Contains(log(), "memory_locked=true") {
		t.Errorf("%s: the log does not say the memory is locked:\n%s", who, log())
	}
	if strings.Contains(log(), "io_flusher=true") {
		// Every thread when the runtime could reach them all
		// (io_flusher_threads=all), else at least the calling one.
		flagged, flags := 0, taskFlags(t, pid)
		for _, f := range flags {
			if f&pfMemallocNoIO != 0 {
				flagged++
			}
		}
		if flagged == 0 || (strings.Contains(log(), "io_flusher_threads=all") && flagged != len(flags)) {
			t.Errorf("%s logs io_flusher=true but %d of %d threads have PF_MEMALLOC_NOIO", who, flagged, len(flags))
		}
	} else if !strings.Contains(log(), "not an I/O flusher") {
		t.Errorf("%s: neither an I/O flusher nor a warning saying why not:\n%s", who, log())
	}
	t.Logf("%s: VmLck %d MiB, VmRSS %d MiB", who, lck>>20, rss>>20)
}

// TestSwapSafeProcesses: lupool serve (--swap-safe auto) locks its memory
// once it holds paging space, and lupool attach at start; both read from
// /proc of the real processes. Without -race only (make test runs it so):
// a race build cannot lock its shadow memory and says so.
func TestSwapSafeProcesses(t *testing.T) {
	if raceEnabled {
		t.Skip("a race-detector build does not lock its memory (make test runs this test without -race)")
	}
	d := newDaemon(t, "s1")
	d.start()
	pid := d.cmd.Process.Pid
	d.mustCLI("lu", "create", "plain", "--size", "16M")
	time.Sleep(2500 * time.Millisecond) // past one check of --swap-safe auto
	if lck := procStatusBytes(t, pid, "VmLck"); lck != 0 {
		t.Fatalf("serve locked %d bytes before holding paging space", lck)
	}
	d.mustCLI("paging", "request", "vm1", "--size", "16M")
	checkSwapSafe(t, "lupool serve", pid, d.logs)

	a := startAttach(t, d, "paging-vm1", "unix:"+filepath.Join(t.TempDir(), "a.sock"))
	checkSwapSafe(t, "lupool attach", a.cmd.Process.Pid, a.log.String)
}
