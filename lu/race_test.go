//go:build race

package lu

// raceEnabled: the race detector slows memory copies about twentyfold, so
// randomized tests run fewer operations under it.
const raceEnabled = true
