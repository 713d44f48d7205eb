package main

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/control"
	"github.com/lupool/lupool/replication/ec"
	"github.com/lupool/lupool/server/nbd"
)

// ecDevices holds this node's devices of EC shard LUs, as the replication
// manager hands them out (they are not exported over NBD: a shard is the
// pool's own). control.ECDevices.
type ecDevices struct {
	mu   sync.Mutex
	devs map[string]blockdev.Device // guarded by mu
	// other looks up any other LU's device (an image's mirrored disk).
	other func(name string) (blockdev.Device, bool)
}

func newECDevices(other func(string) (blockdev.Device, bool)) *ecDevices {
	return &ecDevices{devs: map[string]blockdev.Device{}, other: other}
}

func (d *ecDevices) add(name string, dev blockdev.Device) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.devs[name] = dev
}

func (d *ecDevices) remove(name string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.devs, name)
}

// Device implements control.ECDevices.
func (d *ecDevices) Device(name string) (blockdev.Device, bool) {
	d.mu.Lock()
	dev, ok := d.devs[name]
	d.mu.Unlock()
	if ok || cluster.IsECShardLU(name) {
		return dev, ok
	}
	return d.other(name)
}

// ecExporter exports every ready EC image's disks (IMAGE/N) over NBD on
// this node, read from the shards (local and remote), and reports
// degraded reads with a metric and an event.
type ecExporter struct {
	node     *cluster.Node
	devs     *ecDevices
	exports  *nbd.ExportSet
	log      *slog.Logger
	emit     func(cluster.Event)
	selfTest error
	opts     ec.Options
	degraded *prometheus.CounterVec

	// served maps a disk's name to what this node exports for it; only
	// the loop goroutine touches it.
	served map[string]servedDisk
	// lastEvent rate-limits degraded-read events per disk.
	mu        sync.Mutex
	lastEvent map[string]time.Time // guarded by mu
}

type servedDisk struct {
	img    *ec.Image
	shards []blockdev.Device // the devices it was opened over
}

func newECExporter(node *cluster.Node, devs *ecDevices, exports *nbd.ExportSet, log *slog.Logger, emit func(cluster.Event), selfTest error) *ecExporter {
	return &ecExporter{node: node, devs: devs, exports: exports, log: log, emit: emit, selfTest: selfTest,
		// A down shard node is left out for a while rather than waited for.
		opts: ec.Options{ShardTimeout: 2 * time.Second, RetryAfter: 5 * time.Second},
		degraded: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lupool_ec_degraded_reads_total",
			Help: "Reads of an erasure-coded image disk served by reconstructing from parity (a shard missing, unreachable or corrupt).",
		}, []string{"lu"}),
		served: map[string]servedDisk{}, lastEvent: map[string]time.Time{}}
}

// run follows the layouts until ctx ends.
func (x *ecExporter) run(ctx context.Context) {
	if x.selfTest != nil {
		x.log.Error("the erasure coder failed its self-test: this node serves no erasure-coded image", "err", x.selfTest)
		return
	}
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		x.reconcile()
		select {
		case <-ctx.Done():
			for name := range x.served {
				x.exports.Remove(name)
			}
			return
		case <-t.C:
		}
	}
}

func (x *ecExporter) reconcile() {
	ls, err := x.node.ListEC()
	if err != nil {
		return
	}
	want := map[string]bool{}
	for _, l := range ls {
		if l.State != cluster.ECReady {
			continue
		}
		for d, disk := range l.Disks {
			want[disk.LU] = true
			x.serve(l, d)
		}
	}
	for name := range x.served {
		if !want[name] {
			x.exports.Remove(name)
			delete(x.served, name)
			x.degraded.DeleteLabelValues(name)
		}
	}
}

// serve exports disk d of l, opening it again when a shard's device
// changed, and puts the export back if something else replaced it.
func (x *ecExporter) serve(l cluster.ECLayout, d int) {
	disk := l.Disks[d]
	cur := make([]blockdev.Device, len(disk.Shards))
	have := 0
	for i, s := range disk.Shards {
		var ok bool
		if cur[i], ok = x.devs.Device(s.LU); ok {
			have++
		}
	}
	if have < l.K {
		// Fewer than K shard devices here yet (a node that just started
		// and follows the metadata): export nothing rather than an image
		// that fails every read.
		if _, ok := x.served[disk.LU]; ok {
			x.exports.Remove(disk.LU)
			delete(x.served, disk.LU)
		}
		return
	}
	old, ok := x.served[disk.LU]
	same := ok && len(old.shards) == len(cur)
	for i := 0; same && i < len(cur); i++ {
		same = old.shards[i] == cur[i]
	}
	if !same {
		opts := x.opts
		name := disk.LU
		opts.OnDegraded = func(r ec.DegradedRead) { x.onDegraded(name, r) }
		img, err := control.OpenECDisk(l, d, x.devs, opts)
		if err != nil {
			x.log.Error("cannot open erasure-coded disk", "lu", disk.LU, "err", err)
			return
		}
		old = servedDisk{img: img, shards: cur}
		x.served[disk.LU] = old
		x.exports.Remove(disk.LU)
	}
	if e, ok := x.exports.Lookup(disk.LU); ok && e.Device == blockdev.Device(old.img) {
		return
	}
	x.exports.Remove(disk.LU)
	desc := fmt.Sprintf("erasure-coded %d+%d disk of image %s", l.K, l.M, l.Image)
	if err := x.exports.Add(nbd.Export{Name: disk.LU, Description: desc, ID: "ec-" + disk.ImageID, Device: old.img}); err != nil {
		x.log.Error("cannot export erasure-coded disk", "lu", disk.LU, "err", err)
	}
}

func (x *ecExporter) onDegraded(name string, r ec.DegradedRead) {
	x.degraded.WithLabelValues(name).Inc()
	x.mu.Lock()
	due := time.Since(x.lastEvent[name]) > 10*time.Second
	if due {
		x.lastEvent[name] = time.Now()
	}
	x.mu.Unlock()
	if !due {
		return
	}
	shards := make([]string, len(r.Shards))
	for i, s := range r.Shards {
		shards[i] = fmt.Sprint(s)
	}
	x.log.Warn("degraded read of an erasure-coded disk", "lu", name, "shards", shards, "err", r.Err)
	x.emit(cluster.Event{Kind: cluster.EventECDegradedRead, Details: map[string]string{
		"image": strings.SplitN(name, "/", 2)[0], "disk": name, "shards": strings.Join(shards, ","), "error": fmt.Sprint(r.Err),
	}})
}

// Collectors returns the exporter's metrics for the daemon to register.
func (x *ecExporter) Collectors() []prometheus.Collector { return []prometheus.Collector{x.degraded} }
