//go:build !linux

package nbdkernel

import (
	"log/slog"
	"net"
	"os"
)

// CheckAvailable returns ErrUnsupported: kernel NBD devices exist only on
// Linux.
func CheckAvailable(device string) error { return ErrUnsupported }

func hostPlatform() platform {
	return platform{
		check: CheckAvailable,
		open:  func(string) (kernelDevice, error) { return nil, ErrUnsupported },
		socket: func(net.Conn, *slog.Logger) (*os.File, func(), error) {
			return nil, nil, ErrUnsupported
		},
	}
}

// SocketPair returns ErrUnsupported outside Linux.
func SocketPair() (kernelEnd, serverEnd net.Conn, err error) { return nil, nil, ErrUnsupported }
