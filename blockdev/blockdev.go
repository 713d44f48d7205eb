// Package blockdev defines the small block-device interface that every
// lupool front end serves and every storage back end implements.
//
// The NBD engine (server/nbd) serves any [Device]; the lu package implements
// it for thin file-backed volumes and memory volumes; the replication package
// wraps a local volume into the same interface. Optional abilities (trim,
// write-zeroes, allocation status, cache) are separate small interfaces that a
// front end discovers with a type assertion at run time, the way
// database/sql/driver and nbdkit's can_* callbacks do.
//
// # Concurrency
//
// All methods of a Device and of its optional interfaces may be called
// concurrently from many goroutines. Operations on overlapping ranges that
// run concurrently have no defined order relative to each other (as with
// concurrent writes to a disk); the caller orders them if it cares.
//
// # Durability
//
// A WriteAt, Trim or WriteZeroes that returns nil is visible to every later
// read on every goroutine. It is durable (survives a crash of the node) only
// when it carried [FUA] or when a later Flush has returned nil. Flush makes
// every operation that had returned before Flush was called durable, whoever
// issued it. Devices whose Caps report Volatile make no durability promise at
// all (memory volumes); Flush and FUA then only order.
//
// # Ranges
//
// Callers validate ranges before calling: off >= 0, length >= 0 and
// off+length <= Size() without overflow. Devices still check and return
// [ErrOutOfRange] rather than corrupting memory; Size may change between the
// caller's check and the call (online resize).
package blockdev

import (
	"context"
	"errors"
)

// Flags modify a single operation. Unknown bits are an error ([ErrInvalid]).
type Flags uint32

const (
	// FUA (force unit access) makes this one operation durable before it
	// returns. Valid on WriteAt, Trim and WriteZeroes.
	FUA Flags = 1 << iota
	// NoHole asks WriteZeroes to leave the range allocated (write zeroes)
	// instead of deallocating it. Valid on WriteZeroes only.
	NoHole
	// FastZero asks WriteZeroes to fail with ErrNotSupported at once, without
	// touching the range, when zeroing would be no faster than writing zero
	// buffers. Valid on WriteZeroes only.
	FastZero

	// AllFlags is the set of every defined flag.
	AllFlags = FUA | NoHole | FastZero
)

// Sentinel errors. Devices wrap them with %w; front ends test them with
// errors.Is and map them to protocol error codes. Errors from the operating
// system (syscall.ENOSPC, syscall.EIO, ...) may also be returned wrapped;
// front ends map those too.
var (
	// ErrOutOfRange is returned when a range does not fit inside the device.
	ErrOutOfRange = errors.New("blockdev: range beyond end of device")
	// ErrReadOnly is returned by a mutating call on a read-only device.
	ErrReadOnly = errors.New("blockdev: device is read-only")
	// ErrNoSpace is returned when the backing store is full. Nothing of the
	// failed operation is guaranteed to have landed; earlier acknowledged
	// data is intact.
	ErrNoSpace = errors.New("blockdev: no space left in pool")
	// ErrNotSupported is returned for an operation or flag the device cannot
	// honour (for example FastZero when zeroing is slow).
	ErrNotSupported = errors.New("blockdev: operation not supported")
	// ErrInvalid is returned for a malformed request (unknown flag bits,
	// negative length).
	ErrInvalid = errors.New("blockdev: invalid argument")
	// ErrShutdown is returned once the device is closing or was deleted.
	ErrShutdown = errors.New("blockdev: device is shutting down")
	// ErrIO is returned for a failure of the backing store. A write that
	// failed with ErrIO may or may not have landed.
	ErrIO = errors.New("blockdev: input/output error")
)

// Caps describes what a device can do. Values are fixed for the life of the
// device.
type Caps struct {
	// ReadOnly devices refuse WriteAt, Trim and WriteZeroes with ErrReadOnly.
	ReadOnly bool
	// MultiConn is true when a Flush issued through any handle covers every
	// operation completed through every handle to the same device, so that a
	// front end may let clients open several connections to it.
	MultiConn bool
	// Volatile devices keep data only in memory: FUA and Flush order writes
	// but nothing survives a process crash.
	Volatile bool
	// Rotational hints that seeks are expensive.
	Rotational bool
	// BlockSizeBytes is the device's allocation granularity (the unit TRIM
	// frees); 0 means 4096.
	BlockSizeBytes uint32
}

// Device is the core block-device interface. See the package doc for
// concurrency, durability and range contracts.
type Device interface {
	// Size returns the current size in bytes. It may grow or shrink over
	// the life of the device.
	Size() int64
	// Caps returns the device's capabilities.
	Caps() Caps
	// ReadAt fills all of p from offset off. Never-written ranges read as
	// zeros. It returns nil only if all of p was filled.
	ReadAt(ctx context.Context, p []byte, off int64) error
	// WriteAt writes all of p at offset off. Only FUA is a valid flag.
	WriteAt(ctx context.Context, p []byte, off int64, flags Flags) error
	// Flush makes every operation that returned before the call durable.
	Flush(ctx context.Context) error
}

// Trimmer is implemented by devices that can deallocate a range. After a
// successful Trim the range reads as zeros or as its old contents (NBD
// semantics allow either); thin devices free the whole allocation blocks
// inside the range and leave partial blocks alone. Only FUA is valid.
type Trimmer interface {
	Trim(ctx context.Context, off, length int64, flags Flags) error
}

// Zeroer is implemented by devices that can zero a range efficiently. After
// success the range reads as zeros. Without NoHole the device may deallocate
// the range; with FastZero it must return ErrNotSupported instead of falling
// back to writing zero buffers. Valid flags: FUA, NoHole, FastZero.
type Zeroer interface {
	WriteZeroes(ctx context.Context, off, length int64, flags Flags) error
}

// ExtentFlags describe the allocation state of an extent. The values are the
// NBD base:allocation bits and are part of the wire format.
type ExtentFlags uint32

const (
	// ExtentHole marks an unallocated range.
	ExtentHole ExtentFlags = 1 << 0
	// ExtentZero marks a range known to read as zeros.
	ExtentZero ExtentFlags = 1 << 1
)

// Extent is one run of equal allocation state.
type Extent struct {
	LengthBytes int64
	Flags       ExtentFlags
}

// Extenter is implemented by devices that know which ranges are allocated.
// Extents appends to dst the extents that describe the range starting at off,
// in order and contiguous, each with LengthBytes > 0. It returns at least one
// extent when length > 0. It may stop before off+length (the caller asks
// again for the rest) and never describes bytes past Size(). The caller owns
// dst; implementations must not keep it.
type Extenter interface {
	Extents(ctx context.Context, off, length int64, dst []Extent) ([]Extent, error)
}

// TryReader is implemented by devices that can serve a read at once when
// its data is in memory (a file volume's page cache) and can tell, without
// waiting, when it is not. A front end then runs such reads on the
// goroutine that reads requests, where a read that waited for a disk would
// hold back every request behind it, and hands only the others to a
// goroutine that may wait.
type TryReader interface {
	Device
	// TryReadAt is ReadAt that never waits for a storage device. It returns
	// true and nil after filling p, false and nil, with p's contents
	// unspecified, when filling it would have to wait (the caller then
	// calls ReadAt), or an error as ReadAt would. It must be cheap when it
	// answers false.
	TryReadAt(ctx context.Context, p []byte, off int64) (bool, error)
}

// Cacher is implemented by devices that can prefetch a range. Without it,
// a cache request is a successful no-op.
type Cacher interface {
	Cache(ctx context.Context, off, length int64) error
}

// AsyncWriter is implemented by devices that can start a write and finish
// it later, when waiting for it would idle the caller: a mirror that has
// written its local volume and waits only for its copies' acknowledgements.
// A front end then starts writes on the goroutine that reads requests and
// answers each when it completes, with no goroutine parked per write.
type AsyncWriter interface {
	Device
	// AsyncWrites reports whether WriteAsync may be used now. It is asked
	// for every write and must be cheap.
	AsyncWrites() bool
	// WriteAsync starts writing p at off (flags as for WriteAt) and calls
	// done.Complete exactly once with the result, from any goroutine,
	// possibly before WriteAsync returns. It returns once p is no longer
	// needed. It may block briefly (local I/O, flow control), but must not
	// wait for its own completion.
	WriteAsync(ctx context.Context, p []byte, off int64, flags Flags, done Completion)
}

// AsyncReader is implemented by devices that can start a read and finish
// it later: a proxy whose answer comes from another server. A front end
// then starts reads on the goroutine that reads requests and answers each
// from the goroutine that completes it, with no goroutine parked per read.
type AsyncReader interface {
	Device
	// AsyncReads reports whether ReadAsync may be used now. It is asked
	// for every read and must be cheap.
	AsyncReads() bool
	// ReadAsync starts reading len(p) bytes at off into p and calls
	// done.Complete exactly once with the result, from any goroutine,
	// possibly before ReadAsync returns. p belongs to the device until
	// then: the data must be in p before Complete is called, and p must
	// not be touched after. ReadAsync may block briefly (flow control),
	// but must not wait for its own completion.
	ReadAsync(ctx context.Context, p []byte, off int64, done Completion)
}

// RequestFlusher is implemented by an AsyncWriter or AsyncReader that may
// hold requests started with WriteAsync or ReadAsync, to send several
// together (a proxy: one system call for a burst). A front end that starts
// requests in a row calls FlushRequests before it waits for anything (its
// client's next request, room for a request), and the device sends what it
// holds then. The device itself must send what it holds before it waits
// (flow control), since its completions may be what it waits for.
type RequestFlusher interface {
	FlushRequests()
}

// Completion is how an AsyncWriter or AsyncReader reports a finished
// request.
type Completion interface {
	// Complete records the result and answers the client (with the data,
	// for a read). The answer may stay buffered: when Complete returns a non-nil ReplyFlusher, the
	// caller must call its FlushReplies before it next waits for anything,
	// and may first complete more writes, so that their answers go out
	// together. Calling FlushReplies once for several identical
	// ReplyFlushers (==) is enough.
	Complete(err error) ReplyFlusher
}

// ReplyFlusher sends the answers that Complete left buffered.
type ReplyFlusher interface {
	FlushReplies()
}

// CheckRange validates off and length against size without overflow. It
// returns ErrInvalid for negative values and ErrOutOfRange when the range
// does not fit.
func CheckRange(off, length, size int64) error {
	if off < 0 || length < 0 {
		return ErrInvalid
	}
	if off > size || length > size-off {
		return ErrOutOfRange
	}
	return nil
}

// CheckFlags returns ErrInvalid when flags has bits outside allowed.
func CheckFlags(flags, allowed Flags) error {
	if flags&^allowed != 0 {
		return ErrInvalid
	}
	return nil
}
