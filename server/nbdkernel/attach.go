package nbdkernel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
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
	// netlink opens the kernel's nbd generic-netlink family; nil, or
	// errNoNetlinkFamily, means the ioctls.
	netlink func() (nlConn, error)
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
	if p.netlink != nil {
		nl, err := p.netlink()
		switch {
		case err == nil:
			defer nl.Close()
			return runNetlink(ctx, nl, sock, info, blockBytes, opts, log)
		case errors.Is(err, errNoNetlinkFamily):
			log.Info("nbdkernel: no nbd netlink family in this kernel; configuring the device with ioctls", "device", opts.Device)
		default:
			return err
		}
	}
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

// statusInterval is how often runNetlink asks the kernel whether the device
// is still connected (nbd-client -d, or a NBD_CMD_DISCONNECT from elsewhere,
// detaches it without telling this process).
const statusInterval = 500 * time.Millisecond

// runNetlink configures the device with NBD_CMD_CONNECT and waits until it
// is detached or ctx is done (then it sends NBD_CMD_DISCONNECT).
func runNetlink(ctx context.Context, nl nlConn, sock *os.File, info ExportInfo, blockBytes uint32, opts Options, log *slog.Logger) error {
	index := deviceIndex(opts.Device)
	timeout := opts.IOTimeout
	if timeout == 0 {
		timeout = DefaultIOTimeout
	}
	timeoutSeconds := uint64((timeout + time.Second - 1) / time.Second)
	if opts.NoIOTimeout {
		timeoutSeconds = 0
	}
	deadConn := opts.DeadConnTimeout
	if deadConn == 0 {
		deadConn = DefaultDeadConnTimeout
	}
	cfg := nlConnect{
		Index:          index,
		SizeBytes:      info.SizeBytes / uint64(blockBytes) * uint64(blockBytes),
		BlockBytes:     uint64(blockBytes),
		TimeoutSeconds: timeoutSeconds,
		DeadConnSecs:   uint64((deadConn + time.Second - 1) / time.Second),
		ServerFlags:    uint64(info.TransmissionFlags),
		SocketFDs:      []uint32{uint32(sock.Fd())},
	}
	attrs, err := cfg.encode()
	if err != nil {
		return err
	}
	if _, err := nl.execute(nlCmdConnect, attrs); err != nil {
		if errors.Is(err, syscall.EBUSY) {
			return fmt.Errorf("nbdkernel: %s is in use (detach it first: nbd-client -d %s): %w", opts.Device, opts.Device, err)
		}
		return fmt.Errorf("nbdkernel: NBD_CMD_CONNECT for %s: %w", opts.Device, err)
	}
	log.Info("nbdkernel: attached through netlink", "device", opts.Device, "export", opts.Export, "addr", opts.Addr,
		"size_bytes", cfg.SizeBytes, "block_bytes", blockBytes, "flags", info.TransmissionFlags,
		"timeout_s", timeoutSeconds, "dead_conn_timeout_s", cfg.DeadConnSecs)
	idx, err := encodeIndex(index)
	if err != nil {
		return err
	}
	tick := time.NewTicker(statusInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			if _, err := nl.execute(nlCmdDisconnect, idx); err != nil {
				log.Warn("nbdkernel: NBD_CMD_DISCONNECT failed", "device", opts.Device, "err", err)
			}
			log.Info("nbdkernel: detached", "device", opts.Device)
			return ctx.Err()
		case <-tick.C:
		}
		replies, err := nl.execute(nlCmdStatus, idx)
		if err != nil || len(replies) == 0 {
			log.Warn("nbdkernel: NBD_CMD_STATUS failed", "device", opts.Device, "err", err)
			continue
		}
		connected, err := decodeStatus(replies[0], index)
		if err != nil {
			log.Warn("nbdkernel: NBD_CMD_STATUS reply", "device", opts.Device, "err", err)
			continue
		}
		if !connected {
			log.Info("nbdkernel: detached", "device", opts.Device)
			return nil
		}
	}
}

// deviceIndex returns N of /dev/nbdN (validated by Options.validate).
func deviceIndex(device string) uint32 {
	n, _ := strconv.ParseUint(strings.TrimPrefix(device, "/dev/nbd"), 10, 32)
	return uint32(n)
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
