package clienttest

import (
	"bytes"
	"context"
	"os/exec"
	"runtime"
	"testing"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/server/nbd"
	"github.com/lupool/lupool/server/nbdproto"
)

// TestExportRemoval removes an export while a client is attached (an LU
// deleted under a host): DisconnectExport ends that client only, listings
// and new clients no longer see the export, and the other export's client
// keeps working.
func TestExportRemoval(t *testing.T) {
	keep, _ := memExport("keep", 2*miB, blockdev.Caps{})
	gone, _ := memExport("gone", 2*miB, blockdev.Caps{})
	srv := startServer(t, serverConfig{exports: []nbd.Export{keep, gone}})
	needTool(t, "nbdinfo")

	kc, _ := openRaw(t, srv.addr, "keep")
	gc, _ := openRaw(t, srv.addr, "gone")
	waitFor(t, "both clients attached", 5*time.Second, func() bool {
		return srv.srv.Connections("keep") == 1 && srv.srv.Connections("gone") == 1
	})
	if !srv.exports.Remove("gone") {
		t.Fatal("Remove(gone) found nothing")
	}
	if n := srv.srv.DisconnectExport("gone"); n != 1 {
		t.Errorf("DisconnectExport ended %d connections, want 1", n)
	}
	expectClosed(t, gc.c)

	const reads = 8
	for h := uint64(1); h <= reads; h++ {
		kc.send(nbdproto.CmdRead, 0, h, h*4096, 4096, nil)
		if rep, _ := kc.reply(func(uint64) int { return 4096 }); rep.Error != 0 || rep.Handle != h {
			t.Fatalf("client of the kept export: %+v", rep)
		}
	}
	// The per-connection counters saw exactly that traffic.
	found := false
	for _, cs := range srv.srv.ConnStats() {
		if cs.Export != "keep" {
			continue
		}
		found = true
		if r := cs.Commands["read"]; r.Requests != reads || r.Bytes != reads*4096 || r.Errors != 0 {
			t.Errorf("read counters %+v, want %d requests of 4096 bytes", r, reads)
		}
	}
	if !found {
		t.Error("ConnStats has no connection on export keep")
	}

	info := parseNbdinfo(t, mustRun(t, "nbdinfo", "--list", "--json", "nbd://"+srv.addr))
	if len(info.Exports) != 1 || info.Exports[0].Name != "keep" {
		t.Errorf("exports listed after removal: %+v", info.Exports)
	}
	if r := runTool(t, nil, "nbdinfo", srv.uri("gone")); r.err == nil {
		t.Error("a new client attached to the removed export")
	}
}

// TestShutdownUnderLoad shuts the server down while fio drives it at
// iodepth 32: Shutdown lets in-flight requests finish and returns nil
// promptly, fio sees the server go away long before its run time, and the
// server's goroutines are gone.
func TestShutdownUnderLoad(t *testing.T) {
	fio := needTool(t, "fio")
	base := runtime.NumGoroutine()
	e, _ := memExport("mem", 16*miB, blockdev.Caps{})
	srv := startServer(t, serverConfig{exports: []nbd.Export{e}})
	ctx, cancel := context.WithTimeout(context.Background(), clientTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, fio, "--ioengine=nbd", "--uri="+srv.uri("mem"), "--name=load",
		"--rw=randrw", "--bs=4k", "--iodepth=32", "--size=16m", "--time_based", "--runtime=30", "--output-format=json")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.Dir = t.TempDir()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	waitFor(t, "fio to connect", 10*time.Second, func() bool { return srv.srv.Connections("mem") == 1 })
	time.Sleep(500 * time.Millisecond)

	start := time.Now()
	sctx, scancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer scancel()
	if err := srv.srv.Shutdown(sctx); err != nil {
		t.Errorf("Shutdown under load: %v", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Shutdown took %v with only 4 KiB requests in flight", d)
	}
	select {
	case err := <-exited:
		t.Logf("fio after shutdown: %v", err)
	case <-time.After(15 * time.Second):
		t.Fatalf("fio still running 15 s after Shutdown:\n%s", out.String())
	}
	if n := srv.srv.Connections("mem"); n != 0 {
		t.Errorf("%d connections after Shutdown", n)
	}
	waitGoroutines(t, base)
}
