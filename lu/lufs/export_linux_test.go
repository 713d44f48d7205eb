package lufs

import "golang.org/x/sys/unix"

func unixFadviseDontNeed(fd int) error { return unix.Fadvise(fd, 0, 0, unix.FADV_DONTNEED) }
