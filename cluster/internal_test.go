package cluster

import (
	"encoding/binary"
	"path/filepath"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/hashicorp/raft"
	"github.com/lupool/lupool/cluster/raftpebble"
)

func (n *Node) storeFirstIndex() (uint64, error) {
	s, err := raftpebble.New(n.db)
	if err != nil {
		return 0, err
	}
	return s.FirstIndex()
}

// appendRawCommand appends c to a closed node's raft log as the next entry,
// as if the process died after the append and before the apply.
func appendRawCommand(fs vfs.FS, dir string, term uint64, c *command) error {
	db, err := pebble.Open(filepath.Join(dir, "pebble"), &pebble.Options{FS: fs, Logger: pebbleLogger{testLogger()}})
	if err != nil {
		return err
	}
	defer db.Close()
	s, err := raftpebble.New(db)
	if err != nil {
		return err
	}
	last, err := s.LastIndex()
	if err != nil {
		return err
	}
	data, err := encodeCommand(c)
	if err != nil {
		return err
	}
	return s.StoreLog(&raft.Log{Index: last + 1, Term: term, Type: raft.LogCommand, Data: data})
}

// rollBackState makes a closed node's state machine older: it deletes the
// given LUs and sets the applied index to index.
func rollBackState(dir string, drop []string, index uint64) (int, error) {
	db, err := pebble.Open(filepath.Join(dir, "pebble"), &pebble.Options{Logger: pebbleLogger{testLogger()}})
	if err != nil {
		return 0, err
	}
	defer db.Close()
	b := db.NewBatch()
	for _, name := range drop {
		if err := b.Delete([]byte(luPrefix+name), nil); err != nil {
			return 0, err
		}
	}
	if err := b.Set([]byte(keyApplied), binary.BigEndian.AppendUint64(nil, index), nil); err != nil {
		return 0, err
	}
	return len(drop), b.Commit(pebble.Sync)
}
