package nbd

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/server/nbdproto"
)

// writeTestCert writes a self-signed certificate for 127.0.0.1 and returns
// the file names.
func writeTestCert(t *testing.T) (certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "lupool-test"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IsCA:         true, BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile
}

func TestTLS(t *testing.T) {
	certFile, keyFile := writeTestCert(t)
	cfg, err := LoadTLSConfig(certFile, keyFile, "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := LoadTLSConfig(certFile, keyFile, filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Fatal("missing CA file accepted")
	}
	for _, mode := range []TLSMode{TLSRequired, TLSOptional} {
		ts := startServer(t, blockdev.Caps{}, func(o *Options) { o.TLSMode, o.TLSConfig = mode, cfg })
		c := dialRaw(t, ts.addr)
		c.greet(nbdproto.ClientFlagFixedNewstyle | nbdproto.ClientFlagNoZeroes)
		if mode == TLSRequired {
			c.option(nbdproto.OptGo, infoPayload("disk"))
			c.expectReply(nbdproto.OptGo, nbdproto.RepErrTLSReqd)
			c.option(nbdproto.OptList, nil)
			c.expectReply(nbdproto.OptList, nbdproto.RepErrTLSReqd)
		}
		c.option(nbdproto.OptStartTLS, nil)
		c.expectReply(nbdproto.OptStartTLS, nbdproto.RepAck)
		tc := tls.Client(c.conn, &tls.Config{InsecureSkipVerify: true})
		if err := tc.Handshake(); err != nil {
			t.Fatalf("mode %d: TLS handshake: %v", mode, err)
		}
		c.conn, c.r = tc, bufio.NewReader(tc)
		c.option(nbdproto.OptStartTLS, nil)
		c.expectReply(nbdproto.OptStartTLS, nbdproto.RepErrInvalid)
		c.option(nbdproto.OptGo, infoPayload("disk"))
		c.goReplies(nbdproto.OptGo)
		data := pattern(4096, 9)
		if code := c.do(nbdproto.CmdWrite, 0, 4096, 4096, data); code != 0 {
			t.Fatalf("write over TLS: %s", errName(code))
		}
		c.request(nbdproto.CmdRead, 0, 5, 4096, 4096, nil)
		if _, code, got := c.simpleReply(4096); code != 0 || string(got) != string(data) {
			t.Fatalf("read over TLS: %s", errName(code))
		}
		st := ts.srv.ConnStats()
		if len(st) != 1 || !st[0].TLS {
			t.Fatalf("conn stats %+v", st)
		}
		if mode == TLSOptional {
			plain := dialRaw(t, ts.addr)
			plain.attach("disk", false)
			if code := plain.do(nbdproto.CmdFlush, 0, 0, 0, nil); code != 0 {
				t.Fatalf("plain client in optional mode: %s", errName(code))
			}
		}
	}
	if _, err := NewServer(Options{Exports: NewExportSet(), TLSMode: TLSRequired}); err == nil {
		t.Fatal("TLSRequired without config accepted")
	}
}
