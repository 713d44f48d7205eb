package nbd

import (
	"path/filepath"
	"testing"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/lu"
	"github.com/lupool/lupool/server/nbdproto"
)

// BenchmarkFileVolume measures the engine's read and write paths over an
// lu file volume on the OS file system (the data in the page cache), with
// the queue depths of bench/'s fio workloads: 32 for 4 KiB, 8 for larger
// requests. The client preallocates, so the allocations reported are the
// server's.
func BenchmarkFileVolume(b *testing.B) {
	for _, bc := range []struct {
		name        string
		typ         uint16
		size, depth int
	}{
		{"read/4KiB", nbdproto.CmdRead, 4 << 10, 32},
		{"read/64KiB", nbdproto.CmdRead, 64 << 10, 8},
		{"read/1MiB", nbdproto.CmdRead, 1 << 20, 8},
		{"write/4KiB", nbdproto.CmdWrite, 4 << 10, 32},
		{"write/64KiB", nbdproto.CmdWrite, 64 << 10, 8},
		{"write/1MiB", nbdproto.CmdWrite, 1 << 20, 8},
	} {
		b.Run(bc.name, func(b *testing.B) { benchmarkFileVolume(b, bc.typ, bc.size, bc.depth) })
	}
}

func benchmarkFileVolume(b *testing.B, typ uint16, size, depth int) {
	v, err := lu.CreateFile(filepath.Join(b.TempDir(), "bench.lu"), testSizeBytes)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = v.Close() })
	ts := startServer(b, blockdev.Caps{}, func(o *Options) { o.Metrics = NewMetrics() }, Export{Name: "file", Device: v})
	rc := dialRaw(b, ts.addr)
	rc.attach("file", false)
	c := &benchClient{conn: rc.conn, data: make([]byte, size)}
	slots := uint64(testSizeBytes / size)
	// Lay the whole volume down first, so that reads hit written pages.
	for i := range slots {
		if err := c.roundTrip(nbdproto.CmdWrite, i, i*uint64(size)); err != nil {
			b.Fatal(err)
		}
	}
	b.SetBytes(int64(size))
	b.ReportAllocs()
	b.ResetTimer()
	errc := make(chan error, 1)
	sent := make(chan struct{}, depth)
	go func() {
		for i := range b.N {
			sent <- struct{}{}
			if err := c.send(typ, uint64(i), uint64(i)*7%slots*uint64(size)); err != nil {
				errc <- err
				return
			}
		}
		errc <- nil
	}()
	for range b.N {
		if err := c.recv(typ); err != nil {
			b.Fatal(err)
		}
		<-sent
	}
	if err := <-errc; err != nil {
		b.Fatal(err)
	}
}
