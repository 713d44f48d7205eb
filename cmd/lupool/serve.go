package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sys/unix"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/lu"
	"github.com/lupool/lupool/replication"
	"github.com/lupool/lupool/server/api"
	"github.com/lupool/lupool/server/nbd"
)

// shutdownTimeout bounds how long SIGTERM waits for in-flight I/O.
const shutdownTimeout = 30 * time.Second

func serveCommand(ctx context.Context, args []string, stderr io.Writer) error {
	cfg, err := loadServeConfig(args, os.Getenv, stderr)
	if err != nil {
		return err
	}
	level, _ := parseLogLevel(cfg.LogLevel)
	hopts := &slog.HandlerOptions{Level: level}
	var handler slog.Handler = slog.NewTextHandler(stderr, hopts)
	if cfg.LogFormat == "json" {
		handler = slog.NewJSONHandler(stderr, hopts)
	}
	return serve(ctx, cfg, slog.New(handler))
}

// lockDataDir takes an exclusive lock on DATA/LOCK for the life of the
// process, so a second daemon on the same directory refuses to start.
func lockDataDir(dir string) (*os.File, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("data directory %s: %w", dir, err)
	}
	path := filepath.Join(dir, "LOCK")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("lock file: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		pid, _ := io.ReadAll(io.LimitReader(f, 32))
		f.Close()
		holder := strings.TrimSpace(string(pid))
		if holder == "" {
			holder = "unknown"
		}
		return nil, fmt.Errorf("data directory %s is in use by another lupool daemon (pid %s, lock %s): stop it, or give this one another --data", dir, holder, path)
	}
	if err := f.Truncate(0); err == nil {
		_, _ = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	return f, nil
}

// nodeID returns the configured id, else the one kept in DATA/node-id,
// else a new random one that is kept there.
func nodeID(cfg serveConfig) (string, error) {
	path := filepath.Join(cfg.Data, "node-id")
	saved, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return "", err
	}
	id := strings.TrimSpace(string(saved))
	if cfg.NodeID != "" {
		if id != "" && id != cfg.NodeID {
			return "", fmt.Errorf("--node-id %q differs from %q kept in %s: a node keeps its id for life", cfg.NodeID, id, path)
		}
		id = cfg.NodeID
	}
	if id == "" {
		var b [4]byte
		if _, err := rand.Read(b[:]); err != nil {
			return "", err
		}
		host, _ := os.Hostname()
		id = "node-" + hex.EncodeToString(b[:])
		if host != "" {
			id = sanitizeID(host) + "-" + hex.EncodeToString(b[:])
		}
	}
	if string(saved) == "" {
		if err := os.WriteFile(path, []byte(id+"\n"), 0o644); err != nil {
			return "", err
		}
	}
	return id, nil
}

func sanitizeID(s string) string {
	return strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '-', r == '.', r == '_':
			return r
		}
		return '-'
	}, s)
}

func tlsConfig(cfg serveConfig) (nbd.TLSMode, *tls.Config, error) {
	switch cfg.TLS {
	case "off":
		return nbd.TLSOff, nil, nil
	}
	cert, err := tls.LoadX509KeyPair(cfg.TLSCert, cfg.TLSKey)
	if err != nil {
		return 0, nil, fmt.Errorf("TLS certificate: %w", err)
	}
	mode := nbd.TLSOptional
	if cfg.TLS == "required" {
		mode = nbd.TLSRequired
	}
	return mode, &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}, nil
}

// serve runs a node until ctx is done, then shuts down in order: stop
// taking NBD requests and finish those in flight, flush every volume, stop
// the API, close the metadata, close the pool.
func serve(ctx context.Context, cfg serveConfig, log *slog.Logger) (err error) {
	lock, err := lockDataDir(cfg.Data)
	if err != nil {
		return err
	}
	defer lock.Close()
	id, err := nodeID(cfg)
	if err != nil {
		return err
	}
	log = log.With("node", id)
	tlsMode, tlsConf, err := tlsConfig(cfg)
	if err != nil {
		return err
	}
	if tlsMode != nbd.TLSRequired && !isLoopback(cfg.NBD) {
		log.Warn("NBD listens beyond loopback without required TLS: anyone who can reach it can read and write every LU", "nbd", cfg.NBD)
	}
	poolDirs := cfg.PoolDirs
	if len(poolDirs) == 0 {
		poolDirs = []string{filepath.Join(cfg.Data, "volumes")}
	}
	pool, err := lu.OpenPool(lu.PoolOptions{
		Dirs:            poolDirs,
		OvercommitRatio: cfg.Overcommit,
		Logger:          log.With("part", "pool"),
		OnThreshold: func(level lu.PoolLevel) {
			log.Warn("pool usage level changed", "level", level)
		},
	})
	if err != nil {
		return fmt.Errorf("storage pool: %w", err)
	}
	defer func() { err = errors.Join(err, pool.Close()) }()

	metaDir := filepath.Join(cfg.Data, "meta")
	_, statErr := os.Stat(metaDir)
	firstStart := errors.Is(statErr, os.ErrNotExist)
	replaceAfter, _ := time.ParseDuration(cfg.ReplaceAfter) // validated with the config
	node, err := cluster.Open(cluster.Options{
		ReplaceAfter: replaceAfter,
		Dir:          metaDir,
		NodeID:       id,
		PeerAddr:     cfg.Peer,
		APIAddr:      cfg.API,
		NBDAddr:      cfg.NBD,
		Bootstrap:    cfg.Join == "",
		Logger:       log.With("part", "cluster"),
	})
	if err != nil {
		return fmt.Errorf("metadata: %w", err)
	}
	defer func() { err = errors.Join(err, node.Close()) }()

	exports := nbd.NewExportSet()
	nbdMetrics := nbd.NewMetrics()
	nbdServer, err := nbd.NewServer(nbd.Options{
		Exports:   exports,
		Logger:    log.With("part", "nbd"),
		TLSMode:   tlsMode,
		TLSConfig: tlsConf,
		Metrics:   nbdMetrics,
	})
	if err != nil {
		return err
	}
	dirty, err := replication.OpenDirtyStore(filepath.Join(cfg.Data, "dirty"), nil)
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, dirty.Close()) }()
	mgr, err := replication.NewManager(replication.ManagerOptions{
		NodeID:               id,
		Pool:                 pool,
		Logger:               log.With("part", "replication"),
		Dirty:                dirty,
		RegionBytes:          cfg.DirtyRegionBytes,
		ResyncBytesPerSecond: cfg.ResyncRateBytes,
		UpdateLU: func(ctx context.Context, rec cluster.LU, expected uint64) error {
			return updateLUViaLeader(ctx, node, rec, expected)
		},
		NodeAPI: func(nodeID string) (string, bool) {
			nodes, err := node.Nodes()
			if err != nil {
				return "", false
			}
			return nodeAPIAddr(nodes, nodeID)
		},
		Export: func(name, description string, dev blockdev.Device) {
			if err := exports.Add(nbd.Export{Name: name, Description: description, Device: dev}); err != nil {
				log.Error("cannot export LU", "lu", name, "err", err)
			}
		},
		Unexport: func(name string) {
			exports.Remove(name)
			nbdServer.DisconnectExport(name)
		},
	})
	if err != nil {
		return err
	}
	defer mgr.Close()

	registry := prometheus.NewRegistry()
	registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	registry.MustRegister(nbdMetrics.Collectors()...)
	registry.MustRegister(node.Collectors()...)
	registry.MustRegister(poolCollectors(pool)...)
	registry.MustRegister(mgr.Collectors()...)

	var debug http.Handler
	if cfg.DebugPprof {
		mux := http.NewServeMux()
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		debug = mux
	}
	backend := &daemonBackend{node: node, pool: pool, mgr: mgr, nbd: nbdServer, nodeID: id, overcommit: cfg.Overcommit}
	handler, err := api.NewHandler(api.Options{
		Backend: backend,
		NodeID:  id,
		Metrics: promhttp.HandlerFor(registry, promhttp.HandlerOpts{Registry: registry}),
		Logger:  log.With("part", "api"),
		Debug:   debug,
		Upgrades: map[string]func(net.Conn, *bufio.Reader){
			replication.StreamPath: mgr.ServeStream,
		},
	})
	if err != nil {
		return err
	}
	apiListener, err := net.Listen("tcp", cfg.API)
	if err != nil {
		return fmt.Errorf("API listen on %s: %w (use --api to pick another address)", cfg.API, err)
	}
	httpServer := &http.Server{Handler: handler, ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 2)
	go func() { errc <- httpServer.Serve(apiListener) }()
	defer httpServer.Close()

	if cfg.Join != "" && firstStart {
		if err := joinCluster(ctx, cfg, id, log); err != nil {
			return err
		}
	}
	if err := waitLeader(ctx, node, log); err != nil {
		return err
	}
	if node.IsLeader() {
		if err := node.RegisterSelf(ctx); err != nil {
			log.Warn("cannot record this node in the metadata", "err", err)
		}
	}
	lus, cancelWatch, err := node.ListAndWatch(mgr.Enqueue)
	if err != nil {
		return fmt.Errorf("read LU table: %w", err)
	}
	defer cancelWatch()
	if err := mgr.Reconcile(ctx, lus); err != nil {
		return err
	}

	nbdListener, err := net.Listen("tcp", cfg.NBD)
	if err != nil {
		return fmt.Errorf("NBD listen on %s: %w (use --nbd to pick another address)", cfg.NBD, err)
	}
	go func() { errc <- nbdServer.Serve(nbdListener) }()
	backend.ready.Store(true)
	log.Info("lupool serving", "nbd", cfg.NBD, "api", cfg.API, "peer", cfg.Peer, "data", cfg.Data, "lus", len(lus))

	select {
	case <-ctx.Done():
		log.Info("stopping: finishing in-flight I/O")
	case err := <-errc:
		if err != nil && !errors.Is(err, http.ErrServerClosed) && !errors.Is(err, nbd.ErrServerClosed) {
			log.Error("server failed", "err", err)
			return err
		}
	}
	backend.ready.Store(false)
	sctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	if err := nbdServer.Shutdown(sctx); err != nil {
		log.Warn("NBD shutdown", "err", err)
	}
	if err := mgr.Flush(sctx); err != nil {
		log.Error("flush at shutdown", "err", err)
	}
	_ = httpServer.Shutdown(sctx)
	log.Info("stopped")
	return nil
}

// updateLUViaLeader records a copy-state change of rec: directly when this
// node leads the metadata log, else through the leader's API.
func updateLUViaLeader(ctx context.Context, node *cluster.Node, rec cluster.LU, expected uint64) error {
	err := node.UpdateLUIfEpoch(ctx, rec, expected)
	if !errors.Is(err, cluster.ErrNotLeader) {
		return err
	}
	_, leaderAPI := node.Leader()
	if leaderAPI == "" {
		return err
	}
	c, cerr := api.NewClient(leaderAPI)
	if cerr != nil {
		return cerr
	}
	req := api.UpdateReplicasRequest{ExpectedEpoch: expected, Epoch: rec.Epoch, Writer: rec.Writer}
	for _, r := range rec.Replicas {
		req.Replicas = append(req.Replicas, api.Replica{Node: r.NodeID, State: r.State})
	}
	_, err = c.UpdateReplicas(ctx, rec.Name, req)
	var se *api.StatusError
	if errors.As(err, &se) && se.StatusCode == http.StatusPreconditionFailed {
		return fmt.Errorf("%w: %v", cluster.ErrEpochChanged, err)
	}
	return err
}

// waitLeader waits until the metadata log has a leader.
func waitLeader(ctx context.Context, node *cluster.Node, log *slog.Logger) error {
	wctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- node.WaitLeader(wctx) }()
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("no metadata leader: %w", err)
		}
		return nil
	case <-time.After(5 * time.Second):
		log.Info("waiting for a metadata leader")
		if err := <-done; err != nil {
			return fmt.Errorf("no metadata leader after 2 minutes (is a majority of nodes up?): %w", err)
		}
		return nil
	}
}

// joinCluster asks the node at cfg.Join to add this node as a voter,
// retrying while the cluster elects a leader.
func joinCluster(ctx context.Context, cfg serveConfig, id string, log *slog.Logger) error {
	c, err := api.NewClient(cfg.Join)
	if err != nil {
		return fmt.Errorf("--join: %w", err)
	}
	req := api.JoinRequest{ID: id, PeerAddr: cfg.Peer, APIAddr: cfg.API, NBDAddr: cfg.NBD}
	deadline := time.Now().Add(time.Minute)
	for {
		_, err := c.Join(ctx, req)
		if err == nil {
			log.Info("joined cluster", "via", cfg.Join)
			return nil
		}
		var se *api.StatusError
		if errors.As(err, &se) && se.StatusCode == http.StatusBadRequest {
			return fmt.Errorf("join via %s refused: %w", cfg.Join, err)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("join via %s: %w", cfg.Join, err)
		}
		log.Info("join not accepted yet; retrying", "via", cfg.Join, "err", err)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Second):
		}
	}
}

// poolCollectors exposes the pool's capacity and usage as gauges read at
// scrape time.
func poolCollectors(pool *lu.Pool) []prometheus.Collector {
	gauge := func(name, help string, f func(lu.PoolStatus) float64) prometheus.Collector {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, func() float64 { return f(pool.Status()) })
	}
	return []prometheus.Collector{
		gauge("lupool_pool_capacity_bytes", "Capacity of the pool's data directories.", func(s lu.PoolStatus) float64 { return float64(s.CapacityBytes) }),
		gauge("lupool_pool_free_bytes", "Free space in the pool's data directories.", func(s lu.PoolStatus) float64 { return float64(s.FreeBytes) }),
		gauge("lupool_pool_allocated_bytes", "Bytes really allocated by LU data.", func(s lu.PoolStatus) float64 { return float64(s.AllocatedBytes) }),
		gauge("lupool_pool_provisioned_bytes", "Sum of LU sizes.", func(s lu.PoolStatus) float64 { return float64(s.ProvisionedBytes) }),
	}
}
