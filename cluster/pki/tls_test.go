package pki

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"testing"
	"time"
)

type handshakeResult struct {
	err   error
	state tls.ConnectionState
}

// handshake runs a TLS handshake between server and client over net.Pipe.
// After its handshake the server writes one byte and the client reads it,
// so that a rejection the server decides after the client has finished
// (TLS 1.3 client certificates) reaches the client as an error too.
func handshake(t testing.TB, server, client *tls.Config) (srv, cli handshakeResult) {
	t.Helper()
	sc, cc := net.Pipe()
	deadline := time.Now().Add(10 * time.Second)
	sc.SetDeadline(deadline)
	cc.SetDeadline(deadline)
	done := make(chan handshakeResult, 1)
	go func() {
		s := tls.Server(sc, server)
		defer sc.Close() // not s.Close: close_notify on a pipe nobody reads blocks
		err := s.Handshake()
		if err == nil {
			_, err = s.Write([]byte{1})
		}
		done <- handshakeResult{err, s.ConnectionState()}
	}()
	c := tls.Client(cc, client)
	err := c.Handshake()
	if err == nil {
		var b [1]byte
		_, err = c.Read(b[:])
	}
	cli = handshakeResult{err, c.ConnectionState()}
	cc.Close()
	srv = <-done
	return srv, cli
}

type tlsFixture struct {
	ca, other       *CA
	a, b, foreign   tls.Certificate
	pool, otherPool *x509.CertPool
}

func newTLSFixture(t testing.TB) *tlsFixture {
	f := &tlsFixture{ca: newTestCA(t), other: newTestCA(t)}
	f.a, _, _ = issueTestNode(t, f.ca, "A")
	f.b, _, _ = issueTestNode(t, f.ca, "B")
	f.foreign, _, _ = issueTestNode(t, f.other, "A") // same id, wrong CA
	f.pool, f.otherPool = f.ca.Pool(), f.other.Pool()
	return f
}

func TestMutualTLS(t *testing.T) {
	f := newTLSFixture(t)
	for _, auth := range []tls.ClientAuthType{tls.RequireAnyClientCert, tls.RequestClientCert} {
		srv, cli := handshake(t, ServerTLS(f.pool, f.b, auth), ClientTLS(f.pool, &f.a, "B"))
		if srv.err != nil || cli.err != nil {
			t.Fatalf("auth %v: server %v, client %v", auth, srv.err, cli.err)
		}
		if srv.state.Version != tls.VersionTLS13 {
			t.Errorf("version %x, want TLS 1.3", srv.state.Version)
		}
		if id, ok := PeerNodeID(f.pool, srv.state); !ok || id != "A" {
			t.Errorf("server sees peer %q %v, want A", id, ok)
		}
		if id, ok := PeerNodeID(f.pool, cli.state); !ok || id != "B" {
			t.Errorf("client sees peer %q %v, want B", id, ok)
		}
		if _, ok := PeerNodeID(f.otherPool, srv.state); ok {
			t.Error("PeerNodeID verified against another CA's pool")
		}
	}
	// expectNode "" accepts any node.
	if srv, cli := handshake(t, ServerTLS(f.pool, f.b, tls.RequireAnyClientCert), ClientTLS(f.pool, &f.a, "")); srv.err != nil || cli.err != nil {
		t.Fatalf("expect any: server %v, client %v", srv.err, cli.err)
	}
}

func TestServerRefusesClientWithoutCert(t *testing.T) {
	f := newTLSFixture(t)
	srv, cli := handshake(t, ServerTLS(f.pool, f.b, tls.RequireAnyClientCert), ClientTLS(f.pool, nil, "B"))
	if srv.err == nil || cli.err == nil {
		t.Fatalf("client without a cert: server %v, client %v; want both to fail", srv.err, cli.err)
	}
	// The API port takes clients without certificates; they have no node id.
	srv, cli = handshake(t, ServerTLS(f.pool, f.b, tls.RequestClientCert), ClientTLS(f.pool, nil, "B"))
	if srv.err != nil || cli.err != nil {
		t.Fatalf("RequestClientCert without a cert: server %v, client %v", srv.err, cli.err)
	}
	if id, ok := PeerNodeID(f.pool, srv.state); ok {
		t.Errorf("PeerNodeID of a certless client = %q, true", id)
	}
}

func TestServerRefusesOtherCAClient(t *testing.T) {
	f := newTLSFixture(t)
	for _, auth := range []tls.ClientAuthType{tls.RequireAnyClientCert, tls.RequestClientCert} {
		srv, cli := handshake(t, ServerTLS(f.pool, f.b, auth), ClientTLS(f.pool, &f.foreign, "B"))
		if !errors.Is(srv.err, ErrNotNode) || cli.err == nil {
			t.Errorf("auth %v, client of another CA: server %v, client %v; want ErrNotNode and a failure", auth, srv.err, cli.err)
		}
	}
}

func TestClientRefusesOtherCAServer(t *testing.T) {
	f := newTLSFixture(t)
	srv, cli := handshake(t, ServerTLS(f.otherPool, f.foreign, tls.RequireAnyClientCert), ClientTLS(f.pool, &f.a, ""))
	if !errors.Is(cli.err, ErrNotNode) || srv.err == nil {
		t.Fatalf("server of another CA: client %v, server %v; want ErrNotNode and a failure", cli.err, srv.err)
	}
}

func TestClientRefusesWrongNodeID(t *testing.T) {
	f := newTLSFixture(t)
	srv, cli := handshake(t, ServerTLS(f.pool, f.b, tls.RequireAnyClientCert), ClientTLS(f.pool, &f.a, "C"))
	if !errors.Is(cli.err, ErrNotNode) || srv.err == nil {
		t.Fatalf("server B, expect C: client %v, server %v; want ErrNotNode and a failure", cli.err, srv.err)
	}
}

func TestTLSMinVersion(t *testing.T) {
	f := newTLSFixture(t)
	old := ClientTLS(f.pool, &f.a, "B")
	old.MinVersion, old.MaxVersion = tls.VersionTLS12, tls.VersionTLS12
	srv, cli := handshake(t, ServerTLS(f.pool, f.b, tls.RequireAnyClientCert), old)
	if srv.err == nil || cli.err == nil {
		t.Fatalf("TLS 1.2 client: server %v, client %v; want both to fail", srv.err, cli.err)
	}
}

// BenchmarkHandshake measures one mutual TLS 1.3 handshake (ECDSA P-256,
// both sides verifying) over net.Pipe.
func BenchmarkHandshake(b *testing.B) {
	f := newTLSFixture(b)
	server, client := ServerTLS(f.pool, f.b, tls.RequireAnyClientCert), ClientTLS(f.pool, &f.a, "B")
	b.ReportAllocs()
	for b.Loop() {
		srv, cli := handshake(b, server, client)
		if srv.err != nil || cli.err != nil {
			b.Fatal(srv.err, cli.err)
		}
	}
}
