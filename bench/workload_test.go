package bench

import (
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestCatalog(t *testing.T) {
	seen := map[string]bool{}
	families := map[string][]int{}
	for _, w := range Catalog() {
		if seen[w.Name] {
			t.Errorf("duplicate workload %q", w.Name)
		}
		seen[w.Name] = true
		if w.QueueDepth < 1 || w.Connections < 1 || w.Description == "" || len(w.sections) == 0 {
			t.Errorf("workload %+v incomplete", w)
		}
		families[w.Family] = append(families[w.Family], w.QueueDepth)
	}
	// The matrix: 4 KiB read, write and mix at iodepth 1 and 32,
	// paging at several depths, 2 and 4 connections.
	for fam, want := range map[string]string{FamilyRandRead: "1,32", FamilyRandWrite: "1,32", FamilyRandRW: "1,32", FamilyPaging: "1,4,16,32"} {
		var got []string
		for _, qd := range families[fam] {
			got = append(got, strconv.Itoa(qd))
		}
		if strings.Join(got, ",") != want {
			t.Errorf("family %s depths %v, want %s", fam, got, want)
		}
	}
	for _, n := range []string{"seqread-1m", "seqwrite-1m", "randread-c2", "randread-c4", "randwrite-c2", "randwrite-c4"} {
		if !seen[n] {
			t.Errorf("catalog lacks %s", n)
		}
	}
	if _, err := SelectWorkloads(QuickNames()); err != nil {
		t.Errorf("quick workloads: %v", err)
	}
	if _, err := SelectWorkloads([]string{"randread-qd1", "nope"}); err == nil || !strings.Contains(err.Error(), `"nope"`) {
		t.Errorf("unknown workload: err = %v", err)
	}
}

func TestJobFile(t *testing.T) {
	ws, err := SelectWorkloads([]string{"randwrite-qd32", "paging-qd4"})
	if err != nil {
		t.Fatal(err)
	}
	got := ws[0].JobFile("nbd://127.0.0.1:1234/x", 1500*time.Millisecond, 256<<20)
	want := `# randwrite-qd32: 4 KiB random write, iodepth 32
[global]
ioengine=nbd
uri=nbd://127.0.0.1:1234/x
size=268435456
runtime=1500ms
time_based=1
group_reporting=1
unified_rw_reporting=both
lat_percentiles=1
randrepeat=1
norandommap=1

[randwrite-qd32]
iodepth=32
numjobs=1
rw=randwrite
bs=4k
`
	if got != want {
		t.Errorf("job file:\n%s\nwant:\n%s", got, want)
	}
	paging := ws[1].JobFile("nbd://h:1/", time.Second, 1<<30)
	for _, line := range []string{"[pageout-pagein]\niodepth=4\nrw=randrw\nrwmixwrite=60\nbs=4k\nblockalign=4k\n",
		"random_distribution=zipf:1.2\n", "thinktime=1000\nthinktime_blocks=256\n",
		"[discard]\niodepth=1\nrw=randtrim\nbs=64k\nblockalign=64k\nrate_iops=200\n"} {
		if !strings.Contains(paging, line) {
			t.Errorf("paging job lacks %q:\n%s", line, paging)
		}
	}
}
