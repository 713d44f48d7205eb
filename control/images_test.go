package control

import (
	"errors"
	"testing"

	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/server/api"
)

// TestPlaceClone: a clone's copies go on nodes holding its base, the
// writer first (the requested node when it holds the base, else the
// base's writer); more copies than the base has are refused.
func TestPlaceClone(t *testing.T) {
	base := cluster.LU{Name: "img/0", Writer: "n1", Replicas: []cluster.Replica{
		{NodeID: "n1", State: cluster.ReplicaInSync}, {NodeID: "n3", State: cluster.ReplicaInSync}}}
	for _, c := range []struct {
		writer     string
		copies     int
		wantWriter string
		want       []string
	}{
		{"n1", 1, "n1", []string{"n1"}},
		{"n3", 1, "n3", []string{"n3"}},
		{"n2", 1, "n1", []string{"n1"}},
		{"n3", 2, "n3", []string{"n3", "n1"}},
		{"n2", 2, "n1", []string{"n1", "n3"}},
	} {
		w, reps, err := placeClone(base, c.writer, c.copies)
		if err != nil {
			t.Fatalf("writer %s copies %d: %v", c.writer, c.copies, err)
		}
		var got []string
		for _, r := range reps {
			got = append(got, r.NodeID)
			if r.State != cluster.ReplicaInSync {
				t.Errorf("copy on %s starts %s", r.NodeID, r.State)
			}
		}
		if w != c.wantWriter || len(got) != len(c.want) || got[0] != c.want[0] || got[len(got)-1] != c.want[len(c.want)-1] {
			t.Errorf("writer %s copies %d: writer %s copies %v, want %s %v", c.writer, c.copies, w, got, c.wantWriter, c.want)
		}
	}
	if _, _, err := placeClone(base, "n1", 3); !errors.Is(err, api.ErrInvalid) {
		t.Fatalf("3 copies of a clone of a 2-copy image: %v", err)
	}
}
