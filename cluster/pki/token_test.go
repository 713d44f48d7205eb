package pki

import (
	"errors"
	"strings"
	"testing"
)

func TestJoinTokenRoundTrip(t *testing.T) {
	ca := newTestCA(t)
	tok, err := NewJoinToken(ca.Fingerprint())
	if err != nil {
		t.Fatal(err)
	}
	if !isLowerHex(tok.ID, 8) || !isLowerHex(tok.Secret, 32) || tok.CAFingerprint != ca.Fingerprint() {
		t.Fatalf("NewJoinToken = %+v", tok)
	}
	s := tok.String()
	if want := "lupool1." + tok.ID + "." + tok.Secret + "." + strings.TrimPrefix(ca.Fingerprint(), "sha256:"); s != want {
		t.Fatalf("String %q, want %q", s, want)
	}
	got, err := ParseJoinToken(" \n" + s + "\r\n\t")
	if err != nil {
		t.Fatal(err)
	}
	if got != tok {
		t.Errorf("ParseJoinToken(String) = %+v, want %+v", got, tok)
	}
	tok2, _ := NewJoinToken(ca.Fingerprint())
	if tok2.Secret == tok.Secret || tok2.ID == tok.ID {
		t.Error("two tokens share an id or a secret")
	}
	for _, fp := range []string{"", "abc", strings.TrimPrefix(ca.Fingerprint(), "sha256:"), strings.ToUpper(ca.Fingerprint()), ca.Fingerprint() + "0"} {
		if _, err := NewJoinToken(fp); err == nil {
			t.Errorf("NewJoinToken(%q) succeeded", fp)
		}
	}
}

func TestParseJoinTokenRefuses(t *testing.T) {
	id, sec, fp := "0123abcd", strings.Repeat("5f", 16), strings.Repeat("a1", 32)
	good := "lupool1." + id + "." + sec + "." + fp
	if _, err := ParseJoinToken(good); err != nil {
		t.Fatalf("good token refused: %v", err)
	}
	for _, in := range []string{
		"", "   ", "lupool1", good + ".", "." + good, good + "0",
		"lupool2." + id + "." + sec + "." + fp,
		"LUPOOL1." + id + "." + sec + "." + fp,
		"lupool1." + id[:7] + "." + sec + "." + fp,
		"lupool1." + strings.ToUpper(id) + "." + sec + "." + fp,
		"lupool1." + id + "." + sec[:31] + "g." + fp,
		"lupool1." + id + "." + sec + "." + fp[:63],
		"lupool1." + id + "." + sec + ".sha256:" + fp,
		"lupool1." + id + "." + sec + "." + fp + strings.Repeat("0", 300),
		"lupool1." + id + " ." + sec + "." + fp,
		"lupool1.." + id + sec + "." + fp,
	} {
		tok, err := ParseJoinToken(in)
		if !errors.Is(err, ErrBadToken) {
			t.Errorf("ParseJoinToken(%q) = %+v, %v; want ErrBadToken", in, tok, err)
			continue
		}
		if strings.Contains(err.Error(), sec) {
			t.Errorf("error %q echoes the secret", err)
		}
	}
	if !strings.Contains(ErrBadToken.Error(), "lupool1.") {
		t.Errorf("ErrBadToken %q does not show the expected shape", ErrBadToken)
	}
}

func TestSecretMatches(t *testing.T) {
	h := HashSecret("s3cret")
	if !isLowerHex(h, 64) {
		t.Fatalf("HashSecret = %q, want 64 lowercase hex", h)
	}
	if !SecretMatches(h, "s3cret") {
		t.Error("right secret does not match")
	}
	for _, tc := range [][2]string{{h, "s3creT"}, {h, ""}, {"", "s3cret"}, {"", ""}, {h[:63], "s3cret"}, {strings.ToUpper(h), "s3cret"}} {
		if SecretMatches(tc[0], tc[1]) {
			t.Errorf("SecretMatches(%q, %q) = true", tc[0], tc[1])
		}
	}
}

func TestAdminTokenAndClusterID(t *testing.T) {
	a, err := NewAdminToken()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(a, "lupool-admin-") || !isLowerHex(strings.TrimPrefix(a, "lupool-admin-"), 64) {
		t.Errorf("admin token %q, want lupool-admin-<64 hex>", a)
	}
	b, _ := NewAdminToken()
	if a == b {
		t.Error("two admin tokens are equal")
	}
	c, err := NewClusterID()
	if err != nil {
		t.Fatal(err)
	}
	if !isLowerHex(c, 16) {
		t.Errorf("cluster id %q, want 16 lowercase hex", c)
	}
	if d, _ := NewClusterID(); d == c {
		t.Error("two cluster ids are equal")
	}
}

func TestValidNodeID(t *testing.T) {
	for _, ok := range []string{"a", "A-b_c.9", strings.Repeat("z", 128)} {
		if err := ValidNodeID(ok); err != nil {
			t.Errorf("ValidNodeID(%q) = %v", ok, err)
		}
	}
	for _, bad := range []string{"", "a b", "a/b", "é", "a\x00", strings.Repeat("z", 129)} {
		if err := ValidNodeID(bad); err == nil {
			t.Errorf("ValidNodeID(%q) = nil", bad)
		}
	}
}
