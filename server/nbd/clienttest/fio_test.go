package clienttest

import (
	"encoding/json"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lupool/lupool/blockdev"
)

// fioResult is the part of fio's JSON output the tests check.
type fioResult struct {
	Jobs []struct {
		Name  string `json:"jobname"`
		Error int    `json:"error"`
		Read  struct {
			IOBytes int64 `json:"io_bytes"`
		} `json:"read"`
		Write struct {
			IOBytes int64 `json:"io_bytes"`
		} `json:"write"`
	} `json:"jobs"`
}

// runFio runs fio's nbd engine with args and returns the parsed result,
// failing the test on a non-zero exit (which includes verify failures).
func runFio(t *testing.T, uri string, args ...string) fioResult {
	t.Helper()
	all := append([]string{"--ioengine=nbd", "--uri=" + uri, "--output-format=json",
		"--thread", "--group_reporting=0"}, args...)
	out := mustRun(t, "fio", all...)
	// fio may print warnings before the JSON document.
	if i := strings.IndexByte(out, '{'); i > 0 {
		out = out[i:]
	}
	var r fioResult
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("fio JSON: %v\n%s", err, out)
	}
	if len(r.Jobs) == 0 {
		t.Fatalf("fio reported no jobs:\n%s", out)
	}
	for _, j := range r.Jobs {
		if j.Error != 0 {
			t.Fatalf("fio job %s: error %d", j.Name, j.Error)
		}
	}
	return r
}

// TestFioVerify writes 4 KiB random blocks at iodepth 32 with crc32c
// headers, then verifies them in a second fio run on a new connection.
func TestFioVerify(t *testing.T) {
	size := 32 * miB
	if testing.Short() {
		size = 8 * miB
	}
	srv, dev := startMem(t, int64(size), blockdev.Caps{})
	common := []string{"--name=randwrite", "--rw=randwrite", "--bs=4k", "--iodepth=32",
		fmt.Sprintf("--size=%d", size), "--verify=crc32c", "--verify_state_save=0", "--randseed=42"}

	w := runFio(t, srv.uri("mem"), append(common, "--do_verify=0")...)
	if got := w.Jobs[0].Write.IOBytes; got != int64(size) {
		t.Errorf("fio wrote %d bytes, want %d", got, size)
	}
	v := runFio(t, srv.uri("mem"), append(common, "--verify_only")...)
	if got := v.Jobs[0].Read.IOBytes; got != int64(size) {
		t.Errorf("fio verified %d bytes, want %d", got, size)
	}

	// Corrupt one block behind fio's back: the verify pass must now fail.
	b := dev.Bytes()
	if err := dev.WriteAt(t.Context(), []byte{b[4096+100] ^ 0xff}, 4096+100, 0); err != nil {
		t.Fatal(err)
	}
	r := runTool(t, nil, "fio", append([]string{"--ioengine=nbd", "--uri=" + srv.uri("mem"),
		"--thread"}, append(common, "--verify_only")...)...)
	if r.err == nil {
		t.Errorf("fio verify passed over a corrupted block:\n%s", r.stdout)
	}
}

// TestFioMultiConn runs two fio jobs, each on its own connection, writing
// and verifying disjoint halves of a multi-conn export, and checks that two
// connections were open at once.
func TestFioMultiConn(t *testing.T) {
	half := 16 * miB
	if testing.Short() {
		half = 4 * miB
	}
	srv, _ := startMem(t, int64(2*half), blockdev.Caps{MultiConn: true})

	var maxConns atomic.Int64
	done := make(chan struct{})
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		for {
			if n := int64(srv.srv.Connections("mem")); n > maxConns.Load() {
				maxConns.Store(n)
			}
			select {
			case <-done:
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
	}()
	r := runFio(t, srv.uri("mem"), "--name=mc", "--rw=randwrite", "--bs=4k", "--iodepth=32",
		"--numjobs=2", fmt.Sprintf("--size=%d", half), fmt.Sprintf("--offset_increment=%d", half),
		"--verify=crc32c", "--verify_state_save=0", "--do_verify=1", "--randseed=7")
	close(done)
	<-stopped
	if len(r.Jobs) != 2 {
		t.Fatalf("fio ran %d jobs, want 2", len(r.Jobs))
	}
	for _, j := range r.Jobs {
		if j.Write.IOBytes != int64(half) || j.Read.IOBytes != int64(half) {
			t.Errorf("job %s wrote %d and verified %d bytes, want %d each", j.Name, j.Write.IOBytes, j.Read.IOBytes, half)
		}
	}
	if maxConns.Load() < 2 {
		t.Errorf("at most %d connections were open at once, want 2", maxConns.Load())
	}
}
