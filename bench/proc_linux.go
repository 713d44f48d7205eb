package bench

import "syscall"

// childAttr makes the kernel send SIGTERM to a child server if the runner
// dies without stopping it.
func childAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
}
