//go:build !windows

package main

import (
	"os"

	"golang.org/x/sys/unix"
)

// lockExclusive takes a non-blocking exclusive flock on f; it fails at
// once when another process holds it.
func lockExclusive(f *os.File) error {
	return unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
}
