package main

import (
	"bytes"
	"strings"
	"testing"
)

// FuzzUntarGz: unpacking a bundle (bytes a peer sent) never panics, never
// returns more than the limit, and never a name that is absolute or
// climbs out of the archive.
func FuzzUntarGz(f *testing.F) {
	good, err := tarGz(map[string][]byte{"n1/logs.txt": []byte("line\n"), "manifest.json": []byte("{}")})
	if err != nil {
		f.Fatal(err)
	}
	bad, err := tarGz(map[string][]byte{"../escape": []byte("x")})
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	f.Add(bad)
	f.Add([]byte{0x1f, 0x8b})
	f.Add([]byte("not gzip"))
	const max = 1 << 16
	f.Fuzz(func(t *testing.T, data []byte) {
		files, err := untarGz(data, max)
		if err != nil {
			return
		}
		total := 0
		for name, b := range files {
			total += len(b)
			if strings.HasPrefix(name, "/") || strings.Contains(name, "..") {
				t.Fatalf("unpacked the name %q", name)
			}
		}
		if total > max {
			t.Fatalf("unpacked %d bytes, limit %d", total, max)
		}
		// What unpacks packs again and unpacks to the same.
		again, err := tarGz(files)
		if err != nil {
			t.Fatal(err)
		}
		back, err := untarGz(again, max)
		if err != nil || len(back) != len(files) {
			t.Fatalf("round trip: %d files, %v; want %d", len(back), err, len(files))
		}
		for name, b := range files {
			if !bytes.Equal(back[name], b) {
				t.Fatalf("round trip changed %q", name)
			}
		}
	})
}
