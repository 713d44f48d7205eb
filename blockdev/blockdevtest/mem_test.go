package blockdevtest

import (
	"bytes"
	"context"
	"errors"
	"testing"

	"github.com/lupool/lupool/blockdev"
)

func TestMemReadWriteTrimZeroExtents(t *testing.T) {
	ctx := context.Background()
	m := NewMem(64*1024, blockdev.Caps{})
	buf := make([]byte, 8192)
	if err := m.ReadAt(ctx, buf, 0); err != nil || !bytes.Equal(buf, make([]byte, 8192)) {
		t.Fatalf("fresh device must read zeros, err=%v", err)
	}
	data := bytes.Repeat([]byte{0xab}, 10000)
	if err := m.WriteAt(ctx, data, 1000, blockdev.FUA); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 10000)
	if err := m.ReadAt(ctx, got, 1000); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back mismatch, err=%v", err)
	}
	ext, err := m.Extents(ctx, 0, 64*1024, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := []blockdev.Extent{{LengthBytes: 12288}, {LengthBytes: 64*1024 - 12288, Flags: blockdev.ExtentHole | blockdev.ExtentZero}}
	if len(ext) != 2 || ext[0] != want[0] || ext[1] != want[1] {
		t.Fatalf("extents = %+v, want %+v", ext, want)
	}
	// Trim [1000, 11000): only block 1 (4096..8191) is whole inside.
	if err := m.Trim(ctx, 1000, 10000, 0); err != nil {
		t.Fatal(err)
	}
	if err := m.ReadAt(ctx, got[:4096], 4096); err != nil || !bytes.Equal(got[:4096], make([]byte, 4096)) {
		t.Fatal("trimmed whole block must read zeros")
	}
	if err := m.ReadAt(ctx, got[:100], 1000); err != nil || !bytes.Equal(got[:100], data[:100]) {
		t.Fatal("partial block must keep its data after trim")
	}
	if err := m.WriteZeroes(ctx, 0, 4096, blockdev.NoHole); err != nil {
		t.Fatal(err)
	}
	ext, _ = m.Extents(ctx, 0, 4096, ext[:0])
	if len(ext) != 1 || ext[0].Flags != 0 {
		t.Fatalf("NoHole zero must stay allocated: %+v", ext)
	}
}

func TestMemErrors(t *testing.T) {
	ctx := context.Background()
	m := NewMem(4096, blockdev.Caps{ReadOnly: true})
	if err := m.WriteAt(ctx, []byte{1}, 0, 0); !errors.Is(err, blockdev.ErrReadOnly) {
		t.Fatalf("write on read-only: %v", err)
	}
	if err := m.ReadAt(ctx, make([]byte, 2), 4095); !errors.Is(err, blockdev.ErrOutOfRange) {
		t.Fatalf("read past end: %v", err)
	}
	if err := m.WriteAt(ctx, nil, 0, blockdev.NoHole); !errors.Is(err, blockdev.ErrInvalid) {
		t.Fatalf("bad flag: %v", err)
	}
	injected := errors.New("injected")
	m.SetFault(func(op Op, _, _ int64) error {
		if op == OpRead {
			return injected
		}
		return nil
	})
	if err := m.ReadAt(ctx, make([]byte, 1), 0); !errors.Is(err, injected) {
		t.Fatalf("fault not injected: %v", err)
	}
}
