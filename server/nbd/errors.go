package nbd

import (
	"context"
	"errors"
	"syscall"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/server/nbdproto"
)

// errorTable is the one map from device errors to NBD error codes, in the
// order they are tried (errors.Is). Anything not listed is EIO. Out-of-range
// errors depend on the command and are handled in errorCode. It is built on
// the error path only, so it is not package state.
func errorTable() [20]errorMapping {
	return [...]errorMapping{
		{blockdev.ErrReadOnly, nbdproto.EPERM},
		{syscall.EROFS, nbdproto.EPERM},
		{syscall.EPERM, nbdproto.EPERM},
		{syscall.EACCES, nbdproto.EPERM},
		{blockdev.ErrNoSpace, nbdproto.ENOSPC},
		{syscall.ENOSPC, nbdproto.ENOSPC},
		{syscall.EDQUOT, nbdproto.ENOSPC},
		{syscall.EFBIG, nbdproto.ENOSPC},
		{blockdev.ErrInvalid, nbdproto.EINVAL},
		{syscall.EINVAL, nbdproto.EINVAL},
		{blockdev.ErrNotSupported, nbdproto.ENOTSUP},
		{syscall.EOPNOTSUPP, nbdproto.ENOTSUP},
		{syscall.ENOTSUP, nbdproto.ENOTSUP},
		{blockdev.ErrShutdown, nbdproto.ESHUTDOWN},
		{syscall.ESHUTDOWN, nbdproto.ESHUTDOWN},
		{context.Canceled, nbdproto.ESHUTDOWN},
		{syscall.EOVERFLOW, nbdproto.EOVERFLOW},
		{syscall.ENOMEM, nbdproto.ENOMEM},
		{blockdev.ErrIO, nbdproto.EIO},
		{syscall.EIO, nbdproto.EIO},
	}
}

type errorMapping struct {
	err  error
	code uint32
}

// errorCode maps err from a device call for command cmd to an NBD error
// code (0 for nil).
func errorCode(cmd uint16, err error) uint32 {
	if err == nil {
		return 0
	}
	if errors.Is(err, blockdev.ErrOutOfRange) {
		return outOfRangeCode(cmd)
	}
	for _, e := range errorTable() {
		if errors.Is(err, e.err) {
			return e.code
		}
	}
	return nbdproto.EIO
}

// isWriteCommand reports whether cmd changes data.
func isWriteCommand(cmd uint16) bool {
	return cmd == nbdproto.CmdWrite || cmd == nbdproto.CmdTrim || cmd == nbdproto.CmdWriteZeroes
}

// outOfRangeCode is the answer to a request beyond the end of the device:
// ENOSPC for WRITE and WRITE_ZEROES, EINVAL for the others (read, trim,
// cache, block status), as the NBD spec recommends.
func outOfRangeCode(cmd uint16) uint32 {
	if cmd == nbdproto.CmdWrite || cmd == nbdproto.CmdWriteZeroes {
		return nbdproto.ENOSPC
	}
	return nbdproto.EINVAL
}
