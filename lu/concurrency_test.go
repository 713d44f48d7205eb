package lu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"testing"

	"github.com/lupool/lupool/blockdev"
)

// TestConcurrentIO runs writers on disjoint ranges of one volume, together
// with trims, extents, flushes and online grows, under the race detector;
// each writer then checks its own range.
func TestConcurrentIO(t *testing.T) {
	const (
		writers = 8
		span    = 64 * BlockSizeBytes
		rounds  = 50
	)
	fv, err := CreateFile(filepath.Join(t.TempDir(), "c.lu"), writers*span)
	if err != nil {
		t.Fatal(err)
	}
	defer fv.Close()
	mv := NewMemVolume(writers * span)
	defer mv.Close()
	for _, v := range []Volume{fv, mv} {
		t.Run(string(v.Kind()), func(t *testing.T) {
			ctx := context.Background()
			var wg sync.WaitGroup
			errs := make(chan error, writers+1)
			for w := range writers {
				wg.Go(func() {
					base := int64(w * span)
					for r := range rounds {
						p := bytes.Repeat([]byte{byte(w*rounds + r)}, span/2)
						off := base + int64(r%2)*span/2
						if err := v.WriteAt(ctx, p, off, 0); err != nil {
							errs <- err
							return
						}
						if r%5 == 0 {
							if err := v.Trim(ctx, off, span/2, 0); err != nil {
								errs <- err
								return
							}
							if err := v.WriteAt(ctx, p, off, blockdev.FUA); err != nil {
								errs <- err
								return
							}
						}
						got := make([]byte, len(p))
						if err := v.ReadAt(ctx, got, off); err != nil || !bytes.Equal(got, p) {
							errs <- fmt.Errorf("writer %d round %d: read back differs (%v)", w, r, err)
							return
						}
					}
				})
			}
			wg.Go(func() {
				for r := range rounds {
					if _, err := v.Extents(ctx, 0, writers*span, nil); err != nil {
						errs <- err
						return
					}
					if err := v.Flush(ctx); err != nil {
						errs <- err
						return
					}
					if err := v.Resize(int64(writers*span + (r+1)*BlockSizeBytes)); err != nil {
						errs <- err
						return
					}
				}
			})
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
		})
	}
}

// TestCloseWaitsForIO: Close during I/O never crashes; calls either finish
// or return ErrShutdown.
func TestCloseWaitsForIO(t *testing.T) {
	fv, err := CreateFile(filepath.Join(t.TempDir(), "c.lu"), 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	var wg sync.WaitGroup
	var shut sync.Map
	for g := range 4 {
		wg.Go(func() {
			p := make([]byte, 4096)
			for i := 0; ; i++ {
				err := fv.WriteAt(ctx, p, int64((g*64+i%64)*4096), 0)
				if errors.Is(err, blockdev.ErrShutdown) {
					shut.Store(g, true)
					return
				}
				if err != nil {
					t.Errorf("writer %d: %v", g, err)
					return
				}
			}
		})
	}
	if err := fv.Close(); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	for g := range 4 {
		if _, ok := shut.Load(g); !ok {
			t.Errorf("writer %d never saw ErrShutdown", g)
		}
	}
}
