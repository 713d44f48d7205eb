// Command looprtt measures one loopback TCP round trip between two
// processes, the yardstick of issue 5's latency target: it starts itself
// again as an echo server, sends 40-byte messages (the size of a
// replication frame header) one at a time and prints the median round trip
// in microseconds. Both ends are Go programs, like two lupool nodes, and
// separate processes, so the time includes waking the other side.
//
// Usage: looprtt [-n 2000]
package main

import (
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"slices"
	"time"
)

func main() {
	n := flag.Int("n", 2000, "round trips to time (after 200 unmeasured)")
	echo := flag.String("echo", "", "internal: serve echo on this listener file descriptor")
	flag.Parse()
	if *echo != "" {
		serveEcho()
		return
	}
	median, err := run(*n)
	if err != nil {
		fmt.Fprintln(os.Stderr, "looprtt:", err)
		os.Exit(1)
	}
	fmt.Printf("%.1f\n", float64(median.Nanoseconds())/1e3)
}

// serveEcho answers every message on the connection inherited as fd 3.
func serveEcho() {
	c, err := net.FileConn(os.NewFile(3, "conn"))
	if err != nil {
		fmt.Fprintln(os.Stderr, "looprtt echo:", err)
		os.Exit(1)
	}
	_ = c.(*net.TCPConn).SetNoDelay(true)
	buf := make([]byte, 40)
	for {
		if _, err := io.ReadFull(c, buf); err != nil {
			return
		}
		if _, err := c.Write(buf); err != nil {
			return
		}
	}
}

// run times n round trips and returns their median.
func run(n int) (time.Duration, error) {
	if n < 1 {
		return 0, fmt.Errorf("-n %d: give at least 1", n)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	client, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		return 0, err
	}
	defer client.Close()
	server, err := l.Accept()
	if err != nil {
		return 0, err
	}
	f, err := server.(*net.TCPConn).File()
	server.Close()
	if err != nil {
		return 0, err
	}
	self, err := os.Executable()
	if err != nil {
		return 0, err
	}
	cmd := exec.Command(self, "-echo", "3")
	cmd.ExtraFiles = []*os.File{f}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return 0, err
	}
	f.Close()
	defer func() {
		client.Close() // the echo server ends at EOF
		_ = cmd.Wait()
	}()
	_ = client.(*net.TCPConn).SetNoDelay(true)
	msg, buf := make([]byte, 40), make([]byte, 40)
	times := make([]time.Duration, 0, n)
	for i := range n + 200 {
		start := time.Now()
		if _, err := client.Write(msg); err != nil {
			return 0, err
		}
		if _, err := io.ReadFull(client, buf); err != nil {
			return 0, err
		}
		if i >= 200 {
			times = append(times, time.Since(start))
		}
	}
	slices.Sort(times)
	return times[len(times)/2], nil
}
