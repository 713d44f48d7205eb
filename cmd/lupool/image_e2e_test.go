package main

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lupool/lupool/internal/realclient"
)

type imageJSON struct {
	Name   string `json:"name"`
	State  string `json:"state"`
	Copies int    `json:"copies"`
	Disks  []struct {
		LU             string `json:"lu"`
		SizeBytes      int64  `json:"size_bytes"`
		AllocatedBytes int64  `json:"allocated_bytes"`
		SHA256         string `json:"sha256"`
		SentBytes      int64  `json:"sent_bytes"`
	} `json:"disks"`
	Clones []string `json:"clones"`
}

func (d *daemon) image(name string) imageJSON {
	d.t.Helper()
	var img imageJSON
	if err := json.Unmarshal([]byte(d.mustCLI("image", "show", name, "-o", "json")), &img); err != nil {
		d.t.Fatal(err)
	}
	return img
}

func (d *daemon) luAllocated(name string) int64 {
	d.t.Helper()
	var lu luJSON
	if err := json.Unmarshal([]byte(d.mustCLI("lu", "show", name, "-o", "json")), &lu); err != nil {
		d.t.Fatal(err)
	}
	return lu.AllocatedBytes
}

// sparseSource writes a file of sizeBytes with random data at each of
// offsets (lengthBytes each) and holes elsewhere.
func sparseSource(t *testing.T, dir string, sizeBytes int64, lengthBytes int, offsets ...int64) string {
	t.Helper()
	path := filepath.Join(dir, "disk.raw")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(sizeBytes); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, lengthBytes)
	for _, off := range offsets {
		if _, err := rand.Read(buf); err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteAt(buf, off); err != nil {
			t.Fatal(err)
		}
	}
	return path
}

// nbdRead copies an export to a file with nbdcopy and returns its path.
func nbdRead(t *testing.T, uri string) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "out.raw")
	runTool(t, "nbdcopy", uri, out)
	return out
}

// sameFiles compares two files with cmp (fast on large sparse files).
func sameFiles(t *testing.T, a, b string) bool {
	t.Helper()
	out, err := exec.Command("cmp", a, b).CombinedOutput()
	if err != nil {
		t.Logf("cmp %s %s: %v %s", a, b, err, out)
	}
	return err == nil
}

func nbdsh(t *testing.T, uri, script string) (string, error) {
	t.Helper()
	out, err := realclient.Nbdsh(t, uri, script).CombinedOutput()
	return string(out), err
}

// TestImageImportAndClones: a 1 GiB sparse raw file with 100 MiB of data
// imports as about 100 MiB sent and allocated, reads back equal, and is
// read-only over NBD; a raw file and a qcow2 file import as two disks, the
// qcow2 one identical for qemu-img compare, and so do a vmdk file and an
// nbd:// source; bad arguments change nothing.
// Two linked clones read the image, keep their writes to themselves, read
// zeros where trimmed, report their own blocks; the image cannot go while
// they exist; one clone is flattened under fio with crc32c verification,
// the other deleted, then the image: the flattened clone still verifies
// and still holds the image's data.
func TestImageImportAndClones(t *testing.T) {
	alongside(t)
	needTools(t, "nbdcopy", "nbdinfo", "qemu-img", "qemu-io", "qemu-nbd", "fio")
	realclient.NbdshPython(t)
	d := newDaemon(t, "i1")
	d.start()
	dir := t.TempDir()
	const mib = 1 << 20
	src := sparseSource(t, dir, 1<<30, 25*mib, 100*mib, 300*mib, 600*mib, 900*mib)

	// Bad arguments: a message that says what to fix, and nothing made.
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"image", "import", "bad", filepath.Join(dir, "missing.raw")}, "no such file"},
		{[]string{"image", "import", "bad", src, "--copies", "2"}, "copies 2 needs 2 nodes"},
		{[]string{"image", "import", "bad/x", src}, "image name"},
		{[]string{"image", "import", "bad", "nbd+unix:///x"}, "no socket"},
	} {
		_, errOut, code := d.cli(c.args...)
		if code == 0 || !strings.Contains(errOut, c.want) {
			t.Errorf("lupool %s: exit %d, %q; want a failure saying %q", strings.Join(c.args, " "), code, errOut, c.want)
		}
	}
	if lus := d.listLUs(); len(lus) != 0 {
		t.Fatalf("refused imports left LUs: %+v", lus)
	}
	if out := d.mustCLI("image", "list", "-o", "json"); strings.TrimSpace(out) != "[]" {
		t.Fatalf("refused imports left images: %s", out)
	}

	start := time.Now()
	var img imageJSON
	if err := json.Unmarshal([]byte(d.mustCLI("image", "import", "deb", src, "-o", "json")), &img); err != nil {
		t.Fatal(err)
	}
	t.Logf("import of 1 GiB with 100 MiB of data: %v, sent %d bytes, allocated %d", time.Since(start), img.Disks[0].SentBytes, img.Disks[0].AllocatedBytes)
	if img.State != "ready" || len(img.Disks) != 1 || img.Disks[0].LU != "deb/0" || len(img.Disks[0].SHA256) != 64 {
		t.Fatalf("imported image: %+v", img)
	}
	if s := img.Disks[0].SentBytes; s != 100*mib {
		t.Errorf("sent %d bytes, want exactly the 100 MiB of data", s)
	}
	if a := d.luAllocated("deb/0"); a < 100*mib || a > 102*mib {
		t.Errorf("deb/0 allocates %d bytes, want about 100 MiB", a)
	}
	for _, args := range [][]string{{"lu", "delete", "deb/0"}, {"lu", "resize", "deb/0", "--size", "2G"}} {
		if _, errOut, code := d.cli(args...); code == 0 || !strings.Contains(errOut, "image") {
			t.Errorf("lupool %s: exit %d, %q; want it refused (an image's disk)", strings.Join(args, " "), code, errOut)
		}
	}
	if _, errOut, code := d.cli("image", "import", "deb", src); code == 0 || !strings.Contains(errOut, "exists") {
		t.Errorf("a second import named deb: exit %d, %q", code, errOut)
	}
	if !sameFiles(t, nbdRead(t, d.uri("deb/0")), src) {
		t.Fatal("nbdcopy of deb/0 differs from the source")
	}
	if out := runTool(t, "nbdinfo", d.uri("deb/0")); !strings.Contains(out, "is_read_only: true") {
		t.Errorf("nbdinfo of deb/0 does not say read-only:\n%s", out)
	}
	if out, err := nbdsh(t, d.uri("deb/0"), `h.pwrite(b"x"*4096, 0)`); err == nil || !strings.Contains(out, "not permitted") {
		t.Errorf("a write to the image: %v %s; want it refused (EPERM)", err, out)
	}

	// Two sources: a raw file and a qcow2 file filled by qemu-io.
	small := sparseSource(t, t.TempDir(), 8*mib, mib, 2*mib)
	qcow := filepath.Join(dir, "disk.qcow2")
	runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", qcow, "64M")
	runTool(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0xab 1M 4M", "-c", "write -P 0x11 40M 512k", qcow)
	if err := json.Unmarshal([]byte(d.mustCLI("image", "import", "two", small, qcow, "-o", "json")), &img); err != nil {
		t.Fatal(err)
	}
	if len(img.Disks) != 2 || img.Disks[0].LU != "two/0" || img.Disks[1].LU != "two/1" || img.Disks[1].SentBytes != 4*mib+512<<10 {
		t.Fatalf("two-disk image: %+v", img)
	}
	if out := runTool(t, "qemu-img", "compare", "-f", "qcow2", "-F", "raw", qcow, d.uri("two/1")); !strings.Contains(out, "identical") {
		t.Errorf("qemu-img compare of the qcow2 and two/1: %s", out)
	}
	if !sameFiles(t, nbdRead(t, d.uri("two/0")), small) {
		t.Error("two/0 differs from its raw source")
	}
	// A vmdk file and an NBD export (two/1 itself, read by the import's
	// own NBD client) as sources.
	vmdk := filepath.Join(dir, "disk.vmdk")
	runTool(t, "qemu-img", "convert", "-f", "qcow2", "-O", "vmdk", qcow, vmdk)
	d.mustCLI("image", "import", "other", vmdk, d.uri("two/1"))
	if out := runTool(t, "qemu-img", "compare", "-f", "vmdk", "-F", "raw", vmdk, d.uri("other/0")); !strings.Contains(out, "identical") {
		t.Errorf("qemu-img compare of the vmdk and other/0: %s", out)
	}
	if out := runTool(t, "qemu-img", "compare", "-f", "qcow2", "-F", "raw", qcow, d.uri("other/1")); !strings.Contains(out, "identical") {
		t.Errorf("qemu-img compare of the qcow2 and other/1 (imported from nbd://.../two/1): %s", out)
	}
	if a := d.luAllocated("other/1"); a > 5*mib {
		t.Errorf("other/1, imported from NBD, allocates %d bytes; want only the 4.5 MiB of data", a)
	}
	d.mustCLI("image", "delete", "other")
	if _, errOut, code := d.cli("image", "delete", "deb"); code != 0 {
		t.Fatalf("image delete deb: %s", errOut)
	}

	// Linked clones of two/1, the qcow2 disk: data at 1-5 MiB and at
	// 40 MiB, holes elsewhere.
	base := d.uri("two/1")
	d.mustCLI("lu", "create", "vm1", "--from", "two/1")
	d.mustCLI("lu", "create", "vm2", "--from", "two/1", "--size", "100M")
	if _, errOut, code := d.cli("lu", "create", "vm3", "--from", "two/1", "--size", "1M"); code == 0 || !strings.Contains(errOut, "at least") {
		t.Errorf("a clone smaller than its image: exit %d, %q", code, errOut)
	}
	at := int64(2 * mib)
	script := fmt.Sprintf(`
h.pwrite(b"C"*4096, %d)
h.trim(1<<20, %d)
h.flush()
`, at, at+mib)
	if out, err := nbdsh(t, d.uri("vm1"), script); err != nil {
		t.Fatalf("write and trim in vm1: %v %s", err, out)
	}
	// What vm1 must read: the image with vm1's write and trim.
	imageRaw := filepath.Join(dir, "image.raw")
	runTool(t, "qemu-img", "convert", "-f", "qcow2", "-O", "raw", qcow, imageRaw)
	want := filepath.Join(dir, "want.raw")
	runTool(t, "cp", "--sparse=always", imageRaw, want)
	wf, err := os.OpenFile(want, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, err1 := wf.WriteAt(bytes.Repeat([]byte("C"), 4096), at)
	_, err2 := wf.WriteAt(make([]byte, mib), at+mib)
	if err := errors.Join(err1, err2, wf.Close()); err != nil {
		t.Fatal(err)
	}
	if !sameFiles(t, nbdRead(t, d.uri("vm1")), want) {
		t.Fatal("vm1 does not read the image with its own write and a trimmed (zero) MiB")
	}
	// vm2 reads the image (vm1's writes did not leak) and zeros past it;
	// the image is unchanged.
	vm2 := nbdRead(t, d.uri("vm2"))
	if st, err := os.Stat(vm2); err != nil || st.Size() != 100*mib {
		t.Fatalf("vm2: %v %v, want 100 MiB", st, err)
	}
	if out, err := exec.Command("cmp", "-n", fmt.Sprint(64*mib), vm2, imageRaw).CombinedOutput(); err != nil {
		t.Fatalf("vm2 does not read the image: %v %s", err, out)
	}
	if out, err := exec.Command("cmp", "-i", fmt.Sprintf("%d:0", 64*mib), "-n", fmt.Sprint(36*mib), vm2, "/dev/zero").CombinedOutput(); err != nil {
		t.Fatalf("vm2 past its image does not read zeros: %v %s", err, out)
	}
	if !sameFiles(t, nbdRead(t, base), imageRaw) {
		t.Fatal("the image changed under its clones")
	}
	mapOut := strings.Join(strings.Fields(runTool(t, "nbdinfo", "--map", d.uri("vm1"))), " ")
	for _, line := range []string{
		fmt.Sprintf("%d %d 3 hole,zero", 0, mib),
		fmt.Sprintf("%d %d 0 data", mib, 2*mib),
		fmt.Sprintf("%d %d 2 zero", at+mib, mib),
		fmt.Sprintf("%d %d 0 data", at+2*mib, mib),
	} {
		if !strings.Contains(mapOut, line) {
			t.Errorf("nbdinfo --map vm1 lacks %q:\n%s", line, mapOut)
		}
	}
	if a := d.luAllocated("vm1"); a < 4096 || a > mib {
		t.Errorf("vm1 allocates %d bytes; want its own blocks only (one 4 KiB write)", a)
	}
	// The pool counts the image once and each clone's own blocks.
	var pool struct {
		AllocatedBytes int64 `json:"allocated_bytes"`
	}
	if err := json.Unmarshal([]byte(d.mustCLI("pool", "status", "-o", "json")), &pool); err != nil {
		t.Fatal(err)
	}
	var sum int64
	for _, lu := range d.listLUs() {
		sum += lu.AllocatedBytes
	}
	if pool.AllocatedBytes != sum || sum > 7*mib {
		t.Errorf("pool allocates %d bytes, its LUs %d; want them equal, the image's ~5.5 MiB counted once", pool.AllocatedBytes, sum)
	}
	if _, errOut, code := d.cli("image", "delete", "two"); code == 0 || !strings.Contains(errOut, "vm1") {
		t.Errorf("deleting an image with clones: exit %d, %q", code, errOut)
	}

	// Flatten vm1 under fio load, delete vm2 and the image: vm1 verifies
	// and still holds the image's data past fio's 16 MiB.
	job := []string{"--name=flat", "--uri=" + d.uri("vm1"), "--rw=randwrite", "--bs=4k", "--iodepth=16",
		"--size=16M", "--verify=crc32c", "--randseed=11"}
	wait := startFio(t, append(job, "--do_verify=0")...)
	time.Sleep(300 * time.Millisecond)
	d.mustCLI("lu", "flatten", "vm1")
	out, err := wait()
	if err != nil || !strings.Contains(out, "err= 0") {
		t.Fatalf("fio during flatten: %v\n%s", err, out)
	}
	d.mustCLI("lu", "delete", "vm2")
	d.mustCLI("image", "delete", "two")
	fio(t, append(job, "--verify_only=1")...)
	if out, err := exec.Command("cmp", "-i", "16M", nbdRead(t, d.uri("vm1")), want).CombinedOutput(); err != nil {
		t.Fatalf("vm1 lost the image's data when it was flattened and the image deleted: %v %s", err, out)
	}
	if lus := d.listLUs(); len(lus) != 1 || lus[0].Name != "vm1" {
		t.Fatalf("left: %+v, want vm1 only", lus)
	}
}

// TestImageImportInterrupted: an import killed midway stays importing (no
// clone can be made of it, a wrong hash is refused); --resume skips what
// was written, finishes it and it reads back equal;
// another killed import removed with image delete leaves no LU and no
// file.
func TestImageImportInterrupted(t *testing.T) {
	alongside(t)
	needTools(t, "nbdcopy")
	realclient.NbdshPython(t)
	d := newDaemon(t, "i2")
	d.start()
	src, _ := randomFile(t, 32<<20)
	kill := func(name string) {
		cmd := exec.Command(lupoolBin, "image", "import", name, src, "--rate", "4M")
		cmd.Env = append(os.Environ(), "LUPOOL_API="+d.api, "LUPOOL_TOKEN_FILE="+d.tokenFile())
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(30 * time.Second)
		for {
			out, _, code := d.cli("lu", "show", name+"/0", "-o", "json")
			var lu luJSON
			if code == 0 && json.Unmarshal([]byte(out), &lu) == nil && lu.AllocatedBytes > 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("import %s did not start writing", name)
			}
			time.Sleep(50 * time.Millisecond)
		}
		if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		_ = cmd.Wait()
		if img := d.image(name); img.State != "importing" || img.Disks[0].SHA256 != "" {
			t.Fatalf("a killed import: %+v, want importing without a hash", img)
		}
		if a := d.luAllocated(name + "/0"); a >= 32<<20 {
			t.Fatalf("the import was not killed midway (%d bytes allocated)", a)
		}
	}
	kill("k1")
	// The node checks the stored copy against the hash it is given: a
	// wrong one (or a half-written copy) is refused and changes nothing.
	resp := d.request("POST", "/v1/images/k1/ready", fmt.Sprintf(`{"disks":[{"sha256":%q,"sent_bytes":1,"source_bytes":%d}]}`, strings.Repeat("ab", 32), 32<<20))
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 400 || !strings.Contains(string(body), "differs from its source") {
		t.Errorf("ready with a wrong hash: %d %s", resp.StatusCode, body)
	}
	if img := d.image("k1"); img.State != "importing" {
		t.Fatalf("a refused ready changed the image: %+v", img)
	}
	if _, errOut, code := d.cli("lu", "create", "c", "--from", "k1/0"); code == 0 || !strings.Contains(errOut, "importing") {
		t.Errorf("a clone of an importing image: exit %d, %q", code, errOut)
	}
	if _, errOut, code := d.cli("image", "import", "k1", src); code == 0 || !strings.Contains(errOut, "exists") {
		t.Errorf("importing over an interrupted import without --resume: exit %d, %q", code, errOut)
	}
	// A client connected while the image imports may write; once the
	// image is ready the node refuses its writes (EPERM), though the
	// connection was opened read-write.
	flag := filepath.Join(t.TempDir(), "ready")
	early := realclient.Nbdsh(t, d.uri("k1/0"), fmt.Sprintf(`
import os, time
assert not h.is_read_only()
while not os.path.exists(%q):
    time.sleep(0.05)
try:
    h.pwrite(b"z"*4096, 0)
    print("WROTE")
except nbd.Error as e:
    print("REFUSED", e.errno)
`, flag))
	var earlyOut syncBuffer
	early.Stdout, early.Stderr = &earlyOut, &earlyOut
	if err := early.Start(); err != nil {
		t.Fatal(err)
	}
	allocated := d.luAllocated("k1/0")
	_, errOut, code := d.cli("image", "import", "k1", src, "--resume")
	if code != 0 {
		t.Fatalf("resume: %s", errOut)
	}
	// It resumes where the killed import stopped (within a chunk), not at 0.
	t.Logf("resume after %d bytes were written: %s", allocated, strings.TrimSpace(errOut))
	var there float64
	var unit string
	if _, err := fmt.Sscanf(errOut, "k1/0: the first %f%s", &there, &unit); err != nil || unit != "M" || there < 1 || there*(1<<20) > float64(allocated) {
		t.Errorf("resume said %q (had %d bytes); want it to skip the part written", errOut, allocated)
	}
	if img := d.image("k1"); img.State != "ready" {
		t.Fatalf("resumed import: %+v", img)
	}
	if err := os.WriteFile(flag, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := early.Wait(); err != nil || !strings.Contains(earlyOut.String(), "REFUSED EPERM") {
		t.Fatalf("a write on a connection opened while importing, sent once ready: %v %s; want EPERM", err, earlyOut.String())
	}
	if !sameFiles(t, nbdRead(t, d.uri("k1/0")), src) {
		t.Fatal("the resumed import differs from its source")
	}
	kill("k2")
	d.mustCLI("image", "delete", "k2")
	d.mustCLI("image", "delete", "k1")
	if lus := d.listLUs(); len(lus) != 0 {
		t.Fatalf("deleted images left LUs: %+v", lus)
	}
	var left []string
	_ = filepath.Walk(d.data, func(path string, info os.FileInfo, err error) error {
		if err == nil && (strings.Contains(path, "k1@") || strings.Contains(path, "k2@")) {
			left = append(left, path)
		}
		return nil
	})
	if len(left) != 0 {
		t.Fatalf("deleted images left files: %v", left)
	}
}

// TestImageClonesWithCopies: an image imported with --copies 2 on a
// three-node pool; a clone with two copies goes on the image's two nodes
// (a clone's copies read the image locally) and one with three is refused;
// a write to the clone reaches both copies (lu verify), the copy node's
// export reads the image and the write from its own copy; after flatten
// and the image's deletion, both copies still hold the image's data.
func TestImageClonesWithCopies(t *testing.T) {
	alongside(t)
	needTools(t, "nbdcopy")
	realclient.NbdshPython(t)
	n1, n2, n3 := cluster3(t)
	src := sparseSource(t, t.TempDir(), 32<<20, 1<<20, 0, 8<<20, 31<<20)
	n1.mustCLI("image", "import", "base", src, "--copies", "2")
	img := n1.showLU("base/0")
	if len(img.Replicas) != 2 {
		t.Fatalf("base/0: %+v, want two copies", img)
	}
	holds := map[string]bool{}
	for _, r := range img.Replicas {
		holds[r.Node] = true
	}
	if _, errOut, code := n1.cli("lu", "create", "c3", "--from", "base/0", "--copies", "3"); code == 0 || !strings.Contains(errOut, "at most 2") {
		t.Errorf("a 3-copy clone of a 2-copy image: exit %d, %q", code, errOut)
	}
	n1.mustCLI("lu", "create", "c", "--from", "base/0", "--copies", "2")
	c := n1.showLU("c")
	if len(c.Replicas) != 2 || !holds[c.Replicas[0].Node] || !holds[c.Replicas[1].Node] {
		t.Fatalf("clone c: %+v; want its copies on the image's nodes %v", c, holds)
	}
	var copyNode *daemon
	for _, d := range []*daemon{n1, n2, n3} {
		if holds[d.id] && d.id != c.Writer {
			copyNode = d
		}
	}
	want := filepath.Join(t.TempDir(), "want.raw")
	runTool(t, "cp", "--sparse=always", src, want)
	wf, err := os.OpenFile(want, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := wf.WriteAt(bytes.Repeat([]byte("W"), 8192), 8<<20+4096); err != nil {
		t.Fatal(err)
	}
	_ = wf.Close()
	if out, err := nbdsh(t, n1.uri("c"), `h.pwrite(b"W"*8192, (8<<20)+4096); h.flush()`); err != nil {
		t.Fatalf("write to the clone: %v %s", err, out)
	}
	verify := func(when string) {
		t.Helper()
		var rep struct {
			Equal bool `json:"equal"`
		}
		if err := json.Unmarshal([]byte(n1.mustCLI("lu", "verify", "c", "-o", "json")), &rep); err != nil || !rep.Equal {
			t.Fatalf("lu verify c %s: %v %+v", when, err, rep)
		}
		for _, d := range []*daemon{n1, copyNode} {
			if !sameFiles(t, nbdRead(t, d.uri("c")), want) {
				t.Fatalf("clone c read through %s %s differs from the image with its write", d.id, when)
			}
		}
	}
	verify("after a write")
	n1.mustCLI("lu", "flatten", "c")
	// The copy node flattens its own copy when it sees the record; the
	// image's deletion there waits for no one, so give it the moment.
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, errOut, code := n1.cli("image", "delete", "base")
		if code == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("image delete after flatten: %s", errOut)
		}
		time.Sleep(200 * time.Millisecond)
	}
	verify("after flatten and the image's deletion")
	for _, d := range []*daemon{n1, n2, n3} {
		var left []string
		_ = filepath.Walk(d.data, func(path string, _ os.FileInfo, err error) error {
			if err == nil && strings.Contains(path, "base@0") {
				left = append(left, path)
			}
			return nil
		})
		if len(left) != 0 {
			t.Errorf("node %s kept the deleted image's files: %v", d.id, left)
		}
	}
}
