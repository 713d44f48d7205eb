// Package nbdproto is the NBD wire format: magic numbers, option, reply,
// command and flag codes, and fixed-size header encoders and decoders. It
// follows the NBD protocol document (NetworkBlockDevice/nbd, doc/proto.md)
// for the fixed-newstyle handshake and the transmission phase with simple and
// structured replies. Extended headers are not implemented.
//
// Every integer on the wire is big-endian. Every constant in this package is
// part of the wire format and must never change.
//
// # Handshake (fixed newstyle)
//
// The server greets first:
//
//	+--------------------+--------------------+----------------+
//	| NBDMAGIC (8)       | IHAVEOPT (8)       | hs flags (2)   |
//	+--------------------+--------------------+----------------+
//
// The client answers with its flags:
//
//	+------------------+
//	| client flags (4) |
//	+------------------+
//
// Then the client sends options, each:
//
//	+--------------------+-------------+-------------+------------------+
//	| IHAVEOPT (8)       | option (4)  | length (4)  | data (length)    |
//	+--------------------+-------------+-------------+------------------+
//
// and the server answers each option with one or more replies:
//
//	+--------------------+-------------+-------------+-------------+-----------------+
//	| OptReplyMagic (8)  | option (4)  | type (4)    | length (4)  | data (length)   |
//	+--------------------+-------------+-------------+-------------+-----------------+
//
// NBD_OPT_EXPORT_NAME has no reply header; the server answers with
//
//	+-------------+-------------------+------------------------------------+
//	| size (8)    | tx flags (2)      | 124 zero bytes (unless NO_ZEROES)  |
//	+-------------+-------------------+------------------------------------+
//
// Payloads of NBD_OPT_GO and NBD_OPT_INFO:
//
//	+-----------------+-------------+--------------+---------------------+
//	| name length (4) | name (n)    | info count (2)| info types (2 each)|
//	+-----------------+-------------+--------------+---------------------+
//
// NBD_REP_INFO payloads start with the info type (2):
//
//	NBD_INFO_EXPORT:      type (2) | size (8) | tx flags (2)
//	NBD_INFO_NAME:        type (2) | name (rest)
//	NBD_INFO_DESCRIPTION: type (2) | description (rest)
//	NBD_INFO_BLOCK_SIZE:  type (2) | minimum (4) | preferred (4) | maximum (4)
//
// NBD_REP_SERVER (answer to NBD_OPT_LIST): name length (4) | name | description (rest).
//
// NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT:
//
//	+-----------------+----------+-----------------+-----------------------------------+
//	| name length (4) | name (n) | query count (4) | per query: length (4) | query (l) |
//	+-----------------+----------+-----------------+-----------------------------------+
//
// NBD_REP_META_CONTEXT: context id (4) | context name (rest).
//
// # Transmission
//
// Request (28 bytes), followed by length bytes of payload for NBD_CMD_WRITE:
//
//	+-----------------+-----------+----------+------------+------------+------------+
//	| RequestMagic(4) | flags (2) | type (2) | handle (8) | offset (8) | length (4) |
//	+-----------------+-----------+----------+------------+------------+------------+
//
// Simple reply (16 bytes), followed by the data of a successful NBD_CMD_READ:
//
//	+---------------------+-----------+------------+
//	| SimpleReplyMagic(4) | error (4) | handle (8) |
//	+---------------------+-----------+------------+
//
// Structured reply chunk (20 bytes header), followed by length bytes:
//
//	+-------------------------+-----------+----------+------------+------------+
//	| StructuredReplyMagic(4) | flags (2) | type (2) | handle (8) | length (4) |
//	+-------------------------+-----------+----------+------------+------------+
//
// Chunk payloads:
//
//	NBD_REPLY_TYPE_OFFSET_DATA:  offset (8) | data (length-8)
//	NBD_REPLY_TYPE_OFFSET_HOLE:  offset (8) | hole size (4)
//	NBD_REPLY_TYPE_BLOCK_STATUS: context id (4) | per extent: length (4) | status flags (4)
//	NBD_REPLY_TYPE_ERROR:        error (4) | message length (2) | message
//	NBD_REPLY_TYPE_ERROR_OFFSET: error (4) | message length (2) | message | offset (8)
package nbdproto

import (
	"encoding/binary"
	"errors"
)

// Magic numbers. Part of the wire format.
const (
	NBDMagic             uint64 = 0x4e42444d41474943 // "NBDMAGIC"
	IHaveOpt             uint64 = 0x49484156454f5054 // "IHAVEOPT"
	OptReplyMagic        uint64 = 0x0003e889045565a9
	RequestMagic         uint32 = 0x25609513
	SimpleReplyMagic     uint32 = 0x67446698
	StructuredReplyMagic uint32 = 0x668e33ef
)

// Handshake flags sent by the server (16 bits). Part of the wire format.
const (
	FlagFixedNewstyle uint16 = 1 << 0
	FlagNoZeroes      uint16 = 1 << 1
)

// Client flags (32 bits). Part of the wire format.
const (
	ClientFlagFixedNewstyle uint32 = 1 << 0
	ClientFlagNoZeroes      uint32 = 1 << 1
)

// Option codes. Part of the wire format.
const (
	OptExportName      uint32 = 1
	OptAbort           uint32 = 2
	OptList            uint32 = 3
	OptPeekExport      uint32 = 4
	OptStartTLS        uint32 = 5
	OptInfo            uint32 = 6
	OptGo              uint32 = 7
	OptStructuredReply uint32 = 8
	OptListMetaContext uint32 = 9
	OptSetMetaContext  uint32 = 10
	OptExtendedHeaders uint32 = 11
)

// Option reply types. Part of the wire format.
const (
	RepAck         uint32 = 1
	RepServer      uint32 = 2
	RepInfo        uint32 = 3
	RepMetaContext uint32 = 4

	RepFlagError        uint32 = 1 << 31
	RepErrUnsup         uint32 = RepFlagError | 1
	RepErrPolicy        uint32 = RepFlagError | 2
	RepErrInvalid       uint32 = RepFlagError | 3
	RepErrPlatform      uint32 = RepFlagError | 4
	RepErrTLSReqd       uint32 = RepFlagError | 5
	RepErrUnknown       uint32 = RepFlagError | 6
	RepErrShutdown      uint32 = RepFlagError | 7
	RepErrBlockSizeReqd uint32 = RepFlagError | 8
	RepErrTooBig        uint32 = RepFlagError | 9
	RepErrExtHeaderReqd uint32 = RepFlagError | 10
)

// Info types in NBD_OPT_INFO/GO requests and NBD_REP_INFO replies. Part of
// the wire format.
const (
	InfoExport      uint16 = 0
	InfoName        uint16 = 1
	InfoDescription uint16 = 2
	InfoBlockSize   uint16 = 3
	// InfoLUID is lupool's own info type (not in the NBD spec; chosen far
	// from the spec's small numbers): the payload after the type is the
	// export's stable identity, an opaque string of at most MaxStringBytes
	// bytes. A lupool server sends it only to a client that lists it in
	// NBD_OPT_GO/INFO, so stock clients never see it; `lupool attach`
	// asks for it and checks, on every reconnect, that it reached the
	// same LU and not a new one that took its name.
	InfoLUID uint16 = 0x4c55 // "LU"
)

// Transmission flags (16 bits). Part of the wire format.
const (
	TxFlagHasFlags         uint16 = 1 << 0
	TxFlagReadOnly         uint16 = 1 << 1
	TxFlagSendFlush        uint16 = 1 << 2
	TxFlagSendFUA          uint16 = 1 << 3
	TxFlagRotational       uint16 = 1 << 4
	TxFlagSendTrim         uint16 = 1 << 5
	TxFlagSendWriteZeroes  uint16 = 1 << 6
	TxFlagSendDF           uint16 = 1 << 7
	TxFlagCanMultiConn     uint16 = 1 << 8
	TxFlagSendResize       uint16 = 1 << 9
	TxFlagSendCache        uint16 = 1 << 10
	TxFlagSendFastZero     uint16 = 1 << 11
	TxFlagBlockStatPayload uint16 = 1 << 12
)

// Commands. Part of the wire format.
const (
	CmdRead        uint16 = 0
	CmdWrite       uint16 = 1
	CmdDisc        uint16 = 2
	CmdFlush       uint16 = 3
	CmdTrim        uint16 = 4
	CmdCache       uint16 = 5
	CmdWriteZeroes uint16 = 6
	CmdBlockStatus uint16 = 7
	CmdResize      uint16 = 8
)

// Command flags (16 bits). Part of the wire format.
const (
	CmdFlagFUA        uint16 = 1 << 0
	CmdFlagNoHole     uint16 = 1 << 1
	CmdFlagDF         uint16 = 1 << 2
	CmdFlagReqOne     uint16 = 1 << 3
	CmdFlagFastZero   uint16 = 1 << 4
	CmdFlagPayloadLen uint16 = 1 << 5
)

// Structured reply chunk flags and types. Part of the wire format.
const (
	ReplyFlagDone uint16 = 1 << 0

	ReplyTypeNone           uint16 = 0
	ReplyTypeOffsetData     uint16 = 1
	ReplyTypeOffsetHole     uint16 = 2
	ReplyTypeBlockStatus    uint16 = 5
	ReplyTypeBlockStatusExt uint16 = 6
	ReplyTypeError          uint16 = 1<<15 | 1
	ReplyTypeErrorOffset    uint16 = 1<<15 | 2
)

// Error codes carried in replies. They are Linux errno values whatever the
// platform. Part of the wire format.
const (
	EPERM     uint32 = 1
	EIO       uint32 = 5
	ENOMEM    uint32 = 12
	EINVAL    uint32 = 22
	ENOSPC    uint32 = 28
	EOVERFLOW uint32 = 75
	ENOTSUP   uint32 = 95
	ESHUTDOWN uint32 = 108
)

// ContextBaseAllocation is the one metadata context lupool serves.
const ContextBaseAllocation = "base:allocation"

// Allocation status bits of base:allocation. Part of the wire format.
const (
	StateHole uint32 = 1 << 0
	StateZero uint32 = 1 << 1
)

// Sizes of fixed headers in bytes. Part of the wire format.
const (
	GreetingSize          = 8 + 8 + 2
	ClientFlagsSize       = 4
	OptionHeaderSize      = 8 + 4 + 4
	OptionReplyHeaderSize = 8 + 4 + 4 + 4
	ExportNameReplySize   = 8 + 2 // followed by ExportNameZeroPadSize zeros unless NO_ZEROES
	ExportNameZeroPadSize = 124
	RequestSize           = 4 + 2 + 2 + 8 + 8 + 4
	SimpleReplySize       = 4 + 4 + 8
	StructuredReplySize   = 4 + 2 + 2 + 8 + 4
	InfoExportSize        = 2 + 8 + 2
	InfoBlockSizeSize     = 2 + 4 + 4 + 4
	OffsetDataHeaderSize  = 8
	OffsetHoleSize        = 8 + 4
	ErrorChunkHeaderSize  = 4 + 2
	BlockStatusDescSize   = 4 + 4
)

// Limits from the protocol document.
const (
	// MaxStringBytes is the longest name, description or query string
	// (NBD_MAX_STRING in the reference implementation).
	MaxStringBytes = 4096
)

// ErrShort is returned by the Parse functions when the input is shorter than
// the structure it should hold.
var ErrShort = errors.New("nbdproto: short buffer")

// ErrBadMagic is returned by ParseRequest and ParseOptionHeader when the
// magic number is wrong.
var ErrBadMagic = errors.New("nbdproto: bad magic")

// ErrMalformed is returned by the option payload parsers when lengths inside
// the payload do not add up.
var ErrMalformed = errors.New("nbdproto: malformed option payload")

var be = binary.BigEndian

// Request is a decoded transmission request header.
type Request struct {
	Flags  uint16
	Type   uint16
	Handle uint64
	Offset uint64
	Length uint32
}

// ParseRequest decodes a request header from b, which must hold at least
// RequestSize bytes. It returns ErrShort or ErrBadMagic; it does not judge
// the command, flags or range.
func ParseRequest(b []byte) (Request, error) {
	if len(b) < RequestSize {
		return Request{}, ErrShort
	}
	if be.Uint32(b[0:4]) != RequestMagic {
		return Request{}, ErrBadMagic
	}
	return Request{
		Flags:  be.Uint16(b[4:6]),
		Type:   be.Uint16(b[6:8]),
		Handle: be.Uint64(b[8:16]),
		Offset: be.Uint64(b[16:24]),
		Length: be.Uint32(b[24:28]),
	}, nil
}

// PutRequest encodes r into b[:RequestSize] (for clients and tests).
func PutRequest(b []byte, r Request) {
	_ = b[RequestSize-1]
	be.PutUint32(b[0:4], RequestMagic)
	be.PutUint16(b[4:6], r.Flags)
	be.PutUint16(b[6:8], r.Type)
	be.PutUint64(b[8:16], r.Handle)
	be.PutUint64(b[16:24], r.Offset)
	be.PutUint32(b[24:28], r.Length)
}

// PutSimpleReply encodes a simple reply header into b[:SimpleReplySize].
func PutSimpleReply(b []byte, errCode uint32, handle uint64) {
	_ = b[SimpleReplySize-1]
	be.PutUint32(b[0:4], SimpleReplyMagic)
	be.PutUint32(b[4:8], errCode)
	be.PutUint64(b[8:16], handle)
}

// SimpleReply is a decoded simple reply header.
type SimpleReply struct {
	Error  uint32
	Handle uint64
}

// ParseSimpleReply decodes a simple reply header (for clients and tests).
func ParseSimpleReply(b []byte) (SimpleReply, error) {
	if len(b) < SimpleReplySize {
		return SimpleReply{}, ErrShort
	}
	if be.Uint32(b[0:4]) != SimpleReplyMagic {
		return SimpleReply{}, ErrBadMagic
	}
	return SimpleReply{Error: be.Uint32(b[4:8]), Handle: be.Uint64(b[8:16])}, nil
}

// StructuredReply is a decoded structured reply chunk header.
type StructuredReply struct {
	Flags  uint16
	Type   uint16
	Handle uint64
	Length uint32
}

// PutStructuredReply encodes a chunk header into b[:StructuredReplySize].
func PutStructuredReply(b []byte, r StructuredReply) {
	_ = b[StructuredReplySize-1]
	be.PutUint32(b[0:4], StructuredReplyMagic)
	be.PutUint16(b[4:6], r.Flags)
	be.PutUint16(b[6:8], r.Type)
	be.PutUint64(b[8:16], r.Handle)
	be.PutUint32(b[16:20], r.Length)
}

// ParseStructuredReply decodes a chunk header (for clients and tests).
func ParseStructuredReply(b []byte) (StructuredReply, error) {
	if len(b) < StructuredReplySize {
		return StructuredReply{}, ErrShort
	}
	if be.Uint32(b[0:4]) != StructuredReplyMagic {
		return StructuredReply{}, ErrBadMagic
	}
	return StructuredReply{
		Flags:  be.Uint16(b[4:6]),
		Type:   be.Uint16(b[6:8]),
		Handle: be.Uint64(b[8:16]),
		Length: be.Uint32(b[16:20]),
	}, nil
}

// PutGreeting encodes the server greeting into b[:GreetingSize].
func PutGreeting(b []byte, flags uint16) {
	_ = b[GreetingSize-1]
	be.PutUint64(b[0:8], NBDMagic)
	be.PutUint64(b[8:16], IHaveOpt)
	be.PutUint16(b[16:18], flags)
}

// OptionHeader is a decoded option request header.
type OptionHeader struct {
	Option uint32
	Length uint32
}

// ParseOptionHeader decodes an option header from b[:OptionHeaderSize].
func ParseOptionHeader(b []byte) (OptionHeader, error) {
	if len(b) < OptionHeaderSize {
		return OptionHeader{}, ErrShort
	}
	if be.Uint64(b[0:8]) != IHaveOpt {
		return OptionHeader{}, ErrBadMagic
	}
	return OptionHeader{Option: be.Uint32(b[8:12]), Length: be.Uint32(b[12:16])}, nil
}

// PutOptionHeader encodes an option header (for clients and tests).
func PutOptionHeader(b []byte, h OptionHeader) {
	_ = b[OptionHeaderSize-1]
	be.PutUint64(b[0:8], IHaveOpt)
	be.PutUint32(b[8:12], h.Option)
	be.PutUint32(b[12:16], h.Length)
}

// OptionReply is a decoded option reply header.
type OptionReply struct {
	Option uint32
	Type   uint32
	Length uint32
}

// PutOptionReply encodes an option reply header into
// b[:OptionReplyHeaderSize].
func PutOptionReply(b []byte, r OptionReply) {
	_ = b[OptionReplyHeaderSize-1]
	be.PutUint64(b[0:8], OptReplyMagic)
	be.PutUint32(b[8:12], r.Option)
	be.PutUint32(b[12:16], r.Type)
	be.PutUint32(b[16:20], r.Length)
}

// ParseOptionReply decodes an option reply header (for clients and tests).
func ParseOptionReply(b []byte) (OptionReply, error) {
	if len(b) < OptionReplyHeaderSize {
		return OptionReply{}, ErrShort
	}
	if be.Uint64(b[0:8]) != OptReplyMagic {
		return OptionReply{}, ErrBadMagic
	}
	return OptionReply{Option: be.Uint32(b[8:12]), Type: be.Uint32(b[12:16]), Length: be.Uint32(b[16:20])}, nil
}

// InfoRequest is the decoded payload of NBD_OPT_GO and NBD_OPT_INFO.
type InfoRequest struct {
	Name  string
	Infos []uint16
}

// ParseInfoRequest decodes the payload of NBD_OPT_GO or NBD_OPT_INFO. It
// returns ErrMalformed when lengths do not match the payload exactly or the
// name is longer than MaxStringBytes.
func ParseInfoRequest(p []byte) (InfoRequest, error) {
	name, rest, err := takeString(p)
	if err != nil {
		return InfoRequest{}, err
	}
	if len(rest) < 2 {
		return InfoRequest{}, ErrMalformed
	}
	n := int(be.Uint16(rest[0:2]))
	rest = rest[2:]
	if len(rest) != 2*n {
		return InfoRequest{}, ErrMalformed
	}
	r := InfoRequest{Name: name, Infos: make([]uint16, n)}
	for i := range n {
		r.Infos[i] = be.Uint16(rest[2*i:])
	}
	return r, nil
}

// MetaContextRequest is the decoded payload of NBD_OPT_LIST_META_CONTEXT and
// NBD_OPT_SET_META_CONTEXT.
type MetaContextRequest struct {
	Name    string
	Queries []string
}

// ParseMetaContextRequest decodes a LIST/SET_META_CONTEXT payload. The
// number of queries is bounded by the payload length (each takes at least 4
// bytes), so a hostile count cannot cause a large allocation.
func ParseMetaContextRequest(p []byte) (MetaContextRequest, error) {
	name, rest, err := takeString(p)
	if err != nil {
		return MetaContextRequest{}, err
	}
	if len(rest) < 4 {
		return MetaContextRequest{}, ErrMalformed
	}
	n := be.Uint32(rest[0:4])
	rest = rest[4:]
	if uint64(n) > uint64(len(rest)/4) {
		return MetaContextRequest{}, ErrMalformed
	}
	r := MetaContextRequest{Name: name, Queries: make([]string, 0, n)}
	for range n {
		var q string
		q, rest, err = takeString(rest)
		if err != nil {
			return MetaContextRequest{}, err
		}
		r.Queries = append(r.Queries, q)
	}
	if len(rest) != 0 {
		return MetaContextRequest{}, ErrMalformed
	}
	return r, nil
}

// takeString reads a 32-bit length-prefixed string of at most MaxStringBytes.
func takeString(p []byte) (string, []byte, error) {
	if len(p) < 4 {
		return "", nil, ErrMalformed
	}
	n := be.Uint32(p[0:4])
	p = p[4:]
	if n > MaxStringBytes || uint64(n) > uint64(len(p)) {
		return "", nil, ErrMalformed
	}
	return string(p[:n]), p[n:], nil
}

// AppendString appends a 32-bit length-prefixed string (for option payloads).
func AppendString(b []byte, s string) []byte {
	b = be.AppendUint32(b, uint32(len(s)))
	return append(b, s...)
}

// CommandName returns the lower-case name of a command, as used in metric
// labels, or "unknown".
func CommandName(cmd uint16) string {
	switch cmd {
	case CmdRead:
		return "read"
	case CmdWrite:
		return "write"
	case CmdDisc:
		return "disc"
	case CmdFlush:
		return "flush"
	case CmdTrim:
		return "trim"
	case CmdCache:
		return "cache"
	case CmdWriteZeroes:
		return "write_zeroes"
	case CmdBlockStatus:
		return "block_status"
	case CmdResize:
		return "resize"
	}
	return "unknown"
}
