package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

type ecShowJSON struct {
	Name string `json:"name"`
	EC   *struct {
		K           int   `json:"k"`
		M           int   `json:"m"`
		UsableBytes int64 `json:"usable_bytes"`
		RawBytes    int64 `json:"raw_bytes"`
		Disks       []struct {
			LU     string `json:"lu"`
			Shards []struct {
				Index int    `json:"index"`
				LU    string `json:"lu"`
				Node  string `json:"node"`
			} `json:"shards"`
		} `json:"disks"`
	} `json:"ec"`
}

type ecVerifyJSON struct {
	Clean bool `json:"clean"`
	Disks []struct {
		Faults []struct {
			Shard   int    `json:"shard"`
			ShardLU string `json:"shard_lu"`
			Node    string `json:"node"`
			Stripe  int64  `json:"stripe"`
		} `json:"faults"`
	} `json:"disks"`
}

// shardFile finds a shard LU's file in a node's data directory.
func shardFile(t *testing.T, d *daemon, lu string) string {
	t.Helper()
	var found string
	_ = filepath.Walk(d.data, func(path string, info os.FileInfo, err error) error {
		if err == nil && !info.IsDir() && filepath.Base(path) == lu+".lu" {
			found = path
		}
		return nil
	})
	if found == "" {
		t.Fatalf("no file of shard %s under %s", lu, d.data)
	}
	return found
}

// TestImageErasureCoded: three nodes, an image imported with --ec 2+1
// reads back equal from every node; with one node killed every read is
// still right (reconstructed) and the degraded-read metric counts it; a
// flipped byte in a shard file is read around and named by image verify,
// and image rebuild repairs it; a fourth node takes the killed node's
// shard (image rebuild --from --to) and verify is clean again. Bad --ec
// input changes nothing.
func TestImageErasureCoded(t *testing.T) {
	alongside(t)
	needTools(t, "nbdcopy", "nbdinfo")
	n1, n2, n3 := cluster3(t)
	nodes := map[string]*daemon{"n1": n1, "n2": n2, "n3": n3}
	src := sparseSource(t, t.TempDir(), 6<<20, 1<<20, 0, 2<<20+4096, 5<<20)

	// Bad input: nothing is created.
	for _, c := range []struct{ args []string }{
		{[]string{"image", "import", "bad", src, "--ec", "3+1"}},
		{[]string{"image", "import", "bad", src, "--ec", "0+1"}},
		{[]string{"image", "import", "bad", src, "--ec", "2+9"}},
		{[]string{"image", "import", "bad", src, "--ec", "two"}},
	} {
		if _, errOut, code := n1.cli(c.args...); code == 0 || !strings.Contains(errOut, "--ec") {
			t.Errorf("%v: exit %d, %q", c.args, code, errOut)
		}
	}
	if out := n1.mustCLI("image", "list", "-o", "json"); strings.Contains(out, `"bad"`) {
		t.Fatalf("a refused import left an image: %s", out)
	}

	n1.mustCLI("image", "import", "base", src, "--ec", "2+1")
	var show ecShowJSON
	if err := json.Unmarshal([]byte(n1.mustCLI("image", "show", "base", "-o", "json")), &show); err != nil || show.EC == nil {
		t.Fatalf("image show: %v %+v", err, show)
	}
	if show.EC.K != 2 || show.EC.M != 1 || len(show.EC.Disks) != 1 || len(show.EC.Disks[0].Shards) != 3 {
		t.Fatalf("layout %+v", show.EC)
	}
	if ratio := float64(show.EC.RawBytes) / float64(show.EC.UsableBytes); ratio < 1.5 || ratio > 1.52 {
		t.Errorf("raw/usable %.3f, want 1.5 and a little for superblocks", ratio)
	}
	shardNode := map[string]bool{}
	for _, s := range show.EC.Disks[0].Shards {
		shardNode[s.Node] = true
	}
	if len(shardNode) != 3 {
		t.Fatalf("shards on %v, want three distinct nodes", shardNode)
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"image", "convert", "base", "--ec", "2+1"}, "erasure-coded already"},
		{[]string{"image", "convert", "nosuch", "--ec", "2+1"}, "no image named"},
		{[]string{"image", "convert", "base"}, "needs --ec"},
		{[]string{"lu", "delete", show.EC.Disks[0].Shards[0].LU}, "the pool's own"},
	} {
		if _, errOut, code := n1.cli(c.args...); code == 0 || !strings.Contains(errOut, c.want) {
			t.Errorf("%v: exit %d, %q, want %q", c.args, code, errOut, c.want)
		}
	}
	if _, _, code := n1.cli("lu", "show", "base/0"); code == 0 {
		t.Error("the mirrored disk LU is still there after the conversion")
	}
	for _, d := range []*daemon{n1, n2, n3} {
		if !sameFiles(t, nbdRead(t, d.uri("base/0")), src) {
			t.Fatalf("base/0 read through %s differs from the source", d.id)
		}
	}
	if out := n1.mustCLI("image", "verify", "base"); !strings.Contains(out, "clean") {
		t.Fatalf("verify of a fresh image: %s", out)
	}

	// A flipped byte in data shard 0's first chunk: reads go around it,
	// verify names the shard, rebuild repairs it.
	s0 := show.EC.Disks[0].Shards[0]
	f, err := os.OpenFile(shardFile(t, nodes[s0.Node], s0.LU), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 1)
	const at = 4096 + 100 // past the 4 KiB superblock: stripe 0's chunk
	if _, err := f.ReadAt(b, at); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0xff
	if _, err := f.WriteAt(b, at); err != nil {
		t.Fatal(err)
	}
	_ = f.Close()
	if !sameFiles(t, nbdRead(t, n2.uri("base/0")), src) {
		t.Fatal("a read with a flipped shard byte differs from the source")
	}
	out, _, code := n1.cli("image", "verify", "base", "-o", "json")
	var rep ecVerifyJSON
	if err := json.Unmarshal([]byte(out), &rep); err != nil || code == 0 || rep.Clean || len(rep.Disks) != 1 || len(rep.Disks[0].Faults) != 1 {
		t.Fatalf("verify with a flipped byte: exit %d, %v, %s", code, err, out)
	}
	if got := rep.Disks[0].Faults[0]; got.ShardLU != s0.LU || got.Node != s0.Node || got.Stripe != 0 {
		t.Fatalf("verify named %+v, want stripe 0 of %s on %s", got, s0.LU, s0.Node)
	}
	if out := n1.mustCLI("image", "rebuild", "base"); !strings.Contains(out, "1 chunk(s) repaired") {
		t.Fatalf("rebuild: %s", out)
	}
	n1.mustCLI("image", "verify", "base")

	// Kill the node of a data shard (not n1, which the CLI asks): reads
	// through the others reconstruct.
	var victim *daemon
	for _, s := range show.EC.Disks[0].Shards[:2] {
		if s.Node != "n1" {
			victim = nodes[s.Node]
		}
	}
	victim.stop(syscall.SIGKILL)
	for _, d := range []*daemon{n1, n2, n3} {
		if d == victim {
			continue
		}
		start := time.Now()
		if !sameFiles(t, nbdRead(t, d.uri("base/0")), src) {
			t.Fatalf("base/0 read through %s with %s down differs from the source", d.id, victim.id)
		}
		t.Logf("degraded read of 6 MiB through %s took %s", d.id, time.Since(start).Round(time.Millisecond))
		if v := metricValue(d.metrics(), "lupool_ec_degraded_reads_total", `lu="base/0"`); v < 1 {
			t.Errorf("%s: lupool_ec_degraded_reads_total = %v after reads with a shard node down", d.id, v)
		}
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		out := n1.mustCLI("events", "watch", "--follow=false", "--tail", "100", "--kind", "ECDegradedRead,ECReady")
		if strings.Contains(out, "ECDegradedRead") && strings.Contains(out, "ECReady") && strings.Contains(out, "base/0") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no ECDegradedRead and ECReady events for base/0:\n%s", out)
		}
		time.Sleep(200 * time.Millisecond)
	}
	// Replace the lost node: a new node joins and takes its shard.
	n4 := newJoiner(t, "n4", n1)
	n4.start()
	out = n1.mustCLI("image", "rebuild", "base", "--from", victim.id, "--to", "n4")
	if !strings.Contains(out, "moved [.ec.base.0.") {
		t.Fatalf("rebuild --from %s --to n4: %s", victim.id, out)
	}
	n1.mustCLI("image", "verify", "base")
	if err := json.Unmarshal([]byte(n1.mustCLI("image", "show", "base", "-o", "json")), &show); err != nil {
		t.Fatal(err)
	}
	for _, s := range show.EC.Disks[0].Shards {
		if s.Node == victim.id {
			t.Fatalf("a shard is still on the lost node: %+v", show.EC.Disks[0].Shards)
		}
	}
	if !sameFiles(t, nbdRead(t, n4.uri("base/0")), src) {
		t.Fatal("base/0 read through the new node differs")
	}
	// The lost node comes back: it serves the image from the others and
	// drops its old shard.
	victim.start()
	waitExported(t, victim, "base/0")
	if !sameFiles(t, nbdRead(t, victim.uri("base/0")), src) {
		t.Fatalf("base/0 read through %s after its restart differs", victim.id)
	}
	nodes["n4"] = n4
	n1.mustCLI("image", "delete", "base")
	for _, d := range []*daemon{n1, n2, n3, n4} {
		deadline := time.Now().Add(10 * time.Second)
		for {
			var left []string
			_ = filepath.Walk(d.data, func(path string, _ os.FileInfo, err error) error {
				if err == nil && strings.Contains(filepath.Base(path), ".ec.base.") {
					left = append(left, path)
				}
				return nil
			})
			if len(left) == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("node %s kept the deleted image's shards: %v", d.id, left)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
}
