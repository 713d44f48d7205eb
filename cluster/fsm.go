package cluster

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"hash/crc32"
	"io"
	"log/slog"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"

	"github.com/cockroachdb/pebble/v2"
	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus"
)

// State machine keys, in the same Pebble instance as the raft log (package
// raftpebble keeps "raft/"). Part of the on-disk format.
//
//	"meta/applied"        -> last applied raft index (8 bytes, big-endian)
//	"meta/rejected"       -> count of rejected commands (8 bytes, big-endian)
//	"meta/lu/" + name     -> JSON LU
//	"meta/node/" + id     -> JSON nodeRecord
//	"meta/setting/" + key -> raw value
//	"meta/event/" + seq   -> JSON Event (events.go)
//	"meta/event-seq"      -> last event seq (8 bytes, big-endian)
//	"meta/sub/" + id      -> JSON Subscriber (subscribers.go)
//	"meta/ffdc/" + id + … -> FFDC bundles (ffdc.go)
//	"meta/move/" + lu     -> JSON Move (move.go)
//	"meta/image/" + name  -> JSON Image (images.go)
//
// One Pebble instance for log and state: one write-ahead log, one lock
// file, one thing to back up. Every applied command writes its change and
// "meta/applied" in one synced batch, so after a crash the state and the
// applied index agree, and entries at or below the index are skipped when
// raft hands them over again (raft.Config.NoSnapshotRestoreOnStart is set:
// the state in Pebble is newer than any snapshot).
const (
	metaPrefix     = "meta/"
	keyApplied     = "meta/applied"
	keyRejected    = "meta/rejected"
	luPrefix       = "meta/lu/"
	nodePrefix     = "meta/node/"
	settingPrefix  = "meta/setting/"
	snapshotMagic  = "lupool-meta-snapshot-v1\n"
	snapshotKeyMax = 1 << 16
	snapshotValMax = 1 << 26
)

func metaEnd() []byte {
	k := []byte(metaPrefix)
	k[len(k)-1]++
	return k
}

func prefixEnd(prefix string) []byte {
	k := []byte(prefix)
	k[len(k)-1]++
	return k
}

// applyResult is what Apply returns to the proposer through the future.
type applyResult struct {
	err    error
	change *Change
	// skipped: the entry was at or below the applied index (a restart
	// handed it over again) and changed nothing.
	skipped bool
	// cmdType and by name the command and its proposer, for the log.
	cmdType, by string
	// events are the events the command derives (numbered by Apply).
	events []Event
	// moveOutcome is the outcome of a move the command ended, if any.
	moveOutcome string
	// more are LU changes after change, for commands that change several
	// LUs at once (an image's disks).
	more []Change
}

// addChange records ch as the result's change, or as one more after it.
func (res *applyResult) addChange(ch Change) {
	if res.change == nil {
		res.change = &ch
		return
	}
	res.more = append(res.more, ch)
}

// fsm is the raft.FSM. Apply, Snapshot and Restore are called by raft from
// one goroutine; readers use Pebble directly (every change is one batch).
type fsm struct {
	db  *pebble.DB   // immutable; never nil; owned by Node
	log *slog.Logger // immutable; never nil

	applied  atomic.Uint64 // last applied index, mirrors "meta/applied"
	rejected atomic.Uint64 // mirrors "meta/rejected"
	luCount  atomic.Int64  // number of LU records
	eventSeq atomic.Uint64 // last event seq, mirrors "meta/event-seq"
	// eventsTotal counts the events this node's state machine stored
	// since it opened, by kind (unregistered; Node.Collectors).
	eventsTotal *prometheus.CounterVec // immutable; never nil
	// movesTotal counts the planned moves this node's state machine saw
	// end since it opened, by outcome (done, rolled-back).
	movesTotal *prometheus.CounterVec // immutable; never nil
	// appliedSinceOpen and skippedSinceOpen count command entries applied,
	// and entries skipped as already applied, since this process opened
	// the state (a restart must skip, never re-apply).
	appliedSinceOpen atomic.Uint64
	skippedSinceOpen atomic.Uint64

	// applyMu is held while a change is committed and its watchers run,
	// so that listAndWatch sees a table and then exactly the changes after it.
	applyMu sync.Mutex

	mu struct {
		sync.Mutex
		nextID   int
		watchers map[int]func(Change) // guarded by mu
		// eventsChanged is closed (and replaced) after events are stored.
		eventsChanged chan struct{} // guarded by mu; never nil
	}
}

var (
	_ raft.FSM         = (*fsm)(nil)
	_ raft.FSMSnapshot = (*fsmSnapshot)(nil)
)

func newFSM(db *pebble.DB, log *slog.Logger) (*fsm, error) {
	f := &fsm{db: db, log: log, eventsTotal: prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "lupool_events_total", Help: "Events the metadata state machine stored since this process started, by kind.",
	}, []string{"kind"}), movesTotal: prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "lupool_moves_total", Help: "Planned writer moves that ended since this process started, by outcome (done, rolled-back).",
	}, []string{"outcome"})}
	f.mu.watchers = map[int]func(Change){}
	f.mu.eventsChanged = make(chan struct{})
	if err := f.loadCounters(); err != nil {
		return nil, err
	}
	return f, nil
}

func (f *fsm) loadCounters() error {
	applied, err := getUint64(f.db, keyApplied)
	if err != nil {
		return err
	}
	rejected, err := getUint64(f.db, keyRejected)
	if err != nil {
		return err
	}
	eventSeq, err := getUint64(f.db, keyEventSeq)
	if err != nil {
		return err
	}
	lus, err := listLUs(f.db)
	if err != nil {
		return err
	}
	f.eventSeq.Store(eventSeq)
	f.applied.Store(applied)
	f.rejected.Store(rejected)
	f.luCount.Store(int64(len(lus)))
	return nil
}

type reader interface {
	Get(key []byte) ([]byte, io.Closer, error)
	NewIter(o *pebble.IterOptions) (*pebble.Iterator, error)
}

func getUint64(r reader, key string) (uint64, error) {
	v, c, err := r.Get([]byte(key))
	if errors.Is(err, pebble.ErrNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("cluster: read %s: %w", key, err)
	}
	defer c.Close()
	if len(v) != 8 {
		return 0, fmt.Errorf("cluster: %s holds %d bytes, want 8", key, len(v))
	}
	return binary.BigEndian.Uint64(v), nil
}

func getJSON(r reader, key string, out any) (bool, error) {
	v, c, err := r.Get([]byte(key))
	if errors.Is(err, pebble.ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("cluster: read %s: %w", key, err)
	}
	defer c.Close()
	if err := json.Unmarshal(v, out); err != nil {
		return false, fmt.Errorf("cluster: decode %s: %w", key, err)
	}
	return true, nil
}

// scan calls fn for every key/value under prefix, in key order.
func scan(r reader, prefix string, fn func(k, v []byte) error) error {
	it, err := r.NewIter(&pebble.IterOptions{LowerBound: []byte(prefix), UpperBound: prefixEnd(prefix)})
	if err != nil {
		return fmt.Errorf("cluster: iterate %s: %w", prefix, err)
	}
	for ok := it.First(); ok; ok = it.Next() {
		if err := fn(it.Key(), it.Value()); err != nil {
			it.Close()
			return err
		}
	}
	if err := it.Close(); err != nil {
		return fmt.Errorf("cluster: iterate %s: %w", prefix, err)
	}
	return nil
}

func listLUs(r reader) ([]LU, error) {
	var out []LU
	err := scan(r, luPrefix, func(k, v []byte) error {
		var lu LU
		if err := json.Unmarshal(v, &lu); err != nil {
			return fmt.Errorf("cluster: decode %s: %w", k, err)
		}
		out = append(out, lu)
		return nil
	})
	return out, err
}

func listNodeRecords(r reader) (map[string]nodeRecord, error) {
	out := map[string]nodeRecord{}
	err := scan(r, nodePrefix, func(k, v []byte) error {
		var n nodeRecord
		if err := json.Unmarshal(v, &n); err != nil {
			return fmt.Errorf("cluster: decode %s: %w", k, err)
		}
		out[n.ID] = n
		return nil
	})
	return out, err
}

// eventsChanged returns the channel closed when the next events are stored.
func (f *fsm) eventsChanged() <-chan struct{} {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.mu.eventsChanged
}

// signalEvents wakes every event reader.
func (f *fsm) signalEvents() {
	f.mu.Lock()
	close(f.mu.eventsChanged)
	f.mu.eventsChanged = make(chan struct{})
	f.mu.Unlock()
}

func (f *fsm) watch(fn func(Change)) (cancel func()) {
	f.mu.Lock()
	id := f.mu.nextID
	f.mu.nextID++
	f.mu.watchers[id] = fn
	f.mu.Unlock()
	return func() {
		f.mu.Lock()
		delete(f.mu.watchers, id)
		f.mu.Unlock()
	}
}

// listAndWatch returns the LU table and registers fn for every change
// applied after it, atomically.
func (f *fsm) listAndWatch(fn func(Change)) ([]LU, func(), error) {
	f.applyMu.Lock()
	defer f.applyMu.Unlock()
	lus, err := listLUs(f.db)
	if err != nil {
		return nil, nil, err
	}
	return lus, f.watch(fn), nil
}

// notify runs the watchers; f.applyMu must be held.
func (f *fsm) notify(changes []Change) {
	if len(changes) == 0 {
		return
	}
	f.mu.Lock()
	ids := make([]int, 0, len(f.mu.watchers))
	for id := range f.mu.watchers {
		ids = append(ids, id)
	}
	sort.Ints(ids) // registration order, so callbacks run in a stable order
	fns := make([]func(Change), 0, len(ids))
	for _, id := range ids {
		fns = append(fns, f.mu.watchers[id])
	}
	f.mu.Unlock()
	for _, c := range changes {
		for _, fn := range fns {
			fn(c)
		}
	}
}

// Apply applies one committed entry. It is deterministic: it reads only the
// entry and the state in Pebble. An entry at or below the recorded applied
// index was applied before a restart and is skipped.
func (f *fsm) Apply(l *raft.Log) any {
	if l.Type != raft.LogCommand {
		return nil
	}
	if l.Index <= f.applied.Load() {
		f.skippedSinceOpen.Add(1)
		f.log.Debug("skipping an entry applied before restart", "index", l.Index, "applied", f.applied.Load())
		return applyResult{skipped: true}
	}
	f.applyMu.Lock()
	defer f.applyMu.Unlock()
	b := f.db.NewBatch()
	defer b.Close()
	res := f.applyCommand(b, l)
	events := res.events
	if res.err != nil {
		// Rejected: record that the entry was seen and the event that
		// reports it, change nothing else.
		b.Reset()
		f.log.Error("raft command rejected", "index", l.Index, "type", res.cmdType, "by", res.by, "err", res.err)
		if err := b.Set([]byte(keyRejected), binary.BigEndian.AppendUint64(nil, f.rejected.Load()+1), nil); err != nil {
			panic(fmt.Errorf("cluster: batch: %w", err))
		}
		// The raft log's append time, not this node's clock: every node
		// records the same event.
		events = []Event{rejectedEvent(res, l.AppendedAt.UTC())}
	}
	eventSeq, err := appendEvents(b, f.eventSeq.Load(), events)
	if err != nil {
		panic(fmt.Errorf("cluster: batch: %w", err))
	}
	if err := b.Set([]byte(keyApplied), binary.BigEndian.AppendUint64(nil, l.Index), nil); err != nil {
		panic(fmt.Errorf("cluster: batch: %w", err))
	}
	if err := b.Commit(pebble.Sync); err != nil {
		// The replicated state can no longer be kept: stop rather than
		// diverge from the other nodes.
		panic(fmt.Errorf("cluster: commit applied index %d: %w", l.Index, err))
	}
	f.applied.Store(l.Index)
	f.appliedSinceOpen.Add(1)
	if len(events) > 0 {
		f.eventSeq.Store(eventSeq)
		f.signalEvents()
		for _, ev := range events {
			f.eventsTotal.WithLabelValues(ev.Kind).Inc()
		}
	}
	if res.err != nil {
		f.rejected.Add(1)
		return res
	}
	if res.moveOutcome != "" {
		f.movesTotal.WithLabelValues(res.moveOutcome).Inc()
	}
	if res.change != nil {
		changes := append([]Change{*res.change}, res.more...)
		for _, ch := range changes {
			switch ch.Kind {
			case Created:
				f.luCount.Add(1)
			case Deleted:
				f.luCount.Add(-1)
			}
		}
		f.notify(changes)
	}
	return res
}

// applyCommand stages the effect of one entry in b. It returns an error
// (and the caller discards b) when the command must be rejected.
func (f *fsm) applyCommand(b *pebble.Batch, l *raft.Log) applyResult {
	c, err := decodeCommand(l.Data)
	if err != nil {
		return applyResult{err: err}
	}
	res := f.applyDecoded(b, c, l)
	res.cmdType, res.by = c.Type, c.By
	return res
}

func (f *fsm) applyDecoded(b *pebble.Batch, c *command, l *raft.Log) applyResult {
	switch c.Type {
	case cmdCreateLU:
		lu := *c.LU
		lu.CreatedAt, lu.UpdatedAt = c.At, c.At
		if err := validateLU(&lu); err != nil {
			return applyResult{err: err}
		}
		if _, err := f.mustGetLU(lu.Name); err == nil {
			return applyResult{err: fmt.Errorf("%w: %q", ErrExists, lu.Name)}
		} else if !errors.Is(err, ErrNotFound) {
			return applyResult{err: err}
		}
		members, err := memberSet(f.db)
		if err != nil {
			return applyResult{err: err}
		}
		if err := checkCreate(lu, members); err != nil {
			return applyResult{err: err}
		}
		if err := f.checkPlainCreate(lu); err != nil {
			return applyResult{err: err}
		}
		if err := f.checkLUsPerNode(lu.Name, lu.Replicas, c.LUsPerNodeMax); err != nil {
			return applyResult{err: err}
		}
		res := f.putLU(b, lu, Created, l.Index)
		res.events = []Event{{Time: c.At, Kind: EventLUCreated, LU: lu.Name, Node: lu.Writer, By: c.By, Details: map[string]string{
			"size_bytes": strconv.FormatInt(lu.SizeBytes, 10), "copies": strconv.Itoa(lu.Copies), "kind": lu.Kind, "writer": lu.Writer,
		}}}
		return res
	case cmdResizeLU:
		if err := ValidateSize(c.SizeBytes); err != nil {
			return applyResult{err: err}
		}
		lu, err := f.mustGetLU(c.Name)
		if err != nil {
			return applyResult{err: err}
		}
		if err := f.checkResize(lu, c.SizeBytes); err != nil {
			return applyResult{err: err}
		}
		from := lu.SizeBytes
		lu.SizeBytes, lu.UpdatedAt = c.SizeBytes, c.At
		res := f.putLU(b, lu, Resized, l.Index)
		res.events = []Event{{Time: c.At, Kind: EventLUResized, LU: lu.Name, By: c.By, Details: map[string]string{
			"from_bytes": strconv.FormatInt(from, 10), "to_bytes": strconv.FormatInt(lu.SizeBytes, 10),
		}}}
		return res
	case cmdSetQoS:
		if !c.Primary {
			return applyResult{err: fmt.Errorf("%w: %q proposes QoS limits for %q; only the primary sets them",
				ErrForeignRecord, c.By, c.Name)}
		}
		if err := ValidateQoS(*c.QoS); err != nil {
			return applyResult{err: err}
		}
		lu, err := f.mustGetLU(c.Name)
		if err != nil {
			return applyResult{err: err}
		}
		lu.QoS, lu.UpdatedAt = nil, c.At
		if !c.QoS.Zero() {
			q := *c.QoS
			lu.QoS = &q
		}
		return f.putLU(b, lu, Updated, l.Index)
	case cmdDeleteLU:
		lu, err := f.mustGetLU(c.Name)
		if err != nil {
			return applyResult{err: err}
		}
		if err := checkNotECShard(lu.Name); err != nil {
			return applyResult{err: err}
		}
		if lu.Image != "" {
			return applyResult{err: fmt.Errorf("%w: %q is a disk of image %q; delete the image (lupool image delete %s)",
				ErrInvalid, lu.Name, lu.Image, lu.Image)}
		}
		if err := f.checkNoSnapshots(lu.Name, "delete"); err != nil {
			return applyResult{err: err}
		}
		if err := b.Delete([]byte(luPrefix+lu.Name), nil); err != nil {
			return applyResult{err: err}
		}
		if err := b.Delete([]byte(movePrefix+lu.Name), nil); err != nil { // a move of it ends with it
			return applyResult{err: err}
		}
		return applyResult{change: &Change{Kind: Deleted, LU: lu, Index: l.Index},
			events: []Event{{Time: c.At, Kind: EventLUDeleted, LU: lu.Name, By: c.By}}}
	case cmdUpdateLU:
		return applyResult{err: fmt.Errorf("%w: %s is retired (it replaced copy sets unchecked); propose %s",
			ErrInvalid, cmdUpdateLU, cmdCopies)}
	case cmdCopies:
		return f.applyCopies(b, c, l.Index)
	case cmdCreateImage:
		return f.applyCreateImage(b, c, l.Index)
	case cmdImageReady:
		return f.applyImageReady(b, c, l.Index)
	case cmdDeleteImage:
		return f.applyDeleteImage(b, c, l.Index)
	case cmdFlattenLU:
		return f.applyFlatten(b, c, l.Index)
	case cmdSnapshotLU:
		return f.applySnapshot(b, c, l.Index)
	case cmdECCreate:
		return f.applyCreateEC(b, c, l.Index)
	case cmdECReady:
		return f.applyECReady(b, c, l.Index)
	case cmdECAbort:
		return f.applyECAbort(b, c, l.Index)
	case cmdECShardAdd:
		return f.applyECShardAdd(b, c, l.Index)
	case cmdECShardSwap:
		return f.applyECShardSwap(b, c, l.Index)
	case cmdMove:
		return f.applyMove(b, c, l.Index)
	case cmdUpsertNode:
		n := *c.Node
		n.UpdatedAt = c.At
		var existing nodeRecord
		exists, err := getJSON(f.db, nodePrefix+n.ID, &existing)
		if err != nil {
			return applyResult{err: err}
		}
		if err := checkNodeUpsertOf(n, c.Join, c.proposer(), exists, existing); err != nil {
			return applyResult{err: err}
		}
		res := applyResult{err: putJSON(b, nodePrefix+n.ID, n)}
		if !exists {
			res.events = []Event{{Time: c.At, Kind: EventNodeJoined, Node: n.ID, By: c.By}}
		}
		return res
	case cmdRemoveNode:
		if !c.Primary {
			return applyResult{err: fmt.Errorf("%w: %q proposes removing %q; only the primary removes members",
				ErrForeignRecord, c.By, c.Name)}
		}
		return applyResult{err: b.Delete([]byte(nodePrefix+c.Name), nil),
			events: []Event{{Time: c.At, Kind: EventNodeRemoved, Node: c.Name, By: c.By}}}
	case cmdSetSetting:
		if c.Name == "" {
			return applyResult{err: fmt.Errorf("%w: empty setting name", ErrInvalid)}
		}
		return applyResult{err: b.Set([]byte(settingPrefix+c.Name), []byte(c.Value), nil)}
	case cmdAppendEvent:
		ev := *c.Event
		if err := checkEventInput(ev, c.proposer()); err != nil {
			return applyResult{err: err}
		}
		ev.Seq, ev.Time, ev.By = 0, c.At, c.By
		return applyResult{events: []Event{ev}}
	case cmdFFDCPut:
		return f.applyFFDCPut(b, c)
	case cmdAddSubscriber, cmdRemoveSubscriber, cmdAckSubscriber:
		return f.applySubscriber(b, c)
	case cmdPruneEvents:
		if !c.Primary {
			return applyResult{err: fmt.Errorf("%w: %q proposes pruning events; only the primary prunes", ErrForeignRecord, c.By)}
		}
		if c.BelowSeq > f.eventSeq.Load()+1 {
			return applyResult{err: fmt.Errorf("%w: prune below %d: the last event is %d", ErrInvalid, c.BelowSeq, f.eventSeq.Load())}
		}
		return applyResult{err: b.DeleteRange([]byte(eventPrefix), []byte(eventKey(c.BelowSeq)), nil)}
	default:
		return applyResult{err: fmt.Errorf("%w: type %q", ErrUnknownCommand, c.Type)}
	}
}

// applyCopies applies an lu.copies command if CheckCopyChange allows it
// against the recorded LU and node records.
func (f *fsm) applyCopies(b *pebble.Batch, c *command, index uint64) applyResult {
	ch := *c.Change
	old, err := f.mustGetLU(ch.Name)
	if err != nil {
		return applyResult{err: err}
	}
	members, err := memberSet(f.db)
	if err != nil {
		return applyResult{err: err}
	}
	if err := CheckCopyChange(old, ch, c.proposer(), members); err != nil {
		return applyResult{err: err}
	}
	if err := f.checkImageCopies(old, ch); err != nil {
		return applyResult{err: err}
	}
	if added := diffCopies(old, ch).added; len(added) > 0 {
		var adding []Replica
		for _, id := range added {
			adding = append(adding, Replica{NodeID: id})
		}
		if err := f.checkLUsPerNode(ch.Name, adding, c.LUsPerNodeMax); err != nil {
			return applyResult{err: err}
		}
	}
	lu := old
	lu.Writer, lu.Epoch, lu.Copies = ch.Writer, ch.Epoch, ch.Copies
	lu.Replicas = append([]Replica(nil), ch.Replicas...)
	lu.UpdatedAt = c.At
	if err := validateLU(&lu); err != nil {
		return applyResult{err: err}
	}
	res := f.putLU(b, lu, Updated, index)
	res.events = copyEvents(old, lu, c.At, c.By)
	return res
}

// checkLUsPerNode applies checkLUsPerNodeHeld to the copies the LU table
// holds on each node.
func (f *fsm) checkLUsPerNode(name string, adding []Replica, configured int) error {
	held, err := copiesPerNode(f.db)
	if err != nil {
		return err
	}
	return checkLUsPerNodeHeld(name, adding, held, configured)
}

// copiesPerNode counts the LU copies each node holds in the LU table. It
// reads every LU record (decoding only the copies' node ids): a cost
// linear in the LU count, paid only by a create or a copy change that
// adds copies.
func copiesPerNode(r reader) (map[string]int, error) {
	held := map[string]int{}
	var rec struct {
		Replicas []struct {
			NodeID string `json:"node_id"`
		} `json:"replicas"`
	}
	err := scan(r, luPrefix, func(k, v []byte) error {
		rec.Replicas = rec.Replicas[:0]
		if err := json.Unmarshal(v, &rec); err != nil {
			return fmt.Errorf("cluster: decode %s: %w", k, err)
		}
		for _, r := range rec.Replicas {
			held[r.NodeID]++
		}
		return nil
	})
	return held, err
}

// memberSet returns the ids of the nodes with a record ("meta/node/").
func memberSet(r reader) (map[string]bool, error) {
	recs, err := listNodeRecords(r)
	if err != nil {
		return nil, err
	}
	out := make(map[string]bool, len(recs))
	for id := range recs {
		out[id] = true
	}
	return out, nil
}

func (f *fsm) mustGetLU(name string) (LU, error) {
	var lu LU
	found, err := getJSON(f.db, luPrefix+name, &lu)
	if err != nil {
		return LU{}, err
	}
	if !found {
		return LU{}, fmt.Errorf("%w: %q", ErrNotFound, name)
	}
	return lu, nil
}

func putJSON(b *pebble.Batch, key string, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("cluster: encode %s: %w", key, err)
	}
	return b.Set([]byte(key), data, nil)
}

func (f *fsm) putLU(b *pebble.Batch, lu LU, kind ChangeKind, index uint64) applyResult {
	if err := putJSON(b, luPrefix+lu.Name, lu); err != nil {
		return applyResult{err: err}
	}
	return applyResult{change: &Change{Kind: kind, LU: lu, Index: index}}
}

// Snapshot captures the state at the last applied entry. Raft calls it on
// the apply goroutine, so the Pebble snapshot sees exactly that state.
func (f *fsm) Snapshot() (raft.FSMSnapshot, error) {
	return &fsmSnapshot{snap: f.db.NewSnapshot(), index: f.applied.Load()}, nil
}

// Snapshot stream format (part of the on-disk format):
//
//	magic "lupool-meta-snapshot-v1\n"
//	repeated: key_len uvarint (>0), key, value_len uvarint, value
//	0 (uvarint: end of records)
//	crc32c (Castagnoli, 4 bytes big-endian) of every byte before it
//
// Records are every key under "meta/", in key order.
type fsmSnapshot struct {
	snap  *pebble.Snapshot // released by Release
	index uint64
}

func (s *fsmSnapshot) Persist(sink raft.SnapshotSink) error {
	if err := s.write(sink); err != nil {
		_ = sink.Cancel()
		return err
	}
	return sink.Close()
}

func (s *fsmSnapshot) write(w io.Writer) error {
	h := crc32.New(crcTable)
	bw := bufio.NewWriter(io.MultiWriter(w, h))
	if _, err := bw.WriteString(snapshotMagic); err != nil {
		return fmt.Errorf("cluster: write snapshot: %w", err)
	}
	var lenBuf []byte
	err := scan(s.snap, metaPrefix, func(k, v []byte) error {
		lenBuf = binary.AppendUvarint(lenBuf[:0], uint64(len(k)))
		lenBuf = append(lenBuf, k...)
		lenBuf = binary.AppendUvarint(lenBuf, uint64(len(v)))
		if _, err := bw.Write(lenBuf); err != nil {
			return err
		}
		_, err := bw.Write(v)
		return err
	})
	if err == nil {
		err = bw.WriteByte(0)
	}
	if err == nil {
		err = bw.Flush()
	}
	if err == nil {
		_, err = w.Write(binary.BigEndian.AppendUint32(nil, h.Sum32()))
	}
	if err != nil {
		return fmt.Errorf("cluster: write snapshot at %d: %w", s.index, err)
	}
	return nil
}

func (s *fsmSnapshot) Release() { _ = s.snap.Close() }

var crcTable = crc32.MakeTable(crc32.Castagnoli)

// Restore replaces the whole state with the snapshot's, atomically: the
// stream is read and checked completely before one batch deletes the old
// state and writes the new. Watchers see the difference as changes.
func (f *fsm) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	b := f.db.NewBatch()
	defer b.Close()
	if err := b.DeleteRange([]byte(metaPrefix), metaEnd(), nil); err != nil {
		return fmt.Errorf("cluster: restore: %w", err)
	}
	if err := readSnapshot(rc, func(k, v []byte) error { return b.Set(k, v, nil) }); err != nil {
		return fmt.Errorf("cluster: restore: %w", err)
	}
	f.applyMu.Lock()
	defer f.applyMu.Unlock()
	before, err := listLUs(f.db)
	if err != nil {
		return err
	}
	if err := b.Commit(pebble.Sync); err != nil {
		return fmt.Errorf("cluster: restore: commit: %w", err)
	}
	if err := f.loadCounters(); err != nil {
		return err
	}
	f.signalEvents()
	after, err := listLUs(f.db)
	if err != nil {
		return err
	}
	f.notify(diffLUs(before, after, f.applied.Load()))
	return nil
}

// readSnapshot checks a snapshot stream and calls fn for every record. fn
// runs before the checksum at the end is verified: callers stage records
// and apply them only when readSnapshot returns nil.
func readSnapshot(r io.Reader, fn func(k, v []byte) error) error {
	br := &hashingReader{r: bufio.NewReader(r), h: crc32.New(crcTable)}
	magic := make([]byte, len(snapshotMagic))
	if _, err := io.ReadFull(br, magic); err != nil || string(magic) != snapshotMagic {
		return fmt.Errorf("not a lupool metadata snapshot (magic %q, %v)", magic, err)
	}
	for {
		k, err := readField(br, snapshotKeyMax)
		if err != nil {
			return fmt.Errorf("key: %w", err)
		}
		if len(k) == 0 {
			break
		}
		v, err := readField(br, snapshotValMax)
		if err != nil {
			return fmt.Errorf("value of %q: %w", k, err)
		}
		if !bytes.HasPrefix(k, []byte(metaPrefix)) {
			return fmt.Errorf("key %q outside %q", k, metaPrefix)
		}
		if err := fn(k, v); err != nil {
			return err
		}
	}
	want := br.h.Sum32() // of everything up to and including the end marker
	var sum [4]byte
	if _, err := io.ReadFull(br.r, sum[:]); err != nil {
		return fmt.Errorf("checksum: %w", err)
	}
	if got := binary.BigEndian.Uint32(sum[:]); got != want {
		return fmt.Errorf("checksum %08x, computed %08x", got, want)
	}
	return nil
}

// hashingReader hashes exactly the bytes its caller consumed (a TeeReader
// under a bufio.Reader would hash read-ahead too).
type hashingReader struct {
	r *bufio.Reader
	h hash.Hash32
}

func (r *hashingReader) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	r.h.Write(p[:n])
	return n, err
}

func (r *hashingReader) ReadByte() (byte, error) {
	c, err := r.r.ReadByte()
	if err == nil {
		r.h.Write([]byte{c})
	}
	return c, err
}

func readField(r *hashingReader, max uint64) ([]byte, error) {
	n, err := binary.ReadUvarint(r)
	if err != nil {
		return nil, err
	}
	if n > max {
		return nil, fmt.Errorf("length %d over the limit %d", n, max)
	}
	buf := make([]byte, n)
	if _, err := io.ReadFull(r, buf); err != nil {
		return nil, err
	}
	return buf, nil
}

// snapshotAppliedIndex returns the state machine index recorded in a
// snapshot stream, after checking the whole stream.
func snapshotAppliedIndex(data []byte) (uint64, error) {
	var applied uint64
	err := readSnapshot(bytes.NewReader(data), func(k, v []byte) error {
		if string(k) == keyApplied {
			if len(v) != 8 {
				return fmt.Errorf("cluster: snapshot %s holds %d bytes", keyApplied, len(v))
			}
			applied = binary.BigEndian.Uint64(v)
		}
		return nil
	})
	return applied, err
}

// diffLUs turns two sorted LU tables into the changes between them.
func diffLUs(before, after []LU, index uint64) []Change {
	old := map[string]LU{}
	for _, lu := range before {
		old[lu.Name] = lu
	}
	var out []Change
	for _, lu := range after {
		prev, ok := old[lu.Name]
		delete(old, lu.Name)
		switch {
		case !ok:
			out = append(out, Change{Kind: Created, LU: lu, Index: index})
		case prev.SizeBytes != lu.SizeBytes:
			out = append(out, Change{Kind: Resized, LU: lu, Index: index})
		case !prev.UpdatedAt.Equal(lu.UpdatedAt) || prev.Epoch != lu.Epoch:
			out = append(out, Change{Kind: Updated, LU: lu, Index: index})
		}
	}
	for _, lu := range before {
		if _, gone := old[lu.Name]; gone {
			out = append(out, Change{Kind: Deleted, LU: lu, Index: index})
		}
	}
	return out
}
