//go:build !linux

package lufs

import (
	"errors"
	"fmt"
	"os"
)

// ErrNeedsLinux is what the operating-system FS returns outside Linux.
// Thin volumes rest on Linux calls (fallocate with FALLOC_FL_PUNCH_HOLE and
// FALLOC_FL_ZERO_RANGE, lseek with SEEK_DATA/SEEK_HOLE, pwritev2 with
// RWF_DSYNC) that other systems lack or spell differently, so a non-Linux
// build is for the CLI only and stores no LU data. It wraps
// errors.ErrUnsupported.
var ErrNeedsLinux = fmt.Errorf("lufs: LU volumes on the operating-system file system need Linux (sparse files with punch-hole, SEEK_DATA/SEEK_HOLE): %w", errors.ErrUnsupported)

// OS returns the FS of the operating system. Outside Linux every call fails
// with ErrNeedsLinux; MemFS still works.
func OS() FS { return otherFS{} }

type otherFS struct{}

var _ FS = otherFS{}

func needsLinux(op, path string) error {
	return &os.PathError{Op: op, Path: path, Err: ErrNeedsLinux}
}

func (otherFS) OpenFile(name string, flag int, perm os.FileMode) (File, error) {
	return nil, needsLinux("open", name)
}
func (otherFS) Remove(name string) error                     { return needsLinux("remove", name) }
func (otherFS) Rename(oldName, _ string) error               { return needsLinux("rename", oldName) }
func (otherFS) Stat(name string) (os.FileInfo, error)        { return nil, needsLinux("stat", name) }
func (otherFS) ReadDir(name string) ([]string, error)        { return nil, needsLinux("readdir", name) }
func (otherFS) MkdirAll(name string, perm os.FileMode) error { return needsLinux("mkdir", name) }
func (otherFS) SyncDir(name string) error                    { return needsLinux("sync", name) }
func (otherFS) Statfs(path string) (Statfs, error)           { return Statfs{}, needsLinux("statfs", path) }
