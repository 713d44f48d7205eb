package main

import (
	"context"
	"log/slog"
	"strings"
	"time"

	"github.com/lupool/lupool/paging"
)

// Swap-safety modes of lupool serve (--swap-safe).
const (
	swapSafeAuto = "auto" // once this node holds paging space
	swapSafeOn   = "on"   // at start
	swapSafeOff  = "off"
)

// makeSwapSafe locks the process's memory and makes it an I/O flusher,
// logging what it did and warning about what it could not do. Under the
// race detector it only says why not: locking its terabytes of shadow
// memory would take the machine's RAM.
func makeSwapSafe(log *slog.Logger, why string) {
	if raceBuild {
		log.Warn("swap safety skipped: this is a race-detector build (its shadow memory cannot be locked)", "why", why)
		return
	}
	s := paging.MakeSwapSafe()
	log.Info("swap safety", "why", why, "memory_locked", s.Locked, "io_flusher", s.IOFlusher, "io_flusher_threads", s.IOFlusherThreads)
	for _, w := range s.Warnings {
		log.Warn("swap safety incomplete: "+w, "why", why)
	}
}

// watchForPaging makes the daemon swap-safe the first time names (this
// node's volumes) include paging space, checking every interval until ctx
// ends.
func watchForPaging(ctx context.Context, log *slog.Logger, names func() []string, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		for _, n := range names() {
			if strings.HasPrefix(n, paging.NamePrefix) {
				makeSwapSafe(log, "this node holds paging space ("+n+")")
				return
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
