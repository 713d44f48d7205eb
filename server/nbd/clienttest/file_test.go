package clienttest

// The same clients against a sparse-file volume from package lu, the device
// lupool serves in production. (Test-only import: the server layer itself
// never imports lu.)

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lupool/lupool/lu"
	"github.com/lupool/lupool/server/nbd"
)

// startFile serves a new sparse-file volume as export "file" and returns
// the server and the file's path.
func startFile(t *testing.T, sizeBytes int64) (*server, *lu.FileVolume, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "volume.img")
	vol, err := lu.CreateFile(path, sizeBytes)
	if err != nil {
		t.Fatalf("lu.CreateFile: %v", err)
	}
	// Registered before the server so that it runs after Shutdown.
	t.Cleanup(func() {
		if err := vol.Close(); err != nil {
			t.Errorf("close volume: %v", err)
		}
	})
	srv := startServer(t, serverConfig{exports: []nbd.Export{{Name: "file", Description: "sparse file", Device: vol}}})
	return srv, vol, path
}

// TestFileNbdsh runs the command script against a file volume with
// structured replies on and off and checks the bytes in the file.
func TestFileNbdsh(t *testing.T) {
	for _, sr := range []string{"1", "0"} {
		t.Run("structured="+sr, func(t *testing.T) {
			srv, vol, path := startFile(t, 40*miB)
			runNbdsh(t, "commands.py", "NBD_URI="+srv.uri("file"), "NBD_SR="+sr)
			if err := vol.Flush(t.Context()); err != nil {
				t.Fatal(err)
			}
			got, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got[:64*kiB], pattern(64*kiB, 1)) {
				t.Error("file bytes [0, 64K) differ from what the client wrote")
			}
			if !bytes.Equal(got[1*miB:4*miB], make([]byte, 3*miB)) {
				t.Error("trimmed and zeroed ranges [1M, 4M) are not zero in the file")
			}
			if !bytes.Equal(got[7*miB:7*miB+4*kiB], pattern(4*kiB, 0)) {
				t.Error("aio write missing from the file")
			}
		})
	}
}

// TestFileErrors checks error codes and connection survival over a file.
func TestFileErrors(t *testing.T) {
	srv, _, _ := startFile(t, 8*miB)
	runNbdsh(t, "errors.py", "NBD_URI="+srv.uri("file"), "NBD_SR=1")
}

// TestFileNbdcopyAndMap copies a random image with a hole into the file
// volume and out again, then checks nbdinfo --map sees the hole after a
// trim.
func TestFileNbdcopyAndMap(t *testing.T) {
	size := int64(64 * miB)
	if testing.Short() {
		size = 16 * miB
	}
	srv, vol, path := startFile(t, size)
	dir := t.TempDir()
	src := filepath.Join(dir, "src.img")
	data := make([]byte, size)
	if _, err := rand.Read(data); err != nil {
		t.Fatal(err)
	}
	clear(data[size/4 : size/2])
	if err := os.WriteFile(src, data, 0o600); err != nil {
		t.Fatal(err)
	}
	want := sha256.Sum256(data)
	mustRun(t, "nbdcopy", "--flush", src, srv.uri("file"))
	onDisk, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if sha256.Sum256(onDisk) != want {
		t.Fatal("file checksum differs from the source after nbdcopy in")
	}
	dst := filepath.Join(dir, "dst.img")
	mustRun(t, "nbdcopy", srv.uri("file"), dst)
	back, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	if sha256.Sum256(back) != want {
		t.Error("checksum of the image copied out of the file volume differs")
	}

	// Punch the first MiB and check the map.
	mustRun(t, "qemu-io", "-f", "raw", srv.uri("file"), "-c", "discard 0 1M")
	out := mustRun(t, "nbdinfo", "--map", "--json", srv.uri("file"))
	var m []mapEntry
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("nbdinfo --map: %v\n%s", err, out)
	}
	m = mergeMap(m)
	if len(m) == 0 || m[0].Offset != 0 || m[0].Type&1 == 0 || m[0].Length < miB {
		t.Errorf("map after discarding [0, 1M): %v, want a hole first", m)
	}
	if last := m[len(m)-1]; last.Offset+last.Length != size {
		t.Errorf("map ends at %d, want %d", last.Offset+last.Length, size)
	}
	if alloc := vol.AllocatedBytes(); alloc > size-miB {
		t.Errorf("file allocates %d bytes after the punch, want <= %d", alloc, size-miB)
	}
}

// TestFileFio writes and verifies with fio at iodepth 32 on a file volume.
func TestFileFio(t *testing.T) {
	size := 16 * miB
	if testing.Short() {
		size = 4 * miB
	}
	srv, _, _ := startFile(t, int64(size))
	r := runFio(t, srv.uri("file"), "--name=filew", "--rw=randwrite", "--bs=4k", "--iodepth=32",
		fmt.Sprintf("--size=%d", size), "--verify=crc32c", "--verify_state_save=0", "--do_verify=1", "--randseed=3")
	if j := r.Jobs[0]; j.Write.IOBytes != int64(size) || j.Read.IOBytes != int64(size) {
		t.Errorf("fio wrote %d and verified %d bytes, want %d", j.Write.IOBytes, j.Read.IOBytes, size)
	}
}

// TestFileQemuAndNbdinfo runs the tools TestNbdinfo, TestQemuImg and
// TestQemuIO run over memory, against a sparse-file volume: nbdinfo's
// flags, qemu-img info/convert/compare (including a byte changed in the
// file behind the server's back), qemu-io patterns, and nbd-client -l.
func TestFileQemuAndNbdinfo(t *testing.T) {
	const size = 8 * miB
	srv, vol, path := startFile(t, size)
	uri := srv.uri("file")

	info := parseNbdinfo(t, mustRun(t, "nbdinfo", "--json", uri))
	if len(info.Exports) != 1 {
		t.Fatalf("nbdinfo listed %d exports, want 1", len(info.Exports))
	}
	e := info.Exports[0]
	if e.SizeBytes != size || e.ReadOnly || !e.CanFlush || !e.CanFUA || !e.CanTrim || !e.CanZero ||
		e.CanMultiConn != vol.Caps().MultiConn {
		t.Errorf("file export: %+v", e)
	}
	if out := mustRun(t, "nbd-client", "-l", "127.0.0.1", srv.port); !strings.Contains(out, "file: sparse file") {
		t.Errorf("nbd-client -l output lacks the file export:\n%s", out)
	}

	src := filepath.Join(t.TempDir(), "src.img")
	data := make([]byte, size)
	if _, err := rand.Read(data[:5*miB]); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(src, data, 0o600); err != nil {
		t.Fatal(err)
	}
	var qi struct {
		VirtualSize int64 `json:"virtual-size"`
	}
	if err := json.Unmarshal([]byte(mustRun(t, "qemu-img", "info", "--output=json", uri)), &qi); err != nil || qi.VirtualSize != size {
		t.Errorf("qemu-img info: size %d (%v), want %d", qi.VirtualSize, err, size)
	}
	mustRun(t, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, uri)
	if err := vol.Flush(t.Context()); err != nil {
		t.Fatal(err)
	}
	onDisk, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if sha256.Sum256(onDisk) != sha256.Sum256(data) {
		t.Fatal("file differs from the image qemu-img convert wrote")
	}
	mustRun(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri)
	// Change one byte in the file itself: compare through the server must fail.
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{data[3*miB+11] ^ 0xff}, 3*miB+11); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if r := runTool(t, nil, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri); r.err == nil {
		t.Errorf("qemu-img compare missed a byte changed in the file:\n%s", r.stdout)
	}

	out := mustRun(t, "qemu-io", "-f", "raw", uri,
		"-c", "write -P 0x3c 6M 64k",
		"-c", "write -f -P 0x4d 7M 128k",
		"-c", "write -z 7M 32k",
		"-c", "read -P 0x3c 6M 64k",
		"-c", "read -P 0 7M 32k",
		"-c", "read -P 0x4d 7200k 96k",
		"-c", "flush")
	if strings.Contains(out, "Pattern verification failed") {
		t.Fatalf("qemu-io pattern verification failed:\n%s", out)
	}
	if out := runTool(t, nil, "qemu-io", "-f", "raw", uri, "-c", "read -P 0x3c 7M 4k").stdout; !strings.Contains(out, "Pattern verification failed") {
		t.Errorf("qemu-io did not report a wrong pattern:\n%s", out)
	}
	onDisk, err = os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(onDisk[6*miB:6*miB+64*kiB], bytes.Repeat([]byte{0x3c}, 64*kiB)) ||
		!bytes.Equal(onDisk[7*miB:7*miB+32*kiB], make([]byte, 32*kiB)) ||
		!bytes.Equal(onDisk[7*miB+32*kiB:7*miB+128*kiB], bytes.Repeat([]byte{0x4d}, 96*kiB)) {
		t.Error("file bytes differ from what qemu-io wrote")
	}
}
