// Package lint holds the project's lint rules as Go tests: import layering
// (DESIGN.md, "Layering in lupool") and banned patterns (STYLE.md, point 15).
package lint

import (
	"encoding/json"
	"go/ast"
	"go/parser"
	"go/token"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

const module = "github.com/lupool/lupool"

// forbidden maps a package prefix (relative to the module) to the project
// package prefixes it must never import, directly or indirectly.
var forbidden = map[string][]string{
	"blockdev":    {"lu", "server", "replication", "cluster", "paging", "control", "cmd"},
	"lu":          {"server", "replication", "cluster", "paging", "control", "cmd"},
	"cluster":     {"lu", "server", "replication", "paging", "control", "cmd"},
	"replication": {"server", "paging", "control", "cmd"},
	"paging":      {"server", "cmd"},
	"server":      {"lu", "replication", "cluster", "paging", "control", "cmd"},
	"internal":    {"lu", "server", "replication", "cluster", "paging", "control", "cmd"},
	// The control plane sits below cmd and above the parts it drives; of
	// server it may use the API's types and sentinels only.
	"control": {"cmd", "paging", "server/nbd", "server/nbdkernel", "server/nbdproto"},
}

type listedPackage struct {
	ImportPath string
	Dir        string
	Deps       []string
	GoFiles    []string
}

func listPackages(t *testing.T) []listedPackage {
	t.Helper()
	out, err := exec.Command("go", "list", "-deps=false", "-json", module+"/...").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	var pkgs []listedPackage
	dec := json.NewDecoder(strings.NewReader(string(out)))
	for dec.More() {
		var p listedPackage
		if err := dec.Decode(&p); err != nil {
			t.Fatalf("decode go list output: %v", err)
		}
		pkgs = append(pkgs, p)
	}
	if len(pkgs) < 2 {
		t.Fatalf("go list found %d packages; expected the whole module", len(pkgs))
	}
	return pkgs
}

func rel(importPath string) string {
	return strings.TrimPrefix(strings.TrimPrefix(importPath, module), "/")
}

func hasPrefixPath(p, prefix string) bool {
	return p == prefix || strings.HasPrefix(p, prefix+"/")
}

func TestLayering(t *testing.T) {
	checked := 0
	for _, p := range listPackages(t) {
		me := rel(p.ImportPath)
		for prefix, bans := range forbidden {
			if !hasPrefixPath(me, prefix) {
				continue
			}
			checked++
			for _, dep := range p.Deps {
				if !strings.HasPrefix(dep, module+"/") {
					continue
				}
				for _, ban := range bans {
					if hasPrefixPath(rel(dep), ban) {
						t.Errorf("%s imports %s: layer %q must not depend on %q (DESIGN.md)", me, rel(dep), prefix, ban)
					}
				}
			}
		}
	}
	if checked == 0 {
		t.Fatal("no package matched a layering rule")
	}
}

// TestBannedPatterns keeps global state and raw atomics out of non-test code.
func TestBannedPatterns(t *testing.T) {
	banned := map[string]string{
		"promauto":                     "metrics are built unregistered; cmd registers them",
		"prometheus.MustRegister":      "no global registry; cmd registers on its own registry",
		"prometheus.DefaultRegisterer": "no global registry",
		"prometheus.DefaultGatherer":   "no global registry",
		"atomic.LoadInt64":             "use typed atomics (atomic.Int64)",
		"atomic.StoreInt64":            "use typed atomics (atomic.Int64)",
		"atomic.AddInt64":              "use typed atomics (atomic.Int64)",
		"atomic.LoadUint64":            "use typed atomics (atomic.Uint64)",
		"atomic.AddUint64":             "use typed atomics (atomic.Uint64)",
		"atomic.LoadInt32":             "use typed atomics (atomic.Int32)",
		"atomic.AddInt32":              "use typed atomics (atomic.Int32)",
		"atomic.CompareAndSwapInt32":   "use typed atomics (atomic.Int32)",
		"http.DefaultServeMux":         "no global mux",
		"http.HandleFunc":              "no global mux",
		"slog.SetDefault":              "inject the logger",
	}
	files := 0
	for _, p := range listPackages(t) {
		for _, name := range p.GoFiles {
			path := filepath.Join(p.Dir, name)
			fset := token.NewFileSet()
			f, err := parser.ParseFile(fset, path, nil, 0)
			if err != nil {
				t.Fatalf("parse %s: %v", path, err)
			}
			files++
			ast.Inspect(f, func(n ast.Node) bool {
				sel, ok := n.(*ast.SelectorExpr)
				if !ok {
					return true
				}
				x, ok := sel.X.(*ast.Ident)
				if !ok {
					return true
				}
				if why, bad := banned[x.Name+"."+sel.Sel.Name]; bad {
					t.Errorf("%s: %s.%s: %s", fset.Position(sel.Pos()), x.Name, sel.Sel.Name, why)
				}
				return true
			})
			for _, imp := range f.Imports {
				if strings.Contains(imp.Path.Value, "prometheus/promauto") {
					t.Errorf("%s imports promauto: %s", path, banned["promauto"])
				}
			}
		}
	}
	if files == 0 {
		t.Fatal("no Go files checked")
	}
}
