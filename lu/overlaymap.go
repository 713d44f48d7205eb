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

	"github.com/lupool/lupool/blockdev"
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
	mapMagic         = "LUPOVMAP"
	mapVersion       = 1
	mapHeaderBytes   = 8 + 2 + 2 + 4 + 8 + 8 + 2 // magic..baseNameLen
	mapTrailerBytes  = 4                         // crc32c
	mapBaseNameMax   = 255
	mapFlagFrozen    = 1 << 0 // the layer is a read-only snapshot
	mapFlagsKnown    = mapFlagFrozen
	blocksPerWord    = 16 // 2-bit states per uint32
	stateBitsPerWord = 32
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
// state up. The slice itself changes only under the overlay's write lock.
type stateMap struct {
	words  []atomic.Uint32
	blocks int64
}

func newStateMap(blocks int64) *stateMap {
	return &stateMap{words: make([]atomic.Uint32, (blocks+blocksPerWord-1)/blocksPerWord), blocks: blocks}
}

func (m *stateMap) get(i int64) blockState {
	w := m.words[i/blocksPerWord].Load()
	return blockState(w >> (2 * uint(i%blocksPerWord)) & 3)
}

func (m *stateMap) set(i int64, s blockState) {
	word := &m.words[i/blocksPerWord]
	shift := 2 * uint(i%blocksPerWord)
	for {
		old := word.Load()
		next := old&^(3<<shift) | uint32(s)<<shift
		if old == next || word.CompareAndSwap(old, next) {
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

// encodeMap lays out one map slot:
//
//	offset  bytes  field
//	0       8      magic "LUPOVMAP"
//	8       2      version (1), little endian like every field
//	10      2      flags (bit 0: frozen snapshot layer)
//	12      4      block size in bytes (4096)
//	16      8      generation (grows by one with every slot written)
//	24      8      volume size in bytes
//	32      2      base name length L (0 = no base), at most 255
//	34      L      base name (opaque to lu; the pool's name of the base)
//	34+L    S      block states, 2 bits each, 4 per byte, block 4j+k at
//	               bits 2k..2k+1 of byte j; S = ceil(blocks/4); value 3 is
//	               invalid; unused bits of the last byte are 0
//	34+L+S  4      CRC-32C (Castagnoli) of every byte before it
func encodeMap(h mapHeader, states *stateMap) []byte {
	stateBytes := (states.blocks + 3) / 4
	b := make([]byte, 0, mapHeaderBytes+int64(len(h.baseName))+stateBytes+mapTrailerBytes)
	b = append(b, mapMagic...)
	b = binary.LittleEndian.AppendUint16(b, mapVersion)
	b = binary.LittleEndian.AppendUint16(b, h.flags)
	b = binary.LittleEndian.AppendUint32(b, BlockSizeBytes)
	b = binary.LittleEndian.AppendUint64(b, h.generation)
	b = binary.LittleEndian.AppendUint64(b, uint64(h.sizeBytes))
	b = binary.LittleEndian.AppendUint16(b, uint16(len(h.baseName)))
	b = append(b, h.baseName...)
	for w := range states.words {
		var word [4]byte
		binary.LittleEndian.PutUint32(word[:], states.words[w].Load())
		b = append(b, word[:]...)
	}
	b = b[:mapHeaderBytes+len(h.baseName)+int(stateBytes)] // drop the last word's unused bytes
	if tail := states.blocks % 4; tail != 0 {
		b[len(b)-1] &= byte(1)<<(2*uint(tail)) - 1
	}
	return binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
}

// decodeMap checks and decodes one map slot. Bytes after the checksum are
// ignored (a slot file may hold an older, longer map's tail). Any fault
// returns an error matching ErrCorruptMap.
func decodeMap(b []byte) (mapHeader, *stateMap, error) {
	var h mapHeader
	corrupt := func(format string, args ...any) (mapHeader, *stateMap, error) {
		return mapHeader{}, nil, fmt.Errorf("%w: %s", ErrCorruptMap, fmt.Sprintf(format, args...))
	}
	if len(b) < mapHeaderBytes+mapTrailerBytes {
		return corrupt("%d bytes, shorter than a header", len(b))
	}
	if string(b[:8]) != mapMagic {
		return corrupt("bad magic %q", b[:8])
	}
	if v := binary.LittleEndian.Uint16(b[8:]); v != mapVersion {
		return corrupt("version %d, want %d", v, mapVersion)
	}
	h.flags = binary.LittleEndian.Uint16(b[10:])
	if h.flags&^mapFlagsKnown != 0 {
		return corrupt("unknown flags %#x", h.flags)
	}
	if bs := binary.LittleEndian.Uint32(b[12:]); bs != BlockSizeBytes {
		return corrupt("block size %d, want %d", bs, BlockSizeBytes)
	}
	h.generation = binary.LittleEndian.Uint64(b[16:])
	size := binary.LittleEndian.Uint64(b[24:])
	if size > mapSizeBytesMax {
		return corrupt("volume size %d beyond %d", size, uint64(mapSizeBytesMax))
	}
	h.sizeBytes = int64(size)
	nameLen := int(binary.LittleEndian.Uint16(b[32:]))
	if nameLen > mapBaseNameMax {
		return corrupt("base name of %d bytes", nameLen)
	}
	blocks := (h.sizeBytes + BlockSizeBytes - 1) / BlockSizeBytes
	stateBytes := int((blocks + 3) / 4)
	end := mapHeaderBytes + nameLen + stateBytes
	if len(b) < end+mapTrailerBytes {
		return corrupt("%d bytes, the header asks for %d", len(b), end+mapTrailerBytes)
	}
	if sum, want := crc32.Checksum(b[:end], castagnoli), binary.LittleEndian.Uint32(b[end:]); sum != want {
		return corrupt("checksum %#08x, stored %#08x", sum, want)
	}
	h.baseName = string(b[mapHeaderBytes : mapHeaderBytes+nameLen])
	states := newStateMap(blocks)
	raw := b[mapHeaderBytes+nameLen : end]
	for i := int64(0); i < blocks; i++ {
		s := blockState(raw[i/4] >> (2 * uint(i%4)) & 3)
		if s == stateInvalid {
			return corrupt("block %d has state 3", i)
		}
		states.set(i, s)
	}
	if tail := blocks % 4; tail != 0 && raw[len(raw)-1]>>(2*uint(tail)) != 0 {
		return corrupt("unused bits set after block %d", blocks-1)
	}
	return h, states, nil
}

// mapFile keeps an overlay's map durable in two slot files, <path>.0 and
// <path>.1, written in turn: a new map goes whole into the slot that does
// not hold the newest valid map, then is synced. A crash in the middle of
// a slot write leaves the other slot intact; on open the valid slot with
// the higher generation wins and a slot that fails its checksum is never
// used. Not safe for concurrent use: the overlay serializes writes.
type mapFile struct {
	fs    lufs.FS      // immutable
	path  string       // immutable
	files [2]lufs.File // immutable; closed by close
	gen   uint64       // generation of the newest slot written or read
	next  int          // slot the next write goes to
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
		mf.close()
		return nil, mapHeader{}, nil, fmt.Errorf("lu: overlay map %s: %w", path, errors.Join(errs...))
	}
	mf.gen, mf.next = bestHeader.generation, 1-best
	return mf, bestHeader, bestStates, nil
}

func readSlot(f lufs.File) (mapHeader, *stateMap, error) {
	size, err := f.Size()
	if err != nil {
		return mapHeader{}, nil, err
	}
	if size > mapSizeBytesMax/BlockSizeBytes/4+mapHeaderBytes+mapBaseNameMax+mapTrailerBytes {
		return mapHeader{}, nil, fmt.Errorf("%w: slot of %d bytes", ErrCorruptMap, size)
	}
	b := make([]byte, size)
	if _, err := f.ReadAt(b, 0); err != nil && err != io.EOF {
		return mapHeader{}, nil, err
	}
	return decodeMap(b)
}

// write stores h and states (with the next generation) in the next slot
// and syncs it; on success that slot is the newest.
func (mf *mapFile) write(h mapHeader, states *stateMap) error {
	h.generation = mf.gen + 1
	return mf.writeEncoded(encodeMap(h, states), h.generation)
}

// writeEncoded stores b, an encoded map of generation gen (mf.gen+1), in
// the next slot and syncs it.
func (mf *mapFile) writeEncoded(b []byte, gen uint64) error {
	if gen != mf.gen+1 {
		return fmt.Errorf("lu: map %s: generation %d after %d: %w", mf.path, gen, mf.gen, blockdev.ErrInvalid)
	}
	f := mf.files[mf.next]
	if _, err := f.WriteAt(b, 0); err != nil {
		return ioError("write map", slotPath(mf.path, mf.next), err)
	}
	if err := f.Sync(); err != nil {
		return ioError("sync map", slotPath(mf.path, mf.next), err)
	}
	mf.gen, mf.next = gen, 1-mf.next
	return nil
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
