package cluster

import (
	"context"
	"io"
	"log"
	"log/slog"
	"strings"

	"github.com/hashicorp/go-hclog"
)

// hclogAdapter sends hashicorp/raft's hclog output to a *slog.Logger.
// Raft's Info lines (elections, snapshots) are logged at slog Debug, except
// warnings and errors, which keep their level: a healthy cluster is quiet.
type hclogAdapter struct {
	log   *slog.Logger  // immutable; never nil
	name  string        // immutable
	args  []interface{} // immutable; implied args from With
	level hclog.Level   // immutable after construction
}

var _ hclog.Logger = (*hclogAdapter)(nil)

func newHclog(l *slog.Logger) *hclogAdapter {
	return &hclogAdapter{log: l, name: "raft", level: hclog.Debug}
}

func (a *hclogAdapter) slogLevel(level hclog.Level) slog.Level {
	switch level {
	case hclog.Warn:
		return slog.LevelWarn
	case hclog.Error:
		return slog.LevelError
	default:
		return slog.LevelDebug
	}
}

func (a *hclogAdapter) Log(level hclog.Level, msg string, args ...interface{}) {
	if level < a.level && level != hclog.NoLevel {
		return
	}
	l := a.slogLevel(level)
	ctx := context.Background()
	if !a.log.Enabled(ctx, l) {
		return
	}
	all := make([]any, 0, len(a.args)+len(args)+2)
	all = append(all, "component", a.name)
	all = append(all, a.args...)
	all = append(all, args...)
	a.log.Log(ctx, l, msg, all...)
}

func (a *hclogAdapter) Trace(msg string, args ...interface{}) { a.Log(hclog.Trace, msg, args...) }
func (a *hclogAdapter) Debug(msg string, args ...interface{}) { a.Log(hclog.Debug, msg, args...) }
func (a *hclogAdapter) Info(msg string, args ...interface{})  { a.Log(hclog.Info, msg, args...) }
func (a *hclogAdapter) Warn(msg string, args ...interface{})  { a.Log(hclog.Warn, msg, args...) }
func (a *hclogAdapter) Error(msg string, args ...interface{}) { a.Log(hclog.Error, msg, args...) }
func (a *hclogAdapter) IsTrace() bool                         { return false }
func (a *hclogAdapter) IsDebug() bool {
	return a.log.Enabled(context.Background(), slog.LevelDebug)
}
func (a *hclogAdapter) IsInfo() bool               { return a.IsDebug() }
func (a *hclogAdapter) IsWarn() bool               { return true }
func (a *hclogAdapter) IsError() bool              { return true }
func (a *hclogAdapter) ImpliedArgs() []interface{} { return a.args }

func (a *hclogAdapter) With(args ...interface{}) hclog.Logger {
	c := *a
	c.args = append(append([]interface{}(nil), a.args...), args...)
	return &c
}

func (a *hclogAdapter) Name() string { return a.name }

func (a *hclogAdapter) Named(name string) hclog.Logger {
	c := *a
	c.name = a.name + "." + name
	return &c
}

func (a *hclogAdapter) ResetNamed(name string) hclog.Logger {
	c := *a
	c.name = name
	return &c
}

// SetLevel is ignored: the slog handler decides what is kept.
func (a *hclogAdapter) SetLevel(hclog.Level) {}

func (a *hclogAdapter) GetLevel() hclog.Level { return a.level }

func (a *hclogAdapter) StandardLogger(opts *hclog.StandardLoggerOptions) *log.Logger {
	return log.New(a.StandardWriter(opts), "", 0)
}

func (a *hclogAdapter) StandardWriter(*hclog.StandardLoggerOptions) io.Writer {
	return stdWriter{a}
}

// stdWriter turns lines of the standard logger into hclog calls, reading
// the "[WARN]"-style level prefix raft's transport uses.
type stdWriter struct{ a *hclogAdapter }

func (w stdWriter) Write(p []byte) (int, error) {
	line := strings.TrimSpace(string(p))
	level := hclog.Info
	for prefix, l := range map[string]hclog.Level{"[ERR": hclog.Error, "[WARN": hclog.Warn, "[DEBUG": hclog.Debug} {
		if strings.Contains(line, prefix) {
			level = l
		}
	}
	w.a.Log(level, line)
	return len(p), nil
}
