package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"runtime/pprof"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"

	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/internal/logring"
	"github.com/lupool/lupool/server/api"
)

// Failure data capture (issue 14). A bundle is a tar.gz:
//
//	manifest.json          id, correlation id, trigger, reason, time, nodes, errors
//	NODE/logs.txt          the node's recent log lines (in-memory ring)
//	NODE/goroutines.txt    every goroutine's stack
//	NODE/metrics.txt       a /metrics snapshot
//	NODE/metadata.json     LUs, nodes, subscribers, the latest events
//	NODE/raft.json         raft state and indexes
//	NODE/config.json       the serve settings (the join token blanked)
//	NODE/version.txt       the binary's version
//
// Automatic triggers (a recovered panic in an API request, an I/O error of
// a volume, this node's copy set marking a copy out of sync, a command the
// state machine rejected, seen by the primary) build a bundle of this
// node's parts; `lupool ffdc collect --all-nodes` gathers every member's.
// Bundles go to the replicated FFDC repository in the metadata
// (cluster/ffdc.go) through the primary, which derives an FFDCCaptured
// event. Each automatic trigger kind makes at most one bundle per
// --ffdc-min-interval; more are counted and logged, not captured.

// FFDC trigger kinds (FFDCInfo.Trigger).
const (
	ffdcTriggerCollect  = "collect"
	ffdcTriggerPanic    = "panic"
	ffdcTriggerIOError  = "io-error"
	ffdcTriggerCopy     = "copy-failed"
	ffdcTriggerRejected = "command-rejected"
	ffdcEventsInBundle  = 200
	ffdcPartsTimeout    = 20 * time.Second
)

type ffdc struct {
	self     string
	node     *cluster.Node        // immutable; never nil
	peers    *peers               // immutable; never nil
	ring     *logring.Ring        // immutable; never nil
	registry *prometheus.Registry // immutable; never nil
	config   []byte               // immutable: the serve settings as JSON, secrets blanked
	log      *slog.Logger         // immutable; never nil
	interval time.Duration        // immutable: per-trigger minimum interval

	mu   sync.Mutex
	last map[string]time.Time // guarded by mu: last automatic bundle per trigger

	suppressed atomic.Uint64 // automatic bundles the rate limit skipped
	wg         sync.WaitGroup
	closing    atomic.Bool
}

func newFFDC(self string, node *cluster.Node, p *peers, ring *logring.Ring, registry *prometheus.Registry, cfg serveConfig,
	interval time.Duration, log *slog.Logger) *ffdc {
	cfg.JoinToken = ""
	conf, _ := json.MarshalIndent(cfg, "", "  ")
	return &ffdc{self: self, node: node, peers: p, ring: ring, registry: registry, config: conf, log: log, interval: interval,
		last: map[string]time.Time{}}
}

// close waits for bundles being built or stored.
func (f *ffdc) close() {
	f.closing.Store(true)
	f.wg.Wait()
}

// newFFDCID returns a bundle id that sorts by time: 20261207T125100Z-NODE-HEX.
func newFFDCID(node string, now time.Time) string {
	var b [3]byte
	_, _ = rand.Read(b[:])
	return now.UTC().Format("20060102T150405Z") + "-" + node + "-" + hex.EncodeToString(b[:])
}

func newCorrelationID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// trigger captures a bundle of this node's parts in the background, unless
// the same trigger made one within the interval. It never blocks.
func (f *ffdc) trigger(kind, reason string) {
	if f.closing.Load() {
		return
	}
	now := time.Now()
	f.mu.Lock()
	if last, ok := f.last[kind]; ok && now.Sub(last) < f.interval {
		f.mu.Unlock()
		f.suppressed.Add(1)
		f.log.Warn("failure data capture skipped (rate limit)", "trigger", kind, "reason", reason,
			"last", last.Format(time.RFC3339), "suppressed", f.suppressed.Load())
		return
	}
	f.last[kind] = now
	f.mu.Unlock()
	correlation := newCorrelationID()
	f.log.Error("failure detected: capturing failure data", "trigger", kind, "reason", reason, "correlation_id", correlation)
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		info, err := f.capture(ctx, correlation, kind, reason, false)
		if err != nil {
			f.log.Error("failure data capture failed", "trigger", kind, "correlation_id", correlation, "err", err)
			return
		}
		f.log.Info("failure data captured", "id", info.ID, "trigger", kind, "correlation_id", correlation, "bytes", info.Bytes)
	}()
}

// capture builds a bundle (this node's parts, and every other member's
// with allNodes) and stores it through the primary.
func (f *ffdc) capture(ctx context.Context, correlation, trigger, reason string, allNodes bool) (cluster.FFDCInfo, error) {
	now := time.Now().UTC()
	info := cluster.FFDCInfo{ID: newFFDCID(f.self, now), CorrelationID: correlation, Node: f.self, Trigger: trigger, Reason: reason}
	files := map[string][]byte{}
	for name, data := range f.parts(correlation, trigger, reason) {
		files[f.self+"/"+name] = data
	}
	info.Nodes = []string{f.self}
	failed := map[string]string{}
	if allNodes {
		nodes, err := f.node.Nodes()
		if err != nil {
			return info, err
		}
		for _, n := range nodes {
			if n.ID == f.self {
				continue
			}
			parts, err := f.remoteParts(ctx, n.ID, correlation, trigger, reason)
			if err != nil {
				failed[n.ID] = err.Error()
				continue
			}
			for name, data := range parts {
				files[name] = data
			}
			info.Nodes = append(info.Nodes, n.ID)
		}
		sort.Strings(info.Nodes)
	}
	manifest, _ := json.MarshalIndent(map[string]any{
		"id": info.ID, "correlation_id": correlation, "trigger": trigger, "reason": reason, "created_at": now,
		"node": f.self, "nodes": info.Nodes, "errors": failed,
	}, "", "  ")
	files["manifest.json"] = manifest
	data, err := tarGz(files)
	if err != nil {
		return info, err
	}
	if len(data) > cluster.FFDCBytesMax {
		return info, fmt.Errorf("bundle of %d bytes is over the repository's limit %d", len(data), cluster.FFDCBytesMax)
	}
	info.Bytes = int64(len(data))
	return info, f.store(ctx, info, data)
}

// store puts a bundle in the repository: directly on the primary, else
// through the primary's peer port.
func (f *ffdc) store(ctx context.Context, info cluster.FFDCInfo, data []byte) error {
	for attempt := 0; ; attempt++ {
		err := f.node.PutFFDC(ctx, cluster.Proposer{NodeID: f.self, Primary: f.node.IsLeader()}, info, data)
		if errors.Is(err, cluster.ErrNotLeader) {
			if leader, _ := f.node.Leader(); leader != "" && leader != f.self {
				var c *api.Client
				if c, err = f.peers.clientOf(leader); err == nil {
					err = c.StoreFFDC(ctx, toAPIFFDC(info), data)
				}
			}
		}
		if err == nil || attempt >= 20 {
			return err
		}
		var se *api.StatusError
		if errors.Is(err, cluster.ErrInvalid) || errors.Is(err, cluster.ErrExists) || (errors.As(err, &se) && se.StatusCode < 500) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// remoteParts asks member id for its parts and unpacks them.
func (f *ffdc) remoteParts(ctx context.Context, id, correlation, trigger, reason string) (map[string][]byte, error) {
	c, err := f.peers.clientOf(id)
	if err != nil {
		return nil, err
	}
	pctx, cancel := context.WithTimeout(ctx, ffdcPartsTimeout)
	defer cancel()
	var buf bytes.Buffer
	if err := c.FFDCParts(pctx, correlation, trigger, reason, &buf); err != nil {
		return nil, err
	}
	files, err := untarGz(buf.Bytes(), cluster.FFDCBytesMax)
	if err != nil {
		return nil, fmt.Errorf("parts of %s: %w", id, err)
	}
	out := map[string][]byte{}
	for name, data := range files {
		if !strings.HasPrefix(name, id+"/") {
			return nil, fmt.Errorf("parts of %s hold %q, outside %s/", id, name, id)
		}
		out[name] = data
	}
	return out, nil
}

// parts gathers this node's files (names relative to its folder).
func (f *ffdc) parts(correlation, trigger, reason string) map[string][]byte {
	out := map[string][]byte{}
	out["logs.txt"] = f.ring.Lines()
	var g bytes.Buffer
	if p := pprof.Lookup("goroutine"); p != nil {
		_ = p.WriteTo(&g, 2)
	}
	out["goroutines.txt"] = g.Bytes()
	var m bytes.Buffer
	if mfs, err := f.registry.Gather(); err == nil {
		enc := expfmt.NewEncoder(&m, expfmt.NewFormat(expfmt.TypeTextPlain))
		for _, mf := range mfs {
			_ = enc.Encode(mf)
		}
	} else {
		fmt.Fprintf(&m, "gather: %v\n", err)
	}
	out["metrics.txt"] = m.Bytes()
	meta := map[string]any{"correlation_id": correlation, "trigger": trigger, "reason": reason}
	if lus, err := f.node.ListLUs(); err == nil {
		meta["lus"] = lus
	} else {
		meta["lus_error"] = err.Error()
	}
	if nodes, err := f.node.Nodes(); err == nil {
		meta["nodes"] = nodes
	}
	if subs, err := f.node.Subscribers(); err == nil {
		meta["subscribers"] = subs
	}
	last := f.node.LastEventSeq()
	if evs, err := f.node.Events(last-min(last, ffdcEventsInBundle), ffdcEventsInBundle); err == nil {
		meta["events"] = evs
	}
	out["metadata.json"], _ = json.MarshalIndent(meta, "", "  ")
	out["raft.json"], _ = json.MarshalIndent(f.node.Stats(), "", "  ")
	out["config.json"] = f.config
	out["version.txt"] = []byte(readBuildVersion().String() + "\n")
	return out
}

// tarGz packs files (sorted by name) into a tar.gz.
func tarGz(files map[string][]byte) ([]byte, error) {
	names := make([]string, 0, len(files))
	for name := range files {
		names = append(names, name)
	}
	sort.Strings(names)
	var buf bytes.Buffer
	gz := gzip.NewWriter(&buf)
	tw := tar.NewWriter(gz)
	now := time.Now()
	for _, name := range names {
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(files[name])), ModTime: now, Typeflag: tar.TypeReg}); err != nil {
			return nil, err
		}
		if _, err := tw.Write(files[name]); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	if err := gz.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// untarGz unpacks a tar.gz of regular files, refusing more than max bytes
// and names that leave the archive.
func untarGz(data []byte, max int64) (map[string][]byte, error) {
	gz, err := gzip.NewReader(bytes.NewReader(data))
	if err != nil {
		return nil, err
	}
	tr := tar.NewReader(gz)
	out := map[string][]byte{}
	var total int64
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return nil, err
		}
		if h.Typeflag != tar.TypeReg || strings.HasPrefix(h.Name, "/") || strings.Contains(h.Name, "..") {
			return nil, fmt.Errorf("entry %q: only plain relative files", h.Name)
		}
		total += h.Size
		if h.Size < 0 || total > max {
			return nil, fmt.Errorf("over %d bytes unpacked", max)
		}
		b, err := io.ReadAll(io.LimitReader(tr, h.Size))
		if err != nil {
			return nil, err
		}
		out[h.Name] = b
	}
}

func toAPIFFDC(in cluster.FFDCInfo) api.FFDCInfo {
	return api.FFDCInfo{ID: in.ID, CorrelationID: in.CorrelationID, Node: in.Node, Nodes: in.Nodes, Trigger: in.Trigger,
		Reason: in.Reason, CreatedAt: in.CreatedAt, Bytes: in.Bytes, Complete: in.Complete}
}

// ffdcStore serves the FFDC endpoints (api.FFDCStore).
type ffdcStore struct {
	f   *ffdc             // immutable; never nil
	ctl func(error) error // immutable: maps metadata errors to the API's
}

var _ api.FFDCStore = (*ffdcStore)(nil)

// CollectFFDC runs on the primary (it gathers and stores directly).
func (s *ffdcStore) CollectFFDC(ctx context.Context, req api.FFDCRequest) (api.FFDCInfo, error) {
	if !s.f.node.IsLeader() {
		return api.FFDCInfo{}, s.ctl(cluster.ErrNotLeader)
	}
	if len(req.Reason) > 512 {
		return api.FFDCInfo{}, fmt.Errorf("%w: reason over 512 bytes", api.ErrInvalid)
	}
	info, err := s.f.capture(ctx, newCorrelationID(), ffdcTriggerCollect, req.Reason, req.AllNodes)
	if err != nil {
		return api.FFDCInfo{}, s.ctl(err)
	}
	info.Complete = true
	got, _, err := s.f.node.FFDCBundle(info.ID)
	if err == nil {
		info = got
	}
	return toAPIFFDC(info), nil
}

func (s *ffdcStore) ListFFDC(context.Context) ([]api.FFDCInfo, error) {
	list, err := s.f.node.FFDCList()
	if err != nil {
		return nil, s.ctl(err)
	}
	out := make([]api.FFDCInfo, 0, len(list))
	for _, in := range list {
		out = append(out, toAPIFFDC(in))
	}
	return out, nil
}

func (s *ffdcStore) GetFFDC(_ context.Context, id string) (api.FFDCInfo, []byte, error) {
	info, data, err := s.f.node.FFDCBundle(id)
	if err != nil {
		return api.FFDCInfo{}, nil, s.ctl(err)
	}
	return toAPIFFDC(info), data, nil
}

// FFDCParts builds this node's parts for a gathering node.
func (s *ffdcStore) FFDCParts(_ context.Context, correlationID, trigger, reason string) ([]byte, error) {
	files := map[string][]byte{}
	for name, data := range s.f.parts(correlationID, trigger, reason) {
		files[s.f.self+"/"+name] = data
	}
	return tarGz(files)
}

// StoreFFDC stores a bundle a member built (on the primary).
func (s *ffdcStore) StoreFFDC(ctx context.Context, info api.FFDCInfo, data []byte) error {
	by := api.CallerFrom(ctx).Node
	if by == "" {
		return fmt.Errorf("%w: only member nodes store bundles", api.ErrForbidden)
	}
	if !s.f.node.IsLeader() {
		return s.ctl(cluster.ErrNotLeader)
	}
	err := s.f.node.PutFFDC(ctx, cluster.Proposer{NodeID: by}, cluster.FFDCInfo{ID: info.ID, CorrelationID: info.CorrelationID,
		Node: by, Nodes: []string{by}, Trigger: info.Trigger, Reason: info.Reason}, data)
	return s.ctl(err)
}

// watchForFailures follows the event log and triggers a capture on the
// failures it reports: a copy of an LU this node writes marked out of sync
// (proposed by this node), and, on the primary, a rejected command.
func (f *ffdc) watchForFailures(ctx context.Context) {
	pos := f.node.LastEventSeq()
	for {
		changed := f.node.EventsChanged()
		evs, err := f.node.Events(pos, 256)
		if err != nil {
			return
		}
		for _, ev := range evs {
			pos = ev.Seq
			switch {
			case ev.Kind == cluster.EventCopyStateChanged && ev.By == f.self && ev.Details["to"] == cluster.ReplicaOutOfSync:
				f.trigger(ffdcTriggerCopy, fmt.Sprintf("copy of %s on %s went out of sync (event %d)", ev.LU, ev.Node, ev.Seq))
			case ev.Kind == cluster.EventCommandRejected && f.node.IsLeader():
				f.trigger(ffdcTriggerRejected, fmt.Sprintf("%s from %s rejected: %s (event %d)", ev.Details["type"], ev.By, ev.Details["error"], ev.Seq))
			}
		}
		if len(evs) > 0 {
			continue
		}
		select {
		case <-ctx.Done():
			return
		case <-changed:
		}
	}
}
