package main

import "golang.org/x/sys/unix"

// servePlatformErr is nil on Linux, the one system lupool serve runs on.
func servePlatformErr() error { return nil }

// defaultMemoryBudget is half of this machine's RAM: room for the memory
// LUs, the rest for the system, the daemon and the page cache of file LUs.
func defaultMemoryBudget() int64 {
	var si unix.Sysinfo_t
	if err := unix.Sysinfo(&si); err != nil {
		return 0
	}
	return int64(si.Totalram) * int64(si.Unit) / 2
}
