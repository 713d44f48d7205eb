package lu

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"sync/atomic"

	"github.com/lupool/lupool/lu/lufs"
)

// blockState is what an overlay holds for one block. The values are part
// of the on-disk map format.
type blockState uint8

const (
	// stateBase: the block reads from the base (zeros without a base or
	// past the base's end).
	stateBase blockState = 0
	// stateData: the block was written here; it reads from the overlay's
	// data volume.
	stateData blockState = 1
	// stateZero: the block was trimmed or zeroed here; it reads as zeros
	// whatever the base holds.
	stateZero blockState = 2
	// 3 is invalid; a map holding it is corrupt.
	stateInvalid blockState = 3
)

// Map format constants; part of the on-disk format.
const (
	mapMagic       = "LUPOVMAP"
	mapVersion     = 1
	mapPageBytes   = 4096                      // the header page and every state page
	mapHeaderBytes = 8 + 2 + 2 + 4 + 8 + 8 + 2 // magic..baseNameLen
	mapBaseNameMax = 255
	mapFlagFrozen  = 1 << 0 // the layer is a read-only snapshot
	mapFlagsKnown  = mapFlagFrozen
	// A state page: generation (8), states (4084 bytes = 1021 words of 16
	// blocks), CRC-32C (4).
	mapPageStateBytes = mapPageBytes - 8 - 4
	blocksPerWord     = 16 // 2-bit states per uint32
	wordsPerPage      = mapPageStateBytes / 4
	blocksPerPage     = wordsPerPage * blocksPerWord // 16336
)

// mapSizeBytesMax bounds the volume size a map may describe (1 PiB), so a
// corrupt header cannot make the decoder allocate without limit.
const mapSizeBytesMax = 1 << 50

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// ErrCorruptMap is returned when neither slot of an overlay's map file
// holds a valid map (bad magic, version, length, checksum or state). A
// corrupt map is never used.
var ErrCorruptMap = errors.New("lu: overlay map corrupt")

// mapHeader is the decoded header of one map slot.
type mapHeader struct {
	flags      uint16
	generation uint64
	sizeBytes  int64
	baseName   string
}

// stateMap is an overlay's in-memory block map: 2 bits per block, 16
// blocks per word, block 16w+k at bits 2k..2k+1 of words[w]. Reads and
// updates are atomic per word, so the data path needs no lock to look a
// state up. dirty has one bit per map page changed since the map file
// last collected it. The slices change only under the overlay's write
// lock.
type stateMap struct {
	words  []atomic.Uint32
	dirty  []atomic.Uint64
	blocks int64
}

func newStateMap(blocks int64) *stateMap {
	pages := pagesOf(blocks)
	return &stateMap{
		words:  make([]atomic.Uint32, pages*wordsPerPage),
		dirty:  make([]atomic.Uint64, (pages+63)/64),
		blocks: blocks,
	}
}

// pagesOf is the number of state pages of a map of blocks blocks.
func pagesOf(blocks int64) int64 { return (blocks + blocksPerPage - 1) / blocksPerPage }

func (m *stateMap) get(i int64) blockState {
	w := m.words[i/blocksPerWord].Load()
	return blockState(w >> (2 * uint(i%blocksPerWord)) & 3)
}

// set stores s for block i and marks its page dirty if it changed.
func (m *stateMap) set(i int64, s blockState) {
	word := &m.words[i/blocksPerWord]
	shift := 2 * uint(i%blocksPerWord)
	for {
		old := word.Load()
		next := old&^(3<<shift) | uint32(s)<<shift
		if old == next {
			return
		}
		if word.CompareAndSwap(old, next) {
			page := i / blocksPerPage
			m.dirty[page/64].Or(1 << uint(page%64))
			return
		}
	}
}

// run returns the state of block i and how many blocks from i, up to end,
// share it.
func (m *stateMap) run(i, end int64) (blockState, int64) {
	s := m.get(i)
	n := int64(1)
	for i+n < end {
		// Skip whole words that are uniformly s.
		if (i+n)%blocksPerWord == 0 && i+n+blocksPerWord <= end {
			if m.words[(i+n)/blocksPerWord].Load() == uniformWord(s) {
				n += blocksPerWord
				continue
			}
		}
		if m.get(i+n) != s {
			break
		}
		n++
	}
	return s, n
}

func uniformWord(s blockState) uint32 {
	return uint32(s) * 0x55555555
}

// resized returns a copy holding the first min(blocks, m.blocks) states;
// new blocks take state fill.
func (m *stateMap) resized(blocks int64, fill blockState) *stateMap {
	n := newStateMap(blocks)
	for i := int64(0); i < blocks; i++ {
		if i < m.blocks {
			n.set(i, m.get(i))
		} else if fill != stateBase {
			n.set(i, fill)
		}
	}
	return n
}

// A map slot is a header page followed by state pages (every field little
// endian; part of the on-disk format):
//
//	header page (4096 bytes):
//	offset  bytes  field
//	0       8      magic "LUPOVMAP"
//	8       2      version (1)
//	10      2      flags (bit 0: frozen snapshot layer)
//	12      4      block size in bytes (4096)
//	16      8      generation (grows by one with every slot written)
//	24      8      volume size in bytes
//	32      2      base name length L (0 = no base), at most 255
//	34      L      base name (opaque to lu; the pool's name of the base)
//	34+L    4      CRC-32C (Castagnoli) of bytes [0, 34+L)
//	               the rest of the page is ignored
//
//	state page i (4096 bytes, at offset 4096*(i+1)), for blocks
//	[16336*i, 16336*(i+1)):
//	0       8      generation the page was written at (<= the header's)
//	8       4084   states, 2 bits each, block 16336*i + 4j + k at bits
//	               2k..2k+1 of byte j; value 3 is invalid; bits past the
//	               last block are 0
//	4092    4      CRC-32C of bytes [0, 4092)
//
// A slot holds ceil(blocks/16336) state pages; bytes after them are
// ignored. A flush rewrites only the pages that changed since that slot
// was last written, then the header; see mapFile.

// encodeHeader returns the header page of h.
func encodeHeader(h mapHeader) []byte {
	b := make([]byte, 0, mapPageBytes)
	b = append(b, mapMagic...)
	b = binary.LittleEndian.AppendUint16(b, mapVersion)
	b = binary.LittleEndian.AppendUint16(b, h.flags)
	b = binary.LittleEndian.AppendUint32(b, BlockSizeBytes)
	b = binary.LittleEndian.AppendUint64(b, h.generation)
	b = binary.LittleEndian.AppendUint64(b, uint64(h.sizeBytes))
	b = binary.LittleEndian.AppendUint16(b, uint16(len(h.baseName)))
	b = append(b, h.baseName...)
	b = binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
	return b[:mapPageBytes]
}

// encodePage appends state page i of states, stamped with gen, to dst.
func encodePage(dst []byte, states *stateMap, i int64, gen uint64) []byte {
	start := len(dst)
	dst = binary.LittleEndian.AppendUint64(dst, gen)
	for w := i * wordsPerPage; w < (i+1)*wordsPerPage; w++ {
		dst = binary.LittleEndian.AppendUint32(dst, states.words[w].Load())
	}
	return binary.LittleEndian.AppendUint32(dst, crc32.Checksum(dst[start:], castagnoli))
}

// encodeMap returns a whole slot: the header and every state page.
func encodeMap(h mapHeader, states *stateMap) []byte {
	pages := pagesOf(states.blocks)
	b := make([]byte, mapPageBytes, mapPageBytes*(1+pages))
	copy(b, encodeHeader(h))
	for i := int64(0); i < pages; i++ {
		b = encodePage(b, states, i, h.generation)
	}
	return b
}

func corruptf(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrCorruptMap, fmt.Sprintf(format, args...))
}

// decodeHeader checks and decodes a header page.
func decodeHeader(b []byte) (mapHeader, error) {
	var h mapHeader
	if len(b) < mapPageBytes {
		return h, corruptf("%d bytes, shorter than a header page", len(b))
	}
	if string(b[:8]) != mapMagic {
		return h, corruptf("bad magic %q", b[:8])
	}
	nameLen := int(binary.LittleEndian.Uint16(b[32:]))
	if nameLen > mapBaseNameMax {
		return h, corruptf("base name of %d bytes", nameLen)
	}
	end := mapHeaderBytes + nameLen
	if sum, want := crc32.Checksum(b[:end], castagnoli), binary.LittleEndian.Uint32(b[end:]); sum != want {
		return h, corruptf("header checksum %#08x, stored %#08x", sum, want)
	}
	if v := binary.LittleEndian.Uint16(b[8:]); v != mapVersion {
		return h, corruptf("version %d, want %d", v, mapVersion)
	}
	h.flags = binary.LittleEndian.Uint16(b[10:])
	if h.flags&^mapFlagsKnown != 0 {
		return h, corruptf("unknown flags %#x", h.flags)
	}
	if bs := binary.LittleEndian.Uint32(b[12:]); bs != BlockSizeBytes {
		return h, corruptf("block size %d, want %d", bs, BlockSizeBytes)
	}
	h.generation = binary.LittleEndian.Uint64(b[16:])
	size := binary.LittleEndian.Uint64(b[24:])
	if size > mapSizeBytesMax {
		return h, corruptf("volume size %d beyond %d", size, uint64(mapSizeBytesMax))
	}
	h.sizeBytes = int64(size)
	h.baseName = string(b[mapHeaderBytes:end])
	return h, nil
}

// decodePage checks state page i (b is the page) of a map of header h and
// stores its states.
func decodePage(b []byte, h mapHeader, states *stateMap, i int64) error {
	if sum, want := crc32.Checksum(b[:mapPageBytes-4], castagnoli), binary.LittleEndian.Uint32(b[mapPageBytes-4:]); sum != want {
		return corruptf("page %d checksum %#08x, stored %#08x", i, sum, want)
	}
	if gen := binary.LittleEndian.Uint64(b); gen > h.generation {
		return corruptf("page %d of generation %d in a map of generation %d (a torn write)", i, gen, h.generation)
	}
	for w := int64(0); w < wordsPerPage; w++ {
		word := binary.LittleEndian.Uint32(b[8+4*w:])
		first := i*blocksPerPage + w*blocksPerWord
		for k := int64(0); k < blocksPerWord; k++ {
			s := blockState(word >> (2 * uint(k)) & 3)
			switch {
			case first+k >= states.blocks && s != stateBase:
				return corruptf("page %d: state set past the last block", i)
			case s == stateInvalid:
				return corruptf("block %d has state 3", first+k)
			}
		}
		states.words[i*wordsPerPage+w].Store(word)
	}
	return nil
}

// decodeMap checks and decodes a whole slot. Bytes after the last page
// are ignored. Any fault returns an error matching ErrCorruptMap.
func decodeMap(b []byte) (mapHeader, *stateMap, error) {
	h, err := decodeHeader(b)
	if err != nil {
		return mapHeader{}, nil, err
	}
	blocks := (h.sizeBytes + BlockSizeBytes - 1) / BlockSizeBytes
	pages := pagesOf(blocks)
	if int64(len(b)) < mapPageBytes*(1+pages) {
		return mapHeader{}, nil, corruptf("%d bytes, the header asks for %d pages", len(b), pages)
	}
	states := newStateMap(blocks)
	for i := int64(0); i < pages; i++ {
		off := mapPageBytes * (1 + i)
		if err := decodePage(b[off:off+mapPageBytes], h, states, i); err != nil {
			return mapHeader{}, nil, err
		}
	}
	return h, states, nil
}

// mapFile keeps an overlay's map durable in two slot files, <path>.0 and
// <path>.1, written in turn. A write goes to the slot that does not hold
// the newest map: first the state pages that changed since that slot was
// last written (the pages dirtied since, collected from the stateMap into
// both slots' pending sets), synced, then the header with the new
// generation, synced. Every page carries the generation it was written
// at, so a slot whose pages outran its header (a write cut short) is
// refused rather than read as a mix. A crash in the middle of a write
// leaves the other slot whole; on open the valid slot with the higher
// generation wins, and the other is rewritten whole at its next write.
// Not safe for concurrent use: the overlay serializes writes (flushMu).
type mapFile struct {
	fs    lufs.FS      // immutable
	path  string       // immutable
	files [2]lufs.File // immutable; closed by close
	gen   uint64       // generation of the newest slot written or read
	next  int          // slot the next write goes to
	pages int64        // state pages of the last write
	// pending[s] has a bit per page changed since slot s was last written;
	// needFull[s] says slot s must be written whole (its content is not
	// known, or the page count changed).
	pending  [2][]uint64
	needFull [2]bool
}

// createMapFile creates both slot files (failing if either exists), writes
// the first map into slot 0, syncs it and the directory.
func createMapFile(fs lufs.FS, path string, h mapHeader, states *stateMap) (*mapFile, error) {
	mf := &mapFile{fs: fs, path: path}
	for i := range mf.files {
		f, err := fs.OpenFile(slotPath(path, i), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			mf.closeAndRemove(i)
			if errors.Is(err, os.ErrExist) {
				return nil, fmt.Errorf("%w: %s: %w", ErrExists, slotPath(path, i), err)
			}
			return nil, ioError("create", slotPath(path, i), err)
		}
		mf.files[i] = f
	}
	if err := mf.write(h, states); err != nil {
		mf.closeAndRemove(2)
		return nil, err
	}
	if err := fs.SyncDir(filepath.Dir(path)); err != nil {
		mf.closeAndRemove(2)
		return nil, ioError("sync dir", path, err)
	}
	return mf, nil
}

func (mf *mapFile) closeAndRemove(opened int) {
	for i := 0; i < opened; i++ {
		_ = mf.files[i].Close()
		_ = mf.fs.Remove(slotPath(mf.path, i))
	}
}

func slotPath(path string, i int) string { return fmt.Sprintf("%s.%d", path, i) }

// openMapFile opens both slots and returns the newest valid map, or an
// error matching ErrCorruptMap when neither is valid.
func openMapFile(fs lufs.FS, path string) (*mapFile, mapHeader, *stateMap, error) {
	mf := &mapFile{fs: fs, path: path}
	var (
		best       = -1
		bestHeader mapHeader
		bestStates *stateMap
		errs       []error
	)
	for i := range mf.files {
		f, err := fs.OpenFile(slotPath(path, i), os.O_RDWR, 0)
		if err != nil {
			for j := 0; j < i; j++ {
				_ = mf.files[j].Close()
			}
			return nil, mapHeader{}, nil, ioError("open", slotPath(path, i), err)
		}
		mf.files[i] = f
		h, states, err := readSlot(f)
		if err != nil {
			errs = append(errs, fmt.Errorf("slot %d: %w", i, err))
			continue
		}
		if best < 0 || h.generation > bestHeader.generation {
			best, bestHeader, bestStates = i, h, states
		}
	}
	if best < 0 {
		_ = mf.close()
		return nil, mapHeader{}, nil, fmt.Errorf("lu: overlay map %s: %w", path, errors.Join(errs...))
	}
	mf.gen, mf.next = bestHeader.generation, 1-best
	mf.sizePending(pagesOf(bestStates.blocks))
	mf.needFull[1-best] = true // it may be torn or old
	return mf, bestHeader, bestStates, nil
}

// sizePending sizes the pending sets for pages state pages; a change of
// page count makes both slots need a whole write.
func (mf *mapFile) sizePending(pages int64) {
	if pages == mf.pages && mf.pending[0] != nil {
		return
	}
	mf.pages = pages
	for s := range mf.pending {
		mf.pending[s] = make([]uint64, (pages+63)/64)
		mf.needFull[s] = true
	}
}

// forceFull makes the next write of both slots whole (after a resize,
// whose cut pages must not survive in either slot).
func (mf *mapFile) forceFull() { mf.needFull = [2]bool{true, true} }

func readSlot(f lufs.File) (mapHeader, *stateMap, error) {
	size, err := f.Size()
	if err != nil {
		return mapHeader{}, nil, err
	}
	if size > mapPageBytes*(1+pagesOf(mapSizeBytesMax/BlockSizeBytes)) {
		return mapHeader{}, nil, fmt.Errorf("%w: slot of %d bytes", ErrCorruptMap, size)
	}
	b := make([]byte, size)
	if _, err := f.ReadAt(b, 0); err != nil && err != io.EOF {
		return mapHeader{}, nil, err
	}
	return decodeMap(b)
}

// mapWrite is one prepared slot write: encoded before the data volume is
// flushed, committed after (see Overlay.Flush).
type mapWrite struct {
	slot   int
	gen    uint64
	header []byte
	pages  []int64 // state page indexes, ascending
	data   []byte  // their encodings, in order
}

// prepare collects the pages states dirtied and encodes what the next
// slot needs: every page when full (the states were replaced wholesale)
// or the slot needs it, else the pages changed since the slot was last
// written.
func (mf *mapFile) prepare(h mapHeader, states *stateMap, full bool) *mapWrite {
	pages := pagesOf(states.blocks)
	mf.sizePending(pages)
	for w := range states.dirty {
		if d := states.dirty[w].Swap(0); d != 0 && w < len(mf.pending[0]) {
			mf.pending[0][w] |= d
			mf.pending[1][w] |= d
		}
	}
	slot := mf.next
	h.generation = mf.gen + 1
	mw := &mapWrite{slot: slot, gen: h.generation, header: encodeHeader(h)}
	whole := full || mf.needFull[slot]
	if whole {
		mw.data = make([]byte, 0, pages*mapPageBytes)
	}
	for i := int64(0); i < pages; i++ {
		if whole || mf.pending[slot][i/64]&(1<<uint(i%64)) != 0 {
			mw.pages = append(mw.pages, i)
			mw.data = encodePage(mw.data, states, i, h.generation)
		}
	}
	if full {
		// The other slot's pending pages do not cover a wholesale change.
		mf.needFull[1-slot] = true
	}
	return mw
}

// commit writes a prepared write: pages, sync, header, sync. On success
// its slot is the newest; on failure the slot must be written whole next.
func (mf *mapFile) commit(mw *mapWrite) error {
	f, path := mf.files[mw.slot], slotPath(mf.path, mw.slot)
	err := mf.writePages(f, mw)
	if err == nil {
		err = f.Sync()
	}
	if err == nil {
		_, err = f.WriteAt(mw.header, 0)
	}
	if err == nil {
		err = f.Sync()
	}
	if err != nil {
		mf.needFull[mw.slot] = true
		return ioError("write map", path, err)
	}
	clear(mf.pending[mw.slot])
	mf.needFull[mw.slot] = false
	mf.gen, mf.next = mw.gen, 1-mw.slot
	return nil
}

// writePages writes the prepared pages, one call per run of adjacent ones.
func (mf *mapFile) writePages(f lufs.File, mw *mapWrite) error {
	for k := 0; k < len(mw.pages); {
		j := k + 1
		for j < len(mw.pages) && mw.pages[j] == mw.pages[j-1]+1 {
			j++
		}
		if _, err := f.WriteAt(mw.data[k*mapPageBytes:j*mapPageBytes], mapPageBytes*(1+mw.pages[k])); err != nil {
			return err
		}
		k = j
	}
	return nil
}

// write stores h and states whole in the next slot and syncs it.
func (mf *mapFile) write(h mapHeader, states *stateMap) error {
	return mf.commit(mf.prepare(h, states, true))
}

func (mf *mapFile) close() error {
	var errs []error
	for _, f := range mf.files {
		if f != nil {
			errs = append(errs, f.Close())
		}
	}
	return errors.Join(errs...)
}

// remove closes and deletes both slot files.
func (mf *mapFile) remove() error {
	err := mf.close()
	for i := range mf.files {
		if rerr := mf.fs.Remove(slotPath(mf.path, i)); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
			err = errors.Join(err, rerr)
		}
	}
	return err
}
