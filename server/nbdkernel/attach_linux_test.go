//go:build linux

package nbdkernel

import (
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestKernelSocketProxy checks the socket-pair path used for TLS: bytes
// the kernel end writes reach the connection and back, and releasing it
// closes the connection.
func TestKernelSocketProxy(t *testing.T) {
	client, server := net.Pipe()
	defer server.Close()
	f, release, err := kernelSocket(client, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write([]byte("request")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 7)
	_ = server.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(server, buf); err != nil || string(buf) != "request" {
		t.Fatalf("server got %q, %v", buf, err)
	}
	if _, err := server.Write([]byte("reply")); err != nil {
		t.Fatal(err)
	}
	buf = make([]byte, 5)
	if _, err := io.ReadFull(f, buf); err != nil || string(buf) != "reply" {
		t.Fatalf("kernel end got %q, %v", buf, err)
	}
	release()
	if _, err := server.Read(buf); err == nil {
		t.Error("connection still open after release")
	}
}

// TestKernelSocketTCP checks a plain TCP connection is handed over as a
// blocking socket.
func TestKernelSocketTCP(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		c, err := l.Accept()
		if err == nil {
			c.Write([]byte("x"))
			c.Close()
		}
	}()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	f, release, err := kernelSocket(c, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	flags, err := unix.FcntlInt(f.Fd(), unix.F_GETFL, 0)
	if err != nil {
		t.Fatal(err)
	}
	if flags&unix.O_NONBLOCK != 0 {
		t.Error("socket for the kernel is non-blocking")
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		t.Errorf("kernel file is not a socket: mode %#o %v", st.Mode, err)
	}
}
