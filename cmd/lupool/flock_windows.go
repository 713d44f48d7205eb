package main

import (
	"errors"
	"os"
)

// lockExclusive is never reached on Windows: lupool serve refuses to start
// there (servePlatformErr), and only serve locks its data directory.
func lockExclusive(*os.File) error { return errors.ErrUnsupported }
