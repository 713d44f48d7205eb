package bench

import (
	"encoding/json"
	"math"
	"testing"
)

func TestSummarize(t *testing.T) {
	for _, tc := range []struct {
		in   []float64
		want Spread
	}{
		{[]float64{3, 1, 2}, Spread{Median: 2, Min: 1, Max: 3}},
		{[]float64{4, 1, 3, 2}, Spread{Median: 2.5, Min: 1, Max: 4}},
		{[]float64{7}, Spread{Median: 7, Min: 7, Max: 7}},
		{[]float64{5, math.NaN(), 1, 9}, Spread{Median: 5, Min: 1, Max: 9}},
	} {
		if got := Summarize(tc.in); got != tc.want {
			t.Errorf("Summarize(%v) = %+v, want %+v", tc.in, got, tc.want)
		}
	}
	for _, in := range [][]float64{nil, {math.NaN()}} {
		got := Summarize(in)
		if !math.IsNaN(got.Median) || !math.IsNaN(got.Min) || !math.IsNaN(got.Max) {
			t.Errorf("Summarize(%v) = %+v, want all NaN", in, got)
		}
	}
}

func TestSummarizeDoesNotReorderInput(t *testing.T) {
	in := []float64{3, 1, 2}
	Summarize(in)
	if in[0] != 3 || in[1] != 1 || in[2] != 2 {
		t.Errorf("input reordered to %v", in)
	}
}

func TestPairedRatios(t *testing.T) {
	got, pairs := PairedRatios([]float64{110, 90, 100}, []float64{100, 100, 80})
	if want := (Spread{Median: 1.1, Min: 0.9, Max: 1.25}); pairs != 3 || !near(got.Median, want.Median) ||
		!near(got.Min, want.Min) || !near(got.Max, want.Max) {
		t.Errorf("PairedRatios = %+v over %d pairs, want %+v over 3", got, pairs, want)
	}
	// Rounds pair by index: a failed round (NaN) or a zero peer drops only
	// that round, and an extra round on one side is ignored.
	got, pairs = PairedRatios([]float64{200, math.NaN(), 300, 50, 999}, []float64{100, 100, 0, 100})
	if pairs != 2 || got != (Spread{Median: 1.25, Min: 0.5, Max: 2}) {
		t.Errorf("PairedRatios with gaps = %+v over %d pairs, want median 1.25 (0.5–2) over 2", got, pairs)
	}
	got, pairs = PairedRatios(nil, []float64{1})
	if pairs != 0 || !math.IsNaN(got.Median) {
		t.Errorf("PairedRatios with no pairs = %+v over %d, want NaN over 0", got, pairs)
	}
}

func TestSpreadJSONRoundTrip(t *testing.T) {
	data, err := json.Marshal([]Spread{{Median: 1.5, Min: 1, Max: 2}, Summarize(nil)})
	if err != nil {
		t.Fatal(err)
	}
	if want := `[{"max":2,"median":1.5,"min":1},{"max":null,"median":null,"min":null}]`; string(data) != want {
		t.Fatalf("json = %s, want %s", data, want)
	}
	var back []Spread
	if err := json.Unmarshal(data, &back); err != nil {
		t.Fatal(err)
	}
	if back[0] != (Spread{Median: 1.5, Min: 1, Max: 2}) || !math.IsNaN(back[1].Median) || !math.IsNaN(back[1].Max) {
		t.Errorf("round trip = %+v", back)
	}
}
