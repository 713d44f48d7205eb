// Package blockdevtest provides a flat, obviously-correct in-memory
// blockdev.Device for tests: the reference model that faster devices are
// checked against, and a fault-injecting twin for front-end tests (the way
// net/http/httptest and raft's MemoryStorage serve their packages).
//
// It is deliberately simple: one mutex, one flat byte slice, one allocation
// bit per block. Do not use it for benchmarks of front ends; it serialises
// everything.
package blockdevtest

import (
	"context"
	"sync"

	"github.com/lupool/lupool/blockdev"
)

// Op names an operation for fault injection.
type Op int

// Operations that can be failed by a FaultFunc.
const (
	OpRead Op = iota
	OpWrite
	OpFlush
	OpTrim
	OpZero
	OpExtents
	OpCache
)

// FaultFunc is called before every operation; a non-nil result is returned
// to the caller and the operation does not run.
type FaultFunc func(op Op, off, length int64) error

// Mem is a flat in-memory device. The zero value is not usable; call NewMem.
type Mem struct {
	caps blockdev.Caps

	mu struct {
		sync.Mutex
		data      []byte // guarded by mu; len(data) is the size
		allocated []bool // guarded by mu; one per block, true once written
		fault     FaultFunc
		flushes   int
	}
}

var (
	_ blockdev.Device   = (*Mem)(nil)
	_ blockdev.Trimmer  = (*Mem)(nil)
	_ blockdev.Zeroer   = (*Mem)(nil)
	_ blockdev.Extenter = (*Mem)(nil)
	_ blockdev.Cacher   = (*Mem)(nil)
)

// BlockSizeBytes is Mem's allocation granularity.
const BlockSizeBytes = 4096

// NewMem returns a device of sizeBytes, all holes, with the given caps
// (BlockSizeBytes is forced to 4096).
func NewMem(sizeBytes int64, caps blockdev.Caps) *Mem {
	if sizeBytes < 0 {
		panic("blockdevtest: negative size")
	}
	caps.BlockSizeBytes = BlockSizeBytes
	m := &Mem{caps: caps}
	m.mu.data = make([]byte, sizeBytes)
	m.mu.allocated = make([]bool, blocks(sizeBytes))
	return m
}

func blocks(size int64) int64 { return (size + BlockSizeBytes - 1) / BlockSizeBytes }

// SetFault installs f (nil removes it).
func (m *Mem) SetFault(f FaultFunc) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.mu.fault = f
}

// Flushes returns how many Flush calls (and FUA operations) succeeded.
func (m *Mem) Flushes() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.mu.flushes
}

// Bytes returns a copy of the whole contents.
func (m *Mem) Bytes() []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]byte(nil), m.mu.data...)
}

// Resize changes the size; new space reads as zeros.
func (m *Mem) Resize(sizeBytes int64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if sizeBytes <= int64(len(m.mu.data)) {
		m.mu.data = m.mu.data[:sizeBytes]
	} else {
		m.mu.data = append(m.mu.data, make([]byte, sizeBytes-int64(len(m.mu.data)))...)
	}
	n := blocks(sizeBytes)
	if n <= int64(len(m.mu.allocated)) {
		m.mu.allocated = m.mu.allocated[:n]
	} else {
		m.mu.allocated = append(m.mu.allocated, make([]bool, n-int64(len(m.mu.allocated)))...)
	}
}

// Size implements blockdev.Device.
func (m *Mem) Size() int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return int64(len(m.mu.data))
}

// Caps implements blockdev.Device.
func (m *Mem) Caps() blockdev.Caps { return m.caps }

// beginLocked runs the fault hook and the range check. m.mu must be held.
func (m *Mem) beginLocked(op Op, off, length int64, write bool) error {
	if m.mu.fault != nil {
		if err := m.mu.fault(op, off, length); err != nil {
			return err
		}
	}
	if write && m.caps.ReadOnly {
		return blockdev.ErrReadOnly
	}
	return blockdev.CheckRange(off, length, int64(len(m.mu.data)))
}

// ReadAt implements blockdev.Device.
func (m *Mem) ReadAt(_ context.Context, p []byte, off int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.beginLocked(OpRead, off, int64(len(p)), false); err != nil {
		return err
	}
	copy(p, m.mu.data[off:])
	return nil
}

// WriteAt implements blockdev.Device.
func (m *Mem) WriteAt(_ context.Context, p []byte, off int64, flags blockdev.Flags) error {
	if err := blockdev.CheckFlags(flags, blockdev.FUA); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.beginLocked(OpWrite, off, int64(len(p)), true); err != nil {
		return err
	}
	copy(m.mu.data[off:], p)
	m.markLocked(off, int64(len(p)), true, false)
	if flags&blockdev.FUA != 0 {
		m.mu.flushes++
	}
	return nil
}

// markLocked sets allocation for the blocks touched by [off, off+length). When
// whole is set only blocks entirely inside the range change. m.mu must be held.
func (m *Mem) markLocked(off, length int64, allocated, whole bool) {
	if length == 0 {
		return
	}
	first, last := off/BlockSizeBytes, (off+length-1)/BlockSizeBytes
	if whole {
		first = (off + BlockSizeBytes - 1) / BlockSizeBytes
		last = (off+length)/BlockSizeBytes - 1
		if off+length == int64(len(m.mu.data)) {
			last = blocks(int64(len(m.mu.data))) - 1
		}
	}
	for b := first; b <= last; b++ {
		m.mu.allocated[b] = allocated
	}
}

// Flush implements blockdev.Device.
func (m *Mem) Flush(context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.beginLocked(OpFlush, 0, 0, false); err != nil {
		return err
	}
	m.mu.flushes++
	return nil
}

// Trim implements blockdev.Trimmer: whole blocks inside the range become
// holes reading zeros; partial blocks keep their data.
func (m *Mem) Trim(_ context.Context, off, length int64, flags blockdev.Flags) error {
	if err := blockdev.CheckFlags(flags, blockdev.FUA); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.beginLocked(OpTrim, off, length, true); err != nil {
		return err
	}
	start := (off + BlockSizeBytes - 1) / BlockSizeBytes * BlockSizeBytes
	end := (off + length) / BlockSizeBytes * BlockSizeBytes
	if off+length == int64(len(m.mu.data)) {
		end = off + length
	}
	if end > start {
		clear(m.mu.data[start:end])
	}
	m.markLocked(off, length, false, true)
	return nil
}

// WriteZeroes implements blockdev.Zeroer.
func (m *Mem) WriteZeroes(_ context.Context, off, length int64, flags blockdev.Flags) error {
	if err := blockdev.CheckFlags(flags, blockdev.AllFlags); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.beginLocked(OpZero, off, length, true); err != nil {
		return err
	}
	clear(m.mu.data[off : off+length])
	if flags&blockdev.NoHole != 0 {
		m.markLocked(off, length, true, false)
	} else {
		m.markLocked(off, length, false, true)
	}
	return nil
}

// Extents implements blockdev.Extenter with one extent per run of equal
// allocation state (holes read as zeros).
func (m *Mem) Extents(_ context.Context, off, length int64, dst []blockdev.Extent) ([]blockdev.Extent, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.beginLocked(OpExtents, off, length, false); err != nil {
		return dst, err
	}
	end := off + length
	for pos := off; pos < end; {
		b := pos / BlockSizeBytes
		alloc := m.mu.allocated[b]
		next := (b + 1) * BlockSizeBytes
		for next < end && m.mu.allocated[next/BlockSizeBytes] == alloc {
			next += BlockSizeBytes
		}
		next = min(next, end)
		var f blockdev.ExtentFlags
		if !alloc {
			f = blockdev.ExtentHole | blockdev.ExtentZero
		}
		dst = append(dst, blockdev.Extent{LengthBytes: next - pos, Flags: f})
		pos = next
	}
	return dst, nil
}

// Cache implements blockdev.Cacher (a checked no-op).
func (m *Mem) Cache(_ context.Context, off, length int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.beginLocked(OpCache, off, length, false)
}
