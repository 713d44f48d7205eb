package ec

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/lupool/lupool/blockdev"
)

// faultsMax bounds the faults a Report lists (FaultCount counts them all).
const faultsMax = 256

// Fault is one bad thing Verify found.
type Fault struct {
	Shard int `json:"shard"`
	// Stripe is the stripe of a bad chunk; -1 when the whole shard is
	// unreadable or its superblock is bad.
	Stripe int64  `json:"stripe"`
	Err    string `json:"error"`
}

// Report is Verify's finding.
type Report struct {
	Geometry
	Stripes int64 `json:"stripes"`
	// Faults lists up to faultsMax faults; FaultCount counts all.
	Faults     []Fault `json:"faults,omitempty"`
	FaultCount int64   `json:"fault_count"`
	// BadShards are the shards with at least one fault, in order.
	BadShards []int `json:"bad_shards,omitempty"`
	// ParityMismatches are stripes whose chunks all pass their checksums
	// but whose parity does not match the data.
	ParityMismatches []int64 `json:"parity_mismatches,omitempty"`
}

// Clean reports whether Verify found nothing wrong.
func (r *Report) Clean() bool { return r.FaultCount == 0 && len(r.ParityMismatches) == 0 }

func (r *Report) add(f Fault) {
	r.FaultCount++
	if len(r.Faults) < faultsMax {
		r.Faults = append(r.Faults, f)
	}
	if !containsInt(r.BadShards, f.Shard) {
		r.BadShards = append(r.BadShards, f.Shard)
	}
}

// batch holds the chunks of batchStripes stripes of every shard.
type batch struct {
	bufs [][]byte  // per shard, batchStripes chunks
	errs [][]error // per shard, per stripe of the batch
}

func (img *Image) newBatch() *batch {
	b := &batch{bufs: make([][]byte, img.opts.Shards()), errs: make([][]error, img.opts.Shards())}
	for i := range b.bufs {
		b.bufs[i] = make([]byte, batchStripes*ChunkBytes)
		b.errs[i] = make([]error, batchStripes)
	}
	return b
}

// readBatch reads stripes s0.. s0+nb-1 of the shards whose sbs entry is
// set, checking every chunk against sbs; other shards' errs are errSkip.
func (img *Image) readBatch(ctx context.Context, b *batch, sbs []*Superblock, s0, nb int64) {
	off := img.opts.SuperblockBytes(img.opts.DataBytes) + s0*ChunkBytes
	var wg sync.WaitGroup
	for i, sb := range sbs {
		if sb == nil {
			for k := range b.errs[i][:nb] {
				b.errs[i][k] = errSkip
			}
			continue
		}
		wg.Add(1)
		go func(i int, sb *Superblock) {
			defer wg.Done()
			rctx, cancel := context.WithTimeout(ctx, img.opts.ShardTimeout)
			defer cancel()
			err := img.shards[i].dev.ReadAt(rctx, b.bufs[i][:nb*ChunkBytes], off)
			for k := int64(0); k < nb; k++ {
				if err != nil {
					b.errs[i][k] = fmt.Errorf("read: %w", err)
					continue
				}
				b.errs[i][k] = CheckChunk(b.bufs[i][k*ChunkBytes:(k+1)*ChunkBytes], sb.ChunkCRCs[s0+k])
			}
		}(i, sb)
	}
	wg.Wait()
}

// errSkip marks a shard left out of a batch read.
var errSkip = errors.New("ec: shard left out")

// loadAll loads every shard's superblock afresh (Verify and Rebuild do not
// trust what reads cached); a shard that fails gets a nil entry and its
// error.
func (img *Image) loadAll(ctx context.Context) ([]*Superblock, []error) {
	sbs, errs := make([]*Superblock, len(img.shards)), make([]error, len(img.shards))
	var wg sync.WaitGroup
	for i, s := range img.shards {
		if s.dev == nil {
			errs[i] = errShardMissing
			continue
		}
		wg.Add(1)
		go func(i int, s *shard) {
			defer wg.Done()
			sbs[i], errs[i] = img.loadSuperblock(ctx, s)
		}(i, s)
	}
	wg.Wait()
	return sbs, errs
}

// Verify reads every chunk of every shard and checks its checksum, then
// the parity of every stripe whose chunks all pass. It names each bad
// shard and stripe.
func (img *Image) Verify(ctx context.Context) (Report, error) {
	r := Report{Geometry: img.opts.Geometry, Stripes: img.opts.Stripes(img.opts.DataBytes)}
	sbs, errs := img.loadAll(ctx)
	for i, err := range errs {
		if err != nil {
			r.add(Fault{Shard: i, Stripe: -1, Err: err.Error()})
		}
	}
	b := img.newBatch()
	for s0 := int64(0); s0 < r.Stripes; s0 += batchStripes {
		if err := ctx.Err(); err != nil {
			return r, err
		}
		nb := min(batchStripes, r.Stripes-s0)
		img.readBatch(ctx, b, sbs, s0, nb)
		for k := int64(0); k < nb; k++ {
			whole := true
			stripe := make([][]byte, img.opts.Shards())
			for i := range stripe {
				err := b.errs[i][k]
				if err != nil {
					whole = false
					if !errors.Is(err, errSkip) {
						r.add(Fault{Shard: i, Stripe: s0 + k, Err: err.Error()})
					}
				}
				stripe[i] = b.bufs[i][k*ChunkBytes : (k+1)*ChunkBytes]
			}
			if !whole {
				continue
			}
			if ok, err := img.enc.Verify(stripe); err != nil || !ok {
				r.ParityMismatches = append(r.ParityMismatches, s0+k)
			}
		}
	}
	return r, nil
}

// RebuildStats says what Rebuild wrote.
type RebuildStats struct {
	// Rebuilt are the shards written whole.
	Rebuilt []int `json:"rebuilt"`
	// RepairedChunks counts bad chunks rewritten in place on other shards.
	RepairedChunks int64 `json:"repaired_chunks"`
}

// Rebuild writes shard i whole onto targets[i] for every i in targets (a
// new device of at least ShardBytes, or the shard's own device to rewrite
// it in place), reconstructing it from the other shards; a shard whose
// superblock fails is rewritten in place too, and a bad chunk of any other
// shard is rewritten in place. It fails, having written only chunks that
// are right, when a stripe has fewer than K intact chunks. Afterwards the
// image reads the targets as those shards. progress, if set, gets the
// stripes done.
func (img *Image) Rebuild(ctx context.Context, targets map[int]blockdev.Device, progress func(stripesDone, stripes int64)) (RebuildStats, error) {
	var st RebuildStats
	n := img.opts.Shards()
	for i, d := range targets {
		if i < 0 || i >= n || d == nil || d.Size() < img.opts.ShardBytes(img.opts.DataBytes) {
			return st, fmt.Errorf("%w: rebuild target for shard %d is out of range, missing or too small", ErrGeometry, i)
		}
	}
	sbs, errs := img.loadAll(ctx)
	dst := make([]blockdev.Device, n)
	for i := range dst {
		dst[i] = img.shards[i].dev
	}
	whole := make([]bool, n)
	for i, d := range targets {
		whole[i], dst[i], sbs[i] = true, d, nil
	}
	for i, err := range errs {
		if err != nil && errors.Is(err, ErrCorrupt) && dst[i] != nil && !whole[i] {
			whole[i], sbs[i] = true, nil // a bad superblock: rewrite it whole, in place
		}
	}
	stripes := img.opts.Stripes(img.opts.DataBytes)
	sbBytes := img.opts.SuperblockBytes(img.opts.DataBytes)
	crcs := make([][]uint32, n)
	for i := range crcs {
		if whole[i] {
			crcs[i] = make([]uint32, stripes)
			st.Rebuilt = append(st.Rebuilt, i)
		}
	}
	b := img.newBatch()
	for s0 := int64(0); s0 < stripes; s0 += batchStripes {
		nb := min(batchStripes, stripes-s0)
		img.readBatch(ctx, b, sbs, s0, nb)
		for k := int64(0); k < nb; k++ {
			repaired, err := img.rebuildStripe(ctx, b, k, s0+k, whole, dst, crcs)
			st.RepairedChunks += repaired
			if err != nil {
				return st, err
			}
		}
		if err := writeBatch(ctx, dst, b.bufs, sbBytes+s0*ChunkBytes, nb, whole); err != nil {
			return st, err
		}
		if progress != nil {
			progress(s0+nb, stripes)
		}
	}
	for i := range whole {
		if !whole[i] {
			continue
		}
		sb := Superblock{Geometry: img.opts.Geometry, Shard: i, DataBytes: img.opts.DataBytes, ImageID: img.opts.ImageID, ChunkCRCs: crcs[i]}
		if err := dst[i].WriteAt(ctx, sb.Encode(), 0, 0); err != nil {
			return st, fmt.Errorf("ec: shard %d: write superblock: %w", i, err)
		}
		if err := dst[i].Flush(ctx); err != nil {
			return st, fmt.Errorf("ec: shard %d: flush: %w", i, err)
		}
		s := img.shards[i]
		s.mu.Lock()
		s.dev, s.mu.sb, s.mu.skipUntil, s.mu.lastErr = dst[i], nil, time.Time{}, nil
		s.mu.Unlock()
	}
	return st, nil
}

// rebuildStripe reconstructs stripe s (index k of the batch): the chunks of
// the whole shards are left in the batch's buffers for writeBatch, a bad
// chunk of another shard is written back in place at once.
func (img *Image) rebuildStripe(ctx context.Context, b *batch, k, s int64, whole []bool, dst []blockdev.Device, crcs [][]uint32) (int64, error) {
	n := img.opts.Shards()
	stripe := make([][]byte, n)
	good := 0
	for i := 0; i < n; i++ {
		if b.errs[i][k] == nil {
			stripe[i] = b.bufs[i][k*ChunkBytes : (k+1)*ChunkBytes]
			good++
		}
	}
	if good < img.opts.K {
		return 0, fmt.Errorf("%w: stripe %d has %d intact chunks, %s needs %d", ErrTooFewShards, s, good, img.opts.Geometry, img.opts.K)
	}
	if good < n {
		if err := img.enc.Reconstruct(stripe); err != nil {
			return 0, fmt.Errorf("ec: reconstruct stripe %d: %w", s, err)
		}
	}
	var repaired int64
	for i := 0; i < n; i++ {
		chunk := b.bufs[i][k*ChunkBytes : (k+1)*ChunkBytes]
		if b.errs[i][k] != nil {
			copy(chunk, stripe[i])
		}
		if whole[i] {
			crcs[i][s] = ChunkCRC(chunk)
			continue
		}
		if b.errs[i][k] == nil || dst[i] == nil || errors.Is(b.errs[i][k], errSkip) {
			continue
		}
		if !errors.Is(b.errs[i][k], ErrCorrupt) {
			continue // unreachable: nothing to write to
		}
		off := img.opts.SuperblockBytes(img.opts.DataBytes) + s*ChunkBytes
		if err := dst[i].WriteAt(ctx, chunk, off, 0); err != nil {
			return repaired, fmt.Errorf("ec: shard %d: repair stripe %d: %w", i, s, err)
		}
		if err := dst[i].Flush(ctx); err != nil {
			return repaired, fmt.Errorf("ec: shard %d: flush: %w", i, err)
		}
		repaired++
	}
	return repaired, nil
}
