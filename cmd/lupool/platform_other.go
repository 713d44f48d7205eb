//go:build !linux

package main

import "errors"

// errServeNeedsLinux is what lupool serve says outside Linux. The CLI's
// client commands (lu, pool, node, cluster) work on any system; serving
// needs what only Linux has: thin LU files (fallocate punch-hole and
// zero-range, SEEK_DATA/SEEK_HOLE, pwritev2 RWF_DSYNC) and the kernel NBD
// device of lupool attach.
var errServeNeedsLinux = errors.New("lupool serve needs Linux (sparse files with punch-hole, SEEK_DATA/SEEK_HOLE, pwritev2); this build is for the CLI")

func servePlatformErr() error { return errServeNeedsLinux }

// defaultMemoryBudget is no budget where lupool serve does not run.
func defaultMemoryBudget() int64 { return 0 }
