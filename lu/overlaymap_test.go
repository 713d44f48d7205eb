package lu

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"os"
	"testing"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/lu/lufs"
)

func sampleStates(blocks int64) *stateMap {
	m := newStateMap(blocks)
	for i := int64(0); i < blocks; i++ {
		m.set(i, blockState(i*7%3))
	}
	return m
}

func TestMapEncodeDecodeRoundTrip(t *testing.T) {
	for _, size := range []int64{0, 512, 4096, 4096*5 + 512, 4096 * 64, 1<<20 + 4096*3} {
		h := mapHeader{flags: mapFlagFrozen, generation: 42, sizeBytes: size, baseName: "img/0"}
		states := sampleStates(blocksOf(size))
		b := encodeMap(h, states)
		got, gotStates, err := decodeMap(append(b, "trailing garbage"...))
		if err != nil {
			t.Fatalf("size %d: %v", size, err)
		}
		if got != h {
			t.Fatalf("size %d: header %+v, want %+v", size, got, h)
		}
		for i := int64(0); i < states.blocks; i++ {
			if gotStates.get(i) != states.get(i) {
				t.Fatalf("size %d: block %d state %d, want %d", size, i, gotStates.get(i), states.get(i))
			}
		}
	}
}

// TestMapDecodeRejectsEveryFlippedBit: a single flipped bit in the header
// up to its checksum, or in the state pages (every 13th byte of them, to
// keep it quick; the CRC covers them alike), is detected, never decoded
// into a different map.
func TestMapDecodeRejectsEveryFlippedBit(t *testing.T) {
	h := mapHeader{generation: 3, sizeBytes: 4096*blocksPerPage + 4096*9 + 512, baseName: "base"}
	b := encodeMap(h, sampleStates(blocksPerPage+10))
	covered := func(i int) bool {
		return i >= mapPageBytes && (i%13 == 0 || i%mapPageBytes < 16 || i%mapPageBytes >= mapPageBytes-8) ||
			i < mapHeaderBytes+len(h.baseName)+4
	}
	for i := range b {
		if !covered(i) {
			continue
		}
		for bit := range 8 {
			c := bytes.Clone(b)
			c[i] ^= 1 << bit
			if _, _, err := decodeMap(c); !errors.Is(err, ErrCorruptMap) {
				t.Fatalf("byte %d bit %d flipped: %v, want ErrCorruptMap", i, bit, err)
			}
		}
	}
	for n := 0; n < len(b); n += 97 {
		if _, _, err := decodeMap(b[:n]); !errors.Is(err, ErrCorruptMap) {
			t.Fatalf("cut to %d bytes: %v, want ErrCorruptMap", n, err)
		}
	}
}

// TestMapDecodeRejectsBadPages: well-checksummed pages holding state 3, a
// state past the last block, or a generation newer than the header's (a
// write cut short before its header) are refused.
func TestMapDecodeRejectsBadPages(t *testing.T) {
	reseal := func(b []byte) {
		page := b[mapPageBytes : 2*mapPageBytes]
		binary.LittleEndian.PutUint32(page[mapPageBytes-4:], crc32.Checksum(page[:mapPageBytes-4], castagnoli))
	}
	for name, mutate := range map[string]func(b []byte){
		"state 3":          func(b []byte) { b[mapPageBytes+8] = 3 << 2 },
		"past the end":     func(b []byte) { b[mapPageBytes+8+1] = 1 }, // block 4 of a 4-block map
		"newer generation": func(b []byte) { binary.LittleEndian.PutUint64(b[mapPageBytes:], 2) },
	} {
		b := encodeMap(mapHeader{generation: 1, sizeBytes: 4096 * 4}, newStateMap(4))
		mutate(b)
		reseal(b)
		if _, _, err := decodeMap(b); !errors.Is(err, ErrCorruptMap) {
			t.Errorf("%s: %v, want ErrCorruptMap", name, err)
		}
	}
}

// FuzzDecodeMap feeds the decoder raw bytes, and also a slot built from
// fuzzed fields with its checksums sealed, so that the fuzzer reaches the
// checks behind them (version, flags, sizes, states, page generations).
// Whatever decodes must encode to a map that decodes the same; every
// refusal must match ErrCorruptMap.
func FuzzDecodeMap(f *testing.F) {
	f.Add([]byte(mapMagic), uint16(mapVersion), uint16(0), uint64(1), uint64(4096*3), "a", uint64(1), []byte{0x24})
	f.Add([]byte{}, uint16(mapVersion), uint16(mapFlagFrozen), uint64(9), uint64(512), "", uint64(9), []byte{0x02})
	f.Add([]byte{}, uint16(2), uint16(4), uint64(1), uint64(1<<40), "img/0", uint64(2), []byte{0xff})
	f.Fuzz(func(t *testing.T, raw []byte, version, flags uint16, gen, size uint64, name string, pageGen uint64, states []byte) {
		check := func(b []byte) {
			h, st, err := decodeMap(b)
			if err != nil {
				if !errors.Is(err, ErrCorruptMap) {
					t.Fatalf("error %v does not match ErrCorruptMap", err)
				}
				return
			}
			h2, st2, err := decodeMap(encodeMap(h, st))
			if err != nil || h2 != h || st2.blocks != st.blocks {
				t.Fatalf("re-encoding: %+v %v, want %+v", h2, err, h)
			}
			for i := range st.words {
				if st.words[i].Load() != st2.words[i].Load() {
					t.Fatalf("re-encoding changed word %d", i)
				}
			}
		}
		check(raw)
		if len(name) > 300 || size > 64<<20 { // keep built slots small
			return
		}
		check(sealedSlot(version, flags, gen, size, name, pageGen, states))
	})
}

// sealedSlot lays out a slot from the given fields with valid checksums:
// the states bytes fill the first state page (the rest stays zero).
func sealedSlot(version, flags uint16, gen, size uint64, name string, pageGen uint64, states []byte) []byte {
	b := make([]byte, mapPageBytes)
	copy(b, mapMagic)
	binary.LittleEndian.PutUint16(b[8:], version)
	binary.LittleEndian.PutUint16(b[10:], flags)
	binary.LittleEndian.PutUint32(b[12:], BlockSizeBytes)
	binary.LittleEndian.PutUint64(b[16:], gen)
	binary.LittleEndian.PutUint64(b[24:], size)
	n := min(len(name), mapPageBytes-mapHeaderBytes-4)
	binary.LittleEndian.PutUint16(b[32:], uint16(len(name)))
	copy(b[mapHeaderBytes:], name[:n])
	end := mapHeaderBytes + n
	binary.LittleEndian.PutUint32(b[end:], crc32.Checksum(b[:end], castagnoli))
	pages := pagesOf(int64((size + BlockSizeBytes - 1) / BlockSizeBytes))
	for i := int64(0); i < pages; i++ {
		page := make([]byte, mapPageBytes)
		binary.LittleEndian.PutUint64(page, pageGen)
		if i == 0 {
			copy(page[8:mapPageBytes-4], states)
		}
		binary.LittleEndian.PutUint32(page[mapPageBytes-4:], crc32.Checksum(page[:mapPageBytes-4], castagnoli))
		b = append(b, page...)
	}
	return b
}

// TestOverlayMapSlots: a torn or corrupt newest slot falls back to the
// older one; both corrupt refuses to open.
func TestOverlayMapSlots(t *testing.T) {
	ctx := context.Background()
	fs := lufs.NewMemFS(lufs.MemFSOptions{})
	if err := fs.MkdirAll("/p", 0o700); err != nil {
		t.Fatal(err)
	}
	data, err := CreateFileFS(fs, "/p/c.lu", 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	o, err := CreateOverlay(OverlayOptions{Data: data, FS: fs, MapPath: "/p/c.lumap"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := CreateOverlay(OverlayOptions{Data: NewMemVolume(4096), FS: fs, MapPath: "/p/c.lumap"}); !errors.Is(err, ErrExists) {
		t.Fatalf("second create on the same map: %v, want ErrExists", err)
	}
	// generation 2 (slot 1): block 0 written; generation 3 (slot 0): block 1 zeroed too.
	if err := o.WriteAt(ctx, bytes.Repeat([]byte{7}, 4096), 0, blockdev.FUA); err != nil {
		t.Fatal(err)
	}
	if err := o.WriteZeroes(ctx, 4096, 4096, blockdev.FUA); err != nil {
		t.Fatal(err)
	}
	if err := o.Close(); err != nil {
		t.Fatal(err)
	}
	corrupt := func(slot int) {
		f, err := fs.OpenFile(slotPath("/p/c.lumap", slot), os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if _, err := f.WriteAt([]byte{0xff}, mapHeaderBytes+2); err != nil {
			t.Fatal(err)
		}
	}
	open := func() (*Overlay, error) {
		data, err := openFileVolume(fs, "/p/c.lu")
		if err != nil {
			t.Fatal(err)
		}
		return OpenOverlay(OverlayOptions{Data: data, FS: fs, MapPath: "/p/c.lumap"})
	}
	o, err = open()
	if err != nil {
		t.Fatal(err)
	}
	if s := o.mu.states.get(1); s != stateZero {
		t.Fatalf("newest slot: block 1 state %d, want zero", s)
	}
	_ = o.Close()
	corrupt(0) // the newest
	o, err = open()
	if err != nil {
		t.Fatalf("open with the newest slot corrupt: %v", err)
	}
	if s0, s1 := o.mu.states.get(0), o.mu.states.get(1); s0 != stateData || s1 != stateBase {
		t.Fatalf("older slot: states %d %d, want data, base", s0, s1)
	}
	_ = o.Close()
	corrupt(1)
	if _, err := open(); !errors.Is(err, ErrCorruptMap) {
		t.Fatalf("both slots corrupt: %v, want ErrCorruptMap", err)
	}
}
