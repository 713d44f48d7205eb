package pki

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"fmt"
	"strings"
)

// Join token layout. Part of the wire format.
const (
	joinTokenPrefix    = "lupool1"
	joinTokenIDChars   = 8
	joinTokenSecChars  = 32
	joinTokenFPChars   = 64
	adminTokenPrefix   = "lupool-admin-"
	adminTokenBytes    = 32 // 256 bits
	clusterIDBytes     = 8  // 16 hex characters
	maxJoinTokenLength = 256
)

// JoinToken lets a new node join: ID names the token (not secret), Secret is
// what the node proves (secret; members keep only HashSecret(Secret)), and
// CAFingerprint, in the "sha256:<64 hex>" form, pins the cluster CA the node
// will trust.
type JoinToken struct {
	ID, Secret, CAFingerprint string
}

// NewJoinToken returns a token with a fresh random id (32 bits) and secret
// (128 bits) pinning caFingerprint, which must be of the form CA.Fingerprint
// returns. It fails on a malformed fingerprint or a random source failure.
func NewJoinToken(caFingerprint string) (JoinToken, error) {
	hexFP, ok := strings.CutPrefix(caFingerprint, fingerprintPrefix)
	if !ok || !isLowerHex(hexFP, joinTokenFPChars) {
		return JoinToken{}, fmt.Errorf("pki: CA fingerprint %q is not sha256:<64 lowercase hex> (use CA.Fingerprint)", caFingerprint)
	}
	id, err := randomHex(joinTokenIDChars / 2)
	if err != nil {
		return JoinToken{}, err
	}
	secret, err := randomHex(joinTokenSecChars / 2)
	if err != nil {
		return JoinToken{}, err
	}
	return JoinToken{ID: id, Secret: secret, CAFingerprint: caFingerprint}, nil
}

// String returns the token as "lupool1.<id>.<secret>.<cafp>". It holds the
// secret: never log it.
func (t JoinToken) String() string {
	return joinTokenPrefix + "." + t.ID + "." + t.Secret + "." + strings.TrimPrefix(t.CAFingerprint, fingerprintPrefix)
}

// ParseJoinToken parses "lupool1.<id>.<secret>.<cafp>" (surrounding
// whitespace trimmed): id 8, secret 32 and cafp 64 lowercase hex characters.
// Any other input returns an error wrapping ErrBadToken that says which part
// is wrong, never echoing the secret. An accepted token's String equals the
// trimmed input.
func ParseJoinToken(s string) (JoinToken, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return JoinToken{}, fmt.Errorf("%w: empty", ErrBadToken)
	}
	if len(s) > maxJoinTokenLength {
		return JoinToken{}, fmt.Errorf("%w: %d characters, a token has %d", ErrBadToken, len(s),
			len(joinTokenPrefix)+3+joinTokenIDChars+joinTokenSecChars+joinTokenFPChars)
	}
	parts := strings.Split(s, ".")
	if len(parts) != 4 {
		return JoinToken{}, fmt.Errorf("%w: %d dot-separated parts, want 4", ErrBadToken, len(parts))
	}
	if parts[0] != joinTokenPrefix {
		return JoinToken{}, fmt.Errorf("%w: does not start with %q", ErrBadToken, joinTokenPrefix+".")
	}
	if !isLowerHex(parts[1], joinTokenIDChars) {
		return JoinToken{}, fmt.Errorf("%w: id part is not %d lowercase hex characters", ErrBadToken, joinTokenIDChars)
	}
	if !isLowerHex(parts[2], joinTokenSecChars) {
		return JoinToken{}, fmt.Errorf("%w: secret part is not %d lowercase hex characters", ErrBadToken, joinTokenSecChars)
	}
	if !isLowerHex(parts[3], joinTokenFPChars) {
		return JoinToken{}, fmt.Errorf("%w: CA fingerprint part is not %d lowercase hex characters", ErrBadToken, joinTokenFPChars)
	}
	return JoinToken{ID: parts[1], Secret: parts[2], CAFingerprint: fingerprintPrefix + parts[3]}, nil
}

// HashSecret returns the lowercase hex sha256 of secret: the only form in
// which members store a join token's secret.
func HashSecret(secret string) string {
	sum := sha256.Sum256([]byte(secret))
	return hex.EncodeToString(sum[:])
}

// SecretMatches reports whether presented hashes to hashHex (as HashSecret
// returns it), in time independent of the contents. It is false when either
// is empty.
func SecretMatches(hashHex, presented string) bool {
	if hashHex == "" || presented == "" {
		return false
	}
	got := HashSecret(presented)
	return subtle.ConstantTimeCompare([]byte(got), []byte(hashHex)) == 1
}

// NewAdminToken returns "lupool-admin-" and 64 lowercase hex characters
// (256 random bits). It is secret.
func NewAdminToken() (string, error) {
	h, err := randomHex(adminTokenBytes)
	if err != nil {
		return "", err
	}
	return adminTokenPrefix + h, nil
}

// NewClusterID returns 16 random lowercase hex characters.
func NewClusterID() (string, error) {
	return randomHex(clusterIDBytes)
}

func randomHex(nBytes int) (string, error) {
	b := make([]byte, nBytes)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("pki: random source: %w", err)
	}
	return hex.EncodeToString(b), nil
}

// isLowerHex reports whether s is exactly n characters of [0-9a-f].
func isLowerHex(s string, n int) bool {
	if len(s) != n {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}
