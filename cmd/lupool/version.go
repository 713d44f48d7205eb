package main

import (
	"fmt"
	"io"
	"runtime"
	"runtime/debug"

	"github.com/spf13/cobra"
)

// buildVersion is what `lupool version` reports, from the build info the
// Go toolchain stamps into the binary (module version, VCS revision).
type buildVersion struct {
	Version   string `json:"version"`
	Commit    string `json:"commit,omitempty"`
	CommitAt  string `json:"commit_time,omitempty"`
	Modified  bool   `json:"modified,omitempty"`
	GoVersion string `json:"go_version"`
	Platform  string `json:"platform"`
}

func readBuildVersion() buildVersion {
	v := buildVersion{Version: "(unknown)", GoVersion: runtime.Version(), Platform: runtime.GOOS + "/" + runtime.GOARCH}
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return v
	}
	v.Version = info.Main.Version
	v.GoVersion = info.GoVersion
	for _, s := range info.Settings {
		switch s.Key {
		case "vcs.revision":
			v.Commit = s.Value
		case "vcs.time":
			v.CommitAt = s.Value
		case "vcs.modified":
			v.Modified = s.Value == "true"
		}
	}
	return v
}

func (v buildVersion) String() string {
	s := "lupool " + v.Version
	if v.Commit != "" {
		s += " commit " + v.Commit
		if v.Modified {
			s += " (modified)"
		}
		if v.CommitAt != "" {
			s += " of " + v.CommitAt
		}
	}
	return s + ", " + v.GoVersion + " " + v.Platform
}

func newVersionCommand(cf *clientFlags, stdout io.Writer) *cobra.Command {
	return &cobra.Command{
		Use:     "version",
		Short:   "the module version, commit and Go version of this binary",
		GroupID: "admin",
		Args:    exactArgs(0, "version takes no arguments"),
		RunE: func(*cobra.Command, []string) error {
			v := readBuildVersion()
			if cf.output == "json" {
				return printJSON(stdout, v)
			}
			_, err := fmt.Fprintln(stdout, v)
			return err
		},
	}
}
