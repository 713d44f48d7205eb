package cluster

import (
	"errors"
	"strings"
	"testing"
)

// TestSecondOpenRefused: a second Node on the same directory (a second
// daemon) must fail with ErrLocked and a message naming the directory,
// and leave the first one working.
func TestSecondOpenRefused(t *testing.T) {
	dir := t.TempDir()
	n := openNode(t, testOptions(t, dir, "n1", true))
	waitLeaderIs(t, n)
	_, err := Open(testOptions(t, dir, "n1", true))
	if !errors.Is(err, ErrLocked) || !strings.Contains(err.Error(), dir) {
		t.Fatalf("second Open: %v, want ErrLocked naming %s", err, dir)
	}
	if err := n.CreateLU(ctxT(t), LU{Name: "still-works", SizeBytes: 512}); err != nil {
		t.Fatal(err)
	}
}
