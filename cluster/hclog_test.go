package cluster

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
)

func TestHclogAdapter(t *testing.T) {
	var buf bytes.Buffer
	l := newHclog(slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelInfo})))
	l.Info("election won", "term", 3) // raft Info is slog Debug: dropped at Info
	l.Named("transport").With("peer", "n2").Warn("slow", "ms", 900)
	l.StandardLogger(nil).Print("[ERR] raft-net: failed to accept")
	out := buf.String()
	if strings.Contains(out, "election won") {
		t.Fatalf("raft Info logged at slog Info: %s", out)
	}
	for _, want := range []string{"level=WARN msg=slow component=raft.transport peer=n2 ms=900",
		"level=ERROR", "failed to accept"} {
		if !strings.Contains(out, want) {
			t.Fatalf("output lacks %q:\n%s", want, out)
		}
	}
	if l.IsDebug() || !l.IsWarn() {
		t.Fatal("IsDebug/IsWarn do not follow the slog level")
	}
}
