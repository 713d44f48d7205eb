package pki

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
)

// ServerTLS returns a TLS 1.3 server configuration presenting cert.
// clientAuth is tls.RequireAnyClientCert on the peer port (every peer is a
// node) or tls.RequestClientCert on the API port (admins come with tokens
// instead). A client certificate that is sent must pass VerifyNode against
// pool, else the handshake fails; Go does not verify it itself in these
// modes (ConnectionState.VerifiedChains stays empty), so read the peer's id
// with PeerNodeID. Host names are not checked. Safe for concurrent use by
// any number of connections.
func ServerTLS(pool *x509.CertPool, cert tls.Certificate, clientAuth tls.ClientAuthType) *tls.Config {
	c := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		ClientAuth:   clientAuth,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				if clientAuth == tls.RequireAnyClientCert || clientAuth == tls.RequireAndVerifyClientCert {
					return fmt.Errorf("%w: client sent no certificate", ErrNotNode)
				}
				return nil
			}
			_, err := VerifyNode(pool, cs.PeerCertificates[0], "")
			return err
		},
	}
	// ClientCAs is left nil in the modes above on purpose: with it set, the
	// server names the CA in its certificate request and a client holding
	// another CA's certificate silently sends none, which hides the reason
	// for the refusal. Go's own verification modes need it.
	if clientAuth == tls.RequireAndVerifyClientCert || clientAuth == tls.VerifyClientCertIfGiven {
		c.ClientCAs = pool
	}
	return c
}

// ClientTLS returns a TLS 1.3 client configuration that presents cert when
// it is not nil and accepts only a server whose leaf passes
// VerifyNode(pool, leaf, expectNode) (expectNode "" accepts any node of the
// CA). Host names are not checked (InsecureSkipVerify with
// VerifyConnection, Go's documented pattern for custom verification). A
// handshake with another server fails with an error wrapping ErrNotNode.
func ClientTLS(pool *x509.CertPool, cert *tls.Certificate, expectNode string) *tls.Config {
	c := &tls.Config{
		MinVersion:         tls.VersionTLS13,
		InsecureSkipVerify: true, // verified in VerifyConnection below, by node id
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return fmt.Errorf("%w: server sent no certificate", ErrNotNode)
			}
			_, err := VerifyNode(pool, cs.PeerCertificates[0], expectNode)
			return err
		},
	}
	if cert != nil {
		c.Certificates = []tls.Certificate{*cert}
	}
	return c
}

// PeerNodeID returns the node id of the peer of a completed handshake,
// verified against pool. ok is false when the peer sent no certificate or
// its certificate does not verify.
func PeerNodeID(pool *x509.CertPool, cs tls.ConnectionState) (id string, ok bool) {
	if !cs.HandshakeComplete || len(cs.PeerCertificates) == 0 {
		return "", false
	}
	id, err := VerifyNode(pool, cs.PeerCertificates[0], "")
	return id, err == nil
}
