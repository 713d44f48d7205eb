package units

import (
	"errors"
	"testing"
)

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{
		"0": 0, "512": 512, "64K": 65536, "64k": 65536, "10G": 10 << 30, "1T": 1 << 40,
		"8GiB": 8 << 30, "8 GB": 8 << 30, "1.5G": 3 << 29, "1P": 1 << 50, "100B": 100, "0.5K": 512,
	} {
		got, err := ParseSize(in)
		if err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "G", "10X", "-1G", "1..2G", "abc", "9999999E", "1e3G", "10 G B"} {
		if _, err := ParseSize(in); !errors.Is(err, ErrSize) {
			t.Errorf("ParseSize(%q) err = %v, want ErrSize", in, err)
		}
	}
}

func TestFormat(t *testing.T) {
	for n, want := range map[int64]string{100: "100B", 4096: "4.0K", 10 << 30: "10.0G", 3 << 29: "1.5G", 1 << 40: "1.0T"} {
		if got := Format(n); got != want {
			t.Errorf("Format(%d) = %q, want %q", n, got, want)
		}
	}
}
