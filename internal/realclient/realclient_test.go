package realclient

import (
	"fmt"
	"runtime"
	"strings"
	"testing"
)

// fakeTB records how a helper ended the test. Like testing.T, Fatalf and
// Skipf stop the calling goroutine.
type fakeTB struct {
	testing.TB        // nil: calling anything not overridden panics
	ended      string // "fatal", "skip" or "" (the helper returned)
	msg        string
}

func (f *fakeTB) Helper() {}

func (f *fakeTB) Fatalf(format string, args ...any) {
	f.ended, f.msg = "fatal", fmt.Sprintf(format, args...)
	runtime.Goexit()
}

func (f *fakeTB) Skipf(format string, args ...any) {
	f.ended, f.msg = "skip", fmt.Sprintf(format, args...)
	runtime.Goexit()
}

// run calls fn with a fakeTB on its own goroutine, as the testing package
// runs a test, and returns how it ended.
func run(fn func(testing.TB)) *fakeTB {
	f := &fakeTB{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn(f)
	}()
	<-done
	return f
}

const absent = "lupool-no-such-tool-d41d8cd9"

func TestMissingFailsInCIAndSkipsElsewhere(t *testing.T) {
	for _, tc := range []struct {
		ci   string
		want string
	}{
		{ci: "true", want: "fatal"},
		{ci: "", want: "skip"},
		{ci: "false", want: "skip"},
	} {
		t.Run("CI="+tc.ci, func(t *testing.T) {
			t.Setenv("CI", tc.ci)
			for name, fn := range map[string]func(testing.TB){
				"Missing":  func(tb testing.TB) { Missing(tb, "%s not installed", absent) },
				"Require":  func(tb testing.TB) { Require(tb, "sh", absent) },
				"LookPath": func(tb testing.TB) { LookPath(tb, absent) },
			} {
				f := run(fn)
				if f.ended != tc.want {
					t.Errorf("%s with CI=%q ended the test with %q, want %q", name, tc.ci, f.ended, tc.want)
				}
				if !strings.Contains(f.msg, absent) {
					t.Errorf("%s: message %q does not name the missing tool", name, f.msg)
				}
				if tc.want == "fatal" && !strings.Contains(f.msg, "CI=true") {
					t.Errorf("%s: message %q does not say why it fails instead of skipping", name, f.msg)
				}
			}
		})
	}
}

func TestRequirePresentToolsReturn(t *testing.T) {
	t.Setenv("CI", "true")
	f := run(func(tb testing.TB) {
		Require(tb, "sh")
		if p := LookPath(tb, "sh"); p == "" {
			tb.Fatalf("LookPath(sh) returned an empty path")
		}
	})
	if f.ended != "" {
		t.Fatalf("Require/LookPath of an installed tool ended the test: %s: %s", f.ended, f.msg)
	}
}
