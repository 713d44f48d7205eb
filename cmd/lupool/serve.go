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
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/blockdev/qos"
	"github.com/lupool/lupool/blockdev/readonly"
	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/cluster/peerlink"
	"github.com/lupool/lupool/cluster/pki"
	"github.com/lupool/lupool/control"
	"github.com/lupool/lupool/internal/logring"
	"github.com/lupool/lupool/internal/rules"
	"github.com/lupool/lupool/internal/units"
	"github.com/lupool/lupool/lu"
	"github.com/lupool/lupool/paging"
	"github.com/lupool/lupool/replication"
	"github.com/lupool/lupool/replication/ec"
	"github.com/lupool/lupool/server/api"
	"github.com/lupool/lupool/server/nbd"
)

// The daemon's parts are the control plane's.
var (
	_ control.Connections = (*nbd.Server)(nil)
	_ control.Peers       = (*peers)(nil)
)

// shutdownTimeout bounds how long SIGTERM waits for in-flight I/O.
const shutdownTimeout = 30 * time.Second

// serveCommand runs a node with cfg, logging to stderr.
func serveCommand(ctx context.Context, cfg serveConfig, stderr io.Writer) error {
	if err := servePlatformErr(); err != nil {
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
	// 0700: the metadata and the dirty-region store are for lupool alone.
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("data directory %s: %w", dir, err)
	}
	path := filepath.Join(dir, "LOCK")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("lock file: %w", err)
	}
	if err := lockExclusive(f); err != nil {
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
	mode := nbd.TLSOptional
	if cfg.TLS == "required" {
		mode = nbd.TLSRequired
	}
	if cfg.TLSCert == "" {
		// The node's cluster certificate, set once the identity is loaded.
		return mode, &tls.Config{MinVersion: tls.VersionTLS12}, nil
	}
	cert, err := tls.LoadX509KeyPair(cfg.TLSCert, cfg.TLSKey)
	if err != nil {
		return 0, nil, fmt.Errorf("TLS certificate: %w", err)
	}
	return mode, &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}, nil
}

// serve runs a node until ctx is done, then shuts down in order: stop
// taking NBD requests and finish those in flight, flush every volume, stop
// the API, close the metadata, close the pool.
func serve(ctx context.Context, cfg serveConfig, log *slog.Logger) (err error) {
	// The recent log lines, kept in memory for failure data capture.
	ring := logring.New()
	log = slog.New(ring.Handler(log.Handler(), slog.LevelInfo))
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
	memoryBudget := cfg.MemoryBudgetBytes
	if memoryBudget == 0 {
		memoryBudget = defaultMemoryBudget()
	}
	log.Info("memory budget for memory LUs", "bytes", memoryBudget, "size", units.Format(memoryBudget))
	pool, err := lu.OpenPool(lu.PoolOptions{
		Dirs:              poolDirs,
		MemoryBudgetBytes: memoryBudget,
		MemoryLimitBytes:  memoryBudget,
		OvercommitRatio:   cfg.Overcommit,
		Logger:            log.With("part", "pool"),
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
	clusterID, member, err := memberMarker(cfg.Data)
	if err != nil {
		return fmt.Errorf("read %s: %w", filepath.Join(cfg.Data, clusterIDName), err)
	}
	memberEvidence := filepath.Join(cfg.Data, clusterIDName) + " says"
	markerMissing := false
	if !member && identityExists(cfg.Data) && !pendingJoin(cfg.Data) && !pendingBootstrap(cfg.Data) {
		// A node certificate that is not a join in progress nor a
		// bootstrap in progress means the node belonged to a cluster even
		// if DATA/cluster-id went missing: never start a new one.
		clusterID, member, markerMissing = clusterIDOf(cfg.Data), true, true
		memberEvidence = "this node's certificate in " + filepath.Join(cfg.Data, pkiDirName) + " says"
	}
	joining := false
	if !identityExists(cfg.Data) {
		switch {
		case member:
			return fmt.Errorf("%s says this node belongs to cluster %s, but its certificate (%s) is missing: restore DATA/pki from a backup, or remove the node from the cluster and join again with a fresh --data",
				filepath.Join(cfg.Data, clusterIDName), clusterID, filepath.Join(cfg.Data, pkiDirName))
		case cfg.Join != "":
			if cfg.JoinToken == "" {
				return fmt.Errorf("--join %s needs --join-token TOKEN: run `lupool cluster join-token` against a member and pass what it prints", cfg.Join)
			}
			if err := requestCertificate(ctx, cfg, id, log); err != nil {
				return err
			}
			joining = true
		default:
			if !firstStart {
				log.Warn("this pool's data predates cluster identities: creating one (a node of an older multi-node pool must be joined again)")
			}
			if err := markBootstrap(cfg.Data); err != nil {
				return err
			}
			if err := createIdentity(cfg.Data, id, hostsOf(cfg.Peer, cfg.API, cfg.NBD), log); err != nil {
				return fmt.Errorf("create the cluster identity: %w", err)
			}
		}
	} else if !member && pendingJoin(cfg.Data) {
		// A certificate but no membership yet: the first start stopped
		// between receiving the certificate and registering.
		joining = true
	}
	ident, err := loadIdentity(cfg.Data)
	if err != nil {
		return fmt.Errorf("node identity: %w", err)
	}
	if tlsConf != nil && len(tlsConf.Certificates) == 0 {
		tlsConf.Certificates = []tls.Certificate{ident.cert}
	}
	if got, err := pki.VerifyNode(ident.pool, ident.cert.Leaf, id); err != nil || got != id {
		return fmt.Errorf("the certificate in %s is not for node %q (%v): a node keeps its id and certificate for life", ident.dir, id, err)
	}
	// Raft takes the leader's id from its messages, so a certificate of the
	// CA is not enough to speak raft: only members, with the certificate
	// their record is bound to (or, while this node joins, the members it
	// was told of).
	var peerRef atomic.Pointer[peers]
	joinMembers, joinMembersErr := readJoinMembers(cfg.Data)
	allowRaft := func(peer, certSHA string) bool {
		if p := peerRef.Load(); p != nil {
			if member, bound := p.certBound(peer, certSHA); member {
				return bound
			}
		}
		for _, m := range joinMembers {
			if m.ID == peer && m.CertSHA256 != "" && m.CertSHA256 == certSHA {
				return true
			}
		}
		return false
	}
	link, err := peerlink.Listen(peerlink.Options{Addr: cfg.Peer, Pool: ident.pool, Cert: ident.cert, Logger: log.With("part", "peerlink"),
		AllowRaft: allowRaft})
	if err != nil {
		return fmt.Errorf("peer listen on %s: %w (use --peer to pick another address)", cfg.Peer, err)
	}
	defer link.Close()

	// A witness records no NBD address: placement never picks it.
	nbdAddr := cfg.NBD
	if cfg.Witness {
		nbdAddr = ""
	}
	replaceAfter, _ := time.ParseDuration(cfg.ReplaceAfter)    // validated with the config
	failoverAfter, _ := time.ParseDuration(cfg.FailoverAfter)  // validated with the config
	eventsMaxAge, _ := time.ParseDuration(cfg.EventsMaxAge)    // validated with the config
	alertInterval, _ := time.ParseDuration(cfg.AlertInterval)  // validated with the config
	ffdcInterval, _ := time.ParseDuration(cfg.FFDCMinInterval) // validated with the config
	node, err := cluster.Open(cluster.Options{
		ReplaceAfter:  replaceAfter,
		LUsPerNodeMax: cfg.LUsPerNodeMax,
		FailoverAfter: failoverAfter,
		ReadLease:     readLease,
		Probe: func(ctx context.Context, id string) error {
			if p := peerRef.Load(); p != nil {
				return p.probe(ctx, id)
			}
			return errors.New("peers not ready")
		},
		EventsMax:    cfg.EventsMax,
		EventsMaxAge: eventsMaxAge,
		Dir:          metaDir,
		NodeID:       id,
		PeerAddr:     link.Addr(),
		StreamLayer:  link.Raft(),
		APIAddr:      cfg.API,
		NBDAddr:      nbdAddr,
		CertSHA256:   pki.Fingerprint(ident.cert.Leaf.Raw),
		Bootstrap:    !member && !joining && cfg.Join == "",
		ExpectState:  member,
		Logger:       log.With("part", "cluster"),
	})
	if errors.Is(err, cluster.ErrNoState) {
		return fmt.Errorf("%s this node belongs to cluster %s, but its metadata (%s) is empty or unreadable; it will not start a new cluster. "+
			"Restore DATA/meta from a backup, or remove this node from the cluster (lupool node remove %s, against a member) and join again with a fresh --data and --join: %w",
			memberEvidence, clusterID, metaDir, id, err)
	}
	if err != nil {
		return fmt.Errorf("metadata: %w", err)
	}
	defer func() { err = errors.Join(err, node.Close()) }()
	peer := &peers{self: id, link: link, node: node}
	peerRef.Store(peer)
	emitter := newEventEmitter(id, node, peer, log.With("part", "events"))
	defer emitter.close()
	if err := clearBootstrap(cfg.Data); err != nil {
		return err
	}

	// The failure data capture is wired before the parts that trigger it;
	// its registry is filled below, before anything can trigger.
	registry := prometheus.NewRegistry()
	capture := newFFDC(id, node, peer, ring, registry, cfg, ffdcInterval, log.With("part", "ffdc"))
	defer capture.close()

	exports := nbd.NewExportSet()
	nbdMetrics := nbd.NewMetrics()
	nbdServer, err := nbd.NewServer(nbd.Options{
		Exports:   exports,
		Logger:    log.With("part", "nbd"),
		TLSMode:   tlsMode,
		TLSConfig: tlsConf,
		Metrics:   nbdMetrics,
		// 0 takes the engine's defaults (limits in server/nbd/nbd.go).
		MaxConnections:          cfg.NBDMaxConns,
		MaxConnectionsPerExport: cfg.NBDMaxConnsPerExport,
		OnDeviceError: func(export, command string, err error) {
			capture.trigger(ffdcTriggerIOError, fmt.Sprintf("%s on LU %s failed: %v", command, export, err))
		},
	})
	if err != nil {
		return err
	}
	// Every LU's client I/O on this node goes through its QoS filter, whose
	// limits follow the LU's record (set below, as records arrive).
	qosMetrics := qos.NewMetrics()
	qosSet := qos.NewSet(qosMetrics)
	dirty, err := replication.OpenDirtyStoreOptions(filepath.Join(cfg.Data, "dirty"),
		replication.DirtyStoreOptions{ExpectExisting: !firstStart})
	if err != nil {
		return err
	}
	if doubt := dirty.Doubt(); doubt != nil {
		log.Warn("the dirty-region store is not trusted: copies that are not in sync will be compared by region hashes before they are recorded in sync", "reason", doubt)
	}
	defer func() { err = errors.Join(err, dirty.Close()) }()
	// Erasure-coded images: shard LUs' devices are kept for them, not
	// exported (image_ec_serve.go).
	ecDevs := newECDevices(func(name string) (blockdev.Device, bool) {
		e, ok := exports.Lookup(name)
		return e.Device, ok
	})
	mgr, err := replication.NewManager(replication.ManagerOptions{
		NodeID:               id,
		Pool:                 pool,
		Logger:               log.With("part", "replication"),
		Dirty:                dirty,
		RegionBytes:          cfg.DirtyRegionBytes,
		ResyncBytesPerSecond: cfg.ResyncRateBytes,
		UpdateLU:             peer.changeCopies,
		ConfirmLease:         peer.confirmLease,
		ReadLease:            readLease,
		PairLeases:           cfg.PairLeases,
		// Streams go to the peer port, over mutual TLS.
		NodeAPI: peer.peerAddr,
		Dial: func(ctx context.Context, nodeID, addr string) (net.Conn, error) {
			return link.Dial(ctx, addr, nodeID)
		},
		IsMember: node.IsMember,
		PeerHashes: func(ctx context.Context, nodeID, name string, offsetBytes, regionBytes int64, count int) ([]string, error) {
			c, err := peer.clientOf(nodeID)
			if err != nil {
				return nil, err
			}
			h, err := c.RegionHashes(ctx, name, offsetBytes, regionBytes, count)
			return h.Hashes, err
		},
		Export: func(name, description string, dev blockdev.Device) {
			if cluster.IsECShardLU(name) {
				ecDevs.add(name, dev)
				return
			}
			if _, _, isSnap := rules.SplitSnapshotLU(name); isSnap {
				// A snapshot never takes a write (its volume is frozen).
				gated, err := readonly.New(dev, func() bool { return true })
				if err != nil {
					log.Error("cannot export snapshot", "lu", name, "err", err)
					return
				}
				dev = gated
			} else if _, _, isDisk := rules.SplitImageLU(name); isDisk {
				// An image's disk takes writes while it imports, none
				// once the image is ready.
				gated, err := readonly.New(dev, func() bool {
					rec, err := node.GetLU(name)
					return err != nil || rec.ReadOnly
				})
				if err != nil {
					log.Error("cannot export image disk", "lu", name, "err", err)
					return
				}
				dev = gated
			}
			if limited, err := qosSet.Wrap(name, dev); err != nil {
				log.Error("cannot apply QoS limits to LU; exported without them", "lu", name, "err", err)
			} else {
				dev = limited
			}
			if err := exports.Add(nbd.Export{Name: name, Description: description, ID: luID(node, name), Device: dev}); err != nil {
				log.Error("cannot export LU", "lu", name, "err", err)
			}
		},
		Unexport: func(name string) {
			ecDevs.remove(name)
			exports.Remove(name)
			nbdServer.DisconnectExport(name)
		},
		Deleted: func(name string) {
			nbdMetrics.ForgetExport(name)
			qosSet.Forget(name)
		},
		ResyncDone: func(name, copyNode string, sentBytes int64, took time.Duration) {
			emitter.emit(cluster.Event{Kind: cluster.EventResyncBytes, LU: name, Details: map[string]string{
				"copy": copyNode, "bytes": strconv.FormatInt(sentBytes, 10), "seconds": strconv.FormatFloat(took.Seconds(), 'f', 3, 64),
			}})
		},
	})
	if err != nil {
		return err
	}
	defer mgr.Close()
	var backgroundCollectors []prometheus.Collector
	if cfg.BackgroundRateBytes > 0 {
		target, _ := time.ParseDuration(cfg.BackgroundLatencyTarget) // validated
		meter := &latencyMeter{nbd: nbdMetrics.Collectors(), qos: qosMetrics.Collectors()}
		budget := replication.NewBudget(replication.BudgetOptions{
			BytesPerSecond: cfg.BackgroundRateBytes,
			ClientLatency:  meter.since,
			LatencyTarget:  target,
			Logger:         log.With("part", "background"),
		})
		mgr.SetBackground(budget)
		budgetCtx, stopBudget := context.WithCancel(context.Background())
		budgetDone := make(chan struct{})
		go func() { defer close(budgetDone); budget.Run(budgetCtx) }()
		defer func() { stopBudget(); <-budgetDone }()
		backgroundCollectors = append(backgroundCollectors, budget)
	}
	scrubEvery, _ := time.ParseDuration(cfg.ScrubInterval) // validated
	if scrubEvery == 0 {
		scrubEvery = -1 // never
	}
	scrubLog := log.With("part", "scrub")
	scrubber := replication.NewScrubber(mgr, replication.ScrubOptions{
		Interval:        scrubEvery,
		BytesPerSecond:  cfg.ScrubRateBytes,
		DegradedRegions: int64(cfg.ScrubDegradedRegions),
		Logger:          scrubLog,
		OnRepair:        func(r replication.ScrubRepair) { scrubRepairEvent(emitter.emit, r) },
	})
	scrubCtx, stopScrubs := context.WithCancel(context.Background())
	scrubsDone := make(chan struct{})
	go func() { defer close(scrubsDone); scrubber.Run(scrubCtx) }()
	defer func() { stopScrubs(); <-scrubsDone }()

	switch cfg.SwapSafe {
	case swapSafeOn:
		makeSwapSafe(log, "--swap-safe on")
	case swapSafeAuto:
		swapCtx, stopSwapWatch := context.WithCancel(context.Background())
		swapDone := make(chan struct{})
		go func() {
			defer close(swapDone)
			watchForPaging(swapCtx, log, pool.Names, 2*time.Second)
		}()
		defer func() { stopSwapWatch(); <-swapDone }()
	}
	mover, err := replication.StartMoveMonitor(replication.MoveMonitorOptions{NodeID: id, Manager: mgr, Moves: node.Moves,
		Propose: peer.proposeMove, Logger: log.With("part", "move")})
	if err != nil {
		return err
	}
	defer mover.Close()

	registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	registry.MustRegister(nbdMetrics.Collectors()...)
	registry.MustRegister(node.Collectors()...)
	registry.MustRegister(poolCollectors(pool)...)
	registry.MustRegister(mgr.Collectors()...)
	registry.MustRegister(scrubber)
	registry.MustRegister(mover.Collectors()...)
	registry.MustRegister(backgroundCollectors...)
	registry.MustRegister(qosMetrics.Collectors()...)
	registry.MustRegister(peerCollectors(link)...)
	minority := prometheus.NewGauge(prometheus.GaugeOpts{Name: "lupool_minority",
		Help: "1 while this node is cut off from the metadata majority for longer than --minority-disconnect and sends its NBD clients elsewhere."})
	registry.MustRegister(minority)

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
	ctl, err := control.New(control.Options{NodeID: id, Metadata: node, Pool: pool, Replicas: mgr, Connections: nbdServer,
		Peers: peer, Scrubs: scrubber, OvercommitRatio: cfg.Overcommit, Liveness: peer.liveness, Moves: node, Images: node,
		SnapshotRecords: node, Snapshots: mgr, ProposeSnapshot: peer.recordSnapshot})
	if err != nil {
		return err
	}
	ecSelfTest := ec.SelfTest()
	ecSvc, err := control.NewEC(ctl, control.ECOptions{Metadata: node, Devices: ecDevs, SelfTest: ecSelfTest,
		ShardTimeout: 2 * time.Second, RetryAfter: 5 * time.Second})
	if err != nil {
		return err
	}
	ecExport := newECExporter(node, ecDevs, exports, log.With("part", "ec"), emitter.emit, ecSelfTest)
	registry.MustRegister(ecExport.Collectors()...)
	ecCtx, ecStop := context.WithCancel(ctx)
	defer ecStop()
	go ecExport.run(ecCtx)
	backend := &daemonBackend{ctl: ctl, node: node, nodeID: id, ident: ident, peers: peer, data: cfg.Data, log: log.With("part", "api")}
	if tok, err := readTrimmed(filepath.Join(cfg.Data, adminTokenName)); err == nil {
		backend.localAdminHash = pki.HashSecret(tok)
	}
	alerts := &alertStore{node: node, pool: pool, ctl: ctl.APIError}
	pagingMetrics := paging.NewMetrics()
	registry.MustRegister(pagingMetrics.Collectors()...)
	pagingSvc, err := paging.New(paging.Options{LUs: pagingLUs{ctl: ctl}, Mover: pagingMover{ctl: ctl}, NodeID: id, Metrics: pagingMetrics, Notify: func(n paging.Notice) {
		ev := cluster.Event{Kind: cluster.EventPagingRequested, LU: n.LU,
			Details: map[string]string{"vm": n.VM, "size_bytes": strconv.FormatInt(n.SizeBytes, 10)}}
		if n.Kind == paging.NoticeReleased {
			ev = cluster.Event{Kind: cluster.EventPagingReleased, LU: n.LU, Details: map[string]string{"vm": n.VM}}
		}
		emitter.emit(ev)
	}})
	if err != nil {
		return err
	}
	handler, err := api.NewHandler(api.Options{
		Backend:       backend,
		NodeID:        id,
		Metrics:       promhttp.HandlerFor(registry, promhttp.HandlerOpts{Registry: registry}),
		Logger:        log.With("part", "api"),
		Debug:         debug,
		CheckToken:    backend.checkToken,
		IsMember:      node.IsMember,
		PeerClient:    peer.httpClient,
		ProtectProbes: !cfg.OpenProbes,
		// A node certificate counts for a member only if it is the one the
		// member's record is bound to; one for an id without a record (a
		// joining node registering) is passed on as a non-member.
		PeerNode: func(r *http.Request) (string, bool) {
			id, ok := peerlink.PeerID(r.Context())
			if !ok {
				return "", false
			}
			got, _ := peerlink.PeerCertSHA256(r.Context())
			if member, bound := peer.certBound(id, got); member && !bound {
				log.Warn("refused a node certificate that is not the one its member record is bound to", "node", id)
				return "", false
			}
			return id, true
		},
		Upgrades: map[string]func(string, net.Conn, *bufio.Reader){
			replication.StreamPath: mgr.ServeStream,
		},
		Events:    &eventSource{node: node, ctl: ctl.APIError},
		Alerts:    alerts,
		Paging:    pagingBackend{svc: pagingSvc},
		Images:    ctl,
		Snapshots: ctl,
		EC:        ecSvc,
		FFDC:      &ffdcStore{f: capture, ctl: ctl.APIError},
		OnPanic: func(r *http.Request, v any, _ []byte) {
			capture.trigger(ffdcTriggerPanic, fmt.Sprintf("panic in %s %s: %v", r.Method, r.URL.Path, v))
		},
	})
	if err != nil {
		return err
	}
	apiListener, err := net.Listen("tcp", cfg.API)
	if err != nil {
		return fmt.Errorf("API listen on %s: %w (use --api to pick another address)", cfg.API, err)
	}
	// The API speaks HTTPS (this node's certificate from the cluster CA;
	// the CLI trusts DATA/pki/ca.crt) to everyone, and plain HTTP only to
	// clients on loopback.
	apiListener = api.SniffTLS(apiListener, pki.ServerTLS(ident.pool, ident.cert, tls.RequestClientCert), func(remote net.Addr) bool {
		ta, ok := remote.(*net.TCPAddr)
		return ok && ta.IP.IsLoopback()
	})
	// Idle keep-alive connections are closed, and the API takes at most
	// apiConnsMax at a time: a flood of idle clients cannot take the
	// process's file descriptors.
	apiListener = limitListener(apiListener, apiConnsMax)
	httpServer := &http.Server{Handler: handler, ReadHeaderTimeout: 10 * time.Second, ReadTimeout: time.Minute, IdleTimeout: apiIdleTimeout}
	peerServer := &http.Server{Handler: handler, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute, ConnContext: link.ConnContext}
	errc := make(chan error, 3)
	go func() { errc <- httpServer.Serve(apiListener) }()
	go func() { errc <- peerServer.Serve(link.HTTP()) }()
	defer httpServer.Close()
	defer peerServer.Close()

	if joining {
		if joinMembersErr != nil {
			return fmt.Errorf("finish joining: %w (remove %s and join again)", joinMembersErr, filepath.Join(cfg.Data, pkiDirName))
		}
		req := api.RegisterNodeRequest{PeerAddr: link.Addr(), APIAddr: cfg.API, NBDAddr: nbdAddr}
		if err := register(ctx, link, joinMembers, req, log); err != nil {
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
		if err := backend.recordIdentity(ctx); err != nil {
			log.Warn("cannot record the cluster identity in the metadata", "err", err)
		}
	}
	if !member || markerMissing {
		if err := writeMemberMarker(cfg.Data, clusterIDOf(cfg.Data)); err != nil {
			return fmt.Errorf("record membership: %w", err)
		}
		if joining {
			_ = os.Remove(filepath.Join(cfg.Data, pkiDirName, joinMembersName))
		}
	}
	// Limits are set before the manager sees the change that exports an
	// LU or changes it, so that no request runs without them.
	lus, cancelWatch, err := node.ListAndWatch(func(ch cluster.Change) {
		if ch.Kind != cluster.Deleted {
			qosSet.SetLimits(ch.LU.Name, qosLimits(ch.LU.QoS))
		}
		mgr.Enqueue(ch)
	})
	if err != nil {
		return fmt.Errorf("read LU table: %w", err)
	}
	for _, rec := range lus {
		qosSet.SetInitialLimits(rec.Name, qosLimits(rec.QoS))
	}
	defer cancelWatch()
	if err := mgr.Reconcile(ctx, lus); err != nil {
		return err
	}
	if dirty.Doubt() != nil {
		// Every copy in doubt is now marked for a hash compare in the
		// store itself, unless an LU could not be set up.
		if lerr := mgr.LastError(); lerr != nil {
			log.Warn("the dirty-region store stays in doubt until every LU is set up", "err", lerr)
		} else if err := dirty.Trust(); err != nil {
			log.Error("cannot mark the dirty-region store trusted", "err", err)
		}
	}

	if !cfg.Witness {
		nbdListener, err := net.Listen("tcp", cfg.NBD)
		if err != nil {
			return fmt.Errorf("NBD listen on %s: %w (use --nbd to pick another address)", cfg.NBD, err)
		}
		go func() { errc <- nbdServer.Serve(nbdListener) }()
	}
	minorityAfter, _ := time.ParseDuration(cfg.MinorityDisconnect) // validated with the config
	if minorityAfter > 0 {
		mctx, stopWatch := context.WithCancel(ctx)
		defer stopWatch()
		go watchMajority(mctx, node, nbdServer, minorityAfter, minority, emitter.emit, log)
	}
	backend.ready.Store(true)
	alertCtx, stopAlerts := context.WithCancel(ctx)
	alertsDone := make(chan struct{})
	go func() {
		defer close(alertsDone)
		alertLoop(alertCtx, alertInterval, alerts, emitter.emit)
	}()
	failuresDone := make(chan struct{})
	go func() {
		defer close(failuresDone)
		capture.watchForFailures(alertCtx)
	}()
	defer func() { stopAlerts(); <-failuresDone }()
	defer func() { stopAlerts(); <-alertsDone }()
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
	_ = peerServer.Shutdown(sctx)
	log.Info("stopped")
	return nil
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

// peerCollectors exposes the peer port's connection counts, read at
// scrape time: lupool_peer_connections_total{outcome}.
func peerCollectors(link *peerlink.Link) []prometheus.Collector {
	counter := func(outcome string, f func(peerlink.Stats) uint64) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "lupool_peer_connections_total",
			Help:        "Connections to the peer port by outcome (refused ones: no or bad certificate, flood, bad protocol).",
			ConstLabels: prometheus.Labels{"outcome": outcome}}, func() float64 { return float64(f(link.Stats())) })
	}
	return []prometheus.Collector{
		counter("raft", func(s peerlink.Stats) uint64 { return s.Raft }),
		counter("http", func(s peerlink.Stats) uint64 { return s.HTTP }),
		counter("handshake_failed", func(s peerlink.Stats) uint64 { return s.HandshakeFailed }),
		counter("bad_first_byte", func(s peerlink.Stats) uint64 { return s.BadFirstByte }),
		counter("evicted", func(s peerlink.Stats) uint64 { return s.Evicted }),
		counter("overflow", func(s peerlink.Stats) uint64 { return s.Overflow }),
		counter("raft_refused", func(s peerlink.Stats) uint64 { return s.RaftRefused }),
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

// scrubRepairEvent records a scrub's repair in the event log (LU, the
// region, the copy it rewrote).
func scrubRepairEvent(emit func(cluster.Event), r replication.ScrubRepair) {
	emit(cluster.Event{Kind: cluster.EventScrubRepaired, LU: r.LU, Details: map[string]string{
		"copy": r.Copy, "offset_bytes": strconv.FormatInt(r.OffsetBytes, 10), "length_bytes": strconv.FormatInt(r.LengthBytes, 10)}})
}

// qosLimits are an LU record's QoS limits as the filter takes them.
func qosLimits(q *cluster.QoS) qos.Limits {
	if q == nil {
		return qos.Limits{}
	}
	return qos.Limits{ReadIOPS: q.ReadIOPS, WriteIOPS: q.WriteIOPS, ReadBytesPerSecond: q.ReadBytesPerSecond,
		WriteBytesPerSecond: q.WriteBytesPerSecond, Burst: time.Duration(q.BurstMillis) * time.Millisecond}
}

// luID is the stable identity of LU name that the NBD server gives to
// clients that ask (`lupool attach` checks it on every reconnect): the node
// whose API created it and the leader's clock at the create, the same on
// every node since both come from the replicated record. An LU deleted and
// created again under the same name gets another id. "" when the record
// cannot be read (the client then compares name and size only).
func luID(node *cluster.Node, name string) string {
	lu, err := node.GetLU(name)
	if err != nil {
		return ""
	}
	return fmt.Sprintf("%s@%d", lu.CreatedOn, lu.CreatedAt.UnixNano())
}
