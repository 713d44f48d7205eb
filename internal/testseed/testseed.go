// Package testseed gives randomized tests a seed that a failing run logs
// and the -seed flag replays. Import it from tests only: it registers the
// -seed flag of the test binary.
package testseed

import (
	"flag"
	"testing"
	"time"
)

var seedFlag = flag.Uint64("seed", 0, "seed for the randomized tests (0 picks one from the clock and logs it)")

// Seed returns the -seed flag, or a fresh seed from the clock when it is 0,
// and logs it with the command that runs t again with it; pkg is the
// package directory for that command, such as "./lu/".
func Seed(t testing.TB, pkg string) uint64 {
	t.Helper()
	seed := *seedFlag
	if seed == 0 {
		seed = uint64(time.Now().UnixNano())
	}
	t.Logf("seed %d (reproduce with: go test %s -run '^%s$' -seed=%d)", seed, pkg, t.Name(), seed)
	return seed
}
