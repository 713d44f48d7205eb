//go:build !windows

package nbd

import "syscall"

// rawSocketWrites says whether FlushReplies may write straight to the
// socket's descriptor (see conn.rawWrite). Go keeps sockets non-blocking
// on Unix, so one write(2) never waits for a client.
const rawSocketWrites = true

// rawSocketWrite writes p to the socket descriptor fd once.
func rawSocketWrite(fd uintptr, p []byte) (int, error) { return syscall.Write(int(fd), p) }
