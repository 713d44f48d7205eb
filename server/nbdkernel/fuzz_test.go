package nbdkernel

import (
	"encoding/binary"
	"strings"
	"testing"

	"github.com/lupool/lupool/server/nbdproto"
)

// FuzzParseInfo: any NBD_REP_INFO payload is accepted or refused with
// ErrProtocol, never a panic; an accepted LU id is the payload's tail and
// within the string limit, and an accepted NBD_INFO_EXPORT sets the size.
func FuzzParseInfo(f *testing.F) {
	be := binary.BigEndian
	f.Add(be.AppendUint64(be.AppendUint16(nil, nbdproto.InfoExport), 1<<20))
	f.Add(append(be.AppendUint16(nil, nbdproto.InfoLUID), "n1@1796647119187617782"...))
	f.Add(append(be.AppendUint16(nil, nbdproto.InfoLUID), strings.Repeat("x", 5000)...))
	f.Add(be.AppendUint16(nil, nbdproto.InfoBlockSize))
	f.Add([]byte{0})
	f.Fuzz(func(t *testing.T, p []byte) {
		var info ExportInfo
		var have bool
		if err := parseInfo(p, &info, &have); err != nil {
			return
		}
		if len(p) < 2 {
			t.Fatalf("accepted %d bytes", len(p))
		}
		switch be.Uint16(p) {
		case nbdproto.InfoLUID:
			if info.LUID != string(p[2:]) || len(info.LUID) > nbdproto.MaxStringBytes {
				t.Errorf("LU id %q from %q", info.LUID, p)
			}
		case nbdproto.InfoExport:
			if !have || info.SizeBytes != be.Uint64(p[2:]) {
				t.Errorf("export info %+v from %x", info, p)
			}
		}
	})
}
