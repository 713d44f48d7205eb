package ec

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"

	"github.com/klauspost/reedsolomon"
)

// selfTestGolden is the SHA-256 of the parity shards of selfTestData's
// encodes under the geometries of selfTestGeometries, in order. It was
// taken once from this library and is committed: a different result means
// the Reed-Solomon code under us changed (a new library version, a broken
// SIMD path) and would write parity that old shards cannot be rebuilt from.
const selfTestGolden = "24472b20b361fbafc90ec9f2a6a0c7b00754277761a839d2bdcbc99fef9fbd55"

var selfTestGeometries = []Geometry{{K: 2, M: 1}, {K: 4, M: 2}, {K: 8, M: 4}}

// selfTestShardBytes is the shard size of the self-test: large enough to
// take the library's SIMD paths.
const selfTestShardBytes = 4096 + 37

func selfTestData(g Geometry) [][]byte {
	shards := make([][]byte, g.Shards())
	for i := range shards {
		shards[i] = make([]byte, selfTestShardBytes)
		if i < g.K {
			for j := range shards[i] {
				shards[i][j] = byte(i*131 + j*7 + j>>8)
			}
		}
	}
	return shards
}

// selfTestHash encodes the fixed data and hashes the parity.
func selfTestHash() (string, error) {
	h := sha256.New()
	for _, g := range selfTestGeometries {
		enc, err := newEncoder(g)
		if err != nil {
			return "", err
		}
		shards := selfTestData(g)
		if err := enc.Encode(shards); err != nil {
			return "", err
		}
		for _, p := range shards[g.K:] {
			h.Write(p)
		}
		// A reconstruction must give the data back.
		want := append([]byte(nil), shards[0]...)
		shards[0] = nil
		if err := enc.ReconstructData(shards); err != nil {
			return "", err
		}
		if string(shards[0]) != string(want) {
			return "", fmt.Errorf("%w: %s reconstruction differs", ErrSelfTest, g)
		}
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// SelfTest encodes fixed data and compares the parity's hash with the
// committed golden hash. A program calls it once at start and serves no EC
// data when it fails.
func SelfTest() error {
	got, err := selfTestHash()
	if err != nil {
		return fmt.Errorf("%w: %v", ErrSelfTest, err)
	}
	if got != selfTestGolden {
		return fmt.Errorf("%w: parity hash %s, golden %s", ErrSelfTest, got, selfTestGolden)
	}
	return nil
}

func newEncoder(g Geometry) (reedsolomon.Encoder, error) {
	if err := g.Validate(); err != nil {
		return nil, err
	}
	return reedsolomon.New(g.K, g.M)
}
