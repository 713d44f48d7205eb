package main

import (
	"bufio"
	"bytes"
	"debug/elf"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lupool/lupool/internal/realclient"
)

// The guest of TestPagingVMSwaps: RAM, what its program fills, and the
// swap the test asks for.
const (
	guestRAMMiB      = 96
	guestFillMiB     = 160
	guestSwapSize    = "256M"
	guestSwapOutMin  = 128 << 20 // bytes the guest must push through swap
	guestRunTimeout  = 150 * time.Second
	guestInitSummary = "GUEST END"
)

// guestInit is the initramfs's /init: load the virtio modules, swap on the
// paging LU with discard, run pagefill, report the swap traffic, swap off
// (which frees every slot, so the kernel discards them) and power off.
const guestInit = `#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox --install -s /bin
export PATH=/bin
for m in $(cat /modules.order); do insmod /lib/modules/$m.ko || echo "GUEST insmod $m failed"; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 30 ]; do sleep 1; i=$((i+1)); done
mkswap /dev/vda >/dev/null
# The kernel discards freed swap clusters on non-rotational devices only,
# and virtio-blk reports a rotational disk.
echo 0 > /sys/block/vda/queue/rotational
if swapon -d /dev/vda; then echo "GUEST swapon --discard"; else swapon /dev/vda; echo "GUEST swapon without discard"; fi
echo "GUEST swaps $(grep -c vda /proc/swaps) mem $(grep MemTotal /proc/meminfo) discard_max_bytes $(cat /sys/block/vda/queue/discard_max_bytes)"
echo "GUEST before $(grep -E '^pswpout ' /proc/vmstat)"
/pagefill FILL_MIB
echo "GUEST pagefill exit $?"
echo "GUEST after $(grep -E '^pswpout ' /proc/vmstat)"
# pagefill's pages left swap when it ended: their freed clusters are
# discarded in the background while swap is on.
sleep 3
echo "GUEST swap used $(tail -n 1 /proc/swaps)"
swapoff /dev/vda
echo "GUEST swapoff exit $?"
sleep 2
echo "` + guestInitSummary + `"
poweroff -f
`

// guestKernel finds Debian's kernel (package linux-image-amd64) and its
// modules, or ends the test through realclient.Missing.
func guestKernel(t *testing.T) (vmlinuz, modules string) {
	t.Helper()
	kernels, _ := filepath.Glob("/boot/vmlinuz-*")
	sort.Strings(kernels)
	for i := len(kernels) - 1; i >= 0; i-- {
		version := strings.TrimPrefix(filepath.Base(kernels[i]), "vmlinuz-")
		dir := filepath.Join("/lib/modules", version)
		if _, err := os.Stat(filepath.Join(dir, "modules.dep")); err == nil {
			return kernels[i], dir
		}
	}
	realclient.Missing(t, "no /boot/vmlinuz-* with its /lib/modules (apt-get install linux-image-amd64; ./scripts/install-test-deps.sh)")
	return "", ""
}

// moduleOrder returns the modules (paths relative to dir) that the virtio
// PCI transport and virtio-blk need, each after its dependencies, from
// dir/modules.dep. Built-in modules are not listed there and need nothing.
func moduleOrder(t *testing.T, dir string, want ...string) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "modules.dep"))
	if err != nil {
		t.Fatal(err)
	}
	deps := map[string][]string{}
	byName := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		mod, rest, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		deps[mod] = strings.Fields(rest)
		byName[strings.TrimSuffix(filepath.Base(mod), ".ko")] = mod
	}
	var order []string
	seen := map[string]bool{}
	var visit func(mod string)
	visit = func(mod string) {
		if seen[mod] {
			return
		}
		seen[mod] = true
		for _, d := range deps[mod] {
			visit(d)
		}
		order = append(order, mod)
	}
	for _, name := range want {
		mod, ok := byName[name]
		if !ok {
			builtin, _ := os.ReadFile(filepath.Join(dir, "modules.builtin"))
			if bytes.Contains(builtin, []byte("/"+name+".ko")) {
				continue
			}
			t.Fatalf("module %s is neither in %s/modules.dep nor built in", name, dir)
		}
		visit(mod)
	}
	for _, mod := range order {
		if !strings.HasSuffix(mod, ".ko") {
			realclient.Missing(t, "module %s is compressed; busybox insmod loads plain .ko files only", mod)
		}
	}
	return order
}

// cpioWriter writes a newc ("070701") cpio archive, the initramfs format.
type cpioWriter struct {
	buf bytes.Buffer
	ino int
}

func (w *cpioWriter) entry(name string, mode uint32, data []byte, rdevMajor, rdevMinor int) {
	w.ino++
	fmt.Fprintf(&w.buf, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		w.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdevMajor, rdevMinor, len(name)+1, 0)
	w.buf.WriteString(name)
	w.buf.WriteByte(0)
	w.pad()
	w.buf.Write(data)
	w.pad()
}

func (w *cpioWriter) pad() {
	for w.buf.Len()%4 != 0 {
		w.buf.WriteByte(0)
	}
}

// buildInitramfs builds the guest: busybox, the virtio modules, pagefill
// (compiled here with gcc -static) and /init.
func buildInitramfs(t *testing.T, modDir string) string {
	t.Helper()
	dir := t.TempDir()
	pagefill := filepath.Join(dir, "pagefill")
	if out, err := exec.Command("gcc", "-static", "-O2", "-o", pagefill, filepath.Join("testdata", "pagefill.c")).CombinedOutput(); err != nil {
		realclient.Missing(t, "gcc -static pagefill.c failed (apt-get install gcc libc6-dev): %v\n%s", err, out)
	}
	busybox := "/bin/busybox"
	if f, err := elf.Open(busybox); err != nil {
		realclient.Missing(t, "%s: %v (apt-get install busybox-static)", busybox, err)
	} else {
		for _, prog := range f.Progs {
			if prog.Type == elf.PT_INTERP {
				realclient.Missing(t, "%s is linked dynamically: the guest has no libc (apt-get install busybox-static)", busybox)
			}
		}
		f.Close()
	}
	var w cpioWriter
	for _, d := range []string{"bin", "dev", "lib", "lib/modules", "proc", "sys", "tmp"} {
		w.entry(d, syscall.S_IFDIR|0o755, nil, 0, 0)
	}
	w.entry("dev/console", syscall.S_IFCHR|0o600, nil, 5, 1)
	read := func(path string) []byte {
		b, err := os.ReadFile(path)
		if err != nil {
			realclient.Missing(t, "reading %s: %v", path, err)
		}
		return b
	}
	w.entry("bin/busybox", syscall.S_IFREG|0o755, read(busybox), 0, 0)
	w.entry("pagefill", syscall.S_IFREG|0o755, read(pagefill), 0, 0)
	var names []string
	for _, mod := range moduleOrder(t, modDir, "virtio_pci", "virtio_blk") {
		name := strings.TrimSuffix(filepath.Base(mod), ".ko")
		names = append(names, name)
		w.entry("lib/modules/"+name+".ko", syscall.S_IFREG|0o644, read(filepath.Join(modDir, mod)), 0, 0)
	}
	w.entry("modules.order", syscall.S_IFREG|0o644, []byte(strings.Join(names, "\n")+"\n"), 0, 0)
	init := strings.ReplaceAll(guestInit, "FILL_MIB", strconv.Itoa(guestFillMiB))
	w.entry("init", syscall.S_IFREG|0o755, []byte(init), 0, 0)
	w.entry("TRAILER!!!", 0, nil, 0, 0)
	path := filepath.Join(dir, "initramfs.cpio")
	if err := os.WriteFile(path, w.buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("initramfs: %d KiB, modules %v", w.buf.Len()>>10, names)
	return path
}

// guestRun is one boot of the guest.
type guestRun struct {
	cmd     *exec.Cmd
	console syncBuffer
	// marks receives each console line that starts with PAGEFILL or GUEST.
	marks chan string
	done  chan struct{}
}

// bootGuest starts QEMU (software emulation) with drive as its virtio
// disk; its serial console is read line by line.
func bootGuest(t *testing.T, kernel, initrd, drive string) *guestRun {
	t.Helper()
	g := &guestRun{marks: make(chan string, 256), done: make(chan struct{})}
	g.cmd = exec.Command("qemu-system-x86_64", "-machine", "pc", "-accel", "tcg", "-m", strconv.Itoa(guestRAMMiB), "-smp", "1",
		"-nodefaults", "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot", "-net", "none",
		"-kernel", kernel, "-initrd", initrd, "-append", "console=ttyS0 quiet loglevel=3 panic=-1",
		"-drive", drive)
	out, err := g.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	g.cmd.Stderr = &g.console
	if err := g.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(g.done)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			line := strings.TrimRight(sc.Text(), "\r")
			fmt.Fprintln(&g.console, line)
			if strings.HasPrefix(line, "PAGEFILL") || strings.HasPrefix(line, "GUEST") {
				select {
				case g.marks <- line:
				default:
				}
			}
		}
		_ = g.cmd.Wait()
	}()
	t.Cleanup(func() {
		_ = g.cmd.Process.Kill()
		<-g.done
	})
	return g
}

// waitMark waits for a console line starting with prefix.
func (g *guestRun) waitMark(t *testing.T, prefix string, timeout time.Duration) string {
	t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case line := <-g.marks:
			if strings.HasPrefix(line, prefix) {
				return line
			}
		case <-g.done:
			t.Fatalf("the guest ended before %q; console:\n%s", prefix, g.console.String())
		case <-deadline:
			t.Fatalf("no %q on the guest console after %v; console:\n%s", prefix, timeout, g.console.String())
		}
	}
}

var pswpoutRE = regexp.MustCompile(`GUEST (before|after) pswpout (\d+)`)

// swappedOutBytes is what the guest's console says pagefill pushed
// through swap.
func swappedOutBytes(t *testing.T, console string) int64 {
	t.Helper()
	var before, after int64 = -1, -1
	for _, m := range pswpoutRE.FindAllStringSubmatch(console, -1) {
		n, _ := strconv.ParseInt(m[2], 10, 64)
		if m[1] == "before" {
			before = n
		} else {
			after = n
		}
	}
	if before < 0 || after < 0 {
		t.Fatalf("the console has no pswpout before and after:\n%s", console)
	}
	return (after - before) * 4096
}

// stopAttach ends a lupool attach (SIGTERM) and waits for it.
func (a *attachProc) stop() {
	_ = a.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-a.exited:
	case <-time.After(30 * time.Second):
		_ = a.cmd.Process.Kill()
		<-a.exited
	}
}

// TestPagingVMSwaps: a Linux guest under QEMU (software emulation, Debian's
// kernel, an initramfs built here) swaps on a two-copy memory paging LU
// through lupool attach; its program fills more memory than the guest has
// with a known pattern and reads it all back. In the first run the copy's
// node is killed (kill -9) and restarted in the middle; in the second the
// writer's node is killed and the copy takes over. Both times the program
// must report every page intact, and the guest must have pushed at least
// 128 MiB through swap. Its swapon --discard (and swapoff) must leave the
// LU's memory freed: the pool and the LU show it.
//
// Without -race only (make test runs it so): the daemons then lock their
// memory as a paging node does, and QEMU's software emulation shares the
// two cores with them.
func TestPagingVMSwaps(t *testing.T) {
	if raceEnabled {
		t.Skip("the VM test runs without -race (make test runs it so): a race build neither locks its memory nor leaves QEMU the CPU it needs")
	}
	realclient.Require(t, "qemu-system-x86_64", "gcc", "busybox")
	kernel, modDir := guestKernel(t)
	initrd := buildInitramfs(t, modDir)

	n1 := newDaemon(t, "n1")
	n1.start()
	n2 := newJoiner(t, "n2", n1)
	n2.start()
	w := newJoiner(t, "w", n1, "--witness")
	w.start()
	waitNodes(t, n1, 2)

	run := func(t *testing.T, vm string, victim *daemon, restart bool) {
		started := time.Now()
		sp := n1.paging("request", vm, "--size", guestSwapSize, "--host", "n1",
			"--socket", filepath.Join(t.TempDir(), vm+".sock"))
		if sp.Copies != 2 || sp.Host != "n1" || len(sp.Replicas) != 2 || sp.Replicas[1].Node != "n2" {
			t.Fatalf("paging space: %+v", sp)
		}
		waitExported(t, n1, sp.LU)
		a := startAttach(t, n1, sp.LU, "unix:"+sp.Attach.Socket, "--prefer", "n1")
		g := bootGuest(t, kernel, initrd, sp.Attach.QEMUDrive)
		g.waitMark(t, "PAGEFILL start", guestRunTimeout)
		// Half of the first fill: the guest's RAM is full, it swaps.
		g.waitMark(t, "PAGEFILL pass 0 fill 50%", guestRunTimeout)
		victim.stop(syscall.SIGKILL)
		killed := time.Now()
		t.Logf("killed %s (kill -9) %v after the request", victim.id, killed.Sub(started).Round(time.Millisecond))
		if restart {
			time.Sleep(time.Second)
			victim.start()
			t.Logf("%s restarted", victim.id)
		}
		survivor := n1
		if victim == n1 && !restart {
			survivor = n2
		}
		// The second fill is complete: most of it sits in swap.
		g.waitMark(t, "PAGEFILL pass 1 fill 100%", guestRunTimeout)
		peak := survivor.paging("show", vm).AllocatedBytes
		done := g.waitMark(t, "PAGEFILL done", guestRunTimeout)
		g.waitMark(t, guestInitSummary, 60*time.Second)
		console := g.console.String()
		if done != fmt.Sprintf("PAGEFILL done pages=%d bad=0", guestFillMiB<<20/4096) || !strings.Contains(console, "GUEST pagefill exit 0") {
			t.Fatalf("pagefill did not find every page intact (%q); console:\n%s", done, console)
		}
		if !strings.Contains(console, "GUEST swapon --discard") || !strings.Contains(console, "GUEST swapoff exit 0") {
			t.Errorf("swap on the paging LU: console:\n%s", console)
		}
		swapped := swappedOutBytes(t, console)
		if swapped < guestSwapOutMin {
			t.Errorf("the guest pushed %d MiB through swap, want >= %d MiB", swapped>>20, guestSwapOutMin>>20)
		}
		after := survivor.paging("show", vm)
		t.Logf("%s: %d MiB swapped out, %d pages intact, writer now %s, copies %+v, LU allocated %d MiB with the swap full, %d KiB after swapoff, run %v",
			vm, swapped>>20, guestFillMiB<<20/4096, after.Host, after.Replicas, peak>>20, after.AllocatedBytes>>10, time.Since(started).Round(time.Second))
		// The swap discards (swapon --discard) free the LU's pages once
		// pagefill has ended: far less stays allocated than it held.
		if peak < 64<<20 {
			t.Errorf("the LU held only %d KiB while the guest's swap was full", peak>>10)
		}
		if after.AllocatedBytes > peak/4 {
			t.Errorf("after swapoff the LU still holds %d KiB of the %d MiB swapped: discards did not free it; console:\n%s",
				after.AllocatedBytes>>10, swapped>>20, console)
		}
		if st := survivor.pool(); st.MemoryAllocatedBytes > swapped/8 {
			t.Errorf("after swapoff the pool of %s still holds %d KiB of memory LU data", survivor.id, st.MemoryAllocatedBytes>>10)
		}
		a.stop()
		survivor.mustCLI("paging", "release", vm)
	}
	t.Run("copy-node-killed", func(t *testing.T) { run(t, "vm-a", n2, true) })
	t.Run("writer-node-killed", func(t *testing.T) { run(t, "vm-b", n1, false) })
}
