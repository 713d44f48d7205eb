package pki

import (
	"crypto"
	"crypto/x509"
	"errors"
	"strings"
	"testing"
)

// FuzzParseJoinToken: ParseJoinToken never panics, refuses with
// ErrBadToken, and a token it accepts round-trips through String exactly.
func FuzzParseJoinToken(f *testing.F) {
	f.Add("lupool1.0123abcd." + strings.Repeat("5f", 16) + "." + strings.Repeat("a1", 32))
	f.Add(" lupool1.0123abcd." + strings.Repeat("5f", 16) + "." + strings.Repeat("a1", 32) + "\n")
	f.Add("lupool1...")
	f.Add("")
	f.Fuzz(func(t *testing.T, s string) {
		tok, err := ParseJoinToken(s)
		if err != nil {
			if !errors.Is(err, ErrBadToken) {
				t.Fatalf("ParseJoinToken(%q) error %v does not wrap ErrBadToken", s, err)
			}
			if tok != (JoinToken{}) {
				t.Fatalf("ParseJoinToken(%q) returned %+v with an error", s, tok)
			}
			return
		}
		if got, want := tok.String(), strings.TrimSpace(s); got != want {
			t.Fatalf("String() = %q, want the trimmed input %q", got, want)
		}
		again, err := ParseJoinToken(tok.String())
		if err != nil || again != tok {
			t.Fatalf("re-parse of %q = %+v, %v; want %+v", tok.String(), again, err, tok)
		}
		if !strings.HasPrefix(tok.CAFingerprint, "sha256:") {
			t.Fatalf("CAFingerprint %q lacks sha256:", tok.CAFingerprint)
		}
	})
}

// FuzzParsePublicKeyPEM: ParsePublicKeyPEM never panics, and a key it
// accepts is one IssueNode accepts and re-encodes to a PEM that parses to
// the same key.
func FuzzParsePublicKeyPEM(f *testing.F) {
	key, _, err := NewKey()
	if err != nil {
		f.Fatal(err)
	}
	pub, err := PublicKeyPEM(key)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(pub)
	f.Add([]byte("-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n-----END PUBLIC KEY-----\n"))
	f.Add([]byte("-----BEGIN PUBLIC KEY-----\n-----END PUBLIC KEY-----\n"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		k, err := ParsePublicKeyPEM(b)
		if err != nil {
			if k != nil {
				t.Fatalf("returned key %T with error %v", k, err)
			}
			return
		}
		if err := checkPublicKey(k); err != nil {
			t.Fatalf("accepted a key checkPublicKey refuses: %v", err)
		}
		re, err := pemOfPublic(k)
		if err != nil {
			t.Fatalf("re-encode accepted key: %v", err)
		}
		k2, err := ParsePublicKeyPEM(re)
		if err != nil || !publicKeysEqual(k, k2) {
			t.Fatalf("re-encoded key does not round-trip: %v", err)
		}
	})
}

func pemOfPublic(k crypto.PublicKey) ([]byte, error) {
	der, err := x509.MarshalPKIXPublicKey(k)
	if err != nil {
		return nil, err
	}
	return pemEncode("PUBLIC KEY", der), nil
}
