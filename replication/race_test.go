//go:build race

package replication

// raceEnabled: under the race detector sync.Pool drops a share of what is
// put back on purpose, so allocation counts mean nothing.
const raceEnabled = true
