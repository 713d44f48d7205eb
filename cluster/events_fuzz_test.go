package cluster

import (
	"bytes"
	"strconv"
	"strings"
	"testing"

	"github.com/hashicorp/raft"
)

// FuzzApplyEventCommands applies an arbitrary entry after a fixed prefix
// (two members, an LU, a subscriber): Apply never panics, a rejected entry
// changes nothing but the counters and one CommandRejected event, and the
// event log stays numbered without gaps.
func FuzzApplyEventCommands(f *testing.F) {
	for _, seed := range []string{
		`{"v":1,"type":"event.append","at":"2026-11-22T03:00:10Z","by":"n2","event":{"kind":"PoolThreshold","node":"n2"}}`,
		`{"v":1,"type":"event.append","at":"2026-11-22T03:00:10Z","by":"n1","primary":true,"event":{"kind":"LUDeleted","lu":"m"}}`,
		`{"v":1,"type":"event.prune","at":"2026-11-22T03:00:10Z","by":"n1","primary":true,"below_seq":3}`,
		`{"v":1,"type":"sub.add","at":"2026-11-22T03:00:10Z","by":"n1","primary":true,"sub":{"id":"s","to":"tcp://h:1"}}`,
		`{"v":1,"type":"sub.ack","at":"2026-11-22T03:00:10Z","by":"n1","primary":true,"name":"ops","ack_seq":2}`,
		`{"v":1,"type":"sub.remove","at":"2026-11-22T03:00:10Z","by":"n1","primary":true,"name":"ops"}`,
		`{"v":1,"type":"ffdc.put","at":"2026-11-22T03:00:10Z","by":"n2","ffdc":{"id":"b","node":"n2","bytes":3,"chunks":1},"data":"YWJj"}`,
		`{"v":1,"type":"lu.copies","at":"2026-11-22T03:00:10Z","by":"n1","change":{"name":"m","expected_epoch":1,"epoch":2,"writer":"n1","copies":2,"replicas":[{"node_id":"n1","state":"in-sync"},{"node_id":"n2","state":"out-of-sync"}]}}`,
		`{"v":1,"type":"move","at":"2026-11-22T03:00:10Z","by":"n1","primary":true,"move":{"lu":"m","op":"start","to":"n2"}}`,
		`{"v":1,"type":"move","at":"2026-11-22T03:00:10Z","by":"n1","move":{"lu":"m","op":"switch","role":"source","step":"drained"}}`,
		`{"v":1,"type":"move","at":"2026-11-22T03:00:10Z","by":"n2","move":{"lu":"m","op":"rollback","role":"target","reason":"x"}}`,
		`{"v":1,"type":"move","by":"n2"}`,
		`{"v":1,"type":"image.create","at":"2026-11-22T03:00:10Z","by":"n1","primary":true,"image":{"name":"deb","state":"importing","copies":1,"disks":[{"lu":"deb/0","size_bytes":1048576}]},"lus":[{"name":"deb/0","image":"deb","size_bytes":1048576,"kind":"file","copies":1,"created_on":"n1","writer":"n1","epoch":1,"replicas":[{"node_id":"n1","state":"in-sync"}]}]}`,
		`{"v":1,"type":"image.ready","at":"2026-11-22T03:00:10Z","by":"n1","primary":true,"image":{"name":"deb","disks":[{"lu":"deb/0","size_bytes":1048576,"sha256":"abababababababababababababababababababababababababababababababab"}]}}`,
		`{"v":1,"type":"image.delete","at":"2026-11-22T03:00:10Z","by":"n1","primary":true,"name":"deb"}`,
		`{"v":1,"type":"lu.create","at":"2026-11-22T03:00:10Z","by":"n1","primary":true,"lu":{"name":"vm","base":"img/0","size_bytes":1048576,"kind":"file","copies":1,"created_on":"n1","writer":"n1","epoch":1,"replicas":[{"node_id":"n1","state":"in-sync"}]}}`,
		`{"v":1,"type":"lu.flatten","at":"2026-11-22T03:00:10Z","by":"n1","primary":true,"name":"vm"}`,
		`{"v":1,"type":"image.create","by":"n1","primary":true}`,
		`{"v":1,"type":"lu.snapshot","at":"2026-11-22T03:00:10Z","by":"n1","primary":true,"lu":{"name":"m@s1","snapshot_of":"m","read_only":true,"size_bytes":1048576,"kind":"file","copies":2,"created_on":"n1","writer":"n1","epoch":1,"replicas":[{"node_id":"n1","state":"in-sync"},{"node_id":"n2","state":"in-sync"}]}}`,
		`{"v":1,"type":"lu.snapshot","at":"2026-11-22T03:00:10Z","by":"n1","primary":true,"lu":{"name":"m@s1","snapshot_of":"m","size_bytes":1048576,"kind":"file","copies":1,"epoch":1,"replicas":[{"node_id":"n2","state":"new"}]}}`,
		`{"v":1,"type":"lu.snapshot","by":"n1","primary":true}`,
		`{"v":1,"type":"lu.delete","at":"2026-11-22T03:00:10Z","by":"n1","primary":true,"name":"m@s1"}`,
		`{"v":1,"type":"image.delete","at":"2026-11-22T03:00:10Z","by":"n1","primary":true,"name":"img"}`,
		`{"v":1,"type":"event.append","event":{}}`,
		`not json`,
	} {
		f.Add([]byte(seed))
	}
	prefix := []string{
		`{"v":1,"type":"node.upsert","at":"2026-11-22T03:00:01Z","by":"n1","node":{"id":"n1","peer_addr":"a:1"}}`,
		`{"v":1,"type":"node.upsert","at":"2026-11-22T03:00:02Z","by":"n1","primary":true,"join":true,"node":{"id":"n2","peer_addr":"b:1"}}`,
		`{"v":1,"type":"lu.create","at":"2026-11-22T03:00:03Z","by":"n1","primary":true,"lu":{"name":"m","size_bytes":1048576,"kind":"file","copies":2,"created_on":"n1","writer":"n1","epoch":1,"replicas":[{"node_id":"n1","state":"in-sync"},{"node_id":"n2","state":"in-sync"}]}}`,
		`{"v":1,"type":"sub.add","at":"2026-11-22T03:00:04Z","by":"n1","primary":true,"sub":{"id":"ops","to":"tcp://h:9"}}`,
		`{"v":1,"type":"image.create","at":"2026-11-22T03:00:05Z","by":"n1","primary":true,"image":{"name":"img","state":"importing","copies":1,"disks":[{"lu":"img/0","size_bytes":1048576}]},"lus":[{"name":"img/0","image":"img","size_bytes":1048576,"kind":"file","copies":1,"created_on":"n1","writer":"n1","epoch":1,"replicas":[{"node_id":"n1","state":"in-sync"}]}]}`,
		`{"v":1,"type":"image.ready","at":"2026-11-22T03:00:06Z","by":"n1","primary":true,"image":{"name":"img","disks":[{"lu":"img/0","size_bytes":1048576,"sha256":"abababababababababababababababababababababababababababababababab"}]}}`,
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		fs := newTestFSM(t)
		for i, c := range prefix {
			if res, _ := fs.Apply(&raft.Log{Index: uint64(i + 1), Type: raft.LogCommand, Data: []byte(c)}).(applyResult); res.err != nil {
				t.Fatalf("prefix %d: %v", i, res.err)
			}
		}
		before := dump(t, fs)
		seqBefore, rejectedBefore := fs.eventSeq.Load(), fs.rejected.Load()
		res, _ := fs.Apply(&raft.Log{Index: uint64(len(prefix) + 1), Type: raft.LogCommand, Data: data}).(applyResult)
		evs, err := readEvents(fs.db, 0, 0)
		if err != nil {
			t.Fatal(err)
		}
		for i := 1; i < len(evs); i++ {
			if evs[i].Seq != evs[i-1].Seq+1 {
				t.Fatalf("event seqs %d then %d", evs[i-1].Seq, evs[i].Seq)
			}
		}
		if fs.eventSeq.Load() < seqBefore {
			t.Fatalf("event seq went back from %d to %d", seqBefore, fs.eventSeq.Load())
		}
		if res.err == nil {
			return
		}
		if fs.rejected.Load() != rejectedBefore+1 || fs.eventSeq.Load() != seqBefore+1 {
			t.Fatalf("rejected entry: rejected %d (was %d), event seq %d (was %d)", fs.rejected.Load(), rejectedBefore, fs.eventSeq.Load(), seqBefore)
		}
		if last := evs[len(evs)-1]; last.Kind != EventCommandRejected {
			t.Fatalf("rejected entry left a %s event", last.Kind)
		}
		if stripCounters(dump(t, fs)) != stripCounters(before) {
			t.Fatalf("rejected entry %q changed the state", data)
		}
	})
}

// FuzzParseAckLine: the TCP acknowledgement parser never panics, accepts
// exactly decimal seqs (with white space around) and bounds the line.
func FuzzParseAckLine(f *testing.F) {
	for _, s := range []string{"42\n", " 7 \r\n", "-1\n", "x", "", "18446744073709551615\n", "18446744073709551616\n"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		got, err := parseAckLine(line)
		if err != nil {
			return
		}
		if len(line) > deliveryAckLineMax {
			t.Fatalf("accepted a line of %d bytes", len(line))
		}
		digits := bytes.TrimSpace(line)
		for _, c := range digits {
			if c < '0' || c > '9' {
				t.Fatalf("%q (not only digits) parsed as %d", line, got)
			}
		}
		if want := strings.TrimLeft(string(digits), "0"); want != strconv.FormatUint(got, 10) && !(want == "" && got == 0) {
			t.Fatalf("%q parsed as %d", line, got)
		}
	})
}
