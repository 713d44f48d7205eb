package cluster

import (
	"errors"
	"strings"
	"testing"
	"time"
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

// TestReadsDuringClose: reads racing with Close either succeed or return
// ErrClosed; none touches a closed Pebble.
func TestReadsDuringClose(t *testing.T) {
	n := openNode(t, testOptions(t, t.TempDir(), "n1", true))
	waitLeaderIs(t, n)
	if err := n.CreateLU(ctxT(t), LU{Name: "a", SizeBytes: 512}); err != nil {
		t.Fatal(err)
	}
	errs := make(chan error, 4)
	for g := 0; g < 4; g++ {
		go func() {
			for {
				_, err1 := n.GetLU("a")
				_, err2 := n.ListLUs()
				_, err3 := n.Nodes()
				_, _, err4 := n.Setting("k")
				n.Leader()
				n.Stats()
				for _, err := range []error{err1, err2, err3, err4} {
					if err != nil {
						errs <- err
						return
					}
				}
			}
		}()
	}
	time.Sleep(50 * time.Millisecond)
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	for g := 0; g < 4; g++ {
		if err := <-errs; !errors.Is(err, ErrClosed) {
			t.Fatalf("read during Close: %v, want ErrClosed", err)
		}
	}
}
