package nbdkernel

import (
	"errors"
	"fmt"
	"time"

	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/netlink"
)

// The kernel's generic-netlink interface to nbd (<linux/nbd-netlink.h>,
// Linux 4.12 and later). Attach prefers it to the ioctls: a device
// configured through netlink has a dead-connection timeout (the kernel
// holds requests that long, instead of failing them, when every socket is
// gone, and waits for NBD_CMD_RECONFIGURE with a new one), and no thread
// has to block in NBD_DO_IT. Where the family is missing (an older kernel)
// Attach falls back to the ioctls.
//
// The names and numbers below are part of the kernel ABI and must never
// change. We encode the messages with github.com/mdlayher/genetlink and
// github.com/mdlayher/netlink (well-kept, used by many Go network tools)
// rather than by hand.
const (
	nlFamilyName = "nbd"
	nlVersion    = 1

	nlCmdConnect    = 1
	nlCmdDisconnect = 2
	nlCmdStatus     = 5

	nlAttrIndex           = 1 // u32
	nlAttrSizeBytes       = 2 // u64
	nlAttrBlockSizeBytes  = 3 // u64
	nlAttrTimeout         = 4 // u64, seconds
	nlAttrServerFlags     = 5 // u64
	nlAttrClientFlags     = 6 // u64
	nlAttrSockets         = 7 // nested: nlSockItem { nlSockFD }
	nlAttrDeadConnTimeout = 8 // u64, seconds
	nlAttrDeviceList      = 9 // nested: nlDeviceItem { nlDeviceIndex, nlDeviceConnected }

	nlSockItem = 1
	nlSockFD   = 1 // u32

	nlDeviceItem      = 1
	nlDeviceIndex     = 1 // u32
	nlDeviceConnected = 2 // u8
)

// Limits the kernel applies (drivers/block/nbd.c), checked here first so
// that a bad value gets a message saying what to fix instead of EINVAL.
const (
	// nlMaxIndex: device indexes are ints; /dev/nbdN paths allow 6 digits.
	nlMaxIndex = 999_999
	// nlMaxSockets: one socket per connection; we never need more than a
	// few, and the kernel allocates per socket.
	nlMaxSockets = 16
)

// DefaultDeadConnTimeout is how long the kernel holds requests when every
// socket of a netlink-configured device is gone, waiting for a new one,
// before it fails them: longer than the worst failover (a few seconds) and
// than a restart of `lupool attach`.
const DefaultDeadConnTimeout = 120 * time.Second

// errNoNetlinkFamily says the kernel has no nbd generic-netlink family:
// the module is not loaded, or the kernel predates the interface.
var errNoNetlinkFamily = errors.New("nbdkernel: the kernel has no nbd netlink family")

// nlConnect is what NBD_CMD_CONNECT carries.
type nlConnect struct {
	Index          uint32
	SizeBytes      uint64
	BlockBytes     uint64
	TimeoutSeconds uint64 // 0: the kernel never times a request out
	DeadConnSecs   uint64
	ServerFlags    uint64 // the export's transmission flags
	SocketFDs      []uint32
}

func (c nlConnect) validate() error {
	switch {
	case c.Index > nlMaxIndex:
		return fmt.Errorf("%w: device index %d above %d", ErrInvalidOptions, c.Index, nlMaxIndex)
	case c.BlockBytes < 512 || c.BlockBytes > 4096 || c.BlockBytes&(c.BlockBytes-1) != 0:
		return fmt.Errorf("%w: block size %d is not a power of two in [512, 4096]", ErrInvalidOptions, c.BlockBytes)
	case c.SizeBytes < c.BlockBytes:
		return fmt.Errorf("%w: size %d is smaller than one block of %d", ErrInvalidOptions, c.SizeBytes, c.BlockBytes)
	case len(c.SocketFDs) == 0:
		return fmt.Errorf("%w: no socket to hand the kernel", ErrInvalidOptions)
	case len(c.SocketFDs) > nlMaxSockets:
		return fmt.Errorf("%w: %d sockets, at most %d", ErrInvalidOptions, len(c.SocketFDs), nlMaxSockets)
	case c.DeadConnSecs == 0:
		return fmt.Errorf("%w: a dead-connection timeout of 0 fails every request the moment a socket closes", ErrInvalidOptions)
	}
	return nil
}

// encode returns the attributes of NBD_CMD_CONNECT.
func (c nlConnect) encode() ([]byte, error) {
	if err := c.validate(); err != nil {
		return nil, err
	}
	ae := netlink.NewAttributeEncoder()
	ae.Uint32(nlAttrIndex, c.Index)
	ae.Uint64(nlAttrSizeBytes, c.SizeBytes)
	ae.Uint64(nlAttrBlockSizeBytes, c.BlockBytes)
	ae.Uint64(nlAttrTimeout, c.TimeoutSeconds)
	ae.Uint64(nlAttrServerFlags, c.ServerFlags)
	ae.Uint64(nlAttrClientFlags, 0)
	ae.Uint64(nlAttrDeadConnTimeout, c.DeadConnSecs)
	ae.Nested(nlAttrSockets, func(ne *netlink.AttributeEncoder) error {
		for _, fd := range c.SocketFDs {
			ne.Nested(nlSockItem, func(se *netlink.AttributeEncoder) error {
				se.Uint32(nlSockFD, fd)
				return nil
			})
		}
		return nil
	})
	return ae.Encode()
}

// decodeConnect is the kernel's side of encode, for twins and tests: it
// refuses what nbd_genl_connect refuses (no size, no sockets).
func decodeConnect(b []byte) (nlConnect, error) {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return nlConnect{}, err
	}
	var c nlConnect
	var haveSize, haveIndex bool
	for ad.Next() {
		switch ad.Type() {
		case nlAttrIndex:
			c.Index, haveIndex = ad.Uint32(), true
		case nlAttrSizeBytes:
			c.SizeBytes, haveSize = ad.Uint64(), true
		case nlAttrBlockSizeBytes:
			c.BlockBytes = ad.Uint64()
		case nlAttrTimeout:
			c.TimeoutSeconds = ad.Uint64()
		case nlAttrServerFlags:
			c.ServerFlags = ad.Uint64()
		case nlAttrDeadConnTimeout:
			c.DeadConnSecs = ad.Uint64()
		case nlAttrSockets:
			ad.Nested(func(nd *netlink.AttributeDecoder) error {
				for nd.Next() {
					if nd.Type() != nlSockItem {
						return fmt.Errorf("socket list holds attribute %d", nd.Type())
					}
					nd.Nested(func(sd *netlink.AttributeDecoder) error {
						for sd.Next() {
							if sd.Type() == nlSockFD {
								c.SocketFDs = append(c.SocketFDs, sd.Uint32())
							}
						}
						return sd.Err()
					})
				}
				return nd.Err()
			})
		}
	}
	if err := ad.Err(); err != nil {
		return nlConnect{}, err
	}
	if !haveSize || !haveIndex || len(c.SocketFDs) == 0 {
		return nlConnect{}, fmt.Errorf("connect without size, index or sockets: %+v", c)
	}
	return c, nil
}

// encodeIndex returns the attributes of a command about one device.
func encodeIndex(index uint32) ([]byte, error) {
	ae := netlink.NewAttributeEncoder()
	ae.Uint32(nlAttrIndex, index)
	return ae.Encode()
}

// decodeStatus finds whether device index is connected in the reply to
// NBD_CMD_STATUS.
func decodeStatus(b []byte, index uint32) (connected bool, err error) {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return false, err
	}
	found := false
	for ad.Next() {
		if ad.Type() != nlAttrDeviceList {
			continue
		}
		ad.Nested(func(ld *netlink.AttributeDecoder) error {
			for ld.Next() {
				ld.Nested(func(dd *netlink.AttributeDecoder) error {
					var idx uint32
					var conn, haveIdx bool
					for dd.Next() {
						switch dd.Type() {
						case nlDeviceIndex:
							idx, haveIdx = dd.Uint32(), true
						case nlDeviceConnected:
							conn = dd.Uint8() != 0
						}
					}
					if haveIdx && idx == index {
						found, connected = true, conn
					}
					return dd.Err()
				})
			}
			return ld.Err()
		})
	}
	if err := ad.Err(); err != nil {
		return false, err
	}
	if !found {
		return false, fmt.Errorf("nbdkernel: the kernel's status names no device %d", index)
	}
	return connected, nil
}

// nlConn is a generic-netlink connection to the nbd family; the Linux one
// is genlConn, tests use a twin of the kernel's side.
type nlConn interface {
	// execute sends cmd with attrs and returns the attributes of the
	// replies.
	execute(cmd uint8, attrs []byte) ([][]byte, error)
	Close() error
}

// genlConn is nlConn over a real generic-netlink socket.
type genlConn struct {
	c      *genetlink.Conn
	family genetlink.Family
}

func (g *genlConn) execute(cmd uint8, attrs []byte) ([][]byte, error) {
	msgs, err := g.c.Execute(genetlink.Message{
		Header: genetlink.Header{Command: cmd, Version: nlVersion},
		Data:   attrs,
	}, g.family.ID, netlink.Request|netlink.Acknowledge)
	if err != nil {
		return nil, err
	}
	out := make([][]byte, 0, len(msgs))
	for _, m := range msgs {
		out = append(out, m.Data)
	}
	return out, nil
}

func (g *genlConn) Close() error { return g.c.Close() }
