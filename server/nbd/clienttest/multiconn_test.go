package clienttest

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lupool/lupool/blockdev"
)

// TestMultiConnVisibility checks what CAN_MULTI_CONN promises, with three
// libnbd connections to one export (testdata/multiconn.py): a write
// completed on one connection and a FLUSH completed on another are seen by
// every connection; a FUA write is seen without a flush; zero and trim too.
// TestFioMultiConn only shows that two connections run at once, each
// verifying its own half; this test crosses the connections. It runs over
// a memory device and over a sparse-file volume (both MultiConn), and
// checks that the script fails against an export without CAN_MULTI_CONN.
func TestMultiConnVisibility(t *testing.T) {
	const size = 4 * miB
	t.Run("memory", func(t *testing.T) {
		srv, _ := startMem(t, size, blockdev.Caps{MultiConn: true})
		runNbdsh(t, "multiconn.py", "NBD_URI="+srv.uri("mem"), fmt.Sprintf("NBD_SIZE=%d", size))
	})
	t.Run("file", func(t *testing.T) {
		srv, vol, _ := startFile(t, size)
		if !vol.Caps().MultiConn {
			t.Fatal("lu file volume does not claim MultiConn; this test assumes it does")
		}
		runNbdsh(t, "multiconn.py", "NBD_URI="+srv.uri("file"), fmt.Sprintf("NBD_SIZE=%d", size))
	})
	t.Run("not advertised", func(t *testing.T) {
		// The script must refuse an export that does not promise multi-conn:
		// shows its checks can fail.
		srv, _ := startMem(t, size, blockdev.Caps{})
		py := nbdshPython(t)
		lib, err := filepath.Abs(filepath.Join("testdata", "lib.py"))
		if err != nil {
			t.Fatal(err)
		}
		body, err := filepath.Abs(filepath.Join("testdata", "multiconn.py"))
		if err != nil {
			t.Fatal(err)
		}
		code := fmt.Sprintf("exec(open(%q).read()); exec(open(%q).read())", lib, body)
		r := runTool(t, []string{"NBD_URI=" + srv.uri("mem"), fmt.Sprintf("NBD_SIZE=%d", size)},
			py, "-m", "nbd", "-c", code)
		if r.err == nil || strings.Contains(r.stdout, "OK") {
			t.Fatalf("multiconn.py passed against an export without CAN_MULTI_CONN:\n%s", r.stdout)
		}
		if !strings.Contains(r.stderr, "CAN_MULTI_CONN not advertised") {
			t.Errorf("multiconn.py failed for another reason:\n%s", r.stderr)
		}
	})
}
