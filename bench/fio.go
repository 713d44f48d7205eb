package bench

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
)

// Sample is what one fio run measured for one workload on one server. With
// several directions (a read/write mix, trims) the numbers cover all of them:
// IOPS and bandwidth are totals and the latency percentiles are over every
// operation (fio's unified "mixed" statistics).
type Sample struct {
	IOPS                   float64 `json:"iops"`
	BandwidthBytesPerSec   float64 `json:"bw_bytes_per_sec"`
	LatencyP50Microsecond  float64 `json:"lat_p50_us"`
	LatencyP99Microsecond  float64 `json:"lat_p99_us"`
	LatencyP999Microsecond float64 `json:"lat_p999_us"`
	// Ops counts completed operations by direction ("read", "write", "trim").
	Ops map[string]int64 `json:"ops"`
}

// ErrFioOutput is returned by ParseFio when fio's output is not a JSON
// report of exactly one (group-reported) job that finished without error.
var ErrFioOutput = errors.New("bench: unusable fio output")

// fioReport is the part of fio's --output-format=json report we read.
type fioReport struct {
	Version string   `json:"fio version"`
	Jobs    []fioJob `json:"jobs"`
}

type fioJob struct {
	Name  string  `json:"jobname"`
	Error int     `json:"error"`
	Read  *fioDir `json:"read"`
	Write *fioDir `json:"write"`
	Trim  *fioDir `json:"trim"`
	Mixed *fioDir `json:"mixed"`
}

type fioDir struct {
	IOPS          float64 `json:"iops"`
	BandwidthByte float64 `json:"bw_bytes"`
	TotalIOs      int64   `json:"total_ios"`
	CompletionLat fioLat  `json:"clat_ns"`
	TotalLat      fioLat  `json:"lat_ns"`
}

type fioLat struct {
	Percentile map[string]float64 `json:"percentile"`
}

// percentiles returns the total-latency percentiles when fio reported them
// (lat_percentiles=1), else the completion-latency ones.
func (d *fioDir) percentiles() map[string]float64 {
	if len(d.TotalLat.Percentile) > 0 {
		return d.TotalLat.Percentile
	}
	return d.CompletionLat.Percentile
}

// ParseFio reads fio's JSON report. fio's nbd engine prints "fio: connected
// to NBD server" lines before the JSON, so anything before the first '{' is
// skipped. The report must hold exactly one job (run fio with
// group_reporting). Latency percentiles come from fio's "mixed" statistics
// (unified_rw_reporting=both) when present, else from the direction with the
// most operations.
func ParseFio(data []byte) (Sample, error) {
	start := bytes.IndexByte(data, '{')
	if start < 0 {
		return Sample{}, fmt.Errorf("%w: no JSON object in %d bytes", ErrFioOutput, len(data))
	}
	var report fioReport
	if err := json.Unmarshal(data[start:], &report); err != nil {
		return Sample{}, fmt.Errorf("%w: %w", ErrFioOutput, err)
	}
	if len(report.Jobs) != 1 {
		return Sample{}, fmt.Errorf("%w: %d jobs in the report, want 1 (group_reporting)", ErrFioOutput, len(report.Jobs))
	}
	job := report.Jobs[0]
	if job.Error != 0 {
		return Sample{}, fmt.Errorf("%w: job %q failed with error %d", ErrFioOutput, job.Name, job.Error)
	}
	sample := Sample{Ops: map[string]int64{}}
	var busiest *fioDir
	for _, d := range []struct {
		name string
		dir  *fioDir
	}{{"read", job.Read}, {"write", job.Write}, {"trim", job.Trim}} {
		if d.dir == nil || d.dir.TotalIOs == 0 {
			continue
		}
		sample.Ops[d.name] = d.dir.TotalIOs
		sample.IOPS += d.dir.IOPS
		sample.BandwidthBytesPerSec += d.dir.BandwidthByte
		if busiest == nil || d.dir.TotalIOs > busiest.TotalIOs {
			busiest = d.dir
		}
	}
	if busiest == nil {
		return Sample{}, fmt.Errorf("%w: job %q completed no operations", ErrFioOutput, job.Name)
	}
	latencies := busiest.percentiles()
	if job.Mixed != nil && len(job.Mixed.percentiles()) > 0 {
		latencies = job.Mixed.percentiles()
	}
	for _, p := range []struct {
		key string
		dst *float64
	}{
		{"50.000000", &sample.LatencyP50Microsecond},
		{"99.000000", &sample.LatencyP99Microsecond},
		{"99.900000", &sample.LatencyP999Microsecond},
	} {
		ns, ok := latencies[p.key]
		if !ok {
			return Sample{}, fmt.Errorf("%w: job %q has no %s latency percentile", ErrFioOutput, job.Name, p.key)
		}
		*p.dst = ns / 1000
	}
	return sample, nil
}
