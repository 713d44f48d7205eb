package main

import (
	"encoding/json"
	"os"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"
)

const (
	dashboardPath  = "../../monitoring/lupool-dashboard.json"
	alertRulesPath = "../../monitoring/lupool-alerts.yml"
)

var metricName = regexp.MustCompile(`\blupool_[a-z0-9_]+`)

// dashboardExprs returns every query of the Grafana dashboard.
func dashboardExprs(t *testing.T) []string {
	t.Helper()
	data, err := os.ReadFile(dashboardPath)
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Title  string `json:"title"`
		UID    string `json:"uid"`
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(data, &dash); err != nil {
		t.Fatalf("%s does not parse: %v", dashboardPath, err)
	}
	if dash.Title == "" || dash.UID == "" || len(dash.Panels) == 0 {
		t.Fatalf("%s: title %q, uid %q, %d panels", dashboardPath, dash.Title, dash.UID, len(dash.Panels))
	}
	var out []string
	for _, p := range dash.Panels {
		if len(p.Targets) == 0 {
			t.Errorf("panel %q queries nothing", p.Title)
		}
		for _, tg := range p.Targets {
			if tg.Expr == "" {
				t.Errorf("panel %q has an empty query", p.Title)
			}
			out = append(out, tg.Expr)
		}
	}
	return out
}

// alertExprs returns the expr of every rule in the alerting-rules file,
// checking that each "- alert:" has one.
func alertExprs(t *testing.T) []string {
	t.Helper()
	data, err := os.ReadFile(alertRulesPath)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	alerts := 0
	for _, line := range strings.Split(string(data), "\n") {
		trimmed := strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(trimmed, "- alert:"):
			alerts++
		case strings.HasPrefix(trimmed, "expr:"):
			out = append(out, strings.TrimSpace(strings.TrimPrefix(trimmed, "expr:")))
		}
		if strings.Contains(line, "\t") {
			t.Fatalf("%s: a tab in YAML: %q", alertRulesPath, line)
		}
	}
	if alerts == 0 || alerts != len(out) {
		t.Fatalf("%s: %d alerts, %d exprs", alertRulesPath, alerts, len(out))
	}
	return out
}

// TestMonitoringFilesMatchMetrics: the Grafana dashboard parses, and every
// metric it or the Prometheus alerting rules query is exposed by a running
// node's /metrics (a two-node pool with a two-copy LU that saw I/O and a
// registered caller, so that every labelled series exists).
func TestMonitoringFilesMatchMetrics(t *testing.T) {
	alongside(t)
	needTools(t, "fio")
	exprs := append(dashboardExprs(t), alertExprs(t)...)
	n1 := newDaemon(t, "n1")
	n1.start()
	n2 := newJoiner(t, "n2", n1)
	n2.start()
	n1.mustCLI("lu", "create", "mon", "--size", "8M", "--copies", "2")
	fio(t, "--name=w", "--uri="+n1.uri("mon"), "--rw=randrw", "--bs=4k", "--size=2M")
	sub := newTCPSubscriber(t)
	n1.mustCLI("events", "subscribe", "--to", "tcp://"+sub.ln.Addr().String())
	// The primary's delivery worker starts within a scan (500 ms).
	text := n1.metrics()
	for deadline := time.Now().Add(20 * time.Second); !strings.Contains(text, "lupool_event_subscriber_lag_events{") && time.Now().Before(deadline); {
		time.Sleep(200 * time.Millisecond)
		text = n1.metrics()
	}
	exposed := map[string]bool{}
	for _, line := range strings.Split(text, "\n") {
		if strings.HasPrefix(line, "#") || line == "" {
			continue
		}
		name, _, _ := strings.Cut(line, "{")
		name, _, _ = strings.Cut(name, " ")
		exposed[name] = true
	}
	var missing []string
	queried := map[string]bool{}
	for _, e := range exprs {
		for _, name := range metricName.FindAllString(e, -1) {
			queried[name] = true
			if !exposed[name] {
				missing = append(missing, name+" (in "+e+")")
			}
		}
	}
	sort.Strings(missing)
	if len(missing) > 0 {
		t.Fatalf("queried but not in /metrics:\n%s", strings.Join(missing, "\n"))
	}
	t.Logf("%d queries use %d metrics, all exposed", len(exprs), len(queried))
}
