package logring

import (
	"bytes"
	"fmt"
	"log/slog"
	"strings"
	"testing"
)

func TestRingKeepsNewestWithinLimits(t *testing.T) {
	r := New()
	var out bytes.Buffer
	log := slog.New(r.Handler(slog.NewTextHandler(&out, &slog.HandlerOptions{Level: slog.LevelWarn}), slog.LevelDebug))
	log = log.With("node", "n1")
	for i := range LinesMax + 10 {
		log.Debug("line", "i", i)
	}
	lines := strings.Split(strings.TrimSuffix(string(r.Lines()), "\n"), "\n")
	if len(lines) != LinesMax {
		t.Fatalf("%d lines kept, want %d", len(lines), LinesMax)
	}
	if !strings.Contains(lines[0], "i=10 ") && !strings.HasSuffix(lines[0], "i=10") {
		t.Fatalf("oldest kept line %q, want i=10", lines[0])
	}
	if !strings.Contains(lines[len(lines)-1], fmt.Sprintf("i=%d", LinesMax+9)) || !strings.Contains(lines[0], "node=n1") {
		t.Fatalf("newest line %q", lines[len(lines)-1])
	}
	if out.Len() != 0 {
		t.Fatalf("debug lines reached the warn-level handler: %q", out.String())
	}
	log.Warn("passed on")
	if !strings.Contains(out.String(), "passed on") {
		t.Fatal("a warning did not reach the next handler")
	}
	// The byte limit: long lines push old ones out; a line is cut.
	big := strings.Repeat("x", 3*LineBytesMax)
	for range BytesMax / LineBytesMax * 2 {
		log.Info(big)
	}
	if n := len(r.Lines()); n > BytesMax+LinesMax {
		t.Fatalf("ring holds %d bytes, limit %d", n, BytesMax)
	}
	for _, l := range strings.Split(string(r.Lines()), "\n") {
		if len(l) > LineBytesMax+len("…") {
			t.Fatalf("a line of %d bytes, limit %d", len(l), LineBytesMax)
		}
	}
}
