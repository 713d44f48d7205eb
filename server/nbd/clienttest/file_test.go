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
