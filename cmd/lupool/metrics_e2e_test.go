package main

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/lupool/lupool/internal/realclient"
)

// ioScript writes a block and reads it back through nbdsh, then
// disconnects.
const ioScript = "h.pwrite(b'm' * 4096, 8192)\nassert h.pread(4096, 8192) == b'm' * 4096\nh.flush()\n"

// nbdIO runs ioScript against uri with the real nbdsh.
func nbdIO(t *testing.T, uri string) {
	t.Helper()
	if out, err := realclient.Nbdsh(t, uri, ioScript).CombinedOutput(); err != nil {
		t.Fatalf("nbdsh %s: %v\n%s", uri, err, out)
	}
}

// seriesOf returns the /metrics sample lines that carry name as a label
// value (lu="name", export="name").
func seriesOf(text, name string) []string {
	var out []string
	for _, line := range strings.Split(text, "\n") {
		if !strings.HasPrefix(line, "#") && strings.Contains(line, fmt.Sprintf("%q", name)) {
			out = append(out, line)
		}
	}
	return out
}

// waitNoSeries waits until d's /metrics has no series of name; the other
// nodes apply a deletion shortly after the node that made it.
func waitNoSeries(t *testing.T, d *daemon, name string) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		m := d.metrics()
		left := seriesOf(m, name)
		if len(left) == 0 {
			return m
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s's /metrics still has %d series of deleted LU %s, e.g.:\n%s",
				d.id, len(left), name, strings.Join(left[:min(len(left), 10)], "\n"))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// wantSeries fails unless d's metrics text m has NBD and replication
// series of name.
func wantSeries(t *testing.T, d *daemon, m, name string, metrics ...string) {
	t.Helper()
	for _, metric := range metrics {
		found := false
		for _, line := range seriesOf(m, name) {
			found = found || strings.HasPrefix(line, metric+"{")
		}
		if !found {
			t.Errorf("%s's /metrics has no %s series of %s", d.id, metric, name)
		}
	}
}

// TestMetricsDeletedLUSeriesGo: after `lu delete`, the daemon's /metrics
// has no series naming the LU (NBD per-export series, replication per-LU
// series), and the other LU's series stay.
func TestMetricsDeletedLUSeriesGo(t *testing.T) {
	alongside(t)
	needTools(t, "nbdsh")
	d := newDaemon(t, "n1")
	d.start()
	for _, name := range []string{"metgone", "metkept"} {
		d.mustCLI("lu", "create", name, "--size", "1M")
		nbdIO(t, d.uri(name))
	}
	m := d.metrics()
	for _, name := range []string{"metgone", "metkept"} {
		wantSeries(t, d, m, name, "lupool_nbd_requests_total", "lupool_nbd_bytes_total", "lupool_nbd_connections")
	}
	d.mustCLI("lu", "delete", "metgone")
	m = waitNoSeries(t, d, "metgone")
	wantSeries(t, d, m, "metkept", "lupool_nbd_requests_total", "lupool_nbd_bytes_total")
	if v := metricValue(m, "lupool_nbd_bytes_total", `export="metkept"`, `command="write"`); v != 4096 {
		t.Errorf("metkept's written bytes = %v after the other LU's deletion, want 4096", v)
	}
}

// TestMetricsDeletedLUSeriesGoTwoNodes: the same for an LU with two
// copies, on the writer and on the copy's node, each of which served it.
func TestMetricsDeletedLUSeriesGoTwoNodes(t *testing.T) {
	alongside(t)
	needTools(t, "nbdsh")
	n1 := newDaemon(t, "n1")
	n1.start()
	n2 := newJoiner(t, "n2", n1)
	n2.start()
	for _, name := range []string{"metgone", "metkept"} {
		n1.mustCLI("lu", "create", name, "--size", "1M", "--copies", "2")
		nbdIO(t, n1.uri(name))
		nbdIO(t, n2.uri(name))
	}
	m1, m2 := n1.metrics(), n2.metrics()
	for _, name := range []string{"metgone", "metkept"} {
		wantSeries(t, n1, m1, name, "lupool_nbd_requests_total", "lupool_replication_sent_bytes_total")
		wantSeries(t, n2, m2, name, "lupool_nbd_requests_total", "lupool_replication_received_bytes_total",
			"lupool_replication_forwarded_write_bytes_total")
	}
	n1.mustCLI("lu", "delete", "metgone")
	for _, d := range []*daemon{n1, n2} {
		m := waitNoSeries(t, d, "metgone")
		wantSeries(t, d, m, "metkept", "lupool_nbd_requests_total")
	}
	wantSeries(t, n1, n1.metrics(), "metkept", "lupool_replication_sent_bytes_total")
	wantSeries(t, n2, n2.metrics(), "metkept", "lupool_replication_received_bytes_total")
}
