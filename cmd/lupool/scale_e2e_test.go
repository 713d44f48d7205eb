package main

import (
	"strings"
	"testing"
)

// TestLUsPerNodeLimit: a node at --lus-per-node-max refuses a create with
// an error that names the limit and what to do, and the refusal changes
// nothing (issue 20).
func TestLUsPerNodeLimit(t *testing.T) {
	alongside(t)
	d := newDaemon(t, "n1", "--lus-per-node-max=2")
	d.start()
	d.mustCLI("lu", "create", "a", "--size", "1M")
	d.mustCLI("lu", "create", "b", "--size", "1M", "--kind", "memory")
	out, errOut, code := d.cli("lu", "create", "c", "--size", "1M")
	if code == 0 {
		t.Fatalf("a third LU on a node limited to 2 was created: %s", out)
	}
	for _, want := range []string{`"c"`, "its limit of LUs per node is 2", "delete LUs", "--lus-per-node-max"} {
		if !strings.Contains(errOut, want) {
			t.Errorf("refusal does not say %q: %s", want, errOut)
		}
	}
	lus := d.listLUs()
	if len(lus) != 2 || lus[0].Name != "a" || lus[1].Name != "b" {
		t.Fatalf("the refused create changed the LU table: %+v", lus)
	}
	if _, errOut, code := d.cli("lu", "show", "c"); code == 0 {
		t.Fatalf("the refused LU exists: %s", errOut)
	}
	// Room again once an LU is gone.
	d.mustCLI("lu", "delete", "a")
	d.mustCLI("lu", "create", "c", "--size", "1M")
}

// TestPairLeasesWriterKilledLedger is TestWriterKilledLedger with read
// leases per node pair (--pair-leases): every write acknowledged before
// the writer's kill -9 is read back through the promoted copy.
func TestPairLeasesWriterKilledLedger(t *testing.T) {
	alongside(t)
	writerKilledLedger(t, "--pair-leases=true")
}
