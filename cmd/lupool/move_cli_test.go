package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/lupool/lupool/server/api"
)

// TestMoveListAndShowText: `move list` prints one row per move with its
// state, age and every monitor's last step; `lu show` prints an LU's move
// in progress; JSON keeps the same fields.
func TestMoveListAndShowText(t *testing.T) {
	at := time.Date(2026, 12, 7, 15, 0, 0, 0, time.UTC)
	m := api.Move{LU: "vm1", From: "n1", To: "n2", Epoch: 4, State: "syncing", StartedAt: at, AgeSeconds: 1.25,
		Monitors: []api.MoveMonitor{{Role: "source", Node: "n1", Step: "quiescing", At: at},
			{Role: "target", Node: "n2", Step: "ready", At: at}, {Role: "primary", Node: "n3", Step: "watching", At: at}}}
	var b bytes.Buffer
	if err := printMoves(&b, []api.Move{m}); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(b.String()), "\n")
	if len(lines) != 2 || !strings.HasPrefix(lines[0], "LU") {
		t.Fatalf("move list:\n%s", b.String())
	}
	for _, want := range []string{"vm1", "n1", "n2", "syncing", "1.25s", "source n1: quiescing, target n2: ready, primary n3: watching"} {
		if !strings.Contains(lines[1], want) {
			t.Errorf("move list row %q lacks %q", lines[1], want)
		}
	}
	b.Reset()
	if err := printMoves(&b, nil); err != nil || strings.Count(b.String(), "\n") != 1 {
		t.Errorf("no moves: %q %v; want the header alone", b.String(), err)
	}
	b.Reset()
	lu := api.LU{Name: "vm1", Copies: 2, Writer: "n1", Epoch: 4, Move: &m,
		Replicas: []api.Replica{{Node: "n1", State: "in-sync"}, {Node: "n2", State: "in-sync"}}}
	if err := printLUs(&b, "", []api.LU{lu}, true); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(b.String(), "moving: writer n1 → n2, syncing for 1.25s (epoch 4)") ||
		!strings.Contains(b.String(), "monitors: source n1: quiescing") {
		t.Errorf("lu show:\n%s", b.String())
	}
	b.Reset()
	lu.Move = nil
	if err := printLUs(&b, "", []api.LU{lu}, true); err != nil || strings.Contains(b.String(), "moving") {
		t.Errorf("lu show without a move mentions one:\n%s", b.String())
	}
}
