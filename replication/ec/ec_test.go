package ec

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/blockdev/blockdevtest"
	"github.com/lupool/lupool/internal/testseed"
)

// memSource is a flat image in memory.
type memSource []byte

func (m memSource) ReadAt(_ context.Context, p []byte, off int64) error {
	if off < 0 || off+int64(len(p)) > int64(len(m)) {
		return blockdev.ErrOutOfRange
	}
	copy(p, m[off:])
	return nil
}

// randomImage returns size bytes of random data with zero holes in it.
func randomImage(rng *rand.Rand, size int64) []byte {
	b := make([]byte, size)
	var seed [32]byte
	for i := range seed {
		seed[i] = byte(rng.Uint32())
	}
	fill := rand.NewChaCha8(seed)
	for off := int64(0); off < size; {
		n := min(size-off, int64(rng.IntN(3*ChunkBytes)+1))
		if rng.IntN(3) != 0 {
			_, _ = fill.Read(b[off : off+n])
		}
		off += n
	}
	return b
}

var testID = [16]byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}

// encodeMem encodes data into fresh memory shards.
func encodeMem(t testing.TB, g Geometry, data []byte) ([]*blockdevtest.Mem, Options) {
	t.Helper()
	opts := Options{Geometry: g, DataBytes: int64(len(data)), ImageID: testID}
	mems := make([]*blockdevtest.Mem, g.Shards())
	devs := make([]blockdev.Device, g.Shards())
	for i := range mems {
		mems[i] = blockdevtest.NewMem(g.ShardBytes(opts.DataBytes), blockdev.Caps{})
		devs[i] = mems[i]
	}
	if err := Encode(context.Background(), memSource(data), devs, opts, nil); err != nil {
		t.Fatal(err)
	}
	return mems, opts
}

func devices(mems []*blockdevtest.Mem) []blockdev.Device {
	devs := make([]blockdev.Device, len(mems))
	for i, m := range mems {
		if m != nil {
			devs[i] = m
		}
	}
	return devs
}

func openMem(t testing.TB, devs []blockdev.Device, opts Options) *Image {
	t.Helper()
	img, err := Open(devs, opts)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func readAll(t testing.TB, img *Image) []byte {
	t.Helper()
	got := make([]byte, img.Size())
	if err := img.ReadAt(context.Background(), got, 0); err != nil {
		t.Fatal(err)
	}
	return got
}

// flip flips one byte of shard m at off.
func flip(t testing.TB, m *blockdevtest.Mem, off int64) {
	t.Helper()
	b := make([]byte, 1)
	ctx := context.Background()
	if err := m.ReadAt(ctx, b, off); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0x5a
	if err := m.WriteAt(ctx, b, off, 0); err != nil {
		t.Fatal(err)
	}
}

func TestSelfTest(t *testing.T) {
	if err := SelfTest(); err != nil {
		t.Fatal(err)
	}
	// The check can fail: a different encode gives a different hash.
	h, err := selfTestHash()
	if err != nil || h != selfTestGolden {
		t.Fatalf("hash %s, %v", h, err)
	}
	if h == fmt.Sprintf("%x", make([]byte, 32)) {
		t.Fatal("self-test hash is zeros")
	}
}

func TestParseGeometry(t *testing.T) {
	for _, c := range []struct {
		in   string
		want Geometry
		ok   bool
	}{
		{"2+1", Geometry{2, 1}, true}, {"4+2", Geometry{4, 2}, true}, {"16+4", Geometry{16, 4}, true},
		{"0+1", Geometry{}, false}, {"2+0", Geometry{}, false}, {"17+1", Geometry{}, false}, {"2+5", Geometry{}, false},
		{"2", Geometry{}, false}, {"2+1x", Geometry{}, false}, {" 2+1", Geometry{}, false}, {"-2+1", Geometry{}, false}, {"", Geometry{}, false},
	} {
		g, err := ParseGeometry(c.in)
		if (err == nil) != c.ok || (c.ok && g != c.want) {
			t.Errorf("ParseGeometry(%q) = %v, %v", c.in, g, err)
		}
		if !c.ok && !errors.Is(err, ErrGeometry) {
			t.Errorf("ParseGeometry(%q): %v is not ErrGeometry", c.in, err)
		}
	}
}

func TestRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, g := range []Geometry{{1, 1}, {2, 1}, {3, 2}, {4, 2}} {
		for _, size := range []int64{512, ChunkBytes, 3*ChunkBytes + 4096, 20*ChunkBytes + 512} {
			t.Run(fmt.Sprintf("%s/%d", g, size), func(t *testing.T) {
				data := randomImage(rng, size)
				mems, opts := encodeMem(t, g, data)
				img := openMem(t, devices(mems), opts)
				if got := readAll(t, img); !bytes.Equal(got, data) {
					t.Fatal("read back differs")
				}
				if img.DegradedReads() != 0 {
					t.Fatalf("%d degraded reads of intact shards", img.DegradedReads())
				}
				r, err := img.Verify(context.Background())
				if err != nil || !r.Clean() {
					t.Fatalf("verify: %+v %v", r, err)
				}
			})
		}
	}
}

func allocated(t testing.TB, d blockdev.Extenter) int64 {
	t.Helper()
	ext, err := d.Extents(context.Background(), 0, d.(blockdev.Device).Size(), nil)
	if err != nil {
		t.Fatal(err)
	}
	var n int64
	for _, e := range ext {
		if e.Flags&blockdev.ExtentHole == 0 {
			n += e.LengthBytes
		}
	}
	return n
}

// TestSparseStaysSparse: an all-zero image writes nothing but superblocks.
func TestSparseStaysSparse(t *testing.T) {
	g := Geometry{2, 1}
	mems, opts := encodeMem(t, g, make([]byte, 64*ChunkBytes))
	for i, m := range mems {
		ext, err := m.Extents(context.Background(), 0, m.Size(), nil)
		if err != nil {
			t.Fatal(err)
		}
		var alloc int64
		for _, e := range ext {
			if e.Flags&blockdev.ExtentHole == 0 {
				alloc += e.LengthBytes
			}
		}
		if alloc != g.SuperblockBytes(opts.DataBytes) {
			t.Errorf("shard %d: %d bytes allocated, want only its superblock's %d", i, alloc, g.SuperblockBytes(opts.DataBytes))
		}
	}
}

// faulty wraps a device and fails or shortens reads.
type faulty struct {
	blockdev.Device
	short bool // reads fill only half and fail
	err   error
}

func (f *faulty) ReadAt(ctx context.Context, p []byte, off int64) error {
	if f.short {
		_ = f.Device.ReadAt(ctx, p[:len(p)/2], off)
		return fmt.Errorf("%w: short read", blockdev.ErrIO)
	}
	if f.err != nil {
		return f.err
	}
	return f.Device.ReadAt(ctx, p, off)
}

func TestDegradedReads(t *testing.T) {
	g := Geometry{2, 1}
	rng := rand.New(rand.NewPCG(3, 4))
	data := randomImage(rng, 20*ChunkBytes+8192)
	for _, c := range []struct {
		name  string
		fault func(t *testing.T, mems []*blockdevtest.Mem, devs []blockdev.Device, opts Options)
	}{
		{"missing", func(_ *testing.T, _ []*blockdevtest.Mem, devs []blockdev.Device, _ Options) { devs[0] = nil }},
		{"read error", func(_ *testing.T, _ []*blockdevtest.Mem, devs []blockdev.Device, _ Options) {
			devs[1] = &faulty{Device: devs[1], err: blockdev.ErrIO}
		}},
		{"short read", func(_ *testing.T, _ []*blockdevtest.Mem, devs []blockdev.Device, _ Options) {
			devs[0] = &faulty{Device: devs[0], short: true}
		}},
		{"flipped byte", func(t *testing.T, mems []*blockdevtest.Mem, _ []blockdev.Device, opts Options) {
			flip(t, mems[1], opts.SuperblockBytes(opts.DataBytes)+3*ChunkBytes+100)
		}},
		{"flipped superblock", func(t *testing.T, mems []*blockdevtest.Mem, _ []blockdev.Device, _ Options) {
			flip(t, mems[0], 60)
		}},
		{"wrong header", func(t *testing.T, mems []*blockdevtest.Mem, devs []blockdev.Device, opts Options) {
			// Shard 0's device holds shard 1: the superblock names it.
			devs[0] = mems[1]
		}},
		{"other image", func(t *testing.T, mems []*blockdevtest.Mem, _ []blockdev.Device, opts Options) {
			sb, err := DecodeSuperblock(mustRead(t, mems[1], opts.SuperblockBytes(opts.DataBytes)))
			if err != nil {
				t.Fatal(err)
			}
			sb.ImageID[0] ^= 1 // a well-formed superblock of another image
			if err := mems[1].WriteAt(context.Background(), sb.Encode(), 0, 0); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			mems, opts := encodeMem(t, g, data)
			devs := devices(mems)
			c.fault(t, mems, devs, opts)
			var seen []DegradedRead
			opts.OnDegraded = func(d DegradedRead) { seen = append(seen, d) }
			img := openMem(t, devs, opts)
			if got := readAll(t, img); !bytes.Equal(got, data) {
				t.Fatal("degraded read differs")
			}
			// A 4 KiB read inside a chunk, and one across a stripe.
			for _, off := range []int64{4096, 2*ChunkBytes - 2048, 7 * ChunkBytes} {
				p := make([]byte, 4096)
				if err := img.ReadAt(context.Background(), p, off); err != nil || !bytes.Equal(p, data[off:off+4096]) {
					t.Fatalf("read at %d: %v, equal %v", off, err, bytes.Equal(p, data[off:off+4096]))
				}
			}
			if img.DegradedReads() == 0 || len(seen) == 0 {
				t.Fatal("no degraded read counted")
			}
			r, err := img.Verify(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if r.Clean() || len(r.BadShards) != 1 {
				t.Fatalf("verify found %+v, want one bad shard", r)
			}
			t.Logf("verify: %+v", r.Faults[0])
		})
	}
}

func mustRead(t testing.TB, d blockdev.Device, n int64) []byte {
	t.Helper()
	b := make([]byte, n)
	if err := d.ReadAt(context.Background(), b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestTooManyFaults: M+1 failed shards fail the read with EIO, not with
// wrong data.
func TestTooManyFaults(t *testing.T) {
	g := Geometry{2, 1}
	data := randomImage(rand.New(rand.NewPCG(5, 6)), 8*ChunkBytes)
	mems, opts := encodeMem(t, g, data)
	flip(t, mems[0], opts.SuperblockBytes(opts.DataBytes)+10)
	flip(t, mems[2], opts.SuperblockBytes(opts.DataBytes)+10)
	img := openMem(t, devices(mems), opts)
	p := make([]byte, 4096)
	err := img.ReadAt(context.Background(), p, 0)
	if !errors.Is(err, blockdev.ErrIO) || !errors.Is(err, ErrTooFewShards) {
		t.Fatalf("read with 2 bad chunks of 2+1: %v", err)
	}
	// Another stripe is still fine.
	if err := img.ReadAt(context.Background(), p, 2*ChunkBytes); err != nil || !bytes.Equal(p, data[2*ChunkBytes:2*ChunkBytes+4096]) {
		t.Fatalf("read of an intact stripe: %v", err)
	}
	if _, err := img.Rebuild(context.Background(), nil, nil); !errors.Is(err, ErrTooFewShards) {
		t.Fatalf("rebuild of a lost stripe: %v", err)
	}
}

func TestRebuild(t *testing.T) {
	g := Geometry{3, 2}
	data := randomImage(rand.New(rand.NewPCG(7, 8)), 50*ChunkBytes)
	mems, opts := encodeMem(t, g, data)
	devs := devices(mems)
	devs[4] = nil // lost with its node
	flip(t, mems[1], opts.SuperblockBytes(opts.DataBytes)+12*ChunkBytes+5)
	img := openMem(t, devs, opts)
	fresh := blockdevtest.NewMem(g.ShardBytes(opts.DataBytes), blockdev.Caps{})
	st, err := img.Rebuild(context.Background(), map[int]blockdev.Device{4: fresh}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Rebuilt) != 1 || st.Rebuilt[0] != 4 || st.RepairedChunks != 1 {
		t.Fatalf("rebuild stats %+v", st)
	}
	if !bytes.Equal(fresh.Bytes(), mems[4].Bytes()) {
		t.Fatal("rebuilt shard differs from the lost one")
	}
	if got, want := allocated(t, fresh), allocated(t, mems[4]); got != want {
		t.Fatalf("rebuilt shard allocates %d bytes, the encoded one %d: not as sparse", got, want)
	}
	r, err := img.Verify(context.Background())
	if err != nil || !r.Clean() {
		t.Fatalf("verify after rebuild: %+v %v", r, err)
	}
	// Lose two others: the rebuilt parity serves.
	devs = devices(mems)
	devs[0], devs[2], devs[4] = nil, nil, fresh
	img2 := openMem(t, devs, opts)
	if !bytes.Equal(readAll(t, img2), data) {
		t.Fatal("read from the rebuilt shard differs")
	}
}

// TestModel reads random ranges with random faults (at most M shards)
// against the flat image.
func TestModel(t *testing.T) {
	seed := testseed.Seed(t, "./replication/ec/")
	rng := rand.New(rand.NewPCG(seed, seed>>1|1))
	ctx := context.Background()
	for round := 0; round < 5; round++ {
		g := Geometry{K: 1 + rng.IntN(5), M: 1 + rng.IntN(3)}
		size := int64(1+rng.IntN(24*ChunkBytes/512)) * 512
		data := randomImage(rng, size)
		mems, opts := encodeMem(t, g, data)
		devs := devices(mems)
		bad := rng.Perm(g.Shards())[:rng.IntN(g.M+1)]
		for _, i := range bad {
			switch rng.IntN(3) {
			case 0:
				devs[i] = nil
			case 1:
				devs[i] = &faulty{Device: devs[i], err: blockdev.ErrIO}
			default:
				for f := 0; f < 5; f++ {
					flip(t, mems[i], rng.Int64N(mems[i].Size()))
				}
			}
		}
		img := openMem(t, devs, opts)
		for op := 0; op < 40; op++ {
			off := rng.Int64N(size)
			n := min(size-off, 1+rng.Int64N(3*ChunkBytes*int64(g.K)))
			p := make([]byte, n)
			if err := img.ReadAt(ctx, p, off); err != nil {
				t.Fatalf("%s size %d bad %v: read %d+%d: %v", g, size, bad, off, n, err)
			}
			if !bytes.Equal(p, data[off:off+n]) {
				t.Fatalf("%s size %d bad %v: read %d+%d differs", g, size, bad, off, n)
			}
		}
		if err := img.ReadAt(ctx, make([]byte, 1), size); !errors.Is(err, blockdev.ErrOutOfRange) {
			t.Fatalf("read past the end: %v", err)
		}
	}
}

func TestReadOnly(t *testing.T) {
	mems, opts := encodeMem(t, Geometry{2, 1}, make([]byte, 4096))
	img := openMem(t, devices(mems), opts)
	if err := img.WriteAt(context.Background(), make([]byte, 512), 0, 0); !errors.Is(err, blockdev.ErrReadOnly) {
		t.Fatal(err)
	}
	if !img.Caps().ReadOnly {
		t.Fatal("caps not read-only")
	}
}

func TestOpenRefusesBadOptions(t *testing.T) {
	for _, o := range []Options{
		{Geometry: Geometry{0, 1}, DataBytes: 4096},
		{Geometry: Geometry{2, 1}, DataBytes: 0},
		{Geometry: Geometry{2, 1}, DataBytes: 1000},
	} {
		if _, err := Open(make([]blockdev.Device, 3), o); !errors.Is(err, ErrGeometry) {
			t.Errorf("Open(%+v): %v", o, err)
		}
	}
	if _, err := Open(make([]blockdev.Device, 2), Options{Geometry: Geometry{2, 1}, DataBytes: 4096}); !errors.Is(err, ErrGeometry) {
		t.Errorf("Open with 2 devices for 2+1: %v", err)
	}
}

func TestSuperblockRoundTrip(t *testing.T) {
	sb := Superblock{Geometry: Geometry{4, 2}, Shard: 5, DataBytes: 9 * ChunkBytes * 4, ImageID: testID}
	sb.ChunkCRCs = make([]uint32, sb.Stripes(sb.DataBytes))
	for i := range sb.ChunkCRCs {
		sb.ChunkCRCs[i] = uint32(i * 7919)
	}
	b := sb.Encode()
	if len(b)%4096 != 0 {
		t.Fatalf("superblock of %d bytes", len(b))
	}
	got, err := DecodeSuperblock(b)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(got) != fmt.Sprint(sb) {
		t.Fatalf("decoded %+v, want %+v", got, sb)
	}
	for i := 0; i < 64; i++ {
		c := append([]byte(nil), b...)
		c[i] ^= 1
		if _, err := DecodeSuperblock(c); !errors.Is(err, ErrCorrupt) {
			t.Errorf("byte %d flipped: %v", i, err)
		}
	}
}

// switchable fails reads while down is set; reads counts chunk reads
// (past the superblock: not a probe's).
type switchable struct {
	blockdev.Device
	down  atomic.Bool
	reads atomic.Int64
}

func (d *switchable) ReadAt(ctx context.Context, p []byte, off int64) error {
	if off > 0 {
		d.reads.Add(1)
	}
	if d.down.Load() {
		return blockdev.ErrIO
	}
	return d.Device.ReadAt(ctx, p, off)
}

// TestShardLeftOutThenBack: a shard that failed is not read again by
// client reads while it is left out, and a background probe takes it back
// once it answers.
func TestShardLeftOutThenBack(t *testing.T) {
	g := Geometry{2, 1}
	data := randomImage(rand.New(rand.NewPCG(11, 12)), 8*ChunkBytes)
	mems, opts := encodeMem(t, g, data)
	devs := devices(mems)
	sw := &switchable{Device: devs[1]}
	sw.down.Store(true)
	devs[1] = sw
	opts.RetryAfter = 20 * time.Millisecond
	img := openMem(t, devs, opts)
	if !bytes.Equal(readAll(t, img), data) {
		t.Fatal("degraded read differs")
	}
	n := sw.reads.Load()
	if !bytes.Equal(readAll(t, img), data) {
		t.Fatal("second degraded read differs")
	}
	if got := sw.reads.Load(); got != n {
		t.Fatalf("a left-out shard was read %d more times by client reads", got-n)
	}
	sw.down.Store(false)
	deadline := time.Now().Add(5 * time.Second)
	for {
		before := img.DegradedReads()
		readAll(t, img)
		if img.DegradedReads() == before {
			break // served without reconstruction: the shard is back
		}
		if time.Now().After(deadline) {
			t.Fatal("the shard never came back")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
