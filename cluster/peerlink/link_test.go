package peerlink

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/lupool/lupool/cluster/pki"
)

// fixture is a cluster CA with node certificates A, B and C, and a
// certificate named A from another CA.
type fixture struct {
	pool, otherPool *x509.CertPool
	certs           map[string]tls.Certificate
	foreignA        tls.Certificate
}

func newFixture(t testing.TB) *fixture {
	t.Helper()
	ca, other := newCA(t), newCA(t)
	f := &fixture{pool: ca.Pool(), otherPool: other.Pool(), certs: map[string]tls.Certificate{}}
	for _, id := range []string{"A", "B", "C"} {
		f.certs[id] = issue(t, ca, id)
	}
	f.foreignA = issue(t, other, "A")
	return f
}

func newCA(t testing.TB) *pki.CA {
	t.Helper()
	id, err := pki.NewClusterID()
	if err != nil {
		t.Fatal(err)
	}
	ca, err := pki.NewCA(id)
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

func issue(t testing.TB, ca *pki.CA, id string) tls.Certificate {
	t.Helper()
	key, keyPEM, err := pki.NewKey()
	if err != nil {
		t.Fatal(err)
	}
	certPEM, err := ca.IssueNode(id, key.Public(), []string{"127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	c, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// listen starts a Link for node id on 127.0.0.1:0, closed at cleanup.
func (f *fixture) listen(t testing.TB, id string, tweak func(*Options)) *Link {
	t.Helper()
	opts := Options{Addr: "127.0.0.1:0", Pool: f.pool, Cert: f.certs[id]}
	if tweak != nil {
		tweak(&opts)
	}
	l, err := Listen(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// acceptAll feeds every connection accepted on ln into the returned
// channel until ln is closed.
func acceptAll(ln net.Listener) <-chan net.Conn {
	ch := make(chan net.Conn, 1024)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				close(ch)
				return
			}
			ch <- c
		}
	}()
	return ch
}

// waitFor polls cond until it holds or 5 s pass.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestRaftDialAccept(t *testing.T) {
	f := newFixture(t)
	a, b := f.listen(t, "A", nil), f.listen(t, "B", nil)
	if got := b.Raft().Addr().String(); got != b.Addr() || !strings.HasPrefix(got, "127.0.0.1:") {
		t.Fatalf("Raft().Addr() = %q, want the advertise address %q", got, b.Addr())
	}
	c, err := a.Raft().Dial("bogus", time.Second)
	if err == nil {
		c.Close()
		t.Fatal("Dial of a bogus address succeeded")
	}
	c, err = a.Raft().Dial(raftAddr(b), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	msg := []byte{0, 'h', 'e', 'l', 'l', 'o'}
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	sc, err := b.Raft().Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer sc.Close()
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(sc, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, msg) {
		t.Fatalf("B read %q, want %q (first byte replayed)", got, msg)
	}
	pc, ok := sc.(*Conn)
	if !ok || pc.PeerID() != "A" {
		t.Fatalf("accepted %T with peer %q, want *Conn from A", sc, pc.PeerID())
	}
	if _, err := sc.Write([]byte("pong")); err != nil {
		t.Fatal(err)
	}
	back := make([]byte, 4)
	if _, err := io.ReadFull(c, back); err != nil || string(back) != "pong" {
		t.Fatalf("A read %q, %v; want pong", back, err)
	}
	if s := b.Stats(); s.Raft != 1 || s.HTTP != 0 || s.Accepted != 1 {
		t.Errorf("B stats %+v, want 1 accepted and routed to raft", s)
	}
}

func raftAddr(l *Link) raft.ServerAddress { return raft.ServerAddress(l.Addr()) }

// startHTTP serves an http.Server on l.HTTP() answering the caller's
// PeerID, stopped at cleanup.
func startHTTP(t *testing.T, l *Link) {
	t.Helper()
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			id, ok := PeerID(r.Context())
			if !ok {
				http.Error(w, "no peer id", http.StatusInternalServerError)
				return
			}
			// net/http fills r.TLS from Conn.ConnectionState; it must agree.
			if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 || r.TLS.PeerCertificates[0].Subject.CommonName != id {
				http.Error(w, "r.TLS disagrees with PeerID", http.StatusInternalServerError)
				return
			}
			io.WriteString(w, id)
		}),
		ConnContext:       l.ConnContext,
		ReadHeaderTimeout: 5 * time.Second,
	}
	go srv.Serve(l.HTTP())
	t.Cleanup(func() { srv.Close() })
}

func get(c *http.Client, url string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	resp, err := c.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("status %s: %s", resp.Status, body)
	}
	return string(body), err
}

func TestHTTPPeerID(t *testing.T) {
	f := newFixture(t)
	a, b := f.listen(t, "A", nil), f.listen(t, "B", nil)
	startHTTP(t, b)
	for i := 0; i < 3; i++ { // later calls reuse the kept-alive connection
		got, err := get(a.HTTPClient("B"), "https://"+b.Addr()+"/who")
		if err != nil || got != "A" {
			t.Fatalf("call %d: B says the caller is %q, %v; want A", i, got, err)
		}
	}
	if got, err := get(a.HTTPClient(""), "https://"+b.Addr()+"/who"); err != nil || got != "A" {
		t.Fatalf("HTTPClient(\"\"): %q, %v", got, err)
	}
	if a.HTTPClient("B") != a.HTTPClient("B") {
		t.Error("HTTPClient does not reuse the client of one expected node")
	}
	_, err := get(a.HTTPClient("C"), "https://"+b.Addr()+"/who")
	if !errors.Is(err, pki.ErrNotNode) {
		t.Fatalf("HTTPClient(C) against B: %v, want ErrNotNode", err)
	}
	_, err = get(a.HTTPClient("B"), "http://"+b.Addr()+"/who")
	if !errors.Is(err, errPlainHTTP) {
		t.Fatalf("http:// URL: %v, want errPlainHTTP", err)
	}
	if s := b.Stats(); s.HTTP < 2 || s.Raft != 0 {
		t.Errorf("B stats %+v, want HTTP connections only", s)
	}
}

// TestRefusedClients: a plain TCP client, a TLS client without a
// certificate, one with another CA's certificate, and a node that sends an
// unknown first byte are all closed and reach neither listener.
func TestRefusedClients(t *testing.T) {
	f := newFixture(t)
	a, b := f.listen(t, "A", nil), f.listen(t, "B", nil)
	raftCh, httpCh := acceptAll(b.Raft()), acceptAll(b.HTTP())

	expectClosed := func(name string, c net.Conn) {
		t.Helper()
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		c.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
		n, err := c.Read(make([]byte, 512))
		if err == nil {
			t.Errorf("%s: read %d bytes, want the connection refused", name, n)
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Errorf("%s: still open after 5 s: %v", name, err)
		}
	}
	raw, err := net.Dial("tcp", b.Addr())
	if err != nil {
		t.Fatal(err)
	}
	expectClosed("plain TCP", raw)

	for name, cert := range map[string]*tls.Certificate{"no certificate": nil, "another CA": &f.foreignA} {
		c, err := tls.Dial("tcp", b.Addr(), pki.ClientTLS(f.pool, cert, "B"))
		if err != nil {
			continue // refused during the handshake: fine
		}
		expectClosed(name, c)
	}
	waitFor(t, "3 failed handshakes", func() bool { return b.Stats().HandshakeFailed == 3 })

	bad, err := a.Dial(context.Background(), b.Addr(), "B")
	if err != nil {
		t.Fatal(err)
	}
	bad.Write([]byte{0x7f})
	bad.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := bad.Read(make([]byte, 1)); err == nil {
		t.Error("unknown first byte: connection stays open")
	}
	bad.Close()
	waitFor(t, "a bad first byte", func() bool { return b.Stats().BadFirstByte == 1 })

	// A good connection still gets through, and it is the only one.
	good, err := a.Dial(context.Background(), b.Addr(), "B")
	if err != nil {
		t.Fatal(err)
	}
	defer good.Close()
	good.Write([]byte{1})
	select {
	case c := <-raftCh:
		if id := c.(*Conn).PeerID(); id != "A" {
			t.Errorf("raft conn from %q, want A", id)
		}
		c.Close()
	case <-time.After(5 * time.Second):
		t.Fatal("a good raft connection did not arrive")
	}
	select {
	case c := <-raftCh:
		t.Errorf("a refused connection reached raft (from %s)", c.RemoteAddr())
	case c := <-httpCh:
		t.Errorf("a refused connection reached HTTP (from %s)", c.RemoteAddr())
	default:
	}
	if s := b.Stats(); s.Raft != 1 || s.HTTP != 0 {
		t.Errorf("B stats %+v, want exactly one routed connection", s)
	}
}

// TestSilentClientDropped: a TCP client that sends nothing and a TLS node
// that never sends its first byte are both dropped after HandshakeTimeout.
func TestSilentClientDropped(t *testing.T) {
	f := newFixture(t)
	const timeout = 300 * time.Millisecond
	a := f.listen(t, "A", nil)
	b := f.listen(t, "B", func(o *Options) { o.HandshakeTimeout = timeout })
	check := func(name string, c net.Conn) {
		t.Helper()
		defer c.Close()
		start := time.Now()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err := c.Read(make([]byte, 1))
		elapsed := time.Since(start)
		var ne net.Error
		if err == nil || (errors.As(err, &ne) && ne.Timeout()) {
			t.Fatalf("%s: read returned %v after %v, want the server to close within the handshake timeout", name, err, elapsed)
		}
		if elapsed < timeout/2 || elapsed > 10*timeout {
			t.Errorf("%s: dropped after %v, want about %v", name, elapsed, timeout)
		}
	}
	raw, err := net.Dial("tcp", b.Addr())
	if err != nil {
		t.Fatal(err)
	}
	check("silent TCP", raw)
	tc, err := a.Dial(context.Background(), b.Addr(), "B")
	if err != nil {
		t.Fatal(err)
	}
	check("TLS without a first byte", tc)
	waitFor(t, "2 failed handshakes", func() bool { return b.Stats().HandshakeFailed == 2 })
}

// TestIdleFlood: 500 idle TCP connections do not block a well-behaved peer;
// the oldest handshakes are dropped to stay under MaxHandshakes.
func TestIdleFlood(t *testing.T) {
	f := newFixture(t)
	a, b := f.listen(t, "A", nil), f.listen(t, "B", nil) // default 10 s timeout, 256 handshakes
	startHTTP(t, b)
	const idle = 500
	conns := make([]net.Conn, 0, idle)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for i := 0; i < idle; i++ {
		c, err := net.Dial("tcp", b.Addr())
		if err != nil {
			t.Fatalf("idle connection %d: %v", i, err)
		}
		conns = append(conns, c)
	}
	waitFor(t, "500 accepted", func() bool { return b.Stats().Accepted >= idle })
	start := time.Now()
	got, err := get(a.HTTPClient("B"), "https://"+b.Addr()+"/who")
	if err != nil || got != "A" {
		t.Fatalf("well-behaved call during the flood: %q, %v", got, err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("well-behaved call took %v during the flood", d)
	}
	if s := b.Stats(); s.Evicted < idle-DefaultMaxHandshakes {
		t.Errorf("B stats %+v: evicted %d, want at least %d", s, s.Evicted, idle-DefaultMaxHandshakes)
	}
}

func TestMaxPending(t *testing.T) {
	f := newFixture(t)
	a := f.listen(t, "A", nil)
	b := f.listen(t, "B", func(o *Options) { o.MaxPending = 2 })
	for i := 0; i < 4; i++ {
		c, err := a.Dial(context.Background(), b.Addr(), "B")
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write([]byte{0})
	}
	waitFor(t, "2 overflows", func() bool { return b.Stats().Overflow == 2 })
	for i := 0; i < 2; i++ {
		c, err := b.Raft().Accept()
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	if s := b.Stats(); s.Raft != 2 {
		t.Errorf("stats %+v, want 2 routed to raft", s)
	}
}

func TestCloseUnblocksAccept(t *testing.T) {
	f := newFixture(t)
	a := f.listen(t, "A", nil)
	errs := make(chan error, 2)
	for _, ln := range []net.Listener{a.Raft(), a.HTTP()} {
		go func() {
			_, err := ln.Accept()
			errs <- err
		}()
	}
	time.Sleep(20 * time.Millisecond)
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ {
		select {
		case err := <-errs:
			if !errors.Is(err, net.ErrClosed) {
				t.Errorf("Accept after Close: %v, want net.ErrClosed", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("Accept still blocked after Close")
		}
	}
	if err := a.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := a.Dial(context.Background(), "127.0.0.1:1", ""); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Dial after Close: %v, want net.ErrClosed", err)
	}
	if c, err := net.Dial("tcp", a.Addr()); err == nil {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil {
			t.Error("closed link still serves connections")
		}
		c.Close()
	}
}

// TestCloseOneSide: closing the HTTP side (as http.Server.Close does)
// leaves raft working, and HTTP connections are then dropped.
func TestCloseOneSide(t *testing.T) {
	f := newFixture(t)
	a, b := f.listen(t, "A", nil), f.listen(t, "B", nil)
	b.HTTP().Close()
	if _, err := b.HTTP().Accept(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("HTTP().Accept after its Close: %v", err)
	}
	if _, err := get(a.HTTPClient("B"), "https://"+b.Addr()+"/"); err == nil {
		t.Error("HTTP call succeeded against a closed HTTP side")
	}
	c, err := a.Raft().Dial(raftAddr(b), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte{2})
	sc, err := b.Raft().Accept()
	if err != nil {
		t.Fatalf("raft side after the HTTP side closed: %v", err)
	}
	sc.Close()
}

// TestCloseDuringHandshakes: Close does not wait for silent peers.
func TestCloseDuringHandshakes(t *testing.T) {
	f := newFixture(t)
	b := f.listen(t, "B", nil) // 10 s handshake timeout
	for i := 0; i < 20; i++ {
		c, err := net.Dial("tcp", b.Addr())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
	}
	waitFor(t, "20 accepted", func() bool { return b.Stats().Accepted == 20 })
	start := time.Now()
	b.Close()
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("Close took %v with 20 silent peers", d)
	}
}

func TestListenOptions(t *testing.T) {
	f := newFixture(t)
	for name, opts := range map[string]Options{
		"wildcard":               {Addr: "0.0.0.0:0", Pool: f.pool, Cert: f.certs["A"]},
		"wildcard advertise":     {Addr: "127.0.0.1:0", Advertise: "0.0.0.0:10811", Pool: f.pool, Cert: f.certs["A"]},
		"advertise without port": {Addr: "127.0.0.1:0", Advertise: "node1", Pool: f.pool, Cert: f.certs["A"]},
		"no pool":                {Addr: "127.0.0.1:0", Cert: f.certs["A"]},
		"no cert":                {Addr: "127.0.0.1:0", Pool: f.pool},
		"cert of another CA":     {Addr: "127.0.0.1:0", Pool: f.pool, Cert: f.foreignA},
		"negative limit":         {Addr: "127.0.0.1:0", Pool: f.pool, Cert: f.certs["A"], MaxPending: -1},
		"bad addr":               {Addr: "127.0.0.1:99999", Pool: f.pool, Cert: f.certs["A"]},
	} {
		if l, err := Listen(opts); err == nil {
			l.Close()
			t.Errorf("%s: Listen succeeded", name)
		}
	}
	l, err := Listen(Options{Addr: "0.0.0.0:0", Advertise: "node1.example:10811", Pool: f.pool, Cert: f.certs["A"]})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if l.Addr() != "node1.example:10811" || l.Raft().Addr().String() != "node1.example:10811" || l.NodeID() != "A" {
		t.Errorf("Addr %q, raft %q, NodeID %q", l.Addr(), l.Raft().Addr(), l.NodeID())
	}
}

func TestConnReadPeekedByteAllocs(t *testing.T) {
	c := newConn(nil, nil, "A", 7)
	var buf [8]byte
	if n, err := c.Read(buf[:0]); n != 0 || err != nil || !c.peeked.Load() {
		t.Fatalf("zero-length Read = %d, %v and consumed the peeked byte", n, err)
	}
	allocs := testing.AllocsPerRun(100, func() {
		c.peeked.Store(true)
		if n, err := c.Read(buf[:]); n != 1 || err != nil || buf[0] != 7 {
			t.Fatalf("Read = %d, %v, %d; want the peeked byte", n, err, buf[0])
		}
	})
	if allocs != 0 {
		t.Errorf("peeked Read allocates %v times", allocs)
	}
}

// TestConcurrentDials: many peers at once all get through.
func TestConcurrentDials(t *testing.T) {
	f := newFixture(t)
	a, b := f.listen(t, "A", nil), f.listen(t, "B", nil)
	startHTTP(t, b)
	var wg sync.WaitGroup
	errs := make(chan error, 32)
	for i := 0; i < 32; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := a.Dial(context.Background(), b.Addr(), "B")
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
			body, err := io.ReadAll(c)
			if err != nil || !bytes.HasSuffix(body, []byte("\r\n\r\nA")) {
				errs <- fmt.Errorf("response %q, %v", body, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}
