package clienttest

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/server/nbd"
)

// nbdinfoJSON is the part of `nbdinfo --json` the tests check.
type nbdinfoJSON struct {
	Protocol   string `json:"protocol"`
	TLS        bool   `json:"TLS"`
	Structured bool   `json:"structured"`
	Exports    []struct {
		Name          string   `json:"export-name"`
		Description   string   `json:"description"`
		Contexts      []string `json:"contexts"`
		ReadOnly      bool     `json:"is_read_only"`
		CanCache      bool     `json:"can_cache"`
		CanDF         bool     `json:"can_df"`
		CanFastZero   bool     `json:"can_fast_zero"`
		CanFlush      bool     `json:"can_flush"`
		CanFUA        bool     `json:"can_fua"`
		CanMultiConn  bool     `json:"can_multi_conn"`
		CanTrim       bool     `json:"can_trim"`
		CanZero       bool     `json:"can_zero"`
		SizeBytes     int64    `json:"export-size"`
		BlockMinimum  int64    `json:"block_size_minimum"`
		BlockPrefered int64    `json:"block_size_preferred"`
		BlockMaximum  int64    `json:"block_size_maximum"`
	} `json:"exports"`
}

func parseNbdinfo(t *testing.T, out string) nbdinfoJSON {
	t.Helper()
	var info nbdinfoJSON
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("nbdinfo --json output: %v\n%s", err, out)
	}
	return info
}

// TestNbdinfo checks what nbdinfo --json reports for writable, read-only and
// multi-conn exports, and that an unknown export fails.
func TestNbdinfo(t *testing.T) {
	rw, _ := memExport("rw", 16*miB, blockdev.Caps{})
	ro, _ := memExport("ro", 8*miB, blockdev.Caps{ReadOnly: true})
	mc, _ := memExport("mc", 4*miB, blockdev.Caps{MultiConn: true})
	srv := startServer(t, serverConfig{exports: []nbd.Export{rw, ro, mc}})

	info := parseNbdinfo(t, mustRun(t, "nbdinfo", "--json", srv.uri("rw")))
	if info.Protocol != "newstyle-fixed" || !info.Structured || info.TLS {
		t.Errorf("protocol %q structured %v TLS %v, want newstyle-fixed, true, false", info.Protocol, info.Structured, info.TLS)
	}
	if len(info.Exports) != 1 {
		t.Fatalf("nbdinfo listed %d exports, want 1", len(info.Exports))
	}
	e := info.Exports[0]
	if e.Name != "rw" || e.Description != rw.Description || e.SizeBytes != 16*miB {
		t.Errorf("export %q %q size %d, want rw %q %d", e.Name, e.Description, e.SizeBytes, rw.Description, 16*miB)
	}
	if e.ReadOnly || !e.CanFlush || !e.CanFUA || !e.CanTrim || !e.CanZero || !e.CanFastZero || !e.CanCache || !e.CanDF {
		t.Errorf("writable export flags: %+v", e)
	}
	if e.CanMultiConn {
		t.Error("CAN_MULTI_CONN advertised for a device without MultiConn")
	}
	if fmt.Sprint(e.Contexts) != "[base:allocation]" {
		t.Errorf("contexts %v, want [base:allocation]", e.Contexts)
	}
	if (e.BlockMinimum != 1 && e.BlockMinimum != 512) || e.BlockPrefered != 4096 || e.BlockMaximum != 32*miB {
		t.Errorf("block sizes %d/%d/%d, want 1 or 512/4096/32M", e.BlockMinimum, e.BlockPrefered, e.BlockMaximum)
	}

	info = parseNbdinfo(t, mustRun(t, "nbdinfo", "--json", srv.uri("ro")))
	if e := info.Exports[0]; !e.ReadOnly || e.SizeBytes != 8*miB {
		t.Errorf("read-only export: read-only %v size %d", e.ReadOnly, e.SizeBytes)
	}
	info = parseNbdinfo(t, mustRun(t, "nbdinfo", "--json", srv.uri("mc")))
	if e := info.Exports[0]; !e.CanMultiConn {
		t.Error("CAN_MULTI_CONN not advertised for a MultiConn device")
	}

	if r := runTool(t, nil, "nbdinfo", srv.uri("nosuch")); r.err == nil {
		t.Errorf("nbdinfo of an unknown export succeeded:\n%s", r.stdout)
	}
	// The server keeps serving after the refused client.
	mustRun(t, "nbdinfo", "--size", srv.uri("rw"))
}

// TestNbdinfoList checks nbdinfo --list and nbd-client -l against the
// exports and their descriptions.
func TestNbdinfoList(t *testing.T) {
	a, _ := memExport("alpha", 1*miB, blockdev.Caps{})
	b, _ := memExport("beta", 2*miB, blockdev.Caps{ReadOnly: true})
	srv := startServer(t, serverConfig{exports: []nbd.Export{a, b}})

	info := parseNbdinfo(t, mustRun(t, "nbdinfo", "--list", "--json", "nbd://"+srv.addr))
	got := map[string]string{}
	sizes := map[string]int64{}
	for _, e := range info.Exports {
		got[e.Name] = e.Description
		sizes[e.Name] = e.SizeBytes
	}
	want := map[string]string{"alpha": a.Description, "beta": b.Description}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("nbdinfo --list: %v, want %v", got, want)
	}
	if sizes["alpha"] != 1*miB || sizes["beta"] != 2*miB {
		t.Errorf("nbdinfo --list sizes %v", sizes)
	}

	t.Run("nbd-client", func(t *testing.T) {
		out := mustRun(t, "nbd-client", "-l", "127.0.0.1", srv.port)
		for _, e := range []nbd.Export{a, b} {
			if !strings.Contains(out, e.Name+": "+e.Description) {
				t.Errorf("nbd-client -l output lacks %q:\n%s", e.Name+": "+e.Description, out)
			}
		}
	})
}

// mapEntry is one line of nbdinfo --map --json.
type mapEntry struct {
	Offset int64 `json:"offset"`
	Length int64 `json:"length"`
	Type   int   `json:"type"`
}

// TestNbdinfoMap writes a known allocation layout on the device and checks
// nbdinfo --map reports it.
func TestNbdinfoMap(t *testing.T) {
	srv, dev := startMem(t, 16*miB, blockdev.Caps{})
	ctx := context.Background()
	if err := dev.WriteAt(ctx, bytes.Repeat([]byte{1}, 64*kiB), 1*miB, 0); err != nil {
		t.Fatal(err)
	}
	if err := dev.WriteAt(ctx, bytes.Repeat([]byte{2}, 3*miB), 8*miB, 0); err != nil {
		t.Fatal(err)
	}
	if err := dev.Trim(ctx, 9*miB, miB, 0); err != nil {
		t.Fatal(err)
	}
	out := mustRun(t, "nbdinfo", "--map", "--json", srv.uri("mem"))
	var got []mapEntry
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("nbdinfo --map output: %v\n%s", err, out)
	}
	got = mergeMap(got)
	const hole = 3 // hole|zero
	want := []mapEntry{
		{0, 1 * miB, hole},
		{1 * miB, 64 * kiB, 0},
		{1*miB + 64*kiB, 7*miB - 64*kiB, hole},
		{8 * miB, 1 * miB, 0},
		{9 * miB, 1 * miB, hole},
		{10 * miB, 1 * miB, 0},
		{11 * miB, 5 * miB, hole},
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("nbdinfo --map:\n got %v\nwant %v", got, want)
	}

	// qemu's NBD client reads the same map through its own block status code.
	t.Run("qemu-img map", func(t *testing.T) {
		out := mustRun(t, "qemu-img", "map", "--output=json", "-f", "raw", srv.uri("mem"))
		var qm []struct {
			Start  int64 `json:"start"`
			Length int64 `json:"length"`
			Data   bool  `json:"data"`
		}
		if err := json.Unmarshal([]byte(out), &qm); err != nil {
			t.Fatalf("qemu-img map: %v\n%s", err, out)
		}
		var data []mapEntry
		for _, e := range qm {
			if e.Data {
				data = append(data, mapEntry{Offset: e.Start, Length: e.Length})
			}
		}
		data = mergeMap(data)
		wantData := []mapEntry{{1 * miB, 64 * kiB, 0}, {8 * miB, 1 * miB, 0}, {10 * miB, 1 * miB, 0}}
		if fmt.Sprint(data) != fmt.Sprint(wantData) {
			t.Errorf("qemu-img map data ranges %v, want %v", data, wantData)
		}
	})
}

// mergeMap joins adjacent entries of the same type: a server may split the
// answer anywhere.
func mergeMap(in []mapEntry) []mapEntry {
	var out []mapEntry
	for _, e := range in {
		if n := len(out); n > 0 && out[n-1].Type == e.Type && out[n-1].Offset+out[n-1].Length == e.Offset {
			out[n-1].Length += e.Length
			continue
		}
		out = append(out, e)
	}
	return out
}

// TestQemuImg runs qemu-img info, convert in and out, and compare, and
// checks that compare notices a one-byte difference.
func TestQemuImg(t *testing.T) {
	const size = 8 * miB
	srv, dev := startMem(t, size, blockdev.Caps{})
	dir := t.TempDir()
	src := filepath.Join(dir, "src.img")
	data := make([]byte, size)
	if _, err := rand.Read(data[:6*miB]); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(src, data, 0o600); err != nil {
		t.Fatal(err)
	}

	var info struct {
		VirtualSize int64  `json:"virtual-size"`
		Format      string `json:"format"`
	}
	out := mustRun(t, "qemu-img", "info", "--output=json", srv.uri("mem"))
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("qemu-img info: %v\n%s", err, out)
	}
	if info.VirtualSize != size || info.Format != "raw" {
		t.Errorf("qemu-img info: size %d format %q, want %d raw", info.VirtualSize, info.Format, size)
	}

	mustRun(t, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, srv.uri("mem"))
	if !bytes.Equal(dev.Bytes(), data) {
		t.Fatal("device differs from the image qemu-img convert wrote")
	}
	mustRun(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, srv.uri("mem"))

	dst := filepath.Join(dir, "dst.img")
	mustRun(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri("mem"), dst)
	back, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	if sha256.Sum256(back) != sha256.Sum256(data) {
		t.Error("image converted out of the export differs from the one converted in")
	}

	// Change one byte on the device: compare must now fail (exit 1).
	if err := dev.WriteAt(context.Background(), []byte{data[5*miB+7] ^ 0xff}, 5*miB+7, 0); err != nil {
		t.Fatal(err)
	}
	if r := runTool(t, nil, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, srv.uri("mem")); r.err == nil {
		t.Errorf("qemu-img compare missed a changed byte:\n%s", r.stdout)
	}
}

// TestQemuIO writes and reads patterns with qemu-io (plain, FUA, zero,
// discard) and checks the device and qemu-io's own pattern verification.
func TestQemuIO(t *testing.T) {
	srv, dev := startMem(t, 4*miB, blockdev.Caps{})
	uri := srv.uri("mem")
	out := mustRun(t, "qemu-io", "-f", "raw", uri,
		"-c", "write -P 0xab 0 64k",
		"-c", "read -P 0xab 0 64k",
		"-c", "write -f -P 0xcd 1M 128k",
		"-c", "read -P 0xcd 1M 128k",
		"-c", "write -P 0xef 2M 64k",
		"-c", "write -z 2M 32k",
		"-c", "read -P 0 2M 32k",
		"-c", "read -P 0xef 2080k 32k",
		"-c", "flush")
	if strings.Contains(out, "Pattern verification failed") {
		t.Fatalf("qemu-io pattern verification failed:\n%s", out)
	}
	got := dev.Bytes()
	checks := []struct {
		off, n int
		b      byte
	}{{0, 64 * kiB, 0xab}, {miB, 128 * kiB, 0xcd}, {2 * miB, 32 * kiB, 0}, {2*miB + 32*kiB, 32 * kiB, 0xef}}
	for _, c := range checks {
		if !bytes.Equal(got[c.off:c.off+c.n], bytes.Repeat([]byte{c.b}, c.n)) {
			t.Errorf("device at %d: want %d bytes of %#x", c.off, c.n, c.b)
		}
	}
	if dev.Flushes() == 0 {
		t.Error("qemu-io write -f and flush reached the device as no flush at all")
	}
	// A wrong pattern must be reported: proves the read check can fail.
	out = runTool(t, nil, "qemu-io", "-f", "raw", uri, "-c", "read -P 0x12 0 64k").stdout
	if !strings.Contains(out, "Pattern verification failed") {
		t.Errorf("qemu-io did not report a wrong pattern:\n%s", out)
	}
}

// TestNbdcopy copies a random 64 MiB image (with a hole in the middle) into
// an export holding garbage and back out, comparing checksums each way.
func TestNbdcopy(t *testing.T) {
	size := int64(64 * miB)
	if testing.Short() {
		size = 16 * miB
	}
	srv, dev := startMem(t, size, blockdev.Caps{})
	garbage := bytes.Repeat([]byte{0x5a}, int(size))
	if err := dev.WriteAt(context.Background(), garbage, 0, 0); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "src.img")
	data := make([]byte, size)
	if _, err := rand.Read(data); err != nil {
		t.Fatal(err)
	}
	clear(data[size/4 : size/2]) // a zero run nbdcopy may send as WRITE_ZEROES
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(data[:size/4], 0); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(data[size/2:], size/2); err != nil { // leaves a sparse hole
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	want := sha256.Sum256(data)

	mustRun(t, "nbdcopy", "--flush", src, srv.uri("mem"))
	if sha256.Sum256(dev.Bytes()) != want {
		t.Fatal("device checksum differs from the source image after nbdcopy in")
	}
	dst := filepath.Join(dir, "dst.img")
	mustRun(t, "nbdcopy", srv.uri("mem"), dst)
	back, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	if sha256.Sum256(back) != want {
		t.Error("checksum of the image copied out differs from the source")
	}
}
