package clienttest

import (
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
	"github.com/lupool/lupool/server/nbd"
	"github.com/lupool/lupool/server/nbdproto"
)

// tlsFiles makes a CA and a server certificate for 127.0.0.1, writes them
// in the layout libnbd's tls-certificates directory expects (ca-cert.pem)
// plus server-cert.pem/server-key.pem, and returns the directory and the
// server's tls.Config loaded from those files.
func tlsFiles(t *testing.T) (string, *tls.Config) {
	t.Helper()
	dir := t.TempDir()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "lupool test CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "127.0.0.1"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(24 * time.Hour),
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames:     []string{"localhost"},
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	write := func(name, typ string, b []byte) {
		if err := os.WriteFile(filepath.Join(dir, name), pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: b}), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("ca-cert.pem", "CERTIFICATE", caDER)
	write("server-cert.pem", "CERTIFICATE", der)
	write("server-key.pem", "EC PRIVATE KEY", keyDER)
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "server-cert.pem"), filepath.Join(dir, "server-key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	return dir, &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
}

// TestTLS checks STARTTLS with nbdinfo and nbdsh in the required and
// optional modes, that the required mode refuses plain clients, and that a
// client which does not trust the CA is refused.
func TestTLS(t *testing.T) {
	dir, cfg := tlsFiles(t)
	otherCA, _ := tlsFiles(t)
	for _, mode := range []struct {
		name       string
		mode       nbd.TLSMode
		plainWorks bool
	}{
		{"required", nbd.TLSRequired, false},
		{"optional", nbd.TLSOptional, true},
	} {
		t.Run(mode.name, func(t *testing.T) {
			e, dev := memExport("mem", 4*miB, blockdev.Caps{})
			srv := startServer(t, serverConfig{exports: []nbd.Export{e}, tlsMode: mode.mode, tlsConfig: cfg})
			tlsURI := "nbds://" + srv.addr + "/mem?tls-certificates=" + dir

			info := parseNbdinfo(t, mustRun(t, "nbdinfo", "--json", tlsURI))
			if !info.TLS || len(info.Exports) != 1 || info.Exports[0].SizeBytes != 4*miB {
				t.Errorf("nbdinfo over TLS: TLS %v exports %+v", info.TLS, info.Exports)
			}
			// Data over TLS reaches the device.
			runNbdsh(t, "tls.py", "NBD_URI="+tlsURI, "NBD_SIZE=4194304")
			if got := dev.Bytes()[4*kiB : 12*kiB]; string(got) != string(pattern(8*kiB, 5)) {
				t.Error("data written over TLS is not on the device")
			}

			// Option by option: without STARTTLS, LIST is refused with
			// TLS_REQD in the required mode and answered in the optional one.
			c := dialRaw(t, srv.addr)
			greet(t, c, nbdproto.ClientFlagFixedNewstyle)
			writeRaw(t, c, optionHeader(nbdproto.OptList, 0))
			r, _ := readOptionReply(t, c)
			if mode.plainWorks && r.Type != nbdproto.RepServer {
				t.Errorf("LIST without TLS in optional mode: reply %#x, want NBD_REP_SERVER", r.Type)
			}
			if !mode.plainWorks && r.Type != nbdproto.RepErrTLSReqd {
				t.Errorf("LIST without TLS in required mode: reply %#x, want NBD_REP_ERR_TLS_REQD", r.Type)
			}

			plain := runTool(t, nil, "nbdinfo", "--json", srv.uri("mem"))
			if mode.plainWorks && plain.err != nil {
				t.Errorf("plain client refused in optional mode: %v\n%s", plain.err, plain.stderr)
			}
			if !mode.plainWorks && plain.err == nil {
				t.Errorf("plain client served in required mode:\n%s", plain.stdout)
			}
			// A client that trusts another CA only.
			untrusted := runTool(t, nil, "nbdinfo", "nbds://"+srv.addr+"/mem?tls-certificates="+otherCA)
			if untrusted.err == nil {
				t.Error("client without the CA completed the TLS handshake")
			}
		})
	}
}
