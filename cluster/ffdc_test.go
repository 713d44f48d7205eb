package cluster

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"
)

// TestFFDCRepository: a bundle over several chunks is stored through the
// log, read back byte for byte, announced by an FFDCCaptured event, and
// the repository keeps the newest FFDCKeep; a node may not store another
// node's bundle, and a wrong-sized chunk is refused.
func TestFFDCRepository(t *testing.T) {
	n := openNode(t, testOptions(t, t.TempDir(), "n1", true))
	ctx := ctxT(t)
	if err := n.WaitLeader(ctx); err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 2*FFDCChunkBytes+1234)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	before := n.LastEventSeq()
	info := FFDCInfo{ID: "20261207T120000Z-n1-0001", CorrelationID: "c1", Node: "n1", Trigger: "collect", Nodes: []string{"n1"}}
	if err := n.PutFFDC(ctx, Proposer{NodeID: "n1"}, info, data); err != nil {
		t.Fatal(err)
	}
	got, back, err := n.FFDCBundle(info.ID)
	if err != nil || !bytes.Equal(back, data) || !got.Complete || got.Chunks != 3 || got.CreatedAt.IsZero() {
		t.Fatalf("bundle read back: %+v, %d bytes equal=%v, %v", got, len(back), bytes.Equal(back, data), err)
	}
	evs, err := n.Events(before, 0)
	if err != nil {
		t.Fatal(err)
	}
	var captured []Event
	for _, ev := range evs {
		if ev.Kind == EventFFDCCaptured {
			captured = append(captured, ev)
		}
	}
	if len(captured) != 1 || captured[0].Details["id"] != info.ID || captured[0].Details["correlation_id"] != "c1" || captured[0].Node != "n1" {
		t.Fatalf("FFDCCaptured events: %+v", captured)
	}
	if err := n.PutFFDC(ctx, Proposer{NodeID: "n2"}, FFDCInfo{ID: "x-n1", Node: "n1", Trigger: "collect"}, []byte("x")); !errors.Is(err, ErrForeignRecord) {
		t.Fatalf("n2 storing n1's bundle: %v, want ErrForeignRecord", err)
	}
	if err := n.PutFFDC(ctx, Proposer{NodeID: "n1"}, info, []byte("again")); !errors.Is(err, ErrExists) {
		t.Fatalf("the same id again: %v, want ErrExists", err)
	}
	if _, err := n.propose(ctx, &command{Type: cmdFFDCPut, By: "n1", FFDC: &FFDCInfo{ID: "short", Node: "n1", Bytes: 10, Chunks: 1},
		Data: []byte("123")}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("a chunk of the wrong size: %v, want ErrInvalid", err)
	}
	for i := 2; i <= FFDCKeep+2; i++ {
		id := fmt.Sprintf("20261207T120000Z-n1-%04d", i)
		if err := n.PutFFDC(ctx, Proposer{NodeID: "n1"}, FFDCInfo{ID: id, Node: "n1", Trigger: "collect"}, []byte(id)); err != nil {
			t.Fatal(err)
		}
	}
	list, err := n.FFDCList()
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != FFDCKeep || list[0].ID != "20261207T120000Z-n1-0003" {
		t.Fatalf("after %d bundles the repository holds %d, oldest %q; want %d from 0003", FFDCKeep+2, len(list), list[0].ID, FFDCKeep)
	}
	if _, _, err := n.FFDCBundle(info.ID); !errors.Is(err, ErrNotFound) {
		t.Fatalf("the oldest bundle after retention: %v, want ErrNotFound", err)
	}
}
