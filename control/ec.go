package control

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/blockdev/blockcopy"
	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/replication/ec"
	"github.com/lupool/lupool/server/api"
)

// ECMetadata is the replicated EC layout table: cluster.Node.
type ECMetadata interface {
	CreateEC(ctx context.Context, l cluster.ECLayout, lus []cluster.LU) error
	MarkECReady(ctx context.Context, image string) error
	AbortEC(ctx context.Context, image string) error
	GetEC(image string) (cluster.ECLayout, error)
	Nodes() ([]cluster.NodeInfo, error)
	AddECShard(ctx context.Context, m cluster.ECShardMove, lu cluster.LU) error
	SwapECShard(ctx context.Context, m cluster.ECShardMove) error
}

var _ ECMetadata = (*cluster.Node)(nil)

// ECDevices gives this node's device of an LU: the device the replication
// manager serves it with (the local copy, or the writer over the peer
// channel), so a shard on another node is read and written over the
// authenticated peer streams.
type ECDevices interface {
	Device(name string) (blockdev.Device, bool)
}

// ECOptions configure EC.
type ECOptions struct {
	Metadata ECMetadata
	Devices  ECDevices
	// SelfTest is ec.SelfTest's result at start: non-nil refuses every
	// EC operation.
	SelfTest error
	// Shard reads (ec.Options); zero means ec's defaults.
	ShardTimeout, RetryAfter time.Duration
	// DeviceWait bounds the wait for new shard LUs' devices; default 30 s.
	DeviceWait time.Duration
}

// EC converts, verifies and rebuilds erasure-coded images: api.ECBackend.
type EC struct {
	plane *Plane
	opts  ECOptions
}

var _ api.ECBackend = (*EC)(nil)

// NewEC returns the EC backend over a plane (for image answers and error
// mapping).
func NewEC(plane *Plane, opts ECOptions) (*EC, error) {
	if plane == nil || opts.Metadata == nil || opts.Devices == nil {
		return nil, errors.New("control: EC options: plane, Metadata and Devices are required")
	}
	if opts.DeviceWait == 0 {
		opts.DeviceWait = 30 * time.Second
	}
	return &EC{plane: plane, opts: opts}, nil
}

// OpenECDisk opens disk d of a layout over the shard devices found in
// devs (a shard whose device is not there is missing).
func OpenECDisk(l cluster.ECLayout, d int, devs ECDevices, opts ec.Options) (*ec.Image, error) {
	disk := l.Disks[d]
	id, err := hex.DecodeString(disk.ImageID)
	if err != nil || len(id) != 16 {
		return nil, fmt.Errorf("control: disk %s: image id %q", disk.LU, disk.ImageID)
	}
	opts.Geometry, opts.DataBytes = ec.Geometry{K: l.K, M: l.M}, disk.SizeBytes
	copy(opts.ImageID[:], id)
	shards := make([]blockdev.Device, len(disk.Shards))
	for i, s := range disk.Shards {
		if dev, ok := devs.Device(s.LU); ok {
			shards[i] = dev
		}
	}
	return ec.Open(shards, opts)
}

func (e *EC) readOptions() ec.Options {
	return ec.Options{ShardTimeout: e.opts.ShardTimeout, RetryAfter: e.opts.RetryAfter}
}

func (e *EC) check() error {
	if e.opts.SelfTest != nil {
		return fmt.Errorf("%w: this node's erasure coder failed its self-test, it serves no EC data: %v", api.ErrUnavailable, e.opts.SelfTest)
	}
	return nil
}

// Layout implements api.ECBackend.
func (e *EC) Layout(_ context.Context, name string) (*api.ImageEC, error) {
	l, err := e.opts.Metadata.GetEC(name)
	if errors.Is(err, cluster.ErrECNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, e.plane.APIError(err)
	}
	out := &api.ImageEC{K: l.K, M: l.M, State: l.State, RawBytes: l.RawBytes()}
	for _, d := range l.Disks {
		out.UsableBytes += d.SizeBytes
		disk := api.ImageECDisk{LU: d.LU}
		for i, s := range d.Shards {
			disk.Shards = append(disk.Shards, api.ImageECShard{Index: i, LU: s.LU, Node: s.Node})
		}
		out.Disks = append(out.Disks, disk)
	}
	return out, nil
}

// placementNodes lists the members, this node first, then by id.
func (e *EC) placementNodes() ([]string, error) {
	infos, err := e.opts.Metadata.Nodes()
	if err != nil {
		return nil, err
	}
	var ids []string
	for _, n := range infos {
		if n.ID != e.plane.opts.NodeID {
			ids = append(ids, n.ID)
		}
	}
	slices.Sort(ids)
	return append([]string{e.plane.opts.NodeID}, ids...), nil
}

// ConvertImage implements api.ECBackend: it records the layout with its
// shard LUs, encodes each disk from its mirrored LU into the shards
// (written through this node's devices: local, or over the peer channel
// to the shard's node), reads the image back from the shards and compares
// its content hash with the mirrored disk's, then makes the layout ready
// (which drops the mirrored disks). On any failure the layout and its
// shards are removed and the image stays as it was.
func (e *EC) ConvertImage(ctx context.Context, name string, req api.ConvertImageRequest) (api.Image, error) {
	if err := e.check(); err != nil {
		return api.Image{}, err
	}
	im, err := e.plane.images()
	if err != nil {
		return api.Image{}, err
	}
	img, err := im.GetImage(name)
	if err != nil {
		return api.Image{}, e.plane.imageError(name, err)
	}
	if img.State != cluster.ImageReady {
		return api.Image{}, fmt.Errorf("%w: image %q is %s; only a ready (read-only) image is converted", api.ErrInvalid, name, img.State)
	}
	g := ec.Geometry{K: req.K, M: req.M}
	if err := g.Validate(); err != nil {
		return api.Image{}, fmt.Errorf("%w: --ec %d+%d: %v", api.ErrInvalid, req.K, req.M, err)
	}
	nodes, err := e.placementNodes()
	if err != nil {
		return api.Image{}, err
	}
	ids := make([]string, len(img.Disks))
	for i := range ids {
		var id [16]byte
		_, _ = rand.Read(id[:])
		ids[i] = hex.EncodeToString(id[:])
	}
	layout, lus, err := cluster.PlanEC(name, g.K, g.M, nodes, img.Disks, func(size int64) int64 { return g.ShardBytes(size) }, ids)
	if err != nil {
		return api.Image{}, e.plane.APIError(err)
	}
	if err := e.opts.Metadata.CreateEC(ctx, layout, lus); err != nil {
		return api.Image{}, e.plane.imageError(name, err)
	}
	if err := e.encodeAll(ctx, layout); err != nil {
		abortCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		if aerr := e.opts.Metadata.AbortEC(abortCtx, name); aerr != nil {
			err = errors.Join(err, fmt.Errorf("remove the half-made layout: %w", aerr))
		}
		return api.Image{}, fmt.Errorf("convert %s to %s: %w; the image stays mirrored", name, g, err)
	}
	if err := e.opts.Metadata.MarkECReady(ctx, name); err != nil {
		return api.Image{}, e.plane.imageError(name, err)
	}
	if err := e.plane.opts.Replicas.Sync(ctx); err != nil {
		return api.Image{}, err
	}
	out, err := e.plane.GetImage(ctx, name)
	if err != nil {
		return api.Image{}, err
	}
	out.EC, err = e.Layout(ctx, name)
	return out, err
}

// device waits for this node's device of an LU (a new LU's follows the
// metadata within moments).
func (e *EC) device(ctx context.Context, name string) (blockdev.Device, error) {
	deadline := time.Now().Add(e.opts.DeviceWait)
	for {
		if dev, ok := e.opts.Devices.Device(name); ok {
			return dev, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("%w: no device for %s on %s after %s", api.ErrUnavailable, name, e.plane.opts.NodeID, e.opts.DeviceWait)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func (e *EC) encodeAll(ctx context.Context, l cluster.ECLayout) error {
	if err := e.plane.opts.Replicas.Sync(ctx); err != nil {
		return err
	}
	for d, disk := range l.Disks {
		src, err := e.device(ctx, disk.LU)
		if err != nil {
			return err
		}
		shards := make([]blockdev.Device, len(disk.Shards))
		for i, s := range disk.Shards {
			if shards[i], err = e.device(ctx, s.LU); err != nil {
				return err
			}
		}
		img, err := OpenECDisk(l, d, e.opts.Devices, e.readOptions())
		if err != nil {
			return err
		}
		opts := ec.Options{Geometry: img.Geometry(), DataBytes: disk.SizeBytes}
		id, _ := hex.DecodeString(disk.ImageID)
		copy(opts.ImageID[:], id)
		if err := ec.Encode(ctx, src, shards, opts, nil); err != nil {
			return fmt.Errorf("%s: %w", disk.LU, err)
		}
		want, err := blockcopy.Hash(ctx, src, disk.SizeBytes)
		if err != nil {
			return fmt.Errorf("hash %s: %w", disk.LU, err)
		}
		got, err := blockcopy.Hash(ctx, img, disk.SizeBytes)
		if err != nil {
			return fmt.Errorf("read %s back from its shards: %w", disk.LU, err)
		}
		if got != want {
			return fmt.Errorf("%w: %s read back from its shards hashes %x, the mirrored disk %x", api.ErrInvalid, disk.LU, got, want)
		}
	}
	return nil
}

func (e *EC) readyLayout(name string) (cluster.ECLayout, error) {
	if err := e.check(); err != nil {
		return cluster.ECLayout{}, err
	}
	l, err := e.opts.Metadata.GetEC(name)
	if errors.Is(err, cluster.ErrECNotFound) {
		if _, ierr := e.plane.opts.Images.GetImage(name); ierr != nil {
			return cluster.ECLayout{}, e.plane.imageError(name, ierr)
		}
		return cluster.ECLayout{}, fmt.Errorf("%w: image %q is mirrored, not erasure-coded (lupool lu verify checks its disks' copies)", api.ErrInvalid, name)
	}
	if err != nil {
		return cluster.ECLayout{}, e.plane.APIError(err)
	}
	if l.State != cluster.ECReady {
		return cluster.ECLayout{}, fmt.Errorf("%w: image %q is still %s", api.ErrBusy, name, l.State)
	}
	return l, nil
}

// VerifyImage implements api.ECBackend.
func (e *EC) VerifyImage(ctx context.Context, name string) (api.ECVerifyReport, error) {
	l, err := e.readyLayout(name)
	if err != nil {
		return api.ECVerifyReport{}, err
	}
	out := api.ECVerifyReport{Image: name, Clean: true}
	for d, disk := range l.Disks {
		img, err := OpenECDisk(l, d, e.opts.Devices, e.readOptions())
		if err != nil {
			return out, err
		}
		r, err := img.Verify(ctx)
		if err != nil {
			return out, err
		}
		rep := api.ECDiskReport{LU: disk.LU, Stripes: r.Stripes, Clean: r.Clean(), FaultCount: r.FaultCount, ParityMismatches: r.ParityMismatches}
		for _, f := range r.Faults {
			s := disk.Shards[f.Shard]
			rep.Faults = append(rep.Faults, api.ECFault{Shard: f.Shard, ShardLU: s.LU, Node: s.Node, Stripe: f.Stripe, Error: f.Err})
		}
		out.Clean = out.Clean && rep.Clean
		out.Disks = append(out.Disks, rep)
	}
	return out, nil
}

// RebuildImage implements api.ECBackend: every disk's bad chunks are
// rewritten in place and a shard whose superblock is gone or bad (a wiped
// volume on its node) is rewritten whole, from the other shards. With
// req.From and req.To, each shard on From (a lost node) is rebuilt onto To
// and moved there (image.ec.shard.add, the rebuild, image.ec.shard.swap);
// otherwise a shard whose node cannot be reached is left as it is.
func (e *EC) RebuildImage(ctx context.Context, name string, req api.RebuildImageRequest) (api.ECRebuildReport, error) {
	if (req.From == "") != (req.To == "") || (req.From != "" && req.From == req.To) {
		return api.ECRebuildReport{}, fmt.Errorf("%w: give both --from NODE (the lost one) and --to NODE (another), or neither", api.ErrInvalid)
	}
	l, err := e.readyLayout(name)
	if err != nil {
		return api.ECRebuildReport{}, err
	}
	out := api.ECRebuildReport{Image: name}
	for d, disk := range l.Disks {
		rep := api.ECDiskRebuildStats{LU: disk.LU, RebuiltShards: []string{}}
		targets := map[int]blockdev.Device{}
		var moves []cluster.ECShardMove
		for i, s := range disk.Shards {
			if req.From == "" || s.Node != req.From {
				continue
			}
			m := cluster.ECShardMove{Image: name, Disk: d, Shard: i, Node: req.To}
			lu := cluster.LU{Name: cluster.ECMovedShardLUName(name, d, i, req.To), SizeBytes: disk.ShardBytes, Kind: cluster.KindFile, Copies: 1,
				CreatedOn: req.To, Writer: req.To, Epoch: 1, Description: fmt.Sprintf("shard %d of %s (%d+%d)", i, disk.LU, l.K, l.M),
				Replicas: []cluster.Replica{{NodeID: req.To, State: cluster.ReplicaInSync}}}
			if err := e.opts.Metadata.AddECShard(ctx, m, lu); err != nil {
				return out, e.plane.imageError(name, err)
			}
			if err := e.plane.opts.Replicas.Sync(ctx); err != nil {
				return out, err
			}
			dev, err := e.device(ctx, lu.Name)
			if err != nil {
				return out, err
			}
			targets[i] = dev
			moves = append(moves, m)
		}
		img, err := OpenECDisk(l, d, e.opts.Devices, e.readOptions())
		if err != nil {
			return out, err
		}
		st, err := img.Rebuild(ctx, targets, nil)
		for _, i := range st.Rebuilt {
			rep.RebuiltShards = append(rep.RebuiltShards, disk.Shards[i].LU)
		}
		rep.RepairedChunks = st.RepairedChunks
		if err != nil {
			out.Disks = append(out.Disks, rep)
			return out, fmt.Errorf("%w: rebuild %s: %v", api.ErrUnavailable, disk.LU, err)
		}
		for _, m := range moves {
			if err := e.opts.Metadata.SwapECShard(ctx, m); err != nil {
				out.Disks = append(out.Disks, rep)
				return out, e.plane.imageError(name, err)
			}
			rep.MovedShards = append(rep.MovedShards, cluster.ECMovedShardLUName(name, d, m.Shard, m.Node))
		}
		out.Disks = append(out.Disks, rep)
	}
	if req.From != "" {
		if err := e.plane.opts.Replicas.Sync(ctx); err != nil {
			return out, err
		}
	}
	return out, nil
}
