//go:build !linux

package bench

import "syscall"

// childAttr has nothing to add outside Linux: there is no parent-death
// signal, so only the runner's own Stop ends its servers.
func childAttr() *syscall.SysProcAttr { return nil }
