package nbd

import (
	"math/rand/v2"
	"net"
	"runtime"
	"testing"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/internal/testseed"
)

// heapStats collects garbage (twice: pooled buffers survive one
// collection in their pool's victim cache) when gc is set, and returns the
// heap in use and the heap memory the runtime keeps from the OS.
func heapStats(gc bool) (inUse, retained uint64) {
	if gc {
		runtime.GC()
		runtime.GC()
	}
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse, ms.HeapSys - ms.HeapReleased
}

const mib = 1 << 20

// TestStalledReadersMemory: clients that send many large READs and never
// read a reply make the server hold at most MaxInflightBytes of buffers
// each (plus a small fixed overhead), the server stops reading them, and
// once they close the memory is freed and returned to the OS by the
// server itself (FreeMemory), without the test collecting garbage.
func TestStalledReadersMemory(t *testing.T) {
	const (
		clients           = 4
		requestsPerClient = 64
		// perConnOverheadBytes: the transmission buffers, request structs,
		// worker goroutines (their stacks are not heap) and slack.
		perConnOverheadBytes = readBufferBytes + writeBufferBytes + 2*mib
		// slackBytes: what the test itself and the runtime may allocate
		// between two measurements.
		slackBytes = 8 * mib
	)
	rng := rand.New(rand.NewPCG(testseed.Seed(t, "./server/nbd/"), 0))
	freed := make(chan struct{}, 16)
	ts := startServer(t, blockdev.Caps{}, func(o *Options) {
		o.FreeMemory = func() {
			freeOSMemory()
			freed <- struct{}{}
		}
	}, Export{Name: "big", Device: newZeroDevice(4 * MaxRequestBytes)})
	baseInUse, _ := heapStats(true)
	freeOSMemory()
	_, baseRetained := heapStats(false)

	var sentBytes int64
	conns := make([]net.Conn, clients)
	for i := range conns {
		c := dialRaw(t, ts.addr)
		c.attach("big", i%2 == 0)
		var reqs []byte
		for j := range requestsPerClient {
			n := 1*mib + rng.IntN(MaxRequestBytes-1*mib+1)
			off := rng.Int64N(3*MaxRequestBytes) &^ 4095
			reqs = append(reqs, readRequest(uint64(j), uint64(off), uint32(n))...)
			sentBytes += int64(n)
		}
		c.send(reqs) // 64 headers fit the socket buffer; replies are never read
		conns[i] = c.conn
	}

	// Wait until the server has stopped reading: nothing changes for a
	// while.
	type progress struct{ done, inflight int }
	snapshot := func() (p progress) {
		for _, st := range ts.srv.ConnStats() {
			p.done += int(st.Commands["read"].Requests)
			p.inflight += st.InflightRequests
		}
		return p
	}
	last, stableSince := snapshot(), time.Now()
	for time.Since(stableSince) < 500*time.Millisecond {
		time.Sleep(20 * time.Millisecond)
		if p := snapshot(); p != last {
			last, stableSince = p, time.Now()
		}
	}
	if read := last.done + last.inflight; read >= clients*requestsPerClient {
		t.Fatalf("the server read all %d requests of clients that read no reply (%d answered, %d in flight)",
			clients*requestsPerClient, last.done, last.inflight)
	}
	during, _ := heapStats(true)
	bound := baseInUse + clients*(DefaultMaxInflightBytes+perConnOverheadBytes) + slackBytes
	t.Logf("heap in use: baseline %d MiB, with %d stalled clients %d MiB (bound %d MiB); %d of %d requests read (%d in flight), %d MiB asked for",
		baseInUse/mib, clients, during/mib, bound/mib, last.done+last.inflight, clients*requestsPerClient, last.inflight, sentBytes/mib)
	if during > bound {
		t.Errorf("heap in use %d MiB with %d stalled clients, bound %d MiB (baseline %d + %d × (MaxInflightBytes %d + %d))",
			during/mib, clients, bound/mib, baseInUse/mib, clients, DefaultMaxInflightBytes/mib, perConnOverheadBytes/mib)
	}
	if during < baseInUse+clients*mib {
		t.Errorf("heap in use %d MiB, baseline %d MiB: the stalled reads hold no buffers, so this test measures nothing", during/mib, baseInUse/mib)
	}

	for _, nc := range conns {
		_ = nc.Close()
	}
	waitFor(t, func() bool { return len(ts.srv.ConnStats()) == 0 })
	select {
	case <-freed:
	case <-time.After(freeMemoryDelay + 10*time.Second):
		t.Fatal("the server did not free memory after its stalled clients closed")
	}
	inUse, retained := heapStats(false) // no collection by the test
	t.Logf("after they closed: heap in use %d MiB, kept from the OS %d MiB (baseline %d MiB)", inUse/mib, retained/mib, baseRetained/mib)
	if inUse > baseInUse+slackBytes {
		t.Errorf("heap in use %d MiB after the clients closed, baseline %d MiB", inUse/mib, baseInUse/mib)
	}
	if retained > baseRetained+slackBytes {
		t.Errorf("heap kept from the OS %d MiB after the clients closed, baseline %d MiB", retained/mib, baseRetained/mib)
	}
}
