package peerlink

import (
	"context"
	"io"
	"net"
	"testing"
)

// BenchmarkEcho4KiB: 4 KiB written and echoed back, one at a time, over a
// Dial'd mutual-TLS conn (routed as raft) and over plain TCP on loopback.
func BenchmarkEcho4KiB(b *testing.B) {
	const size = 4 << 10
	echo := func(c net.Conn) {
		defer c.Close()
		io.Copy(c, c)
	}
	run := func(b *testing.B, c net.Conn) {
		buf, back := make([]byte, size), make([]byte, size) // zeros: raft's first byte
		b.SetBytes(size)
		b.ReportAllocs()
		for b.Loop() {
			if _, err := c.Write(buf); err != nil {
				b.Fatal(err)
			}
			if _, err := io.ReadFull(c, back); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.Run("tcp", func(b *testing.B) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		defer ln.Close()
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go echo(c)
			}
		}()
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		run(b, c)
	})
	b.Run("mtls", func(b *testing.B) {
		f := newFixture(b)
		a, srv := f.listen(b, "A", nil), f.listen(b, "B", nil)
		go func() {
			for {
				c, err := srv.Raft().Accept()
				if err != nil {
					return
				}
				go echo(c)
			}
		}()
		c, err := a.Dial(context.Background(), srv.Addr(), "B")
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		run(b, c)
	})
}
