package main

import (
	"bytes"
	"encoding/json"
	"os"
	"reflect"
	"slices"
	"strings"
	"testing"
)

const (
	exampleConfigPath = "../../scripts/lupool.example.json"
	unitPath          = "../../scripts/lupool.service"
)

// TestExampleConfigLoads checks scripts/lupool.example.json, which make
// install puts in /etc/lupool/lupool.json: every key of serveConfig is
// there and known (the loader refuses unknown keys), it validates, and it
// holds the built-in defaults except for the packaged data directory, so a
// default that changes in config.go cannot silently differ from a fresh
// install.
func TestExampleConfigLoads(t *testing.T) {
	data, err := os.ReadFile(exampleConfigPath)
	if err != nil {
		t.Fatal(err)
	}
	var cfg serveConfig
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&cfg); err != nil {
		t.Fatalf("%s: %v", exampleConfigPath, err)
	}
	if err := cfg.validate(); err != nil {
		t.Fatalf("%s does not validate: %v", exampleConfigPath, err)
	}

	var keys map[string]json.RawMessage
	if err := json.Unmarshal(data, &keys); err != nil {
		t.Fatal(err)
	}
	typ := reflect.TypeFor[serveConfig]()
	for i := range typ.NumField() {
		tag, _, _ := strings.Cut(typ.Field(i).Tag.Get("json"), ",")
		if tag == "" || tag == "-" {
			continue
		}
		if _, ok := keys[tag]; !ok {
			t.Errorf("%s lacks the key %q (serveConfig.%s): list every key, with its default", exampleConfigPath, tag, typ.Field(i).Name)
		}
	}

	want := defaultServeConfig()
	want.Data = "/var/lib/lupool"
	if len(cfg.PoolDirs) == 0 {
		cfg.PoolDirs = want.PoolDirs // [] in the file, nil in the defaults: both mean DATA/volumes
	}
	if !reflect.DeepEqual(cfg, want) {
		t.Errorf("%s differs from the built-in defaults (data aside):\n got  %+v\n want %+v", exampleConfigPath, cfg, want)
	}
}

// TestUnitMatchesExampleConfig checks that scripts/lupool.service starts
// the daemon on the installed config and lets it write its data directory.
func TestUnitMatchesExampleConfig(t *testing.T) {
	unit, err := os.ReadFile(unitPath)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(unit), "\n")
	has := func(line string) bool { return slices.Contains(lines, line) }
	for _, line := range []string{
		"ExecStart=/usr/local/bin/lupool serve --config /etc/lupool/lupool.json",
		"ReadWritePaths=/var/lib/lupool",
		"StateDirectory=lupool",
		"EnvironmentFile=-/etc/lupool/lupool.env",
	} {
		if !has(line) {
			t.Errorf("%s lacks the line %q", unitPath, line)
		}
	}
	data, err := os.ReadFile(exampleConfigPath)
	if err != nil {
		t.Fatal(err)
	}
	var cfg serveConfig
	if err := json.Unmarshal(data, &cfg); err != nil {
		t.Fatal(err)
	}
	if cfg.Data != "/var/lib/lupool" || cfg.JoinToken != "" {
		t.Errorf("%s: data %q, join_token %q; want /var/lib/lupool and no token (it belongs in /etc/lupool/lupool.env)", exampleConfigPath, cfg.Data, cfg.JoinToken)
	}
	if envName("join-token") != "LUPOOL_JOIN_TOKEN" {
		t.Errorf("the join token's variable is %s; the unit's comment and README name LUPOOL_JOIN_TOKEN", envName("join-token"))
	}
}
