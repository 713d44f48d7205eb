package main

import (
	"net"
	"strings"
	"testing"
)

// FuzzParseNBDURI: a source URI either parses into a network, an address
// and an export that say what the URI said, or is refused; never both a
// host and a socket, never an empty address.
func FuzzParseNBDURI(f *testing.F) {
	for _, s := range []string{
		"nbd://host/export", "nbd://host:10810/a/b", "nbd://[::1]:1/x", "nbd+unix:///e?socket=/tmp/s",
		"nbd+unix:///e", "nbd:///x", "nbds://h/x", "nbd://h", "nbd://h/%2F", "nbd+unix://?socket=s",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		network, addr, export, err := parseNBDURI(s)
		if err != nil {
			if network != "" || addr != "" || export != "" {
				t.Fatalf("%q refused (%v) but returned %q %q %q", s, err, network, addr, export)
			}
			return
		}
		switch network {
		case "tcp":
			host, port, err := net.SplitHostPort(addr)
			if err != nil || port == "" || !strings.HasPrefix(strings.ToLower(s), "nbd://") {
				t.Fatalf("%q: tcp address %q (%v)", s, addr, err)
			}
			_ = host
		case "unix":
			if addr == "" || !strings.HasPrefix(strings.ToLower(s), "nbd+unix://") {
				t.Fatalf("%q: unix socket %q", s, addr)
			}
		default:
			t.Fatalf("%q: network %q", s, network)
		}
		if strings.HasPrefix(export, "/") && !strings.Contains(s, "//") {
			t.Fatalf("%q: export %q", s, export)
		}
	})
}

// TestSniffFormat: qcow2 and vmdk files are told from raw ones by their
// first bytes; anything else is raw.
func TestSniffFormat(t *testing.T) {
	for head, want := range map[string]string{
		"QFI\xfb\x00\x00\x00\x03": formatQcow2,
		"KDMV\x01\x00\x00\x00":    formatVMDK,
		"# Disk DescriptorFile\n": formatVMDK,
		"":                        formatRaw,
		"QFI":                     formatRaw,
		"\x00\x00\x00\x00":        formatRaw,
		"\xebc\x90GRUB":           formatRaw,
	} {
		if got := sniffFormat([]byte(head)); got != want {
			t.Errorf("sniffFormat(%q) = %s, want %s", head, got, want)
		}
	}
}
