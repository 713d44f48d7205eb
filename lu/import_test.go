package lu

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/lupool/lupool/blockdev/blockcopy"
)

// TestImportSparseRawFile copies a 1 GiB sparse raw file holding 100 MiB
// of data (and 16 MiB of allocated zeros) into a new thin volume: only the
// data is sent and allocated, and the stored copy hashes like the source.
func TestImportSparseRawFile(t *testing.T) {
	if testing.Short() {
		t.Skip("writes 116 MiB")
	}
	ctx := context.Background()
	dir := t.TempDir()
	const size, dataBytes, pieceBytes = 1 << 30, 100 << 20, 1 << 20
	raw := filepath.Join(dir, "disk.raw")
	f, err := os.Create(raw)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	piece := make([]byte, pieceBytes)
	for i := range piece {
		piece[i] = byte(i%251 + 1)
	}
	// 100 pieces of data, one every 10 MiB, and 16 MiB of written zeros
	// in the gaps after the first two.
	for i := int64(0); i < dataBytes/pieceBytes; i++ {
		piece[0] = byte(i)
		if _, err := f.WriteAt(piece, i*10<<20); err != nil {
			t.Fatal(err)
		}
	}
	for i := int64(0); i < 2; i++ {
		if _, err := f.WriteAt(make([]byte, 8<<20), i*10<<20+pieceBytes); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	src, err := OpenFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := CreateFile(filepath.Join(dir, "img.lu"), size)
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	st, err := blockcopy.Copy(ctx, dst, src, blockcopy.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("sent %d MiB, zero blocks skipped %d MiB, holes %d MiB; allocated %d MiB",
		st.SentBytes>>20, st.ZeroBytes>>20, st.HoleBytes>>20, dst.AllocatedBytes()>>20)
	if st.SentBytes != dataBytes {
		t.Fatalf("sent %d bytes, want %d", st.SentBytes, dataBytes)
	}
	if a := dst.AllocatedBytes(); a < dataBytes || a > dataBytes+1<<20 {
		t.Fatalf("the copy allocates %d bytes, want about %d", a, dataBytes)
	}
	if err := blockcopy.Verify(ctx, dst, st); err != nil {
		t.Fatal(err)
	}
	if raceEnabled {
		return // the byte-for-byte pass below is plain I/O; it costs 6 s under -race
	}
	// Byte for byte, not only by hash.
	a, b := make([]byte, 8<<20), make([]byte, 8<<20)
	for off := int64(0); off < size; off += int64(len(a)) {
		if err := src.ReadAt(ctx, a, off); err != nil {
			t.Fatal(err)
		}
		if err := dst.ReadAt(ctx, b, off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(a, b) {
			t.Fatalf("the copy differs from the source in [%d,+8 MiB)", off)
		}
	}
}
