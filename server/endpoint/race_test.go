//go:build race

package endpoint

// raceEnabled: under the race detector sync.Pool drops a share of what is
// put back on purpose, so allocation counts mean nothing.
const raceEnabled = true
