package replication

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"testing"
	"time"

	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/lu"
	"github.com/lupool/lupool/replication/replproto"
)

// FuzzServeStream feeds a copy's stream server a valid hello followed by
// arbitrary bytes: it must never panic or hang, must answer only with
// well-formed frames, and must leave the copy usable.
func FuzzServeStream(f *testing.F) {
	frame := func(h replproto.Header, payload []byte) []byte { return replproto.AppendFrame(nil, h, payload) }
	f.Add(frame(replproto.Header{Type: replproto.TypeWrite, Epoch: 1, Offset: 4096, Length: 4096}, make([]byte, 4096)))
	f.Add(frame(replproto.Header{Type: replproto.TypeRead, Epoch: 1, Offset: 0, Length: 512}, nil))
	f.Add(frame(replproto.Header{Type: replproto.TypeHash, Epoch: 1, Offset: 0, Length: 8192}, nil))
	f.Add(frame(replproto.Header{Type: replproto.TypeTrim, Epoch: 1, Offset: 1 << 20, Length: 1 << 20}, nil))
	f.Add(frame(replproto.Header{Type: replproto.TypeWrite, Epoch: 0, Offset: 0, Length: 16}, make([]byte, 16)))
	f.Add(frame(replproto.Header{Type: replproto.TypeZero, Flags: replproto.FlagNoHole, Epoch: 1, Offset: 1<<30 - 4096, Length: 4096}, nil))
	f.Add([]byte("garbage that is not a frame at all, forty bytes or more......"))
	// A write whose payload changed after its checksum was computed, then
	// a good one; and a header that fails its own checksum.
	bad := frame(replproto.Header{Type: replproto.TypeWrite, Epoch: 1, Offset: 8192, Length: 512}, bytes.Repeat([]byte{9}, 512))
	bad[replproto.HeaderBytes+7] ^= 0x80
	f.Add(append(bad, frame(replproto.Header{Type: replproto.TypeWrite, Epoch: 1, Offset: 8192, Length: 512}, make([]byte, 512))...))
	badHeader := frame(replproto.Header{Type: replproto.TypeTrim, Epoch: 1, Offset: 0, Length: 4096}, nil)
	badHeader[27] ^= 0x01
	f.Add(badHeader)

	pool, err := lu.OpenPool(lu.PoolOptions{Dirs: []string{f.TempDir()}})
	if err != nil {
		f.Fatal(err)
	}
	defer pool.Close()
	m, err := NewManager(ManagerOptions{NodeID: "copy", Pool: pool, AckTimeout: time.Second})
	if err != nil {
		f.Fatal(err)
	}
	defer m.Close()
	rec := cluster.LU{Name: "f", SizeBytes: 2 << 20, Kind: "memory", Copies: 2, Writer: "w", Epoch: 1,
		Replicas: []cluster.Replica{{NodeID: "w", State: cluster.ReplicaInSync}, {NodeID: "copy", State: cluster.ReplicaInSync}}}
	m.Enqueue(cluster.Change{Kind: cluster.Created, LU: rec})
	sync1(f, m)
	hello := frame(replproto.Header{Type: replproto.TypeHello, Epoch: 1},
		replproto.AppendHello(nil, replproto.Hello{Role: replproto.RoleCopy, LU: "f", Node: "w"}))

	f.Fuzz(func(t *testing.T, data []byte) {
		client, server := net.Pipe()
		done := make(chan struct{})
		go func() {
			defer close(done)
			m.ServeStream("w", server, bufio.NewReader(server))
		}()
		go func() {
			_, _ = client.Write(append(append([]byte(nil), hello...), data...))
			// Half of a pipe cannot be closed for writing; the server sees
			// the end of the input when the client closes after reading.
		}()
		_ = client.SetReadDeadline(time.Now().Add(5 * time.Second))
		br := bufio.NewReader(client)
		var hb [replproto.HeaderBytes]byte
		h, err := replproto.ReadHeader(br, &hb)
		if err != nil || h.Type != replproto.TypeReply|replproto.TypeHello || h.Status != replproto.StatusOK {
			t.Fatalf("hello answered %+v %v", h, err)
		}
		// Read well-formed replies until the server stops answering.
		for {
			_ = client.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
			h, err := replproto.ReadHeader(br, &hb)
			if err != nil {
				break
			}
			if h.Type&replproto.TypeReply == 0 {
				t.Fatalf("server sent a request: %+v", h)
			}
			if _, err := io.CopyN(io.Discard, br, int64(h.PayloadLen)); err != nil {
				break
			}
		}
		client.Close()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("stream server did not end after its peer closed")
		}
		// The copy still works.
		vol, ok := m.Volume("f")
		if !ok {
			t.Fatal("copy volume gone")
		}
		if err := vol.WriteAt(t.Context(), bytes.Repeat([]byte{1}, 512), 0, 0); err != nil {
			t.Fatalf("copy unusable after the stream: %v", err)
		}
	})
}
