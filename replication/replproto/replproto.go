// Package replproto is the framing of the peer stream between nodes of a
// lupool cluster: from an LU's writer node to each of its copy nodes, and
// from a node that forwards client I/O to the LU's writer. It defines the
// frame header, the Hello payload that opens a connection, the request and
// reply types, flags and status codes, and their encoders and decoders. It
// does no I/O beyond reading one header from a stream.
//
// Every integer on the wire is big-endian. Every constant in this package is
// part of the wire format and must never change; new types, flags and
// statuses may only be added.
//
// # Frame
//
// Requests and replies share one 48-byte header (HeaderBytes), followed by
// payload_len bytes of payload:
//
//	 0               4      5       6            8
//	+---------------+------+-------+------------+
//	| magic (4)     | type | flags | status (2) |
//	+---------------+------+-------+------------+
//	| handle (8)                                |  8
//	+-------------------------------------------+
//	| epoch (8)                                 | 16
//	+-------------------------------------------+
//	| offset (8)                                | 24
//	+---------------------+---------------------+
//	| length (4)          | payload_len (4)     | 32
//	+---------------------+---------------------+
//	| payload_crc (4)     | header_crc (4)      | 40
//	+---------------------+---------------------+
//	                                              48
//
// This is version 2 of the format (Version); version 1 had a 40-byte header
// without the two checksums. The two versions do not talk to each other:
// the stream's HTTP upgrade token names the version.
//
// # Checksums
//
// Every frame is checksummed end to end with CRC-32C (Castagnoli, the
// polynomial of iSCSI and ext4; hash/crc32 computes it with the CPU's crc32
// instruction). payload_crc is the CRC-32C of the payload_len payload bytes
// (0 for an empty payload); header_crc is the CRC-32C of header bytes
// 0..44, payload_crc included. A receiver checks header_crc before it
// believes any field (ParseHeader: a mismatch is a malformed frame, and as
// payload_len cannot be trusted either, the stream ends), and checks
// payload_crc (Header.CheckPayload) before it uses a single payload byte: a
// copy answers a Write whose payload fails the check with StatusChecksum
// and never writes it; a requester fails the request whose reply fails it.
// A corrupted frame is therefore an error on that frame (or on the
// stream), never a silent write at the wrong place or with the wrong
// bytes. TCP's own 16-bit checksum misses about one corrupted segment in
// 65536 that a NIC, a middlebox or a bad memory module produced; TLS, when
// the peer port uses it, would catch those too, but not a corruption
// between the payload's buffer and the TLS record (and the stream is also
// used without TLS in tests and benchmarks).
//
// magic is Magic ("LURP"). type is a request Type (TypeHello..TypeRollback) or,
// in a reply, TypeReply|request type. status is StatusOK in every request
// and says how a request ended in its reply. handle is chosen by the
// requester and echoed in the reply. epoch is, in a request, the sender's
// epoch for the LU and, in a reply, the responder's current epoch. offset
// and length name the byte range [offset, offset+length) of the LU; replies
// echo the request's offset and length. Neither length nor payload_len
// exceeds LengthMax, and offset+length never exceeds math.MaxInt64.
//
// Payloads:
//
//	Hello request:  the Hello payload below; offset = LU size in bytes
//	                (informative), length = 0
//	Write request:  length bytes of data (payload_len == length)
//	Read reply:     length bytes of data, when status is OK
//	Hash reply:     32 bytes, SHA-256 of [offset, offset+length), when OK
//	Log reply:      the Log payload below, when OK
//	Snapshot, Rollback request: the snapshot's LU name, LU@SNAP
//	                (AppendSnapshot; 1..NameBytesMax bytes), offset = length = 0
//	failed reply:   up to MessageBytesMax bytes of error text
//	anything else:  no payload
//
// The Hello payload:
//
//	+----------+--------------+-----------+--------------+-------------+
//	| role (1) | name_len (1) | name (n)  | node_len (1) | node id (m) |
//	+----------+--------------+-----------+--------------+-------------+
//
// where name is the LU name and node id identifies the sending node, each
// 1..NameBytesMax bytes, and nothing follows the node id.
//
// The Log payload (the OK reply to a Log request, AppendLog):
//
//	+----------+------------------------------------------------+
//	| kind (1) | n × (offset (8), length (8)) byte ranges        |
//	+----------+------------------------------------------------+
//
// kind LogRanges (0): the copy may differ from the writer only in the
// ranges that follow (none: nowhere), from its time as the LU's writer
// (its activity log); kind LogUnknown (1): it cannot tell (its log is
// missing or not trusted), no range follows, and the writer compares the
// whole LU. Ranges are non-empty and do not overflow.
//
// # Conversation
//
// The connecting side sends a Hello request first and waits for its reply.
// The reply's status is StatusOK; or it is StatusStaleEpoch, StatusNotFound
// or StatusNotWriter, and the responder closes the connection after
// sending it. Once the Hello succeeded, requests pipeline freely: the requester may send any
// number of requests without waiting, and the responder may answer them in
// any order; the requester matches a reply to its request by handle. A
// reply's epoch is the responder's epoch for the LU.
//
// With RoleCopy, the writer streams its LU's mutations to a copy, which
// applies them to its local copy. A copy refuses any request whose epoch is
// below its own recorded epoch for the LU with StatusStaleEpoch, so that a
// deposed writer can no longer change it. With RoleClient, a node forwards
// client I/O to the LU's writer; a node that is not the writer answers
// StatusNotWriter.
//
// TypePing is a keepalive and a lease renewal: it carries no range (length
// 0) and is answered with an empty OK reply. Its offset is not a position:
// in a ping to a copy it is the copy's lease-clock time that the writer
// echoes from the copy's last ping answer on this connection (0: none
// yet), and in the reply it is the copy's lease-clock time at the answer
// (nanoseconds on the copy's monotonic clock; see the replication
// package's copy lease). Other streams send and ignore 0. Flags say how an operation must be carried out; each is valid on
// the types its comment names, in requests and in their replies.
package replproto

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math"
	"slices"
	"syscall"

	"github.com/lupool/lupool/blockdev"
)

// Magic starts every frame header: "LURP". Part of the wire format.
const Magic uint32 = 0x4c555250

// Version is the version of the frame format this package speaks: 2 added
// the payload and header checksums. Part of the wire format.
const Version = 2

// Sizes and limits. Part of the wire format.
const (
	// HeaderBytes is the size of a frame header.
	HeaderBytes = 4 + 1 + 1 + 2 + 8 + 8 + 8 + 4 + 4 + 4 + 4
	// headerCRCAt is where header_crc starts; it covers the bytes before.
	headerCRCAt = HeaderBytes - 4
	// LengthMax is the largest data range of one request and the largest
	// payload of any frame.
	LengthMax = 32 << 20
	// NameBytesMax is the longest LU name and the longest node id in a
	// Hello.
	NameBytesMax = 128
	// MessageBytesMax is the longest error text in a failed reply.
	MessageBytesMax = 1024
)

// helloBytesMax is the largest Hello payload: role, two length bytes and two
// names of the greatest length.
const helloBytesMax = 3 + 2*NameBytesMax

// hashBytes is the size of the payload of an OK Hash reply (SHA-256).
const hashBytes = 32

// Type is the kind of a frame. Part of the wire format.
type Type uint8

// Request types, and the reply bit. Part of the wire format.
const (
	// TypeHello opens a connection. Payload: AppendHello; Offset = LU size
	// in bytes (informative).
	TypeHello Type = 1
	// TypeWrite writes its payload at Offset; PayloadLen == Length.
	TypeWrite Type = 2
	// TypeTrim deallocates [Offset, Offset+Length).
	TypeTrim Type = 3
	// TypeZero writes zeroes to [Offset, Offset+Length).
	TypeZero Type = 4
	// TypeFlush makes every completed write durable. Offset and Length are 0.
	TypeFlush Type = 5
	// TypeRead reads [Offset, Offset+Length); the OK reply's payload is
	// Length bytes of data.
	TypeRead Type = 6
	// TypeHash hashes [Offset, Offset+Length), Length > 0; the OK reply's
	// payload is the 32-byte SHA-256 of the range.
	TypeHash Type = 7
	// TypePing is a keepalive. Length is 0; Offset carries lease
	// times (see the package doc).
	TypePing Type = 8
	// TypeLog asks a copy for the regions it may differ in from its time
	// as the LU's writer (its activity log). Offset and Length are 0; the
	// OK reply's payload is a Log payload (AppendLog).
	TypeLog Type = 9
	// TypeSnapshot freezes the copy's volume as the snapshot its payload
	// names (AppendSnapshot; snapshot.go), between the writes before it
	// and those after it. Offset and Length are 0.
	TypeSnapshot Type = 10
	// TypeRollback makes the copy's volume read what the snapshot its
	// payload names holds. Offset and Length are 0.
	TypeRollback Type = 11

	// TypeReply is set in the type of every reply: a reply's Type is
	// TypeReply|request type.
	TypeReply Type = 0x80
)

// typeLast is the highest request type.
const typeLast = TypeRollback

var typeNames = [...]string{
	TypeHello: "Hello",
	TypeWrite: "Write",
	TypeTrim:  "Trim",
	TypeZero:  "Zero",
	TypeFlush: "Flush",
	TypeRead:  "Read",
	TypeHash:  "Hash",
	TypePing:  "Ping",
	TypeLog:   "Log",

	TypeSnapshot: "Snapshot",
	TypeRollback: "Rollback",
}

// isReply reports whether t has the reply bit set.
func (t Type) isReply() bool { return t&TypeReply != 0 }

// request returns t without the reply bit.
func (t Type) request() Type { return t &^ TypeReply }

// known reports whether t is a request type or the reply to one.
func (t Type) known() bool {
	r := t.request()
	return r >= TypeHello && r <= typeLast
}

// String returns "Write" for a request type, "WriteReply" for its reply and
// "Type(0x..)" for an unknown type.
func (t Type) String() string {
	if !t.known() {
		return fmt.Sprintf("Type(%#02x)", uint8(t))
	}
	if t.isReply() {
		return typeNames[t.request()] + "Reply"
	}
	return typeNames[t]
}

// Flags modify one request. Part of the wire format.
type Flags uint8

// Request flags. Part of the wire format.
const (
	// FlagFUA makes the operation durable before it is answered. Write,
	// Trim, Zero.
	FlagFUA Flags = 1 << 0
	// FlagNoHole asks Zero to leave the range allocated. Zero.
	FlagNoHole Flags = 1 << 1
	// FlagFastZero asks Zero to fail at once with StatusNotSupported when
	// zeroing would be no faster than writing zeroes. Zero.
	FlagFastZero Flags = 1 << 2
	// FlagResync marks a Write, Zero or Trim sent by a resync or rebuild
	// pass rather than on behalf of a client.
	FlagResync Flags = 1 << 3

	flagsKnown = FlagFUA | FlagNoHole | FlagFastZero | FlagResync
)

// flagsAllowed returns the flags a request type (or the reply to it) may
// carry.
func flagsAllowed(t Type) Flags {
	switch t.request() {
	case TypeWrite, TypeTrim:
		return FlagFUA | FlagResync
	case TypeZero:
		return FlagFUA | FlagNoHole | FlagFastZero | FlagResync
	default:
		return 0
	}
}

// Status is how a request ended, carried in its reply. Part of the wire
// format.
type Status uint16

// Statuses. Part of the wire format.
const (
	StatusOK Status = 0
	// StatusStaleEpoch: the request's epoch is below the responder's
	// recorded epoch for the LU.
	StatusStaleEpoch Status = 1
	StatusIO         Status = 2
	StatusNoSpace    Status = 3
	StatusInvalid    Status = 4
	// StatusNotFound: no such LU (or no copy of it) on the receiver.
	StatusNotFound     Status = 5
	StatusShutdown     Status = 6
	StatusOutOfRange   Status = 7
	StatusNotSupported Status = 8
	// StatusNotWriter: a RoleClient request reached a node that is not the
	// LU's writer.
	StatusNotWriter Status = 9
	StatusReadOnly  Status = 10
	// StatusForbidden: the sender's identity (from its certificate) may
	// not open this stream: a RoleCopy stream from a node that is not the
	// LU's writer at the epoch, or a RoleClient stream from a non-member.
	StatusForbidden Status = 11
	// StatusChecksum: the request's payload failed its payload_crc check;
	// the receiver did not apply it.
	StatusChecksum Status = 12
)

// statusLast is the highest known status.
const statusLast = StatusChecksum

var statusNames = [...]string{
	StatusOK:           "OK",
	StatusStaleEpoch:   "StaleEpoch",
	StatusIO:           "IO",
	StatusNoSpace:      "NoSpace",
	StatusInvalid:      "Invalid",
	StatusNotFound:     "NotFound",
	StatusShutdown:     "Shutdown",
	StatusOutOfRange:   "OutOfRange",
	StatusNotSupported: "NotSupported",
	StatusNotWriter:    "NotWriter",
	StatusReadOnly:     "ReadOnly",
	StatusForbidden:    "Forbidden",
	StatusChecksum:     "Checksum",
}

// String returns the status's name, or "Status(n)" for an unknown one.
func (s Status) String() string {
	if s > statusLast {
		return fmt.Sprintf("Status(%d)", uint16(s))
	}
	return statusNames[s]
}

// Sentinel errors.
var (
	// ErrStaleEpoch is returned by Status.Err for StatusStaleEpoch: the
	// peer has seen a newer epoch for the LU than the one the request
	// carried.
	ErrStaleEpoch = errors.New("replproto: stale epoch")
	// ErrNotWriter is returned by Status.Err for StatusNotWriter.
	ErrNotWriter = errors.New("replproto: not the writer")
	// ErrNotFound is returned by Status.Err for StatusNotFound.
	ErrNotFound = errors.New("replproto: LU not found on peer")
	// ErrForbidden is returned by Status.Err for StatusForbidden.
	ErrForbidden = errors.New("replproto: sender not allowed")
	// ErrChecksum is returned, wrapped, by Header.CheckPayload for a
	// payload that does not match its payload_crc, by ParseHeader and
	// ReadHeader (also wrapping ErrBadFrame) for a header that does not
	// match its header_crc, and by Status.Err for StatusChecksum.
	ErrChecksum = errors.New("replproto: checksum mismatch")
	// ErrBadFrame is returned, wrapped with the reason, by ParseHeader,
	// ReadHeader and ParseHello for bytes that are not a valid frame, and
	// by Status.Err for an unknown status.
	ErrBadFrame = errors.New("replproto: malformed frame")
)

// Err maps s to an error: nil for StatusOK, a replproto or blockdev
// sentinel for a known status, and ErrBadFrame wrapped for an unknown one.
func (s Status) Err() error {
	switch s {
	case StatusOK:
		return nil
	case StatusStaleEpoch:
		return ErrStaleEpoch
	case StatusIO:
		return blockdev.ErrIO
	case StatusNoSpace:
		return blockdev.ErrNoSpace
	case StatusInvalid:
		return blockdev.ErrInvalid
	case StatusNotFound:
		return ErrNotFound
	case StatusShutdown:
		return blockdev.ErrShutdown
	case StatusOutOfRange:
		return blockdev.ErrOutOfRange
	case StatusNotSupported:
		return blockdev.ErrNotSupported
	case StatusNotWriter:
		return ErrNotWriter
	case StatusReadOnly:
		return blockdev.ErrReadOnly
	case StatusForbidden:
		return ErrForbidden
	case StatusChecksum:
		return ErrChecksum
	default:
		return fmt.Errorf("%w: unknown status %d", ErrBadFrame, uint16(s))
	}
}

// StatusOf maps err to the status that reports it, the inverse of
// Status.Err. It tests with errors.Is, so wrapped errors map too; wrapped
// syscall.ENOSPC maps to StatusNoSpace, syscall.EIO and context
// cancellation or deadline to StatusIO. nil maps to StatusOK and any other
// error to StatusIO.
func StatusOf(err error) Status {
	switch {
	case err == nil:
		return StatusOK
	case errors.Is(err, ErrStaleEpoch):
		return StatusStaleEpoch
	case errors.Is(err, ErrNotWriter):
		return StatusNotWriter
	case errors.Is(err, ErrNotFound):
		return StatusNotFound
	case errors.Is(err, ErrForbidden):
		return StatusForbidden
	case errors.Is(err, ErrChecksum):
		return StatusChecksum
	case errors.Is(err, blockdev.ErrNoSpace), errors.Is(err, syscall.ENOSPC):
		return StatusNoSpace
	case errors.Is(err, blockdev.ErrIO), errors.Is(err, syscall.EIO):
		return StatusIO
	case errors.Is(err, blockdev.ErrInvalid):
		return StatusInvalid
	case errors.Is(err, blockdev.ErrShutdown):
		return StatusShutdown
	case errors.Is(err, blockdev.ErrOutOfRange):
		return StatusOutOfRange
	case errors.Is(err, blockdev.ErrNotSupported):
		return StatusNotSupported
	case errors.Is(err, blockdev.ErrReadOnly):
		return StatusReadOnly
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return StatusIO
	default:
		return StatusIO
	}
}

var be = binary.BigEndian

// Header is one frame header; requests and replies share it. See the
// package doc for the layout.
type Header struct {
	Type  Type
	Flags Flags
	// Status is StatusOK in requests.
	Status Status
	// Handle is chosen by the requester and echoed in the reply.
	Handle uint64
	// Epoch is, in a request, the sender's LU epoch; in a reply, the
	// responder's current epoch.
	Epoch  uint64
	Offset uint64
	Length uint32
	// PayloadLen is the number of payload bytes that follow the header.
	PayloadLen uint32
	// PayloadCRC is the CRC-32C of the payload (Checksum); AppendFrame
	// sets it.
	PayloadCRC uint32
}

// castagnoli is the CRC-32C table; crc32 uses the CPU instruction with it.
var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Checksum returns the CRC-32C of p, the payload_crc of a frame whose
// payload is p (0 for an empty payload).
func Checksum(p []byte) uint32 { return crc32.Checksum(p, castagnoli) }

// CheckPayload returns nil if p is the payload h announced (its CRC-32C is
// h.PayloadCRC) and an error wrapping ErrChecksum if it is not. A receiver
// must call it before it uses any byte of p.
func (h *Header) CheckPayload(p []byte) error {
	if got := Checksum(p); got != h.PayloadCRC {
		return fmt.Errorf("%w: %v payload of %d bytes at offset %d has CRC-32C %#08x, header says %#08x",
			ErrChecksum, h.Type, len(p), h.Offset, got, h.PayloadCRC)
	}
	return nil
}

// Marshal writes h into b[:HeaderBytes], header_crc included. It does not
// validate h, and it writes h.PayloadCRC as it is (AppendFrame computes
// it). It panics if len(b) < HeaderBytes, which is a programming error.
func (h *Header) Marshal(b []byte) {
	_ = b[HeaderBytes-1]
	be.PutUint32(b[0:4], Magic)
	b[4] = byte(h.Type)
	b[5] = byte(h.Flags)
	be.PutUint16(b[6:8], uint16(h.Status))
	be.PutUint64(b[8:16], h.Handle)
	be.PutUint64(b[16:24], h.Epoch)
	be.PutUint64(b[24:32], h.Offset)
	be.PutUint32(b[32:36], h.Length)
	be.PutUint32(b[36:40], h.PayloadLen)
	be.PutUint32(b[40:44], h.PayloadCRC)
	be.PutUint32(b[headerCRCAt:HeaderBytes], crc32.Checksum(b[:headerCRCAt], castagnoli))
}

// badFrame returns ErrBadFrame wrapped with the reason.
func badFrame(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrBadFrame}, args...)...)
}

// ParseHeader decodes and validates b[:HeaderBytes], header_crc first. A
// header it accepts re-marshals to the same bytes. Errors wrap ErrBadFrame and say what is
// wrong; see the package doc for the rules. ParseHeader does not judge the
// Status of a reply: Status.Err maps an unknown one to ErrBadFrame.
func ParseHeader(b []byte) (Header, error) {
	if len(b) < HeaderBytes {
		return Header{}, badFrame("short header: %d bytes, want %d", len(b), HeaderBytes)
	}
	if m := be.Uint32(b[0:4]); m != Magic {
		return Header{}, badFrame("bad magic %#08x", m)
	}
	if want, got := be.Uint32(b[headerCRCAt:HeaderBytes]), crc32.Checksum(b[:headerCRCAt], castagnoli); got != want {
		return Header{}, fmt.Errorf("%w: %w: header has CRC-32C %#08x, header_crc says %#08x", ErrBadFrame, ErrChecksum, got, want)
	}
	h := Header{
		Type:       Type(b[4]),
		Flags:      Flags(b[5]),
		Status:     Status(be.Uint16(b[6:8])),
		Handle:     be.Uint64(b[8:16]),
		Epoch:      be.Uint64(b[16:24]),
		Offset:     be.Uint64(b[24:32]),
		Length:     be.Uint32(b[32:36]),
		PayloadLen: be.Uint32(b[36:40]),
		PayloadCRC: be.Uint32(b[40:44]),
	}
	if err := h.validate(); err != nil {
		return Header{}, err
	}
	return h, nil
}

// validate checks the rules every header obeys, then those of requests or
// replies.
func (h *Header) validate() error {
	if !h.Type.known() {
		return badFrame("unknown type %#02x", uint8(h.Type))
	}
	if unknown := h.Flags &^ flagsKnown; unknown != 0 {
		return badFrame("unknown flags %#02x on %v", uint8(unknown), h.Type)
	}
	if extra := h.Flags &^ flagsAllowed(h.Type); extra != 0 {
		return badFrame("flags %#02x not valid on %v", uint8(extra), h.Type)
	}
	if h.Length > LengthMax {
		return badFrame("%v length %d exceeds %d", h.Type, h.Length, LengthMax)
	}
	if h.PayloadLen > LengthMax {
		return badFrame("%v payload length %d exceeds %d", h.Type, h.PayloadLen, LengthMax)
	}
	if h.Offset > math.MaxInt64-uint64(h.Length) {
		return badFrame("%v range offset %d length %d overflows", h.Type, h.Offset, h.Length)
	}
	if h.Type.isReply() {
		return h.validateReply()
	}
	return h.validateRequest()
}

// validateRequest checks the payload and range rules of a request.
func (h *Header) validateRequest() error {
	if h.Status != StatusOK {
		return badFrame("%v request with status %v", h.Type, h.Status)
	}
	switch h.Type {
	case TypeWrite:
		if h.PayloadLen != h.Length {
			return badFrame("Write payload length %d != length %d", h.PayloadLen, h.Length)
		}
		return nil
	case TypeHello:
		if h.PayloadLen == 0 || h.PayloadLen > helloBytesMax {
			return badFrame("Hello payload length %d not in 1..%d", h.PayloadLen, helloBytesMax)
		}
		return nil
	case TypeSnapshot, TypeRollback:
		if h.PayloadLen == 0 || h.PayloadLen > NameBytesMax || h.Offset != 0 || h.Length != 0 {
			return badFrame("%v with payload length %d (want 1..%d), offset %d, length %d", h.Type, h.PayloadLen, NameBytesMax, h.Offset, h.Length)
		}
		return nil
	case TypePing:
		// On a RolePair stream a ping carries enrollment changes
		// (AppendPairList); elsewhere none.
		if h.Length != 0 {
			return badFrame("%v with length %d", h.Type, h.Length)
		}
		return nil
	}
	if h.PayloadLen != 0 {
		return badFrame("%v request with payload length %d", h.Type, h.PayloadLen)
	}
	switch h.Type {
	case TypeFlush, TypeLog:
		if h.Offset != 0 || h.Length != 0 {
			return badFrame("%v with range offset %d length %d", h.Type, h.Offset, h.Length)
		}
	case TypePing:
		if h.Length != 0 {
			return badFrame("%v with length %d", h.Type, h.Length)
		}
	case TypeHash:
		if h.Length == 0 {
			return badFrame("Hash of zero length")
		}
	}
	return nil
}

// validateReply checks the payload rules of a reply.
func (h *Header) validateReply() error {
	if h.Status != StatusOK {
		if h.PayloadLen > MessageBytesMax {
			return badFrame("%v %v with message length %d exceeds %d",
				h.Type, h.Status, h.PayloadLen, MessageBytesMax)
		}
		return nil
	}
	var want uint32
	switch h.Type.request() {
	case TypeRead:
		want = h.Length
	case TypeHash:
		want = hashBytes
	case TypePing:
		return nil // a RolePair answer lists fenced LUs (AppendPairList)
	case TypeLog:
		if h.PayloadLen == 0 || (h.PayloadLen-1)%logRangeBytes != 0 {
			return badFrame("Log OK with payload length %d, want 1 + a multiple of %d", h.PayloadLen, logRangeBytes)
		}
		return nil
	}
	if h.PayloadLen != want {
		return badFrame("%v OK with payload length %d, want %d", h.Type, h.PayloadLen, want)
	}
	return nil
}

// ReadHeader reads exactly HeaderBytes from r into buf and parses them. It
// returns io.EOF unwrapped when the stream ended before any byte was read,
// io.ErrUnexpectedEOF unwrapped when it ended within the header, any other
// read error as is, and ParseHeader's errors for bad bytes.
func ReadHeader(r io.Reader, buf *[HeaderBytes]byte) (Header, error) {
	if _, err := io.ReadFull(r, buf[:]); err != nil {
		return Header{}, err
	}
	return ParseHeader(buf[:])
}

// AppendFrame appends the header h followed by payload to dst and returns
// the extended slice, for batching frames into one buffered write. It sets
// h.PayloadLen to len(payload) and h.PayloadCRC to its checksum; it does
// not otherwise validate h. It panics if len(payload) > LengthMax, which is
// a programming error.
func AppendFrame(dst []byte, h Header, payload []byte) []byte {
	h.PayloadCRC = Checksum(payload)
	return AppendSummedFrame(dst, h, payload)
}

// AppendSummedFrame is AppendFrame for a caller that computed
// h.PayloadCRC = Checksum(payload) itself, outside a lock it holds while
// appending (a 1 MiB payload takes about 45 µs to checksum).
func AppendSummedFrame(dst []byte, h Header, payload []byte) []byte {
	if len(payload) > LengthMax {
		panic(fmt.Sprintf("replproto: payload of %d bytes exceeds %d", len(payload), LengthMax))
	}
	h.PayloadLen = uint32(len(payload))
	n := len(dst)
	dst = slices.Grow(dst, HeaderBytes+len(payload))
	dst = dst[:n+HeaderBytes]
	h.Marshal(dst[n:])
	return append(dst, payload...)
}

// Role says what the connecting side of a connection is. Part of the wire
// format.
type Role uint8

// Roles. Part of the wire format.
const (
	// RoleCopy: the writer streams to a copy of the LU, which applies the
	// requests to its local copy, epoch-checked.
	RoleCopy Role = 1
	// RoleClient: a forwarding node sends client I/O to the LU's writer.
	RoleClient Role = 2
	// RolePair: a writer node's heartbeat to a copy node, renewing the
	// read leases of every LU they share (AppendPairList); its Hello names
	// the LU PairLU. Only TypePing travels on it.
	RolePair Role = 3
)

// PairLU is the LU name in the Hello of a RolePair stream: not a valid LU
// name, so no LU is meant.
const PairLU = "*"

// Hello is the payload of a Hello request.
type Hello struct {
	Role Role
	// LU is the LU's name, 1..NameBytesMax bytes.
	LU string
	// Node is the sending node's id, 1..NameBytesMax bytes.
	Node string
}

// validate checks h against the Hello rules.
func (h *Hello) validate() error {
	if h.Role != RoleCopy && h.Role != RoleClient && h.Role != RolePair {
		return badFrame("Hello with unknown role %d", uint8(h.Role))
	}
	if n := len(h.LU); n == 0 || n > NameBytesMax {
		return badFrame("Hello LU name of %d bytes not in 1..%d", n, NameBytesMax)
	}
	if n := len(h.Node); n == 0 || n > NameBytesMax {
		return badFrame("Hello node id of %d bytes not in 1..%d", n, NameBytesMax)
	}
	return nil
}

// AppendHello appends the Hello payload of h to dst and returns the
// extended slice. It panics if h has an unknown role or a name or node id
// outside 1..NameBytesMax bytes, which is a programming error: names are
// bounded where they are created.
func AppendHello(dst []byte, h Hello) []byte {
	if err := h.validate(); err != nil {
		panic(err.Error())
	}
	dst = slices.Grow(dst, 3+len(h.LU)+len(h.Node))
	dst = append(dst, byte(h.Role), byte(len(h.LU)))
	dst = append(dst, h.LU...)
	dst = append(dst, byte(len(h.Node)))
	return append(dst, h.Node...)
}

// ParseHello decodes a Hello payload, which must be exactly one Hello with
// no trailing bytes. Errors wrap ErrBadFrame.
func ParseHello(p []byte) (Hello, error) {
	if len(p) > helloBytesMax {
		return Hello{}, badFrame("Hello payload of %d bytes exceeds %d", len(p), helloBytesMax)
	}
	if len(p) < 2 {
		return Hello{}, badFrame("Hello payload of %d bytes is truncated", len(p))
	}
	nameLen := int(p[1])
	nodeAt := 2 + nameLen
	if len(p) < nodeAt+1 {
		return Hello{}, badFrame("Hello payload of %d bytes is truncated in the LU name", len(p))
	}
	nodeLen := int(p[nodeAt])
	end := nodeAt + 1 + nodeLen
	if len(p) < end {
		return Hello{}, badFrame("Hello payload of %d bytes is truncated in the node id", len(p))
	}
	if len(p) > end {
		return Hello{}, badFrame("Hello payload has %d trailing bytes", len(p)-end)
	}
	h := Hello{Role: Role(p[0]), LU: string(p[2:nodeAt]), Node: string(p[nodeAt+1 : end])}
	if err := h.validate(); err != nil {
		return Hello{}, err
	}
	return h, nil
}

// Log payload kinds. Part of the wire format.
const (
	// LogRanges: the ranges that follow are all the copy may differ in.
	LogRanges byte = 0
	// LogUnknown: the copy cannot tell; compare the whole LU.
	LogUnknown byte = 1
)

// logRangeBytes is the size of one range of a Log payload.
const logRangeBytes = 16

// LogRangesMax is the most ranges a Log payload holds (it must fit
// LengthMax).
const LogRangesMax = (LengthMax - 1) / logRangeBytes

// AppendLog appends a Log payload to dst: LogUnknown when known is false,
// else LogRanges and ranges ([offset, length] pairs). It panics on an empty,
// negative or overflowing range, or on more than LogRangesMax ranges, which
// are programming errors.
func AppendLog(dst []byte, known bool, ranges [][2]int64) []byte {
	if !known {
		return append(dst, LogUnknown)
	}
	if len(ranges) > LogRangesMax {
		panic(fmt.Sprintf("replproto: %d log ranges exceed %d", len(ranges), LogRangesMax))
	}
	dst = slices.Grow(dst, 1+len(ranges)*logRangeBytes)
	dst = append(dst, LogRanges)
	for _, r := range ranges {
		if r[0] < 0 || r[1] <= 0 || r[0] > math.MaxInt64-r[1] {
			panic(fmt.Sprintf("replproto: bad log range [%d, +%d)", r[0], r[1]))
		}
		dst = be.AppendUint64(dst, uint64(r[0]))
		dst = be.AppendUint64(dst, uint64(r[1]))
	}
	return dst
}

// ParseLog decodes a Log payload: known is false for LogUnknown; ranges
// are [offset, length] pairs. Errors wrap ErrBadFrame.
func ParseLog(p []byte) (known bool, ranges [][2]int64, err error) {
	if len(p) == 0 {
		return false, nil, badFrame("empty Log payload")
	}
	switch p[0] {
	case LogUnknown:
		if len(p) != 1 {
			return false, nil, badFrame("Log payload of kind unknown with %d trailing bytes", len(p)-1)
		}
		return false, nil, nil
	case LogRanges:
	default:
		return false, nil, badFrame("Log payload of unknown kind %d", p[0])
	}
	body := p[1:]
	if len(body)%logRangeBytes != 0 {
		return false, nil, badFrame("Log payload of %d bytes is not 1 + a multiple of %d", len(p), logRangeBytes)
	}
	ranges = make([][2]int64, 0, len(body)/logRangeBytes)
	for ; len(body) > 0; body = body[logRangeBytes:] {
		off, n := be.Uint64(body), be.Uint64(body[8:])
		if n == 0 || off > math.MaxInt64 || n > math.MaxInt64-off {
			return false, nil, badFrame("Log range [%d, +%d) is empty or overflows", off, n)
		}
		ranges = append(ranges, [2]int64{int64(off), int64(n)})
	}
	return true, ranges, nil
}

// Pair list entry kinds. Part of the wire format.
const (
	// PairEnroll: the writer node vouches for the LU's copy on the
	// receiving node from this heartbeat on.
	PairEnroll byte = 1
	// PairDrop: it no longer does.
	PairDrop byte = 2
	// PairFenced (in an answer): the copy node does not vouch for the LU
	// (its record names another writer, or it has no such LU).
	PairFenced byte = 3
)

// PairEntry is one entry of a pair list: a kind and an LU name.
type PairEntry struct {
	Kind byte
	LU   string
}

// AppendPairList appends the payload of a RolePair ping (enrollments and
// drops, in order) or of its answer (fenced LUs) to dst:
//
//	repeated: kind (1 byte) | name length n (1 byte, 1..NameBytesMax) | name (n bytes)
//
// It panics on an unknown kind or a name outside 1..NameBytesMax bytes,
// which is a programming error: names are bounded where they are created.
func AppendPairList(dst []byte, entries []PairEntry) []byte {
	for _, e := range entries {
		if e.Kind < PairEnroll || e.Kind > PairFenced || len(e.LU) == 0 || len(e.LU) > NameBytesMax {
			panic(fmt.Sprintf("replproto: pair entry kind %d name of %d bytes", e.Kind, len(e.LU)))
		}
		dst = append(dst, e.Kind, byte(len(e.LU)))
		dst = append(dst, e.LU...)
	}
	return dst
}

// ParsePairList decodes a pair list (AppendPairList), at most LengthMax
// bytes. Errors wrap ErrBadFrame.
func ParsePairList(p []byte) ([]PairEntry, error) {
	if len(p) > LengthMax {
		return nil, badFrame("pair list of %d bytes exceeds %d", len(p), LengthMax)
	}
	var out []PairEntry
	for len(p) > 0 {
		if len(p) < 2 {
			return nil, badFrame("pair list truncated in an entry header")
		}
		kind, n := p[0], int(p[1])
		if kind < PairEnroll || kind > PairFenced {
			return nil, badFrame("pair list entry of unknown kind %d", kind)
		}
		if n == 0 || n > NameBytesMax {
			return nil, badFrame("pair list LU name of %d bytes not in 1..%d", n, NameBytesMax)
		}
		if len(p) < 2+n {
			return nil, badFrame("pair list truncated in an LU name")
		}
		out = append(out, PairEntry{Kind: kind, LU: string(p[2 : 2+n])})
		p = p[2+n:]
	}
	return out, nil
}
