package nbd

import (
	"bytes"
	"context"
	"io"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/lu"
	"github.com/lupool/lupool/lu/lufs"
	"github.com/lupool/lupool/server/nbdproto"
)

// The engine tries reads on the reader goroutine only on a TryReader; the
// lu file volume is one.
var _ blockdev.TryReader = (*lu.FileVolume)(nil)

// faultFileExport serves an lu file volume on a FaultFS (over a MemFS) as
// export "file", with the first 2 MiB written with pattern(…, 3).
func faultFileExport(t testing.TB) (Export, *lufs.FaultFS, []byte) {
	t.Helper()
	ffs := lufs.NewFaultFS(lufs.NewMemFS(lufs.MemFSOptions{}))
	v, err := lu.CreateFileFS(ffs, "/file.lu", testSizeBytes)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = v.Close() })
	data := pattern(2<<20, 3)
	if err := v.WriteAt(context.Background(), data, 0, 0); err != nil {
		t.Fatal(err)
	}
	return Export{Name: "file", Device: v}, ffs, data
}

// osFileExport serves an lu file volume on the OS file system as "file".
func osFileExport(t testing.TB) Export {
	t.Helper()
	v, err := lu.CreateFile(filepath.Join(t.TempDir(), "file.lu"), testSizeBytes)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = v.Close() })
	return Export{Name: "file", Device: v}
}

// TestBlockedFileReadDoesNotHoldBackOthers pins that a read waiting for
// the disk (a FaultFS read held at one offset) runs apart from the reader:
// reads whose data is in memory, writes and a flush sent after it on the
// same connection are answered while it waits, and it is answered, with
// its data, once the disk lets it go. Sizes cover the reply-buffer path
// (4 KiB) and the pooled-buffer path (1 MiB).
func TestBlockedFileReadDoesNotHoldBackOthers(t *testing.T) {
	for _, size := range []uint32{4096, 1 << 20} {
		t.Run(byteSize(int(size)), func(t *testing.T) {
			e, ffs, data := faultFileExport(t)
			const blockedOff = 0
			gate := make(chan struct{})
			ffs.SetInjector(lufs.Block(gate, func(ev lufs.Event) bool { return ev.Off == blockedOff }, lufs.OpRead))
			ts := startServer(t, blockdev.Caps{}, nil, e)
			var once sync.Once
			release := func() { once.Do(func() { close(gate) }) }
			t.Cleanup(release) // before Shutdown, which waits for the read
			c := dialRaw(t, ts.addr)
			c.attach("file", false)
			c.request(nbdproto.CmdRead, 0, 1, blockedOff, size, nil) // waits for the disk
			w := pattern(4096, 9)
			for h := uint64(2); h < 40; h++ {
				switch h % 3 {
				case 0:
					c.request(nbdproto.CmdWrite, 0, h, 2<<20+h*4096, 4096, w)
				case 1:
					c.request(nbdproto.CmdRead, 0, h, 4096, size, nil)
				default:
					c.request(nbdproto.CmdFlush, 0, h, 0, 0, nil)
				}
			}
			_ = c.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
			for range 38 {
				h, code, got := c.simpleReply(0)
				if code != 0 {
					t.Fatalf("handle %d: %s", h, errName(code))
				}
				if h == 1 {
					t.Fatal("the blocked read was answered before the disk let it go")
				}
				if h%3 == 1 {
					got = c.read(int(size))
					if !bytes.Equal(got, data[4096:4096+int(size)]) {
						t.Fatalf("handle %d: wrong data", h)
					}
				}
			}
			release()
			h, code, _ := c.simpleReply(0)
			if h != 1 || code != 0 {
				t.Fatalf("handle %d code %s, want the blocked read", h, errName(code))
			}
			if got := c.read(int(size)); !bytes.Equal(got, data[:size]) {
				t.Fatal("blocked read: wrong data")
			}
		})
	}
}

func byteSize(n int) string {
	if n >= 1<<20 {
		return itoa(n>>20) + "MiB"
	}
	return itoa(n>>10) + "KiB"
}

func itoa(n int) string {
	if n == 0 {
		return "0"
	}
	var b []byte
	for ; n > 0; n /= 10 {
		b = append([]byte{byte('0' + n%10)}, b...)
	}
	return string(b)
}

// TestStalledFileClientDoesNotHoldBackOthers pins that a client that
// sends reads and never reads the replies, so that the reader of its
// connection blocks writing them, holds back only itself: another
// connection to the same file volume keeps being answered.
func TestStalledFileClientDoesNotHoldBackOthers(t *testing.T) {
	ts := startServer(t, blockdev.Caps{}, nil, osFileExport(t))
	stalled := dialRaw(t, ts.addr)
	stalled.attach("file", false)
	// 64 MiB of replies, far more than the socket buffers hold.
	sent := make(chan struct{})
	go func() {
		defer close(sent)
		var b [nbdproto.RequestSize]byte
		for h := range uint64(1024) {
			nbdproto.PutRequest(b[:], nbdproto.Request{Type: nbdproto.CmdRead, Handle: h, Offset: h % 64 * 65536, Length: 65536})
			if _, err := stalled.conn.Write(b[:]); err != nil {
				return // the server may stop reading a client that stalls
			}
		}
	}()
	time.Sleep(200 * time.Millisecond) // let the replies back up
	other := dialRaw(t, ts.addr)
	other.attach("file", false)
	_ = other.conn.SetDeadline(time.Now().Add(10 * time.Second))
	w := pattern(65536, 5)
	for i := range uint64(50) {
		if code := other.do(nbdproto.CmdWrite, 0, i*65536, 65536, w); code != 0 {
			t.Fatalf("write: %s", errName(code))
		}
		other.request(nbdproto.CmdRead, 0, 7, i*65536, 65536, nil)
		if _, code, got := other.simpleReply(65536); code != 0 || !bytes.Equal(got, w) {
			t.Fatalf("read: %s", errName(code))
		}
	}
	// The stalled client drains its replies at last and is answered in full.
	go func() { _, _ = io.Copy(io.Discard, stalled.conn) }()
	<-sent
	_ = stalled.conn.(*net.TCPConn).CloseWrite()
}

// TestHotPathAllocationsFileVolume is TestHotPathAllocations on an lu file
// volume on the OS file system: a 4 KiB read (tried on the reader from the
// page cache) and a 4 KiB write (on a worker) allocate nothing.
func TestHotPathAllocationsFileVolume(t *testing.T) {
	ts := startServer(t, blockdev.Caps{}, func(o *Options) { o.Metrics = NewMetrics() }, osFileExport(t))
	c := newBenchClientExport(t, ts.addr, "file", 4096)
	for _, typ := range []uint16{nbdproto.CmdWrite, nbdproto.CmdRead} {
		var err error
		for i := range 200 {
			err = c.roundTrip(typ, uint64(i), uint64(i%64)*4096)
		}
		n := 0
		allocs := testing.AllocsPerRun(500, func() {
			if e := c.roundTrip(typ, 1, uint64(n%64)*4096); e != nil {
				err = e
			}
			n++
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%s: %.2f allocations per 4 KiB request", nbdproto.CommandName(typ), allocs)
		if allocs >= 0.5 {
			t.Errorf("%s: %.2f allocations per 4 KiB request, want 0", nbdproto.CommandName(typ), allocs)
		}
	}
}

// TestFileWritesThatWaitRunApart pins which requests on a file volume the
// reader leaves to workers now that it runs 4 KiB writes itself: a flush
// (fdatasync), a FUA write (RWF_DSYNC) and a write of a partial block
// (which may read the block from the disk first) each wait for the disk
// apart, held here by the FaultFS, while whole-block writes and cached
// reads sent after them on the same connection are answered; each is
// answered once the disk lets it go.
func TestFileWritesThatWaitRunApart(t *testing.T) {
	const heldOff = 3 << 20
	for _, tc := range []struct {
		name   string
		op     lufs.Op
		typ    uint16
		flags  uint16
		length uint32
	}{
		{"flush", lufs.OpSync, nbdproto.CmdFlush, 0, 0},
		{"fua-write", lufs.OpWrite, nbdproto.CmdWrite, nbdproto.CmdFlagFUA, 4096},
		{"partial-block-write", lufs.OpWrite, nbdproto.CmdWrite, 0, 512},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e, ffs, data := faultFileExport(t)
			gate := make(chan struct{})
			ffs.SetInjector(lufs.Block(gate, func(ev lufs.Event) bool {
				return ev.Op == lufs.OpSync || ev.Off == heldOff
			}, tc.op))
			ts := startServer(t, blockdev.Caps{}, nil, e)
			var once sync.Once
			release := func() { once.Do(func() { close(gate) }) }
			t.Cleanup(release) // before Shutdown, which waits for the request
			c := dialRaw(t, ts.addr)
			c.attach("file", false)
			var payload []byte
			off := uint64(0)
			if tc.typ == nbdproto.CmdWrite {
				payload, off = pattern(int(tc.length), 7), heldOff
			}
			c.request(tc.typ, tc.flags, 1, off, tc.length, payload)
			w := pattern(4096, 9)
			for h := uint64(2); h < 22; h++ {
				if h%2 == 0 {
					c.request(nbdproto.CmdWrite, 0, h, 2<<20+h*4096, 4096, w)
				} else {
					c.request(nbdproto.CmdRead, 0, h, 4096, 4096, nil)
				}
			}
			_ = c.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
			for range 20 {
				h, code, _ := c.simpleReply(0)
				if code != 0 {
					t.Fatalf("handle %d: %s", h, errName(code))
				}
				if h == 1 {
					t.Fatal("the held request was answered before the disk let it go")
				}
				if h%2 == 1 {
					if got := c.read(4096); !bytes.Equal(got, data[4096:8192]) {
						t.Fatalf("handle %d: wrong data", h)
					}
				}
			}
			release()
			if h, code, _ := c.simpleReply(0); h != 1 || code != 0 {
				t.Fatalf("handle %d code %s, want the held request", h, errName(code))
			}
		})
	}
}
