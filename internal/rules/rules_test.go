package rules

import (
	"errors"
	"math"
	"strings"
	"testing"
)

// TestLimitRelationships asserts how the limits depend on each other.
func TestLimitRelationships(t *testing.T) {
	checks := []struct {
		what string
		ok   bool
	}{
		{"the block is a whole number of sectors", BlockBytes%SectorBytes == 0},
		{"documented: 512-byte sectors, 4 KiB blocks", SectorBytes == 512 && BlockBytes == 4096},
		{"the largest LU is a whole number of blocks", SizeBytesMax%BlockBytes == 0},
		{"seven of the largest LUs still sum within int64", SizeBytesMax <= math.MaxInt64/7},
		{"documented: names up to 128 bytes, up to 16 copies", NameLengthMax == 128 && CopiesMax == 16},
		{"a hash region is at least a block", RegionBytesMin >= BlockBytes},
		{"hash region bounds are whole blocks", RegionBytesMin%BlockBytes == 0 && RegionBytesMax%BlockBytes == 0},
		{"the default hash region is within its bounds",
			RegionBytesMin <= RegionBytesDefault && RegionBytesDefault <= RegionBytesMax && RegionBytesDefault%BlockBytes == 0},
		{"documented: hash regions 4K to 64M", RegionBytesMin == 4<<10 && RegionBytesMax == 64<<20},
		{"a dirty region is at least a block", DirtyRegionBytesMin >= BlockBytes},
		{"dirty region bounds are whole blocks", DirtyRegionBytesMin%BlockBytes == 0 && DirtyRegionBytesMax%BlockBytes == 0},
		{"the default dirty region is within its bounds",
			DirtyRegionBytesMin <= DirtyRegionBytesDefault && DirtyRegionBytesDefault <= DirtyRegionBytesMax},
		{"documented: dirty regions 4K to 4M", DirtyRegionBytesMin == 4<<10 && DirtyRegionBytesMax == 4<<20},
		{"the dirty-region max is within the hash-region max (a dirty region can be hashed as one)",
			DirtyRegionBytesMax <= RegionBytesMax},
		{"a dirty region's block mask stays a small array (at most 1024 bits)", DirtyRegionBytesMax/BlockBytes <= 1024},
		{"the largest hash region is far below the largest LU", RegionBytesMax < SizeBytesMax},
		{"a node holds at least as many LUs as issue 20's scale target (10,000 with copies on a pair of nodes)",
			LUsPerNodeMax >= 10_000},
		{"a node's LU copies, each with a volume file and a stream each way, stay within a common file limit (1 Mi)",
			3*LUsPerNodeMax < 1<<20},
	}
	for _, c := range checks {
		if !c.ok {
			t.Errorf("violated: %s", c.what)
		}
	}
	// The limits pass their own rules.
	for _, err := range []error{Size(SizeBytesMax), Size(SectorBytes), Size(BlockBytes), Copies(1), Copies(CopiesMax),
		Region(RegionBytesMin), Region(RegionBytesMax), Region(RegionBytesDefault), Region(DirtyRegionBytesMax),
		DirtyRegion(DirtyRegionBytesMin), DirtyRegion(DirtyRegionBytesMax), DirtyRegion(DirtyRegionBytesDefault),
		Name(strings.Repeat("a", NameLengthMax))} {
		if err != nil {
			t.Errorf("a limit breaks its own rule: %v", err)
		}
	}
}

func TestLUsPerNode(t *testing.T) {
	for _, c := range []struct{ configured, want int }{
		{0, LUsPerNodeMax}, {-1, LUsPerNodeMax}, {LUsPerNodeMax + 1, LUsPerNodeMax}, {1, 1}, {3, 3}, {LUsPerNodeMax, LUsPerNodeMax},
	} {
		if got := LUsPerNodeLimit(c.configured); got != c.want {
			t.Errorf("LUsPerNodeLimit(%d) = %d, want %d", c.configured, got, c.want)
		}
	}
	if err := LUsPerNode(2, 3); err != nil {
		t.Errorf("2 held, limit 3: %v", err)
	}
	for _, held := range []int{3, 4} {
		err := LUsPerNode(held, 3)
		if !errors.Is(err, ErrLUsPerNode) || !strings.Contains(err.Error(), "its limit of LUs per node is 3") || !strings.Contains(err.Error(), "add a node") {
			t.Errorf("%d held, limit 3: %v", held, err)
		}
	}
	for _, n := range []int{1, LUsPerNodeMax} {
		if err := LUsPerNodeConfig(n); err != nil {
			t.Errorf("config %d: %v", n, err)
		}
	}
	for _, n := range []int{0, -1, LUsPerNodeMax + 1} {
		if err := LUsPerNodeConfig(n); !errors.Is(err, ErrLUsPerNode) {
			t.Errorf("config %d: %v", n, err)
		}
	}
}

func TestName(t *testing.T) {
	for _, ok := range []string{"a", "A-z_0.9", "...", ".a", "a..", strings.Repeat("x", 128), "-"} {
		if err := Name(ok); err != nil {
			t.Errorf("Name(%q) = %v, want nil", ok, err)
		}
	}
	for _, bad := range []string{"", ".", "..", strings.Repeat("x", 129), "a/b", "a b", "é", "a\x00", "../x"} {
		err := Name(bad)
		if !errors.Is(err, ErrName) {
			t.Errorf("Name(%q) = %v, want ErrName", bad, err)
			continue
		}
		if got := err.Error(); got != "use 1 to 128 of A-Z a-z 0-9 . _ - (not . or ..)" {
			t.Errorf("Name(%q) says %q", bad, got)
		}
	}
}

func TestSize(t *testing.T) {
	for _, ok := range []int64{512, 4096, 1 << 40, SizeBytesMax} {
		if err := Size(ok); err != nil {
			t.Errorf("Size(%d) = %v", ok, err)
		}
	}
	for _, bad := range []int64{0, -512, 1, 511, 513, SizeBytesMax + 512, math.MaxInt64, math.MinInt64} {
		if err := Size(bad); !errors.Is(err, ErrSize) {
			t.Errorf("Size(%d) = %v, want ErrSize", bad, err)
		}
	}
	if got := Size(100).Error(); got != "must be a positive multiple of 512" {
		t.Errorf("Size(100) says %q", got)
	}
}

func TestRoundSize(t *testing.T) {
	for _, tc := range []struct {
		in, want int64
		changed  bool
	}{
		{1, 512, true}, {512, 512, false}, {513, 1024, true}, {1000, 1024, true},
		{SizeBytesMax - 1, SizeBytesMax, true}, {SizeBytesMax, SizeBytesMax, false},
	} {
		got, changed, err := RoundSize(tc.in)
		if err != nil || got != tc.want || changed != tc.changed {
			t.Errorf("RoundSize(%d) = %d, %v, %v; want %d, %v, nil", tc.in, got, changed, err, tc.want, tc.changed)
		}
		if err == nil && Size(got) != nil {
			t.Errorf("RoundSize(%d) = %d breaks Size", tc.in, got)
		}
	}
	for _, bad := range []int64{0, -1, SizeBytesMax + 1, math.MaxInt64} {
		if _, _, err := RoundSize(bad); !errors.Is(err, ErrSize) {
			t.Errorf("RoundSize(%d) = %v, want ErrSize (no overflow)", bad, err)
		}
	}
}

func TestCopies(t *testing.T) {
	for n := 1; n <= CopiesMax; n++ {
		if err := Copies(n); err != nil {
			t.Errorf("Copies(%d) = %v", n, err)
		}
	}
	for _, tc := range []struct {
		n    int
		text string
	}{{0, "must be 1 or more"}, {-1, "must be 1 or more"}, {CopiesMax + 1, "at most 16"}} {
		err := Copies(tc.n)
		if !errors.Is(err, ErrCopies) || err.Error() != tc.text {
			t.Errorf("Copies(%d) = %v, want ErrCopies saying %q", tc.n, err, tc.text)
		}
	}
}

func TestRegions(t *testing.T) {
	for _, tc := range []struct {
		bytes        int64
		region, dirt bool
	}{
		{4096, true, true}, {8192, true, true}, {1 << 20, true, true}, {4 << 20, true, true},
		{4<<20 + 4096, true, false}, {64 << 20, true, false}, {64<<20 + 4096, false, false},
		{0, false, false}, {-4096, false, false}, {512, false, false}, {6000, false, false},
	} {
		if err := Region(tc.bytes); (err == nil) != tc.region || (err != nil && !errors.Is(err, ErrRegion)) {
			t.Errorf("Region(%d) = %v, want ok=%v", tc.bytes, err, tc.region)
		}
		if err := DirtyRegion(tc.bytes); (err == nil) != tc.dirt || (err != nil && !errors.Is(err, ErrDirtyRegion)) {
			t.Errorf("DirtyRegion(%d) = %v, want ok=%v", tc.bytes, err, tc.dirt)
		}
	}
}

func TestOvercommit(t *testing.T) {
	for _, tc := range []struct {
		provisioned, grow, capacity int64
		ratio                       float64
		ok                          bool
	}{
		{0, 1000, 1000, 1, true},
		{0, 1001, 1000, 1, false},
		{500, 500, 1000, 1, true},
		{500, 501, 1000, 1, false},
		{0, 1500, 1000, 1.5, true},
		{0, 1501, 1000, 1.5, false},
		{0, 999, 1001, 0.999, true},   // the limit is floor(1001 * 0.999) = 999
		{0, 1000, 1001, 0.999, false}, // ... so 1000 does not fit
		{5000, 0, 1000, 1, true},      // no grow passes even over the limit
		{5000, -10, 1000, 1, true},    // a shrink passes
		{math.MaxInt64 - 10, math.MaxInt64 - 10, math.MaxInt64 / 2, 4, false}, // no overflow
		{0, 1, 0, 4, false},
	} {
		err := Overcommit(tc.provisioned, tc.grow, tc.capacity, tc.ratio)
		if (err == nil) != tc.ok {
			t.Errorf("Overcommit(%d, %d, %d, %g) = %v, want ok=%v", tc.provisioned, tc.grow, tc.capacity, tc.ratio, err, tc.ok)
			continue
		}
		if err == nil {
			continue
		}
		var oe *OvercommitError
		if !errors.Is(err, ErrOvercommit) || !errors.As(err, &oe) {
			t.Fatalf("Overcommit error %v is not an *OvercommitError matching ErrOvercommit", err)
		}
		if oe.ProvisionedBytes != tc.provisioned || oe.GrowBytes != tc.grow || oe.CapacityBytes != tc.capacity ||
			oe.LimitBytes != OvercommitLimit(tc.capacity, tc.ratio) {
			t.Errorf("Overcommit error fields %+v", *oe)
		}
	}
	err := Overcommit(600, 500, 1000, 1)
	want := "adding 500 bytes makes 1100 bytes provisioned on 1000 bytes of capacity (ratio 1.10, limit 1)"
	if err == nil || err.Error() != want {
		t.Errorf("Overcommit says %v, want %q", err, want)
	}
}

func TestOvercommitLimit(t *testing.T) {
	for _, tc := range []struct {
		capacity int64
		ratio    float64
		want     int64
	}{
		{1000, 1, 1000}, {1000, 1.5, 1500}, {1001, 0.999, 999}, {0, 4, 0},
		{math.MaxInt64, 4, math.MaxInt64}, {1000, 0, 0},
	} {
		if got := OvercommitLimit(tc.capacity, tc.ratio); got != tc.want {
			t.Errorf("OvercommitLimit(%d, %g) = %d, want %d", tc.capacity, tc.ratio, got, tc.want)
		}
	}
}

func TestQoS(t *testing.T) {
	for _, tc := range []struct {
		v, max int64
		ok     bool
	}{{0, QoSIOPSMax, true}, {1, QoSIOPSMax, true}, {QoSIOPSMax, QoSIOPSMax, true}, {QoSIOPSMax + 1, QoSIOPSMax, false},
		{-1, QoSIOPSMax, false}, {QoSBytesPerSecondMax, QoSBytesPerSecondMax, true}, {QoSBytesPerSecondMax + 1, QoSBytesPerSecondMax, false}} {
		err := QoSLimit(tc.v, tc.max)
		if (err == nil) != tc.ok || (err != nil && !errors.Is(err, ErrQoS)) {
			t.Errorf("QoSLimit(%d, %d) = %v", tc.v, tc.max, err)
		}
	}
	for _, tc := range []struct {
		ms int64
		ok bool
	}{{0, true}, {100, true}, {QoSBurstMillisMax, true}, {QoSBurstMillisMax + 1, false}, {-1, false}} {
		if err := QoSBurst(tc.ms); (err == nil) != tc.ok || (err != nil && !errors.Is(err, ErrQoS)) {
			t.Errorf("QoSBurst(%d) = %v", tc.ms, err)
		}
	}
	// A bucket of a minute at the highest rates still counts exactly in a
	// float64 and fits an int (x/time/rate's burst).
	if float64(QoSBytesPerSecondMax)*QoSBurstMillisMax/1000 > 1<<53 {
		t.Error("QoS bytes bucket too large for exact arithmetic")
	}
}

func TestImageNames(t *testing.T) {
	for _, c := range []struct {
		name  string
		image string
		index int
		ok    bool
	}{
		{"deb/0", "deb", 0, true},
		{"deb/63", "deb", 63, true},
		{"deb/64", "", 0, false},
		{"deb/01", "", 0, false},
		{"deb/", "", 0, false},
		{"/0", "", 0, false},
		{"a/b/0", "", 0, false},
		{"deb/x", "", 0, false},
		{"../0", "", 0, false},
		{"deb", "", 0, false},
		{strings.Repeat("a", ImageNameLengthMax) + "/63", strings.Repeat("a", ImageNameLengthMax), 63, true},
		{strings.Repeat("a", ImageNameLengthMax+1) + "/0", "", 0, false},
	} {
		image, index, ok := SplitImageLU(c.name)
		if image != c.image || index != c.index || ok != c.ok {
			t.Errorf("SplitImageLU(%q) = %q %d %v, want %q %d %v", c.name, image, index, ok, c.image, c.index, c.ok)
		}
		if err := LUName(c.name); (err == nil) != (c.ok || Name(c.name) == nil) {
			t.Errorf("LUName(%q) = %v", c.name, err)
		}
		if c.ok && ImageLUName(image, index) != c.name {
			t.Errorf("ImageLUName(%q, %d) = %q", image, index, ImageLUName(image, index))
		}
	}
	if err := LUName("a/b"); !errors.Is(err, ErrName) {
		t.Errorf("LUName(a/b) = %v, want ErrName", err)
	}
	if err := ImageName(strings.Repeat("a", ImageNameLengthMax+1)); !errors.Is(err, ErrImageName) {
		t.Errorf("a long image name: %v", err)
	}
	if len(ImageLUName(strings.Repeat("a", ImageNameLengthMax), ImageDisksMax-1)) > NameLengthMax {
		t.Error("the longest image LU name is longer than NameLengthMax")
	}
}

func TestSnapshotNames(t *testing.T) {
	for _, tc := range []struct {
		name     string
		lu, snap string
		ok       bool
	}{
		{"vm@s1", "vm", "s1", true},
		{"a.b-c_d@e.f", "a.b-c_d", "e.f", true},
		{"vm@", "", "", false},
		{"@s1", "", "", false},
		{"vm@s1@s2", "", "", false},
		{"deb/0@s1", "", "", false},
		{"vm@..", "", "", false},
		{"vm", "", "", false},
		{strings.Repeat("a", 64) + "@" + strings.Repeat("b", 64), "", "", false}, // 129 bytes
	} {
		lu, snap, ok := SplitSnapshotLU(tc.name)
		if ok != tc.ok || lu != tc.lu || snap != tc.snap {
			t.Errorf("SplitSnapshotLU(%q) = %q, %q, %v; want %q, %q, %v", tc.name, lu, snap, ok, tc.lu, tc.snap, tc.ok)
		}
		if tc.ok {
			if err := LUName(tc.name); err != nil {
				t.Errorf("LUName(%q): %v", tc.name, err)
			}
			if got := SnapshotLUName(lu, snap); got != tc.name {
				t.Errorf("SnapshotLUName(%q, %q) = %q", lu, snap, got)
			}
		} else if _, _, isImage := SplitImageLU(tc.name); !isImage && Name(tc.name) != nil && LUName(tc.name) == nil {
			t.Errorf("LUName(%q) accepted a name that is no LU, image disk or snapshot name", tc.name)
		}
	}
	if err := SnapshotName("vm", "a/b"); !errors.Is(err, ErrSnapshotName) {
		t.Errorf("SnapshotName with a slash: %v", err)
	}
	if err := SnapshotName(strings.Repeat("a", 100), strings.Repeat("b", 28)); !errors.Is(err, ErrSnapshotName) || !strings.Contains(err.Error(), "129 bytes") {
		t.Errorf("SnapshotName past 128 bytes: %v", err)
	}
	if err := SnapshotName("vm", "s1"); err != nil {
		t.Errorf("SnapshotName(vm, s1): %v", err)
	}
}
