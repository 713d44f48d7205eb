package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io/fs"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// newTestCA returns a fresh CA or fails the test.
func newTestCA(t testing.TB) *CA {
	t.Helper()
	id, err := NewClusterID()
	if err != nil {
		t.Fatal(err)
	}
	ca, err := NewCA(id)
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

// issueTestNode issues a node certificate for a fresh key and returns it as
// a tls.Certificate with Leaf set, plus its PEMs.
func issueTestNode(t testing.TB, ca *CA, id string, hosts ...string) (tls.Certificate, []byte, []byte) {
	t.Helper()
	key, keyPEM, err := NewKey()
	if err != nil {
		t.Fatal(err)
	}
	certPEM, err := ca.IssueNode(id, key.Public(), hosts)
	if err != nil {
		t.Fatalf("IssueNode(%q): %v", id, err)
	}
	c, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	if c.Leaf == nil {
		t.Fatal("X509KeyPair left Leaf nil")
	}
	return c, certPEM, keyPEM
}

// signRaw signs tmpl with ca's key for a fresh key: certificates IssueNode
// would never make, for NodeID's negative tests.
func signRaw(t *testing.T, ca *CA, tmpl *x509.Certificate) *x509.Certificate {
	t.Helper()
	key, _, err := NewKey()
	if err != nil {
		t.Fatal(err)
	}
	if tmpl.SerialNumber == nil {
		tmpl.SerialNumber = big.NewInt(7)
	}
	if tmpl.NotAfter.IsZero() {
		tmpl.NotBefore = time.Now().Add(-time.Hour)
		tmpl.NotAfter = time.Now().Add(time.Hour)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, key.Public(), ca.Key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestNewCAShape(t *testing.T) {
	ca, err := NewCA("0123456789abcdef")
	if err != nil {
		t.Fatal(err)
	}
	c := ca.Cert
	if !c.IsCA || !c.BasicConstraintsValid || !c.MaxPathLenZero {
		t.Errorf("CA flags: IsCA=%v BasicConstraintsValid=%v MaxPathLenZero=%v, want all true", c.IsCA, c.BasicConstraintsValid, c.MaxPathLenZero)
	}
	if got, want := c.Subject.CommonName, "lupool cluster 0123456789abcdef"; got != want {
		t.Errorf("CN %q, want %q", got, want)
	}
	if len(c.Subject.Organization) != 1 || c.Subject.Organization[0] != "lupool" {
		t.Errorf("O %q, want [lupool]", c.Subject.Organization)
	}
	pub, ok := c.PublicKey.(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() {
		t.Errorf("CA key %T, want ECDSA P-256", c.PublicKey)
	}
	if life := c.NotAfter.Sub(time.Now()); life < 9*365*24*time.Hour || life > 10*366*24*time.Hour {
		t.Errorf("CA lifetime %v, want about 10 years", life)
	}
	if err := c.CheckSignatureFrom(c); err != nil {
		t.Errorf("CA is not self-signed: %v", err)
	}
	if _, err := NewCA(""); err == nil {
		t.Error("NewCA(\"\") succeeded, want an error")
	}
	fp := ca.Fingerprint()
	if !strings.HasPrefix(fp, "sha256:") || !isLowerHex(strings.TrimPrefix(fp, "sha256:"), 64) {
		t.Errorf("Fingerprint %q, want sha256:<64 lowercase hex>", fp)
	}
	if other := newTestCA(t); other.Fingerprint() == fp {
		t.Error("two CAs have the same fingerprint")
	}
}

func TestIssueVerifyRoundTrip(t *testing.T) {
	ca := newTestCA(t)
	key, _, err := NewKey()
	if err != nil {
		t.Fatal(err)
	}
	pubPEM, err := PublicKeyPEM(key)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := ParsePublicKeyPEM(pubPEM)
	if err != nil {
		t.Fatal(err)
	}
	certPEM, err := ca.IssueNode("node-1.a_b", pub, []string{"127.0.0.1", "::1", "n1.example"})
	if err != nil {
		t.Fatal(err)
	}
	cert, err := parseCertPEM(certPEM)
	if err != nil {
		t.Fatal(err)
	}
	id, err := VerifyNode(ca.Pool(), cert, "node-1.a_b")
	if err != nil || id != "node-1.a_b" {
		t.Fatalf("VerifyNode = %q, %v; want node-1.a_b, nil", id, err)
	}
	if id, err := VerifyNode(ca.Pool(), cert, ""); err != nil || id != "node-1.a_b" {
		t.Fatalf("VerifyNode(expect \"\") = %q, %v", id, err)
	}
	if len(cert.URIs) != 1 || cert.URIs[0].String() != "lupool://node/node-1.a_b" {
		t.Errorf("URIs %v, want [lupool://node/node-1.a_b]", cert.URIs)
	}
	if cert.IsCA {
		t.Error("node certificate is a CA")
	}
	if cert.KeyUsage != x509.KeyUsageDigitalSignature {
		t.Errorf("KeyUsage %v, want DigitalSignature only", cert.KeyUsage)
	}
	if len(cert.ExtKeyUsage) != 2 || cert.ExtKeyUsage[0] != x509.ExtKeyUsageServerAuth || cert.ExtKeyUsage[1] != x509.ExtKeyUsageClientAuth {
		t.Errorf("ExtKeyUsage %v, want ServerAuth, ClientAuth", cert.ExtKeyUsage)
	}
	if len(cert.IPAddresses) != 2 || len(cert.DNSNames) != 1 || cert.DNSNames[0] != "n1.example" {
		t.Errorf("SANs IP %v DNS %v, want 2 IPs and n1.example", cert.IPAddresses, cert.DNSNames)
	}
	if !publicKeysEqual(cert.PublicKey, key.Public()) {
		t.Error("certificate does not hold the requested public key")
	}
	if cert.NotAfter.After(ca.Cert.NotAfter) {
		t.Errorf("node NotAfter %v past CA NotAfter %v", cert.NotAfter, ca.Cert.NotAfter)
	}
	if life := time.Until(cert.NotAfter); life < 4*365*24*time.Hour || life > 5*366*24*time.Hour {
		t.Errorf("node lifetime %v, want about 5 years", life)
	}
	if cert.SerialNumber.BitLen() < 100 {
		t.Errorf("serial %v has %d bits, want a random 128-bit serial", cert.SerialNumber, cert.SerialNumber.BitLen())
	}
	// A second certificate gets another serial.
	_, pem2, _ := issueTestNode(t, ca, "node-1.a_b")
	cert2, _ := parseCertPEM(pem2)
	if cert2.SerialNumber.Cmp(cert.SerialNumber) == 0 {
		t.Error("two certificates share a serial")
	}
}

func TestIssueNodeEd25519(t *testing.T) {
	ca := newTestCA(t)
	pub, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	certPEM, err := ca.IssueNode("ed", pub, nil)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := parseCertPEM(certPEM)
	if id, err := VerifyNode(ca.Pool(), cert, "ed"); err != nil || id != "ed" {
		t.Fatalf("VerifyNode = %q, %v", id, err)
	}
}

func TestIssueNodeRefuses(t *testing.T) {
	ca := newTestCA(t)
	key, _, _ := NewKey()
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	rsaKey, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	verifyOnly, err := ParseCA(ca.CertPEM, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		ca    *CA
		id    string
		pub   crypto.PublicKey
		hosts []string
	}{
		{"empty id", ca, "", key.Public(), nil},
		{"slash", ca, "a/b", key.Public(), nil},
		{"space", ca, "a b", key.Public(), nil},
		{"colon", ca, "a:b", key.Public(), nil},
		{"unicode", ca, "nöde", key.Public(), nil},
		{"too long", ca, strings.Repeat("a", 129), key.Public(), nil},
		{"verify-only CA", verifyOnly, "n1", key.Public(), nil},
		{"P-384", ca, "n1", p384.Public(), nil},
		{"RSA", ca, "n1", rsaKey.Public(), nil},
		{"nil key", ca, "n1", nil, nil},
		{"empty host", ca, "n1", key.Public(), []string{""}},
		{"host with space", ca, "n1", key.Public(), []string{"a b"}},
	} {
		if pem, err := tc.ca.IssueNode(tc.id, tc.pub, tc.hosts); err == nil {
			t.Errorf("%s: IssueNode succeeded (%d bytes), want an error", tc.name, len(pem))
		}
	}
	if _, err := ca.IssueNode(strings.Repeat("a", 128), key.Public(), nil); err != nil {
		t.Errorf("128-character id refused: %v", err)
	}
}

func TestVerifyNodeOtherCA(t *testing.T) {
	ca, other := newTestCA(t), newTestCA(t)
	c, _, _ := issueTestNode(t, other, "n1")
	id, err := VerifyNode(ca.Pool(), c.Leaf, "")
	if !errors.Is(err, ErrNotNode) {
		t.Fatalf("VerifyNode of another CA's cert = %q, %v; want ErrNotNode", id, err)
	}
	// NodeID alone does not check the signature: it still reads the id.
	if id, err := NodeID(c.Leaf); err != nil || id != "n1" {
		t.Errorf("NodeID = %q, %v; want n1", id, err)
	}
}

func TestVerifyNodeExpectMismatch(t *testing.T) {
	ca := newTestCA(t)
	c, _, _ := issueTestNode(t, ca, "n1")
	_, err := VerifyNode(ca.Pool(), c.Leaf, "n2")
	if !errors.Is(err, ErrNotNode) {
		t.Fatalf("expect mismatch: %v, want ErrNotNode", err)
	}
	if !strings.Contains(err.Error(), `"n1"`) || !strings.Contains(err.Error(), `"n2"`) {
		t.Errorf("error %q does not name the found and expected ids", err)
	}
}

func TestVerifyNodeNilPoolAndCert(t *testing.T) {
	ca := newTestCA(t)
	c, _, _ := issueTestNode(t, ca, "n1")
	if _, err := VerifyNode(nil, c.Leaf, ""); !errors.Is(err, ErrNotNode) {
		t.Errorf("nil pool: %v, want ErrNotNode", err)
	}
	if _, err := VerifyNode(ca.Pool(), nil, ""); !errors.Is(err, ErrNotNode) {
		t.Errorf("nil cert: %v, want ErrNotNode", err)
	}
}

func TestVerifyNodeExpired(t *testing.T) {
	ca := newTestCA(t)
	tmpl := &x509.Certificate{
		Subject:   pkix.Name{CommonName: "old"},
		URIs:      []*url.URL{nodeURI("old")},
		NotBefore: time.Now().Add(-3 * time.Hour),
		NotAfter:  time.Now().Add(-time.Hour),
	}
	c := signRaw(t, ca, tmpl)
	if _, err := NodeID(c); err != nil {
		t.Fatalf("NodeID of the expired cert: %v (the test cert is malformed)", err)
	}
	if _, err := VerifyNode(ca.Pool(), c, ""); !errors.Is(err, ErrNotNode) {
		t.Errorf("expired cert: %v, want ErrNotNode", err)
	}
}

func TestNodeIDRefuses(t *testing.T) {
	ca := newTestCA(t)
	u := func(s string) *url.URL {
		v, err := url.Parse(s)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	for _, tc := range []struct {
		name string
		cert *x509.Certificate
	}{
		{"CA cert", ca.Cert},
		{"nil", nil},
		{"no URI SAN", signRaw(t, ca, &x509.Certificate{Subject: pkix.Name{CommonName: "n1"}})},
		{"other scheme only", signRaw(t, ca, &x509.Certificate{Subject: pkix.Name{CommonName: "n1"}, URIs: []*url.URL{u("spiffe://node/n1")}})},
		{"CN mismatch", signRaw(t, ca, &x509.Certificate{Subject: pkix.Name{CommonName: "n2"}, URIs: []*url.URL{nodeURI("n1")}})},
		{"two URI SANs", signRaw(t, ca, &x509.Certificate{Subject: pkix.Name{CommonName: "n1"}, URIs: []*url.URL{nodeURI("n1"), nodeURI("n1")}})},
		{"wrong host", signRaw(t, ca, &x509.Certificate{Subject: pkix.Name{CommonName: "n1"}, URIs: []*url.URL{u("lupool://admin/n1")}})},
		{"nested path", signRaw(t, ca, &x509.Certificate{Subject: pkix.Name{CommonName: "a/b"}, URIs: []*url.URL{u("lupool://node/a/b")}})},
		{"query", signRaw(t, ca, &x509.Certificate{Subject: pkix.Name{CommonName: "n1"}, URIs: []*url.URL{u("lupool://node/n1?x=1")}})},
		{"empty id", signRaw(t, ca, &x509.Certificate{Subject: pkix.Name{CommonName: ""}, URIs: []*url.URL{u("lupool://node/")}})},
	} {
		id, err := NodeID(tc.cert)
		if !errors.Is(err, ErrNotNode) {
			t.Errorf("%s: NodeID = %q, %v; want ErrNotNode", tc.name, id, err)
		}
		if tc.cert != nil && !tc.cert.IsCA {
			if _, err := VerifyNode(ca.Pool(), tc.cert, ""); !errors.Is(err, ErrNotNode) {
				t.Errorf("%s: VerifyNode = %v; want ErrNotNode", tc.name, err)
			}
		}
	}
}

func TestParseCA(t *testing.T) {
	ca, other := newTestCA(t), newTestCA(t)
	got, err := ParseCA(ca.CertPEM, ca.KeyPEM)
	if err != nil {
		t.Fatal(err)
	}
	if got.Fingerprint() != ca.Fingerprint() || got.Key == nil {
		t.Error("ParseCA lost the certificate or the key")
	}
	if _, err := ParseCA(ca.CertPEM, other.KeyPEM); err == nil {
		t.Error("ParseCA accepted another CA's key")
	}
	node, certPEM, _ := issueTestNode(t, ca, "n1")
	_ = node
	if _, err := ParseCA(certPEM, nil); err == nil {
		t.Error("ParseCA accepted a node certificate as CA")
	}
	if _, err := ParseCA([]byte("garbage"), nil); err == nil {
		t.Error("ParseCA accepted garbage")
	}
	if _, err := ParseCA(ca.CertPEM, []byte("garbage")); err == nil {
		t.Error("ParseCA accepted a garbage key")
	}
	vo, err := ParseCA(ca.CertPEM, nil)
	if err != nil || vo.Key != nil || vo.KeyPEM != nil {
		t.Errorf("verify-only ParseCA = %+v, %v; want Key and KeyPEM nil", vo, err)
	}
}

func fileMode(t *testing.T, path string) fs.FileMode {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Mode().Perm()
}

func TestSaveLoadFiles(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pki")
	if _, err := LoadCA(dir); !errors.Is(err, ErrNoIdentity) || !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("LoadCA of an empty dir: %v, want ErrNoIdentity and fs.ErrNotExist", err)
	}
	if _, err := LoadNode(dir); !errors.Is(err, ErrNoIdentity) || !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("LoadNode of an empty dir: %v, want ErrNoIdentity and fs.ErrNotExist", err)
	}
	ca := newTestCA(t)
	if err := SaveCA(dir, ca); err != nil {
		t.Fatal(err)
	}
	_, certPEM, keyPEM := issueTestNode(t, ca, "n1")
	if err := SaveNode(dir, certPEM, keyPEM); err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]fs.FileMode{CACertFile: 0o644, CAKeyFile: 0o600, NodeCertFile: 0o644, NodeKeyFile: 0o600} {
		if got := fileMode(t, filepath.Join(dir, name)); got != want {
			t.Errorf("%s mode %v, want %v", name, got, want)
		}
	}
	if got := fileMode(t, dir); got != 0o700 {
		t.Errorf("dir mode %v, want 0700", got)
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 4 {
		t.Errorf("dir holds %d entries, want 4 (no temporary files left)", len(ents))
	}
	loaded, err := LoadCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	if loaded.Fingerprint() != ca.Fingerprint() || loaded.Key == nil {
		t.Error("LoadCA lost the certificate or the key")
	}
	nc, err := LoadNode(dir)
	if err != nil {
		t.Fatal(err)
	}
	if nc.Leaf == nil {
		t.Fatal("LoadNode left Leaf nil")
	}
	if id, err := VerifyNode(loaded.Pool(), nc.Leaf, "n1"); err != nil || id != "n1" {
		t.Errorf("loaded node cert: %q, %v", id, err)
	}
	// Without ca.key the CA is verify-only.
	if err := os.Remove(filepath.Join(dir, CAKeyFile)); err != nil {
		t.Fatal(err)
	}
	vo, err := LoadCA(dir)
	if err != nil || vo.Key != nil {
		t.Errorf("LoadCA without ca.key = key %v, %v; want nil key, nil error", vo.Key, err)
	}
	// A verify-only CA saves only its certificate.
	dir2 := filepath.Join(t.TempDir(), "p2")
	if err := SaveCA(dir2, vo); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir2, CAKeyFile)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("SaveCA of a verify-only CA wrote ca.key (stat: %v)", err)
	}
	// Overwrite keeps the mode.
	if err := SaveNode(dir, certPEM, keyPEM); err != nil {
		t.Fatal(err)
	}
	if got := fileMode(t, filepath.Join(dir, NodeKeyFile)); got != 0o600 {
		t.Errorf("node.key mode after rewrite %v, want 0600", got)
	}
}

func TestSaveNodeRefusesMismatchedPair(t *testing.T) {
	ca := newTestCA(t)
	_, certPEM, _ := issueTestNode(t, ca, "n1")
	_, otherKey, _ := NewKey()
	dir := t.TempDir()
	if err := SaveNode(dir, certPEM, otherKey); err == nil {
		t.Fatal("SaveNode accepted a key that does not match the certificate")
	}
	if _, err := os.Stat(filepath.Join(dir, NodeKeyFile)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("refused SaveNode still wrote node.key (stat: %v)", err)
	}
}

func TestLoadNodeCorrupt(t *testing.T) {
	dir := t.TempDir()
	ca := newTestCA(t)
	_, certPEM, keyPEM := issueTestNode(t, ca, "n1")
	if err := SaveNode(dir, certPEM, keyPEM); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, NodeKeyFile), []byte("junk"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := LoadNode(dir)
	if err == nil || errors.Is(err, ErrNoIdentity) {
		t.Errorf("LoadNode of a corrupt key: %v, want an error that is not ErrNoIdentity", err)
	}
}

func TestPublicKeyPEM(t *testing.T) {
	ecKey, _, _ := NewKey()
	_, edKey, _ := ed25519.GenerateKey(rand.Reader)
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	rsaKey, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []crypto.Signer{ecKey, edKey} {
		b, err := PublicKeyPEM(k)
		if err != nil {
			t.Fatal(err)
		}
		pub, err := ParsePublicKeyPEM(append(b, "\n\n"...))
		if err != nil {
			t.Fatalf("%T: %v", k, err)
		}
		if !publicKeysEqual(pub, k.Public()) {
			t.Errorf("%T: round trip changed the key", k)
		}
		if _, err := ParsePublicKeyPEM(append(b, "x"...)); err == nil {
			t.Errorf("%T: trailing data accepted", k)
		}
		if _, err := ParsePublicKeyPEM(append(b, b...)); err == nil {
			t.Errorf("%T: two PEM blocks accepted", k)
		}
	}
	for _, k := range []crypto.Signer{p384, rsaKey} {
		b, err := PublicKeyPEM(k)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := ParsePublicKeyPEM(b); err == nil {
			t.Errorf("%T: accepted, want only P-256 and Ed25519", k.Public())
		}
	}
	_, privPEM, _ := NewKey()
	for name, in := range map[string][]byte{
		"empty": nil, "garbage": []byte("hello"), "private key": privPEM,
		"bad DER":  []byte("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"),
		"too long": []byte(strings.Repeat(" ", 5000)),
	} {
		if _, err := ParsePublicKeyPEM(in); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, err := PublicKeyPEM(nil); err == nil {
		t.Error("PublicKeyPEM(nil) succeeded")
	}
}
