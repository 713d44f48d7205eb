package main

import (
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestServeConfigPrecedence(t *testing.T) {
	file := filepath.Join(t.TempDir(), "lupool.json")
	if err := os.WriteFile(file, []byte(`{"nbd": "127.0.0.1:1", "api": "127.0.0.1:2", "overcommit": 2, "pool_dirs": ["/a", "/b"]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	env := map[string]string{"LUPOOL_CONFIG": file, "LUPOOL_API": "127.0.0.1:3", "LUPOOL_PEER": "127.0.0.1:4"}
	cfg, err := loadServeConfig([]string{"--peer", "127.0.0.1:5"}, func(k string) string { return env[k] }, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.NBD != "127.0.0.1:1" || cfg.API != "127.0.0.1:3" || cfg.Peer != "127.0.0.1:5" || cfg.Overcommit != 2 {
		t.Fatalf("precedence wrong (want file nbd, env api, flag peer): %+v", cfg)
	}
	if strings.Join(cfg.PoolDirs, ",") != "/a,/b" || cfg.Data != "./lupool-data" {
		t.Fatalf("file pool_dirs or default data wrong: %+v", cfg)
	}
}

func TestServeConfigErrors(t *testing.T) {
	noenv := func(string) string { return "" }
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--nbd", "10809"}, "want HOST:PORT"},
		{[]string{"--tls", "maybe"}, "use off, optional or required"},
		{[]string{"--tls", "required", "--tls-cert", "x.pem"}, "go together"},
		{[]string{"--overcommit", "-1"}, "want a positive number"},
		{[]string{"--lus-per-node-max", "0"}, "--lus-per-node-max 0: use 1 to 10000"},
		{[]string{"--lus-per-node-max", "10001"}, "use 1 to 10000"},
		{[]string{"--lus-per-node-max", "many"}, "want a whole number"},
		{[]string{"--log-level", "loud"}, "use debug, info, warn or error"},
		{[]string{"--bogus"}, "unknown flag: --bogus"},
		{[]string{"extra"}, "serve takes no arguments"},
		{[]string{"--config", "/nonexistent/lupool.json"}, "config file"},
		{[]string{"--dirty-region", "6K"}, "use a multiple of 4K from 4K to 4M"},
		{[]string{"--dirty-region", "lots"}, "want a byte count such as 1M"},
		{[]string{"--resync-rate", "fast"}, "want a byte count such as 1M"},
		{[]string{"--replace-after", "soon"}, "want a duration such as 10m"},
		{[]string{"--replace-after", "-5m"}, "want a duration such as 10m"},
		{[]string{"--debug-pprof=maybe"}, "use true or false"},
		{[]string{"--debug-pprof", "false"}, "--name=false"},
	} {
		_, err := loadServeConfig(tc.args, noenv, io.Discard)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: err %v, want mention of %q", tc.args, err, tc.want)
		}
	}
	bad := filepath.Join(t.TempDir(), "bad.json")
	if err := os.WriteFile(bad, []byte(`{"nbd_addr": "x"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := loadServeConfig([]string{"--config", bad}, noenv, io.Discard); err == nil || !strings.Contains(err.Error(), "unknown field") {
		t.Errorf("unknown config key: err %v", err)
	}
}
