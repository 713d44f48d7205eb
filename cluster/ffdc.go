package cluster

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/cockroachdb/pebble/v2"
)

// The FFDC repository (issue 14): failure data capture bundles (tar.gz
// files a node builds when it meets a failure, or an operator asks for
// one) are kept in the replicated metadata, so that a bundle survives the
// node that produced it and every node lists and serves the same ones.
//
// Why the metadata and not copies over the peer port: the log already
// replicates to every member, orders the writes, checks the proposer and
// survives restarts; a bundle is small (limits below) and rare (rate
// limited by its producer), so the cost is a few MiB in the log and the
// snapshots, bounded by FFDCKeep. A bundle goes in as a series of ffdc.put
// commands, one chunk each, in order; the last chunk completes it, which
// derives the FFDCCaptured event and drops the oldest bundles beyond
// FFDCKeep. A bundle whose producer stopped half-way stays incomplete
// (listed as such) until retention removes it.
//
// Keys (part of the on-disk format):
//
//	"meta/ffdc/" + id + "/info"           -> JSON FFDCInfo
//	"meta/ffdc/" + id + "/chunk/" + %06d  -> raw chunk bytes
const ffdcPrefix = "meta/ffdc/"

// FFDC limits.
const (
	// FFDCChunkBytes is the size of every chunk but the last.
	FFDCChunkBytes = 256 << 10
	// FFDCBytesMax bounds one bundle.
	FFDCBytesMax = 16 << 20
	// FFDCKeep is how many bundles the repository keeps.
	FFDCKeep = 16
	// ffdcTextMax bounds the free-text fields.
	ffdcTextMax = 1024
)

// FFDCInfo describes one bundle. Its JSON is part of the on-disk format.
type FFDCInfo struct {
	// ID names the bundle; IDs sort by creation time.
	ID string `json:"id"`
	// CorrelationID ties the bundle to the failure, the event and the log
	// lines that mention it.
	CorrelationID string `json:"correlation_id"`
	// Node produced the bundle (for --all-nodes: the node that gathered
	// every node's parts); Nodes lists whose parts it holds.
	Node  string   `json:"node"`
	Nodes []string `json:"nodes,omitempty"`
	// Trigger is what caused it: "collect" (an operator), "panic",
	// "io-error", "copy-failed", "command-rejected".
	Trigger string `json:"trigger"`
	Reason  string `json:"reason,omitempty"`
	// CreatedAt is the proposer's clock at the first chunk.
	CreatedAt time.Time `json:"created_at"`
	Bytes     int64     `json:"bytes"`
	Chunks    int       `json:"chunks"`
	// Stored counts the chunks stored; Complete is Stored == Chunks.
	Stored   int  `json:"stored"`
	Complete bool `json:"complete"`
}

func ffdcInfoKey(id string) string         { return ffdcPrefix + id + "/info" }
func ffdcChunkKey(id string, i int) string { return fmt.Sprintf("%s%s/chunk/%06d", ffdcPrefix, id, i) }
func ffdcChunksPrefix(id string) string    { return ffdcPrefix + id + "/chunk/" }
func ffdcBundlePrefix(id string) string    { return ffdcPrefix + id + "/" }
func ffdcChunkCount(sizeBytes int64) int {
	return int((sizeBytes + FFDCChunkBytes - 1) / FFDCChunkBytes)
}
func ffdcChunkLen(info FFDCInfo, i int) int64 {
	return min(FFDCChunkBytes, info.Bytes-int64(i)*FFDCChunkBytes)
}

// checkFFDCInfo checks the description a first chunk carries.
func checkFFDCInfo(info FFDCInfo, by Proposer) error {
	if err := ValidateName(info.ID); err != nil {
		return fmt.Errorf("%w: FFDC bundle id %q", ErrInvalid, info.ID)
	}
	if info.Bytes <= 0 || info.Bytes > FFDCBytesMax {
		return fmt.Errorf("%w: FFDC bundle of %d bytes: 1 to %d", ErrInvalid, info.Bytes, FFDCBytesMax)
	}
	if info.Chunks != ffdcChunkCount(info.Bytes) {
		return fmt.Errorf("%w: FFDC bundle of %d bytes in %d chunks, want %d", ErrInvalid, info.Bytes, info.Chunks, ffdcChunkCount(info.Bytes))
	}
	if len(info.Reason) > ffdcTextMax || len(info.Trigger) > 64 || len(info.CorrelationID) > 128 || len(info.Nodes) > 256 {
		return fmt.Errorf("%w: FFDC bundle description too long", ErrInvalid)
	}
	if !by.Primary && info.Node != by.NodeID {
		return fmt.Errorf("%w: %q stores an FFDC bundle of node %q; a node stores its own", ErrForeignRecord, by.NodeID, info.Node)
	}
	return nil
}

// applyFFDCPut stores one chunk of a bundle.
func (f *fsm) applyFFDCPut(b *pebble.Batch, c *command) applyResult {
	if c.FFDC == nil {
		return applyResult{err: fmt.Errorf("%w: ffdc.put without a bundle", ErrInvalid)}
	}
	var info FFDCInfo
	found, err := getJSON(f.db, ffdcInfoKey(c.FFDC.ID), &info)
	if err != nil {
		return applyResult{err: err}
	}
	switch {
	case c.ChunkIndex == 0:
		if found {
			return applyResult{err: fmt.Errorf("%w: FFDC bundle %q", ErrExists, c.FFDC.ID)}
		}
		info = *c.FFDC
		if err := checkFFDCInfo(info, c.proposer()); err != nil {
			return applyResult{err: err}
		}
		info.CreatedAt, info.Stored, info.Complete = c.At, 0, false
	case !found:
		return applyResult{err: fmt.Errorf("%w: FFDC bundle %q", ErrNotFound, c.FFDC.ID)}
	case info.Complete || c.ChunkIndex != info.Stored:
		return applyResult{err: fmt.Errorf("%w: chunk %d of FFDC bundle %q, which holds %d of %d", ErrInvalid,
			c.ChunkIndex, info.ID, info.Stored, info.Chunks)}
	case !c.Primary && info.Node != c.By:
		return applyResult{err: fmt.Errorf("%w: %q adds to the FFDC bundle of %q", ErrForeignRecord, c.By, info.Node)}
	}
	if want := ffdcChunkLen(info, c.ChunkIndex); int64(len(c.Data)) != want {
		return applyResult{err: fmt.Errorf("%w: chunk %d of FFDC bundle %q has %d bytes, want %d", ErrInvalid, c.ChunkIndex, info.ID, len(c.Data), want)}
	}
	if err := b.Set([]byte(ffdcChunkKey(info.ID, c.ChunkIndex)), c.Data, nil); err != nil {
		return applyResult{err: err}
	}
	info.Stored++
	info.Complete = info.Stored == info.Chunks
	if err := putJSON(b, ffdcInfoKey(info.ID), info); err != nil {
		return applyResult{err: err}
	}
	if !info.Complete {
		return applyResult{}
	}
	if err := f.pruneFFDC(b, info.ID); err != nil {
		return applyResult{err: err}
	}
	return applyResult{events: []Event{{Time: c.At, Kind: EventFFDCCaptured, Node: info.Node, By: c.By, Details: map[string]string{
		"id": info.ID, "correlation_id": info.CorrelationID, "trigger": info.Trigger, "bytes": strconv.FormatInt(info.Bytes, 10),
		"nodes": strings.Join(info.Nodes, ","),
	}}}}
}

// pruneFFDC deletes the oldest bundles (by id) beyond FFDCKeep, counting
// the one just completed.
func (f *fsm) pruneFFDC(b *pebble.Batch, completed string) error {
	infos, err := listFFDC(f.db)
	if err != nil {
		return err
	}
	ids := []string{}
	seen := false
	for _, in := range infos {
		ids = append(ids, in.ID)
		seen = seen || in.ID == completed
	}
	if !seen {
		ids = append(ids, completed)
	}
	slices.Sort(ids)
	for len(ids) > FFDCKeep {
		if err := b.DeleteRange([]byte(ffdcBundlePrefix(ids[0])), prefixEnd(ffdcBundlePrefix(ids[0])), nil); err != nil {
			return err
		}
		ids = ids[1:]
	}
	return nil
}

func listFFDC(r reader) ([]FFDCInfo, error) {
	var out []FFDCInfo
	err := scan(r, ffdcPrefix, func(k, v []byte) error {
		if !strings.HasSuffix(string(k), "/info") {
			return nil
		}
		var in FFDCInfo
		if err := json.Unmarshal(v, &in); err != nil {
			return fmt.Errorf("cluster: decode %s: %w", k, err)
		}
		out = append(out, in)
		return nil
	})
	return out, err
}

// PutFFDC stores a bundle in the repository, proposed on behalf of by
// (its own bundle, info.Node == by.NodeID, unless by is the primary):
// one ffdc.put per chunk, in order. Leader only. info.Bytes and
// info.Chunks are set from data. Returns ErrInvalid, ErrExists,
// ErrForeignRecord, ErrNotLeader or ErrOutcomeUnknown (a bundle left
// incomplete).
func (n *Node) PutFFDC(ctx context.Context, by Proposer, info FFDCInfo, data []byte) error {
	info.Bytes, info.Chunks = int64(len(data)), ffdcChunkCount(int64(len(data)))
	if err := checkFFDCInfo(info, by); err != nil {
		return err
	}
	for i := range info.Chunks {
		chunk := data[int64(i)*FFDCChunkBytes : int64(i)*FFDCChunkBytes+ffdcChunkLen(info, i)]
		c := &command{Type: cmdFFDCPut, ChunkIndex: i, Data: chunk, By: by.NodeID, Primary: by.Primary}
		if i == 0 {
			c.FFDC = &info
		} else {
			c.FFDC = &FFDCInfo{ID: info.ID}
		}
		if _, err := n.propose(ctx, c); err != nil {
			return err
		}
	}
	return nil
}

// FFDCList returns the bundles in the repository (local applied state),
// oldest first.
func (n *Node) FFDCList() (out []FFDCInfo, err error) {
	err = n.readDB(func() error {
		out, err = listFFDC(n.db)
		return err
	})
	return out, err
}

// FFDCBundle returns a complete bundle's bytes. Returns ErrNotFound (also
// for a bundle not complete yet).
func (n *Node) FFDCBundle(id string) (info FFDCInfo, data []byte, err error) {
	err = n.readDB(func() error {
		found, err := getJSON(n.db, ffdcInfoKey(id), &info)
		if err != nil {
			return err
		}
		if !found || !info.Complete {
			return fmt.Errorf("%w: FFDC bundle %q", ErrNotFound, id)
		}
		data = make([]byte, 0, info.Bytes)
		return scan(n.db, ffdcChunksPrefix(id), func(_, v []byte) error {
			data = append(data, v...)
			return nil
		})
	})
	if err == nil && int64(len(data)) != info.Bytes {
		err = fmt.Errorf("cluster: FFDC bundle %q holds %d bytes, its record says %d", id, len(data), info.Bytes)
	}
	return info, data, err
}
