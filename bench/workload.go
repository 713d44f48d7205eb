package bench

import (
	"fmt"
	"strings"
	"time"
)

// Workload is one fio job, run the same way against every server.
type Workload struct {
	// Name is unique and short, e.g. "randread-qd32"; used on the command
	// line and in file names.
	Name string
	// Family groups workloads that differ only in queue depth; a plot panel
	// draws one family ("randread", "paging", ...).
	Family string
	// QueueDepth is fio's iodepth for each connection.
	QueueDepth int
	// Connections is the number of NBD connections (fio jobs) in parallel.
	Connections int
	// Description says what the workload does, for people.
	Description string
	// sections are fio job sections: [name] then key=value options. Each
	// section opens its own NBD connection per numjobs.
	sections []section
}

type section struct {
	name    string
	options []string
}

// Family names.
const (
	FamilyRandRead  = "randread"
	FamilyRandWrite = "randwrite"
	FamilyRandRW    = "randrw70"
	FamilySeqRead   = "seqread"
	FamilySeqWrite  = "seqwrite"
	FamilyMultiConn = "multiconn"
	FamilyPaging    = "paging"
)

// pagingBurstPages and pagingIdle shape the paging profile's bursts: a burst
// of pagingBurstPages 4 KiB operations, then pagingIdle with nothing issued.
const (
	pagingBurstPages = 256
	pagingIdle       = time.Millisecond
)

// Catalog returns every workload the suite knows, in run order. Paging runs
// last because its trims leave holes that later reads would see.
func Catalog() []Workload {
	var ws []Workload
	for _, qd := range []int{1, 32} {
		ws = append(ws, simple(FamilyRandRead, qd, 1, "4 KiB random read", "rw=randread", "bs=4k"))
		ws = append(ws, simple(FamilyRandWrite, qd, 1, "4 KiB random write", "rw=randwrite", "bs=4k"))
		ws = append(ws, simple(FamilyRandRW, qd, 1, "4 KiB random 70% read / 30% write", "rw=randrw", "rwmixread=70", "bs=4k"))
	}
	ws = append(ws,
		named("seqread-1m", FamilySeqRead, 8, 1, "1 MiB sequential read", "rw=read", "bs=1m"),
		named("seqwrite-1m", FamilySeqWrite, 8, 1, "1 MiB sequential write", "rw=write", "bs=1m"),
	)
	for _, conns := range []int{2, 4} {
		ws = append(ws,
			named(fmt.Sprintf("randread-c%d", conns), FamilyMultiConn, 16, conns,
				fmt.Sprintf("4 KiB random read over %d connections (multi-conn)", conns), "rw=randread", "bs=4k"),
			named(fmt.Sprintf("randwrite-c%d", conns), FamilyMultiConn, 16, conns,
				fmt.Sprintf("4 KiB random write over %d connections (multi-conn)", conns), "rw=randwrite", "bs=4k"),
		)
	}
	for _, qd := range []int{1, 4, 16, 32} {
		ws = append(ws, paging(qd))
	}
	return ws
}

// QuickNames returns the workloads of a --quick run: the NBD engine's
// targets (4 KiB random read and write at iodepth 32) and the paging
// profile at a latency-bound and a deep queue. Four workloads keep five
// servers times three rounds under two minutes on a 2-core machine.
func QuickNames() []string {
	return []string{"randread-qd32", "randwrite-qd32", "paging-qd1", "paging-qd32"}
}

// SelectWorkloads returns the catalog entries named, in catalog order; a
// name that is not in the catalog is an error.
func SelectWorkloads(names []string) ([]Workload, error) {
	want := map[string]bool{}
	for _, n := range names {
		want[n] = true
	}
	var out []Workload
	for _, w := range Catalog() {
		if want[w.Name] {
			out = append(out, w)
			delete(want, w.Name)
		}
	}
	for n := range want {
		return nil, fmt.Errorf("bench: unknown workload %q (known: %s)", n, strings.Join(workloadNames(Catalog()), ", "))
	}
	return out, nil
}

func workloadNames(ws []Workload) []string {
	names := make([]string, len(ws))
	for i, w := range ws {
		names[i] = w.Name
	}
	return names
}

func simple(family string, qd, conns int, desc string, options ...string) Workload {
	return named(fmt.Sprintf("%s-qd%d", family, qd), family, qd, conns,
		fmt.Sprintf("%s, iodepth %d", desc, qd), options...)
}

func named(name, family string, qd, conns int, desc string, options ...string) Workload {
	opts := append([]string{fmt.Sprintf("iodepth=%d", qd), fmt.Sprintf("numjobs=%d", conns)}, options...)
	return Workload{
		Name: name, Family: family, QueueDepth: qd, Connections: conns, Description: desc,
		sections: []section{{name: name, options: opts}},
	}
}

// paging is the swap-like profile. One connection pages: 4 KiB page-aligned
// random reads and writes (60% writes), in bursts of pagingBurstPages
// operations separated by pagingIdle, over a Zipf(1.2) distribution so that a
// small hot set of pages takes most of the traffic and most reads hit pages
// written shortly before (swap-in of recently swapped-out pages). A second
// connection frees memory: 64 KiB discards (16 pages) at 200 per second over
// the same distribution, as a guest returns freed swap slots.
func paging(qd int) Workload {
	return Workload{
		Name: fmt.Sprintf("paging-qd%d", qd), Family: FamilyPaging, QueueDepth: qd, Connections: 2,
		Description: fmt.Sprintf("paging: bursty 4 KiB random write 60%%/read 40%% on hot pages at iodepth %d, plus 64 KiB discards", qd),
		sections: []section{
			{name: "pageout-pagein", options: []string{
				fmt.Sprintf("iodepth=%d", qd), "rw=randrw", "rwmixwrite=60", "bs=4k", "blockalign=4k",
				"random_distribution=zipf:1.2",
				fmt.Sprintf("thinktime=%d", pagingIdle.Microseconds()),
				fmt.Sprintf("thinktime_blocks=%d", pagingBurstPages),
			}},
			{name: "discard", options: []string{
				"iodepth=1", "rw=randtrim", "bs=64k", "blockalign=64k", "rate_iops=200",
				"random_distribution=zipf:1.2",
			}},
		},
	}
}

// JobFile renders the fio job file that runs w against uri for runtime
// over the first sizeBytes of the export.
func (w Workload) JobFile(uri string, runtime time.Duration, sizeBytes int64) string {
	var b strings.Builder
	fmt.Fprintf(&b, "# %s: %s\n[global]\n", w.Name, w.Description)
	for _, o := range []string{
		"ioengine=nbd",
		"uri=" + uri,
		fmt.Sprintf("size=%d", sizeBytes),
		fmt.Sprintf("runtime=%dms", runtime.Milliseconds()),
		"time_based=1",
		"group_reporting=1",
		"unified_rw_reporting=both",
		"lat_percentiles=1",
		"randrepeat=1",
		"norandommap=1",
	} {
		fmt.Fprintf(&b, "%s\n", o)
	}
	for _, s := range w.sections {
		fmt.Fprintf(&b, "\n[%s]\n", s.name)
		for _, o := range s.options {
			fmt.Fprintf(&b, "%s\n", o)
		}
	}
	return b.String()
}

// prefillJob writes the whole fio region once with 1 MiB sequential writes
// so that reads hit written data on every server alike.
func prefillJob(uri string, sizeBytes int64) string {
	return fmt.Sprintf("[global]\nioengine=nbd\nuri=%s\nsize=%d\n\n[prefill]\nrw=write\nbs=1m\niodepth=8\n", uri, sizeBytes)
}
