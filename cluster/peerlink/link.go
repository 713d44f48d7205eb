package peerlink

import (
	"container/list"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"

	"github.com/lupool/lupool/cluster/pki"
)

// Defaults for Options.
const (
	// DefaultHandshakeTimeout bounds TCP accept to first byte: generous for
	// a loaded peer on a real network, short enough that silent
	// connections do not pile up.
	DefaultHandshakeTimeout = 10 * time.Second
	// DefaultMaxPending bounds routed connections waiting for Accept, per
	// side. Raft keeps a handful of pooled connections per peer and HTTP a
	// few per peer, so 256 is far above a healthy cluster's need.
	DefaultMaxPending = 256
	// DefaultMaxHandshakes bounds connections between TCP accept and first
	// byte: about 256 goroutines and TLS states (tens of KiB each).
	DefaultMaxHandshakes = 256

	// raftFirstByteMax is the highest first byte routed to raft (see the
	// package doc). Part of the wire format.
	raftFirstByteMax = 9
	// warnInterval is the least time between two warnings of one kind.
	warnInterval = 10 * time.Second
	// acceptBackoffMax caps the sleep after a failing listener Accept.
	acceptBackoffMax = time.Second
)

// Options configure Listen.
type Options struct {
	// Addr is the TCP listen address, e.g. 127.0.0.1:10811; port 0 picks
	// a free port.
	Addr string
	// Advertise is the address other nodes dial (host:port). Empty means
	// the bound address, which must then not be a wildcard.
	Advertise string
	// Pool holds the cluster CA. Required.
	Pool *x509.CertPool
	// Cert is this node's certificate and key (pki.LoadNode). Required; it
	// must be a node certificate of Pool's CA.
	Cert tls.Certificate
	// Logger receives refusals (debug, and rate-limited warnings); nil
	// discards.
	Logger *slog.Logger
	// HandshakeTimeout bounds TCP accept to the peer's first byte (server)
	// and dial plus handshake (Dial). 0 means DefaultHandshakeTimeout.
	HandshakeTimeout time.Duration
	// MaxPending bounds accepted connections waiting for Accept, per side;
	// beyond it new ones are closed. 0 means DefaultMaxPending.
	MaxPending int
	// MaxHandshakes bounds connections in handshake; when it is reached
	// the oldest is dropped. 0 means DefaultMaxHandshakes.
	MaxHandshakes int
	// AllowRaft, when set, decides whether a verified peer may speak raft
	// to this node: nodeID from its certificate, certSHA256 the
	// certificate's fingerprint (pki.Fingerprint). A certificate of the CA
	// alone is not membership: raft takes the leader's id from its
	// messages, so only current members may reach it. Refused connections
	// are closed and counted (Stats.RaftRefused). Nil allows every node
	// of the CA (tests).
	AllowRaft func(nodeID, certSHA256 string) bool
}

// ensureDefaults fills zero fields with the defaults above.
func (o *Options) ensureDefaults() {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.HandshakeTimeout == 0 {
		o.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if o.MaxPending == 0 {
		o.MaxPending = DefaultMaxPending
	}
	if o.MaxHandshakes == 0 {
		o.MaxHandshakes = DefaultMaxHandshakes
	}
}

// validate checks o after ensureDefaults and returns this node's id.
func (o *Options) validate() (nodeID string, err error) {
	if o.Pool == nil {
		return "", errors.New("peerlink: Options.Pool is nil: pass the cluster CA pool (pki.CA.Pool)")
	}
	if len(o.Cert.Certificate) == 0 || o.Cert.PrivateKey == nil {
		return "", errors.New("peerlink: Options.Cert is empty: pass this node's certificate (pki.LoadNode)")
	}
	if o.HandshakeTimeout < 0 || o.MaxPending < 0 || o.MaxHandshakes < 0 {
		return "", fmt.Errorf("peerlink: negative limit (HandshakeTimeout %v, MaxPending %d, MaxHandshakes %d)",
			o.HandshakeTimeout, o.MaxPending, o.MaxHandshakes)
	}
	leaf := o.Cert.Leaf
	if leaf == nil {
		if leaf, err = x509.ParseCertificate(o.Cert.Certificate[0]); err != nil {
			return "", fmt.Errorf("peerlink: Options.Cert: %w", err)
		}
	}
	id, err := pki.VerifyNode(o.Pool, leaf, "")
	if err != nil {
		return "", fmt.Errorf("peerlink: this node's certificate does not fit the cluster CA: %w", err)
	}
	return id, nil
}

// Stats counts connections by fate since Listen. Values only grow.
type Stats struct {
	Accepted        uint64 // TCP connections accepted
	Raft            uint64 // handed to Raft().Accept's queue
	HTTP            uint64 // handed to HTTP().Accept's queue
	HandshakeFailed uint64 // TLS handshake or first-byte read failed or timed out (no or bad certificate, not TLS, silent)
	BadFirstByte    uint64 // first byte neither raft nor HTTP
	Evicted         uint64 // dropped mid-handshake because MaxHandshakes were in progress
	Overflow        uint64 // dropped because the side's queue held MaxPending, or the side was closed
	RaftRefused     uint64 // raft connections AllowRaft refused (not a member, or not its recorded certificate)
}

// Link is one node's peer port: a TCP listener whose mutual-TLS connections
// are routed to a raft and an HTTP listener, plus the dialer for the other
// side. Its methods are safe for concurrent use.
type Link struct {
	opts      Options // immutable after Listen, defaults filled
	nodeID    string  // immutable; this node's id from opts.Cert
	advertise string  // immutable
	ln        net.Listener
	serverTLS *tls.Config // immutable
	raft      *raftLayer  // immutable; never nil
	http      *side       // immutable; never nil
	done      chan struct{}
	closeOnce sync.Once
	wg        sync.WaitGroup // the accept loop and every handshake goroutine

	mu struct {
		sync.Mutex
		closed      bool
		handshaking list.List // of *handshaking, oldest first
		clients     map[string]*http.Client
	}

	stats struct {
		accepted, raft, http, handshakeFailed, badFirstByte, evicted, overflow, raftRefused atomic.Uint64
	}
	warnHandshake, warnDrop warnLimiter
}

// handshaking is a connection between TCP accept and routing.
type handshaking struct {
	raw     net.Conn      // immutable
	elem    *list.Element // guarded by Link.mu; its place in Link.mu.handshaking
	removed bool          // guarded by Link.mu; true once out of the list (evicted, closed or routed)
}

// Listen binds opts.Addr and starts accepting. The returned Link must be
// closed. It fails when the options are invalid (see Options), the address
// cannot be bound, or the advertise address would be a wildcard.
func Listen(opts Options) (*Link, error) {
	opts.ensureDefaults()
	nodeID, err := opts.validate()
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", opts.Addr)
	if err != nil {
		return nil, fmt.Errorf("peerlink: listen on %s: %w", opts.Addr, err)
	}
	advertise, err := advertiseAddr(opts.Advertise, ln.Addr())
	if err != nil {
		ln.Close()
		return nil, err
	}
	l := &Link{
		opts:      opts,
		nodeID:    nodeID,
		advertise: advertise,
		ln:        ln,
		done:      make(chan struct{}),
	}
	l.serverTLS = pki.ServerTLS(opts.Pool, opts.Cert, tls.RequireAnyClientCert)
	// Dialers keep no session cache, so tickets would be wasted work.
	l.serverTLS.SessionTicketsDisabled = true
	l.raft = &raftLayer{side: newSide(l, "raft")}
	l.http = newSide(l, "http")
	l.mu.clients = make(map[string]*http.Client)
	l.wg.Add(1)
	go l.acceptLoop()
	return l, nil
}

// advertiseAddr returns the address to advertise: explicit, or bound if it
// is not a wildcard.
func advertiseAddr(explicit string, bound net.Addr) (string, error) {
	a := explicit
	if a == "" {
		a = bound.String()
	}
	host, port, err := net.SplitHostPort(a)
	if err != nil || host == "" || port == "" || port == "0" {
		return "", fmt.Errorf("peerlink: advertise address %q is not host:port", a)
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsUnspecified() {
		if explicit == "" {
			return "", fmt.Errorf("peerlink: listening on wildcard %s: set Advertise to the address other nodes dial", a)
		}
		return "", fmt.Errorf("peerlink: advertise address %q is a wildcard: give the address other nodes dial", a)
	}
	return a, nil
}

// Addr returns the advertise address.
func (l *Link) Addr() string { return l.advertise }

// NodeID returns this node's id, from Options.Cert.
func (l *Link) NodeID() string { return l.nodeID }

// Raft returns the stream layer for raft.NewNetworkTransportWithConfig.
// Its Accept yields connections whose first byte is a raft rpc type; its
// Dial dials with Dial(ctx, address, "") (any node of the CA); its Addr is
// the advertise address. Closing it stops only the raft side.
func (l *Link) Raft() raft.StreamLayer { return l.raft }

// HTTP returns the listener of connections carrying HTTP/1.1 (*Conn
// values). Serve it with http.Server{ConnContext: l.ConnContext}. Closing
// it stops only the HTTP side.
func (l *Link) HTTP() net.Listener { return l.http }

type peerIDKey struct{}

// ConnContext stores c's verified peer node id in ctx, for
// http.Server.ConnContext. Connections that are not *Conn leave ctx as is.
func (l *Link) ConnContext(ctx context.Context, c net.Conn) context.Context {
	if pc, ok := c.(*Conn); ok && pc.peerID != "" {
		ctx = context.WithValue(ctx, peerCertKey{}, pc.certSHA256)
		return context.WithValue(ctx, peerIDKey{}, pc.peerID)
	}
	return ctx
}

type peerCertKey struct{}

// PeerCertSHA256 returns the fingerprint (pki.Fingerprint) of the peer
// certificate whose node id ConnContext stored in ctx.
func PeerCertSHA256(ctx context.Context) (string, bool) {
	fp, ok := ctx.Value(peerCertKey{}).(string)
	return fp, ok && fp != ""
}

// PeerID returns the peer node id that ConnContext stored in ctx (for a
// handler: PeerID(r.Context())); ok is false when there is none.
func PeerID(ctx context.Context) (string, bool) {
	id, ok := ctx.Value(peerIDKey{}).(string)
	return id, ok && id != ""
}

// Stats returns the connection counters.
func (l *Link) Stats() Stats {
	return Stats{
		Accepted:        l.stats.accepted.Load(),
		Raft:            l.stats.raft.Load(),
		HTTP:            l.stats.http.Load(),
		HandshakeFailed: l.stats.handshakeFailed.Load(),
		BadFirstByte:    l.stats.badFirstByte.Load(),
		Evicted:         l.stats.evicted.Load(),
		Overflow:        l.stats.overflow.Load(),
		RaftRefused:     l.stats.raftRefused.Load(),
	}
}

var errLinkClosed = fmt.Errorf("peerlink: link closed: %w", net.ErrClosed)

// Dial opens a mutual-TLS connection to addr whose server certificate must
// be node expectNode ("" accepts any node of the CA). The returned
// connection (a *tls.Conn, TCP_NODELAY on) has finished the handshake. Dial
// and handshake are bounded by ctx and by Options.HandshakeTimeout. A server
// that is not the expected node fails with an error wrapping
// pki.ErrNotNode. With TLS 1.3, a server that refuses this node's
// certificate is seen only at the first read.
func (l *Link) Dial(ctx context.Context, addr, expectNode string) (net.Conn, error) {
	select {
	case <-l.done:
		return nil, errLinkClosed
	default:
	}
	ctx, cancel := context.WithTimeout(ctx, l.opts.HandshakeTimeout)
	defer cancel()
	var d net.Dialer
	raw, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("peerlink: dial %s: %w", addr, err)
	}
	if tcp, ok := raw.(*net.TCPConn); ok {
		tcp.SetNoDelay(true)
	}
	braw := newBufferedRaw(raw)
	tc := tls.Client(braw, pki.ClientTLS(l.opts.Pool, &l.opts.Cert, expectNode))
	if err := tc.HandshakeContext(ctx); err != nil {
		raw.Close()
		if expectNode == "" {
			return nil, fmt.Errorf("peerlink: TLS handshake with %s: %w", addr, err)
		}
		return nil, fmt.Errorf("peerlink: TLS handshake with %s (want node %q): %w", addr, expectNode, err)
	}
	// The handshake's last flight may still sit in the buffer.
	if err := braw.flush(); err != nil {
		raw.Close()
		return nil, fmt.Errorf("peerlink: TLS handshake with %s: %w", addr, err)
	}
	return newFlushingConn(tc, braw), nil
}

var errPlainHTTP = errors.New("peerlink: the peer port speaks only TLS: use an https:// URL")

// HTTPClient returns an http.Client whose connections are Dial(ctx, addr,
// expectNode): use https:// URLs naming a peer's advertise address. It uses
// no proxy and HTTP/1.1, has no overall timeout (replication streams are
// long-lived: bound requests with their context), and keeps idle
// connections for 90 s. The same client is returned for the same
// expectNode; Close closes their idle connections.
func (l *Link) HTTPClient(expectNode string) *http.Client {
	l.mu.Lock()
	defer l.mu.Unlock()
	if c := l.mu.clients[expectNode]; c != nil {
		return c
	}
	tr := &http.Transport{
		Proxy: nil,
		DialContext: func(context.Context, string, string) (net.Conn, error) {
			return nil, errPlainHTTP
		},
		DialTLSContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			return l.Dial(ctx, addr, expectNode)
		},
		MaxIdleConnsPerHost:   8,
		IdleConnTimeout:       90 * time.Second,
		ExpectContinueTimeout: time.Second,
	}
	c := &http.Client{Transport: tr}
	l.mu.clients[expectNode] = c
	return c
}

// Close stops accepting, drops connections in handshake and those not yet
// taken by Accept, and closes the HTTP clients' idle connections.
// Raft().Accept and HTTP().Accept then return errors wrapping
// net.ErrClosed. Connections already handed out stay open. Close waits
// for the link's goroutines; calling it again returns nil. Shut raft's
// transport down first: a NetworkTransport whose Accept fails while it is
// still running logs an error and retries every second.
func (l *Link) Close() error {
	var err error
	l.closeOnce.Do(func() {
		close(l.done)
		err = l.ln.Close()
		l.mu.Lock()
		l.mu.closed = true
		for e := l.mu.handshaking.Front(); e != nil; e = e.Next() {
			h := e.Value.(*handshaking)
			h.removed = true
			h.raw.Close()
		}
		l.mu.handshaking.Init()
		clients := l.mu.clients
		l.mu.Unlock()
		l.wg.Wait()
		l.raft.Close()
		l.http.Close()
		for _, c := range clients {
			c.CloseIdleConnections()
		}
	})
	if err != nil {
		return fmt.Errorf("peerlink: close listener: %w", err)
	}
	return nil
}

func (l *Link) acceptLoop() {
	defer l.wg.Done()
	var delay time.Duration
	for {
		raw, err := l.ln.Accept()
		if err != nil {
			select {
			case <-l.done:
				return
			default:
			}
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors and the like: back off as net/http does.
			delay = min(max(2*delay, 5*time.Millisecond), acceptBackoffMax)
			l.opts.Logger.Warn("peerlink: accept failed; retrying", "addr", l.ln.Addr().String(), "err", err, "retry_in", delay)
			select {
			case <-l.done:
				return
			case <-time.After(delay):
			}
			continue
		}
		delay = 0
		l.stats.accepted.Add(1)
		if tcp, ok := raw.(*net.TCPConn); ok {
			tcp.SetNoDelay(true)
		}
		h := l.track(raw)
		if h == nil {
			continue
		}
		l.wg.Add(1)
		go l.serveConn(h)
	}
}

// track registers raw as handshaking, dropping the oldest handshake when
// MaxHandshakes are in progress. It returns nil (raw closed) after Close.
func (l *Link) track(raw net.Conn) *handshaking {
	h := &handshaking{raw: raw}
	var victim net.Conn
	l.mu.Lock()
	if l.mu.closed {
		l.mu.Unlock()
		raw.Close()
		return nil
	}
	if l.mu.handshaking.Len() >= l.opts.MaxHandshakes {
		old := l.mu.handshaking.Remove(l.mu.handshaking.Front()).(*handshaking)
		old.removed = true
		victim = old.raw
	}
	h.elem = l.mu.handshaking.PushBack(h)
	l.mu.Unlock()
	if victim != nil {
		l.stats.evicted.Add(1) // counted first: whoever sees the close sees the count
		victim.Close()
		l.opts.Logger.Debug("peerlink: dropped oldest handshake", "remote", victim.RemoteAddr().String(), "max_handshakes", l.opts.MaxHandshakes)
		l.warnDrop.warn(l.opts.Logger, "peerlink: too many connections in handshake; dropping the oldest",
			"max_handshakes", l.opts.MaxHandshakes)
	}
	return h
}

// untrack removes h from the handshaking list and reports whether it was
// still there (false: it was evicted and its conn closed).
func (l *Link) untrack(h *handshaking) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if h.removed {
		return false
	}
	l.mu.handshaking.Remove(h.elem)
	h.removed = true // out of the list; later untracks report false
	return true
}

// serveConn runs the handshake and first-byte read of one connection and
// routes it. It owns h.raw.
func (l *Link) serveConn(h *handshaking) {
	defer l.wg.Done()
	raw := h.raw
	raw.SetDeadline(time.Now().Add(l.opts.HandshakeTimeout))
	braw := newBufferedRaw(raw)
	tc := tls.Server(braw, l.serverTLS)
	var first [1]byte
	err := tc.Handshake()
	if err == nil {
		_, err = io.ReadFull(tc, first[:])
	}
	if !l.untrack(h) {
		raw.Close() // evicted or closing: already counted
		return
	}
	if err != nil {
		// Counted before the close, here and below: a client that sees
		// its connection closed then finds the refusal in the metrics.
		l.stats.handshakeFailed.Add(1)
		raw.Close()
		l.opts.Logger.Debug("peerlink: refused connection", "remote", raw.RemoteAddr().String(), "err", err)
		l.warnHandshake.warn(l.opts.Logger, "peerlink: refusing connections that fail mutual TLS (set debug logging for each)",
			"last_remote", raw.RemoteAddr().String(), "last_err", err.Error())
		return
	}
	if err := raw.SetDeadline(time.Time{}); err != nil {
		raw.Close()
		return
	}
	// The handshake ran VerifyNode on the client certificate (pki.ServerTLS
	// with RequireAnyClientCert), so reading the id is enough here.
	peer, err := pki.NodeID(tc.ConnectionState().PeerCertificates[0])
	if err != nil {
		l.stats.handshakeFailed.Add(1)
		raw.Close()
		return
	}
	c := newConn(tc, braw, peer, first[0])
	switch b := first[0]; {
	case b <= raftFirstByteMax:
		if l.opts.AllowRaft != nil && !l.opts.AllowRaft(peer, c.certSHA256) {
			l.stats.raftRefused.Add(1)
			raw.Close()
			l.opts.Logger.Debug("peerlink: refused raft from a node that is not a member", "remote", raw.RemoteAddr().String(), "peer", peer)
			l.warnDrop.warn(l.opts.Logger, "peerlink: refusing raft from a certificate that is not a current member's", "peer", peer)
			return
		}
		l.route(l.raft.side, c, &l.stats.raft)
	case 'A' <= b && b <= 'Z':
		l.route(l.http, c, &l.stats.http)
	default:
		l.stats.badFirstByte.Add(1)
		raw.Close()
		l.opts.Logger.Debug("peerlink: refused connection with an unknown first byte", "remote", raw.RemoteAddr().String(),
			"peer", peer, "first_byte", b)
		l.warnDrop.warn(l.opts.Logger, "peerlink: peer sent neither raft nor HTTP", "peer", peer, "first_byte", b)
	}
}

func (l *Link) route(s *side, c *Conn, counter *atomic.Uint64) {
	if s.deliver(c, counter) {
		return
	}
	c.tc.NetConn().Close()
	l.stats.overflow.Add(1)
	l.opts.Logger.Debug("peerlink: dropped connection: queue full or closed", "side", s.name, "peer", c.peerID,
		"remote", c.RemoteAddr().String())
	l.warnDrop.warn(l.opts.Logger, "peerlink: dropping connections nobody accepts", "side", s.name,
		"max_pending", l.opts.MaxPending, "peer", c.peerID)
}

// side is one of the two listeners a Link routes to.
type side struct {
	link *Link
	name string
	ch   chan *Conn    // capacity MaxPending
	done chan struct{} // closed by Close
	mu   struct {
		sync.Mutex
		closed bool
	}
}

var _ net.Listener = (*side)(nil)

func newSide(l *Link, name string) *side {
	return &side{link: l, name: name, ch: make(chan *Conn, l.opts.MaxPending), done: make(chan struct{})}
}

// deliver queues c without blocking and counts it in counter; false when
// the queue is full or the side is closed (the caller then closes c).
func (s *side) deliver(c *Conn, counter *atomic.Uint64) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.mu.closed {
		return false
	}
	counter.Add(1) // before the send: whoever Accepts c sees it counted
	select {
	case s.ch <- c:
		return true
	default:
		counter.Add(^uint64(0)) // not queued after all
		return false
	}
}

// Accept waits for the next connection of this side. After Close (of the
// side or of the Link) it returns an error wrapping net.ErrClosed.
func (s *side) Accept() (net.Conn, error) {
	select {
	case <-s.done:
		return nil, fmt.Errorf("peerlink: %s listener closed: %w", s.name, net.ErrClosed)
	default:
	}
	select {
	case c := <-s.ch:
		return c, nil
	case <-s.done:
		return nil, fmt.Errorf("peerlink: %s listener closed: %w", s.name, net.ErrClosed)
	}
}

// Close stops this side only: queued connections are closed, later ones
// are dropped, Accept returns net.ErrClosed. The other side and Dial keep
// working. It always returns nil.
func (s *side) Close() error {
	s.mu.Lock()
	if s.mu.closed {
		s.mu.Unlock()
		return nil
	}
	s.mu.closed = true
	close(s.done)
	s.mu.Unlock()
	for {
		select {
		case c := <-s.ch:
			c.tc.NetConn().Close()
		default:
			return nil
		}
	}
}

// Addr returns the Link's advertise address.
func (s *side) Addr() net.Addr { return tcpAddr(s.link.advertise) }

// raftLayer is the raft.StreamLayer of a Link.
type raftLayer struct{ *side }

var _ raft.StreamLayer = (*raftLayer)(nil)

// Dial dials a raft peer: any node of the cluster CA, bounded by timeout.
func (r *raftLayer) Dial(address raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return r.link.Dial(ctx, string(address), "")
}

// tcpAddr is an advertise address as a net.Addr.
type tcpAddr string

func (a tcpAddr) Network() string { return "tcp" }
func (a tcpAddr) String() string  { return string(a) }

// warnLimiter lets one warning through per warnInterval and counts the
// ones it held back.
type warnLimiter struct {
	nextUnixNano atomic.Int64
	suppressed   atomic.Uint64
}

func (w *warnLimiter) warn(log *slog.Logger, msg string, args ...any) {
	now := time.Now().UnixNano()
	next := w.nextUnixNano.Load()
	if now < next || !w.nextUnixNano.CompareAndSwap(next, now+int64(warnInterval)) {
		w.suppressed.Add(1)
		return
	}
	log.Warn(msg, append(args, "suppressed_since_last", w.suppressed.Swap(0))...)
}
