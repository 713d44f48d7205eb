package main

import (
	"os"
	"testing"
	"time"
)

// TestMain lets the test binary play the echo server that run starts
// (run re-executes its own binary with -echo).
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == "-echo" {
		serveEcho()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func TestRunTimesRoundTrips(t *testing.T) {
	d, err := run(50)
	if err != nil {
		t.Fatal(err)
	}
	if d <= 0 || d > time.Second {
		t.Fatalf("median loopback round trip %v: want between 0 and 1 s", d)
	}
}

func TestRunRefusesNoRoundTrips(t *testing.T) {
	if _, err := run(0); err == nil {
		t.Fatal("run(0): want an error")
	}
}
