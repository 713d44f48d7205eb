package lint

import (
	"context"
	"os"
	"os/exec"
	"testing"
	"time"
)

// crossTargets are the systems an operator runs the CLI on from a laptop or
// a jump host. lupool serve itself needs Linux (it says so and exits); the
// client commands must build everywhere. Windows builds too (checked by
// hand), but is left out here: on CI's cold build cache each target costs
// about two minutes of compiling the standard library and dependencies.
var crossTargets = []struct{ goos, goarch string }{
	{"darwin", "arm64"},
	{"freebsd", "amd64"},
}

// TestCrossBuildCLI builds cmd/lupool for every crossTargets entry, so a
// Linux-only call outside a build-tagged file fails here and not on an
// operator's Mac. Only cmd/lupool is built (and discarded): the first run
// compiles the standard library for each target (minutes on a cold cache),
// later runs take seconds.
func TestCrossBuildCLI(t *testing.T) {
	if testing.Short() {
		t.Skip("cross-compiles cmd/lupool for other systems; skipped under -short")
	}
	root := moduleRoot(t)
	for _, tg := range crossTargets {
		t.Run(tg.goos+"_"+tg.goarch, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
			defer cancel()
			cmd := exec.CommandContext(ctx, "go", "build", "-o", os.DevNull, "./cmd/lupool")
			cmd.Dir = root
			cmd.Env = append(os.Environ(), "GOOS="+tg.goos, "GOARCH="+tg.goarch, "CGO_ENABLED=0")
			start := time.Now()
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("GOOS=%s GOARCH=%s go build ./cmd/lupool: %v\n%s\nPut Linux-only calls in a _linux.go file with a !linux twin (see lu/lufs/os_other.go, cmd/lupool/platform_other.go).",
					tg.goos, tg.goarch, err, out)
			}
			t.Logf("GOOS=%s GOARCH=%s: built in %v", tg.goos, tg.goarch, time.Since(start).Round(time.Millisecond))
		})
	}
}
