package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"reflect"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/lupool/lupool/internal/rules"
	"github.com/lupool/lupool/internal/units"
	"github.com/lupool/lupool/replication"
)

// serveConfig is every setting of `lupool serve`. Precedence: flag, then
// environment variable (LUPOOL_<NAME>), then config file (--config, JSON
// with the same names), then the default.
type serveConfig struct {
	Data     string   `json:"data"`
	PoolDirs []string `json:"pool_dirs"`
	NBD      string   `json:"nbd"`
	API      string   `json:"api"`
	Peer     string   `json:"peer"`
	NodeID   string   `json:"node_id"`
	Join     string   `json:"join"`
	// JoinToken is the credential for Join (lupool cluster join-token).
	JoinToken string `json:"join_token"`
	// OpenProbes leaves /healthz, /readyz and /metrics without a token.
	OpenProbes bool `json:"open_probes"`
	// Witness makes the node a metadata voter only: it holds no copies,
	// exports nothing and records no NBD address (a third voter that lets
	// a pool of two storage nodes fail over).
	Witness bool `json:"witness"`
	// NBDMaxConns and NBDMaxConnsPerExport cap NBD client connections.
	NBDMaxConns          int     `json:"nbd_max_conns"`
	NBDMaxConnsPerExport int     `json:"nbd_max_conns_per_export"`
	TLS                  string  `json:"tls"`
	TLSCert              string  `json:"tls_cert"`
	TLSKey               string  `json:"tls_key"`
	Overcommit           float64 `json:"overcommit"`
	// LUsPerNodeMax is the most LU copies one node may hold, applied by
	// this node when it is the primary (1 to rules.LUsPerNodeMax).
	LUsPerNodeMax int `json:"lus_per_node_max"`
	// PairLeases renews the read leases of the LUs this node writes by one
	// heartbeat per node pair instead of a ping loop per LU (issue 20;
	// off by default while it is new).
	PairLeases bool `json:"pair_leases"`
	// MemoryBudgetBytes bounds the sizes of the memory LUs' copies on
	// this node (0: half of the machine's RAM).
	MemoryBudgetBytes int64 `json:"memory_budget"`
	// SwapSafe: lock the daemon's memory and make it an I/O flusher at
	// start (on), once the node holds paging space (auto), or never (off).
	SwapSafe  string `json:"swap_safe"`
	LogLevel  string `json:"log_level"`
	LogFormat string `json:"log_format"`
	// DirtyRegionBytes is the writer's dirty-region size for copies that
	// fall behind; ResyncRateBytes throttles resync (0: unthrottled).
	DirtyRegionBytes int64 `json:"dirty_region_bytes"`
	ResyncRateBytes  int64 `json:"resync_rate_bytes"`
	// BackgroundRateBytes is the node's budget of resync, rebuild and
	// scrub bytes per second, adapted down while client latency is above
	// BackgroundLatencyTarget (a Go duration; 0 automatic); 0 turns the
	// budget off.
	BackgroundRateBytes     int64  `json:"background_rate_bytes"`
	BackgroundLatencyTarget string `json:"background_latency_target"`
	// ScrubInterval: each LU this node writes is scrubbed once per
	// interval (a Go duration; 0 never); ScrubRateBytes bounds the bytes
	// a scrub hashes per second (0: unthrottled); a copy with more than
	// ScrubDegradedRegions repaired regions is reported degraded.
	ScrubInterval        string `json:"scrub_interval"`
	ScrubRateBytes       int64  `json:"scrub_rate_bytes"`
	ScrubDegradedRegions int    `json:"scrub_degraded_regions"`
	// ReplaceAfter: the primary replaces a copy out of sync this long
	// (a Go duration such as 10m; 0 never).
	ReplaceAfter string `json:"replace_after"`
	// FailoverAfter: the primary makes an in-sync copy the writer of the
	// LUs whose writer's node has been dead this long (0 never).
	FailoverAfter string `json:"failover_after"`
	// MinorityDisconnect: a node that has not been part of the metadata
	// majority this long sends its NBD clients elsewhere (0 never).
	MinorityDisconnect string `json:"minority_disconnect"`
	// DebugPprof serves Go's profiler under /debug/pprof/ on the API.
	DebugPprof bool `json:"debug_pprof"`
	// EventsMax and EventsMaxAge bound the event log (the primary prunes
	// the oldest events beyond either); AlertInterval is how often a node
	// compares its pool with the alert thresholds.
	EventsMax     int    `json:"events_max"`
	EventsMaxAge  string `json:"events_max_age"`
	AlertInterval string `json:"alert_interval"`
	// FFDCMinInterval: each automatic failure data capture trigger makes
	// at most one bundle this often.
	FFDCMinInterval string `json:"ffdc_min_interval"`
}

func defaultServeConfig() serveConfig {
	return serveConfig{
		Data:          "./lupool-data",
		NBD:           "127.0.0.1:10809",
		API:           "127.0.0.1:10810",
		Peer:          "127.0.0.1:10811",
		TLS:           "off",
		Overcommit:    4,
		LUsPerNodeMax: rules.LUsPerNodeMax,
		SwapSafe:      swapSafeAuto,
		LogLevel:      "info",
		LogFormat:     "text",
		OpenProbes:    true,

		DirtyRegionBytes:   rules.DirtyRegionBytesDefault,
		ReplaceAfter:       "10m",
		FailoverAfter:      "2s",
		MinorityDisconnect: "5s",

		BackgroundRateBytes:     256 << 20,
		BackgroundLatencyTarget: "0",

		ScrubInterval:        "168h",
		ScrubRateBytes:       100 << 20,
		ScrubDegradedRegions: replication.ScrubDegradedRegionsDefault,

		EventsMax:       100000,
		EventsMaxAge:    "720h",
		AlertInterval:   "5s",
		FFDCMinInterval: "60s",
	}
}

// setting names one configurable value: its flag, environment variable and
// help text, and a pointer to the string form of it.
type setting struct {
	name, help string
	get        func(*serveConfig) string
	set        func(*serveConfig, string) error
	// boolean: the flag alone means true (--witness); a value goes after
	// "=" (--open-probes=false).
	boolean bool
}

func settings() []setting {
	str := func(name, help string, field func(*serveConfig) *string) setting {
		return setting{name: name, help: help,
			get: func(c *serveConfig) string { return *field(c) },
			set: func(c *serveConfig, v string) error { *field(c) = v; return nil }}
	}
	return []setting{
		str("data", "data directory (metadata, lock, node id; volumes unless --pool-dirs)", func(c *serveConfig) *string { return &c.Data }),
		{name: "pool-dirs", help: "comma-separated data directories for LU volumes, one per disk (default DATA/volumes)",
			get: func(c *serveConfig) string { return strings.Join(c.PoolDirs, ",") },
			set: func(c *serveConfig, v string) error {
				c.PoolDirs = nil
				for _, d := range strings.Split(v, ",") {
					if d = strings.TrimSpace(d); d != "" {
						c.PoolDirs = append(c.PoolDirs, d)
					}
				}
				return nil
			}},
		str("nbd", "NBD listen address HOST:PORT", func(c *serveConfig) *string { return &c.NBD }),
		str("api", "HTTP API listen address HOST:PORT", func(c *serveConfig) *string { return &c.API }),
		str("peer", "peer (raft) listen address HOST:PORT", func(c *serveConfig) *string { return &c.Peer }),
		str("node-id", "this node's id (default: kept in DATA/node-id, generated once)", func(c *serveConfig) *string { return &c.NodeID }),
		str("join", "API address of a node of the cluster to join (first start only; needs --join-token)", func(c *serveConfig) *string { return &c.Join }),
		str("join-token", "join token from lupool cluster join-token on a member (first start only; LUPOOL_JOIN_TOKEN keeps it out of ps)", func(c *serveConfig) *string { return &c.JoinToken }),
		boolSetting("witness", "a metadata voter only: hold no LU copies and serve no NBD (a third voter for two storage nodes; true or false)",
			func(c *serveConfig) *bool { return &c.Witness }),
		boolSetting("open-probes", "serve /healthz, /readyz and /metrics without the admin token (true or false)",
			func(c *serveConfig) *bool { return &c.OpenProbes }),
		intSetting("nbd-max-conns", "most NBD client connections this node accepts (0: the built-in default)",
			func(c *serveConfig) *int { return &c.NBDMaxConns }),
		intSetting("nbd-max-conns-per-export", "most NBD client connections to one LU through this node (0: the built-in default)",
			func(c *serveConfig) *int { return &c.NBDMaxConnsPerExport }),
		str("tls", "NBD TLS mode: off, optional or required", func(c *serveConfig) *string { return &c.TLS }),
		str("tls-cert", "PEM certificate file for NBD TLS (default: the node's cluster certificate, which lupool attach verifies)", func(c *serveConfig) *string { return &c.TLSCert }),
		str("tls-key", "PEM private key file for NBD TLS", func(c *serveConfig) *string { return &c.TLSKey }),
		{name: "overcommit", help: "limit of provisioned LU bytes over pool capacity",
			get: func(c *serveConfig) string { return strconv.FormatFloat(c.Overcommit, 'g', -1, 64) },
			set: func(c *serveConfig, v string) error {
				f, err := strconv.ParseFloat(v, 64)
				if err != nil || f <= 0 {
					return fmt.Errorf("overcommit %q: want a positive number such as 4", v)
				}
				c.Overcommit = f
				return nil
			}},
		intSetting("lus-per-node-max", fmt.Sprintf("most LU copies one node may hold; a create or copy change past it is refused (1 to %d)", rules.LUsPerNodeMax),
			func(c *serveConfig) *int { return &c.LUsPerNodeMax }),
		boolSetting("pair-leases", "renew the read leases of the LUs this node writes by one heartbeat per node pair instead of a ping loop per LU (true or false; experimental)",
			func(c *serveConfig) *bool { return &c.PairLeases }),
		sizeSetting("memory-budget", "most bytes the memory LUs' copies on this node may add up to, by size (0: half of this machine's RAM), e.g. 8G",
			func(c *serveConfig) *int64 { return &c.MemoryBudgetBytes }),
		str("swap-safe", "lock the daemon's memory and make it an I/O flusher (PR_SET_IO_FLUSHER): auto (once this node holds paging space), on (at start) or off",
			func(c *serveConfig) *string { return &c.SwapSafe }),
		sizeSetting("dirty-region", "dirty-region size the writer records for a copy that falls behind (4K to 4M, a multiple of 4K)",
			func(c *serveConfig) *int64 { return &c.DirtyRegionBytes }),
		sizeSetting("resync-rate", "bytes per second a resync may send (0: unthrottled), e.g. 200M",
			func(c *serveConfig) *int64 { return &c.ResyncRateBytes }),
		str("failover-after", "the primary makes an in-sync copy the writer of every LU whose writer's node has not answered for this long (more than the 1s read lease; 0 never)",
			func(c *serveConfig) *string { return &c.FailoverAfter }),
		str("minority-disconnect", "a node cut off from the metadata majority this long answers its NBD clients ESHUTDOWN and closes their connections, so they move to the majority (0 never)",
			func(c *serveConfig) *string { return &c.MinorityDisconnect }),
		sizeSetting("background-rate", "bytes per second resync, rebuild and scrub together may move on this node, less while client latency is high (0: no shared budget), e.g. 256M",
			func(c *serveConfig) *int64 { return &c.BackgroundRateBytes }),
		str("background-latency-target", "client latency above which background work backs off (0: twice the latency measured without it)",
			func(c *serveConfig) *string { return &c.BackgroundLatencyTarget }),
		str("scrub-interval", "scrub each LU this node writes once per interval, each at its own time within it (e.g. 168h; 0 never)",
			func(c *serveConfig) *string { return &c.ScrubInterval }),
		sizeSetting("scrub-rate", "bytes per second a scrub may hash on the writer (0: unthrottled), e.g. 100M",
			func(c *serveConfig) *int64 { return &c.ScrubRateBytes }),
		intSetting("scrub-degraded-regions", "report a copy degraded once scrubs repaired more regions of it than this",
			func(c *serveConfig) *int { return &c.ScrubDegradedRegions }),
		str("replace-after", "the primary replaces a copy that stays out of sync this long by one on another node (e.g. 10m; 0 never)",
			func(c *serveConfig) *string { return &c.ReplaceAfter }),
		intSetting("events-max", "most events the event log keeps (the oldest go first)", func(c *serveConfig) *int { return &c.EventsMax }),
		str("events-max-age", "events older than this leave the event log (e.g. 720h)", func(c *serveConfig) *string { return &c.EventsMaxAge }),
		str("alert-interval", "how often the pool is compared with its alert thresholds (e.g. 5s)", func(c *serveConfig) *string { return &c.AlertInterval }),
		str("ffdc-min-interval", "each automatic failure data capture trigger makes at most one bundle this often (e.g. 60s)",
			func(c *serveConfig) *string { return &c.FFDCMinInterval }),
		boolSetting("debug-pprof", "serve Go's profiler under /debug/pprof/ on the API address (true or false; needs the admin token)",
			func(c *serveConfig) *bool { return &c.DebugPprof }),
		str("log-level", "debug, info, warn or error", func(c *serveConfig) *string { return &c.LogLevel }),
		str("log-format", "text or json", func(c *serveConfig) *string { return &c.LogFormat }),
	}
}

// boolSetting is true or false.
func boolSetting(name, help string, field func(*serveConfig) *bool) setting {
	return setting{name: name, help: help, boolean: true,
		get: func(c *serveConfig) string { return strconv.FormatBool(*field(c)) },
		set: func(c *serveConfig, v string) error {
			b, err := strconv.ParseBool(v)
			if err != nil {
				return fmt.Errorf("%s %q: use true or false", name, v)
			}
			*field(c) = b
			return nil
		}}
}

// intSetting is a count of zero or more.
func intSetting(name, help string, field func(*serveConfig) *int) setting {
	return setting{name: name, help: help,
		get: func(c *serveConfig) string { return strconv.Itoa(*field(c)) },
		set: func(c *serveConfig, v string) error {
			n, err := strconv.Atoi(v)
			if err != nil || n < 0 {
				return fmt.Errorf("%s %q: want a whole number, 0 or more", name, v)
			}
			*field(c) = n
			return nil
		}}
}

// sizeSetting is a byte count given with units (4K, 1M, 10G).
func sizeSetting(name, help string, field func(*serveConfig) *int64) setting {
	return setting{name: name, help: help,
		get: func(c *serveConfig) string { return strconv.FormatInt(*field(c), 10) },
		set: func(c *serveConfig, v string) error {
			n, err := units.ParseSize(v)
			if err != nil {
				return fmt.Errorf("%s %q: want a byte count such as 1M: %v", name, v, err)
			}
			*field(c) = n
			return nil
		}}
}

func envName(flagName string) string {
	return "LUPOOL_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// serveFlags are the flags of `lupool serve`, kept as text until they are
// resolved against the environment and the config file.
type serveFlags struct {
	fs         *pflag.FlagSet     // where they are defined
	configFile *string            // --config
	values     map[string]*string // by setting name
}

// addServeFlags defines serve's flags on fs; getenv gives the default of
// --config (LUPOOL_CONFIG).
func addServeFlags(fs *pflag.FlagSet, getenv func(string) string) *serveFlags {
	def := defaultServeConfig()
	sf := &serveFlags{fs: fs, values: map[string]*string{}}
	sf.configFile = fs.String("config", getenv("LUPOOL_CONFIG"), "optional JSON config file with the same names (env LUPOOL_CONFIG)")
	for _, s := range settings() {
		sf.values[s.name] = fs.String(s.name, "", fmt.Sprintf("%s (env %s, default %q)", s.help, envName(s.name), s.get(&def)))
		if s.boolean {
			fs.Lookup(s.name).NoOptDefVal = "true"
		}
	}
	return sf
}

// loadServeConfig parses args as serve's flags and resolves the
// configuration against the environment (getenv) and the config file.
func loadServeConfig(args []string, getenv func(string) string, out io.Writer) (serveConfig, error) {
	fs := pflag.NewFlagSet("serve", pflag.ContinueOnError)
	fs.SetOutput(out)
	sf := addServeFlags(fs, getenv)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return defaultServeConfig(), err
		}
		return defaultServeConfig(), &usageError{msg: err.Error()}
	}
	if fs.NArg() > 0 {
		return defaultServeConfig(), usageErrorf("serve takes no arguments, got %q (a true/false flag alone means true; give a value after =, as --name=false)",
			strings.Join(fs.Args(), " "))
	}
	return sf.resolve(getenv)
}

// resolve applies, in order of precedence, the flags given, the
// environment (LUPOOL_<NAME>), the config file and the defaults.
func (sf *serveFlags) resolve(getenv func(string) string) (serveConfig, error) {
	cfg := defaultServeConfig()
	if *sf.configFile != "" {
		data, err := os.ReadFile(*sf.configFile)
		if err != nil {
			return cfg, fmt.Errorf("config file: %w", err)
		}
		dec := json.NewDecoder(strings.NewReader(string(data)))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&cfg); err != nil {
			return cfg, fmt.Errorf("config file %s: %v (keys: %s)", *sf.configFile, err, strings.Join(configKeys(), ", "))
		}
	}
	for _, s := range settings() {
		v, from := "", ""
		if sf.fs.Changed(s.name) {
			v, from = *sf.values[s.name], "--"+s.name
		} else if e := getenv(envName(s.name)); e != "" {
			v, from = e, envName(s.name)
		} else {
			continue
		}
		if err := s.set(&cfg, v); err != nil {
			return cfg, fmt.Errorf("%s: %w", from, err)
		}
	}
	return cfg, cfg.validate()
}

// configKeys lists the keys a config file may hold (serveConfig's JSON
// names), for the error that names an unknown one.
func configKeys() []string {
	t := reflect.TypeOf(serveConfig{})
	keys := make([]string, 0, t.NumField())
	for i := range t.NumField() {
		if k, _, _ := strings.Cut(t.Field(i).Tag.Get("json"), ","); k != "" && k != "-" {
			keys = append(keys, k)
		}
	}
	return keys
}

func (c *serveConfig) validate() error {
	if c.Data == "" {
		return fmt.Errorf("--data is empty: give a data directory")
	}
	for name, addr := range map[string]string{"--nbd": c.NBD, "--api": c.API, "--peer": c.Peer} {
		if _, _, err := net.SplitHostPort(addr); err != nil {
			return fmt.Errorf("%s %q: want HOST:PORT, e.g. 127.0.0.1:10809", name, addr)
		}
	}
	switch c.TLS {
	case "off", "optional", "required":
	default:
		return fmt.Errorf("--tls %q: use off, optional or required", c.TLS)
	}
	if (c.TLSCert == "") != (c.TLSKey == "") {
		return fmt.Errorf("--tls-cert and --tls-key go together: give both, or neither to use the node's cluster certificate")
	}
	if err := rules.LUsPerNodeConfig(c.LUsPerNodeMax); err != nil {
		return fmt.Errorf("--lus-per-node-max %d: %w", c.LUsPerNodeMax, err)
	}
	if err := rules.DirtyRegion(c.DirtyRegionBytes); err != nil {
		return fmt.Errorf("--dirty-region %d: %w", c.DirtyRegionBytes, err)
	}
	if d, err := time.ParseDuration(c.FailoverAfter); err != nil || d < 0 || d > 0 && d <= readLease {
		return fmt.Errorf("--failover-after %q: want 0 (never) or a duration above the %v read lease, such as 2s", c.FailoverAfter, readLease)
	}
	if d, err := time.ParseDuration(c.MinorityDisconnect); err != nil || d < 0 || d > 0 && d <= readLease {
		return fmt.Errorf("--minority-disconnect %q: want 0 (never) or a duration above the %v read lease, such as 5s", c.MinorityDisconnect, readLease)
	}
	if d, err := time.ParseDuration(c.ReplaceAfter); err != nil || d < 0 {
		return fmt.Errorf("--replace-after %q: want a duration such as 10m, 90s or 0 (never)", c.ReplaceAfter)
	}
	if d, err := time.ParseDuration(c.EventsMaxAge); err != nil || d <= 0 {
		return fmt.Errorf("--events-max-age %q: want a positive duration such as 720h", c.EventsMaxAge)
	}
	if d, err := time.ParseDuration(c.AlertInterval); err != nil || d < 100*time.Millisecond {
		return fmt.Errorf("--alert-interval %q: want a duration of at least 100ms, such as 5s", c.AlertInterval)
	}
	if d, err := time.ParseDuration(c.FFDCMinInterval); err != nil || d < 0 {
		return fmt.Errorf("--ffdc-min-interval %q: want a duration such as 60s", c.FFDCMinInterval)
	}
	if c.EventsMax < 1 {
		return fmt.Errorf("--events-max must be at least 1")
	}
	if c.ResyncRateBytes < 0 {
		return fmt.Errorf("--resync-rate must not be negative")
	}
	if c.BackgroundRateBytes < 0 {
		return fmt.Errorf("--background-rate must not be negative")
	}
	if d, err := time.ParseDuration(c.BackgroundLatencyTarget); err != nil || d < 0 {
		return fmt.Errorf("--background-latency-target %q: want a duration such as 2ms, or 0 (automatic)", c.BackgroundLatencyTarget)
	}
	if d, err := time.ParseDuration(c.ScrubInterval); err != nil || d < 0 {
		return fmt.Errorf("--scrub-interval %q: want a duration such as 168h, 24h or 0 (never)", c.ScrubInterval)
	}
	if c.ScrubRateBytes < 0 {
		return fmt.Errorf("--scrub-rate must not be negative")
	}
	if c.Overcommit <= 0 {
		return fmt.Errorf("--overcommit must be positive")
	}
	if c.MemoryBudgetBytes < 0 {
		return fmt.Errorf("--memory-budget must not be negative")
	}
	if c.SwapSafe != swapSafeAuto && c.SwapSafe != swapSafeOn && c.SwapSafe != swapSafeOff {
		return fmt.Errorf("--swap-safe %q: use auto, on or off", c.SwapSafe)
	}

	if _, err := parseLogLevel(c.LogLevel); err != nil {
		return err
	}
	if c.LogFormat != "text" && c.LogFormat != "json" {
		return fmt.Errorf("--log-format %q: use text or json", c.LogFormat)
	}
	return nil
}

func parseLogLevel(s string) (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return l, fmt.Errorf("--log-level %q: use debug, info, warn or error", s)
	}
	return l, nil
}

// isLoopback reports whether addr's host is a loopback address or name.
func isLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// readLease is how long a copy may serve reads from its own volume after
// its last proof that it is current (replication.ManagerOptions.ReadLease).
const readLease = time.Second
