package cluster

import (
	"errors"
	"testing"
)

// TestNodeRecordCertBinding: a node record keeps the certificate it was
// joined with; no upsert rebinds it, not even the node's own.
func TestNodeRecordCertBinding(t *testing.T) {
	old := nodeRecord{ID: "n2", PeerAddr: "p:1", CertSHA256: "sha256:aa"}
	for _, tc := range []struct {
		name string
		rec  nodeRecord
		by   Proposer
		want error
	}{
		{"own addresses, same certificate", nodeRecord{ID: "n2", PeerAddr: "p:1", APIAddr: "a:2", CertSHA256: "sha256:aa"}, Proposer{NodeID: "n2"}, nil},
		{"own record, other certificate", nodeRecord{ID: "n2", PeerAddr: "p:1", CertSHA256: "sha256:bb"}, Proposer{NodeID: "n2"}, ErrForeignRecord},
		{"own record, certificate dropped", nodeRecord{ID: "n2", PeerAddr: "p:1"}, Proposer{NodeID: "n2"}, ErrForeignRecord},
		{"primary rebinding", nodeRecord{ID: "n2", PeerAddr: "p:1", CertSHA256: "sha256:bb"}, Proposer{NodeID: "n1", Primary: true}, ErrForeignRecord},
	} {
		err := checkNodeUpsertOf(tc.rec, false, tc.by, true, old)
		if !errors.Is(err, tc.want) || (tc.want == nil) != (err == nil) {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.want)
		}
	}
	// A record without a binding (written before bindings existed) may
	// gain one from its own node.
	if err := checkNodeUpsertOf(nodeRecord{ID: "n2", PeerAddr: "p:1", CertSHA256: "sha256:aa"}, false, Proposer{NodeID: "n2"}, true, nodeRecord{ID: "n2"}); err != nil {
		t.Errorf("binding a legacy record: %v", err)
	}
}
