package pairmux

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"
)

func mustNew(t *testing.T, o Options) *Mux {
	t.Helper()
	m, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestFairTurns: one LU with a thousand queued writes does not starve ten
// LUs with one write each; each of them goes out in the first round.
func TestFairTurns(t *testing.T) {
	m := mustNew(t, Options{QuantumBytes: 8 << 10, LUBytesMax: 8 << 20})
	for range 1000 {
		if err := m.Push("busy", make([]byte, 4096)); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 10 {
		if err := m.Push(fmt.Sprintf("quiet%d", i), make([]byte, 4096)); err != nil {
			t.Fatal(err)
		}
	}
	batch := m.Next(nil, 48<<10) // one round: 2 + 10 frames of 4 KiB
	perLU := map[string]int{}
	for _, f := range batch {
		perLU[f.LU]++
	}
	if perLU["busy"] != 2 {
		t.Errorf("the busy LU sent %d frames in its first turn, want 2 (one quantum)", perLU["busy"])
	}
	for i := range 10 {
		if n := perLU[fmt.Sprintf("quiet%d", i)]; n != 1 {
			t.Errorf("quiet%d sent %d frames in the first round, want 1", i, n)
		}
	}
	if m.Busy() != 1 {
		t.Errorf("%d LUs still busy, want only the busy one", m.Busy())
	}
}

// TestBoundPerLU: an LU's queue stops at LUBytesMax with ErrFull and
// changes nothing; another LU is not affected; a frame larger than the
// bound still goes through an empty queue.
func TestBoundPerLU(t *testing.T) {
	m := mustNew(t, Options{QuantumBytes: 4096, LUBytesMax: 16 << 10})
	for range 4 {
		if err := m.Push("a", make([]byte, 4096)); err != nil {
			t.Fatal(err)
		}
	}
	if err := m.Push("a", make([]byte, 1)); !errors.Is(err, ErrFull) {
		t.Fatalf("push past the bound: %v", err)
	}
	if m.Queued("a") != 16<<10 {
		t.Fatalf("a refused push changed the queue: %d bytes", m.Queued("a"))
	}
	if err := m.Push("b", make([]byte, 4096)); err != nil {
		t.Fatalf("another LU refused: %v", err)
	}
	if err := m.Push("big", make([]byte, 1<<20)); err != nil {
		t.Fatalf("a large frame on an empty queue: %v", err)
	}
	var got int
	for m.Busy() > 0 {
		batch := m.Next(nil, 1<<30)
		if len(batch) == 0 {
			t.Fatal("Next returned nothing with frames queued")
		}
		got += len(batch)
	}
	if got != 6 {
		t.Fatalf("%d frames out, want 6", got)
	}
	if len(m.busy) != 0 || len(m.ring) != 0 {
		t.Fatal("an idle mux keeps LU state")
	}
}

// TestRandomAgainstModel: random pushes and batches of many LUs; every
// frame comes out once, in its LU's order, and no LU busy for a whole
// round waits more than one round.
func TestRandomAgainstModel(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 1))
	const quantum = 8 << 10
	m := mustNew(t, Options{QuantumBytes: quantum, LUBytesMax: 256 << 10})
	pushed := map[string][][]byte{}
	next := map[string]int{}
	serial := 0
	for step := range 5000 {
		if rng.IntN(3) > 0 {
			lu := fmt.Sprintf("lu%d", rng.IntN(20))
			f := make([]byte, 8+rng.IntN(3*quantum))
			serial++
			copy(f, fmt.Sprintf("%08d", serial))
			if err := m.Push(lu, f); err == nil {
				pushed[lu] = append(pushed[lu], f)
			} else if !errors.Is(err, ErrFull) {
				t.Fatal(err)
			}
			continue
		}
		busyBefore := m.Busy()
		batch := m.Next(nil, rng.IntN(256<<10))
		if busyBefore > 0 && len(batch) == 0 {
			t.Fatalf("step %d: nothing sent with %d LUs busy", step, busyBefore)
		}
		for _, f := range batch {
			want := pushed[f.LU][next[f.LU]]
			if !bytes.Equal(f.Data, want) {
				t.Fatalf("step %d: %s sent %q, want %q (order)", step, f.LU, f.Data[:8], want[:8])
			}
			next[f.LU]++
		}
	}
	for m.Busy() > 0 {
		for _, f := range m.Next(nil, 1<<20) {
			if !bytes.Equal(f.Data, pushed[f.LU][next[f.LU]]) {
				t.Fatalf("%s out of order at the end", f.LU)
			}
			next[f.LU]++
		}
	}
	for lu, fs := range pushed {
		if next[lu] != len(fs) {
			t.Fatalf("%s: %d of %d frames out", lu, next[lu], len(fs))
		}
	}
}

func TestOptions(t *testing.T) {
	if _, err := New(Options{QuantumBytes: -1}); err == nil {
		t.Fatal("a negative quantum was accepted")
	}
}
