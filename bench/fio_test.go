package bench

import (
	"errors"
	"math"
	"os"
	"path/filepath"
	"testing"
)

func near(a, b float64) bool {
	return math.Abs(a-b) <= 1e-9*math.Max(1, math.Abs(b))
}

// The testdata files are real fio-3.33 reports from this machine, against
// nbdkit memory: fio-randread-qd1 (plain report, completion latencies),
// fio-randrw70-qd4 (unified "mixed" statistics, total latencies),
// fio-paging-qd4 (the paging profile: read, write and trim) and
// fio-stdout-prefix (captured from stdout, so it starts with the nbd
// engine's "fio: connected to NBD server" line, and has no "mixed").
func TestParseFio(t *testing.T) {
	for _, tc := range []struct {
		file                string
		iops, bw            float64
		p50, p99, p999      float64 // microseconds
		reads, writes, trim int64
	}{
		{"fio-randread-qd1.json", 29427.145709, 120533588, 17.536, 50.944, 1744.896, 14743, 0, 0},
		// Latencies from "mixed" (all directions), not from read or write.
		{"fio-randrw70-qd4.json", 28874.251497 + 12329.341317, 118268934 + 50500982, 50.944, 1384.448, 4882.432, 14466, 6177, 0},
		{"fio-paging-qd4.json", 10373.253493 + 15692.61477 + 199.600798, 42488846 + 64276950 + 13081037,
			93.696, 1155.072, 4112.384, 5197, 7862, 100},
		// No "mixed": latencies of the busiest direction (write).
		{"fio-stdout-prefix.json", 22344.551816 + 51679.106964, 91523284 + 211677622, 77.312, 419.840, 4145.152, 67056, 155089, 0},
	} {
		t.Run(tc.file, func(t *testing.T) {
			data, err := os.ReadFile(filepath.Join("testdata", tc.file))
			if err != nil {
				t.Fatal(err)
			}
			s, err := ParseFio(data)
			if err != nil {
				t.Fatalf("ParseFio: %v", err)
			}
			for _, c := range []struct {
				name      string
				got, want float64
			}{
				{"iops", s.IOPS, tc.iops}, {"bw", s.BandwidthBytesPerSec, tc.bw},
				{"p50", s.LatencyP50Microsecond, tc.p50}, {"p99", s.LatencyP99Microsecond, tc.p99},
				{"p99.9", s.LatencyP999Microsecond, tc.p999},
			} {
				if !near(c.got, c.want) {
					t.Errorf("%s = %v, want %v", c.name, c.got, c.want)
				}
			}
			if s.Ops["read"] != tc.reads || s.Ops["write"] != tc.writes || s.Ops["trim"] != tc.trim {
				t.Errorf("ops = %v, want read %d write %d trim %d", s.Ops, tc.reads, tc.writes, tc.trim)
			}
		})
	}
}

func TestParseFioRejects(t *testing.T) {
	dir := func(ios int) string {
		return `{"iops": 10, "bw_bytes": 40960, "total_ios": ` + string(rune('0'+ios)) +
			`, "lat_ns": {"percentile": {"50.000000": 1000, "99.000000": 2000}}}`
	}
	for name, in := range map[string]string{
		"empty":       "",
		"not json":    "fio: connected to NBD server\nno report here",
		"broken json": `{"jobs": [`,
		"no jobs":     `{"jobs": []}`,
		"two jobs":    `{"jobs": [{"jobname": "a", "read": ` + dir(1) + `}, {"jobname": "b", "read": ` + dir(1) + `}]}`,
		"job error":   `{"jobs": [{"jobname": "a", "error": 5, "read": ` + dir(1) + `}]}`,
		"no ops":      `{"jobs": [{"jobname": "a", "read": ` + dir(0) + `}]}`,
		// p99.9 is missing from dir's percentiles.
		"no p99.9": `{"jobs": [{"jobname": "a", "read": ` + dir(1) + `}]}`,
	} {
		if _, err := ParseFio([]byte(in)); !errors.Is(err, ErrFioOutput) {
			t.Errorf("%s: err = %v, want ErrFioOutput", name, err)
		}
	}
}
