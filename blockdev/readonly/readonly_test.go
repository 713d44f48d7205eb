package readonly

import (
	"bytes"
	"context"
	"errors"
	"sync/atomic"
	"testing"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/blockdev/blockdevtest"
)

// TestSwitch: writes, trims and zeroes pass while the switch is off and
// are refused with ErrReadOnly, changing nothing, once it is on; reads,
// flushes and extents pass either way; Caps follows the switch.
func TestSwitch(t *testing.T) {
	ctx := context.Background()
	mem := blockdevtest.NewMem(1<<20, blockdev.Caps{})
	var ro atomic.Bool
	d, err := New(mem, ro.Load)
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte{9}, 4096)
	if d.Caps().ReadOnly {
		t.Fatal("read-only before the switch")
	}
	if err := d.WriteAt(ctx, data, 0, 0); err != nil {
		t.Fatal(err)
	}
	ro.Store(true)
	if !d.Caps().ReadOnly {
		t.Fatal("Caps does not follow the switch")
	}
	for what, err := range map[string]error{
		"write":        d.WriteAt(ctx, make([]byte, 4096), 0, 0),
		"trim":         d.Trim(ctx, 0, 4096, 0),
		"write-zeroes": d.WriteZeroes(ctx, 0, 4096, 0),
	} {
		if !errors.Is(err, blockdev.ErrReadOnly) {
			t.Errorf("%s on a read-only device: %v, want ErrReadOnly", what, err)
		}
	}
	got := make([]byte, 4096)
	if err := d.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read after refused writes: %v, changed %v", err, !bytes.Equal(got, data))
	}
	if err := d.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := New(struct{ blockdev.Device }{mem}, ro.Load); !errors.Is(err, blockdev.ErrNotSupported) {
		t.Fatalf("a device without trim: %v", err)
	}
}
