package blockdev_test

import (
	"testing"

	"github.com/lupool/lupool/blockdev"
)

func TestCheckRange(t *testing.T) {
	for _, c := range []struct {
		off, length, size int64
		want              error
	}{
		{0, 0, 0, nil}, {0, 10, 10, nil}, {10, 0, 10, nil},
		{11, 0, 10, blockdev.ErrOutOfRange}, {5, 6, 10, blockdev.ErrOutOfRange},
		{-1, 1, 10, blockdev.ErrInvalid}, {1, -1, 10, blockdev.ErrInvalid},
		{1 << 62, 1 << 62, 1 << 62, blockdev.ErrOutOfRange},
		{1<<63 - 1, 1<<63 - 1, 1<<63 - 1, blockdev.ErrOutOfRange},
	} {
		if got := blockdev.CheckRange(c.off, c.length, c.size); got != c.want {
			t.Errorf("CheckRange(%d,%d,%d) = %v, want %v", c.off, c.length, c.size, got, c.want)
		}
	}
}
