package paging

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// capIPCLock is CAP_IPC_LOCK's bit in /proc/self/status CapEff.
const capIPCLock = 14

// MakeSwapSafe locks the process's memory and makes it an I/O flusher (see
// SwapSafety). It never fails: what it cannot do is in the Warnings. When
// locking could later fail the process's own memory allocations (a finite
// RLIMIT_MEMLOCK that cannot be raised, without CAP_IPC_LOCK), it does not
// lock at all: a Go process whose heap cannot grow dies.
func MakeSwapSafe() SwapSafety {
	var s SwapSafety
	if err := lockable(); err != nil {
		s.Warnings = append(s.Warnings, "memory not locked: "+err.Error())
	} else if err := unix.Mlockall(unix.MCL_CURRENT | unix.MCL_FUTURE); err != nil {
		s.Warnings = append(s.Warnings, fmt.Sprintf("memory not locked: mlockall: %v (run as root, or give CAP_IPC_LOCK and LimitMEMLOCK=infinity)", err))
	} else {
		s.Locked = true
		// Later mappings are locked as they are touched, not all at once
		// (Linux 4.4); the current ones stay locked and resident.
		_ = unix.Mlockall(unix.MCL_FUTURE | unix.MCL_ONFAULT)
	}
	_, _, errno := syscall.AllThreadsSyscall(syscall.SYS_PRCTL, unix.PR_SET_IO_FLUSHER, 1, 0)
	switch {
	case errno == 0:
		s.IOFlusher, s.IOFlusherThreads = true, "all"
	case errno == syscall.ENOTSUP:
		// With cgo the runtime cannot reach every thread: set it on this
		// one; threads the runtime starts later inherit it from theirs.
		if err := unix.Prctl(unix.PR_SET_IO_FLUSHER, 1, 0, 0, 0); err != nil {
			s.Warnings = append(s.Warnings, ioFlusherWarning(err))
		} else {
			s.IOFlusher, s.IOFlusherThreads = true, "calling thread and its later threads"
		}
	default:
		s.Warnings = append(s.Warnings, ioFlusherWarning(errno))
	}
	return s
}

func ioFlusherWarning(err error) string {
	if errors.Is(err, unix.EINVAL) {
		return "not an I/O flusher: PR_SET_IO_FLUSHER needs Linux 5.6 or later"
	}
	return fmt.Sprintf("not an I/O flusher: prctl(PR_SET_IO_FLUSHER): %v (needs CAP_SYS_RESOURCE: run as root)", err)
}

// lockable says why locking every future mapping could starve the
// process: nil when it holds CAP_IPC_LOCK or RLIMIT_MEMLOCK is (or can be
// raised to) unlimited.
func lockable() error {
	if hasCap(capIPCLock) {
		return nil
	}
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_MEMLOCK, &lim); err != nil {
		return fmt.Errorf("getrlimit(RLIMIT_MEMLOCK): %v", err)
	}
	if lim.Cur == unix.RLIM_INFINITY {
		return nil
	}
	if lim.Max == unix.RLIM_INFINITY {
		lim.Cur = unix.RLIM_INFINITY
		if unix.Setrlimit(unix.RLIMIT_MEMLOCK, &lim) == nil {
			return nil
		}
	}
	return fmt.Errorf("RLIMIT_MEMLOCK is %d bytes and the process lacks CAP_IPC_LOCK: locking would make later allocations fail (run as root, or set LimitMEMLOCK=infinity in the unit)", lim.Cur)
}

// hasCap reports whether capability bit is in the process's effective set.
func hasCap(bit uint) bool {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
			caps, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			return err == nil && caps&(1<<bit) != 0
		}
	}
	return false
}
