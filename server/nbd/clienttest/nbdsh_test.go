package clienttest

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"syscall"
	"testing"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/blockdev/blockdevtest"
	"github.com/lupool/lupool/server/nbd"
)

// TestNbdshCommands runs every command and flag through libnbd with
// structured replies on and off (testdata/commands.py), then checks the
// device holds what the script wrote.
func TestNbdshCommands(t *testing.T) {
	for _, sr := range []string{"1", "0"} {
		t.Run("structured="+sr, func(t *testing.T) {
			srv, dev := startMem(t, 40*miB, blockdev.Caps{})
			runNbdsh(t, "commands.py", "NBD_URI="+srv.uri("mem"), "NBD_SR="+sr, "NBD_FLAT_DEVICE=1")

			got := dev.Bytes()
			want := map[string]struct {
				off  int
				data []byte
			}{
				"pattern":        {0, pattern(64*kiB, 1)},
				"FUA write":      {64 * kiB, bytes.Repeat([]byte{0xaa}, 4*kiB)},
				"unaligned":      {1000000, []byte("\x00xyz\x00")},
				"trim":           {1 * miB, make([]byte, miB)},
				"zero":           {2 * miB, make([]byte, miB)},
				"zero NO_HOLE":   {3 * miB, make([]byte, miB)},
				"FAST_ZERO":      {5 * miB, append(make([]byte, 4*kiB), bytes.Repeat([]byte{0x11}, 4*kiB)...)},
				"aio write 0":    {7 * miB, pattern(4*kiB, 0)},
				"aio write last": {7*miB + 63*4*kiB, pattern(4*kiB, 63)},
			}
			for what, w := range want {
				if !bytes.Equal(got[w.off:w.off+len(w.data)], w.data) {
					t.Errorf("%s: device bytes at %d differ from what the client wrote", what, w.off)
				}
			}
			// Allocation on the device: trimmed and zeroed ranges are holes,
			// the NO_HOLE range is allocated.
			ext, err := dev.Extents(context.Background(), 1*miB, 3*miB, nil)
			if err != nil {
				t.Fatal(err)
			}
			wantExt := []blockdev.Extent{
				{LengthBytes: 2 * miB, Flags: blockdev.ExtentHole | blockdev.ExtentZero},
				{LengthBytes: 1 * miB, Flags: 0},
			}
			if fmt.Sprint(ext) != fmt.Sprint(wantExt) {
				t.Errorf("device extents of [1M,4M) = %v, want %v", ext, wantExt)
			}
			// One FUA write, two flushes, a FUA trim and a FUA zero at least.
			if n := dev.Flushes(); n < 3 {
				t.Errorf("device saw %d flushes/FUA operations, want >= 3", n)
			}
		})
	}
}

// TestNbdshErrors sends invalid requests on purpose and checks each NBD
// error code and that the connection survives (testdata/errors.py).
func TestNbdshErrors(t *testing.T) {
	for _, sr := range []string{"1", "0"} {
		t.Run("structured="+sr, func(t *testing.T) {
			srv, dev := startMem(t, 8*miB, blockdev.Caps{})
			runNbdsh(t, "errors.py", "NBD_URI="+srv.uri("mem"), "NBD_SR="+sr)
			if got := dev.Bytes(); !bytes.Equal(got[8*miB-64*kiB:], make([]byte, 64*kiB)) {
				t.Errorf("a refused write past the end changed the last 64 KiB")
			}
		})
	}
}

// TestNbdshReadOnly checks EPERM for every mutation of a read-only export.
func TestNbdshReadOnly(t *testing.T) {
	srv, dev := startMem(t, 4*miB, blockdev.Caps{ReadOnly: true})
	runNbdsh(t, "readonly.py", "NBD_URI="+srv.uri("mem"))
	if !bytes.Equal(dev.Bytes(), make([]byte, 4*miB)) {
		t.Error("read-only device was modified")
	}
}

// TestNbdshDeviceErrors injects device errors and checks that each becomes
// the right NBD error reply, simple and structured, on a connection that
// stays usable (testdata/faults.py).
func TestNbdshDeviceErrors(t *testing.T) {
	in := func(off, start, length int64) bool { return off >= start && off < start+length }
	fault := func(op blockdevtest.Op, off, length int64) error {
		end := off + length
		overlaps := func(start, l int64) bool { return off < start+l && end > start }
		switch {
		case op == blockdevtest.OpRead && overlaps(1*miB, 64*kiB):
			return fmt.Errorf("injected: %w", blockdev.ErrIO)
		case op == blockdevtest.OpRead && in(off, 6*miB, miB):
			return blockdev.ErrShutdown
		case op == blockdevtest.OpWrite && in(off, 2*miB, 64*kiB):
			return blockdev.ErrNoSpace
		case op == blockdevtest.OpWrite && in(off, 3*miB, 64*kiB):
			return fmt.Errorf("injected write: %w", syscall.ENOSPC)
		case op == blockdevtest.OpTrim && in(off, 4*miB, miB):
			return blockdev.ErrIO
		case op == blockdevtest.OpZero && in(off, 5*miB, miB):
			return blockdev.ErrNotSupported
		case op == blockdevtest.OpFlush:
			return blockdev.ErrIO
		}
		return nil
	}
	for _, sr := range []string{"1", "0"} {
		t.Run("structured="+sr, func(t *testing.T) {
			srv, dev := startMem(t, 8*miB, blockdev.Caps{})
			dev.SetFault(fault)
			runNbdsh(t, "faults.py", "NBD_URI="+srv.uri("mem"), "NBD_SR="+sr, "NBD_FAULT_FLUSH=1")
			if got := dev.Bytes()[2*miB : 2*miB+4*kiB]; !bytes.Equal(got, make([]byte, 4*kiB)) {
				t.Error("a failed write landed")
			}
		})
	}
}

// TestNbdshExportName uses the legacy NBD_OPT_EXPORT_NAME path, with and
// without the 124 zero bytes (testdata/exportname.py).
func TestNbdshExportName(t *testing.T) {
	const size = 4 * miB
	for _, flags := range []struct{ name, value string }{
		{"zeroes", "0"},
		{"no-zeroes", "2"}, // LIBNBD_HANDSHAKE_FLAG_NO_ZEROES
	} {
		t.Run(flags.name, func(t *testing.T) {
			srv, dev := startMem(t, size, blockdev.Caps{})
			runNbdsh(t, "exportname.py", "NBD_URI="+srv.uri("mem"), "NBD_HSFLAGS="+flags.value,
				fmt.Sprintf("NBD_SIZE=%d", size))
			if !bytes.Equal(dev.Bytes()[4*kiB:12*kiB], pattern(8*kiB, 5)) {
				t.Error("data written over EXPORT_NAME is not on the device")
			}
		})
	}
}

// TestNbdshOptionMode drives negotiation by hand: LIST, INFO of unknown and
// known exports, block sizes, description, LIST_META_CONTEXT, and GO after
// a failed GO (testdata/optmode.py).
func TestNbdshOptionMode(t *testing.T) {
	a, _ := memExport("alpha", 3*miB, blockdev.Caps{})
	b, _ := memExport("beta", 5*miB, blockdev.Caps{MultiConn: true})
	srv := startServer(t, serverConfig{exports: []nbd.Export{a, b}})
	var list []string
	for _, e := range []nbd.Export{a, b} {
		list = append(list, e.Name+"="+e.Description)
	}
	runNbdsh(t, "optmode.py", "NBD_URI=nbd://"+srv.addr+"/", "NBD_EXPORTS="+strings.Join(list, ";"),
		"NBD_EXPORT=beta", fmt.Sprintf("NBD_SIZE=%d", 5*miB))
}
