package control

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"

	"github.com/lupool/lupool/blockdev/blockcopy"
	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/internal/rules"
	"github.com/lupool/lupool/lu"
	"github.com/lupool/lupool/server/api"
)

// ImageMetadata is the replicated image table: cluster.Node. Optional
// (Options.Images); without it the image calls answer ErrUnavailable.
type ImageMetadata interface {
	CreateImage(ctx context.Context, img cluster.Image, lus []cluster.LU) error
	MarkImageReady(ctx context.Context, img cluster.Image) error
	DeleteImage(ctx context.Context, name string) error
	FlattenLU(ctx context.Context, name string) error
	GetImage(name string) (cluster.Image, error)
	ListImages() ([]cluster.Image, error)
}

var _ ImageMetadata = (*cluster.Node)(nil)

func (p *Plane) images() (ImageMetadata, error) {
	if p.opts.Images == nil {
		return nil, fmt.Errorf("%w: this node serves no images", api.ErrUnavailable)
	}
	return p.opts.Images, nil
}

// CreateImage records a new image, importing, with one empty LU per disk
// placed like an LU of the image's copy count (the writer on req.Node),
// and waits until this node's volumes follow.
func (p *Plane) CreateImage(ctx context.Context, req api.CreateImageRequest) (api.Image, error) {
	im, err := p.images()
	if err != nil {
		return api.Image{}, err
	}
	if err := rules.ImageName(req.Name); err != nil {
		return api.Image{}, fmt.Errorf("%w: image name %q: %w", api.ErrInvalid, req.Name, err)
	}
	if req.Copies == 0 {
		req.Copies = 1
	}
	if err := rules.Copies(req.Copies); err != nil {
		return api.Image{}, fmt.Errorf("%w: copies %d: %w", api.ErrInvalid, req.Copies, err)
	}
	if len(req.Disks) == 0 || len(req.Disks) > rules.ImageDisksMax {
		return api.Image{}, fmt.Errorf("%w: an image has 1 to %d sources, not %d", api.ErrInvalid, rules.ImageDisksMax, len(req.Disks))
	}
	if req.Node == "" {
		req.Node = p.opts.NodeID
	}
	if _, err := im.GetImage(req.Name); err == nil {
		return api.Image{}, fmt.Errorf("%w: an image named %q exists; pick another name, or delete it first (lupool image delete %s)", api.ErrExists, req.Name, req.Name)
	}
	nodes, err := p.opts.Metadata.Nodes()
	if err != nil {
		return api.Image{}, p.APIError(err)
	}
	if !knownNode(nodes, req.Node) {
		return api.Image{}, fmt.Errorf("%w: node %q is not a member of this cluster (see lupool node list)", api.ErrInvalid, req.Node)
	}
	replicas, err := p.place(nodes, req.Node, req.Copies)
	if err != nil {
		return api.Image{}, err
	}
	img := cluster.Image{Name: req.Name, State: cluster.ImageImporting, Copies: req.Copies, CreatedOn: req.Node}
	var lus []cluster.LU
	local := req.Node == p.opts.NodeID
	var reserved []string
	release := func() {
		for _, name := range reserved {
			p.opts.Pool.Release(name)
		}
	}
	for i, d := range req.Disks {
		size, _, err := rules.RoundSize(d.SizeBytes)
		if err != nil {
			return api.Image{}, fmt.Errorf("%w: source %d (%s) of %d bytes: %w", api.ErrInvalid, i, d.Source, d.SizeBytes, err)
		}
		name := rules.ImageLUName(req.Name, i)
		img.Disks = append(img.Disks, cluster.ImageDisk{LU: name, SizeBytes: size, Source: d.Source})
		lus = append(lus, cluster.LU{Name: name, Image: req.Name, SizeBytes: size, Kind: cluster.KindFile, Copies: req.Copies,
			CreatedOn: req.Node, Writer: req.Node, Epoch: 1, Replicas: replicas, CreatedAt: p.opts.Now().UTC()})
		if local {
			if err := p.opts.Pool.Reserve(name, size, lu.KindFile, p.opts.ReserveTTL); err != nil {
				release()
				if errors.Is(err, lu.ErrOvercommit) {
					return api.Image{}, p.overcommitError(err, size)
				}
				return api.Image{}, err
			}
			reserved = append(reserved, name)
		}
	}
	if err := im.CreateImage(ctx, img, lus); err != nil {
		release()
		if errors.Is(err, cluster.ErrImageExists) {
			return api.Image{}, fmt.Errorf("%w: %v; pick another name, or delete it first", api.ErrExists, err)
		}
		return api.Image{}, p.APIError(err)
	}
	if err := p.opts.Replicas.Sync(ctx); err != nil {
		return api.Image{}, err
	}
	if local {
		for _, l := range lus {
			if _, ok := p.opts.Replicas.Volume(l.Name); !ok {
				cause := p.opts.Replicas.LastError()
				derr := im.DeleteImage(ctx, req.Name)
				release()
				return api.Image{}, fmt.Errorf("image %q: the volume of %s could not be created (%v), so the image was not kept (removal: %v)", req.Name, l.Name, cause, derr)
			}
		}
	}
	return p.GetImage(ctx, req.Name)
}

// ImageReady checks an importing image's hashes against this node's
// copies (where it holds them), records them and makes the disks
// read-only. On a node that is not the leader the check runs here before
// the request is forwarded, and again on the leader: the node the importer
// asks, its disks' writer, always checks its stored copy.
func (p *Plane) ImageReady(ctx context.Context, name string, req api.ImageReadyRequest) (api.Image, error) {
	im, err := p.images()
	if err != nil {
		return api.Image{}, err
	}
	img, err := im.GetImage(name)
	if err != nil {
		return api.Image{}, p.imageError(name, err)
	}
	if img.State != cluster.ImageImporting {
		return api.Image{}, fmt.Errorf("%w: image %q is %s already", api.ErrInvalid, name, img.State)
	}
	if len(req.Disks) != len(img.Disks) {
		return api.Image{}, fmt.Errorf("%w: image %q has %d disks; %d hashes given", api.ErrInvalid, name, len(img.Disks), len(req.Disks))
	}
	for i, d := range req.Disks {
		want, err := hex.DecodeString(d.SHA256)
		if err != nil || len(want) != 32 {
			return api.Image{}, fmt.Errorf("%w: disk %d: sha256 %q is not 64 hex digits", api.ErrInvalid, i, d.SHA256)
		}
		if d.SourceBytes <= 0 || d.SourceBytes > img.Disks[i].SizeBytes {
			return api.Image{}, fmt.Errorf("%w: disk %d: source_bytes %d: give the source's size, at most the disk's %d", api.ErrInvalid, i, d.SourceBytes, img.Disks[i].SizeBytes)
		}
		if vol, ok := p.opts.Replicas.Volume(img.Disks[i].LU); ok {
			got, err := blockcopy.Hash(ctx, vol, d.SourceBytes)
			if err != nil {
				return api.Image{}, fmt.Errorf("image %q: hash the stored copy of %s: %w", name, img.Disks[i].LU, err)
			}
			if hex.EncodeToString(got[:]) != d.SHA256 {
				return api.Image{}, fmt.Errorf("%w: image %q: the stored copy of %s on %s differs from its source (stored %x, source %s); import it again with --resume, or delete it",
					api.ErrInvalid, name, img.Disks[i].LU, p.opts.NodeID, got, d.SHA256)
			}
		}
		img.Disks[i].SHA256, img.Disks[i].SentBytes = d.SHA256, d.SentBytes
	}
	if err := im.MarkImageReady(ctx, img); err != nil {
		return api.Image{}, p.imageError(name, err)
	}
	if err := p.opts.Replicas.Sync(ctx); err != nil {
		return api.Image{}, err
	}
	return p.GetImage(ctx, name)
}

// ListImages returns every image.
func (p *Plane) ListImages(ctx context.Context) ([]api.Image, error) {
	im, err := p.images()
	if err != nil {
		return nil, err
	}
	imgs, err := im.ListImages()
	if err != nil {
		return nil, err
	}
	lus, err := p.opts.Metadata.ListLUs()
	if err != nil {
		return nil, err
	}
	out := make([]api.Image, 0, len(imgs))
	for _, img := range imgs {
		out = append(out, p.toAPIImage(img, lus))
	}
	return out, nil
}

// GetImage returns one image.
func (p *Plane) GetImage(ctx context.Context, name string) (api.Image, error) {
	im, err := p.images()
	if err != nil {
		return api.Image{}, err
	}
	img, err := im.GetImage(name)
	if err != nil {
		return api.Image{}, p.imageError(name, err)
	}
	lus, err := p.opts.Metadata.ListLUs()
	if err != nil {
		return api.Image{}, err
	}
	return p.toAPIImage(img, lus), nil
}

// DeleteImage removes an image and its disks; refused while clones read
// them or clients are attached to them.
func (p *Plane) DeleteImage(ctx context.Context, name string) error {
	im, err := p.images()
	if err != nil {
		return err
	}
	img, err := im.GetImage(name)
	if err != nil {
		return p.imageError(name, err)
	}
	for _, d := range img.Disks {
		if n, where := p.clusterConnections(ctx, d.LU); n > 0 {
			return fmt.Errorf("%w: image disk %q has %d client connection(s) attached (%s); detach them first",
				api.ErrBusy, d.LU, n, strings.Join(where, ", "))
		}
	}
	if err := im.DeleteImage(ctx, name); err != nil {
		return p.imageError(name, err)
	}
	return p.opts.Replicas.Sync(ctx)
}

func (p *Plane) imageError(name string, err error) error {
	switch {
	case errors.Is(err, cluster.ErrImageNotFound):
		return fmt.Errorf("%w: no image named %q (see lupool image list)", api.ErrNotFound, name)
	case errors.Is(err, cluster.ErrHasClones):
		return fmt.Errorf("%w: %v", api.ErrBusy, err)
	}
	return p.APIError(err)
}

func (p *Plane) toAPIImage(img cluster.Image, lus []cluster.LU) api.Image {
	out := api.Image{Name: img.Name, State: img.State, Copies: img.Copies, CreatedAt: img.CreatedAt, Clones: []string{}}
	byName := map[string]cluster.LU{}
	for _, l := range lus {
		byName[l.Name] = l
	}
	for _, d := range img.Disks {
		disk := api.ImageDisk{LU: d.LU, SizeBytes: d.SizeBytes, Source: d.Source, SHA256: d.SHA256, SentBytes: d.SentBytes, Replicas: []api.Replica{}}
		if rec, ok := byName[d.LU]; ok {
			disk.Writer = rec.Writer
			for _, r := range rec.Replicas {
				disk.Replicas = append(disk.Replicas, api.Replica{Node: r.NodeID, State: r.State})
			}
		}
		if vol, ok := p.opts.Replicas.Volume(d.LU); ok {
			disk.AllocatedBytes = vol.AllocatedBytes()
		}
		out.Disks = append(out.Disks, disk)
		for _, l := range lus {
			if l.Base == d.LU {
				out.Clones = append(out.Clones, l.Name)
			}
		}
	}
	return out
}

// prepareClone fills a clone request from its base (IMAGE/N): the size
// (0 means the base's), kind file, and checks the image is ready.
func (p *Plane) prepareClone(req *api.CreateLURequest) (cluster.LU, error) {
	if _, _, ok := rules.SplitImageLU(req.From); !ok {
		return cluster.LU{}, fmt.Errorf("%w: --from %q: name an image disk, IMAGE/N (see lupool image list)", api.ErrInvalid, req.From)
	}
	base, err := p.opts.Metadata.GetLU(req.From)
	if errors.Is(err, cluster.ErrNotFound) {
		return cluster.LU{}, fmt.Errorf("%w: --from %q: no such image disk (see lupool image list)", api.ErrNotFound, req.From)
	}
	if err != nil {
		return cluster.LU{}, p.APIError(err)
	}
	if !base.ReadOnly {
		return cluster.LU{}, fmt.Errorf("%w: --from %q: image %s is still importing; finish it with lupool image import --resume", api.ErrInvalid, req.From, base.Image)
	}
	if req.SizeBytes == 0 {
		req.SizeBytes = base.SizeBytes
	}
	if req.SizeBytes < base.SizeBytes {
		return cluster.LU{}, fmt.Errorf("%w: a clone of %s needs at least %d bytes (its size)", api.ErrInvalid, req.From, base.SizeBytes)
	}
	if req.Kind != "" && req.Kind != string(lu.KindFile) {
		return cluster.LU{}, fmt.Errorf("%w: a linked clone is a file LU; drop --kind %s", api.ErrInvalid, req.Kind)
	}
	req.Kind = string(lu.KindFile)
	return base, nil
}

// placeClone puts a clone's copies on nodes that hold its base: every copy
// reads the image locally. The writer is the requested node when it holds
// the base, else the base's writer.
func placeClone(base cluster.LU, writer string, copies int) (string, []cluster.Replica, error) {
	if copies > len(base.Replicas) {
		return "", nil, fmt.Errorf("%w: image disk %s has %d copies, so a clone of it can have at most %d (every copy of a clone reads the image on its own node); import the image with --copies %d",
			api.ErrInvalid, base.Name, len(base.Replicas), len(base.Replicas), copies)
	}
	held := false
	for _, r := range base.Replicas {
		held = held || r.NodeID == writer
	}
	if !held {
		writer = base.Writer
	}
	out := []cluster.Replica{{NodeID: writer, State: cluster.ReplicaInSync}}
	for _, r := range base.Replicas {
		if len(out) == copies {
			break
		}
		if r.NodeID != writer {
			out = append(out, cluster.Replica{NodeID: r.NodeID, State: cluster.ReplicaInSync})
		}
	}
	return writer, out, nil
}

// FlattenLU copies a clone's base blocks into this node's copy while
// clients go on writing, then records that the clone no longer reads its
// base. Every other copy flattens its own volume when it sees the record
// (replication.Manager); the image cannot be deleted before they are done,
// as their pools refuse to delete a volume a clone still reads.
func (p *Plane) FlattenLU(ctx context.Context, name string) (api.LU, error) {
	im, err := p.images()
	if err != nil {
		return api.LU{}, err
	}
	rec, err := p.opts.Metadata.GetLU(name)
	if err != nil {
		if errors.Is(err, cluster.ErrNotFound) {
			return api.LU{}, notFound(name)
		}
		return api.LU{}, p.APIError(err)
	}
	if rec.Base == "" {
		return api.LU{}, fmt.Errorf("%w: LU %q is not a linked clone; nothing to flatten", api.ErrInvalid, name)
	}
	if vol, ok := p.opts.Replicas.Volume(name); ok {
		if o, ok := vol.(*lu.Overlay); ok {
			if err := o.Flatten(ctx); err != nil {
				return api.LU{}, fmt.Errorf("flatten %s: %w", name, err)
			}
		}
	}
	if err := im.FlattenLU(ctx, name); err != nil {
		return api.LU{}, p.APIError(err)
	}
	return p.afterChange(ctx, name)
}

var _ api.ImageBackend = (*Plane)(nil)
