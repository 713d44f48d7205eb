package nbd_test

import (
	"context"
	"log"
	"net"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/blockdev/blockdevtest"
	"github.com/lupool/lupool/server/nbd"
)

// Example shows how a daemon wires the engine: exports that change at run
// time, metrics on its own registry, Serve, then Shutdown.
func Example() {
	exports := nbd.NewExportSet()
	if err := exports.Add(nbd.Export{Name: "swap0", Description: "paging space",
		Device: blockdevtest.NewMem(64<<20, blockdev.Caps{MultiConn: true})}); err != nil {
		log.Fatal(err)
	}
	metrics := nbd.NewMetrics()
	reg := prometheus.NewRegistry()
	for _, c := range metrics.Collectors() {
		reg.MustRegister(c)
	}
	srv, err := nbd.NewServer(nbd.Options{Exports: exports, Metrics: metrics})
	if err != nil {
		log.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	go func() { _ = srv.Serve(l) }() // returns nbd.ErrServerClosed after Shutdown

	// Forced delete of an LU: stop new attaches, then end current ones.
	exports.Remove("swap0")
	srv.DisconnectExport("swap0")

	if err := srv.Shutdown(context.Background()); err != nil {
		log.Fatal(err)
	}
}
