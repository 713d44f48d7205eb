package replication

import (
	"context"
	"testing"

	"github.com/lupool/lupool/blockdev"
)

// chanCompletion hands an asynchronous write's result to the test.
type chanCompletion chan error

func (c chanCompletion) Complete(err error) blockdev.ReplyFlusher {
	c <- err
	return nil
}

// TestMirrorWrite4KAllocations: a 4 KiB write to, or read from, a memory LU with two
// copies (the paging LU's path), synchronous and asynchronous, makes no
// heap allocation anywhere in the process once pools are warm: not on the
// writer, not on the copy's stream (both nodes run in this process).
func TestMirrorWrite4KAllocations(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts mean nothing under the race detector (sync.Pool drops items on purpose); make test runs this test without -race")
	}
	mt, nodes := newTestCluster(t, "a", "b")
	const size = 16 << 20
	mt.create(t, twoCopies("alloc", size, "memory"))
	mir := exported(t, nodes["a"].m, "alloc").(*Mirror)
	waitFor(t, "stream", func() bool { return mir.linkSet()[0].conn.Load() != nil })
	// What the NBD engine calls: the role device around the Mirror.
	dev := roleOf(t, nodes["a"].m, "alloc")
	ctx := context.Background()
	p := make([]byte, 4096)
	done := make(chanCompletion, 1)
	var err error
	n := 0
	write := func() {
		off := int64(n%(size/4096)) * 4096
		n++
		if e := dev.WriteAt(ctx, p, off, 0); e != nil {
			err = e
		}
	}
	writeAsync := func() {
		off := int64(n%(size/4096)) * 4096
		n++
		dev.WriteAsync(ctx, p, off, 0, done)
		if e := <-done; e != nil {
			err = e
		}
	}
	copyDev := roleOf(t, nodes["b"].m, "alloc")
	buf := make([]byte, 4096)
	readOn := func(dev blockdev.Device) func() {
		return func() {
			off := int64(n%(size/4096)) * 4096
			n++
			if e := dev.ReadAt(ctx, buf, off); e != nil {
				err = e
			}
		}
	}
	for _, c := range []struct {
		name string
		f    func()
	}{{"WriteAt", write}, {"WriteAsync", writeAsync}, {"ReadAt on the writer", readOn(dev)}, {"ReadAt on the copy", readOn(copyDev)}} {
		for range size / 4096 { // allocate every page, warm the pools
			c.f()
		}
		allocs := testing.AllocsPerRun(1000, c.f)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%s: %.2f allocations per 4 KiB request with two copies", c.name, allocs)
		if allocs >= 0.5 {
			t.Errorf("%s: %.2f allocations per 4 KiB request with two copies, want 0", c.name, allocs)
		}
	}
}
