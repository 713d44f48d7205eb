// Package rules holds lupool's control-plane rules, each written once: the
// LU name rule, the sector and block sizes, the LU size rule, the copy
// count, the QoS limits, the region sizes of verify/hash and of dirty-region tracking, and
// the overcommit check. It is a pure leaf: no I/O, no state, and it imports
// no lupool package, so lu, cluster, replication, control and cmd can all
// use it.
//
// Every check returns nil or an error that says what to fix ("use 1 to 128
// of ...") and matches one of this package's sentinels with errors.Is. The
// text never names the checked value or field: the caller knows how its
// user spelled it ("size_bytes 100", "--dirty-region 1000") and adds it,
// wrapping the caller's own sentinel too:
//
//	if err := rules.Size(n); err != nil {
//		return fmt.Errorf("%w: size %d bytes: %w", ErrInvalid, n, err)
//	}
//
// The relationships between the limits are asserted in rules_test.go.
package rules

import (
	"errors"
	"fmt"
	"math"
)

// Units of storage.
const (
	// SectorBytes is the unit of LU sizes: every LU size is a multiple of
	// it (the NBD minimum block size, the kernel's logical sector).
	SectorBytes = 512
	// BlockBytes is the allocation unit of every volume (what Trim frees,
	// what a memory volume allocates, what a dirty-region mask tracks) and
	// the alignment of hashed and dirty regions.
	BlockBytes = 4096
)

// Limits on LU records.
const (
	// NameLengthMax is the longest LU name, in bytes.
	NameLengthMax = 128
	// SizeBytesMax is the largest LU size: 1 EiB, far beyond any disk, so
	// that offsets plus lengths and sums of up to seven sizes stay within
	// int64.
	SizeBytesMax = 1 << 60
	// CopiesMax bounds the copy count of one LU.
	CopiesMax = 16
	// LUsPerNodeMax bounds the LU copies one node holds (a writer's copy
	// counts as one, as does every other copy). Each copy costs a node
	// open files (its volume, and, with copies elsewhere, its replication
	// streams), memory and goroutines; past this many, a node would fail
	// later on file descriptors or memory instead of refusing the create.
	// The scale target of issue 20 is 10,000 LUs on a pair of nodes.
	LUsPerNodeMax = 10_000
)

// QoS limits.
const (
	// QoSIOPSMax bounds an IOPS limit: far above any device, low enough
	// that a token bucket's arithmetic stays exact.
	QoSIOPSMax = 100_000_000
	// QoSBytesPerSecondMax bounds a bytes-per-second limit: 1 TiB/s.
	QoSBytesPerSecondMax = 1 << 40
	// QoSBurstMillisMax bounds a burst: a minute of the rate.
	QoSBurstMillisMax = 60_000
)

// Region sizes.
const (
	// RegionBytesMin, RegionBytesMax and RegionBytesDefault bound the
	// region of a region-hash compare (verify, hash resync): one region is
	// read into one buffer, so the maximum bounds that buffer.
	RegionBytesMin     = BlockBytes
	RegionBytesMax     = 64 << 20
	RegionBytesDefault = 1 << 20
	// DirtyRegionBytesMin, DirtyRegionBytesMax and DirtyRegionBytesDefault
	// bound the region a writer records for a copy that falls behind.
	// Inside a region, BlockBytes blocks are tracked in a fixed mask, so
	// the maximum bounds that mask (1024 bits).
	DirtyRegionBytesMin     = BlockBytes
	DirtyRegionBytesMax     = 4 << 20
	DirtyRegionBytesDefault = 1 << 20
	// ActivityLogRegionsDefault is how many dirty regions a writer keeps
	// in an LU's activity log (its recently written regions, recorded on
	// disk before a write to them is issued): the most a restart after a
	// crash compares by hash, 1 GiB at the default region size.
	ActivityLogRegionsDefault = 1024
)

// Sentinel errors; every error of this package matches exactly one.
var (
	// ErrName is returned by Name for a name that breaks the LU name rule.
	ErrName = errors.New("rules: invalid LU name")
	// ErrSize is returned by Size and RoundSize for a size that breaks the
	// LU size rule.
	ErrSize = errors.New("rules: invalid LU size")
	// ErrCopies is returned by Copies for a copy count out of range.
	ErrCopies = errors.New("rules: invalid copy count")
	// ErrRegion is returned by Region for a bad hash-compare region size.
	ErrRegion = errors.New("rules: invalid region size")
	// ErrDirtyRegion is returned by DirtyRegion for a bad dirty-region
	// size.
	ErrDirtyRegion = errors.New("rules: invalid dirty-region size")
	// ErrQoS is returned by QoSLimit and QoSBurst for a value out of
	// range.
	ErrQoS = errors.New("rules: invalid QoS limit")
	// ErrLUsPerNode is returned by LUsPerNode when a node already holds
	// its limit of LU copies.
	ErrLUsPerNode = errors.New("rules: LUs per node limit reached")
	// ErrOvercommit is matched by the *OvercommitError Overcommit returns.
	ErrOvercommit = errors.New("rules: overcommit limit reached")
)

// ruleError is a rule's advice, matching its sentinel without repeating
// the sentinel's text.
type ruleError struct {
	rule   error  // one of the sentinels
	advice string // what to fix
}

func (e *ruleError) Error() string { return e.advice }
func (e *ruleError) Unwrap() error { return e.rule }

// Name checks the LU name rule: 1 to NameLengthMax bytes of A-Z a-z 0-9 .
// _ - and not "." or ".." (a name is a file name in a pool directory and a
// path segment of the API).
func Name(name string) error {
	bad := len(name) == 0 || len(name) > NameLengthMax || name == "." || name == ".."
	for i := 0; i < len(name) && !bad; i++ {
		c := name[i]
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' ||
			c == '.' || c == '_' || c == '-'
		bad = !ok
	}
	if bad {
		return &ruleError{ErrName, "use 1 to 128 of A-Z a-z 0-9 . _ - (not . or ..)"}
	}
	return nil
}

// Size checks the LU size rule: a positive multiple of SectorBytes, at
// most SizeBytesMax.
func Size(sizeBytes int64) error {
	switch {
	case sizeBytes <= 0 || sizeBytes%SectorBytes != 0:
		return &ruleError{ErrSize, "must be a positive multiple of 512"}
	case sizeBytes > SizeBytesMax:
		return &ruleError{ErrSize, "must be at most 1 EiB (1152921504606846976 bytes)"}
	}
	return nil
}

// RoundSize rounds a size someone typed up to the next multiple of
// SectorBytes, reporting whether it changed; the result passes Size. It
// fails with ErrSize for a size that is not positive or would round past
// SizeBytesMax.
func RoundSize(sizeBytes int64) (rounded int64, changed bool, err error) {
	switch {
	case sizeBytes <= 0:
		return 0, false, &ruleError{ErrSize, "must be larger than zero"}
	case sizeBytes > SizeBytesMax:
		return 0, false, &ruleError{ErrSize, "must be at most 1 EiB (1152921504606846976 bytes)"}
	}
	rounded = (sizeBytes + SectorBytes - 1) / SectorBytes * SectorBytes
	return rounded, rounded != sizeBytes, nil
}

// Copies checks a copy count: 1 to CopiesMax.
func Copies(copies int) error {
	switch {
	case copies < 1:
		return &ruleError{ErrCopies, "must be 1 or more"}
	case copies > CopiesMax:
		return &ruleError{ErrCopies, fmt.Sprintf("at most %d", CopiesMax)}
	}
	return nil
}

// LUsPerNodeLimit returns the limit of LU copies per node in effect for a
// configured limit: configured when it is from 1 to LUsPerNodeMax,
// otherwise (0: not configured; or out of range) LUsPerNodeMax.
func LUsPerNodeLimit(configured int) int {
	if configured < 1 || configured > LUsPerNodeMax {
		return LUsPerNodeMax
	}
	return configured
}

// LUsPerNode checks the LUs-per-node rule: a node that holds held LU
// copies may take one more only while held is below limit (see
// LUsPerNodeLimit).
func LUsPerNode(held, limit int) error {
	if held >= limit {
		return &ruleError{ErrLUsPerNode, fmt.Sprintf("the node holds %d LU copies, its limit of LUs per node is %d; delete LUs, place the copies on other nodes or add a node", held, limit)}
	}
	return nil
}

// LUsPerNodeConfig checks a configured LUs-per-node limit: 1 to
// LUsPerNodeMax.
func LUsPerNodeConfig(limit int) error {
	if limit < 1 || limit > LUsPerNodeMax {
		return &ruleError{ErrLUsPerNode, fmt.Sprintf("use 1 to %d", LUsPerNodeMax)}
	}
	return nil
}

// QoSLimit checks one QoS rate: 0 (no limit) up to limitMax
// (QoSIOPSMax or QoSBytesPerSecondMax).
func QoSLimit(perSecond, limitMax int64) error {
	if perSecond < 0 || perSecond > limitMax {
		return &ruleError{ErrQoS, fmt.Sprintf("use 0 (no limit) to %d per second", limitMax)}
	}
	return nil
}

// QoSBurst checks a QoS burst in milliseconds: 0 (the default) up to
// QoSBurstMillisMax.
func QoSBurst(burstMillis int64) error {
	if burstMillis < 0 || burstMillis > QoSBurstMillisMax {
		return &ruleError{ErrQoS, "use 0 (the default) to 60000 ms"}
	}
	return nil
}

// Region checks the region size of a region-hash compare: a multiple of
// BlockBytes from RegionBytesMin to RegionBytesMax.
func Region(regionBytes int64) error {
	if regionBytes < RegionBytesMin || regionBytes > RegionBytesMax || regionBytes%BlockBytes != 0 {
		return &ruleError{ErrRegion, "use a multiple of 4K from 4K to 64M"}
	}
	return nil
}

// DirtyRegion checks the dirty-region size: a multiple of BlockBytes from
// DirtyRegionBytesMin to DirtyRegionBytesMax.
func DirtyRegion(regionBytes int64) error {
	if regionBytes < DirtyRegionBytesMin || regionBytes > DirtyRegionBytesMax || regionBytes%BlockBytes != 0 {
		return &ruleError{ErrDirtyRegion, "use a multiple of 4K from 4K to 4M"}
	}
	return nil
}

// OvercommitError is a refused grow of a pool's provisioned bytes, with
// the numbers for the caller's message. It matches ErrOvercommit.
type OvercommitError struct {
	ProvisionedBytes int64   // provisioned before the grow
	GrowBytes        int64   // the refused grow, > 0
	CapacityBytes    int64   // the pool's capacity
	Ratio            float64 // the overcommit ratio
	LimitBytes       int64   // floor(CapacityBytes * Ratio)
}

// AfterBytes is what the pool would have been provisioned to.
func (e *OvercommitError) AfterBytes() int64 { return e.ProvisionedBytes + e.GrowBytes }

func (e *OvercommitError) Error() string {
	return fmt.Sprintf("adding %d bytes makes %d bytes provisioned on %d bytes of capacity (ratio %.2f, limit %g)",
		e.GrowBytes, e.AfterBytes(), e.CapacityBytes,
		float64(e.AfterBytes())/float64(max(e.CapacityBytes, 1)), e.Ratio)
}

// Unwrap makes an OvercommitError match ErrOvercommit.
func (e *OvercommitError) Unwrap() error { return ErrOvercommit }

// OvercommitLimit is the most a pool of capacityBytes may be provisioned
// to at ratio: floor(capacityBytes * ratio), at most math.MaxInt64.
func OvercommitLimit(capacityBytes int64, ratio float64) int64 {
	limit := math.Floor(float64(capacityBytes) * ratio)
	if limit >= math.MaxInt64 {
		return math.MaxInt64
	}
	return max(int64(limit), 0)
}

// Overcommit checks the overcommit rule: growing a pool provisioned to
// provisionedBytes by growBytes must leave it at or below
// OvercommitLimit(capacityBytes, ratio). A grow of 0 or less (a shrink)
// always passes, even in a pool already over its limit. A refusal is an
// *OvercommitError.
func Overcommit(provisionedBytes, growBytes, capacityBytes int64, ratio float64) error {
	if growBytes <= 0 {
		return nil
	}
	limit := OvercommitLimit(capacityBytes, ratio)
	// Written as a difference: provisionedBytes+growBytes may overflow.
	if growBytes > limit-provisionedBytes {
		return &OvercommitError{ProvisionedBytes: provisionedBytes, GrowBytes: growBytes,
			CapacityBytes: capacityBytes, Ratio: ratio, LimitBytes: limit}
	}
	return nil
}

// Images.
const (
	// ImageDisksMax bounds the disks (sources) of one image: its LUs are
	// named IMAGE/0 to IMAGE/63.
	ImageDisksMax = 64
	// ImageNameLengthMax is the longest image name: IMAGE/63 must still
	// be an LU name of at most NameLengthMax bytes.
	ImageNameLengthMax = NameLengthMax - 3
)

// ErrImageName is returned by ImageName and LUName for a name that breaks
// the image name rule or the image LU name rule.
var ErrImageName = errors.New("rules: invalid image name")

// ImageName checks the image name rule: the LU name rule, at most
// ImageNameLengthMax bytes (room for "/63").
func ImageName(name string) error {
	if err := Name(name); err != nil {
		return err
	}
	if len(name) > ImageNameLengthMax {
		return &ruleError{ErrImageName, fmt.Sprintf("use at most %d bytes (an image's LUs are named IMAGE/N)", ImageNameLengthMax)}
	}
	return nil
}

// ImageLUName returns the name of disk index of image: "IMAGE/N".
func ImageLUName(image string, index int) string { return fmt.Sprintf("%s/%d", image, index) }

// SplitImageLU splits an image LU's name "IMAGE/N" into the image and
// the disk index; ok is false for any other name (a plain LU's has no
// "/"). N is decimal without leading zeros, below ImageDisksMax.
func SplitImageLU(name string) (image string, index int, ok bool) {
	slash := -1
	for i := 0; i < len(name); i++ {
		if name[i] == '/' {
			if slash >= 0 {
				return "", 0, false
			}
			slash = i
		}
	}
	if slash < 0 || ImageName(name[:slash]) != nil {
		return "", 0, false
	}
	digits := name[slash+1:]
	if len(digits) == 0 || len(digits) > 2 || len(digits) > 1 && digits[0] == '0' {
		return "", 0, false
	}
	n := 0
	for i := 0; i < len(digits); i++ {
		c := digits[i]
		if c < '0' || c > '9' {
			return "", 0, false
		}
		n = n*10 + int(c-'0')
	}
	if n >= ImageDisksMax {
		return "", 0, false
	}
	return name[:slash], n, true
}

// LUName checks the name of any LU: a plain LU name (Name), or an image
// LU's "IMAGE/N" (an image name, a slash, a disk index below
// ImageDisksMax without leading zeros), or a snapshot's "LU@SNAP"
// (SplitSnapshotLU). A slash or an @ anywhere else is refused.
func LUName(name string) error {
	if _, _, ok := SplitImageLU(name); ok {
		return nil
	}
	if _, _, ok := SplitSnapshotLU(name); ok {
		return nil
	}
	if err := Name(name); err != nil {
		return &ruleError{ErrName, "use 1 to 128 of A-Z a-z 0-9 . _ - (not . or ..), IMAGE/N for an image's disk, or LU@SNAP for a snapshot"}
	}
	return nil
}

// Snapshots.
const (
	// SnapshotSeparator joins an LU's name and a snapshot's name in the
	// snapshot's own LU name and NBD export, LU@SNAP. No plain LU name or
	// image name holds it.
	SnapshotSeparator = "@"
	// SnapshotsMax bounds the snapshots one LU keeps: every snapshot is a
	// layer of the LU's overlay chain (lu.MaxChainDepth, 16), and a linked
	// clone's image disk is one more.
	SnapshotsMax = 14
)

// ErrSnapshotName is returned by SnapshotName for a name that breaks the
// snapshot name rule.
var ErrSnapshotName = errors.New("rules: invalid snapshot name")

// SnapshotName checks the name of snapshot snap of LU lu: snap follows
// the LU name rule, and LU@SNAP is at most NameLengthMax bytes (it is an LU
// name and an export name itself).
func SnapshotName(lu, snap string) error {
	if err := Name(snap); err != nil {
		return &ruleError{ErrSnapshotName, "use 1 to 128 of A-Z a-z 0-9 . _ - (not . or ..) for a snapshot name"}
	}
	if n := len(lu) + len(SnapshotSeparator) + len(snap); n > NameLengthMax {
		return &ruleError{ErrSnapshotName, fmt.Sprintf("LU@SNAP is %d bytes; keep it at most %d (use a shorter snapshot name)", n, NameLengthMax)}
	}
	return nil
}

// SnapshotLUName returns the LU name of snapshot snap of LU lu: "LU@SNAP".
func SnapshotLUName(lu, snap string) string { return lu + SnapshotSeparator + snap }

// SplitSnapshotLU splits a snapshot's LU name "LU@SNAP" into the LU and
// the snapshot; ok is false for any other name. LU is a plain LU name
// (snapshots of image disks do not exist: they are read-only already).
func SplitSnapshotLU(name string) (lu, snap string, ok bool) {
	at := -1
	for i := 0; i < len(name); i++ {
		if name[i] == SnapshotSeparator[0] {
			if at >= 0 {
				return "", "", false
			}
			at = i
		}
	}
	if at < 0 || len(name) > NameLengthMax || Name(name[:at]) != nil || Name(name[at+1:]) != nil {
		return "", "", false
	}
	return name[:at], name[at+1:], true
}
