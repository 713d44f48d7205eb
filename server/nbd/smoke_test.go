package nbd

import (
	"os/exec"
	"strings"
	"testing"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/internal/realclient"
)

func TestNbdinfoSmoke(t *testing.T) {
	realclient.Require(t, "nbdinfo")
	ts := startServer(t, blockdev.Caps{MultiConn: true}, nil)
	out, err := exec.Command("nbdinfo", "nbd://"+ts.addr+"/disk").CombinedOutput()
	if err != nil {
		t.Fatalf("nbdinfo: %v\n%s", err, out)
	}
	t.Logf("%s", out)
	for _, want := range []string{"export-size: 16777216", "can_multi_conn: true", "block_size_maximum: 33554432", "base:allocation"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("nbdinfo output lacks %q", want)
		}
	}
}
