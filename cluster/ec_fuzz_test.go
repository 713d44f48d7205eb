package cluster

import (
	"testing"

	"github.com/hashicorp/raft"
)

// FuzzApplyECCommand applies an arbitrary entry after a prefix of three
// members and a ready image: a rejected entry changes nothing but the
// counters and the rejection event; an accepted one leaves every layout
// with K+M shards per disk on distinct members, each shard's LU present
// and written on its node, and no mirrored disk beside a ready layout.
func FuzzApplyECCommand(f *testing.F) {
	create := `{"v":1,"type":"image.ec.create","at":"2026-12-07T03:00:10Z","by":"n1","primary":true,"ec":{"image":"img","k":2,"m":1,"state":"encoding","created_on":"n1","disks":[{"lu":"img/0","size_bytes":1048576,"shard_bytes":528384,"image_id":"00112233445566778899aabbccddeeff","shards":[{"lu":".ec.img.0.0","node":"n1"},{"lu":".ec.img.0.1","node":"n2"},{"lu":".ec.img.0.2","node":"n3"}]}]},"lus":[` +
		`{"name":".ec.img.0.0","size_bytes":528384,"kind":"file","copies":1,"created_on":"n1","writer":"n1","epoch":1,"replicas":[{"node_id":"n1","state":"in-sync"}]},` +
		`{"name":".ec.img.0.1","size_bytes":528384,"kind":"file","copies":1,"created_on":"n2","writer":"n2","epoch":1,"replicas":[{"node_id":"n2","state":"in-sync"}]},` +
		`{"name":".ec.img.0.2","size_bytes":528384,"kind":"file","copies":1,"created_on":"n3","writer":"n3","epoch":1,"replicas":[{"node_id":"n3","state":"in-sync"}]}]}`
	for _, seed := range []string{
		create,
		`{"v":1,"type":"image.ec.ready","at":"2026-12-07T03:00:10Z","by":"n1","primary":true,"name":"img"}`,
		`{"v":1,"type":"image.ec.abort","at":"2026-12-07T03:00:10Z","by":"n1","primary":true,"name":"img"}`,
		`{"v":1,"type":"image.ec.create","by":"n1","primary":true}`,
		`{"v":1,"type":"lu.delete","at":"2026-12-07T03:00:10Z","by":"n1","primary":true,"name":".ec.img.0.0"}`,
	} {
		f.Add([]byte(seed), false)
		f.Add([]byte(seed), true)
	}
	prefix := []string{
		`{"v":1,"type":"node.upsert","at":"2026-12-07T03:00:01Z","by":"n1","node":{"id":"n1","peer_addr":"a:1"}}`,
		`{"v":1,"type":"node.upsert","at":"2026-12-07T03:00:02Z","by":"n1","primary":true,"join":true,"node":{"id":"n2","peer_addr":"b:1"}}`,
		`{"v":1,"type":"node.upsert","at":"2026-12-07T03:00:02Z","by":"n1","primary":true,"join":true,"node":{"id":"n3","peer_addr":"c:1"}}`,
		`{"v":1,"type":"image.create","at":"2026-12-07T03:00:05Z","by":"n1","primary":true,"image":{"name":"img","state":"importing","copies":1,"disks":[{"lu":"img/0","size_bytes":1048576}]},"lus":[{"name":"img/0","image":"img","size_bytes":1048576,"kind":"file","copies":1,"created_on":"n1","writer":"n1","epoch":1,"replicas":[{"node_id":"n1","state":"in-sync"}]}]}`,
		`{"v":1,"type":"image.ready","at":"2026-12-07T03:00:06Z","by":"n1","primary":true,"image":{"name":"img","disks":[{"lu":"img/0","size_bytes":1048576,"sha256":"abababababababababababababababababababababababababababababababab"}]}}`,
	}
	f.Fuzz(func(t *testing.T, data []byte, afterCreate bool) {
		fs := newTestFSM(t)
		steps := prefix
		if afterCreate {
			steps = append(append([]string(nil), prefix...), create)
		}
		for i, c := range steps {
			if res, _ := fs.Apply(&raft.Log{Index: uint64(i + 1), Type: raft.LogCommand, Data: []byte(c)}).(applyResult); res.err != nil {
				t.Fatalf("prefix %d: %v", i, res.err)
			}
		}
		before := dump(t, fs)
		res, _ := fs.Apply(&raft.Log{Index: uint64(len(steps) + 1), Type: raft.LogCommand, Data: data}).(applyResult)
		if res.err != nil {
			if stripCounters(dump(t, fs)) != stripCounters(before) {
				t.Fatalf("rejected entry %q changed the state", data)
			}
			return
		}
		checkECInvariants(t, fs)
	})
}

func checkECInvariants(t *testing.T, fs *fsm) {
	t.Helper()
	members, err := memberSet(fs.db)
	if err != nil {
		t.Fatal(err)
	}
	ls, err := listEC(fs.db)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range ls {
		for _, d := range l.Disks {
			if len(d.Shards) != l.K+l.M {
				t.Fatalf("%s: %d shards for %d+%d", d.LU, len(d.Shards), l.K, l.M)
			}
			nodes := map[string]bool{}
			for _, s := range d.Shards {
				if nodes[s.Node] || !members[s.Node] {
					t.Fatalf("%s: shard %s on %s: shared or no member", d.LU, s.LU, s.Node)
				}
				nodes[s.Node] = true
				lu, err := fs.mustGetLU(s.LU)
				if err != nil || lu.Writer != s.Node || lu.Copies != 1 {
					t.Fatalf("%s: shard LU %s: %+v %v", d.LU, s.LU, lu, err)
				}
			}
			if _, err := fs.mustGetLU(d.LU); (err == nil) == (l.State == ECReady) {
				t.Fatalf("%s: layout %s, mirrored disk present: %v", d.LU, l.State, err == nil)
			}
		}
	}
}
