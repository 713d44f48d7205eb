package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lupool/lupool/internal/realclient"
)

type ffdcJSON struct {
	ID            string   `json:"id"`
	CorrelationID string   `json:"correlation_id"`
	Node          string   `json:"node"`
	Nodes         []string `json:"nodes"`
	Trigger       string   `json:"trigger"`
	Bytes         int64    `json:"bytes"`
	Complete      bool     `json:"complete"`
}

func (d *daemon) ffdcList() []ffdcJSON {
	d.t.Helper()
	var list []ffdcJSON
	if err := json.Unmarshal([]byte(d.mustCLI("ffdc", "list", "-o", "json")), &list); err != nil {
		d.t.Fatal(err)
	}
	return list
}

// TestFFDCCollectAllNodes: `lupool ffdc collect --all-nodes` on a
// three-node pool makes one bundle, listed by every node, that unpacks
// into a manifest and every node's parts; an FFDCCaptured event names it.
func TestFFDCCollectAllNodes(t *testing.T) {
	alongside(t)
	n1, n2, n3 := cluster3(t)
	var info ffdcJSON
	// Asked of a follower: forwarded to the primary, which gathers.
	if err := json.Unmarshal([]byte(n2.mustCLI("ffdc", "collect", "--all-nodes", "--reason", "e2e", "-o", "json")), &info); err != nil {
		t.Fatal(err)
	}
	if info.ID == "" || info.CorrelationID == "" || !info.Complete || strings.Join(info.Nodes, ",") != "n1,n2,n3" {
		t.Fatalf("ffdc collect --all-nodes: %+v; want a complete bundle of n1,n2,n3", info)
	}
	for _, d := range []*daemon{n1, n2, n3} {
		deadline := time.Now().Add(20 * time.Second)
		for {
			found := 0
			for _, b := range d.ffdcList() {
				if b.ID == info.ID && b.Complete && b.Bytes == info.Bytes {
					found++
				}
			}
			if found == 1 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s lists bundle %s %d times: %+v", d.id, info.ID, found, d.ffdcList())
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	file := filepath.Join(t.TempDir(), "b.tar.gz")
	n3.mustCLI("ffdc", "get", info.ID, "-o", file)
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	files, err := untarGz(data, 64<<20)
	if err != nil {
		t.Fatalf("the bundle does not unpack: %v", err)
	}
	var manifest struct {
		CorrelationID string   `json:"correlation_id"`
		Nodes         []string `json:"nodes"`
		Reason        string   `json:"reason"`
	}
	if err := json.Unmarshal(files["manifest.json"], &manifest); err != nil || manifest.CorrelationID != info.CorrelationID || manifest.Reason != "e2e" {
		t.Fatalf("manifest %q: %v", files["manifest.json"], err)
	}
	for _, node := range []string{"n1", "n2", "n3"} {
		for _, part := range []string{"logs.txt", "goroutines.txt", "metrics.txt", "metadata.json", "raft.json", "config.json", "version.txt"} {
			if len(files[node+"/"+part]) == 0 {
				t.Errorf("bundle lacks %s/%s", node, part)
			}
		}
		if !strings.Contains(string(files[node+"/goroutines.txt"]), "goroutine ") || !strings.Contains(string(files[node+"/metrics.txt"]), "lupool_raft_term") {
			t.Errorf("%s's goroutine dump or metrics look wrong", node)
		}
		if !strings.Contains(string(files[node+"/logs.txt"]), "lupool serving") {
			t.Errorf("%s's logs lack its start line", node)
		}
	}
	out := n3.mustCLI("events", "watch", "-o", "json", "--kind", "FFDCCaptured", "--after", "0", "--follow=false")
	if !strings.Contains(out, info.ID) || !strings.Contains(out, info.CorrelationID) {
		t.Fatalf("no FFDCCaptured event for %s: %s", info.ID, out)
	}
}

// TestFFDCOnVolumeIOError: writes past a full 16 MiB tmpfs fail with an
// I/O error of the volume; that triggers one bundle (trigger io-error)
// and its event, and the rate limit keeps the many errors that follow
// from making more.
func TestFFDCOnVolumeIOError(t *testing.T) {
	needTools(t, "fio")
	dir := realclient.MountTmpfs(t, "16m")
	d := newDaemon(t, "n1", "--pool-dirs", dir, "--ffdc-min-interval", "1h")
	d.start()
	d.mustCLI("lu", "create", "full", "--size", "48M")
	if out, err := startFio(t, "--name=fill", "--uri="+d.uri("full"), "--rw=write", "--bs=1M", "--size=40M", "--continue_on_error=all")(); err == nil {
		t.Logf("fio did not report the errors (continue_on_error):\n%s", out)
	}
	// Again: more errors, within the rate limit's interval.
	_, _ = startFio(t, "--name=again", "--uri="+d.uri("full"), "--rw=write", "--bs=1M", "--offset=20M", "--size=8M", "--continue_on_error=all")()
	deadline := time.Now().Add(30 * time.Second)
	var io []ffdcJSON
	for {
		io = io[:0]
		for _, b := range d.ffdcList() {
			if b.Trigger == "io-error" && b.Complete {
				io = append(io, b)
			}
		}
		if len(io) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no io-error bundle within 30 s:\n%s", d.logs())
		}
		time.Sleep(200 * time.Millisecond)
	}
	time.Sleep(time.Second) // a second bundle would be on its way by now
	count := 0
	for _, b := range d.ffdcList() {
		if b.Trigger == "io-error" {
			count++
		}
	}
	if count != 1 {
		t.Fatalf("%d io-error bundles, want 1 (rate limited)", count)
	}
	if !strings.Contains(d.logs(), "failure data capture skipped (rate limit)") {
		t.Fatal("no write error after the first was rate limited (the log says nothing)")
	}
	out := d.mustCLI("events", "watch", "-o", "json", "--kind", "FFDCCaptured", "--after", "0", "--follow=false")
	if !strings.Contains(out, io[0].ID) || !strings.Contains(out, `"trigger":"io-error"`) {
		t.Fatalf("no FFDCCaptured event for %s: %s", io[0].ID, out)
	}
}
