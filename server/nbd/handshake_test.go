package nbd

import (
	"bytes"
	"encoding/binary"
	"testing"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/blockdev/blockdevtest"
	"github.com/lupool/lupool/server/nbdproto"
)

func TestGoSendsAllInfos(t *testing.T) {
	ts := startServer(t, blockdev.Caps{}, nil)
	c := dialRaw(t, ts.addr)
	c.greet(nbdproto.ClientFlagFixedNewstyle | nbdproto.ClientFlagNoZeroes)
	// Ask for nothing: every info still comes (nbd-client never asks).
	c.option(nbdproto.OptInfo, infoPayload("disk"))
	size, flags, infos := c.goReplies(nbdproto.OptInfo)
	if size != testSizeBytes {
		t.Errorf("size %d", size)
	}
	if string(infos[nbdproto.InfoName]) != "disk" || string(infos[nbdproto.InfoDescription]) != "test disk" {
		t.Errorf("name %q description %q", infos[nbdproto.InfoName], infos[nbdproto.InfoDescription])
	}
	bs := infos[nbdproto.InfoBlockSize]
	if len(bs) != 12 || binary.BigEndian.Uint32(bs) != 1 || binary.BigEndian.Uint32(bs[4:]) != 4096 ||
		binary.BigEndian.Uint32(bs[8:]) != 32<<20 {
		t.Errorf("block size info %x", bs)
	}
	if flags&nbdproto.TxFlagCanMultiConn != 0 {
		t.Error("CAN_MULTI_CONN advertised for a device without MultiConn")
	}
	if flags&nbdproto.TxFlagSendDF != 0 {
		t.Error("DF advertised without structured replies")
	}
	for _, f := range []uint16{nbdproto.TxFlagSendFlush, nbdproto.TxFlagSendFUA, nbdproto.TxFlagSendTrim, nbdproto.TxFlagSendWriteZeroes} {
		if flags&f == 0 {
			t.Errorf("flag %#x missing from %#x", f, flags)
		}
	}
	// INFO leaves negotiation open: an unknown export is an error reply and
	// negotiation goes on.
	c.option(nbdproto.OptGo, infoPayload("nope"))
	c.expectReply(nbdproto.OptGo, nbdproto.RepErrUnknown)
	c.option(nbdproto.OptGo, infoPayload("disk"))
	c.goReplies(nbdproto.OptGo)
	if code := c.do(nbdproto.CmdFlush, 0, 0, 0, nil); code != 0 {
		t.Fatalf("flush after GO: %s", errName(code))
	}
}

func TestMultiConnFlag(t *testing.T) {
	ts := startServer(t, blockdev.Caps{MultiConn: true, ReadOnly: true}, nil)
	c := dialRaw(t, ts.addr)
	_, flags := c.attach("disk", true)
	want := nbdproto.TxFlagCanMultiConn | nbdproto.TxFlagReadOnly | nbdproto.TxFlagSendDF
	if flags&want != want {
		t.Errorf("flags %#x lack %#x", flags, want)
	}
	if flags&(nbdproto.TxFlagSendTrim|nbdproto.TxFlagSendWriteZeroes) != 0 {
		t.Errorf("read-only export advertises trim/zero: %#x", flags)
	}
}

func TestExportName(t *testing.T) {
	ts := startServer(t, blockdev.Caps{}, nil)
	for _, noZeroes := range []bool{false, true} {
		c := dialRaw(t, ts.addr)
		cf := nbdproto.ClientFlagFixedNewstyle
		if noZeroes {
			cf |= nbdproto.ClientFlagNoZeroes
		}
		c.greet(cf)
		c.option(nbdproto.OptExportName, []byte("disk"))
		b := c.read(nbdproto.ExportNameReplySize)
		if binary.BigEndian.Uint64(b) != testSizeBytes {
			t.Fatalf("size %x", b)
		}
		if !noZeroes {
			if z := c.read(nbdproto.ExportNameZeroPadSize); !bytes.Equal(z, make([]byte, 124)) {
				t.Fatalf("padding %x", z)
			}
		}
		// The next bytes must be the reply to our request, not padding.
		if code := c.do(nbdproto.CmdFlush, 0, 0, 0, nil); code != 0 {
			t.Fatalf("noZeroes=%v: flush %s", noZeroes, errName(code))
		}
	}
	// Unknown name with EXPORT_NAME: the server can only close.
	c := dialRaw(t, ts.addr)
	c.greet(nbdproto.ClientFlagFixedNewstyle)
	c.option(nbdproto.OptExportName, []byte("nope"))
	c.expectClosed()
}

func TestDefaultExport(t *testing.T) {
	ts := startServer(t, blockdev.Caps{}, nil)
	c := dialRaw(t, ts.addr)
	if size, _ := c.attach("", false); size != testSizeBytes {
		t.Fatalf("default export size %d", size)
	}
	// With two exports the empty name is unknown.
	ts2 := startServer(t, blockdev.Caps{}, nil, Export{Name: "other", Device: blockdevtest.NewMem(4096, blockdev.Caps{})})
	c2 := dialRaw(t, ts2.addr)
	c2.greet(nbdproto.ClientFlagFixedNewstyle)
	c2.option(nbdproto.OptGo, infoPayload(""))
	c2.expectReply(nbdproto.OptGo, nbdproto.RepErrUnknown)
}

func TestListAbortUnsupported(t *testing.T) {
	ts := startServer(t, blockdev.Caps{}, nil, Export{Name: "b-second", Description: "two", Device: blockdevtest.NewMem(4096, blockdev.Caps{})})
	c := dialRaw(t, ts.addr)
	c.greet(nbdproto.ClientFlagFixedNewstyle)
	// Unknown option with a payload: skipped exactly, then UNSUP.
	c.option(99, []byte("some payload bytes"))
	c.expectReply(99, nbdproto.RepErrUnsup)
	c.option(nbdproto.OptList, nil)
	var names []string
	for {
		r := c.optReply()
		if r.Type == nbdproto.RepAck {
			break
		}
		if r.Type != nbdproto.RepServer {
			t.Fatalf("type %#x", r.Type)
		}
		n := binary.BigEndian.Uint32(r.data)
		names = append(names, string(r.data[4:4+n])+"="+string(r.data[4+n:]))
	}
	if len(names) != 2 || names[0] != "b-second=two" || names[1] != "disk=test disk" {
		t.Fatalf("list %q", names)
	}
	c.option(nbdproto.OptList, []byte{1})
	c.expectReply(nbdproto.OptList, nbdproto.RepErrInvalid)
	c.option(nbdproto.OptStructuredReply, []byte{1})
	c.expectReply(nbdproto.OptStructuredReply, nbdproto.RepErrInvalid)
	c.option(nbdproto.OptGo, []byte{0, 0, 0, 9, 'x'})
	c.expectReply(nbdproto.OptGo, nbdproto.RepErrInvalid)
	c.option(nbdproto.OptStartTLS, nil)
	c.expectReply(nbdproto.OptStartTLS, nbdproto.RepErrPolicy)
	c.option(nbdproto.OptAbort, nil)
	c.expectReply(nbdproto.OptAbort, nbdproto.RepAck)
	c.expectClosed()
}

func TestMetaContext(t *testing.T) {
	ts := startServer(t, blockdev.Caps{}, nil)
	c := dialRaw(t, ts.addr)
	c.greet(nbdproto.ClientFlagFixedNewstyle)
	// SET before STRUCTURED_REPLY is invalid.
	c.option(nbdproto.OptSetMetaContext, metaPayload("disk", nbdproto.ContextBaseAllocation))
	c.expectReply(nbdproto.OptSetMetaContext, nbdproto.RepErrInvalid)
	// LIST with no query and with "base:" returns base:allocation.
	for _, q := range [][]string{nil, {"base:"}, {"qemu:dirty-bitmap:x", nbdproto.ContextBaseAllocation}} {
		c.option(nbdproto.OptListMetaContext, metaPayload("disk", q...))
		r := c.expectReply(nbdproto.OptListMetaContext, nbdproto.RepMetaContext)
		if string(r.data[4:]) != nbdproto.ContextBaseAllocation {
			t.Fatalf("context %q", r.data[4:])
		}
		c.expectReply(nbdproto.OptListMetaContext, nbdproto.RepAck)
	}
	c.option(nbdproto.OptListMetaContext, metaPayload("disk", "qemu:x"))
	c.expectReply(nbdproto.OptListMetaContext, nbdproto.RepAck)
	c.option(nbdproto.OptListMetaContext, metaPayload("nope"))
	c.expectReply(nbdproto.OptListMetaContext, nbdproto.RepErrUnknown)
	c.option(nbdproto.OptStructuredReply, nil)
	c.expectReply(nbdproto.OptStructuredReply, nbdproto.RepAck)
	// SET for a different export than the one we GO to: no block status.
	ts.exports.Add(Export{Name: "other", Device: blockdevtest.NewMem(8192, blockdev.Caps{})})
	c.option(nbdproto.OptSetMetaContext, metaPayload("other", nbdproto.ContextBaseAllocation))
	c.expectReply(nbdproto.OptSetMetaContext, nbdproto.RepMetaContext)
	c.expectReply(nbdproto.OptSetMetaContext, nbdproto.RepAck)
	c.option(nbdproto.OptGo, infoPayload("disk"))
	c.goReplies(nbdproto.OptGo)
	c.request(nbdproto.CmdBlockStatus, 0, 1, 0, 4096, nil)
	if ch := c.chunk(); ch.errorCode() != nbdproto.EINVAL {
		t.Fatalf("block status without context: chunk type %#x code %s", ch.Type, errName(ch.errorCode()))
	}
}

func TestHostileNegotiation(t *testing.T) {
	ts := startServer(t, blockdev.Caps{}, func(o *Options) { o.HandshakeTimeout = 2e9 })
	var hdr [nbdproto.OptionHeaderSize]byte
	cases := map[string]func(c *rawClient){
		"garbage magic": func(c *rawClient) {
			c.greet(nbdproto.ClientFlagFixedNewstyle)
			c.send([]byte("GARBAGE!GARBAGE!"))
		},
		"unknown client flags": func(c *rawClient) { c.greet(1 << 7) },
		"truncated option": func(c *rawClient) {
			c.greet(nbdproto.ClientFlagFixedNewstyle)
			nbdproto.PutOptionHeader(hdr[:], nbdproto.OptionHeader{Option: nbdproto.OptGo, Length: 100})
			c.send(hdr[:], []byte{0, 0})
			_ = c.conn.(interface{ CloseWrite() error }).CloseWrite()
		},
		"option over the limit": func(c *rawClient) {
			c.greet(nbdproto.ClientFlagFixedNewstyle)
			nbdproto.PutOptionHeader(hdr[:], nbdproto.OptionHeader{Option: 99, Length: 1 << 31})
			c.send(hdr[:])
			c.expectReply(99, nbdproto.RepErrTooBig)
		},
		"too many options": func(c *rawClient) {
			c.greet(nbdproto.ClientFlagFixedNewstyle)
			nbdproto.PutOptionHeader(hdr[:], nbdproto.OptionHeader{Option: 99})
			go func() {
				for range MaxOptions + 1 {
					if _, err := c.conn.Write(hdr[:]); err != nil {
						return
					}
				}
			}()
			for range MaxOptions {
				c.expectReply(99, nbdproto.RepErrUnsup)
			}
		},
		"silent client": func(c *rawClient) {
			c.read(nbdproto.GreetingSize) // then nothing: the handshake deadline ends it
		},
	}
	for name, f := range cases {
		t.Run(name, func(t *testing.T) {
			c := dialRaw(t, ts.addr)
			c.t = t
			f(c)
			c.expectClosed()
			// Others are still served.
			ok := dialRaw(t, ts.addr)
			ok.attach("disk", false)
			if code := ok.do(nbdproto.CmdFlush, 0, 0, 0, nil); code != 0 {
				t.Fatalf("flush: %s", errName(code))
			}
		})
	}
}

// TestGoSendsLUIDOnlyWhenAsked: the lupool-private NBD_INFO with the export's
// identity goes only to a client that lists it; stock clients never see it.
func TestGoSendsLUIDOnlyWhenAsked(t *testing.T) {
	ts := startServer(t, blockdev.Caps{}, nil, Export{Name: "ided", ID: "n1/42", Device: blockdevtest.NewMem(testSizeBytes, blockdev.Caps{})})
	c := dialRaw(t, ts.addr)
	c.greet(nbdproto.ClientFlagFixedNewstyle | nbdproto.ClientFlagNoZeroes)
	c.option(nbdproto.OptInfo, infoPayload("ided"))
	if _, _, infos := c.goReplies(nbdproto.OptInfo); infos[nbdproto.InfoLUID] != nil {
		t.Errorf("LU id %q sent unasked", infos[nbdproto.InfoLUID])
	}
	c.option(nbdproto.OptInfo, infoPayload("ided", nbdproto.InfoLUID))
	if _, _, infos := c.goReplies(nbdproto.OptInfo); string(infos[nbdproto.InfoLUID]) != "n1/42" {
		t.Errorf("LU id %q, want n1/42", infos[nbdproto.InfoLUID])
	}
	c.option(nbdproto.OptInfo, infoPayload("disk", nbdproto.InfoLUID))
	if _, _, infos := c.goReplies(nbdproto.OptInfo); infos[nbdproto.InfoLUID] != nil {
		t.Errorf("export without an id sent LU id %q", infos[nbdproto.InfoLUID])
	}
}
