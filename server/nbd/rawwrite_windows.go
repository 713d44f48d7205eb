package nbd

import "errors"

// rawSocketWrites is false on Windows: a socket handle is not a
// non-blocking descriptor there, so FlushReplies always leaves replies to
// the replier goroutine. Windows builds are for the CLI; nothing here is
// tuned for serving.
const rawSocketWrites = false

func rawSocketWrite(uintptr, []byte) (int, error) {
	return 0, errors.ErrUnsupported
}
