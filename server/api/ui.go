package api

import (
	"embed"
	"io/fs"
	"net/http"
)

// The status page (/ui/): static files embedded in the binary, no build
// step. The files hold no data: the page asks for the admin token (or
// takes it from the URL fragment, #token=..., which never reaches a
// server) and calls GET /v1/status, /v1/lus and /v1/events with it, like
// the CLI, so the pool's state stays behind the API's credentials.
//
//go:embed ui
var uiFiles embed.FS

// uiRoot is where the status page lives.
const uiRoot = "/ui/"

func uiHandler() http.Handler {
	sub, err := fs.Sub(uiFiles, "ui")
	if err != nil {
		// The embedded tree always has ui/: a build without it is broken.
		panic(err)
	}
	files := http.StripPrefix(uiRoot, http.FileServerFS(sub))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Security-Policy", "default-src 'self'; style-src 'self'; script-src 'self'; connect-src 'self'")
		w.Header().Set("X-Frame-Options", "DENY")
		w.Header().Set("Cache-Control", "no-cache")
		files.ServeHTTP(w, r)
	})
}
