// Package units parses and prints byte sizes the way people type them:
// "512", "64K", "10G", "1.5T", "8GiB". Units are binary (K = 1024), as
// block devices count; "KB"/"KiB" spellings are accepted as the same.
package units

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
)

// ErrSize is returned by ParseSize for anything that is not a size.
var ErrSize = errors.New("units: bad size")

var multipliers = map[string]float64{
	"": 1, "B": 1,
	"K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10,
	"M": 1 << 20, "MB": 1 << 20, "MIB": 1 << 20,
	"G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30,
	"T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40,
	"P": 1 << 50, "PB": 1 << 50, "PIB": 1 << 50,
}

// ParseSize parses s into bytes. Fractions are allowed with a unit
// ("1.5G"); the result is rounded up to a whole byte.
func ParseSize(s string) (int64, error) {
	t := strings.ToUpper(strings.TrimSpace(s))
	i := strings.IndexFunc(t, func(r rune) bool { return (r < '0' || r > '9') && r != '.' })
	if i < 0 {
		i = len(t)
	}
	num, unit := t[:i], strings.TrimSpace(t[i:])
	mult, ok := multipliers[unit]
	if num == "" || !ok {
		return 0, fmt.Errorf("%w %q: write a number with an optional unit, like 512, 64K, 10G or 1T", ErrSize, s)
	}
	v, err := strconv.ParseFloat(num, 64)
	if err != nil || v < 0 || math.IsInf(v, 0) || math.IsNaN(v) {
		return 0, fmt.Errorf("%w %q: %q is not a non-negative number", ErrSize, s, num)
	}
	bytes := math.Ceil(v * mult)
	if bytes >= math.MaxInt64 {
		return 0, fmt.Errorf("%w %q: larger than 8 EiB", ErrSize, s)
	}
	return int64(bytes), nil
}

// Format prints n bytes with the largest binary unit that keeps a short
// number: 4096 -> "4.0K", 10737418240 -> "10.0G", 100 -> "100B".
func Format(n int64) string {
	if n < 0 {
		return "-" + Format(-n)
	}
	const units = "KMGTPE"
	if n < 1024 {
		return strconv.FormatInt(n, 10) + "B"
	}
	v := float64(n)
	i := -1
	for v >= 1024 && i < len(units)-1 {
		v /= 1024
		i++
	}
	return strconv.FormatFloat(v, 'f', 1, 64) + string(units[i])
}
