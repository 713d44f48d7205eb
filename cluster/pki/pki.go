package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"time"
)

// File names under a pki directory (DATA/pki). Part of the on-disk format.
const (
	CACertFile   = "ca.crt"   // PEM certificate, mode 0644
	CAKeyFile    = "ca.key"   // PEM PKCS#8 private key, mode 0600
	NodeCertFile = "node.crt" // PEM certificate, mode 0644
	NodeKeyFile  = "node.key" // PEM PKCS#8 private key, mode 0600
)

// Certificate contents. Part of the format: changing them makes existing
// certificates fail NodeID.
const (
	organization   = "lupool"
	caCNPrefix     = "lupool cluster "
	nodeURIScheme  = "lupool"
	nodeURIHost    = "node"
	nodeIDMaxBytes = 128
	caLifetime     = 10 * 365 * 24 * time.Hour
	nodeLifetime   = 5 * 365 * 24 * time.Hour
	// clockSkew backdates NotBefore so that a peer whose clock is a little
	// behind still accepts a certificate issued a moment ago.
	clockSkew = time.Hour
)

var (
	// ErrNoIdentity is returned by LoadCA and LoadNode when the files do not
	// exist; errors.Is(err, fs.ErrNotExist) holds too.
	ErrNoIdentity = errors.New("pki: no identity (certificate or key file missing)")
	// ErrBadToken is returned by ParseJoinToken for malformed input, with the
	// reason; the expected shape is lupool1.<8 hex>.<32 hex>.<64 hex>.
	ErrBadToken = errors.New("pki: malformed join token (want lupool1.<8 hex id>.<32 hex secret>.<64 hex CA fingerprint>)")
	// ErrNotNode is returned (wrapped) by NodeID and VerifyNode, and fails
	// handshakes made with ServerTLS and ClientTLS, when a certificate is not
	// a lupool node certificate of the cluster CA, or not the expected node.
	ErrNotNode = errors.New("pki: not a lupool node certificate of this cluster")
)

// CA is a cluster certificate authority. It is immutable after construction
// and safe for concurrent use. Key is nil for a verify-only CA (ParseCA or
// LoadCA without a key); IssueNode then fails.
type CA struct {
	Cert    *x509.Certificate
	Key     crypto.Signer // nil: verify-only
	CertPEM []byte
	KeyPEM  []byte // nil when Key is nil
}

// NewCA creates a self-signed cluster CA with a fresh ECDSA P-256 key, valid
// for 10 years, Subject O=lupool, CN="lupool cluster "+clusterID. It fails
// only if the system's random source fails or clusterID is empty.
func NewCA(clusterID string) (*CA, error) {
	if clusterID == "" {
		return nil, errors.New("pki: NewCA needs a cluster id (see NewClusterID)")
	}
	key, keyPEM, err := NewKey()
	if err != nil {
		return nil, err
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{organization}, CommonName: caCNPrefix + clusterID},
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              now.Add(caLifetime),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("pki: create CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("pki: parse new CA certificate: %w", err)
	}
	return &CA{Cert: cert, Key: key, CertPEM: pemEncode("CERTIFICATE", der), KeyPEM: keyPEM}, nil
}

// ParseCA parses a CA from its PEM certificate and, if keyPEM is not nil,
// its PEM PKCS#8 key. It fails when the certificate is not a CA or the key
// does not belong to it. With keyPEM nil the CA is verify-only.
func ParseCA(certPEM, keyPEM []byte) (*CA, error) {
	cert, err := parseCertPEM(certPEM)
	if err != nil {
		return nil, fmt.Errorf("pki: CA certificate: %w", err)
	}
	if !cert.IsCA || !cert.BasicConstraintsValid {
		return nil, fmt.Errorf("pki: certificate %q is not a CA certificate", cert.Subject.CommonName)
	}
	ca := &CA{Cert: cert, CertPEM: append([]byte(nil), certPEM...)}
	if keyPEM == nil {
		return ca, nil
	}
	key, err := parseKeyPEM(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("pki: CA key: %w", err)
	}
	if !publicKeysEqual(key.Public(), cert.PublicKey) {
		return nil, errors.New("pki: CA key does not belong to the CA certificate")
	}
	ca.Key = key
	ca.KeyPEM = append([]byte(nil), keyPEM...)
	return ca, nil
}

// Fingerprint returns "sha256:" and the lowercase hex sha256 of the CA
// certificate's DER bytes: the value join tokens carry.
func (ca *CA) Fingerprint() string { return Fingerprint(ca.Cert.Raw) }

// Fingerprint returns "sha256:" and the lowercase hex sha256 of certDER.
func Fingerprint(certDER []byte) string {
	sum := sha256.Sum256(certDER)
	return fingerprintPrefix + hex.EncodeToString(sum[:])
}

const fingerprintPrefix = "sha256:"

// Pool returns a new pool holding only the CA certificate. The caller owns
// it; the CA is not changed.
func (ca *CA) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.Cert)
	return p
}

// NewKey generates an ECDSA P-256 key and returns it with its PEM
// "PRIVATE KEY" (PKCS#8) encoding. It fails only if the random source does.
func NewKey() (key crypto.Signer, keyPEM []byte, err error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("pki: generate key: %w", err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, nil, fmt.Errorf("pki: encode key: %w", err)
	}
	return k, pemEncode("PRIVATE KEY", der), nil
}

// PublicKeyPEM returns key's public half as PEM "PUBLIC KEY" (PKIX): what a
// joining node sends to be certified.
func PublicKeyPEM(key crypto.Signer) ([]byte, error) {
	if key == nil {
		return nil, errors.New("pki: PublicKeyPEM of a nil key")
	}
	der, err := x509.MarshalPKIXPublicKey(key.Public())
	if err != nil {
		return nil, fmt.Errorf("pki: encode public key: %w", err)
	}
	return pemEncode("PUBLIC KEY", der), nil
}

// maxPublicKeyPEMBytes bounds ParsePublicKeyPEM's input; a P-256 or Ed25519
// public key PEM is under 200 bytes.
const maxPublicKeyPEMBytes = 4096

// ParsePublicKeyPEM parses one PEM "PUBLIC KEY" (PKIX) block holding an
// ECDSA P-256 or Ed25519 key. Anything else (other types or curves, trailing
// data other than whitespace, PEM headers, more than 4 KiB) is refused with
// an error saying why.
func ParsePublicKeyPEM(b []byte) (crypto.PublicKey, error) {
	if len(b) > maxPublicKeyPEMBytes {
		return nil, fmt.Errorf("pki: public key PEM is %d bytes, more than %d", len(b), maxPublicKeyPEMBytes)
	}
	block, rest := pem.Decode(b)
	if block == nil {
		return nil, errors.New("pki: no PEM block in public key (want -----BEGIN PUBLIC KEY-----)")
	}
	if block.Type != "PUBLIC KEY" {
		return nil, fmt.Errorf("pki: PEM block is %q, want \"PUBLIC KEY\"", block.Type)
	}
	if len(block.Headers) != 0 {
		return nil, errors.New("pki: public key PEM must not carry headers")
	}
	if len(trimSpaceBytes(rest)) != 0 {
		return nil, errors.New("pki: trailing data after the public key PEM block")
	}
	pub, err := x509.ParsePKIXPublicKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("pki: parse public key: %w", err)
	}
	if err := checkPublicKey(pub); err != nil {
		return nil, err
	}
	return pub, nil
}

// checkPublicKey accepts ECDSA P-256 and Ed25519 keys only.
func checkPublicKey(pub crypto.PublicKey) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k == nil || k.Curve != elliptic.P256() {
			return errors.New("pki: ECDSA public key is not on P-256 (only P-256 and Ed25519 are accepted)")
		}
		return nil
	case ed25519.PublicKey:
		if len(k) != ed25519.PublicKeySize {
			return fmt.Errorf("pki: Ed25519 public key is %d bytes, want %d", len(k), ed25519.PublicKeySize)
		}
		return nil
	default:
		return fmt.Errorf("pki: public key type %T is not accepted (only ECDSA P-256 and Ed25519)", pub)
	}
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	eq, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && eq.Equal(b)
}

func randomSerial() (*big.Int, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return nil, fmt.Errorf("pki: random serial: %w", err)
	}
	n := new(big.Int).SetBytes(b[:]) // non-negative by construction
	if n.Sign() == 0 {
		n.SetInt64(1) // RFC 5280 wants a positive serial; 2^-128 odds
	}
	return n, nil
}

func pemEncode(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

// parseCertPEM parses the first PEM "CERTIFICATE" block of b.
func parseCertPEM(b []byte) (*x509.Certificate, error) {
	block, _ := pem.Decode(b)
	if block == nil {
		return nil, errors.New("no PEM block (want -----BEGIN CERTIFICATE-----)")
	}
	if block.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("PEM block is %q, want \"CERTIFICATE\"", block.Type)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("parse certificate: %w", err)
	}
	return cert, nil
}

// parseKeyPEM parses the first PEM "PRIVATE KEY" (PKCS#8) block of b.
func parseKeyPEM(b []byte) (crypto.Signer, error) {
	block, _ := pem.Decode(b)
	if block == nil {
		return nil, errors.New("no PEM block (want -----BEGIN PRIVATE KEY-----)")
	}
	if block.Type != "PRIVATE KEY" {
		return nil, fmt.Errorf("PEM block is %q, want \"PRIVATE KEY\" (PKCS#8)", block.Type)
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("parse PKCS#8 key: %w", err)
	}
	s, ok := k.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("key type %T cannot sign", k)
	}
	return s, nil
}

func trimSpaceBytes(b []byte) []byte {
	for len(b) > 0 && (b[0] == ' ' || b[0] == '\t' || b[0] == '\n' || b[0] == '\r') {
		b = b[1:]
	}
	for len(b) > 0 && (b[len(b)-1] == ' ' || b[len(b)-1] == '\t' || b[len(b)-1] == '\n' || b[len(b)-1] == '\r') {
		b = b[:len(b)-1]
	}
	return b
}
