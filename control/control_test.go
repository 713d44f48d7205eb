package control

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/internal/rules"
	"github.com/lupool/lupool/lu"
	"github.com/lupool/lupool/lu/lufs"
	"github.com/lupool/lupool/server/api"
)

// wantErr fails unless err matches sentinel and mentions text.
func wantErr(t *testing.T, what string, err, sentinel error, text string) {
	t.Helper()
	if !errors.Is(err, sentinel) || !strings.Contains(fmt.Sprint(err), text) {
		t.Errorf("%s: %v; want %v mentioning %q", what, err, sentinel, text)
	}
}

// TestCreateValidation: bad requests are refused with the API's words and
// record nothing.
func TestCreateValidation(t *testing.T) {
	p, meta, _, _ := remoteOnly(t, 2)
	ctx := ctxT(t)
	for _, tc := range []struct {
		req      api.CreateLURequest
		sentinel error
		text     string
	}{
		{api.CreateLURequest{Name: "bad/name", SizeBytes: 512}, api.ErrInvalid, `LU name "bad/name": use 1 to 128 of A-Z a-z 0-9 . _ - (not . or ..)`},
		{api.CreateLURequest{Name: "..", SizeBytes: 512}, api.ErrInvalid, "use 1 to 128"},
		{api.CreateLURequest{Name: "x", SizeBytes: 100}, api.ErrInvalid, "size_bytes 100: must be a positive multiple of 512 (the CLI rounds up for you)"},
		{api.CreateLURequest{Name: "x", SizeBytes: rules.SizeBytesMax + 512}, api.ErrInvalid, "at most 1 EiB"},
		{api.CreateLURequest{Name: "x", SizeBytes: 512, Kind: "tape"}, api.ErrInvalid, `kind "tape": use file or memory`},
		{api.CreateLURequest{Name: "x", SizeBytes: 512, Copies: -1}, api.ErrInvalid, "copies -1: must be 1 or more"},
		{api.CreateLURequest{Name: "x", SizeBytes: 512, Copies: 17}, api.ErrInvalid, "copies 17: at most 16"},
		{api.CreateLURequest{Name: "x", SizeBytes: 512, Node: "nx"}, api.ErrInvalid, `node "nx" is not a member`},
	} {
		_, err := p.CreateLU(ctx, tc.req)
		wantErr(t, fmt.Sprintf("CreateLU(%+v)", tc.req), err, tc.sentinel, tc.text)
	}
	meta.put(cluster.LU{Name: "taken", SizeBytes: 512, Copies: 1, Writer: "n1", Epoch: 1,
		Replicas: []cluster.Replica{{NodeID: "n1", State: cluster.ReplicaInSync}}})
	_, err := p.CreateLU(ctx, api.CreateLURequest{Name: "taken", SizeBytes: 512, Node: "n1"})
	wantErr(t, "create of a taken name", err, api.ErrExists, `an LU named "taken" exists; pick another name or delete it first`)
	if lus, _ := meta.ListLUs(); len(lus) != 1 {
		t.Fatalf("bad creates changed the table: %+v", lus)
	}
}

// TestPlacement: the writer first, then the members holding the fewest
// copies, ties by id; too few members is a clear error.
func TestPlacement(t *testing.T) {
	p, meta, _, _ := remoteOnly(t, 5) // n0..n4; n0 is the API node
	ctx := ctxT(t)
	// Load: n1 2 copies, n2 1, n3 0, n4 1 (n0 0).
	for _, l := range []struct {
		name  string
		nodes []string
	}{{"a", []string{"n1", "n2"}}, {"b", []string{"n1", "n4"}}} {
		rec := cluster.LU{Name: l.name, SizeBytes: 512, Copies: len(l.nodes), Writer: l.nodes[0], Epoch: 1}
		for _, id := range l.nodes {
			rec.Replicas = append(rec.Replicas, cluster.Replica{NodeID: id, State: cluster.ReplicaInSync})
		}
		meta.put(rec)
	}
	got, err := p.CreateLU(ctx, api.CreateLURequest{Name: "c", SizeBytes: 1 << 20, Copies: 3, Node: "n1"})
	if err != nil {
		t.Fatal(err)
	}
	// Writer n1; then n0 and n3 (no copies, by id).
	want := []string{"n1", "n0", "n3"}
	if len(got.Replicas) != 3 {
		t.Fatalf("replicas %+v, want on %v", got.Replicas, want)
	}
	for i, r := range got.Replicas {
		if r.Node != want[i] || r.State != cluster.ReplicaInSync {
			t.Fatalf("replicas %+v, want in sync on %v", got.Replicas, want)
		}
	}
	if got.Writer != "n1" || got.Epoch != 1 || got.Copies != 3 {
		t.Fatalf("created %+v", got)
	}
	// Load now: n1 3, n0 1, n2 1, n3 1, n4 1. Four more copies than nodes
	// without the writer: refused, nothing recorded.
	_, err = p.CreateLU(ctx, api.CreateLURequest{Name: "d", SizeBytes: 512, Copies: 6, Node: "n2"})
	wantErr(t, "6 copies on 5 nodes", err, api.ErrInvalid, "copies 6 needs 6 nodes")
	if _, err := meta.GetLU("d"); !errors.Is(err, cluster.ErrNotFound) {
		t.Fatalf("refused create recorded: %v", err)
	}
	// Ties by id among the least loaded, the writer excluded.
	got, err = p.CreateLU(ctx, api.CreateLURequest{Name: "e", SizeBytes: 512, Copies: 2, Node: "n3"})
	if err != nil || got.Replicas[1].Node != "n0" {
		t.Fatalf("second copy of e on %+v (%v), want n0 (least loaded, lowest id)", got.Replicas, err)
	}
}

// TestCreateLocal: a create on this node records the LU and returns once
// its volume exists; the pool holds the room.
func TestCreateLocal(t *testing.T) {
	n := newNode(t)
	ctx := ctxT(t)
	got, err := n.plane.CreateLU(ctx, api.CreateLURequest{Name: "vm1", SizeBytes: 8 << 20, Description: "swap"})
	if err != nil {
		t.Fatal(err)
	}
	if got.Writer != "n1" || got.Kind != "file" || got.Copies != 1 || got.SizeBytes != 8<<20 || got.Description != "swap" {
		t.Fatalf("created %+v", got)
	}
	if vol, ok := n.mgr.Volume("vm1"); !ok || vol.Size() != 8<<20 {
		t.Fatalf("no volume of 8 MiB after CreateLU returned")
	}
	if st := n.pool.Status(); st.ProvisionedBytes != 8<<20 {
		t.Fatalf("pool provisioned %d, want 8 MiB", st.ProvisionedBytes)
	}
	mem, err := n.plane.CreateLU(ctx, api.CreateLURequest{Name: "ram", SizeBytes: 128 << 20, Kind: "memory"})
	if err != nil || mem.Kind != "memory" {
		t.Fatalf("memory LU beyond the disk limit: %+v, %v (memory is not overcommit-limited)", mem, err)
	}
	lus, err := n.plane.ListLUs(ctx)
	if err != nil || len(lus) != 2 {
		t.Fatalf("ListLUs = %+v, %v", lus, err)
	}
	ps, err := n.plane.PoolStatus(ctx)
	if err != nil || ps.LUs != 2 || ps.ProvisionedBytes != 8<<20 || ps.OvercommitRatio != 1 || ps.Node != "n1" {
		t.Fatalf("PoolStatus = %+v, %v", ps, err)
	}
	_, err = n.plane.GetLU(ctx, "nosuch")
	wantErr(t, "GetLU(nosuch)", err, api.ErrNotFound, `no LU named "nosuch"`)
}

// TestCreateRollsBack: when the volume cannot be made, the record is
// taken back out and the reservation released.
func TestCreateRollsBack(t *testing.T) {
	n := newNode(t)
	ctx := ctxT(t)
	n.fault.SetInjector(func(e lufs.Event) error {
		if e.Op == lufs.OpOpen && strings.HasSuffix(e.Path, "doomed.lu") {
			return lufs.Errno(errors.New("disk on fire"))
		}
		return nil
	})
	_, err := n.plane.CreateLU(ctx, api.CreateLURequest{Name: "doomed", SizeBytes: 48 << 20})
	if err == nil || !strings.Contains(err.Error(), `LU "doomed": its volume could not be created, so it was not kept`) ||
		!strings.Contains(err.Error(), "disk on fire") {
		t.Fatalf("CreateLU with a failing disk: %v", err)
	}
	if _, err := n.meta.GetLU("doomed"); !errors.Is(err, cluster.ErrNotFound) {
		t.Fatalf("record left after a failed volume: %v", err)
	}
	n.fault.SetInjector(nil)
	// The 48 MiB reservation is gone: another 48 MiB fits under 64 MiB.
	if err := n.pool.Reserve("probe", 64<<20, lu.KindFile, time.Minute); err != nil {
		t.Fatalf("the failed create's reservation is still held: %v", err)
	}
	n.pool.Release("probe")
	if _, err := n.plane.CreateLU(ctx, api.CreateLURequest{Name: "doomed", SizeBytes: 48 << 20}); err != nil {
		t.Fatalf("create again after the disk recovered: %v", err)
	}
}

// TestConcurrentCreatesRespectOvercommit: creates racing each other near
// the limit: exactly the ones that fit succeed, the others get ErrNoSpace
// naming the numbers before anything is recorded, and the pool is never
// provisioned past its limit.
func TestConcurrentCreatesRespectOvercommit(t *testing.T) {
	n := newNode(t)
	ctx := ctxT(t)
	const racers, size = 8, 20 << 20 // 3 fit under 64 MiB
	// The reservation refuses the others before they are recorded: no
	// record appears that other nodes could see and then lose.
	var recorded, removed atomic.Int64
	cancel := n.meta.Watch(func(ch cluster.Change) {
		switch ch.Kind {
		case cluster.Created:
			recorded.Add(1)
		case cluster.Deleted:
			removed.Add(1)
		}
	})
	defer cancel()
	var maxProvisioned atomic.Int64
	stop := make(chan struct{})
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		for {
			maxProvisioned.Store(max(maxProvisioned.Load(), n.pool.Status().ProvisionedBytes))
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
			}
		}
	}()
	errs := make([]error, racers)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range racers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			_, errs[i] = n.plane.CreateLU(ctx, api.CreateLURequest{Name: fmt.Sprintf("race%d", i), SizeBytes: size})
		}()
	}
	close(start)
	wg.Wait()
	close(stop)
	<-watched
	created := 0
	for i, err := range errs {
		switch {
		case err == nil:
			created++
			if _, ok := n.mgr.Volume(fmt.Sprintf("race%d", i)); !ok {
				t.Errorf("race%d created without a volume", i)
			}
		case errors.Is(err, api.ErrNoSpace):
			if !strings.Contains(err.Error(), "but its limit is 64.0M (1.0 x capacity 64.0M); free space, add a data directory, or raise --overcommit") {
				t.Errorf("overcommit refusal says %q", err)
			}
		default:
			t.Errorf("race%d: %v, want success or ErrNoSpace", i, err)
		}
	}
	if created != 3 {
		t.Fatalf("%d of %d racing creates of 20 MiB passed a limit of 64 MiB, want 3 (%v)", created, racers, errs)
	}
	if lus, _ := n.meta.ListLUs(); len(lus) != 3 {
		t.Fatalf("LU table holds %d LUs, want the 3 created", len(lus))
	}
	if recorded.Load() != 3 || removed.Load() != 0 {
		t.Fatalf("%d creates and %d deletes reached the metadata, want 3 and 0 (refused before recording)",
			recorded.Load(), removed.Load())
	}
	if got := max(maxProvisioned.Load(), n.pool.Status().ProvisionedBytes); got > poolCapacityBytes {
		t.Fatalf("pool provisioned to %d bytes, past its limit %d", got, poolCapacityBytes)
	}
}

// TestResize: a grow past the limit is refused naming the numbers; a
// shrink is refused while the tail holds data, allowed once trimmed.
func TestResize(t *testing.T) {
	n := newNode(t)
	ctx := ctxT(t)
	if _, err := n.plane.CreateLU(ctx, api.CreateLURequest{Name: "vm1", SizeBytes: 32 << 20}); err != nil {
		t.Fatal(err)
	}
	_, err := n.plane.ResizeLU(ctx, "vm1", 64<<20+512)
	wantErr(t, "grow past the limit", err, api.ErrNoSpace,
		"pool would be provisioned to 64.0M (67109376 bytes) but its limit is 64.0M (1.0 x capacity 64.0M); free space, add a data directory, or raise --overcommit")
	_, err = n.plane.ResizeLU(ctx, "vm1", 1000)
	wantErr(t, "resize to 1000 bytes", err, api.ErrInvalid, "size_bytes 1000: must be a positive multiple of 512")
	_, err = n.plane.ResizeLU(ctx, "nosuch", 512)
	wantErr(t, "resize of an unknown LU", err, api.ErrNotFound, `no LU named "nosuch"`)
	got, err := n.plane.ResizeLU(ctx, "vm1", 64<<20)
	if err != nil || got.SizeBytes != 64<<20 {
		t.Fatalf("grow to the limit: %+v, %v", got, err)
	}
	vol, _ := n.mgr.Volume("vm1")
	if vol.Size() != 64<<20 {
		t.Fatalf("volume is %d bytes after the grow", vol.Size())
	}
	if err := vol.WriteAt(ctx, []byte("tail"), 40<<20, 0); err != nil {
		t.Fatal(err)
	}
	_, err = n.plane.ResizeLU(ctx, "vm1", 16<<20)
	wantErr(t, "shrink over data", err, api.ErrInvalid, "cannot shrink to 16777216 bytes: data is allocated at offset 41943040")
	if rec, _ := n.meta.GetLU("vm1"); rec.SizeBytes != 64<<20 {
		t.Fatalf("refused shrink recorded %d bytes", rec.SizeBytes)
	}
	if err := vol.(blockdev.Trimmer).Trim(ctx, 40<<20, rules.BlockBytes, 0); err != nil {
		t.Fatal(err)
	}
	if got, err := n.plane.ResizeLU(ctx, "vm1", 16<<20); err != nil || got.SizeBytes != 16<<20 {
		t.Fatalf("shrink of a trimmed tail: %+v, %v", got, err)
	}
}

// TestDelete: refused while clients are attached here or on another node
// (a node that does not answer is left out), unless forced.
func TestDelete(t *testing.T) {
	p, meta, peers, conns := remoteOnly(t, 3)
	ctx := ctxT(t)
	meta.put(cluster.LU{Name: "vm1", SizeBytes: 512, Copies: 1, Writer: "n1", Epoch: 1,
		Replicas: []cluster.Replica{{NodeID: "n1", State: cluster.ReplicaInSync}}})
	peers.nodes["n1"] = &peerNode{conns: map[string]int{"vm1": 2}}
	peers.nodes["n2"] = &peerNode{conns: map[string]int{"vm1": 5}, fail: errors.New("unreachable")}
	conns.set("vm1", 1)
	err := p.DeleteLU(ctx, "vm1", false)
	wantErr(t, "delete while attached", err, api.ErrBusy,
		`LU "vm1" has 3 client connection(s) attached (1 on n0, 2 on n1); detach them, or delete with --force to end their I/O`)
	conns.set("vm1", 0)
	err = p.DeleteLU(ctx, "vm1", false)
	wantErr(t, "delete while attached elsewhere", err, api.ErrBusy, "2 client connection(s) attached (2 on n1)")
	err = p.DeleteLU(ctx, "nosuch", true)
	wantErr(t, "delete of an unknown LU", err, api.ErrNotFound, `no LU named "nosuch"`)
	if err := p.DeleteLU(ctx, "vm1", true); err != nil {
		t.Fatalf("forced delete: %v", err)
	}
	if _, err := meta.GetLU("vm1"); !errors.Is(err, cluster.ErrNotFound) {
		t.Fatalf("LU still recorded after a forced delete: %v", err)
	}
}

// TestDeleteLocal: on a real node, a detached LU's delete removes the
// record and the volume, and gives the room back.
func TestDeleteLocal(t *testing.T) {
	n := newNode(t)
	ctx := ctxT(t)
	if _, err := n.plane.CreateLU(ctx, api.CreateLURequest{Name: "vm1", SizeBytes: 64 << 20}); err != nil {
		t.Fatal(err)
	}
	n.conns.set("vm1", 1)
	wantErr(t, "delete while attached", n.plane.DeleteLU(ctx, "vm1", false), api.ErrBusy, "1 on n1")
	n.conns.set("vm1", 0)
	if err := n.plane.DeleteLU(ctx, "vm1", false); err != nil {
		t.Fatal(err)
	}
	if _, ok := n.mgr.Volume("vm1"); ok {
		t.Fatal("volume left after delete")
	}
	if _, err := n.plane.CreateLU(ctx, api.CreateLURequest{Name: "vm2", SizeBytes: 64 << 20}); err != nil {
		t.Fatalf("room not given back by delete: %v", err)
	}
}

// TestAddCopy: a new copy goes to the least loaded member without one and
// starts new at the next epoch; bad requests are refused clearly.
func TestAddCopy(t *testing.T) {
	p, meta, _, _ := remoteOnly(t, 4)
	ctx := ctxT(t)
	meta.put(cluster.LU{Name: "vm1", SizeBytes: 1 << 20, Copies: 1, Writer: "n1", Epoch: 1,
		Replicas: []cluster.Replica{{NodeID: "n1", State: cluster.ReplicaInSync}}})
	meta.put(cluster.LU{Name: "busy", SizeBytes: 512, Copies: 1, Writer: "n0", Epoch: 1,
		Replicas: []cluster.Replica{{NodeID: "n0", State: cluster.ReplicaInSync}}})
	got, err := p.AddCopy(ctx, "vm1", api.AddCopyRequest{})
	if err != nil {
		t.Fatal(err)
	}
	// n0 holds one copy; n2 and n3 none: n2 by id.
	if got.Epoch != 2 || got.Copies != 2 || len(got.Replicas) != 2 || got.Replicas[1] != (api.Replica{Node: "n2", State: cluster.ReplicaNew}) {
		t.Fatalf("after add-copy: %+v", got)
	}
	_, err = p.AddCopy(ctx, "vm1", api.AddCopyRequest{Node: "n2"})
	wantErr(t, "second copy on n2", err, api.ErrExists, `LU "vm1" already has a copy on n2`)
	_, err = p.AddCopy(ctx, "vm1", api.AddCopyRequest{Node: "n9"})
	wantErr(t, "copy on a non-member", err, api.ErrInvalid, `node "n9" is not a member of this cluster`)
	_, err = p.AddCopy(ctx, "nosuch", api.AddCopyRequest{})
	wantErr(t, "copy of an unknown LU", err, api.ErrNotFound, `no LU named "nosuch"`)
	if _, err := p.AddCopy(ctx, "vm1", api.AddCopyRequest{Node: "n3"}); err != nil {
		t.Fatal(err)
	}
	if _, err := p.AddCopy(ctx, "vm1", api.AddCopyRequest{Node: "n0"}); err != nil {
		t.Fatal(err)
	}
	_, err = p.AddCopy(ctx, "vm1", api.AddCopyRequest{})
	wantErr(t, "copy with every member holding one", err, api.ErrInvalid, `no node without a copy of "vm1" to place one on`)
}

// TestAddCopyLimit: an LU with CopiesMax copies takes no more.
func TestAddCopyLimit(t *testing.T) {
	p, meta, _, _ := remoteOnly(t, rules.CopiesMax+1)
	rec := cluster.LU{Name: "full", SizeBytes: 512, Copies: rules.CopiesMax, Writer: "n1", Epoch: 1}
	for i := 1; i <= rules.CopiesMax; i++ {
		rec.Replicas = append(rec.Replicas, cluster.Replica{NodeID: fmt.Sprintf("n%d", i), State: cluster.ReplicaInSync})
	}
	meta.put(rec)
	_, err := p.AddCopy(ctxT(t), "full", api.AddCopyRequest{Node: "n0"})
	wantErr(t, "17th copy", err, api.ErrInvalid, `LU "full" has 16 copies, the most allowed`)
}

// TestVerify: copies that differ are reported per region with each copy's
// hash; a region that differs only while a write is in flight is hashed
// again and not reported; copies not in sync or not answering are skipped.
func TestVerify(t *testing.T) {
	p, meta, peers, _ := remoteOnly(t, 4)
	ctx := ctxT(t)
	const size, region = 1 << 20, 64 << 10
	vols := map[string]lu.Volume{}
	pool, err := lu.OpenPool(lu.PoolOptions{Dirs: []string{"/peers"}, FS: lufs.NewMemFS(lufs.MemFSOptions{}), OvercommitRatio: 4})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pool.Close() })
	for _, id := range []string{"n1", "n2", "n3"} {
		v, err := pool.Create("vm1-"+id, size, lu.KindFile)
		if err != nil {
			t.Fatal(err)
		}
		if err := v.WriteAt(ctx, []byte("same on every copy"), 3*region, 0); err != nil {
			t.Fatal(err)
		}
		vols[id] = v
		peers.nodes[id] = &peerNode{vols: map[string]lu.Volume{"vm1": v}}
	}
	meta.put(cluster.LU{Name: "vm1", SizeBytes: size, Copies: 3, Writer: "n1", Epoch: 1, Replicas: []cluster.Replica{
		{NodeID: "n1", State: cluster.ReplicaInSync}, {NodeID: "n2", State: cluster.ReplicaInSync}, {NodeID: "n3", State: cluster.ReplicaInSync}}})

	report, err := p.VerifyLU(ctx, "vm1", api.VerifyRequest{RegionBytes: region})
	if err != nil || !report.Equal || report.Regions != size/region || len(report.Mismatches) != 0 || report.Skipped != nil {
		t.Fatalf("equal copies: %+v, %v", report, err)
	}
	// n2 differs at region 5 for good; region 9 differs on n3 only the
	// first time it is hashed (a write in flight).
	if err := vols["n2"].WriteAt(ctx, []byte("lost write"), 5*region+100, 0); err != nil {
		t.Fatal(err)
	}
	peers.nodes["n3"].once = map[int64]string{9 * region: "in-flight"}
	report, err = p.VerifyLU(ctx, "vm1", api.VerifyRequest{RegionBytes: region})
	if err != nil {
		t.Fatal(err)
	}
	if report.Equal || len(report.Mismatches) != 1 || report.Mismatches[0].OffsetBytes != 5*region {
		t.Fatalf("report %+v, want one mismatch at %d", report, 5*region)
	}
	h := report.Mismatches[0].Hashes
	if len(h) != 3 || h["n1"] != h["n3"] || h["n1"] == h["n2"] {
		t.Fatalf("mismatch hashes %v, want n2 alone to differ", h)
	}
	if len(peers.nodes["n3"].once) != 0 {
		t.Fatal("region 9 was never hashed")
	}
	// Region 9 was asked again and region 5 Rechecks times: 1 batch + 1 + 3.
	if got := peers.calls["n3"]; got != 1+1+1+3 {
		t.Errorf("n3 was asked %d times over two verifies, want 6 (a batch each, 1 re-check of region 9, 3 of region 5)", got)
	}

	// A copy out of sync and a node that does not answer are skipped.
	rec, _ := meta.GetLU("vm1")
	rec.Replicas[2].State = cluster.ReplicaOutOfSync
	meta.put(rec)
	peers.nodes["n2"].fail = errors.New("node n2 unreachable")
	report, err = p.VerifyLU(ctx, "vm1", api.VerifyRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if report.Equal || report.RegionBytes != rules.RegionBytesDefault || report.Regions != 1 || len(report.Mismatches) != 0 ||
		report.Skipped["n3"] != "copy is out-of-sync: it is known to lack data" || !strings.Contains(report.Skipped["n2"], "unreachable") {
		t.Fatalf("report with skipped copies: %+v", report)
	}

	for _, bad := range []int64{512, 6000, 128 << 20} {
		_, err := p.VerifyLU(ctx, "vm1", api.VerifyRequest{RegionBytes: bad})
		wantErr(t, fmt.Sprintf("verify with region %d", bad), err, api.ErrInvalid,
			fmt.Sprintf("region %d bytes: use a multiple of 4K from 4K to 64M", bad))
	}
	_, err = p.VerifyLU(ctx, "nosuch", api.VerifyRequest{})
	wantErr(t, "verify of an unknown LU", err, api.ErrNotFound, `no LU named "nosuch"`)
}

// TestVerifyLocalCopy: this node's own copy is hashed by the replication
// manager; the region-hash call of the API maps its errors.
func TestVerifyLocalCopy(t *testing.T) {
	n := newNode(t)
	ctx := ctxT(t)
	if _, err := n.plane.CreateLU(ctx, api.CreateLURequest{Name: "vm1", SizeBytes: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	report, err := n.plane.VerifyLU(ctx, "vm1", api.VerifyRequest{RegionBytes: 256 << 10})
	if err != nil || !report.Equal || report.Regions != 4 || len(report.Copies) != 1 {
		t.Fatalf("one-copy verify: %+v, %v", report, err)
	}
	h, err := n.plane.RegionHashes(ctx, "vm1", 0, 256<<10, 4)
	if err != nil || len(h.Hashes) != 4 || h.Node != "n1" {
		t.Fatalf("RegionHashes = %+v, %v", h, err)
	}
	_, err = n.plane.RegionHashes(ctx, "vm1", 1000, 256<<10, 1)
	wantErr(t, "hashes at an unaligned offset", err, api.ErrInvalid, "offset 1000")
}

// TestOptions: New refuses options that cannot work.
func TestOptions(t *testing.T) {
	if _, err := New(Options{}); err == nil {
		t.Error("New with no parts succeeded")
	}
	p, _, _, _ := remoteOnly(t, 1)
	opts := p.opts
	opts.OvercommitRatio = 0
	if _, err := New(opts); err == nil || !strings.Contains(err.Error(), "overcommit ratio") {
		t.Errorf("New with ratio 0: %v", err)
	}
}

// TestCreateMemoryBudget: a memory LU is refused (ErrNoSpace naming the
// node) when its writer or a copy would sit on a node whose memory budget
// has less room than its size, and nothing is recorded; the local writer's
// room is reserved in the local pool's budget.
func TestCreateMemoryBudget(t *testing.T) {
	ctx := ctxT(t)
	p, meta, peers, _ := remoteOnly(t, 3)
	peers.nodes["n1"] = &peerNode{memBudget: 64 << 20, memFree: 24 << 20}
	peers.nodes["n2"] = &peerNode{}
	_, err := p.CreateLU(ctx, api.CreateLURequest{Name: "m", SizeBytes: 32 << 20, Kind: "memory", Node: "n1"})
	if !errors.Is(err, api.ErrNoSpace) || !strings.Contains(err.Error(), "memory budget of node n1") ||
		!strings.Contains(err.Error(), "24.0M of 64.0M free") {
		t.Fatalf("writer past its budget: %v", err)
	}
	// A copy on n1 is refused the same way (three copies with writer n2
	// take every member, n1 among them).
	_, err = p.CreateLU(ctx, api.CreateLURequest{Name: "m", SizeBytes: 32 << 20, Kind: "memory", Node: "n2", Copies: 3})
	if !errors.Is(err, api.ErrNoSpace) || !strings.Contains(err.Error(), "memory budget of node n1") {
		t.Fatalf("copy past its budget: %v", err)
	}
	if lus, _ := meta.ListLUs(); len(lus) != 0 {
		t.Fatalf("refused creates recorded %+v", lus)
	}
	// File LUs do not draw on it; a memory LU that fits is made.
	if _, err := p.CreateLU(ctx, api.CreateLURequest{Name: "f", SizeBytes: 32 << 20, Kind: "file", Node: "n1"}); err != nil {
		t.Fatalf("file LU: %v", err)
	}
	if _, err := p.CreateLU(ctx, api.CreateLURequest{Name: "m", SizeBytes: 16 << 20, Kind: "memory", Node: "n1"}); err != nil {
		t.Fatalf("memory LU within the budget: %v", err)
	}
	// Growing a memory LU grows every copy: past n1's room (24M free) it
	// is refused naming n1 and the size stays; within it, it is done.
	if _, err := p.CreateLU(ctx, api.CreateLURequest{Name: "g", SizeBytes: 8 << 20, Kind: "memory", Node: "n2", Copies: 3}); err != nil {
		t.Fatalf("memory LU with a copy on n1: %v", err)
	}
	_, err = p.ResizeLU(ctx, "g", 40<<20)
	if !errors.Is(err, api.ErrNoSpace) || !strings.Contains(err.Error(), "memory budget of node n1") {
		t.Fatalf("grow past a copy's budget: %v", err)
	}
	if rec, _ := meta.GetLU("g"); rec.SizeBytes != 8<<20 {
		t.Fatalf("a refused grow recorded size %d", rec.SizeBytes)
	}
	if _, err := p.ResizeLU(ctx, "g", 24<<20); err != nil {
		t.Fatalf("grow within every copy's budget: %v", err)
	}
}

// TestMemoryBudgetLocal: on the writer's own node the create reserves its
// room in the memory budget (a second create past it is refused and
// recorded nowhere), a grow past it is refused, a delete frees it.
func TestMemoryBudgetLocal(t *testing.T) {
	ctx := ctxT(t)
	n := newNode(t, func(o *lu.PoolOptions) { o.MemoryBudgetBytes = 48 << 20 })
	if _, err := n.plane.CreateLU(ctx, api.CreateLURequest{Name: "a", SizeBytes: 32 << 20, Kind: "memory"}); err != nil {
		t.Fatal(err)
	}
	_, err := n.plane.CreateLU(ctx, api.CreateLURequest{Name: "b", SizeBytes: 32 << 20, Kind: "memory"})
	if !errors.Is(err, api.ErrNoSpace) || !strings.Contains(err.Error(), "memory budget of node n1") {
		t.Fatalf("create past the budget: %v", err)
	}
	if _, err := n.meta.GetLU("b"); err == nil {
		t.Fatal("a refused create was recorded")
	}
	if _, err := n.plane.ResizeLU(ctx, "a", 64<<20); !errors.Is(err, api.ErrNoSpace) {
		t.Fatalf("grow past the budget: %v", err)
	}
	if got, _ := n.plane.GetLU(ctx, "a"); got.SizeBytes != 32<<20 {
		t.Fatalf("a refused grow changed the size to %d", got.SizeBytes)
	}
	if st, _ := n.plane.PoolStatus(ctx); st.MemoryBudgetBytes != 48<<20 || st.MemoryFreeBytes != 16<<20 {
		t.Fatalf("pool status: %+v", st)
	}
	if err := n.plane.DeleteLU(ctx, "a", false); err != nil {
		t.Fatal(err)
	}
	if _, err := n.plane.CreateLU(ctx, api.CreateLURequest{Name: "b", SizeBytes: 48 << 20, Kind: "memory"}); err != nil {
		t.Fatalf("after the delete: %v", err)
	}
}
