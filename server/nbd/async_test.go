package nbd

import (
	"bytes"
	"context"
	"sync"
	"testing"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/blockdev/blockdevtest"
	"github.com/lupool/lupool/server/nbdproto"
)

// asyncMem is a Mem that the engine writes through AsyncWriter. Every
// third write completes before WriteAsync returns; the others complete on
// the device's completer goroutine, in bursts, with their replies flushed
// once per burst, the way a replication stream's reader completes them.
type asyncMem struct {
	*blockdevtest.Mem
	queue chan asyncDone
	hold  chan struct{} // while non-nil, the completer waits for it to close
	mu    sync.Mutex
	n     int
}

type asyncDone struct {
	done blockdev.Completion
	err  error
}

func newAsyncMem(t testing.TB, mem *blockdevtest.Mem) *asyncMem {
	a := &asyncMem{Mem: mem, queue: make(chan asyncDone, 1024)}
	stop := make(chan struct{})
	finished := make(chan struct{})
	go a.completer(stop, finished)
	t.Cleanup(func() { close(stop); <-finished })
	return a
}

func (a *asyncMem) AsyncWrites() bool { return true }

func (a *asyncMem) WriteAsync(ctx context.Context, p []byte, off int64, flags blockdev.Flags, done blockdev.Completion) {
	err := a.Mem.WriteAt(ctx, p, off, flags)
	a.mu.Lock()
	a.n++
	now := a.n%3 == 0
	a.mu.Unlock()
	if now {
		if fl := done.Complete(err); fl != nil {
			fl.FlushReplies()
		}
		return
	}
	a.queue <- asyncDone{done, err}
}

func (a *asyncMem) completer(stop, finished chan struct{}) {
	defer close(finished)
	var flushers []blockdev.ReplyFlusher
	complete := func(d asyncDone) {
		if fl := d.done.Complete(d.err); fl != nil {
			for _, f := range flushers {
				if f == fl {
					return
				}
			}
			flushers = append(flushers, fl)
		}
	}
	for {
		select {
		case <-stop:
			return
		case d := <-a.queue:
			a.mu.Lock()
			hold := a.hold
			a.mu.Unlock()
			if hold != nil {
				<-hold
			}
			complete(d)
			for more := true; more; {
				select {
				case d := <-a.queue:
					complete(d)
				default:
					more = false
				}
			}
			for _, f := range flushers {
				f.FlushReplies()
			}
			flushers = flushers[:0]
		}
	}
}

var _ blockdev.AsyncWriter = (*asyncMem)(nil)

// TestAsync runs the transmission tests again with "disk" served as an
// AsyncWriter, so that the reader starts writes and other goroutines answer
// them.
func TestAsync(t *testing.T) { rerunTransmissionTests(t, &testAsync) }

// TestAsyncDiscAnswersWritesInFlight: writes whose completion is still
// pending when the client sends DISC are answered before the connection
// closes, and land.
func TestAsyncDiscAnswersWritesInFlight(t *testing.T) {
	testAsync = true
	ts := startServer(t, blockdev.Caps{}, nil)
	testAsync = false
	dev := ts.asyncDev
	release := make(chan struct{})
	dev.mu.Lock()
	dev.hold = release
	dev.n = 0 // writes 1 and 2 queue, write 3 completes at once
	dev.mu.Unlock()

	c := dialRaw(t, ts.addr)
	c.attach("disk", false)
	data := pattern(4096, 9)
	for i := range 3 {
		c.request(nbdproto.CmdWrite, 0, uint64(i+1), uint64(i)*4096, 4096, data)
	}
	c.request(nbdproto.CmdDisc, 0, 99, 0, 0, nil)
	_ = c.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	// Write 3 is answered while 1 and 2 are held.
	if h, code, _ := c.simpleReply(0); h != 3 || code != 0 {
		t.Fatalf("first reply: handle %d %s, want 3 OK", h, errName(code))
	}
	time.Sleep(100 * time.Millisecond)
	close(release)
	got := map[uint64]bool{}
	for range 2 {
		h, code, _ := c.simpleReply(0)
		if code != 0 {
			t.Fatalf("handle %d: %s", h, errName(code))
		}
		got[h] = true
	}
	if !got[1] || !got[2] {
		t.Fatalf("replies %v, want handles 1 and 2", got)
	}
	c.expectClosed()
	for i := range 3 {
		if !bytes.Equal(ts.mem.Bytes()[i*4096:(i+1)*4096], data) {
			t.Fatalf("write %d did not land", i+1)
		}
	}
}

// TestAsyncFUAAndLargeWritesRunOnWorkers: only plain writes of at most
// InlineMaxBytes are started asynchronously.
func TestAsyncFUAAndLargeWritesRunOnWorkers(t *testing.T) {
	testAsync = true
	ts := startServer(t, blockdev.Caps{}, nil)
	testAsync = false
	dev := ts.asyncDev
	c := dialRaw(t, ts.addr)
	c.attach("disk", false)
	count := func() int { dev.mu.Lock(); defer dev.mu.Unlock(); return dev.n }
	if code := c.do(nbdproto.CmdWrite, nbdproto.CmdFlagFUA, 0, 4096, pattern(4096, 1)); code != 0 {
		t.Fatalf("FUA write: %s", errName(code))
	}
	if code := c.do(nbdproto.CmdWrite, 0, 0, InlineMaxBytes+4096, pattern(InlineMaxBytes+4096, 2)); code != 0 {
		t.Fatalf("large write: %s", errName(code))
	}
	if n := count(); n != 0 {
		t.Fatalf("%d writes went through WriteAsync, want 0", n)
	}
	if code := c.do(nbdproto.CmdWrite, 0, 0, InlineMaxBytes, pattern(InlineMaxBytes, 3)); code != 0 {
		t.Fatalf("write: %s", errName(code))
	}
	if n := count(); n != 1 {
		t.Fatalf("%d writes went through WriteAsync, want 1", n)
	}
}

// TestAsyncSlowClientDoesNotBlockCompleter: client A does not read the
// reply to a 16 MiB read, so A's replies cannot be written. A write of A's
// and then one of B's are completed by the same completer goroutine (as a
// replication stream's reader completes writes of every client of an LU):
// B's write is still answered at once.
func TestAsyncSlowClientDoesNotBlockCompleter(t *testing.T) {
	testAsync = true
	ts := startServer(t, blockdev.Caps{}, nil)
	testAsync = false
	dev := ts.asyncDev
	dev.mu.Lock()
	dev.n = 0 // the next two writes go to the completer goroutine
	dev.mu.Unlock()
	a := dialRaw(t, ts.addr)
	a.attach("disk", false)
	b := dialRaw(t, ts.addr)
	b.attach("disk", false)

	a.request(nbdproto.CmdRead, 0, 1, 0, 16<<20, nil)
	time.Sleep(300 * time.Millisecond) // A's read reply now fills the socket
	a.request(nbdproto.CmdWrite, 0, 2, 0, 4096, pattern(4096, 1))
	time.Sleep(100 * time.Millisecond)
	b.request(nbdproto.CmdWrite, 0, 3, 8192, 4096, pattern(4096, 2))
	_ = b.conn.SetReadDeadline(time.Now().Add(3 * time.Second))
	start := time.Now()
	if h, code, _ := b.simpleReply(0); h != 3 || code != 0 {
		t.Fatalf("B's write: handle %d %s", h, errName(code))
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("B's write was answered after %v: the completer waited for A", d)
	}
	_ = a.conn.Close()
}

// asyncReadMem is an asyncMem that the engine also reads through
// AsyncReader, and that holds every request it starts until FlushRequests
// (RequestFlusher), as the client-side endpoint does: an engine that
// waited without flushing would hang the test. It allocates nothing per
// request.
type asyncReadMem struct {
	*asyncMem
	mu          sync.Mutex
	held, spare []heldRequest
}

// heldRequest is a started request: a read still to run (p, off), or a
// write's result.
type heldRequest struct {
	done blockdev.Completion
	p    []byte
	off  int64
	err  error
}

func (a *asyncReadMem) AsyncReads() bool { return true }

func (a *asyncReadMem) ReadAsync(_ context.Context, p []byte, off int64, done blockdev.Completion) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.held = append(a.held, heldRequest{done: done, p: p, off: off})
}

func (a *asyncReadMem) WriteAsync(ctx context.Context, p []byte, off int64, flags blockdev.Flags, done blockdev.Completion) {
	err := a.Mem.WriteAt(ctx, p, off, flags) // p is the engine's until return
	a.mu.Lock()
	defer a.mu.Unlock()
	a.held = append(a.held, heldRequest{done: done, err: err})
}

func (a *asyncReadMem) FlushRequests() {
	a.mu.Lock()
	held := a.held
	a.held, a.spare = a.spare[:0], nil // held and spare never alias
	a.mu.Unlock()
	for i, h := range held {
		err := h.err
		if h.p != nil {
			err = a.Mem.ReadAt(context.Background(), h.p, h.off)
		}
		a.queue <- asyncDone{h.done, err}
		held[i] = heldRequest{}
	}
	a.mu.Lock()
	a.spare = held[:0]
	a.mu.Unlock()
}

var (
	_ blockdev.AsyncReader    = (*asyncReadMem)(nil)
	_ blockdev.RequestFlusher = (*asyncReadMem)(nil)
)

// TestAsyncRead runs the transmission tests again with "disk" served as an
// AsyncReader and AsyncWriter that holds requests until FlushRequests, so
// that the reader starts reads and writes, flushes them before it waits,
// and other goroutines answer them (simple and structured read replies).
func TestAsyncRead(t *testing.T) { rerunTransmissionTests(t, &testAsyncRead) }
