package raftpebble

import (
	"testing"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
	raftbench "github.com/hashicorp/raft/bench"
)

// benchStore opens a Store on the OS file system (fsync cost included),
// the way lupool runs it.
func benchStore(b *testing.B) *Store {
	b.Helper()
	db, err := pebble.Open(b.TempDir(), &pebble.Options{FS: vfs.Default, Logger: quietBench{}})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = db.Close() })
	s, err := New(db)
	if err != nil {
		b.Fatal(err)
	}
	return s
}

type quietBench struct{}

func (quietBench) Infof(string, ...any)         {}
func (quietBench) Errorf(string, ...any)        {}
func (quietBench) Fatalf(f string, args ...any) { panic(f) }

// The shared hashicorp/raft LogStore benchmarks (raft/bench), the same ones
// raft-boltdb runs.
func BenchmarkFirstIndex(b *testing.B)  { raftbench.FirstIndex(b, benchStore(b)) }
func BenchmarkLastIndex(b *testing.B)   { raftbench.LastIndex(b, benchStore(b)) }
func BenchmarkGetLog(b *testing.B)      { raftbench.GetLog(b, benchStore(b)) }
func BenchmarkStoreLog(b *testing.B)    { raftbench.StoreLog(b, benchStore(b)) }
func BenchmarkStoreLogs(b *testing.B)   { raftbench.StoreLogs(b, benchStore(b)) }
func BenchmarkDeleteRange(b *testing.B) { raftbench.DeleteRange(b, benchStore(b)) }
func BenchmarkSet(b *testing.B)         { raftbench.Set(b, benchStore(b)) }
func BenchmarkGet(b *testing.B)         { raftbench.Get(b, benchStore(b)) }
func BenchmarkSetUint64(b *testing.B)   { raftbench.SetUint64(b, benchStore(b)) }
func BenchmarkGetUint64(b *testing.B)   { raftbench.GetUint64(b, benchStore(b)) }
