package ec

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/klauspost/reedsolomon"

	"github.com/lupool/lupool/blockdev"
)

// Options describe an EC image to open.
type Options struct {
	Geometry
	// DataBytes is the image's size.
	DataBytes int64
	// ImageID is the id every shard's superblock must carry.
	ImageID [16]byte
	// ShardTimeout bounds one read from one shard; past it the shard
	// counts as failed and the stripe is reconstructed. 0 means 5 s.
	ShardTimeout time.Duration
	// RetryAfter is how long a shard that failed is left out before it is
	// tried again (a down node is not waited for on every read). 0 means
	// 2 s.
	RetryAfter time.Duration
	// OnDegraded, if set, is called once for each read that had to
	// reconstruct, with the shards that failed and why.
	OnDegraded func(DegradedRead)
}

// DegradedRead describes a read served by reconstruction.
type DegradedRead struct {
	// Shards are the shards that failed (missing, unreachable, corrupt).
	Shards []int
	// Err is the first of their errors.
	Err error
}

func (o *Options) ensureDefaults() {
	if o.ShardTimeout <= 0 {
		o.ShardTimeout = 5 * time.Second
	}
	if o.RetryAfter <= 0 {
		o.RetryAfter = 2 * time.Second
	}
}

func (o *Options) validate(shards int) error {
	if err := o.Geometry.Validate(); err != nil {
		return err
	}
	if shards != o.Shards() {
		return fmt.Errorf("%w: %d shard devices for %s", ErrGeometry, shards, o.Geometry)
	}
	if o.DataBytes <= 0 || o.DataBytes > ImageBytesMax || o.DataBytes%512 != 0 {
		return fmt.Errorf("%w: image of %d bytes (a positive multiple of 512 up to %d)", ErrGeometry, o.DataBytes, int64(ImageBytesMax))
	}
	return nil
}

// Image is a read-only block device over the K+M shards of one EC image.
// It is safe for concurrent use.
type Image struct {
	opts   Options // immutable
	enc    reedsolomon.Encoder
	shards []*shard // immutable slice, K+M entries

	degradedReads atomic.Uint64
}

var _ blockdev.Device = (*Image)(nil)

// shard is one shard device and what the image knows of it.
type shard struct {
	index int
	dev   blockdev.Device // nil: the shard is gone
	mu    struct {
		sync.Mutex
		sb *Superblock // loaded and checked; nil until then
		// lastErr is set while the shard is left out (it failed a read);
		// from skipUntil on a probe runs in the background (probing) and
		// clears it when the shard answers again. No client read waits
		// on a shard known to fail.
		lastErr   error
		skipUntil time.Time
		probing   bool
	}
}

// errShardMissing is a shard whose device is nil.
var errShardMissing = errors.New("ec: shard missing")

// Open returns the image over its shard devices, in shard order; a nil
// device is a missing shard. Open reads no shard: superblocks are loaded
// and checked on first use, so Open succeeds while shard nodes are down.
func Open(shards []blockdev.Device, opts Options) (*Image, error) {
	opts.ensureDefaults()
	if err := opts.validate(len(shards)); err != nil {
		return nil, err
	}
	enc, err := newEncoder(opts.Geometry)
	if err != nil {
		return nil, err
	}
	img := &Image{opts: opts, enc: enc}
	for i, d := range shards {
		img.shards = append(img.shards, &shard{index: i, dev: d})
	}
	return img, nil
}

// Size implements blockdev.Device.
func (img *Image) Size() int64 { return img.opts.DataBytes }

// Caps implements blockdev.Device: read-only.
func (img *Image) Caps() blockdev.Caps {
	return blockdev.Caps{ReadOnly: true, MultiConn: true, BlockSizeBytes: 4096}
}

// WriteAt implements blockdev.Device: an EC image is read-only.
func (img *Image) WriteAt(context.Context, []byte, int64, blockdev.Flags) error {
	return blockdev.ErrReadOnly
}

// Flush implements blockdev.Device: nothing is ever written.
func (img *Image) Flush(context.Context) error { return nil }

// DegradedReads returns how many reads needed a reconstruction.
func (img *Image) DegradedReads() uint64 { return img.degradedReads.Load() }

// Geometry returns the image's K+M.
func (img *Image) Geometry() Geometry { return img.opts.Geometry }

// superblock returns shard i's checked superblock, loading it when needed.
func (img *Image) superblock(ctx context.Context, s *shard) (*Superblock, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.mu.sb != nil {
		return s.mu.sb, nil
	}
	if s.dev == nil {
		return nil, errShardMissing
	}
	sb, err := img.loadSuperblock(ctx, s)
	if err != nil {
		if !errors.Is(err, ErrCorrupt) {
			s.mu.skipUntil, s.mu.lastErr = time.Now().Add(img.opts.RetryAfter), err
		}
		return nil, err
	}
	s.mu.sb = sb
	return sb, nil
}

func (img *Image) loadSuperblock(ctx context.Context, s *shard) (*Superblock, error) {
	ctx, cancel := context.WithTimeout(ctx, img.opts.ShardTimeout)
	defer cancel()
	want := img.opts.SuperblockBytes(img.opts.DataBytes)
	if s.dev.Size() < img.opts.ShardBytes(img.opts.DataBytes) {
		return nil, fmt.Errorf("%w: shard %d is %d bytes, the image needs %d", ErrCorrupt, s.index, s.dev.Size(), img.opts.ShardBytes(img.opts.DataBytes))
	}
	buf := make([]byte, want)
	if err := s.dev.ReadAt(ctx, buf, 0); err != nil {
		return nil, fmt.Errorf("shard %d: read superblock: %w", s.index, err)
	}
	sb, err := DecodeSuperblock(buf)
	if err != nil {
		return nil, fmt.Errorf("shard %d: %w", s.index, err)
	}
	switch {
	case sb.Geometry != img.opts.Geometry || sb.DataBytes != img.opts.DataBytes:
		return nil, fmt.Errorf("%w: shard %d is of a %s image of %d bytes, want %s of %d", ErrCorrupt, s.index, sb.Geometry, sb.DataBytes, img.opts.Geometry, img.opts.DataBytes)
	case sb.Shard != s.index:
		return nil, fmt.Errorf("%w: shard %d's superblock says shard %d", ErrCorrupt, s.index, sb.Shard)
	case sb.ImageID != img.opts.ImageID:
		return nil, fmt.Errorf("%w: shard %d belongs to image %x, want %x", ErrCorrupt, s.index, sb.ImageID, img.opts.ImageID)
	}
	return &sb, nil
}

// failed records that shard s failed a read with a transport error: it is
// left out for RetryAfter. A corrupt chunk does not leave the shard out
// (its other chunks may be fine).
func (img *Image) failed(s *shard, err error) {
	if errors.Is(err, ErrCorrupt) || errors.Is(err, context.Canceled) {
		return
	}
	s.mu.Lock()
	s.mu.skipUntil, s.mu.lastErr = time.Now().Add(img.opts.RetryAfter), err
	s.mu.Unlock()
}

// skipped returns why shard s is left out, or nil. Past skipUntil it
// starts a probe and still leaves the shard out until the probe succeeds.
func (img *Image) skipped(s *shard) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.dev == nil {
		return errShardMissing
	}
	if s.mu.lastErr == nil {
		return nil
	}
	if !s.mu.probing && !time.Now().Before(s.mu.skipUntil) {
		s.mu.probing = true
		go img.probe(s)
	}
	return s.mu.lastErr
}

// probe reads the start of a left-out shard; it takes the shard back when
// the read succeeds.
func (img *Image) probe(s *shard) {
	ctx, cancel := context.WithTimeout(context.Background(), img.opts.ShardTimeout)
	defer cancel()
	err := s.dev.ReadAt(ctx, make([]byte, superblockAlignBytes), 0)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.mu.probing = false
	if err != nil {
		s.mu.skipUntil, s.mu.lastErr = time.Now().Add(img.opts.RetryAfter), fmt.Errorf("shard %d: probe: %w", s.index, err)
		return
	}
	s.mu.lastErr, s.mu.skipUntil = nil, time.Time{}
}

// readRun reads n chunks of shard i from stripe first on into dst and
// checks each; errs[k] is chunk first+k's error (all the same on a
// transport error).
func (img *Image) readRun(ctx context.Context, i int, first, n int64, dst []byte, errs []error) {
	s := img.shards[i]
	fail := func(err error) {
		for k := range errs[:n] {
			errs[k] = err
		}
	}
	if err := img.skipped(s); err != nil {
		fail(err)
		return
	}
	sb, err := img.superblock(ctx, s)
	if err != nil {
		fail(err)
		return
	}
	rctx, cancel := context.WithTimeout(ctx, img.opts.ShardTimeout)
	defer cancel()
	off := img.opts.SuperblockBytes(img.opts.DataBytes) + first*ChunkBytes
	if err := s.dev.ReadAt(rctx, dst[:n*ChunkBytes], off); err != nil {
		err = fmt.Errorf("shard %d: read: %w", i, err)
		img.failed(s, err)
		fail(err)
		return
	}
	for k := int64(0); k < n; k++ {
		errs[k] = nil
		if err := CheckChunk(dst[k*ChunkBytes:(k+1)*ChunkBytes], sb.ChunkCRCs[first+k]); err != nil {
			errs[k] = fmt.Errorf("shard %d stripe %d: %w", i, first+k, err)
		}
	}
}

// run is a read of consecutive stripes' chunks of one shard.
type run struct {
	first, n int64 // stripes first .. first+n-1
	buf      []byte
	errs     []error // per stripe
}

// covers reports whether the run holds stripes lo..hi.
func (r *run) covers(lo, hi int64) bool { return r.buf != nil && r.first <= lo && hi < r.first+r.n }

// chunk returns stripe s's chunk and its error.
func (r *run) chunk(s int64) ([]byte, error) {
	return r.buf[(s-r.first)*ChunkBytes : (s-r.first+1)*ChunkBytes], r.errs[s-r.first]
}

// ReadAt implements blockdev.Device. It reads each data shard's run of
// chunks for the range at once, all shards in parallel; the stripes whose
// data chunk failed are then reconstructed together, from one more run per
// shard over them.
func (img *Image) ReadAt(ctx context.Context, p []byte, off int64) error {
	if off < 0 || off+int64(len(p)) > img.opts.DataBytes || off+int64(len(p)) < off {
		return blockdev.ErrOutOfRange
	}
	if len(p) == 0 {
		return nil
	}
	k := int64(img.opts.K)
	c0, c1 := off/ChunkBytes, (off+int64(len(p))-1)/ChunkBytes
	s0, s1 := c0/k, c1/k
	runs := make([]run, k)
	var wg sync.WaitGroup
	for j := int64(0); j < k; j++ {
		first, last := s0, s1
		if first*k+j < c0 {
			first++
		}
		if last*k+j > c1 {
			last--
		}
		if first > last {
			continue
		}
		r := &runs[j]
		r.first, r.n = first, last-first+1
		r.buf, r.errs = make([]byte, r.n*ChunkBytes), make([]error, r.n)
		wg.Add(1)
		go func(j int64) {
			defer wg.Done()
			img.readRun(ctx, int(j), r.first, r.n, r.buf, r.errs)
		}(j)
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return err
	}
	var deg *DegradedRead
	lo, hi := int64(-1), int64(-1) // the failed stripes' span
	for c := c0; c <= c1; c++ {
		s, j := c/k, c%k
		if _, err := runs[j].chunk(s); err != nil {
			if deg == nil {
				deg = &DegradedRead{Err: err}
			}
			if !containsInt(deg.Shards, int(j)) {
				deg.Shards = append(deg.Shards, int(j))
			}
			if lo < 0 {
				lo = s
			}
			hi = s
		}
	}
	var rebuilt map[int64][][]byte
	if deg != nil {
		var err error
		if rebuilt, err = img.reconstruct(ctx, lo, hi, runs, deg); err != nil {
			return err
		}
	}
	for c := c0; c <= c1; c++ {
		s, j := c/k, c%k
		chunk, err := runs[j].chunk(s)
		if err != nil {
			chunk = rebuilt[s][j]
		}
		// The part of chunk c inside [off, off+len(p)).
		cStart := c * ChunkBytes
		from, to := max(off, cStart), min(off+int64(len(p)), cStart+ChunkBytes)
		copy(p[from-off:to-off], chunk[from-cStart:to-cStart])
	}
	if deg != nil {
		img.degradedReads.Add(1)
		if img.opts.OnDegraded != nil {
			img.opts.OnDegraded(*deg)
		}
	}
	return nil
}

// reconstruct rebuilds the data chunks of the stripes lo..hi that have a
// failed data chunk in runs: every shard whose run does not already hold
// those stripes is read over them (in parallel), chunks that fail are left
// out, and each such stripe is reconstructed from K intact chunks.
func (img *Image) reconstruct(ctx context.Context, lo, hi int64, runs []run, deg *DegradedRead) (map[int64][][]byte, error) {
	n := img.opts.Shards()
	all := make([]run, n)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		if i < len(runs) && runs[i].covers(lo, hi) {
			all[i] = runs[i]
			continue
		}
		r := &all[i]
		r.first, r.n = lo, hi-lo+1
		r.buf, r.errs = make([]byte, r.n*ChunkBytes), make([]error, r.n)
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			img.readRun(ctx, i, r.first, r.n, r.buf, r.errs)
		}(i)
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	k := int64(img.opts.K)
	out := map[int64][][]byte{}
	for s := lo; s <= hi; s++ {
		failed := false
		for j := int64(0); j < k && !failed; j++ {
			if runs[j].covers(s, s) {
				_, err := runs[j].chunk(s)
				failed = err != nil
			}
		}
		if !failed {
			continue
		}
		stripe := make([][]byte, n)
		good := 0
		var errs []error
		for i := 0; i < n; i++ {
			chunk, err := all[i].chunk(s)
			if err != nil {
				errs = append(errs, err)
				if !containsInt(deg.Shards, i) {
					deg.Shards = append(deg.Shards, i)
				}
				continue
			}
			stripe[i] = chunk
			good++
		}
		if good < img.opts.K {
			return nil, fmt.Errorf("%w: %w: stripe %d has %d of %d needed (%s): %w", blockdev.ErrIO, ErrTooFewShards, s, good, img.opts.K, img.opts.Geometry, errors.Join(errs...))
		}
		if err := img.enc.ReconstructData(stripe); err != nil {
			return nil, fmt.Errorf("%w: stripe %d: %v", blockdev.ErrIO, s, err)
		}
		out[s] = stripe
	}
	return out, nil
}

func containsInt(list []int, v int) bool {
	for _, x := range list {
		if x == v {
			return true
		}
	}
	return false
}
