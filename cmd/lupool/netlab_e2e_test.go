package main

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"math/big"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/lupool/lupool/internal/realclient"
)

// netLab is a set of test hosts: one network namespace each, joined by
// veth pairs to a bridge in the test's own namespace (which holds the
// .254 address, so the test's clients reach every host), on a /24 of
// 10.0.0.0/8 chosen at random. A partition is made with blackhole routes
// between hosts: they stop reaching each other, the test still reaches
// all of them. Only the lab's own addresses are ever touched. Root and
// `ip` (iproute2) are needed; under CI=true their absence fails the test.
type netLab struct {
	t      *testing.T
	tag    string // random, in every name the lab creates
	subnet string // "10.A.B."
	bridge string
	hosts  []string // namespace names; host i has address subnet+(i+1)
}

func newNetLab(t *testing.T, hosts int) *netLab {
	t.Helper()
	if os.Geteuid() != 0 {
		realclient.Missing(t, "network namespaces need root")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		realclient.Missing(t, "ip (iproute2) is not installed")
	}
	var b [2]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	a, _ := rand.Int(rand.Reader, big.NewInt(200))
	l := &netLab{t: t, tag: hex.EncodeToString(b[:]), subnet: fmt.Sprintf("10.%d.%d.", 20+a.Int64(), b[0])}
	l.bridge = "lpb" + l.tag
	t.Cleanup(l.destroy)
	l.ip("link", "add", l.bridge, "type", "bridge")
	l.ip("addr", "add", l.subnet+"254/24", "dev", l.bridge)
	l.ip("link", "set", l.bridge, "up")
	for i := 0; i < hosts; i++ {
		ns := fmt.Sprintf("lp%sh%d", l.tag, i+1)
		outer, inner := fmt.Sprintf("lp%sv%d", l.tag, i+1), fmt.Sprintf("lp%sp%d", l.tag, i+1)
		l.ip("netns", "add", ns)
		l.hosts = append(l.hosts, ns)
		l.ip("link", "add", outer, "type", "veth", "peer", "name", inner)
		l.ip("link", "set", inner, "netns", ns)
		l.ip("-n", ns, "addr", "add", fmt.Sprintf("%s%d/24", l.subnet, i+1), "dev", inner)
		l.ip("-n", ns, "link", "set", inner, "up")
		l.ip("-n", ns, "link", "set", "lo", "up")
		l.ip("link", "set", outer, "master", l.bridge)
		l.ip("link", "set", outer, "up")
	}
	return l
}

func (l *netLab) ip(args ...string) {
	l.t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		l.t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

func (l *netLab) destroy() {
	for _, ns := range l.hosts {
		_ = exec.Command("ip", "netns", "del", ns).Run()
	}
	_ = exec.Command("ip", "link", "del", l.bridge).Run()
}

// addr is host i's (0-based) address.
func (l *netLab) addr(i int) string { return fmt.Sprintf("%s%d", l.subnet, i+1) }

// daemon is a lupool daemon on host i, listening on the host's address.
func (l *netLab) daemon(i int, id string, via *daemon, extra ...string) *daemon {
	d := newDaemon(l.t, id, extra...)
	d.via = via
	d.netns = l.hosts[i]
	d.nbd, d.api, d.peer = l.addr(i)+":10809", l.addr(i)+":10810", l.addr(i)+":10811"
	return d
}

// cluster3 starts three daemons n1 (bootstrap), n2, n3 on hosts 0, 1, 2.
func (l *netLab) cluster3(extra ...string) (n1, n2, n3 *daemon) {
	n1 = l.daemon(0, "n1", nil, extra...)
	n1.start()
	n2 = l.daemon(1, "n2", n1, extra...)
	n2.start()
	n3 = l.daemon(2, "n3", n1, extra...)
	n3.start()
	return n1, n2, n3
}

// isolate cuts host i off from every other host (both directions); the
// test's own namespace still reaches it.
func (l *netLab) isolate(i int) {
	l.t.Helper()
	l.blackholes(i, "add")
}

// heal undoes isolate.
func (l *netLab) heal(i int) {
	l.t.Helper()
	l.blackholes(i, "del")
}

func (l *netLab) blackholes(i int, op string) {
	for j := range l.hosts {
		if j == i {
			continue
		}
		l.ip("-n", l.hosts[i], "route", op, "blackhole", l.addr(j)+"/32")
		l.ip("-n", l.hosts[j], "route", op, "blackhole", l.addr(i)+"/32")
	}
}
