package control

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/lupool/lupool/cluster"
	"github.com/lupool/lupool/server/api"
)

// clusterQoS is q as the LU record stores it.
func clusterQoS(q api.QoS) cluster.QoS {
	return cluster.QoS{ReadIOPS: q.ReadIOPS, WriteIOPS: q.WriteIOPS, ReadBytesPerSecond: q.ReadBytesPerSecond,
		WriteBytesPerSecond: q.WriteBytesPerSecond, BurstMillis: q.BurstMillis}
}

// apiQoS is a record's limits as the API shows them; nil for none.
func apiQoS(q *cluster.QoS) *api.QoS {
	if q == nil || q.Zero() {
		return nil
	}
	return &api.QoS{ReadIOPS: q.ReadIOPS, WriteIOPS: q.WriteIOPS, ReadBytesPerSecond: q.ReadBytesPerSecond,
		WriteBytesPerSecond: q.WriteBytesPerSecond, BurstMillis: q.BurstMillis}
}

// checkQoS applies the QoS rules (internal/rules, through the record's
// check) to an API request: ErrInvalid naming the field.
func checkQoS(q api.QoS) error {
	if err := cluster.ValidateQoS(clusterQoS(q)); err != nil {
		msg := err.Error()
		if i := strings.Index(msg, "QoS "); i >= 0 {
			msg = msg[i:]
		}
		return fmt.Errorf("%w: %s", api.ErrInvalid, msg)
	}
	return nil
}

// SetQoS replaces an LU's QoS limits; a zero QoS lifts them. Every node
// that serves the LU applies the new limits once it has the change.
func (p *Plane) SetQoS(ctx context.Context, name string, q api.QoS) (api.LU, error) {
	if err := checkQoS(q); err != nil {
		return api.LU{}, err
	}
	if err := p.opts.Metadata.SetQoS(ctx, name, clusterQoS(q)); err != nil {
		if errors.Is(err, cluster.ErrNotFound) {
			return api.LU{}, notFound(name)
		}
		return api.LU{}, p.APIError(err)
	}
	return p.afterChange(ctx, name)
}
