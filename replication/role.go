package replication

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/internal/bufpool"
)

// errRetired is returned by an operation on a Mirror or Forwarder that
// was replaced (this node's role for the LU changed) while it ran.
var errRetired = fmt.Errorf("%w: replication: the LU's role on this node changed", blockdev.ErrShutdown)

// roleDevice is what the front end serves for an LU on this node, for the
// LU's whole life here: it passes every operation to the device of this
// node's current role (a Mirror while it is the writer, a Forwarder
// otherwise, or the local volume of a one-copy LU) and survives role
// changes (a failover that makes this node the writer, a writer that comes
// back as a copy), so clients stay connected through them. An operation
// that fails on a device replaced while it ran is run again on the new
// one: every block-device operation is idempotent.
type roleDevice struct {
	name string
	cur  atomic.Pointer[roleSlot]
	// reruns and bufs recycle what an asynchronous write keeps to run
	// again (rerunCompletion); nil bufs: none kept (tests).
	reruns *sync.Pool
	bufs   *bufpool.Pool
}

// roleSlot is one role's device; retired is set before it is closed.
type roleSlot struct {
	dev     device
	retired atomic.Bool
}

var (
	_ blockdev.Device      = (*roleDevice)(nil)
	_ blockdev.Trimmer     = (*roleDevice)(nil)
	_ blockdev.Zeroer      = (*roleDevice)(nil)
	_ blockdev.Extenter    = (*roleDevice)(nil)
	_ blockdev.TryReader   = (*roleDevice)(nil)
	_ blockdev.AsyncWriter = (*roleDevice)(nil)
)

func newRoleDevice(name string, dev device, reruns *sync.Pool, bufs *bufpool.Pool) *roleDevice {
	r := &roleDevice{name: name, reruns: reruns, bufs: bufs}
	r.cur.Store(&roleSlot{dev: dev})
	return r
}

// swap makes next the device of the current role and returns the slot of
// the one it replaces, retired (the caller closes its device).
func (r *roleDevice) swap(next device) *roleSlot {
	old := r.cur.Swap(&roleSlot{dev: next})
	old.retired.Store(true)
	return old
}

// retire marks the current device retired for good (the LU is going).
func (r *roleDevice) retire() { r.cur.Load().retired.Store(true) }

// again reports whether an operation that failed with err on slot s
// should run again on the current device, and returns it.
func (r *roleDevice) again(s *roleSlot, err error) (*roleSlot, bool) {
	if err == nil || !s.retired.Load() {
		return s, false
	}
	next := r.cur.Load()
	return next, next != s
}

// Device returns the device of the current role (tests).
func (r *roleDevice) Device() blockdev.Device { return r.cur.Load().dev }

// Size implements blockdev.Device.
func (r *roleDevice) Size() int64 { return r.cur.Load().dev.Size() }

// Caps implements blockdev.Device.
func (r *roleDevice) Caps() blockdev.Caps { return r.cur.Load().dev.Caps() }

// ReadAt implements blockdev.Device.
func (r *roleDevice) ReadAt(ctx context.Context, p []byte, off int64) error {
	s := r.cur.Load()
	for {
		err := s.dev.ReadAt(ctx, p, off)
		var again bool
		if s, again = r.again(s, err); !again {
			return err
		}
	}
}

// TryReadAt implements blockdev.TryReader: the current device's, when it
// can try; a retired one answers false (ReadAt then runs).
func (r *roleDevice) TryReadAt(ctx context.Context, p []byte, off int64) (bool, error) {
	s := r.cur.Load()
	tr, ok := s.dev.(blockdev.TryReader)
	if !ok {
		return false, nil
	}
	done, err := tr.TryReadAt(ctx, p, off)
	if err != nil && s.retired.Load() {
		return false, nil
	}
	return done, err
}

// WriteAt implements blockdev.Device.
func (r *roleDevice) WriteAt(ctx context.Context, p []byte, off int64, flags blockdev.Flags) error {
	s := r.cur.Load()
	for {
		err := s.dev.WriteAt(ctx, p, off, flags)
		var again bool
		if s, again = r.again(s, err); !again {
			return err
		}
	}
}

// Flush implements blockdev.Device.
func (r *roleDevice) Flush(ctx context.Context) error {
	s := r.cur.Load()
	for {
		err := s.dev.Flush(ctx)
		var again bool
		if s, again = r.again(s, err); !again {
			return err
		}
	}
}

// Trim implements blockdev.Trimmer.
func (r *roleDevice) Trim(ctx context.Context, off, length int64, flags blockdev.Flags) error {
	s := r.cur.Load()
	for {
		err := errNotSupported
		if t, ok := s.dev.(blockdev.Trimmer); ok {
			err = t.Trim(ctx, off, length, flags)
		}
		var again bool
		if s, again = r.again(s, err); !again {
			return err
		}
	}
}

// WriteZeroes implements blockdev.Zeroer.
func (r *roleDevice) WriteZeroes(ctx context.Context, off, length int64, flags blockdev.Flags) error {
	s := r.cur.Load()
	for {
		err := errNotSupported
		if z, ok := s.dev.(blockdev.Zeroer); ok {
			err = z.WriteZeroes(ctx, off, length, flags)
		}
		var again bool
		if s, again = r.again(s, err); !again {
			return err
		}
	}
}

var errNotSupported = fmt.Errorf("%w: replication: not supported by this LU's device", blockdev.ErrNotSupported)

// Extents implements blockdev.Extenter; a device without allocation
// status reports the range allocated.
func (r *roleDevice) Extents(ctx context.Context, off, length int64, dst []blockdev.Extent) ([]blockdev.Extent, error) {
	s := r.cur.Load()
	for {
		e, ok := s.dev.(blockdev.Extenter)
		if !ok {
			return append(dst, blockdev.Extent{LengthBytes: length}), nil
		}
		out, err := e.Extents(ctx, off, length, dst)
		var again bool
		if s, again = r.again(s, err); !again {
			return out, err
		}
	}
}

// AsyncWrites implements blockdev.AsyncWriter: while the current device
// starts writes asynchronously (a Mirror with copies).
func (r *roleDevice) AsyncWrites() bool {
	aw, ok := r.cur.Load().dev.(blockdev.AsyncWriter)
	return ok && aw.AsyncWrites()
}

// WriteAsync implements blockdev.AsyncWriter on the current device; one
// that cannot (the role changed since AsyncWrites) writes synchronously.
// The device may need p after WriteAsync returned and p is reused: when
// the role changes under the write (a writer fenced by a failover), it is
// run again on the new role's device, like every other operation, from a
// copy of p kept until the write completes.
func (r *roleDevice) WriteAsync(ctx context.Context, p []byte, off int64, flags blockdev.Flags, done blockdev.Completion) {
	s := r.cur.Load()
	aw, ok := s.dev.(blockdev.AsyncWriter)
	if !ok {
		if fl := done.Complete(r.WriteAt(ctx, p, off, flags)); fl != nil {
			fl.FlushReplies()
		}
		return
	}
	if r.bufs == nil {
		aw.WriteAsync(ctx, p, off, flags, done)
		return
	}
	c, _ := r.reruns.Get().(*rerunCompletion)
	if c == nil {
		c = &rerunCompletion{}
	}
	c.ctx, c.r, c.s, c.done, c.off, c.flags = ctx, r, s, done, off, flags
	c.buf = r.bufs.Get(len(p))
	copy(c.buf, p)
	aw.WriteAsync(ctx, p, off, flags, c)
}

// rerunCompletion completes an asynchronous write of a roleDevice, or runs
// it again on the current device when the one it ran on was replaced.
type rerunCompletion struct {
	// ctx is the request's: once it is done (the client's connection
	// closed), the write is never run again; the client may have sent it
	// elsewhere, and writes after it, which a late run would undo.
	ctx   context.Context
	r     *roleDevice
	s     *roleSlot
	done  blockdev.Completion
	buf   []byte
	off   int64
	flags blockdev.Flags
}

// retireWait bounds how long a write refused by a replaced device waits for
// the role device to name the new one.
const retireWait = 10 * time.Second

// Complete implements blockdev.Completion.
func (c *rerunCompletion) Complete(err error) blockdev.ReplyFlusher {
	ctx, r, s, done, buf, off, flags := c.ctx, c.r, c.s, c.done, c.buf, c.off, c.flags
	*c = rerunCompletion{}
	r.reruns.Put(c)
	if err == nil || !errors.Is(err, errRetired) && !s.retired.Load() {
		r.bufs.Put(buf)
		return done.Complete(err)
	}
	// A method with arguments, not a closure: a closure here would move
	// err to the heap on every write, rerun or not.
	go r.rerunWrite(ctx, s, done, buf, off, flags, err)
	return nil
}

// rerunWrite runs an asynchronous write refused by slot s again on the
// current device, once s is retired, and completes it.
func (r *roleDevice) rerunWrite(ctx context.Context, s *roleSlot, done blockdev.Completion, buf []byte, off int64, flags blockdev.Flags, err error) {
	// A device that refused the write as replaced is retired (swap)
	// before it is closed; wait for that, then run it again.
	for deadline := time.Now().Add(retireWait); !s.retired.Load() && ctx.Err() == nil && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
	}
	if s.retired.Load() && ctx.Err() == nil {
		if next := r.cur.Load(); next != s {
			err = r.writeFrom(ctx, next, buf, off, flags)
		}
	}
	r.bufs.Put(buf)
	if fl := done.Complete(err); fl != nil {
		fl.FlushReplies()
	}
}

// writeFrom is WriteAt from slot s on.
func (r *roleDevice) writeFrom(ctx context.Context, s *roleSlot, p []byte, off int64, flags blockdev.Flags) error {
	for {
		err := s.dev.WriteAt(ctx, p, off, flags)
		var again bool
		if s, again = r.again(s, err); !again {
			return err
		}
	}
}

// InlineIO implements the NBD engine's InlineDevice: the current device's.
func (r *roleDevice) InlineIO() bool {
	d, ok := r.cur.Load().dev.(interface{ InlineIO() bool })
	return ok && d.InlineIO()
}
