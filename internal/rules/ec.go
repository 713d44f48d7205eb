package rules

import (
	"errors"
	"fmt"
)

// Erasure-coding limits: K data shards and M parity shards per stripe.
const (
	// ECDataShardsMax is the largest K.
	ECDataShardsMax = 16
	// ECParityShardsMax is the largest M.
	ECParityShardsMax = 4
)

// ErrECGeometry is returned by ECGeometry for K or M out of range.
var ErrECGeometry = errors.New("rules: invalid erasure-coding geometry")

// ECGeometry checks K data and M parity shards per stripe.
func ECGeometry(k, m int) error {
	if k < 1 || k > ECDataShardsMax {
		return &ruleError{ErrECGeometry, fmt.Sprintf("K=%d data shards; use 1 to %d", k, ECDataShardsMax)}
	}
	if m < 1 || m > ECParityShardsMax {
		return &ruleError{ErrECGeometry, fmt.Sprintf("M=%d parity shards; use 1 to %d", m, ECParityShardsMax)}
	}
	return nil
}
