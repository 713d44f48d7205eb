// Package blockcopy copies one block device's content into another the
// way an image import must: sparse-aware and checked.
//
// Copy walks the source in chunks. Ranges the source reports as reading
// zeros (blockdev.Extenter, ExtentZero) are not read; data ranges are
// read, and every 4 KiB block of them that is all zeros is skipped too.
// Only the other blocks are written, coalesced into one write per run.
// The destination must read zeros where nothing is written (a new thin
// LU does), so neither holes nor zero blocks are sent or allocated.
//
// Both sides are summarized by a content hash that does not depend on how
// zeros are stored:
//
//	SHA-256( size as 8 bytes little endian
//	         || for each 4 KiB block, in order, that is not all zeros:
//	            block index as 8 bytes little endian || the block's bytes )
//
// (the last block may be shorter than 4 KiB). Copy returns the source's
// hash, computed on the way in; Hash computes a device's, so an importer
// checks the stored copy against it at the end. A copy resumed after an
// interruption (Options.StartBytes) reads the prefix again for the hash,
// without writing it.
package blockcopy

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"

	"github.com/lupool/lupool/blockdev"
)

// BlockBytes is the unit of zero detection and of the content hash; part
// of the hash's definition.
const BlockBytes = 4096

// Default and largest chunk sizes.
const (
	DefaultChunkBytes = 1 << 20
	MaxChunkBytes     = 32 << 20
)

// ErrMismatch is returned by Verify when the stored copy's hash differs
// from the source's.
var ErrMismatch = errors.New("blockcopy: stored copy differs from the source")

// Options tune Copy. The zero value is valid.
type Options struct {
	// ChunkBytes is how much is read at once: a multiple of BlockBytes, at
	// most MaxChunkBytes; 0 means DefaultChunkBytes.
	ChunkBytes int
	// StartBytes resumes an interrupted copy: the destination already holds
	// [0, StartBytes). A multiple of BlockBytes, at most the size.
	StartBytes int64
	// Progress, if set, is called after each chunk with the bytes of the
	// source walked so far (holes included) and the bytes written so far.
	// A resumed copy reports from StartBytes on.
	Progress func(doneBytes, sentBytes int64)
}

// Stats say what a copy did.
type Stats struct {
	SizeBytes int64
	// SentBytes were written to the destination.
	SentBytes int64
	// HoleBytes were reported zero by the source and never read.
	HoleBytes int64
	// ZeroBytes were read, found all zeros and not written.
	ZeroBytes int64
	// Hash is the source's content hash (see the package doc).
	Hash [sha256.Size]byte
}

func (o *Options) validate(size int64) error {
	if o.ChunkBytes == 0 {
		o.ChunkBytes = DefaultChunkBytes
	}
	if o.ChunkBytes < BlockBytes || o.ChunkBytes > MaxChunkBytes || o.ChunkBytes%BlockBytes != 0 {
		return fmt.Errorf("blockcopy: chunk of %d bytes: %w", o.ChunkBytes, blockdev.ErrInvalid)
	}
	if o.StartBytes < 0 || o.StartBytes > size || o.StartBytes%BlockBytes != 0 && o.StartBytes != size {
		return fmt.Errorf("blockcopy: resume at %d of %d bytes: %w", o.StartBytes, size, blockdev.ErrInvalid)
	}
	return nil
}

// Copy copies src into dst (which must be at least as large and read
// zeros where it was never written) and flushes dst. See the package doc.
// On error, what was written stays; Stats.SentBytes says how much, and a
// new Copy with StartBytes at a chunk boundary below the failure resumes.
func Copy(ctx context.Context, dst, src blockdev.Device, opts Options) (Stats, error) {
	size := src.Size()
	st := Stats{SizeBytes: size}
	if dst.Size() < size {
		return st, fmt.Errorf("blockcopy: destination of %d bytes is smaller than the source (%d): %w", dst.Size(), size, blockdev.ErrOutOfRange)
	}
	if err := opts.validate(size); err != nil {
		return st, err
	}
	h := newHasher(size)
	buf := make([]byte, opts.ChunkBytes)
	for off := int64(0); off < size; {
		n := min(int64(opts.ChunkBytes), size-off)
		write := off >= opts.StartBytes
		runs, err := dataRuns(ctx, src, off, n)
		if err != nil {
			return st, err
		}
		for _, r := range runs {
			if !r.data {
				if write {
					st.HoleBytes += r.length
				}
				continue
			}
			p := buf[:r.length]
			if err := src.ReadAt(ctx, p, r.off); err != nil {
				return st, fmt.Errorf("blockcopy: read source at %d: %w", r.off, err)
			}
			sent, zero, err := h.addAndWrite(ctx, p, r.off, dst, write)
			st.SentBytes += sent
			st.ZeroBytes += zero
			if err != nil {
				return st, err
			}
		}
		off += n
		if write && opts.Progress != nil {
			opts.Progress(off, st.SentBytes)
		}
	}
	if err := dst.Flush(ctx); err != nil {
		return st, fmt.Errorf("blockcopy: flush destination: %w", err)
	}
	st.Hash = h.sum()
	return st, nil
}

// Hash computes d's content hash over its first sizeBytes, reading only
// what d does not report as zeros.
func Hash(ctx context.Context, d blockdev.Device, sizeBytes int64) ([sha256.Size]byte, error) {
	if sizeBytes < 0 || sizeBytes > d.Size() {
		return [sha256.Size]byte{}, fmt.Errorf("blockcopy: hash %d bytes of a %d-byte device: %w", sizeBytes, d.Size(), blockdev.ErrOutOfRange)
	}
	h := newHasher(sizeBytes)
	buf := make([]byte, DefaultChunkBytes)
	for off := int64(0); off < sizeBytes; {
		n := min(int64(len(buf)), sizeBytes-off)
		runs, err := dataRuns(ctx, d, off, n)
		if err != nil {
			return [sha256.Size]byte{}, err
		}
		for _, r := range runs {
			if !r.data {
				continue
			}
			p := buf[:r.length]
			if err := d.ReadAt(ctx, p, r.off); err != nil {
				return [sha256.Size]byte{}, fmt.Errorf("blockcopy: read at %d: %w", r.off, err)
			}
			if _, _, err := h.addAndWrite(ctx, p, r.off, nil, false); err != nil {
				return [sha256.Size]byte{}, err
			}
		}
		off += n
	}
	return h.sum(), nil
}

// Verify hashes dst's first want.SizeBytes and compares with the source's
// hash in want; a difference is ErrMismatch.
func Verify(ctx context.Context, dst blockdev.Device, want Stats) error {
	got, err := Hash(ctx, dst, want.SizeBytes)
	if err != nil {
		return err
	}
	if got != want.Hash {
		return fmt.Errorf("%w: hash %x, source %x", ErrMismatch, got[:8], want.Hash[:8])
	}
	return nil
}

// run is a block-aligned piece of a chunk: data to read, or zeros.
type run struct {
	off, length int64
	data        bool
}

// dataRuns splits [off, off+n) into runs by the device's extents (all
// data when it has none). Run edges are rounded out to BlockBytes so that
// zero detection and the hash see whole blocks.
func dataRuns(ctx context.Context, d blockdev.Device, off, n int64) ([]run, error) {
	ext, ok := d.(blockdev.Extenter)
	if !ok {
		return []run{{off, n, true}}, nil
	}
	var runs []run
	var scratch []blockdev.Extent
	end := off + n
	for pos := off; pos < end; {
		var err error
		scratch, err = ext.Extents(ctx, pos, end-pos, scratch[:0])
		if err != nil {
			return nil, fmt.Errorf("blockcopy: extents at %d: %w", pos, err)
		}
		if len(scratch) == 0 {
			return nil, fmt.Errorf("blockcopy: no extent at %d: %w", pos, blockdev.ErrIO)
		}
		for _, e := range scratch {
			l := min(e.LengthBytes, end-pos)
			if l <= 0 {
				break
			}
			runs = appendRun(runs, pos, l, e.Flags&blockdev.ExtentZero == 0)
			pos += l
		}
	}
	return alignRuns(runs, off, end), nil
}

func appendRun(runs []run, off, length int64, data bool) []run {
	if k := len(runs); k > 0 && runs[k-1].data == data {
		runs[k-1].length += length
		return runs
	}
	return append(runs, run{off, length, data})
}

// alignRuns widens data runs to whole blocks (a block partly data is read
// whole) and merges what then touches; zero runs shrink to what is left.
func alignRuns(runs []run, start, end int64) []run {
	var out []run
	pos := start
	for _, r := range runs {
		if !r.data {
			continue
		}
		lo := max(start+(r.off-start)/BlockBytes*BlockBytes, pos)
		hi := min(start+(r.off+r.length-start+BlockBytes-1)/BlockBytes*BlockBytes, end)
		if lo > pos {
			out = appendRun(out, pos, lo-pos, false)
		}
		if hi > lo {
			out = appendRun(out, lo, hi-lo, true)
		}
		pos = max(pos, hi)
	}
	if pos < end {
		out = appendRun(out, pos, end-pos, false)
	}
	return out
}

// hasher builds the content hash.
type hasher struct {
	h   hash.Hash
	idx [8]byte
}

func newHasher(size int64) *hasher {
	h := &hasher{h: sha256.New()}
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], uint64(size))
	h.h.Write(b[:])
	return h
}

func (h *hasher) sum() (out [sha256.Size]byte) {
	copy(out[:], h.h.Sum(nil))
	return out
}

// addAndWrite hashes the blocks of p (at off, block aligned) that are not
// all zeros and, when write is set, writes each run of them to dst.
func (h *hasher) addAndWrite(ctx context.Context, p []byte, off int64, dst blockdev.Device, write bool) (sent, zero int64, err error) {
	runStart := -1
	flush := func(endIdx int) error {
		if runStart < 0 || !write {
			runStart = -1
			return nil
		}
		q := p[runStart:endIdx]
		if err := dst.WriteAt(ctx, q, off+int64(runStart), 0); err != nil {
			return fmt.Errorf("blockcopy: write destination at %d: %w", off+int64(runStart), err)
		}
		sent += int64(len(q))
		runStart = -1
		return nil
	}
	for i := 0; i < len(p); i += BlockBytes {
		b := p[i:min(i+BlockBytes, len(p))]
		if allZero(b) {
			zero += int64(len(b))
			if err := flush(i); err != nil {
				return sent, zero, err
			}
			continue
		}
		binary.LittleEndian.PutUint64(h.idx[:], uint64((off+int64(i))/BlockBytes))
		h.h.Write(h.idx[:])
		h.h.Write(b)
		if runStart < 0 {
			runStart = i
		}
	}
	if !write {
		zero = 0
	}
	return sent, zero, flush(len(p))
}

func allZero(b []byte) bool {
	for len(b) >= 8 {
		if binary.LittleEndian.Uint64(b) != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
