package main

import (
	"encoding/json"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

type scrubJSON struct {
	Name    string   `json:"name"`
	Regions int64    `json:"regions"`
	Copies  []string `json:"copies"`
	Repairs []struct {
		Copy        string `json:"copy"`
		OffsetBytes int64  `json:"offset_bytes"`
		LengthBytes int64  `json:"length_bytes"`
	} `json:"repairs"`
	Skipped map[string]string `json:"skipped"`
}

// findVolume returns the volume file of LU name under d's data directory.
func findVolume(t *testing.T, d *daemon, name string) string {
	t.Helper()
	var found []string
	err := filepath.WalkDir(d.data, func(path string, e fs.DirEntry, err error) error {
		if err == nil && !e.IsDir() && e.Name() == name+".lu" {
			found = append(found, path)
		}
		return err
	})
	if err != nil || len(found) != 1 {
		t.Fatalf("volume of %s under %s: %v %v", name, d.data, found, err)
	}
	return found[0]
}

// TestScrubRepairsFlippedBytes: bytes flipped in a copy's volume file
// behind lupool's back (node stopped, file changed, node started) stay
// unnoticed by replication, and lu verify reports them; lu scrub, asked
// through the copy's own node, finds that one region, repairs it from the
// writer and counts it; lu verify is equal afterwards.
func TestScrubRepairsFlippedBytes(t *testing.T) {
	needTools(t, "fio")
	writer := newDaemon(t, "n1")
	writer.start()
	cp := newJoiner(t, "n2", writer)
	cp.start()
	writer.mustCLI("lu", "create", "s", "--size", "16M", "--copies", "2")
	if lu := writer.showLU("s"); lu.Writer != "n1" || lu.state("n2") != "in-sync" {
		t.Fatalf("LU s: %+v; want writer n1 and an in-sync copy on n2", lu)
	}
	fio(t, "--name=fill", "--uri="+writer.uri("s"), "--rw=write", "--bs=1M", "--size=8M")
	// No scrub yet: lu show on the writer says so.
	if out := writer.mustCLI("lu", "show", "s"); !strings.Contains(out, "last scrub: never") {
		t.Fatalf("lu show before any scrub:\n%s", out)
	}

	cp.stop(syscall.SIGTERM)
	vol := findVolume(t, cp, "s")
	f, err := os.OpenFile(vol, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	const at = 3<<20 + 4321
	b := make([]byte, 4)
	if _, err := f.ReadAt(b, at); err != nil {
		t.Fatal(err)
	}
	for i := range b {
		b[i] ^= 0xff
	}
	if _, err := f.WriteAt(b, at); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	cp.start()
	writer.waitState("s", "n2", "in-sync", 30*time.Second)
	if v, code := writer.verify("s"); code != 1 || len(v.Mismatches) != 1 || v.Mismatches[0].OffsetBytes != 3<<20 {
		t.Fatalf("verify before the scrub: exit %d %+v; want the one flipped region at %d", code, v, 3<<20)
	}

	w := writer.startWatch("--kind", "ScrubRepaired", "--tail", "0")
	var report scrubJSON
	if err := json.Unmarshal([]byte(cp.mustCLI("lu", "scrub", "s", "-o", "json")), &report); err != nil {
		t.Fatal(err)
	}
	if report.Regions != 16 || len(report.Copies) != 1 || report.Copies[0] != "n2" || len(report.Skipped) != 0 ||
		len(report.Repairs) != 1 || report.Repairs[0].Copy != "n2" || report.Repairs[0].OffsetBytes != 3<<20 {
		t.Fatalf("scrub report %+v; want one repair of n2 at %d", report, 3<<20)
	}
	if v, code := writer.verify("s"); code != 0 || !v.Equal {
		t.Fatalf("verify after the scrub: exit %d %+v", code, v)
	}
	if a, c := volumeSHA(t, writer, "s"), fileSHA(t, vol); a != c {
		t.Fatalf("copies differ after the scrub: %s %s", a, c)
	}
	m := writer.metrics()
	if v := metricValue(m, "lupool_replication_scrub_repaired_regions_total", `lu="s"`, `copy="n2"`); v != 1 {
		t.Errorf("repair metric = %v, want 1", v)
	}
	if v := metricValue(m, "lupool_replication_scrub_last_finished_timestamp_seconds", `lu="s"`); v < float64(time.Now().Add(-time.Minute).Unix()) {
		t.Errorf("last scrub metric = %v", v)
	}
	if !strings.Contains(writer.logs(), "scrub repaired a region of a copy that differed from the writer") {
		t.Error("no log line for the repair")
	}
	w.waitFor(t, "ScrubRepaired", 10*time.Second, func(ev eventJSON) bool {
		return ev.Kind == "ScrubRepaired" && ev.LU == "s" && ev.Node == "n1" && ev.Details["copy"] == "n2" &&
			ev.Details["offset_bytes"] == strconv.Itoa(3<<20)
	})
	out := writer.mustCLI("lu", "show", "s")
	if !strings.Contains(out, "(1 regions repaired)") || !strings.Contains(out, "SCRUB REPAIRS") {
		t.Errorf("lu show after the scrub:\n%s", out)
	}
	// A second scrub finds nothing.
	if err := json.Unmarshal([]byte(writer.mustCLI("lu", "scrub", "s", "-o", "json")), &report); err != nil || len(report.Repairs) != 0 {
		t.Fatalf("second scrub: %+v %v", report, err)
	}
}
