package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/blockdev/blockcopy"
	"github.com/lupool/lupool/internal/rules"
	"github.com/lupool/lupool/internal/units"
	"github.com/lupool/lupool/replication/ec"
	"github.com/lupool/lupool/server/api"
	"github.com/lupool/lupool/server/endpoint"
)

// newImageCommand is `lupool image`: import, list, show, delete.
//
// The data of an import flows from this process: it reads each source
// (a raw file with its holes skipped, a qcow2/vmdk file through a private
// read-only qemu-nbd, or an NBD export) and writes the blocks that are not
// zeros over NBD to the disk's LU on its writer node, hashing the source
// on the way (package blockcopy). The node the CLI asks to record the image
// ready (the disks' writer, where the image was created) hashes its stored
// copy first and refuses a mismatch; the leader, if another node, does the
// same when it holds a copy. This works from any host
// that reaches the pool, and across nodes.
func newImageCommand(cf *clientFlags, stdout, stderr io.Writer) *cobra.Command {
	var (
		copies int
		resume bool
		rate   string
		ecFlag string
	)
	call := func(c *cobra.Command, fn func(ctx context.Context, cl *api.Client) error) error {
		return cf.call(c, luTimeout, fn)
	}
	importCmd := &cobra.Command{
		Use:   "import NAME SOURCE...",
		Short: "import disk files or NBD exports as a read-only image: one LU NAME/0, NAME/1, ... per source",
		Long: `Import an image: one read-only LU per source, named NAME/0, NAME/1, ...
in source order and exported over NBD under that name. A source is a raw
file, a qcow2 or vmdk file (read through qemu-nbd), or an NBD URI
(nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH). Holes and
all-zero blocks are neither sent nor allocated. The content is hashed on
the way in and checked against the stored copy before the image is ready.
An interrupted import stays "importing": run it again with --resume, or
remove it with lupool image delete NAME. Clone disks from it with
lupool lu create VM --from NAME/0.`,
		Example: "  lupool image import debian12 debian12.raw\n  lupool image import win2k22 system.qcow2 data.vmdk --copies 2\n  lupool image import base nbd://otherhost/disk0",
		Args: func(_ *cobra.Command, args []string) error {
			if len(args) < 2 {
				return usageErrorf("image import needs a name and at least one source, e.g. lupool image import debian12 debian12.raw")
			}
			return nil
		},
		RunE: func(c *cobra.Command, args []string) error {
			var rateBytes int64
			if rate != "" {
				n, err := units.ParseSize(rate)
				if err != nil || n <= 0 {
					return usageErrorf("--rate %q: give bytes per second with a unit, e.g. 100M", rate)
				}
				rateBytes = n
			}
			g, err := parseECFlag(ecFlag)
			if err != nil {
				return err
			}
			return runImageImport(c.Context(), cf, importArgs{name: args[0], sources: args[1:], copies: copies, resume: resume, rateBytes: rateBytes, ec: g}, stdout, stderr)
		},
	}
	importCmd.Flags().IntVar(&copies, "copies", 1, "synchronous copies of each disk on distinct nodes (a clone's copies need the image on their nodes)")
	importCmd.Flags().BoolVar(&resume, "resume", false, "finish an interrupted import of NAME from the same sources")
	importCmd.Flags().StringVar(&rate, "rate", "", "limit the import to this many bytes per second sent (e.g. 100M)")
	importCmd.Flags().StringVar(&ecFlag, "ec", "", "erasure-code the image once imported: K data + M parity shards per stripe on K+M nodes, e.g. 2+1 (see image convert)")

	list := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "list images with state, disks, size and clones",
		Args:    exactArgs(0, "image list takes no arguments"),
		RunE: func(c *cobra.Command, _ []string) error {
			return call(c, func(ctx context.Context, cl *api.Client) error {
				imgs, err := cl.ListImages(ctx)
				if err != nil {
					return err
				}
				return printImages(stdout, cf.output, imgs, false)
			})
		},
	}
	show := &cobra.Command{
		Use:   "show NAME",
		Short: "show an image: each disk's LU, size, allocation, content hash, and the clones",
		Args:  exactArgs(1, "image show needs exactly one image name"),
		RunE: func(c *cobra.Command, args []string) error {
			return call(c, func(ctx context.Context, cl *api.Client) error {
				img, err := cl.GetImage(ctx, args[0])
				if err != nil {
					return err
				}
				return printImages(stdout, cf.output, []api.Image{img}, true)
			})
		},
	}
	del := &cobra.Command{
		Use:     "delete NAME",
		Aliases: []string{"rm"},
		Short:   "delete an image and its disks; refused while linked clones read it",
		Args:    exactArgs(1, "image delete needs exactly one image name"),
		RunE: func(c *cobra.Command, args []string) error {
			return call(c, func(ctx context.Context, cl *api.Client) error {
				if err := cl.DeleteImage(ctx, args[0]); err != nil {
					return err
				}
				if cf.output == "json" {
					return printJSON(stdout, map[string]string{"deleted": args[0]})
				}
				fmt.Fprintf(stdout, "deleted image %s\n", args[0])
				return nil
			})
		},
	}
	subs := append([]*cobra.Command{importCmd, list, show, del}, newImageECCommands(cf, stdout)...)
	return newGroupCommand("image", "read-only images to clone disks from", "admin", subs...)
}

type importArgs struct {
	name      string
	sources   []string
	copies    int
	resume    bool
	rateBytes int64
	// ec, when set, converts the image once it is ready.
	ec ec.Geometry
}

// runImageImport checks everything it can before it creates anything:
// the name, the copy count, and that every source opens.
func runImageImport(ctx context.Context, cf *clientFlags, a importArgs, stdout, stderr io.Writer) error {
	if err := rules.ImageName(a.name); err != nil {
		return usageErrorf("image name %q: %v", a.name, err)
	}
	if len(a.sources) > rules.ImageDisksMax {
		return usageErrorf("%d sources: an image has at most %d disks", len(a.sources), rules.ImageDisksMax)
	}
	if err := rules.Copies(a.copies); err != nil {
		return usageErrorf("--copies %v, got %d", err, a.copies)
	}
	for _, s := range a.sources {
		if err := checkSource(s); err != nil {
			return usageErrorf("%v", err)
		}
	}
	work, err := os.MkdirTemp("", "lupool-import-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	srcs := make([]imageSource, 0, len(a.sources))
	defer func() {
		for _, s := range srcs {
			_ = s.Close()
		}
	}()
	req := api.CreateImageRequest{Name: a.name, Copies: a.copies}
	for _, s := range a.sources {
		src, _, err := openSource(ctx, s, work)
		if err != nil {
			return err
		}
		srcs = append(srcs, src)
		if src.Size() == 0 {
			return usageErrorf("source %s is empty", s)
		}
		req.Disks = append(req.Disks, api.ImageDiskRequest{SizeBytes: src.Size(), Source: s})
	}
	cl, err := cf.client()
	if err != nil {
		return err
	}
	if a.ec.K > 0 {
		if err := checkECNodes(ctx, cl, a.ec); err != nil {
			return err
		}
	}
	img, err := startImport(ctx, cl, a, req)
	if err != nil {
		return err
	}
	ns, err := newNodeSource(cf)
	if err != nil {
		return err
	}
	ready := api.ImageReadyRequest{}
	for i, disk := range img.Disks {
		var startBytes int64
		if a.resume {
			if startBytes, err = resumePoint(ctx, cl, disk.LU, srcs[i]); err != nil {
				return fmt.Errorf("resume %s: %w", disk.LU, err)
			}
			if cf.output != "json" {
				fmt.Fprintf(stderr, "%s: the first %s are there already; copying the rest\n", disk.LU, units.Format(startBytes))
			}
		}
		st, err := importDisk(ctx, ns, disk, srcs[i], startBytes, a, cf.output, stderr)
		if err != nil {
			return fmt.Errorf("import %s into %s: %w; the image stays importing: run the same command with --resume, or lupool image delete %s",
				a.sources[i], disk.LU, err, a.name)
		}
		ready.Disks = append(ready.Disks, api.ImageDiskHash{SHA256: hex.EncodeToString(st.Hash[:]), SentBytes: st.SentBytes, SourceBytes: st.SizeBytes})
	}
	img, err = cl.ImageReady(ctx, a.name, ready)
	if err != nil {
		return err
	}
	if a.ec.K > 0 {
		if img, err = cl.ConvertImage(ctx, a.name, api.ConvertImageRequest{K: a.ec.K, M: a.ec.M}); err != nil {
			return fmt.Errorf("%w; the image was imported mirrored: convert it with lupool image convert %s --ec %s", err, a.name, a.ec)
		}
	}
	return printImages(stdout, cf.output, []api.Image{img}, true)
}

// startImport records the image, or with --resume finds it importing
// with disks that match the sources.
func startImport(ctx context.Context, cl *api.Client, a importArgs, req api.CreateImageRequest) (api.Image, error) {
	if !a.resume {
		return cl.CreateImage(ctx, req)
	}
	img, err := cl.GetImage(ctx, a.name)
	if err != nil {
		return api.Image{}, err
	}
	if img.State != "importing" {
		return api.Image{}, fmt.Errorf("image %s is %s; --resume finishes an interrupted import only", a.name, img.State)
	}
	if len(img.Disks) != len(req.Disks) {
		return api.Image{}, usageErrorf("image %s has %d disks; give the same %d sources as the first import", a.name, len(img.Disks), len(img.Disks))
	}
	for i, d := range req.Disks {
		size, _, _ := rules.RoundSize(d.SizeBytes)
		if img.Disks[i].SizeBytes != size {
			return api.Image{}, usageErrorf("source %s is %d bytes; disk %s of the interrupted import is %d: give the same sources in the same order",
				d.Source, d.SizeBytes, img.Disks[i].LU, img.Disks[i].SizeBytes)
		}
	}
	return img, nil
}

// importDisk copies one source into its disk's LU over NBD, writing from
// startBytes on (a resumed import; the prefix is read again for the hash).
func importDisk(ctx context.Context, ns *nodeSource, disk api.ImageDisk, src imageSource, startBytes int64, a importArgs, output string, stderr io.Writer) (blockcopy.Stats, error) {
	dst, err := endpoint.New(ctx, endpoint.Options{
		Export:    disk.LU,
		Nodes:     ns.nodes,
		Prefer:    func(n endpoint.Node) bool { return n.ID == disk.Writer },
		TLSConfig: ns.tlsConfig,
		GiveUp:    time.Minute,
	})
	if err != nil {
		return blockcopy.Stats{}, err
	}
	defer dst.Close()
	var bar *progressbar.ProgressBar
	if f, ok := stderr.(*os.File); ok && output != "json" && term.IsTerminal(int(f.Fd())) {
		bar = progressbar.NewOptions64(src.Size(),
			progressbar.OptionSetWriter(stderr),
			progressbar.OptionSetDescription(disk.LU),
			progressbar.OptionShowBytes(true),
			progressbar.OptionShowCount(),
			progressbar.OptionSetPredictTime(true),
			progressbar.OptionThrottle(100*time.Millisecond),
			progressbar.OptionOnCompletion(func() { fmt.Fprintln(stderr) }),
		)
	}
	start := time.Now()
	st, err := blockcopy.Copy(ctx, dst, src, blockcopy.Options{StartBytes: startBytes, Progress: func(doneBytes, sentBytes int64) {
		if bar != nil {
			_ = bar.Set64(doneBytes)
		}
		if a.rateBytes > 0 {
			due := start.Add(time.Duration(float64(sentBytes) / float64(a.rateBytes) * float64(time.Second)))
			if wait := time.Until(due); wait > 0 {
				time.Sleep(wait)
			}
		}
	}})
	if bar != nil {
		_ = bar.Finish()
	}
	return st, err
}

func printImages(w io.Writer, output string, imgs []api.Image, single bool) error {
	if output == "json" {
		if single && len(imgs) == 1 {
			return printJSON(w, imgs[0])
		}
		if imgs == nil {
			imgs = []api.Image{}
		}
		return printJSON(w, imgs)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "IMAGE\tSTATE\tDISKS\tSIZE\tALLOCATED\tCOPIES\tCLONES")
	for _, img := range imgs {
		var size, alloc int64
		for _, d := range img.Disks {
			size += d.SizeBytes
			alloc += d.AllocatedBytes
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%d\t%d\n", img.Name, img.State, len(img.Disks), units.Format(size), units.Format(alloc), img.Copies, len(img.Clones))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if !single || len(imgs) != 1 {
		return nil
	}
	img := imgs[0]
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "\nDISK\tSIZE\tALLOCATED\tSENT\tSHA256\tSOURCE")
	for _, d := range img.Disks {
		hash := d.SHA256
		if hash == "" {
			hash = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", d.LU, units.Format(d.SizeBytes), units.Format(d.AllocatedBytes), units.Format(d.SentBytes), hash, d.Source)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(img.Clones) > 0 {
		fmt.Fprintf(w, "\nclones: %s\n", strings.Join(img.Clones, ", "))
	}
	printImageEC(w, img.EC)
	return nil
}

// resumeRegionBytes is the unit a resumed import compares in.
const resumeRegionBytes = 1 << 20

// resumePoint finds where an interrupted import of src into lu stopped:
// the first 1 MiB region, from the start, whose hash on the disk's copy
// (the API node's, GET /v1/lus/NAME/hashes) differs from the source's. An
// import writes in order, so everything before it is there.
func resumePoint(ctx context.Context, cl *api.Client, lu string, src imageSource) (int64, error) {
	size := src.Size()
	buf := make([]byte, resumeRegionBytes)
	zero := sha256.Sum256(buf)
	ext, _ := src.(interface {
		Extents(ctx context.Context, off, length int64, dst []blockdev.Extent) ([]blockdev.Extent, error)
	})
	for off := int64(0); off < size; {
		count := int(min(4096, (size-off+resumeRegionBytes-1)/resumeRegionBytes))
		got, err := cl.RegionHashes(ctx, lu, off, resumeRegionBytes, count)
		if err != nil {
			return 0, err
		}
		for _, h := range got.Hashes {
			n := min(resumeRegionBytes, size-off)
			want := zero
			hole := false
			if ext != nil && n == resumeRegionBytes {
				e, err := ext.Extents(ctx, off, n, nil)
				hole = err == nil && len(e) == 1 && e[0].LengthBytes >= n && e[0].Flags&blockdev.ExtentZero != 0
			}
			if !hole {
				if err := src.ReadAt(ctx, buf[:n], off); err != nil {
					return 0, err
				}
				want = sha256.Sum256(buf[:n])
			}
			if n < resumeRegionBytes {
				// The disk's last region runs to its size, rounded up to
				// 512 bytes past the source's: zeros the source lacks.
				return off, nil
			}
			if hex.EncodeToString(want[:]) != h {
				return off, nil
			}
			off += n
		}
		if len(got.Hashes) == 0 {
			return off, nil
		}
	}
	return size, nil
}
