// Package logring keeps the most recent log lines of a process in memory,
// for failure data capture: a slog.Handler that formats every record it
// passes on as one text line into a bounded ring, which Lines copies out.
//
// The ring holds at most LinesMax lines and BytesMax bytes (the oldest go
// first); a line longer than LineBytesMax is cut. Handle never blocks on
// I/O: it formats into memory under a mutex.
package logring

import (
	"bytes"
	"context"
	"log/slog"
	"sync"
)

// Ring limits (defaults of New).
const (
	LinesMax     = 5000
	BytesMax     = 2 << 20
	LineBytesMax = 4096
)

// Ring is the bounded store of recent lines. Safe for concurrent use.
type Ring struct {
	mu    sync.Mutex
	lines [][]byte // guarded by mu; a circular buffer of len LinesMax
	next  int      // guarded by mu; where the next line goes
	count int      // guarded by mu; lines held
	bytes int      // guarded by mu; bytes held
}

// New returns an empty ring.
func New() *Ring { return &Ring{lines: make([][]byte, LinesMax)} }

// add stores one line (without its newline).
func (r *Ring) add(line []byte) {
	if len(line) > LineBytesMax {
		line = append(line[:LineBytesMax:LineBytesMax], "…"...)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for r.count > 0 && (r.count == len(r.lines) || r.bytes+len(line) > BytesMax) {
		oldest := (r.next - r.count + len(r.lines)) % len(r.lines)
		r.bytes -= len(r.lines[oldest])
		r.lines[oldest] = nil
		r.count--
	}
	r.lines[r.next] = line
	r.next = (r.next + 1) % len(r.lines)
	r.count++
	r.bytes += len(line)
}

// Lines returns the lines held, oldest first, each ending in a newline.
func (r *Ring) Lines() []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]byte, 0, r.bytes+r.count)
	for i := range r.count {
		out = append(out, r.lines[(r.next-r.count+i+len(r.lines))%len(r.lines)]...)
		out = append(out, '\n')
	}
	return out
}

// Handler returns a slog.Handler that passes every record to next and
// keeps a text copy of it in r (whatever next's level, records of level
// level and above).
func (r *Ring) Handler(next slog.Handler, level slog.Leveler) slog.Handler {
	return &handler{ring: r, next: next, level: level, text: newText(r, level)}
}

type handler struct {
	ring  *Ring
	next  slog.Handler
	level slog.Leveler
	text  slog.Handler // formats into the ring
}

func newText(r *Ring, level slog.Leveler) slog.Handler {
	return slog.NewTextHandler(lineWriter{r}, &slog.HandlerOptions{Level: level})
}

// lineWriter receives one formatted record per Write from slog's text
// handler.
type lineWriter struct{ r *Ring }

func (w lineWriter) Write(p []byte) (int, error) {
	w.r.add(bytes.Clone(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

func (h *handler) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= h.level.Level() || h.next.Enabled(ctx, l)
}

func (h *handler) Handle(ctx context.Context, rec slog.Record) error {
	if rec.Level >= h.level.Level() {
		_ = h.text.Handle(ctx, rec)
	}
	if h.next.Enabled(ctx, rec.Level) {
		return h.next.Handle(ctx, rec)
	}
	return nil
}

func (h *handler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return &handler{ring: h.ring, next: h.next.WithAttrs(attrs), level: h.level, text: h.text.WithAttrs(attrs)}
}

func (h *handler) WithGroup(name string) slog.Handler {
	return &handler{ring: h.ring, next: h.next.WithGroup(name), level: h.level, text: h.text.WithGroup(name)}
}
