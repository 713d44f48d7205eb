package replproto

import "github.com/lupool/lupool/internal/rules"

// Snapshot markers. A writer that froze its LU at a flush point (no write
// in flight, every earlier one acknowledged by every copy) sends each
// in-sync copy a Snapshot request naming the snapshot, LU@SNAP, and only
// then lets writes go on: every copy freezes between the same writes. A
// Rollback request, sent the same way, points the copy's volume back at
// one of its snapshots. The payload is the snapshot's LU name, nothing
// else: 1..NameBytesMax bytes that rules.SplitSnapshotLU accepts.

// AppendSnapshot appends the payload of a Snapshot or Rollback request
// naming snapshot name (LU@SNAP) to dst.
func AppendSnapshot(dst []byte, name string) []byte { return append(dst, name...) }

// ParseSnapshot returns the snapshot named by a Snapshot or Rollback
// request's payload, and the LU it belongs to. Errors wrap ErrBadFrame.
func ParseSnapshot(p []byte) (name, lu string, err error) {
	if len(p) == 0 || len(p) > NameBytesMax {
		return "", "", badFrame("Snapshot payload of %d bytes, want 1..%d", len(p), NameBytesMax)
	}
	name = string(p)
	lu, _, ok := rules.SplitSnapshotLU(name)
	if !ok {
		return "", "", badFrame("Snapshot payload %q is not a snapshot name LU@SNAP", name)
	}
	return name, lu, nil
}
