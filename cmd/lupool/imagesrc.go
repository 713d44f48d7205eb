package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/server/nbdkernel"
	"github.com/lupool/lupool/server/nbdproto"
)

// An image source is a read-only blockdev.Device: a local raw file (its
// holes found with SEEK_DATA/SEEK_HOLE), a qcow2 or vmdk file (served by a
// `qemu-nbd --read-only` this process starts on a private socket), or any
// NBD server (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH).
type imageSource interface {
	blockdev.Device
	io.Closer
}

// Source formats found by sniffing a file's first bytes.
const (
	formatRaw   = "raw"
	formatQcow2 = "qcow2"
	formatVMDK  = "vmdk"
)

// sniffFormat tells a qcow2 or vmdk file from a raw one by its magic.
func sniffFormat(head []byte) string {
	switch {
	case bytes.HasPrefix(head, []byte("QFI\xfb")):
		return formatQcow2
	case bytes.HasPrefix(head, []byte("KDMV")), bytes.HasPrefix(head, []byte("# Disk DescriptorFile")):
		return formatVMDK
	}
	return formatRaw
}

// isNBDURI reports whether src names an NBD export rather than a file.
func isNBDURI(src string) bool {
	return strings.HasPrefix(src, "nbd://") || strings.HasPrefix(src, "nbd+unix://")
}

// checkSource says what is wrong with a source before anything is created.
func checkSource(src string) error {
	if isNBDURI(src) {
		_, _, _, err := parseNBDURI(src)
		return err
	}
	st, err := os.Stat(src)
	if err != nil {
		return fmt.Errorf("source %s: %w; give a raw, qcow2 or vmdk file, or an nbd:// URI", src, errors.Unwrap(err))
	}
	if !st.Mode().IsRegular() && st.Mode()&os.ModeDevice == 0 {
		return fmt.Errorf("source %s is not a file or block device", src)
	}
	return nil
}

// openSource opens src; work is a private directory for qemu-nbd's socket.
func openSource(ctx context.Context, src, work string) (imageSource, string, error) {
	if isNBDURI(src) {
		network, addr, export, err := parseNBDURI(src)
		if err != nil {
			return nil, "", err
		}
		s, err := dialNBDSource(ctx, network, addr, export)
		return s, "nbd", err
	}
	f, err := os.Open(src)
	if err != nil {
		return nil, "", fmt.Errorf("source %s: %w", src, err)
	}
	head := make([]byte, 32)
	n, _ := io.ReadFull(f, head)
	format := sniffFormat(head[:n])
	if format == formatRaw {
		s, err := newRawSource(f)
		return s, format, err
	}
	_ = f.Close()
	s, err := startQemuNBD(ctx, src, format, work)
	return s, format, err
}

// parseNBDURI splits nbd://HOST[:PORT]/EXPORT and
// nbd+unix:///EXPORT?socket=PATH into a network, address and export.
func parseNBDURI(s string) (network, addr, export string, err error) {
	u, err := url.Parse(s)
	if err != nil {
		return "", "", "", fmt.Errorf("source %s: %w", s, err)
	}
	export = strings.TrimPrefix(u.Path, "/")
	switch u.Scheme {
	case "nbd":
		if u.Host == "" {
			return "", "", "", fmt.Errorf("source %s: no host; use nbd://HOST[:PORT]/EXPORT", s)
		}
		addr = u.Host
		if u.Port() == "" {
			addr = net.JoinHostPort(u.Hostname(), "10809")
		}
		return "tcp", addr, export, nil
	case "nbd+unix":
		sock := u.Query().Get("socket")
		if sock == "" {
			return "", "", "", fmt.Errorf("source %s: no socket; use nbd+unix:///EXPORT?socket=PATH", s)
		}
		return "unix", sock, export, nil
	}
	return "", "", "", fmt.Errorf("source %s: scheme %q; use nbd:// or nbd+unix://", s, u.Scheme)
}

// rawSource is a local raw file or block device.
type rawSource struct {
	f    *os.File
	size int64
}

func newRawSource(f *os.File) (*rawSource, error) {
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		_ = f.Close()
		return nil, err
	}
	return &rawSource{f: f, size: size}, nil
}

var (
	_ blockdev.Device   = (*rawSource)(nil)
	_ blockdev.Extenter = (*rawSource)(nil)
)

func (r *rawSource) Size() int64                 { return r.size }
func (r *rawSource) Caps() blockdev.Caps         { return blockdev.Caps{ReadOnly: true} }
func (r *rawSource) Close() error                { return r.f.Close() }
func (r *rawSource) Flush(context.Context) error { return nil }

func (r *rawSource) ReadAt(_ context.Context, p []byte, off int64) error {
	_, err := r.f.ReadAt(p, off)
	if errors.Is(err, io.EOF) {
		return blockdev.ErrOutOfRange
	}
	return err
}

func (r *rawSource) WriteAt(context.Context, []byte, int64, blockdev.Flags) error {
	return blockdev.ErrReadOnly
}

// Extents reports the file's holes (SEEK_HOLE) as zero and the rest
// (SEEK_DATA) as data; a file system without them reports all data.
func (r *rawSource) Extents(_ context.Context, off, length int64, dst []blockdev.Extent) ([]blockdev.Extent, error) {
	end := min(off+length, r.size)
	fd := int(r.f.Fd())
	for pos := off; pos < end; {
		data, err := unix.Seek(fd, pos, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			data = end // nothing but a hole to the end
		} else if err != nil {
			return append(dst, blockdev.Extent{LengthBytes: end - pos}), nil
		}
		data = min(data, end)
		if data > pos {
			dst = append(dst, blockdev.Extent{LengthBytes: data - pos, Flags: blockdev.ExtentHole | blockdev.ExtentZero})
			pos = data
			continue
		}
		hole, err := unix.Seek(fd, pos, unix.SEEK_HOLE)
		if err != nil {
			hole = end
		}
		hole = min(hole, end)
		dst = append(dst, blockdev.Extent{LengthBytes: hole - pos})
		pos = hole
	}
	return dst, nil
}

// nbdSource reads an NBD export with one request at a time (simple
// replies, as nbdkernel.Negotiate sets up).
type nbdSource struct {
	mu     sync.Mutex
	conn   net.Conn
	size   int64
	handle uint64
	// stop ends a qemu-nbd this source started; nil otherwise.
	stop func() error
}

var _ blockdev.Device = (*nbdSource)(nil)

// nbdReadMaxBytes splits reads below every server's maximum.
const nbdReadMaxBytes = 1 << 20

func dialNBDSource(ctx context.Context, network, addr, export string) (*nbdSource, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, fmt.Errorf("source nbd %s %s: %w", network, addr, err)
	}
	c, info, err := nbdkernel.Negotiate(ctx, conn, export, nil)
	if err != nil {
		_ = conn.Close()
		return nil, fmt.Errorf("source nbd %s export %q: %w", addr, export, err)
	}
	return &nbdSource{conn: c, size: int64(info.SizeBytes)}, nil
}

func (s *nbdSource) Size() int64                 { return s.size }
func (s *nbdSource) Caps() blockdev.Caps         { return blockdev.Caps{ReadOnly: true} }
func (s *nbdSource) Flush(context.Context) error { return nil }

func (s *nbdSource) WriteAt(context.Context, []byte, int64, blockdev.Flags) error {
	return blockdev.ErrReadOnly
}

func (s *nbdSource) ReadAt(_ context.Context, p []byte, off int64) error {
	if err := blockdev.CheckRange(off, int64(len(p)), s.size); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for len(p) > 0 {
		n := min(len(p), nbdReadMaxBytes)
		s.handle++
		var req [nbdproto.RequestSize]byte
		nbdproto.PutRequest(req[:], nbdproto.Request{Type: nbdproto.CmdRead, Handle: s.handle, Offset: uint64(off), Length: uint32(n)})
		if _, err := s.conn.Write(req[:]); err != nil {
			return fmt.Errorf("source: send read: %w", err)
		}
		var hdr [nbdproto.SimpleReplySize]byte
		if _, err := io.ReadFull(s.conn, hdr[:]); err != nil {
			return fmt.Errorf("source: read reply: %w", err)
		}
		rep, err := nbdproto.ParseSimpleReply(hdr[:])
		if err != nil {
			return fmt.Errorf("source: reply: %w", err)
		}
		if rep.Handle != s.handle {
			return fmt.Errorf("source: reply for handle %d, sent %d: %w", rep.Handle, s.handle, blockdev.ErrIO)
		}
		if rep.Error != 0 {
			return fmt.Errorf("source: read at %d: NBD error %d: %w", off, rep.Error, blockdev.ErrIO)
		}
		if _, err := io.ReadFull(s.conn, p[:n]); err != nil {
			return fmt.Errorf("source: read data: %w", err)
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

func (s *nbdSource) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var req [nbdproto.RequestSize]byte
	nbdproto.PutRequest(req[:], nbdproto.Request{Type: nbdproto.CmdDisc})
	_, _ = s.conn.Write(req[:])
	err := s.conn.Close()
	if s.stop != nil {
		err = errors.Join(err, s.stop())
	}
	return err
}

// startQemuNBD serves a qcow2 or vmdk file read-only on a socket in work
// and connects to it.
func startQemuNBD(ctx context.Context, path, format, work string) (*nbdSource, error) {
	bin, err := exec.LookPath("qemu-nbd")
	if err != nil {
		return nil, fmt.Errorf("source %s is %s: reading it needs qemu-nbd (Debian: apt-get install qemu-utils), or convert it to raw first (qemu-img convert -O raw)", path, format)
	}
	sock := filepath.Join(work, fmt.Sprintf("src-%d.sock", time.Now().UnixNano()))
	cmd := exec.Command(bin, "--read-only", "--format="+format, "--socket="+sock, "--persistent", "--shared=1", path)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("source %s: start qemu-nbd: %w", path, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	stop := func() error {
		_ = cmd.Process.Kill()
		<-exited
		_ = os.Remove(sock)
		return nil
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		s, err := dialNBDSource(ctx, "unix", sock, "")
		if err == nil {
			s.stop = stop
			return s, nil
		}
		select {
		case werr := <-exited:
			exited <- werr
			_ = stop()
			return nil, fmt.Errorf("source %s: qemu-nbd exited (%v): %s", path, werr, strings.TrimSpace(stderr.String()))
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			_ = stop()
			return nil, fmt.Errorf("source %s: qemu-nbd did not answer in 10 s: %v", path, err)
		}
	}
}
