package control

import (
	"testing"

	"github.com/lupool/lupool/server/api"
)

// TestQoS: limits given at create are recorded and shown; SetQoS replaces
// them, a zero QoS lifts them; out-of-range limits and unknown LUs are
// refused in the API's words and change nothing.
func TestQoS(t *testing.T) {
	n := newNode(t)
	ctx := ctxT(t)
	_, err := n.plane.CreateLU(ctx, api.CreateLURequest{Name: "bad", SizeBytes: 1 << 20, QoS: &api.QoS{WriteIOPS: -5}})
	wantErr(t, "create with a negative limit", err, api.ErrInvalid, "QoS write_iops -5: use 0 (no limit) to 100000000 per second")
	if _, err := n.meta.GetLU("bad"); err == nil {
		t.Fatal("a refused create was recorded")
	}
	got, err := n.plane.CreateLU(ctx, api.CreateLURequest{Name: "vm1", SizeBytes: 1 << 20, QoS: &api.QoS{ReadIOPS: 100, WriteBytesPerSecond: 1 << 20}})
	if err != nil || got.QoS == nil || *got.QoS != (api.QoS{ReadIOPS: 100, WriteBytesPerSecond: 1 << 20}) {
		t.Fatalf("create with limits: %+v %v", got.QoS, err)
	}
	got, err = n.plane.SetQoS(ctx, "vm1", api.QoS{WriteIOPS: 7, BurstMillis: 500})
	if err != nil || got.QoS == nil || *got.QoS != (api.QoS{WriteIOPS: 7, BurstMillis: 500}) {
		t.Fatalf("set: %+v %v", got.QoS, err)
	}
	_, err = n.plane.SetQoS(ctx, "vm1", api.QoS{BurstMillis: 70000})
	wantErr(t, "burst too long", err, api.ErrInvalid, "QoS burst_ms 70000: use 0 (the default) to 60000 ms")
	if rec, _ := n.meta.GetLU("vm1"); rec.QoS == nil || rec.QoS.WriteIOPS != 7 {
		t.Fatalf("a refused change was recorded: %+v", rec.QoS)
	}
	_, err = n.plane.SetQoS(ctx, "nosuch", api.QoS{ReadIOPS: 1})
	wantErr(t, "unknown LU", err, api.ErrNotFound, `no LU named "nosuch"`)
	if got, err := n.plane.SetQoS(ctx, "vm1", api.QoS{}); err != nil || got.QoS != nil {
		t.Fatalf("lift: %+v %v", got.QoS, err)
	}
	if got, err := n.plane.CreateLU(ctx, api.CreateLURequest{Name: "zero", SizeBytes: 1 << 20, QoS: &api.QoS{}}); err != nil || got.QoS != nil {
		t.Fatalf("create with zero limits: %+v %v", got.QoS, err)
	}
}
