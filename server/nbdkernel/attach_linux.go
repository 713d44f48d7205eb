//go:build linux

package nbdkernel

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"sync"

	"github.com/mdlayher/genetlink"
	"golang.org/x/sys/unix"
)

// nbdMajor is the block major number of the kernel nbd driver.
const nbdMajor = 43

// CheckAvailable reports whether device can be attached on this machine. It
// returns, checking in this order, ErrInvalidOptions when device is not
// /dev/nbdN, ErrModuleNotLoaded when the nbd module is not loaded, ErrNotRoot
// when the process is not root, and ErrNoDevice when the node is missing or
// not an nbd block device.
func CheckAvailable(device string) error {
	return host{sysModuleDir: "/sys/module", euid: os.Geteuid()}.check(device)
}

// host is what CheckAvailable looks at, replaceable in tests.
type host struct {
	sysModuleDir string // where the kernel lists loaded modules
	euid         int
}

func (h host) check(device string) error {
	if !isDevicePath(device) {
		return fmt.Errorf("%w: device %q is not /dev/nbdN", ErrInvalidOptions, device)
	}
	if _, err := os.Stat(h.sysModuleDir + "/nbd"); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return ErrModuleNotLoaded
		}
		return fmt.Errorf("nbdkernel: look for the nbd module: %w", err)
	}
	if h.euid != 0 {
		return fmt.Errorf("%w (running as uid %d)", ErrNotRoot, h.euid)
	}
	var st unix.Stat_t
	if err := unix.Stat(device, &st); err != nil {
		return fmt.Errorf("%w: %s: %w", ErrNoDevice, device, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK || unix.Major(st.Rdev) != nbdMajor {
		return fmt.Errorf("%w: %s is not an nbd block device", ErrNoDevice, device)
	}
	return nil
}

func hostPlatform() platform {
	return platform{check: CheckAvailable, open: openDevice, socket: kernelSocket, netlink: dialNetlink}
}

// fileDevice is an open /dev/nbdX.
type fileDevice struct{ f *os.File }

var _ kernelDevice = fileDevice{}

func openDevice(path string) (kernelDevice, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	return fileDevice{f: f}, nil
}

func (d fileDevice) ioctl(req uint, arg uintptr) error {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, d.f.Fd(), uintptr(req), arg)
	if errno != 0 {
		return errno
	}
	return nil
}

func (d fileDevice) Close() error { return d.f.Close() }

// kernelSocket returns a blocking socket for the kernel. A plain TCP or
// unix connection (a SocketPair end) is duplicated as is; anything else (TLS) gets a socket pair
// whose other end a goroutine pair copies to and from conn.
func kernelSocket(conn net.Conn, log *slog.Logger) (*os.File, func(), error) {
	if tc, ok := conn.(interface{ File() (*os.File, error) }); ok {
		f, err := tc.File()
		if err != nil {
			return nil, nil, fmt.Errorf("nbdkernel: socket file: %w", err)
		}
		if err := unix.SetNonblock(int(f.Fd()), false); err != nil {
			f.Close()
			return nil, nil, fmt.Errorf("nbdkernel: socket blocking mode: %w", err)
		}
		return f, func() { f.Close() }, nil
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("nbdkernel: socketpair: %w", err)
	}
	kernelEnd := os.NewFile(uintptr(fds[0]), "nbd-kernel")
	proxyFile := os.NewFile(uintptr(fds[1]), "nbd-proxy")
	proxyEnd, err := net.FileConn(proxyFile)
	proxyFile.Close()
	if err != nil {
		kernelEnd.Close()
		return nil, nil, fmt.Errorf("nbdkernel: socketpair conn: %w", err)
	}
	var wg sync.WaitGroup
	pipe := func(dst, src net.Conn, dir string) {
		defer wg.Done()
		if _, err := io.Copy(dst, src); err != nil {
			log.Debug("nbdkernel: proxy stopped", "direction", dir, "err", err)
		}
		// Either side ending ends both, so that the kernel sees the
		// server go away and the server sees the kernel detach.
		dst.Close()
		src.Close()
	}
	wg.Add(2)
	go pipe(conn, proxyEnd, "kernel->server")
	go pipe(proxyEnd, conn, "server->kernel")
	release := func() {
		kernelEnd.Close()
		proxyEnd.Close()
		conn.Close()
		wg.Wait()
	}
	return kernelEnd, release, nil
}

// SocketPair returns the two ends of a connected unix stream socket pair:
// one for Options.Dial (the kernel's), one for a server.
func SocketPair() (kernelEnd, serverEnd net.Conn, err error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("nbdkernel: socketpair: %w", err)
	}
	var conns [2]net.Conn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "nbd-socketpair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			for _, c := range conns[:i] {
				c.Close()
			}
			if i == 0 {
				unix.Close(fds[1])
			}
			return nil, nil, fmt.Errorf("nbdkernel: socketpair conn: %w", err)
		}
		conns[i] = c
	}
	return conns[0], conns[1], nil
}

// dialNetlink opens a generic-netlink socket and resolves the kernel's nbd
// family; errNoNetlinkFamily when the kernel has none.
func dialNetlink() (nlConn, error) {
	c, err := genetlink.Dial(nil)
	if err != nil {
		return nil, fmt.Errorf("nbdkernel: generic netlink socket: %w", err)
	}
	fam, err := c.GetFamily(nlFamilyName)
	if err != nil {
		c.Close()
		if errors.Is(err, os.ErrNotExist) {
			return nil, errNoNetlinkFamily
		}
		return nil, fmt.Errorf("nbdkernel: look up the nbd netlink family: %w", err)
	}
	return &genlConn{c: c, family: fam}, nil
}
