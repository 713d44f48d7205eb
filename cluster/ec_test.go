package cluster

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

func TestPlanEC(t *testing.T) {
	disks := []ImageDisk{{LU: "img/0", SizeBytes: 1 << 20}, {LU: "img/1", SizeBytes: 3 << 20}}
	ids := []string{"00112233445566778899aabbccddeeff", "ffeeddccbbaa99887766554433221100"}
	shardBytes := func(size int64) int64 { return 4096 + (size+2*65536-1)/(2*65536)*65536 }
	l, lus, err := PlanEC("img", 2, 1, []string{"a", "b", "c", "d"}, disks, shardBytes, ids)
	if err != nil {
		t.Fatal(err)
	}
	if len(lus) != 6 || len(l.Disks) != 2 {
		t.Fatalf("%d LUs, %d disks", len(lus), len(l.Disks))
	}
	for d, disk := range l.Disks {
		seen := map[string]bool{}
		for i, s := range disk.Shards {
			if seen[s.Node] {
				t.Fatalf("disk %d: two shards on %s", d, s.Node)
			}
			seen[s.Node] = true
			lu := lus[d*3+i]
			if lu.Name != s.LU || lu.Writer != s.Node || lu.SizeBytes != disk.ShardBytes || s.LU != ECShardLUName("img", d, i) {
				t.Fatalf("disk %d shard %d: %+v / %+v", d, i, s, lu)
			}
		}
	}
	// Disk 1's data shards start one node on: disks spread their data.
	if l.Disks[0].Shards[0].Node == l.Disks[1].Shards[0].Node {
		t.Error("both disks' shard 0 on one node")
	}
	if got := l.RawBytes(); got != 3*(l.Disks[0].ShardBytes+l.Disks[1].ShardBytes) {
		t.Errorf("raw bytes %d", got)
	}
	for _, c := range []struct {
		k, m  int
		nodes int
		want  string
	}{
		{2, 1, 2, "the pool has 2 nodes"},
		{0, 1, 3, "K=0"},
		{17, 1, 20, "K=17"},
		{2, 0, 3, "M=0"},
		{2, 5, 9, "M=5"},
	} {
		nodes := []string{"a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p", "q", "r", "s", "t"}[:c.nodes]
		_, _, err := PlanEC("img", c.k, c.m, nodes, disks, shardBytes, ids)
		if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%d+%d on %d nodes: %v, want %q", c.k, c.m, c.nodes, err, c.want)
		}
	}
	if IsECShardLU("img") || !IsECShardLU(ECShardLUName("img", 0, 1)) {
		t.Error("IsECShardLU")
	}
}

// TestNodeECRefusedBeforeProposing: on a one-node cluster a 2+1 layout is
// refused by the pre-check, with nothing appended to the log.
func TestNodeECRefusedBeforeProposing(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	n := openNode(t, testOptions(t, t.TempDir(), "n1", true))
	if err := n.WaitLeader(ctx); err != nil {
		t.Fatal(err)
	}
	img := Image{Name: "img", State: ImageImporting, Copies: 1, Disks: []ImageDisk{{LU: "img/0", SizeBytes: 1 << 20}}}
	disk := LU{Name: "img/0", Image: "img", SizeBytes: 1 << 20, Kind: KindFile, Copies: 1, Writer: "n1", CreatedOn: "n1"}
	if err := n.CreateImage(ctx, img, []LU{disk}); err != nil {
		t.Fatal(err)
	}
	img.Disks[0].SHA256 = strings.Repeat("a", 64)
	if err := n.MarkImageReady(ctx, img); err != nil {
		t.Fatal(err)
	}
	l, lus, err := PlanEC("img", 2, 1, []string{"n1", "x", "y"}, img.Disks, func(int64) int64 { return 4096 + 8*65536 }, []string{"00112233445566778899aabbccddeeff"})
	if err != nil {
		t.Fatal(err)
	}
	before := n.Stats().LastLogIndex
	if err := n.CreateEC(ctx, l, lus); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "the pool has 1 nodes") {
		t.Fatalf("2+1 on one node: %v", err)
	}
	if got := n.Stats().LastLogIndex - before; got != 0 {
		t.Errorf("a refused layout appended %d entries", got)
	}
	if _, err := n.GetEC("img"); !errors.Is(err, ErrECNotFound) {
		t.Fatalf("GetEC after a refusal: %v", err)
	}
	if ls, err := n.ListEC(); err != nil || len(ls) != 0 {
		t.Fatalf("ListEC: %v %v", ls, err)
	}
}
