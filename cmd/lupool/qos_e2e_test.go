package main

import (
	"encoding/json"
	"math"
	"strings"
	"testing"
	"time"
)

// fioIOPS runs fio over NBD with args and returns the read and write IOPS
// it measured.
func fioIOPS(t *testing.T, args ...string) (read, write float64) {
	t.Helper()
	out := fio(t, append(args, "--output-format=json")...)
	// fio may print notices before the JSON.
	if i := strings.Index(out, "{"); i > 0 {
		out = out[i:]
	}
	var r struct {
		Jobs []struct {
			Read  struct{ IOPS float64 } `json:"read"`
			Write struct{ IOPS float64 } `json:"write"`
		} `json:"jobs"`
	}
	if err := json.Unmarshal([]byte(out), &r); err != nil || len(r.Jobs) != 1 {
		t.Fatalf("fio JSON: %v\n%s", err, out)
	}
	return r.Jobs[0].Read.IOPS, r.Jobs[0].Write.IOPS
}

// TestQoSIOPSLimit: fio at QD32 on an LU created with --iops-limit 2000
// measures 2000 IOPS ±10 % (reads, then writes); another LU on the same
// node is not throttled; lu set lowers the limit online, and a node that
// forwards the LU applies it too; the metrics count the waits.
func TestQoSIOPSLimit(t *testing.T) {
	needTools(t, "fio")
	n1 := newDaemon(t, "n1")
	n1.start()
	n2 := newJoiner(t, "n2", n1)
	n2.start()
	n1.mustCLI("lu", "create", "q", "--size", "64M", "--copies", "2", "--iops-limit", "2000")
	n1.mustCLI("lu", "create", "f", "--size", "64M")
	if out := n1.mustCLI("lu", "show", "q"); !strings.Contains(out, "limits: reads 2000/s, writes 2000/s (burst 100ms)") {
		t.Fatalf("lu show q:\n%s", out)
	}
	job := func(uri, rw, seconds string) []string {
		return []string{"--name=qos", "--uri=" + uri, "--rw=" + rw, "--bs=4k", "--iodepth=32",
			"--size=32M", "--time_based", "--runtime=" + seconds}
	}
	// within measures with run and checks the IOPS are within 10 % of
	// want; a measurement outside is repeated once (this machine's CPUs
	// are shared, and fio itself may fall behind the limit).
	within := func(what string, want float64, run func() float64) float64 {
		t.Helper()
		got := run()
		t.Logf("%s: %.0f IOPS (limit %.0f)", what, got, want)
		if math.Abs(got-want) > 0.1*want {
			got = run()
			t.Logf("%s, again: %.0f IOPS", what, got)
			if math.Abs(got-want) > 0.1*want {
				t.Errorf("%s: %.0f IOPS, want %.0f ±10%%", what, got, want)
			}
		}
		return got
	}
	readIOPS := func(uri, seconds string) func() float64 {
		return func() float64 { r, _ := fioIOPS(t, job(uri, "randread", seconds)...); return r }
	}
	read := within("q randread QD32 via the writer", 2000, readIOPS(n1.uri("q"), "5"))
	within("q randwrite QD32 via the writer", 2000, func() float64 {
		_, w := fioIOPS(t, job(n1.uri("q"), "randwrite", "5")...)
		return w
	})
	free, _ := fioIOPS(t, job(n1.uri("f"), "randread", "3")...)
	t.Logf("f randread QD32, no limit: %.0f IOPS", free)
	if free < 2*read {
		t.Errorf("the unlimited LU f ran %.0f IOPS, not much more than the limited q's %.0f", free, read)
	}

	// Online, and on the other node (which forwards writes to n1 and reads
	// from its own copy).
	n1.mustCLI("lu", "set", "q", "--read-iops-limit", "500")
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(n2.mustCLI("lu", "show", "q"), "reads 500/s") {
		if time.Now().After(deadline) {
			t.Fatalf("n2 does not show the new limit:\n%s", n2.mustCLI("lu", "show", "q"))
		}
		time.Sleep(50 * time.Millisecond)
	}
	within("q randread QD32 via n2 after lu set", 500, readIOPS(n2.uri("q"), "4"))

	for _, d := range []*daemon{n1, n2} {
		m := d.metrics()
		if v := metricValue(m, "lupool_qos_throttled_requests_total", `lu="q"`, `op="read"`); v < 1000 {
			t.Errorf("%s: throttled reads of q = %v", d.id, v)
		}
		if v := metricValue(m, "lupool_qos_wait_seconds_total", `lu="q"`, `op="read"`); v <= 0 {
			t.Errorf("%s: read wait seconds of q = %v", d.id, v)
		}
		if v := metricValue(m, "lupool_qos_throttled_requests_total", `lu="f"`); v > 0 {
			t.Errorf("%s: the unlimited f was throttled %v times", d.id, v)
		}
	}
	// The series go with the LU.
	n1.mustCLI("lu", "delete", "q")
	if v := metricValue(n1.metrics(), "lupool_qos_throttled_requests_total", `lu="q"`); v != -1 {
		t.Errorf("q's throttled series is still there after delete: %v", v)
	}
	// Wrong limits are usage errors or refused with the reason.
	if _, errOut, code := n1.cli("lu", "set", "f", "--iops-limit", "lots"); code != 2 || !strings.Contains(errOut, "--iops-limit") {
		t.Errorf("lu set --iops-limit lots: exit %d %q", code, errOut)
	}
	if _, errOut, code := n1.cli("lu", "set", "f", "--qos-burst", "2m"); code != 1 || !strings.Contains(errOut, "burst_ms") {
		t.Errorf("lu set --qos-burst 2m: exit %d %q", code, errOut)
	}
}
