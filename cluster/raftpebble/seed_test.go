package raftpebble

import (
	"flag"
	"testing"
	"time"
)

var seedFlag = flag.Uint64("seed", 0, "seed for the randomized tests (0 picks one from the clock and logs it)")

// testSeed returns the -seed flag or a fresh seed, logged with the command
// that runs the test again with it. The store tests replay exactly; the
// raft test replays the same fault schedule, while raft's own timing still
// varies from run to run.
func testSeed(t testing.TB) uint64 {
	t.Helper()
	seed := *seedFlag
	if seed == 0 {
		seed = uint64(time.Now().UnixNano())
	}
	t.Logf("seed %d (reproduce with: go test ./cluster/raftpebble/ -run '^%s$' -seed=%d)", seed, t.Name(), seed)
	return seed
}
