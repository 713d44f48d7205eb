package bench

import (
	"math"
	"sort"
)

// Spread is the median of some values with their minimum and maximum.
type Spread struct {
	Median float64 `json:"median"`
	Min    float64 `json:"min"`
	Max    float64 `json:"max"`
}

// Summarize returns the median, minimum and maximum of xs; the median of an
// even count is the mean of the two middle values. NaN values are ignored;
// with nothing left every field is NaN.
func Summarize(xs []float64) Spread {
	vals := make([]float64, 0, len(xs))
	for _, x := range xs {
		if !math.IsNaN(x) {
			vals = append(vals, x)
		}
	}
	if len(vals) == 0 {
		return Spread{Median: math.NaN(), Min: math.NaN(), Max: math.NaN()}
	}
	sort.Float64s(vals)
	n := len(vals)
	median := vals[n/2]
	if n%2 == 0 {
		median = (vals[n/2-1] + vals[n/2]) / 2
	}
	return Spread{Median: median, Min: vals[0], Max: vals[n-1]}
}

// PairedRatios divides subject[i] by peer[i] for every round i in which both
// have a positive, non-NaN value, and summarizes those per-round ratios.
// Pairing by round compares runs that ran next to each other in time, which
// cancels most of a shared machine's drift. The count of pairs used is
// returned too; with none the Spread is all NaN.
func PairedRatios(subject, peer []float64) (Spread, int) {
	n := min(len(subject), len(peer))
	ratios := make([]float64, 0, n)
	for i := range n {
		s, p := subject[i], peer[i]
		if math.IsNaN(s) || math.IsNaN(p) || p <= 0 || s < 0 {
			continue
		}
		ratios = append(ratios, s/p)
	}
	return Summarize(ratios), len(ratios)
}
