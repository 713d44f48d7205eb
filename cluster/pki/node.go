package pki

import (
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"time"
)

// ValidNodeID reports why id is not a valid node id (nil when it is): 1 to
// 128 characters of [A-Za-z0-9._-].
func ValidNodeID(id string) error {
	if id == "" {
		return errors.New("pki: empty node id")
	}
	if len(id) > nodeIDMaxBytes {
		return fmt.Errorf("pki: node id is %d characters, at most %d", len(id), nodeIDMaxBytes)
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9', c == '.', c == '_', c == '-':
		default:
			return fmt.Errorf("pki: node id %q has character %q at %d (allowed: A-Z a-z 0-9 . _ -)", id, c, i)
		}
	}
	return nil
}

// nodeURI is the URI SAN that carries a node's identity.
func nodeURI(nodeID string) *url.URL {
	return &url.URL{Scheme: nodeURIScheme, Host: nodeURIHost, Path: "/" + nodeID}
}

// IssueNode signs a node certificate for pub (ECDSA P-256 or Ed25519) and
// returns it as PEM. Subject CN is nodeID, the URI SAN is
// lupool://node/<nodeID>; ExtKeyUsage ServerAuth and ClientAuth, KeyUsage
// DigitalSignature, valid 5 years but never past the CA, random 128-bit
// serial. Each of hosts (may be empty) becomes an IP or DNS SAN; they are
// informational, since peers check the node id, not host names.
//
// It fails when the CA is verify-only (no Key), when nodeID is not valid
// (see ValidNodeID), when pub is of another kind, or when a host is empty or
// holds whitespace.
func (ca *CA) IssueNode(nodeID string, pub crypto.PublicKey, hosts []string) (certPEM []byte, err error) {
	if ca == nil || ca.Cert == nil {
		return nil, errors.New("pki: IssueNode on a nil CA")
	}
	if ca.Key == nil {
		return nil, errors.New("pki: this CA has no private key (ca.key) and cannot issue node certificates; issue from a node that has it")
	}
	if err := ValidNodeID(nodeID); err != nil {
		return nil, err
	}
	if err := checkPublicKey(pub); err != nil {
		return nil, err
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	now := time.Now()
	notAfter := now.Add(nodeLifetime)
	if notAfter.After(ca.Cert.NotAfter) {
		notAfter = ca.Cert.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{organization}, CommonName: nodeID},
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		IsCA:                  false,
		URIs:                  []*url.URL{nodeURI(nodeID)},
	}
	for _, h := range hosts {
		if h == "" || strings.ContainsAny(h, " \t\r\n") {
			return nil, fmt.Errorf("pki: host %q for node %q is empty or holds whitespace", h, nodeID)
		}
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, pub, ca.Key)
	if err != nil {
		return nil, fmt.Errorf("pki: issue certificate for node %q: %w", nodeID, err)
	}
	return pemEncode("CERTIFICATE", der), nil
}

// NodeID returns the node id a lupool node certificate names: its one URI
// SAN lupool://node/<id>, which must agree with the Subject CN. It does not
// check the signature (VerifyNode does). It returns an error wrapping
// ErrNotNode for a CA certificate, a certificate without exactly one such
// URI SAN, or one whose CN differs.
func NodeID(cert *x509.Certificate) (string, error) {
	if cert == nil {
		return "", fmt.Errorf("%w: no certificate", ErrNotNode)
	}
	if cert.IsCA {
		return "", fmt.Errorf("%w: %q is a CA certificate", ErrNotNode, cert.Subject.CommonName)
	}
	id := ""
	for _, u := range cert.URIs {
		if u.Scheme != nodeURIScheme {
			continue
		}
		if id != "" {
			return "", fmt.Errorf("%w: more than one %s:// URI SAN", ErrNotNode, nodeURIScheme)
		}
		if u.Host != nodeURIHost || u.User != nil || u.RawQuery != "" || u.Fragment != "" || u.Opaque != "" ||
			!strings.HasPrefix(u.Path, "/") || u.RawPath != "" {
			return "", fmt.Errorf("%w: URI SAN %q is not lupool://node/<id>", ErrNotNode, u.String())
		}
		id = u.Path[1:]
		if err := ValidNodeID(id); err != nil {
			return "", fmt.Errorf("%w: URI SAN %q: %w", ErrNotNode, u.String(), err)
		}
	}
	if id == "" {
		return "", fmt.Errorf("%w: certificate %q has no lupool://node/<id> URI SAN", ErrNotNode, cert.Subject.CommonName)
	}
	if cert.Subject.CommonName != id {
		return "", fmt.Errorf("%w: CN %q does not match URI SAN node id %q", ErrNotNode, cert.Subject.CommonName, id)
	}
	return id, nil
}

// VerifyNode checks that cert is a leaf signed by a CA in pool (no
// intermediates; any extended key usage, so client and server leaves both
// pass), currently valid, and a lupool node certificate, and returns its node
// id. If expect is not empty the id must equal it. Every failure wraps
// ErrNotNode and says what was found. A nil pool is refused (it would mean
// the system roots).
func VerifyNode(pool *x509.CertPool, cert *x509.Certificate, expect string) (string, error) {
	if pool == nil {
		return "", fmt.Errorf("%w: no cluster CA pool to verify against", ErrNotNode)
	}
	if cert == nil {
		return "", fmt.Errorf("%w: no certificate", ErrNotNode)
	}
	_, err := cert.Verify(x509.VerifyOptions{
		Roots:         pool,
		Intermediates: x509.NewCertPool(),
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	if err != nil {
		return "", fmt.Errorf("%w: certificate %q does not chain to the cluster CA: %w", ErrNotNode, cert.Subject.CommonName, err)
	}
	id, err := NodeID(cert)
	if err != nil {
		return "", err
	}
	if expect != "" && id != expect {
		return "", fmt.Errorf("%w: certificate is node %q, want node %q", ErrNotNode, id, expect)
	}
	return id, nil
}
