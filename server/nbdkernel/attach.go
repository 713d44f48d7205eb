package nbdkernel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
)

// The kernel nbd ioctl requests, _IO(0xab, n) from <linux/nbd.h>. They are
// part of the kernel ABI and must never change.
const (
	nbdSetSock       uint = 0xab00
	nbdSetBlockSize  uint = 0xab01
	nbdDoIt          uint = 0xab03
	nbdClearSock     uint = 0xab04
	nbdClearQueue    uint = 0xab05
	nbdSetSizeBlocks uint = 0xab07
	nbdDisconnect    uint = 0xab08
	nbdSetTimeout    uint = 0xab09
	nbdSetFlags      uint = 0xab0a
)

// ioctlName names a request for errors and logs.
func ioctlName(req uint) string {
	switch req {
	case nbdSetSock:
		return "NBD_SET_SOCK"
	case nbdSetBlockSize:
		return "NBD_SET_BLKSIZE"
	case nbdDoIt:
		return "NBD_DO_IT"
	case nbdClearSock:
		return "NBD_CLEAR_SOCK"
	case nbdClearQueue:
		return "NBD_CLEAR_QUE"
	case nbdSetSizeBlocks:
		return "NBD_SET_SIZE_BLOCKS"
	case nbdDisconnect:
		return "NBD_DISCONNECT"
	case nbdSetTimeout:
		return "NBD_SET_TIMEOUT"
	case nbdSetFlags:
		return "NBD_SET_FLAGS"
	}
	return fmt.Sprintf("ioctl %#x", req)
}

// kernelDevice is an open /dev/nbdX. ioctl may be called from two
// goroutines at once: NBD_DISCONNECT while NBD_DO_IT blocks (the kernel
// drops its config lock while DO_IT waits).
type kernelDevice interface {
	ioctl(req uint, arg uintptr) error
	Close() error
}

// platform is the operating-system part of Attach, replaced in tests.
type platform struct {
	// check is CheckAvailable.
	check func(device string) error
	// open opens the device node.
	open func(device string) (kernelDevice, error)
	// socket returns a blocking socket file for the kernel that carries
	// conn's traffic, and a function that releases everything it made.
	socket func(conn net.Conn, log *slog.Logger) (*os.File, func(), error)
}

// Attach connects to opts.Addr, negotiates opts.Export and attaches it to
// opts.Device. It blocks while the kernel serves the device, and returns nil
// when the device was detached (nbd-client -d, or the server closed the
// connection), or ctx's error after detaching the device when ctx is done.
// It returns ErrModuleNotLoaded, ErrNoDevice, ErrNotRoot or ErrUnsupported
// when the machine cannot attach at all, and ErrInvalidOptions for bad
// options, before touching the network.
func Attach(ctx context.Context, opts Options) error {
	return attach(ctx, opts, hostPlatform())
}

func attach(ctx context.Context, opts Options, p platform) error {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if err := opts.validate(); err != nil {
		return err
	}
	if err := p.check(opts.Device); err != nil {
		return err
	}
	dial := opts.Dial
	if dial == nil {
		dial = func(ctx context.Context) (net.Conn, error) {
			var dialer net.Dialer
			return dialer.DialContext(ctx, "tcp", opts.Addr)
		}
	}
	conn, err := dial(ctx)
	if err != nil {
		return fmt.Errorf("nbdkernel: dial %s: %w", opts.Addr, err)
	}
	defer conn.Close()
	c, info, err := Negotiate(ctx, conn, opts.Export, opts.TLSConfig)
	if err != nil {
		return err
	}
	blockBytes := chooseBlockSize(info)
	if info.SizeBytes < uint64(blockBytes) {
		return fmt.Errorf("%w: export %q of %d bytes is smaller than one block", ErrRefused, opts.Export, info.SizeBytes)
	}
	if info.SizeBytes%uint64(blockBytes) != 0 {
		log.Warn("nbdkernel: export size is not a multiple of the block size; the tail is not visible",
			"size_bytes", info.SizeBytes, "block_bytes", blockBytes)
	}
	sock, release, err := p.socket(c, log)
	if err != nil {
		return err
	}
	defer release()
	dev, err := p.open(opts.Device)
	if err != nil {
		return fmt.Errorf("nbdkernel: open %s: %w", opts.Device, err)
	}
	defer dev.Close()
	return run(ctx, dev, sock, info, blockBytes, opts, log)
}

// run configures the device and blocks in NBD_DO_IT.
func run(ctx context.Context, dev kernelDevice, sock *os.File, info ExportInfo, blockBytes uint32, opts Options, log *slog.Logger) error {
	timeout := opts.IOTimeout
	if timeout == 0 {
		timeout = DefaultIOTimeout
	}
	timeoutSeconds := uintptr((timeout + 999_999_999) / 1_000_000_000)
	if opts.NoIOTimeout {
		timeoutSeconds = 0
	}
	steps := []struct {
		req uint
		arg uintptr
	}{
		{nbdClearSock, 0},
		{nbdSetBlockSize, uintptr(blockBytes)},
		{nbdSetSizeBlocks, uintptr(info.SizeBytes / uint64(blockBytes))},
		{nbdSetFlags, uintptr(info.TransmissionFlags)},
		{nbdSetTimeout, timeoutSeconds},
		{nbdSetSock, sock.Fd()},
	}
	for _, s := range steps {
		if err := dev.ioctl(s.req, s.arg); err != nil {
			_ = dev.ioctl(nbdClearSock, 0)
			return fmt.Errorf("nbdkernel: %s on %s: %w", ioctlName(s.req), opts.Device, err)
		}
	}
	log.Info("nbdkernel: attached", "device", opts.Device, "export", opts.Export, "addr", opts.Addr,
		"size_bytes", info.SizeBytes, "block_bytes", blockBytes, "flags", info.TransmissionFlags)
	stop := context.AfterFunc(ctx, func() {
		if err := dev.ioctl(nbdDisconnect, 0); err != nil {
			log.Warn("nbdkernel: NBD_DISCONNECT failed", "device", opts.Device, "err", err)
		}
	})
	doItErr := dev.ioctl(nbdDoIt, 0)
	stop()
	_ = dev.ioctl(nbdClearQueue, 0)
	_ = dev.ioctl(nbdClearSock, 0)
	log.Info("nbdkernel: detached", "device", opts.Device, "err", doItErr)
	if err := ctx.Err(); err != nil {
		return err
	}
	if doItErr != nil && !errors.Is(doItErr, errDetached) {
		return fmt.Errorf("nbdkernel: NBD_DO_IT on %s: %w", opts.Device, doItErr)
	}
	return nil
}

// errDetached is what a kernelDevice returns from NBD_DO_IT when the device
// was disconnected on request (the kernel reports it as an error on some
// versions).
var errDetached = errors.New("nbdkernel: detached")

// chooseBlockSize picks the kernel block size: the server's preferred size
// when the kernel accepts it (a power of two in [512, 4096]) and it divides
// the export, else 4096 or 512, whichever divides the export and respects
// the server's minimum.
func chooseBlockSize(info ExportInfo) uint32 {
	ok := func(b uint32) bool {
		return b >= 512 && b <= 4096 && b&(b-1) == 0 &&
			b >= info.MinimumBlockBytes && info.SizeBytes%uint64(b) == 0
	}
	for _, b := range []uint32{info.PreferredBlockBytes, 4096, 1024, 512} {
		if ok(b) {
			return b
		}
	}
	if m := info.MinimumBlockBytes; m > 512 && m <= 4096 && m&(m-1) == 0 {
		return m
	}
	return 512
}
