package replication

import (
	"bytes"
	"context"
	"net"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/replication/replproto"
)

// tamperConn is a fault-injecting connection: it changes the first
// outgoing frame that match accepts, in flight, with mutate (the frame's
// header and payload bytes, as they go on the wire), once for all the
// connections that share fired. It relies on what peerConn does: every
// Write after the HTTP upgrade request carries whole frames.
type tamperConn struct {
	net.Conn
	t        testing.TB
	fired    *atomic.Bool
	match    func(h replproto.Header) bool
	mutate   func(frame []byte)
	mu       sync.Mutex
	upgraded bool // guarded by mu; the HTTP request has been written
}

func (c *tamperConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	if !c.upgraded {
		c.upgraded = bytes.Contains(p, []byte("\r\n\r\n"))
		c.mu.Unlock()
		return c.Conn.Write(p)
	}
	c.mu.Unlock()
	if c.fired.Load() {
		return c.Conn.Write(p)
	}
	out := bytes.Clone(p)
	for at := 0; at < len(out); {
		h, err := replproto.ParseHeader(out[at:])
		if err != nil {
			c.t.Errorf("tamperConn: frame at %d of a %d-byte write: %v", at, len(out), err)
			break
		}
		end := at + replproto.HeaderBytes + int(h.PayloadLen)
		if end > len(out) {
			c.t.Errorf("tamperConn: a frame spans two writes")
			break
		}
		if c.match(h) && c.fired.CompareAndSwap(false, true) {
			c.mutate(out[at:end])
		}
		at = end
	}
	return c.Conn.Write(out)
}

// TestChecksumRefusesCorruptFrame corrupts one write frame from the writer
// to its copy in flight, in its payload and in its header's offset: the
// copy refuses the frame and never writes it (not at its offset, not at
// another), the writer records the copy out of sync, and the resync makes
// the copy equal to the writer again.
func TestChecksumRefusesCorruptFrame(t *testing.T) {
	const at = 64 << 10
	for _, tc := range []struct {
		name   string
		mutate func(frame []byte)
		// served is how many frames the copy refuses with StatusChecksum:
		// a header that fails its check ends the stream instead.
		served float64
	}{
		{name: "payload", mutate: func(f []byte) { f[replproto.HeaderBytes+100] ^= 0x04 }, served: 1},
		{name: "header offset", mutate: func(f []byte) { f[30] ^= 0x10 }, served: 0}, // offset ± 4096
	} {
		t.Run(tc.name, func(t *testing.T) {
			// Every stream the writer dials is tampered with, in case the
			// first one fails before the write (its hello may reach b
			// before b applied the record); one frame is changed in all.
			var fired atomic.Bool
			mt, nodes := newTestClusterOpts(t, func(o *ManagerOptions) {
				if o.NodeID != "a" {
					return
				}
				dial := o.Dial
				o.Dial = func(ctx context.Context, node, addr string) (net.Conn, error) {
					conn, err := dial(ctx, node, addr)
					if err != nil {
						return nil, err
					}
					return &tamperConn{Conn: conn, t: t, fired: &fired, mutate: tc.mutate, match: func(h replproto.Header) bool {
						return h.Type == replproto.TypeWrite && h.Offset == at && h.Flags&replproto.FlagResync == 0
					}}, nil
				}
			}, "a", "b")
			mt.create(t, twoCopies("c", 1<<20, "file"))
			mir := streamingMirror(t, nodes["a"].m, "c")
			ctx := context.Background()
			want := bytes.Repeat([]byte{0xc3}, 8192)
			corrupt := bytes.Clone(want)
			corrupt[100] ^= 0x04
			if err := mir.WriteAt(ctx, want, at, 0); err != nil {
				t.Fatalf("write: %v", err)
			}
			if !fired.Load() {
				t.Fatal("the frame was not tampered with")
			}
			// The write returned only after the copy was recorded out of
			// sync; whatever b holds now, it is not the corrupted frame.
			vb, ok := nodes["b"].m.Volume("c")
			if !ok {
				t.Fatal("no copy on b")
			}
			got := make([]byte, 3*8192)
			if err := vb.ReadAt(ctx, got, at-8192); err != nil {
				t.Fatal(err)
			}
			if bytes.Contains(got, corrupt) {
				t.Fatal("the copy wrote the corrupted payload")
			}
			if !bytes.Equal(got[:8192], make([]byte, 8192)) || !bytes.Equal(got[16384:], make([]byte, 8192)) {
				t.Fatal("the copy wrote outside the frame's range (a corrupted offset was believed)")
			}
			outOfSync := false
			mt.mu.Lock()
			for _, u := range mt.updates {
				outOfSync = outOfSync || u.Replicas[1].State == cluster.ReplicaOutOfSync
			}
			mt.mu.Unlock()
			if !outOfSync {
				t.Fatal("the copy that refused the frame was never recorded out of sync")
			}
			if v := testutil.ToFloat64(nodes["b"].m.metrics.checksumRefused.WithLabelValues("c", "served")); v != tc.served {
				t.Errorf("checksum refusals on b = %v, want %v", v, tc.served)
			}
			waitFor(t, "b in sync again", func() bool { return mt.get("c").Replicas[1].State == cluster.ReplicaInSync })
			if !bytes.Equal(readAll(t, vb), readAll(t, mir)) {
				t.Fatal("the copy differs from the writer after the resync")
			}
		})
	}
}
