package cluster

import (
	"bytes"
	"fmt"
	"io"
	"sort"
	"strings"
	"testing"

	"github.com/cockroachdb/datadriven"
	"github.com/hashicorp/raft"
)

// TestFSMDataDriven drives the state machine with raw log entries from
// testdata/fsm (the JSON there is the frozen command encoding). Commands:
//
//	apply index=N            input: one command as JSON; prints the result
//	table                    the LU table
//	nodes                    the node records
//	state                    applied index and rejected count
//	subs                     the registered callers
//	images                   the image records
//	ec                       the erasure-coded images' layouts
//	events [after=N]         the event log (seq kind lu node by details)
//	snapshot                 keeps a snapshot of the current state
//	restore                  restores the kept snapshot; prints the changes
//
// Rewrite the expected output with: go test ./cluster -run DataDriven -rewrite
func TestFSMDataDriven(t *testing.T) {
	datadriven.Walk(t, "testdata/fsm", func(t *testing.T, path string) {
		f := newTestFSM(t)
		var seen changeLog
		f.watch(seen.add)
		var snap []byte
		datadriven.RunTest(t, path, func(t *testing.T, d *datadriven.TestData) string {
			switch d.Cmd {
			case "apply":
				var index uint64
				d.ScanArgs(t, "index", &index)
				before := len(seen.get())
				res, _ := f.Apply(&raft.Log{Index: index, Term: 1, Type: raft.LogCommand, Data: []byte(d.Input)}).(applyResult)
				var b strings.Builder
				switch {
				case res.skipped:
					b.WriteString("skipped: already applied\n")
				case res.err != nil:
					fmt.Fprintf(&b, "rejected: %v\n", res.err)
				case res.change == nil:
					b.WriteString("ok\n")
				default:
					fmt.Fprintf(&b, "ok: %s %s\n", res.change.Kind, res.change.LU.Name)
					for _, ch := range res.more {
						fmt.Fprintf(&b, "ok: %s %s\n", ch.Kind, ch.LU.Name)
					}
				}
				if n := len(seen.get()) - before; n != 0 && res.change == nil {
					fmt.Fprintf(&b, "watch saw %d changes without a change result\n", n)
				}
				return b.String()
			case "table":
				lus, err := listLUs(f.db)
				if err != nil {
					d.Fatalf(t, "%v", err)
				}
				var b strings.Builder
				for _, lu := range lus {
					fmt.Fprintf(&b, "%s size=%d kind=%s copies=%d writer=%s epoch=%d replicas=%v created=%s updated=%s",
						lu.Name, lu.SizeBytes, lu.Kind, lu.Copies, lu.Writer, lu.Epoch, lu.Replicas,
						lu.CreatedAt.Format("15:04:05"), lu.UpdatedAt.Format("15:04:05"))
					if lu.Description != "" {
						fmt.Fprintf(&b, " desc=%q", lu.Description)
					}
					if lu.QoS != nil {
						fmt.Fprintf(&b, " qos=%+v", *lu.QoS)
					}
					if lu.Image != "" {
						fmt.Fprintf(&b, " image=%s read_only=%v", lu.Image, lu.ReadOnly)
					}
					if lu.Base != "" {
						fmt.Fprintf(&b, " base=%s", lu.Base)
					}
					if lu.SnapshotOf != "" {
						fmt.Fprintf(&b, " snapshot_of=%s read_only=%v", lu.SnapshotOf, lu.ReadOnly)
					}
					b.WriteString("\n")
				}
				return b.String()
			case "nodes":
				recs, err := listNodeRecords(f.db)
				if err != nil {
					d.Fatalf(t, "%v", err)
				}
				var ids []string
				for id := range recs {
					ids = append(ids, id)
				}
				sort.Strings(ids)
				var b strings.Builder
				for _, id := range ids {
					r := recs[id]
					fmt.Fprintf(&b, "%s peer=%s api=%s nbd=%s\n", r.ID, r.PeerAddr, r.APIAddr, r.NBDAddr)
				}
				return b.String()
			case "events":
				var after uint64
				if d.HasArg("after") {
					d.ScanArgs(t, "after", &after)
				}
				evs, err := readEvents(f.db, after, 0)
				if err != nil {
					d.Fatalf(t, "%v", err)
				}
				var b strings.Builder
				for _, ev := range evs {
					fmt.Fprintf(&b, "%d %s %s lu=%s node=%s by=%s", ev.Seq, ev.Time.Format("15:04:05"), ev.Kind, ev.LU, ev.Node, ev.By)
					keys := make([]string, 0, len(ev.Details))
					for k := range ev.Details {
						keys = append(keys, k)
					}
					sort.Strings(keys)
					for _, k := range keys {
						fmt.Fprintf(&b, " %s=%s", k, ev.Details[k])
					}
					b.WriteString("\n")
				}
				fmt.Fprintf(&b, "last=%d\n", f.eventSeq.Load())
				return b.String()
			case "images":
				imgs, err := listImages(f.db)
				if err != nil {
					d.Fatalf(t, "%v", err)
				}
				var b strings.Builder
				for _, img := range imgs {
					fmt.Fprintf(&b, "%s state=%s copies=%d", img.Name, img.State, img.Copies)
					for _, disk := range img.Disks {
						fmt.Fprintf(&b, " [%s %d sha256=%.8s sent=%d]", disk.LU, disk.SizeBytes, disk.SHA256, disk.SentBytes)
					}
					b.WriteString("\n")
				}
				return b.String()
			case "ec":
				ls, err := listEC(f.db)
				if err != nil {
					d.Fatalf(t, "%v", err)
				}
				var b strings.Builder
				for _, l := range ls {
					fmt.Fprintf(&b, "%s %d+%d state=%s raw=%d", l.Image, l.K, l.M, l.State, l.RawBytes())
					for _, disk := range l.Disks {
						fmt.Fprintf(&b, " [%s %d id=%.8s", disk.LU, disk.SizeBytes, disk.ImageID)
						for _, s := range disk.Shards {
							fmt.Fprintf(&b, " %s@%s", s.LU, s.Node)
							if s.Pending != nil {
								fmt.Fprintf(&b, "(pending %s@%s)", s.Pending.LU, s.Pending.Node)
							}
						}
						b.WriteString("]")
					}
					b.WriteString("\n")
				}
				return b.String()
			case "subs":
				subs, err := listSubscribers(f.db)
				if err != nil {
					d.Fatalf(t, "%v", err)
				}
				var b strings.Builder
				for _, s := range subs {
					fmt.Fprintf(&b, "%s kinds=%v to=%s acked=%d\n", s.ID, s.Kinds, s.To, s.AckedSeq)
				}
				return b.String()
			case "state":
				return fmt.Sprintf("applied=%d rejected=%d lus=%d\n", f.applied.Load(), f.rejected.Load(), f.luCount.Load())
			case "snapshot":
				s, err := f.Snapshot()
				if err != nil {
					d.Fatalf(t, "%v", err)
				}
				var sink memSink
				if err := s.Persist(&sink); err != nil {
					d.Fatalf(t, "%v", err)
				}
				s.Release()
				snap = sink.Bytes()
				return fmt.Sprintf("snapshot at %d\n", f.applied.Load())
			case "restore":
				before := len(seen.get())
				if err := f.Restore(io.NopCloser(bytes.NewReader(snap))); err != nil {
					return fmt.Sprintf("error: %v\n", err)
				}
				var b strings.Builder
				for _, c := range seen.get()[before:] {
					fmt.Fprintf(&b, "%s %s at %d\n", c.Kind, c.LU.Name, c.Index)
				}
				return b.String()
			default:
				d.Fatalf(t, "unknown command %q", d.Cmd)
				return ""
			}
		})
	})
}
