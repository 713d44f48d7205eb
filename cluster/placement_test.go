package cluster

import (
	"errors"
	"reflect"
	"testing"
)

func TestPickNodes(t *testing.T) {
	nodes := []NodeInfo{
		{ID: "a", APIAddr: "x", NBDAddr: "y", Suffrage: suffrageVoter},
		{ID: "b", APIAddr: "x", NBDAddr: "y", Suffrage: suffrageVoter},
		{ID: "c", APIAddr: "x", NBDAddr: "y", Suffrage: suffrageNonvoter},
		{ID: "d", APIAddr: "", NBDAddr: "y", Suffrage: suffrageVoter},     // no API address: unusable
		{ID: "e", APIAddr: "x", NBDAddr: "y", Suffrage: suffrageUnlisted}, // left the cluster
		{ID: "f", APIAddr: "x", Suffrage: suffrageVoter},                  // a witness: no NBD address
	}
	lus := []LU{
		{Replicas: []Replica{{NodeID: "a"}, {NodeID: "b"}}},
		{Replicas: []Replica{{NodeID: "a"}}},
	}
	got, err := PickNodes(nodes, lus, nil, 3)
	if err != nil || !reflect.DeepEqual(got, []string{"c", "b", "a"}) {
		t.Fatalf("PickNodes 3 = %v %v, want the least loaded first: c, b, a", got, err)
	}
	got, err = PickNodes(nodes, lus, map[string]bool{"c": true}, 1)
	if err != nil || !reflect.DeepEqual(got, []string{"b"}) {
		t.Fatalf("PickNodes excluding c = %v %v, want b", got, err)
	}
	if _, err := PickNodes(nodes, lus, map[string]bool{"a": true}, 3); !errors.Is(err, ErrNoPlacement) {
		t.Fatalf("too few nodes: %v, want ErrNoPlacement", err)
	}
}
