package api

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"io"
	"math/big"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

func selfSigned(t *testing.T) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "t"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// TestSniffTLS: one port serves HTTPS to everyone and plain HTTP only to
// clients plainOK accepts; the others get a 400 naming https.
func TestSniffTLS(t *testing.T) {
	for _, plain := range []bool{true, false} {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		conf := &tls.Config{Certificates: []tls.Certificate{selfSigned(t)}, MinVersion: tls.VersionTLS13}
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, "hello") })}
		go func() { _ = srv.Serve(SniffTLS(ln, conf, func(net.Addr) bool { return plain })) }()
		addr := ln.Addr().String()

		tc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
		resp, err := tc.Get("https://" + addr + "/")
		if err != nil {
			t.Fatalf("https (plain allowed %v): %v", plain, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(body) != "hello" {
			t.Fatalf("https answered %q", body)
		}

		resp, err = http.Get("http://" + addr + "/")
		if err != nil {
			t.Fatalf("http (plain allowed %v): %v", plain, err)
		}
		body, _ = io.ReadAll(resp.Body)
		resp.Body.Close()
		if plain && (resp.StatusCode != 200 || string(body) != "hello") {
			t.Fatalf("plain from an allowed client: %d %q", resp.StatusCode, body)
		}
		if !plain && (resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(body), "https://")) {
			t.Fatalf("plain from a refused client: %d %q, want 400 naming https://", resp.StatusCode, body)
		}
		// A client that connects and sends nothing holds up no one.
		idle, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		if resp, err := tc.Get("https://" + addr + "/"); err != nil {
			t.Fatalf("https with an idle client connected: %v", err)
		} else {
			resp.Body.Close()
		}
		idle.Close()
		srv.Close()
	}
}
