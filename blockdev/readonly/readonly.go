// Package readonly puts a block device behind a switch that makes it
// read-only: an image's disk is written while it imports and refuses every
// write once the image is ready.
//
// The switch is asked on every mutating call and by Caps, so a front end
// that negotiates after the switch turned (NBD: NBD_FLAG_READ_ONLY) never
// offers writes, and one that negotiated before gets ErrReadOnly (NBD:
// EPERM) for each write it still sends.
package readonly

import (
	"context"
	"fmt"

	"github.com/lupool/lupool/blockdev"
)

// Device is a blockdev.Device whose writes are refused while its switch
// says read-only.
type Device struct {
	inner    blockdev.Device
	readOnly func() bool
	trimmer  blockdev.Trimmer
	zeroer   blockdev.Zeroer
	extenter blockdev.Extenter
	tryr     blockdev.TryReader // nil if inner has none
	cacher   blockdev.Cacher    // nil if inner has none
}

var (
	_ blockdev.Device    = (*Device)(nil)
	_ blockdev.Trimmer   = (*Device)(nil)
	_ blockdev.Zeroer    = (*Device)(nil)
	_ blockdev.Extenter  = (*Device)(nil)
	_ blockdev.TryReader = (*Device)(nil)
	_ blockdev.Cacher    = (*Device)(nil)
)

// New returns dev behind readOnly, which must be cheap and safe to call
// from any goroutine. dev must implement blockdev.Trimmer, Zeroer and
// Extenter; TryReader and Cacher are forwarded when dev has them.
func New(dev blockdev.Device, readOnly func() bool) (*Device, error) {
	d := &Device{inner: dev, readOnly: readOnly}
	var ok1, ok2, ok3 bool
	d.trimmer, ok1 = dev.(blockdev.Trimmer)
	d.zeroer, ok2 = dev.(blockdev.Zeroer)
	d.extenter, ok3 = dev.(blockdev.Extenter)
	if !ok1 || !ok2 || !ok3 {
		return nil, fmt.Errorf("readonly: %T lacks trim (%v), write-zeroes (%v) or extents (%v): %w", dev, ok1, ok2, ok3, blockdev.ErrNotSupported)
	}
	d.tryr, _ = dev.(blockdev.TryReader)
	d.cacher, _ = dev.(blockdev.Cacher)
	return d, nil
}

// Size implements blockdev.Device.
func (d *Device) Size() int64 { return d.inner.Size() }

// Caps implements blockdev.Device: ReadOnly while the switch says so.
func (d *Device) Caps() blockdev.Caps {
	c := d.inner.Caps()
	c.ReadOnly = c.ReadOnly || d.readOnly()
	return c
}

// ReadAt implements blockdev.Device.
func (d *Device) ReadAt(ctx context.Context, p []byte, off int64) error {
	return d.inner.ReadAt(ctx, p, off)
}

// WriteAt implements blockdev.Device.
func (d *Device) WriteAt(ctx context.Context, p []byte, off int64, flags blockdev.Flags) error {
	if d.readOnly() {
		return blockdev.ErrReadOnly
	}
	return d.inner.WriteAt(ctx, p, off, flags)
}

// Flush implements blockdev.Device (allowed: it changes no data).
func (d *Device) Flush(ctx context.Context) error { return d.inner.Flush(ctx) }

// Trim implements blockdev.Trimmer.
func (d *Device) Trim(ctx context.Context, off, length int64, flags blockdev.Flags) error {
	if d.readOnly() {
		return blockdev.ErrReadOnly
	}
	return d.trimmer.Trim(ctx, off, length, flags)
}

// WriteZeroes implements blockdev.Zeroer.
func (d *Device) WriteZeroes(ctx context.Context, off, length int64, flags blockdev.Flags) error {
	if d.readOnly() {
		return blockdev.ErrReadOnly
	}
	return d.zeroer.WriteZeroes(ctx, off, length, flags)
}

// Extents implements blockdev.Extenter.
func (d *Device) Extents(ctx context.Context, off, length int64, dst []blockdev.Extent) ([]blockdev.Extent, error) {
	return d.extenter.Extents(ctx, off, length, dst)
}

// TryReadAt implements blockdev.TryReader.
func (d *Device) TryReadAt(ctx context.Context, p []byte, off int64) (bool, error) {
	if d.tryr == nil {
		return false, nil
	}
	return d.tryr.TryReadAt(ctx, p, off)
}

// Cache implements blockdev.Cacher: forwarded, or a no-op.
func (d *Device) Cache(ctx context.Context, off, length int64) error {
	if d.cacher == nil {
		return nil
	}
	return d.cacher.Cache(ctx, off, length)
}
