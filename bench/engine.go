package bench

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/lupool/lupool/blockdev"
	"github.com/lupool/lupool/lu"
	"github.com/lupool/lupool/server/nbd"
)

// EngineCommand is the first argument that makes nbdbench (or this
// package's test binary) serve one LU with lupool's NBD engine instead of
// benchmarking: the runner starts the engine servers by re-executing its
// own binary, so that each server runs in its own process like the peers.
const EngineCommand = "nbdbench-engine"

// EngineOptions configure ServeEngine.
type EngineOptions struct {
	// Listen is the TCP address to serve on.
	Listen string
	// Kind is "memory" (lu.NewMemVolume) or "file" (lu.CreateFile at Path).
	Kind string
	// Path is the sparse file of a file volume; it must not exist.
	Path string
	// SizeBytes is the volume size.
	SizeBytes int64
	// Logger receives the engine's logs.
	Logger *slog.Logger
}

// The engine runs a memory volume's small requests inline.
var _ nbd.InlineDevice = (*lu.MemVolume)(nil)

// ServeEngine serves one LU named "bench" with server/nbd until ctx ends,
// then shuts the server down and closes the volume. It is lupool's data
// path without the daemon: no cluster metadata, no API, no replication.
func ServeEngine(ctx context.Context, o EngineOptions) (err error) {
	var vol interface {
		blockdev.Device
		Close() error
	}
	switch o.Kind {
	case "memory":
		vol = lu.NewMemVolume(o.SizeBytes)
	case "file":
		if vol, err = lu.CreateFile(o.Path, o.SizeBytes); err != nil {
			return err
		}
	default:
		return fmt.Errorf("bench: engine kind %q: want memory or file", o.Kind)
	}
	defer func() { err = errors.Join(err, vol.Close()) }()
	exports := nbd.NewExportSet()
	if err := exports.Add(nbd.Export{Name: "bench", Device: vol}); err != nil {
		return err
	}
	srv, err := nbd.NewServer(nbd.Options{Exports: exports, Logger: o.Logger})
	if err != nil {
		return err
	}
	l, err := net.Listen("tcp", o.Listen)
	if err != nil {
		return err
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	select {
	case err := <-served:
		return err
	case <-ctx.Done():
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), stopGrace)
	defer cancel()
	err = srv.Shutdown(shutdownCtx)
	if serveErr := <-served; !errors.Is(serveErr, nbd.ErrServerClosed) {
		err = errors.Join(err, serveErr)
	}
	return err
}

// startEngine starts `BIN nbdbench-engine` serving a volume of kind.
func startEngine(kind string) func(ctx context.Context, env Env) (*Running, error) {
	return func(ctx context.Context, env Env) (*Running, error) {
		if env.EngineBin == "" {
			return nil, fmt.Errorf("%w: no engine binary configured", ErrServerUnavailable)
		}
		port, err := freePort()
		if err != nil {
			return nil, err
		}
		p, err := launch(ctx, env, "engine", env.EngineBin, EngineCommand, "--listen", fmt.Sprintf("127.0.0.1:%d", port),
			"--kind", kind, "--size", fmt.Sprint(env.DeviceBytes), "--path", filepath.Join(env.Dir, "engine.raw"))
		if err != nil {
			return nil, err
		}
		return waitNBD(ctx, p, port, "bench")
	}
}

// EngineMain is the EngineCommand: it parses args (the arguments after
// EngineCommand) and serves until SIGTERM or SIGINT.
func EngineMain(args []string, logger *slog.Logger) error {
	fs := flag.NewFlagSet(EngineCommand, flag.ContinueOnError)
	var o EngineOptions
	fs.StringVar(&o.Listen, "listen", "127.0.0.1:10809", "TCP address to serve on")
	fs.StringVar(&o.Kind, "kind", "memory", "memory or file")
	fs.StringVar(&o.Path, "path", "", "sparse file of a file volume (must not exist)")
	fs.Int64Var(&o.SizeBytes, "size", 1<<30, "volume size in bytes")
	if err := fs.Parse(args); err != nil {
		return err
	}
	o.Logger = logger
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	return ServeEngine(ctx, o)
}

// defaultEngineBin is the running binary, which must handle EngineCommand.
func defaultEngineBin() string {
	self, err := os.Executable()
	if err != nil {
		return ""
	}
	return self
}
