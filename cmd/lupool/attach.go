package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"

	"github.com/lupool/lupool/cluster/pki"
	"github.com/lupool/lupool/server/api"
	"github.com/lupool/lupool/server/endpoint"
	"github.com/lupool/lupool/server/nbd"
	"github.com/lupool/lupool/server/nbdkernel"
)

// attachFlags are the options of lupool attach.
type attachFlags struct {
	listen       string
	prefer       string
	giveUp       time.Duration
	replyTimeout time.Duration
	metrics      string
	debug        bool
	swapSafe     bool
}

// newAttachCommand is the client-side endpoint: it keeps the connection to
// the pool and serves the LU locally, on an address (--listen) or to a
// kernel NBD device through a socket pair.
func newAttachCommand(cf *clientFlags, stderr io.Writer) *cobra.Command {
	var af attachFlags
	c := &cobra.Command{
		Use:   "attach LU {--listen ADDR | /dev/nbdX}",
		Short: "serve an LU on this host and keep it served through node restarts and node loss",
		Long: `Keep one connection to the pool for the LU and serve it on this host: on
--listen ADDR (HOST:PORT or unix:PATH) to NBD clients (qemu, nbd-client,
nbdinfo, fio --ioengine=nbd), or to a kernel NBD device /dev/nbdX through a
socket pair (needs root and the nbd module).

The nodes come from the API (--api, --token-file, --ca-file); the node on
this host (or --prefer NODE) is used first. When that node stops (its
NBD_ESHUTDOWN), dies or stops answering, unanswered requests are kept and
sent again to the next live node serving the same LU: clients see a pause,
not an error. --give-up D fails requests with EIO after D without any node
(default: wait for ever, the right choice for swap).`,
		Example: "  lupool attach vm1 --listen unix:/run/lupool/vm1.sock\n" +
			"  lupool attach swap0 /dev/nbd0 && mkswap /dev/nbd0 && swapon /dev/nbd0",
		GroupID: "host",
		Args: func(c *cobra.Command, args []string) error {
			switch {
			case len(args) == 1 && af.listen != "":
				return nil
			case len(args) == 2 && af.listen == "":
				return nil
			}
			return usageErrorf("attach needs LU and either --listen ADDR or a device /dev/nbdX, e.g. lupool attach vm1 --listen unix:/run/vm1.sock, got %d arguments", len(args))
		},
		RunE: func(c *cobra.Command, args []string) error {
			return runAttach(c.Context(), cf, af, args, stderr)
		},
	}
	fs := c.Flags()
	fs.StringVar(&af.listen, "listen", "", "serve the LU on HOST:PORT or unix:PATH instead of a kernel device")
	fs.StringVar(&af.prefer, "prefer", "", "node id to use first (default: the node on this host)")
	fs.DurationVar(&af.giveUp, "give-up", 0, "fail requests with EIO after this long without any node (0: never)")
	fs.DurationVar(&af.replyTimeout, "reply-timeout", endpoint.DefaultReplyTimeout, "take a node for dead when a request waits this long")
	fs.StringVar(&af.metrics, "metrics", "", "serve Prometheus metrics on HOST:PORT (/metrics)")
	fs.BoolVar(&af.debug, "debug", false, "log every node tried")
	fs.BoolVar(&af.swapSafe, "swap-safe", true, "lock this process's memory and make it an I/O flusher (PR_SET_IO_FLUSHER): the host may swap through it")
	return c
}

func runAttach(ctx context.Context, cf *clientFlags, af attachFlags, args []string, stderr io.Writer) error {
	lu := args[0]
	if len(args) == 2 {
		if err := nbdkernel.CheckAvailable(args[1]); err != nil {
			return err
		}
	}
	level := slog.LevelInfo
	if af.debug {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	if af.swapSafe {
		makeSwapSafe(log, "lupool attach")
	}
	src, err := newNodeSource(cf)
	if err != nil {
		return err
	}
	metrics := endpoint.NewMetrics()
	dev, err := endpoint.New(ctx, endpoint.Options{
		Export:       lu,
		Nodes:        src.nodes,
		Prefer:       preferNode(af.prefer),
		TLSConfig:    src.tlsConfig,
		GiveUp:       af.giveUp,
		ReplyTimeout: af.replyTimeout,
		Logger:       log,
		Metrics:      metrics,
	})
	if err != nil {
		return err
	}
	defer dev.Close()
	if af.metrics != "" {
		reg := prometheus.NewRegistry()
		reg.MustRegister(metrics.Collectors()...)
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
		ml, err := net.Listen("tcp", af.metrics)
		if err != nil {
			return fmt.Errorf("--metrics: %w", err)
		}
		hs := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		go func() { _ = hs.Serve(ml) }()
		defer hs.Close()
	}
	exports := nbd.NewExportSet()
	if err := exports.Add(nbd.Export{Name: lu, Device: dev}); err != nil {
		return err
	}
	srv, err := nbd.NewServer(nbd.Options{Exports: exports, Logger: log.With("part", "nbd")})
	if err != nil {
		return err
	}
	if len(args) == 2 {
		return attachKernel(ctx, srv, lu, args[1], log, stderr)
	}
	l, err := listenAttach(af.listen)
	if err != nil {
		return err
	}
	fmt.Fprintf(stderr, "serving %s on %s through node %s; stop with Ctrl-C\n", lu, af.listen, dev.Node())
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(l) }()
	select {
	case <-ctx.Done():
	case err := <-errc:
		return err
	}
	sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return ignoreCanceled(srv.Shutdown(sctx))
}

func ignoreCanceled(err error) error {
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

// listenAttach listens on HOST:PORT or unix:PATH (a stale socket file is
// replaced).
func listenAttach(addr string) (net.Listener, error) {
	if path, ok := strings.CutPrefix(addr, "unix:"); ok {
		if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
			_ = os.Remove(path)
		}
		l, err := net.Listen("unix", path)
		if err != nil {
			return nil, fmt.Errorf("--listen %s: %w", addr, err)
		}
		return l, nil
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--listen %s (HOST:PORT or unix:PATH): %w", addr, err)
	}
	return l, nil
}

// attachKernel hands the kernel one end of a socket pair and serves the
// other end with the endpoint.
func attachKernel(ctx context.Context, srv *nbd.Server, lu, device string, log *slog.Logger, stderr io.Writer) error {
	kernelEnd, serverEnd, err := nbdkernel.SocketPair()
	if err != nil {
		return err
	}
	l := endpoint.NewConnListener(serverEnd)
	go func() { _ = srv.Serve(l) }()
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	fmt.Fprintf(stderr, "attaching %s to %s; stop with Ctrl-C\n", lu, device)
	return nbdkernel.Attach(ctx, nbdkernel.Options{
		Export:      lu,
		Device:      device,
		Logger:      log,
		NoIOTimeout: true,
		Dial:        func(context.Context) (net.Conn, error) { return kernelEnd, nil },
	})
}

// preferNode prefers the node with id prefer, else nodes whose NBD address
// is on this host.
func preferNode(prefer string) func(endpoint.Node) bool {
	if prefer != "" {
		return func(n endpoint.Node) bool { return n.ID == prefer }
	}
	local := map[string]bool{}
	if addrs, err := net.InterfaceAddrs(); err == nil {
		for _, a := range addrs {
			if ipn, ok := a.(*net.IPNet); ok {
				local[ipn.IP.String()] = true
			}
		}
	}
	return func(n endpoint.Node) bool {
		host, _, err := net.SplitHostPort(n.NBDAddr)
		if err != nil {
			return false
		}
		ip := net.ParseIP(host)
		return host == "localhost" || (ip != nil && (ip.IsLoopback() || local[ip.String()]))
	}
}

// nodeSource lists the pool's nodes through the API given on the command
// line, and when that node is down through the API of any node it knew.
type nodeSource struct {
	cf *clientFlags
	// token and ca are the credentials for every node's API.
	token string
	ca    *pki.CA
	mu    sync.Mutex
	apis  []string // guarded by mu; the configured one first
}

func newNodeSource(cf *clientFlags) (*nodeSource, error) {
	token, err := cf.token()
	if err != nil {
		return nil, err
	}
	s := &nodeSource{cf: cf, token: token, apis: []string{cf.api}}
	if pem, err := os.ReadFile(cf.caFile); err == nil {
		if s.ca, err = pki.ParseCA(pem, nil); err != nil {
			return nil, fmt.Errorf("--ca-file %s: %w", cf.caFile, err)
		}
	}
	return s, nil
}

func (s *nodeSource) client(addr string) (*api.Client, error) {
	u := apiURL(addr)
	opts := api.ClientOptions{Token: s.token, HTTP: &http.Client{Timeout: 5 * time.Second}}
	if strings.HasPrefix(u, "https://") {
		if s.ca == nil {
			return nil, fmt.Errorf("https API %s: no cluster CA (give --ca-file; it is DATA/pki/ca.crt on a node)", addr)
		}
		opts.HTTP.Transport = &http.Transport{TLSClientConfig: pki.ClientTLS(s.ca.Pool(), nil, "")}
	}
	return api.NewClientWith(u, opts)
}

// nodes asks each known API in turn until one answers.
func (s *nodeSource) nodes(ctx context.Context) ([]endpoint.Node, error) {
	s.mu.Lock()
	apis := append([]string(nil), s.apis...)
	s.mu.Unlock()
	var errs []error
	for _, a := range apis {
		cl, err := s.client(a)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		ns, err := cl.Nodes(ctx)
		if err != nil {
			errs = append(errs, fmt.Errorf("API %s: %w", a, err))
			continue
		}
		out := make([]endpoint.Node, 0, len(ns))
		known := []string{s.cf.api}
		for _, n := range ns {
			out = append(out, endpoint.Node{ID: n.ID, NBDAddr: n.NBDAddr})
			if n.APIAddr != "" && n.APIAddr != s.cf.api {
				known = append(known, n.APIAddr)
			}
		}
		s.mu.Lock()
		s.apis = known
		s.mu.Unlock()
		return out, nil
	}
	return nil, errors.Join(errs...)
}

// tlsConfig is plain NBD on loopback, else TLS verified against the
// cluster CA for that node.
func (s *nodeSource) tlsConfig(n endpoint.Node) *tls.Config {
	if isLoopback(n.NBDAddr) || s.ca == nil {
		return nil
	}
	return pki.ClientTLS(s.ca.Pool(), nil, n.ID)
}
