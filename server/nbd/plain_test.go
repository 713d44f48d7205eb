package nbd

import (
	"bytes"
	"encoding/binary"
	"testing"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/blockdev/blockdevtest"
	"github.com/lupool/lupool/server/nbdproto"
)

// plainDevice hides every optional interface of the device it wraps.
type plainDevice struct{ blockdev.Device }

// TestDeviceWithoutOptionalInterfaces checks the fallbacks: zeroes by
// writing zero buffers, no trim, block status reporting data, cache as a
// no-op.
func TestDeviceWithoutOptionalInterfaces(t *testing.T) {
	mem := blockdevtest.NewMem(3<<20, blockdev.Caps{})
	ts := startServer(t, blockdev.Caps{}, nil, Export{Name: "plain", Device: plainDevice{mem}})
	c := dialRaw(t, ts.addr)
	_, flags := c.attach("plain", true)
	if flags&nbdproto.TxFlagSendTrim != 0 || flags&nbdproto.TxFlagSendWriteZeroes == 0 {
		t.Fatalf("flags %#x: want write-zeroes without trim", flags)
	}
	ones := bytes.Repeat([]byte{0xff}, 3<<20)
	c.request(nbdproto.CmdWrite, 0, 1, 0, uint32(len(ones)), ones)
	if ch := c.chunk(); ch.errorCode() != 0 {
		t.Fatalf("write: %s", errName(ch.errorCode()))
	}
	// More than the 1 MiB zero buffer, unaligned, with FUA.
	flushes := mem.Flushes()
	c.request(nbdproto.CmdWriteZeroes, nbdproto.CmdFlagFUA, 2, 100, 2<<20+5, nil)
	if ch := c.chunk(); ch.errorCode() != 0 {
		t.Fatalf("write zeroes: %s", errName(ch.errorCode()))
	}
	got := mem.Bytes()
	want := append(append(bytes.Repeat([]byte{0xff}, 100), make([]byte, 2<<20+5)...), bytes.Repeat([]byte{0xff}, 3<<20-100-(2<<20+5))...)
	if !bytes.Equal(got, want) {
		t.Fatal("emulated write zeroes wrote the wrong range")
	}
	if mem.Flushes() == flushes {
		t.Error("FUA on emulated write zeroes did not flush")
	}
	c.request(nbdproto.CmdWriteZeroes, nbdproto.CmdFlagFastZero, 3, 0, 4096, nil)
	if ch := c.chunk(); ch.errorCode() != nbdproto.ENOTSUP {
		t.Fatalf("fast zero without Zeroer: %s", errName(ch.errorCode()))
	}
	c.request(nbdproto.CmdTrim, 0, 4, 0, 4096, nil)
	if ch := c.chunk(); ch.errorCode() != nbdproto.EINVAL {
		t.Fatalf("trim without Trimmer: %s", errName(ch.errorCode()))
	}
	c.request(nbdproto.CmdCache, 0, 5, 0, 4096, nil)
	if ch := c.chunk(); ch.errorCode() != 0 {
		t.Fatalf("cache without Cacher: %s", errName(ch.errorCode()))
	}
	c.request(nbdproto.CmdBlockStatus, 0, 6, 4096, 8192, nil)
	ch := c.chunk()
	if ch.Type != nbdproto.ReplyTypeBlockStatus || len(ch.data) != 12 ||
		binary.BigEndian.Uint32(ch.data[4:]) != 8192 || binary.BigEndian.Uint32(ch.data[8:]) != 0 {
		t.Fatalf("block status without Extenter: type %#x data %x", ch.Type, ch.data)
	}
}
