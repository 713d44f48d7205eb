package cluster

import (
	"fmt"
	"strings"
)

// Settings returns every pool setting whose name starts with prefix, from
// the local applied state (a follower may lag the leader slightly).
func (n *Node) Settings(prefix string) (map[string]string, error) {
	out := map[string]string{}
	err := n.readDB(func() error {
		return scan(n.db, settingPrefix+prefix, func(k, v []byte) error {
			out[strings.TrimPrefix(string(k), settingPrefix)] = string(v)
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("cluster: settings %q: %w", prefix, err)
	}
	return out, nil
}
