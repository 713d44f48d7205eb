// Package nbdkernel attaches an NBD export to a Linux kernel NBD device
// (/dev/nbdX), as nbd-client does: it performs the client side of the
// fixed-newstyle handshake in user space, then hands the connected socket to
// the kernel and waits while the kernel serves I/O.
//
// # Sequence
//
//	dial Addr ─► Negotiate (STARTTLS?, NBD_OPT_GO, else NBD_OPT_EXPORT_NAME)
//	netlink family "nbd" present (Linux 4.12+):
//	    NBD_CMD_CONNECT {index, size, block size, flags, timeout,
//	                     dead-connection timeout, socket}
//	    NBD_CMD_STATUS every 500 ms until the device is disconnected;
//	    NBD_CMD_DISCONNECT when the caller's context ends
//	else the ioctls:
//	    open Device ─► NBD_CLEAR_SOCK ─► NBD_SET_BLKSIZE ─► NBD_SET_SIZE_BLOCKS
//	                ─► NBD_SET_FLAGS ─► NBD_SET_TIMEOUT ─► NBD_SET_SOCK
//	    NBD_DO_IT (blocks until NBD_DISCONNECT or the socket dies)
//	    NBD_CLEAR_QUE ─► NBD_CLEAR_SOCK ─► close
//
// Netlink is preferred: it is the interface the kernel extends, it needs no
// thread parked in NBD_DO_IT, and it carries a dead-connection timeout
// (Options.DeadConnTimeout, default 120 s): should the process serving the
// socket die, the kernel holds the device's requests that long instead of
// failing them. Netlink arguments the kernel would refuse with a bare
// EINVAL are checked first and refused with a message that names them.
//
// The kernel speaks the transmission phase with simple replies only, so
// Negotiate never asks for structured replies or metadata contexts. The
// kernel cannot speak TLS; with a TLS configuration the kernel gets one end
// of a socket pair and a goroutine copies between the other end and the TLS
// connection, as nbd-client's TLS proxy does.
//
// Attaching needs Linux, root and the nbd module (`modprobe nbd`).
// CheckAvailable says clearly which of them is missing.
//
// # With `lupool attach`
//
// `lupool attach LU /dev/nbdX` gives Options.Dial one end of a socket pair
// (SocketPair) and serves the other end with its endpoint
// (server/endpoint), which keeps the connection to the pool and moves
// between nodes; with Options.NoIOTimeout the kernel never fails a request
// that waits for a failover, and it never sees its socket die while
// `lupool attach` runs.
//
// # Why not github.com/pojntfx/go-nbd
//
// The project's first design named go-nbd for this hand-off. Its client
// (pkg/client, read at commit 264e7d6) never sets the transmission flags
// on the device (no NBD_SET_FLAGS), so the kernel believes the server
// supports neither FLUSH nor TRIM and sends neither: no write barrier
// would ever reach the pool, and discards would be lost. It also sends
// client flags 0 (not fixed newstyle), fails on any NBD_INFO type it does
// not know instead of skipping it, has no TLS, and hands the socket to the
// kernel before negotiating. This package is small, sets the export's
// flags, and is tested against the engine and nbdkit, so lupool keeps it.
package nbdkernel

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"time"

	"github.com/lupool/lupool/server/nbdproto"
)

// Sentinel errors.
var (
	// ErrModuleNotLoaded is returned by CheckAvailable and Attach when the
	// kernel has no nbd driver loaded.
	ErrModuleNotLoaded = errors.New("nbdkernel: kernel NBD module not loaded: run `modprobe nbd` as root, or use nbd-client")
	// ErrNoDevice is returned by CheckAvailable and Attach when the nbd
	// module is loaded but the device node is missing or not a block device.
	ErrNoDevice = errors.New("nbdkernel: NBD device node missing or not a block device (modprobe nbd nbds_max=N creates /dev/nbd0..N-1)")
	// ErrNotRoot is returned by CheckAvailable and Attach when the process is
	// not running as root (the nbd ioctls need CAP_SYS_ADMIN).
	ErrNotRoot = errors.New("nbdkernel: attaching an NBD device needs root")
	// ErrUnsupported is returned by CheckAvailable and Attach on operating
	// systems other than Linux.
	ErrUnsupported = errors.New("nbdkernel: kernel NBD devices exist only on Linux")
	// ErrInvalidOptions is returned by Attach and CheckAvailable for a
	// missing address or a device path that is not /dev/nbdN.
	ErrInvalidOptions = errors.New("nbdkernel: invalid options")
	// ErrProtocol is returned by Negotiate when the server breaks the
	// handshake protocol (bad magic, not fixed newstyle, malformed reply).
	ErrProtocol = errors.New("nbdkernel: NBD protocol error")
	// ErrUnknownExport is returned by Negotiate when the server has no
	// export of the requested name.
	ErrUnknownExport = errors.New("nbdkernel: server has no such export")
	// ErrTLSRequired is returned by Negotiate when the server requires TLS
	// and no TLS configuration was given.
	ErrTLSRequired = errors.New("nbdkernel: server requires TLS")
	// ErrRefused is returned by Negotiate when the server refuses an option
	// with any other error reply.
	ErrRefused = errors.New("nbdkernel: server refused the export")
)

// Options say what to attach where.
type Options struct {
	// Addr is the server's host:port. Required.
	Addr string
	// Export is the export name; "" is the server's default export.
	Export string
	// Device is the kernel device path, /dev/nbdN. Required.
	Device string
	// TLSConfig, if not nil, makes the client upgrade the connection with
	// NBD_OPT_STARTTLS before choosing the export.
	TLSConfig *tls.Config
	// Logger receives progress and errors; nil discards them.
	Logger *slog.Logger
	// IOTimeout is passed to NBD_SET_TIMEOUT: the kernel fails a request
	// the server has not answered in that time. 0 means DefaultIOTimeout.
	IOTimeout time.Duration
	// NoIOTimeout sets the kernel's request timeout to 0 (never fail a
	// request; the kernel only logs a stuck one): right when the server
	// end is `lupool attach`'s endpoint, which waits for the pool itself.
	NoIOTimeout bool
	// DeadConnTimeout is how long the kernel holds requests when the
	// device's socket is gone before it fails them (netlink only; the
	// ioctl interface has none). 0 means DefaultDeadConnTimeout.
	DeadConnTimeout time.Duration
	// Dial, if not nil, replaces dialling Addr (which may then be empty):
	// `lupool attach` returns one end of a socket pair (SocketPair) whose
	// other end its endpoint serves, so that the kernel never sees a dead
	// socket when a node goes away.
	Dial func(ctx context.Context) (net.Conn, error)
}

// DefaultIOTimeout is the kernel request timeout when Options.IOTimeout is 0.
const DefaultIOTimeout = 30 * time.Second

// Limits on what a server may send during the handshake.
const (
	// maxOptionReplyBytes bounds one option reply payload the client
	// accepts (the longest legitimate one is an NBD_REP_INFO with a
	// 4096-byte name or description).
	maxOptionReplyBytes = 2*nbdproto.MaxStringBytes + 64
	// maxOptionReplies bounds the replies to one NBD_OPT_GO.
	maxOptionReplies = 64
	// handshakeTimeout bounds the whole handshake when ctx has no deadline.
	handshakeTimeout = 30 * time.Second
)

// isDevicePath reports whether path has the form /dev/nbdN.
func isDevicePath(path string) bool {
	n, ok := strings.CutPrefix(path, "/dev/nbd")
	if !ok || n == "" || len(n) > 6 {
		return false
	}
	for _, c := range n {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

func (o *Options) validate() error {
	if o.Addr == "" && o.Dial == nil {
		return fmt.Errorf("%w: no server address", ErrInvalidOptions)
	}
	if !isDevicePath(o.Device) {
		return fmt.Errorf("%w: device %q is not /dev/nbdN", ErrInvalidOptions, o.Device)
	}
	if len(o.Export) > nbdproto.MaxStringBytes {
		return fmt.Errorf("%w: export name of %d bytes is longer than %d", ErrInvalidOptions, len(o.Export), nbdproto.MaxStringBytes)
	}
	if o.IOTimeout < 0 {
		return fmt.Errorf("%w: negative IOTimeout", ErrInvalidOptions)
	}
	if o.DeadConnTimeout < 0 {
		return fmt.Errorf("%w: negative DeadConnTimeout", ErrInvalidOptions)
	}
	if o.NoIOTimeout && o.IOTimeout != 0 {
		return fmt.Errorf("%w: IOTimeout with NoIOTimeout", ErrInvalidOptions)
	}
	return nil
}

// ExportInfo is what the server said about the export during the handshake.
type ExportInfo struct {
	// SizeBytes is the export size.
	SizeBytes uint64
	// TransmissionFlags are the NBD transmission flags (nbdproto.TxFlag*).
	TransmissionFlags uint16
	// Block size constraints; zero when the server sent none.
	MinimumBlockBytes, PreferredBlockBytes, MaximumBlockBytes uint32
	// LUID is the export's stable identity from a lupool server
	// (nbdproto.InfoLUID); "" from other servers.
	LUID string
	// ExportName is true when the legacy NBD_OPT_EXPORT_NAME was used
	// because the server does not know NBD_OPT_GO.
	ExportName bool
}

// Negotiate performs the client side of the fixed-newstyle handshake on
// conn for export, upgrading to TLS first when tlsConfig is not nil. It
// returns the connection to use for the transmission phase (conn itself, or
// the TLS connection wrapping it) and what the server said about the export.
// It asks for no structured replies and no metadata context, as the kernel
// client cannot use them. ctx bounds the handshake (30 s when it has no
// deadline); a deadline set on conn is cleared on success. On error the
// caller still owns and closes conn.
func Negotiate(ctx context.Context, conn net.Conn, export string, tlsConfig *tls.Config) (net.Conn, ExportInfo, error) {
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(handshakeTimeout)
	}
	if err := conn.SetDeadline(deadline); err != nil {
		return nil, ExportInfo{}, err
	}
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	c, info, err := negotiate(ctx, conn, export, tlsConfig)
	if err != nil {
		if ctx.Err() != nil {
			return nil, ExportInfo{}, fmt.Errorf("nbdkernel: handshake: %w", ctx.Err())
		}
		return nil, ExportInfo{}, err
	}
	if !stop() {
		return nil, ExportInfo{}, fmt.Errorf("nbdkernel: handshake: %w", ctx.Err())
	}
	if err := c.SetDeadline(time.Time{}); err != nil {
		return nil, ExportInfo{}, err
	}
	return c, info, nil
}

func negotiate(ctx context.Context, conn net.Conn, export string, tlsConfig *tls.Config) (net.Conn, ExportInfo, error) {
	var greeting [nbdproto.GreetingSize]byte
	if _, err := io.ReadFull(conn, greeting[:]); err != nil {
		return nil, ExportInfo{}, fmt.Errorf("nbdkernel: read greeting: %w", err)
	}
	be := binary.BigEndian
	if be.Uint64(greeting[0:8]) != nbdproto.NBDMagic {
		return nil, ExportInfo{}, fmt.Errorf("%w: greeting magic %#x is not NBDMAGIC", ErrProtocol, greeting[0:8])
	}
	if be.Uint64(greeting[8:16]) != nbdproto.IHaveOpt {
		return nil, ExportInfo{}, fmt.Errorf("%w: old-style server (no IHAVEOPT); lupool needs fixed newstyle", ErrProtocol)
	}
	serverFlags := be.Uint16(greeting[16:18])
	if serverFlags&nbdproto.FlagFixedNewstyle == 0 {
		return nil, ExportInfo{}, fmt.Errorf("%w: server does not offer fixed newstyle", ErrProtocol)
	}
	clientFlags := nbdproto.ClientFlagFixedNewstyle
	noZeroes := serverFlags&nbdproto.FlagNoZeroes != 0
	if noZeroes {
		clientFlags |= nbdproto.ClientFlagNoZeroes
	}
	if err := writeAll(conn, be.AppendUint32(nil, clientFlags)); err != nil {
		return nil, ExportInfo{}, fmt.Errorf("nbdkernel: send client flags: %w", err)
	}
	if tlsConfig != nil {
		tc, err := startTLS(ctx, conn, tlsConfig)
		if err != nil {
			return nil, ExportInfo{}, err
		}
		conn = tc
	}
	info, err := optGo(conn, export)
	if errors.Is(err, errGoUnsupported) {
		info, err = optExportName(conn, export, noZeroes)
	}
	if err != nil {
		return nil, ExportInfo{}, err
	}
	return conn, info, nil
}

// errGoUnsupported is optGo's internal signal to fall back to EXPORT_NAME.
var errGoUnsupported = errors.New("nbdkernel: NBD_OPT_GO unsupported")

func startTLS(ctx context.Context, conn net.Conn, cfg *tls.Config) (net.Conn, error) {
	if err := sendOption(conn, nbdproto.OptStartTLS, nil); err != nil {
		return nil, err
	}
	rep, payload, err := readOptionReply(conn, nbdproto.OptStartTLS)
	if err != nil {
		return nil, err
	}
	if rep.Type != nbdproto.RepAck {
		return nil, replyError("NBD_OPT_STARTTLS", rep, payload)
	}
	tc := tls.Client(conn, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		return nil, fmt.Errorf("nbdkernel: TLS handshake: %w", err)
	}
	return tc, nil
}

// optGo sends NBD_OPT_GO asking for the block size, and reads the replies up
// to the final ACK.
func optGo(conn net.Conn, export string) (ExportInfo, error) {
	be := binary.BigEndian
	payload := nbdproto.AppendString(nil, export)
	payload = be.AppendUint16(payload, 2)
	payload = be.AppendUint16(payload, nbdproto.InfoBlockSize)
	payload = be.AppendUint16(payload, nbdproto.InfoLUID)
	if err := sendOption(conn, nbdproto.OptGo, payload); err != nil {
		return ExportInfo{}, err
	}
	var info ExportInfo
	haveExport := false
	for range maxOptionReplies {
		rep, p, err := readOptionReply(conn, nbdproto.OptGo)
		if err != nil {
			return ExportInfo{}, err
		}
		switch {
		case rep.Type == nbdproto.RepAck:
			if !haveExport {
				return ExportInfo{}, fmt.Errorf("%w: NBD_OPT_GO acknowledged without NBD_INFO_EXPORT", ErrProtocol)
			}
			return info, nil
		case rep.Type == nbdproto.RepInfo:
			if err := parseInfo(p, &info, &haveExport); err != nil {
				return ExportInfo{}, err
			}
		case rep.Type == nbdproto.RepErrUnsup:
			return ExportInfo{}, errGoUnsupported
		case rep.Type&nbdproto.RepFlagError != 0:
			return ExportInfo{}, replyError("NBD_OPT_GO", rep, p)
		default:
			// Unknown non-error replies may be ignored (proto.md).
		}
	}
	return ExportInfo{}, fmt.Errorf("%w: more than %d replies to NBD_OPT_GO", ErrProtocol, maxOptionReplies)
}

func parseInfo(p []byte, info *ExportInfo, haveExport *bool) error {
	be := binary.BigEndian
	if len(p) < 2 {
		return fmt.Errorf("%w: NBD_REP_INFO of %d bytes", ErrProtocol, len(p))
	}
	switch be.Uint16(p[0:2]) {
	case nbdproto.InfoExport:
		if len(p) != nbdproto.InfoExportSize {
			return fmt.Errorf("%w: NBD_INFO_EXPORT of %d bytes", ErrProtocol, len(p))
		}
		info.SizeBytes = be.Uint64(p[2:10])
		info.TransmissionFlags = be.Uint16(p[10:12])
		*haveExport = true
	case nbdproto.InfoBlockSize:
		if len(p) != nbdproto.InfoBlockSizeSize {
			return fmt.Errorf("%w: NBD_INFO_BLOCK_SIZE of %d bytes", ErrProtocol, len(p))
		}
		info.MinimumBlockBytes = be.Uint32(p[2:6])
		info.PreferredBlockBytes = be.Uint32(p[6:10])
		info.MaximumBlockBytes = be.Uint32(p[10:14])
	case nbdproto.InfoLUID:
		if len(p)-2 > nbdproto.MaxStringBytes {
			return fmt.Errorf("%w: LU id of %d bytes", ErrProtocol, len(p)-2)
		}
		info.LUID = string(p[2:])
	}
	return nil
}

// optExportName uses the legacy NBD_OPT_EXPORT_NAME, whose reply has no
// header and whose failure is a closed connection.
func optExportName(conn net.Conn, export string, noZeroes bool) (ExportInfo, error) {
	if err := sendOption(conn, nbdproto.OptExportName, []byte(export)); err != nil {
		return ExportInfo{}, err
	}
	n := nbdproto.ExportNameReplySize
	if !noZeroes {
		n += nbdproto.ExportNameZeroPadSize
	}
	buf := make([]byte, n)
	if _, err := io.ReadFull(conn, buf); err != nil {
		if errors.Is(err, io.EOF) {
			return ExportInfo{}, fmt.Errorf("%w: %q (server closed the connection after NBD_OPT_EXPORT_NAME)", ErrUnknownExport, export)
		}
		return ExportInfo{}, fmt.Errorf("nbdkernel: read NBD_OPT_EXPORT_NAME reply: %w", err)
	}
	be := binary.BigEndian
	return ExportInfo{
		SizeBytes:         be.Uint64(buf[0:8]),
		TransmissionFlags: be.Uint16(buf[8:10]),
		ExportName:        true,
	}, nil
}

func sendOption(conn net.Conn, option uint32, payload []byte) error {
	buf := make([]byte, nbdproto.OptionHeaderSize, nbdproto.OptionHeaderSize+len(payload))
	nbdproto.PutOptionHeader(buf, nbdproto.OptionHeader{Option: option, Length: uint32(len(payload))})
	if err := writeAll(conn, append(buf, payload...)); err != nil {
		return fmt.Errorf("nbdkernel: send option %d: %w", option, err)
	}
	return nil
}

func readOptionReply(conn net.Conn, option uint32) (nbdproto.OptionReply, []byte, error) {
	var hdr [nbdproto.OptionReplyHeaderSize]byte
	if _, err := io.ReadFull(conn, hdr[:]); err != nil {
		return nbdproto.OptionReply{}, nil, fmt.Errorf("nbdkernel: read reply to option %d: %w", option, err)
	}
	rep, err := nbdproto.ParseOptionReply(hdr[:])
	if err != nil {
		return nbdproto.OptionReply{}, nil, fmt.Errorf("%w: option reply: %w", ErrProtocol, err)
	}
	if rep.Option != option {
		return nbdproto.OptionReply{}, nil, fmt.Errorf("%w: reply for option %d, want %d", ErrProtocol, rep.Option, option)
	}
	if rep.Length > maxOptionReplyBytes {
		return nbdproto.OptionReply{}, nil, fmt.Errorf("%w: option reply of %d bytes exceeds %d", ErrProtocol, rep.Length, maxOptionReplyBytes)
	}
	payload := make([]byte, rep.Length)
	if _, err := io.ReadFull(conn, payload); err != nil {
		return nbdproto.OptionReply{}, nil, fmt.Errorf("nbdkernel: read reply payload to option %d: %w", option, err)
	}
	return rep, payload, nil
}

// replyError turns an error reply into an error carrying the server's
// message (printable part only).
func replyError(what string, rep nbdproto.OptionReply, payload []byte) error {
	msg := make([]rune, 0, len(payload))
	for _, r := range string(payload) {
		if r >= ' ' && r != 0x7f {
			msg = append(msg, r)
		}
	}
	var base error
	switch rep.Type {
	case nbdproto.RepErrUnknown:
		base = ErrUnknownExport
	case nbdproto.RepErrTLSReqd:
		base = ErrTLSRequired
	default:
		base = ErrRefused
	}
	return fmt.Errorf("%w: %s: reply %#x: %q", base, what, rep.Type, string(msg))
}

func writeAll(conn net.Conn, b []byte) error {
	_, err := conn.Write(b)
	return err
}
