package testseed

import (
	"fmt"
	"strings"
	"testing"
)

// logRecorder captures Logf; everything else is testing.TB's.
type logRecorder struct {
	testing.TB
	logs []string
}

func (r *logRecorder) Helper() {}

func (r *logRecorder) Logf(format string, args ...any) {
	r.logs = append(r.logs, strings.TrimSpace(fmt.Sprintf(format, args...)))
}

func TestSeedFromFlagIsLoggedWithReplayCommand(t *testing.T) {
	old := *seedFlag
	t.Cleanup(func() { *seedFlag = old })
	*seedFlag = 42
	r := &logRecorder{TB: t}
	if got := Seed(r, "./x/"); got != 42 {
		t.Fatalf("Seed with -seed=42 returned %d", got)
	}
	want := "go test ./x/ -run '^" + t.Name() + "$' -seed=42"
	if len(r.logs) != 1 || !strings.Contains(r.logs[0], want) {
		t.Fatalf("logged %q, want a line containing %q", r.logs, want)
	}
}

func TestSeedWithoutFlagVaries(t *testing.T) {
	old := *seedFlag
	t.Cleanup(func() { *seedFlag = old })
	*seedFlag = 0
	r := &logRecorder{TB: t}
	a := Seed(r, "./x/")
	b := Seed(r, "./x/")
	if a == 0 || a == b {
		t.Fatalf("two seeds from the clock: %d and %d, want two different non-zero ones", a, b)
	}
}
