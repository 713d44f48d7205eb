package main

import (
	"strings"
	"testing"
	"time"

	"github.com/lupool/lupool/internal/realclient"
)

// TestPoolAlertEventsTmpfs: a pool on a 64 MiB tmpfs with the alerts set
// to 80 % (warn), 90 % (critical) and 300 % overcommit reports, as
// events, the overcommit approached by a 200 MiB LU, usage crossing 80 %
// and then 90 % as data is written, and the return to ok when the LU goes.
func TestPoolAlertEventsTmpfs(t *testing.T) {
	needTools(t, "fio")
	dir := realclient.MountTmpfs(t, "64m")
	d := newDaemon(t, "n1", "--pool-dirs", dir, "--alert-interval", "200ms")
	d.start()
	out := d.mustCLI("pool", "alert", "set", "--threshold", "80", "--critical", "90", "--overcommit", "300%", "-o", "json")
	if want := `"overcommit_percent": 300`; !contains(out, want) {
		t.Fatalf("pool alert set: %s; want %s", out, want)
	}
	if out := d.mustCLI("pool", "alert", "show"); !contains(out, "80% used") || !contains(out, "300% of capacity") {
		t.Fatalf("pool alert show:\n%s", out)
	}
	w := d.startWatch("--kind", "PoolThreshold,OvercommitApproached", "--tail", "0")
	time.Sleep(300 * time.Millisecond)

	d.mustCLI("lu", "create", "fill", "--size", "200M")
	w.waitFor(t, "OvercommitApproached", 20*time.Second, func(e eventJSON) bool {
		return e.Kind == "OvercommitApproached" && e.Node == "n1" && e.Details["state"] == "approached"
	})
	fio(t, "--name=to84", "--uri="+d.uri("fill"), "--rw=write", "--bs=1M", "--size=54M")
	warn := w.waitFor(t, "PoolThreshold warn", 20*time.Second, func(e eventJSON) bool {
		return e.Kind == "PoolThreshold" && e.Details["level"] == "warn" && e.Details["from"] == "ok"
	})
	fio(t, "--name=to94", "--uri="+d.uri("fill"), "--rw=write", "--bs=1M", "--offset=54M", "--size=6M")
	crit := w.waitFor(t, "PoolThreshold critical", 20*time.Second, func(e eventJSON) bool {
		return e.Kind == "PoolThreshold" && e.Details["level"] == "critical" && e.Details["from"] == "warn"
	})
	if warn.Seq >= crit.Seq {
		t.Fatalf("warn at %d, critical at %d: want warn first", warn.Seq, crit.Seq)
	}
	d.mustCLI("lu", "delete", "fill")
	w.waitFor(t, "PoolThreshold ok", 20*time.Second, func(e eventJSON) bool {
		return e.Kind == "PoolThreshold" && e.Details["level"] == "ok" && e.Details["from"] == "critical"
	})
	w.waitFor(t, "OvercommitApproached ok", 20*time.Second, func(e eventJSON) bool {
		return e.Kind == "OvercommitApproached" && e.Details["state"] == "ok"
	})
	for _, e := range w.events() {
		if e.Kind != "PoolThreshold" && e.Kind != "OvercommitApproached" {
			t.Fatalf("--kind let %v through", e)
		}
	}
	t.Logf("alert events:\n%s", eventList(w.events()))
}

func contains(s, sub string) bool { return strings.Contains(s, sub) }
