package cluster

import (
	"encoding/json"
	"fmt"
	"time"
)

// Commands are the payload of raft log entries: JSON objects with a version
// and a type. The encoding is part of the on-disk format (log entries
// outlive binaries): fields may be added, never renamed or reused. A node
// that meets a version or type it does not know refuses the entry
// (ErrUnknownCommand) instead of guessing.
//
//	{"v":1,"type":"lu.create","at":"2026-11-22T03:00:00Z","lu":{...}}
//	{"v":1,"type":"lu.resize","at":"...","name":"vm1","size_bytes":1073741824}
//	{"v":1,"type":"lu.delete","at":"...","name":"vm1"}
//	{"v":1,"type":"lu.update","at":"...","lu":{...}}
//	{"v":1,"type":"node.upsert","at":"...","node":{...}}
//	{"v":1,"type":"node.remove","at":"...","name":"node-id"}
//	{"v":1,"type":"setting.set","at":"...","name":"key","value":"val"}
const commandVersion = 1

// Command types. Part of the on-disk format.
const (
	cmdCreateLU   = "lu.create"
	cmdResizeLU   = "lu.resize"
	cmdDeleteLU   = "lu.delete"
	cmdUpdateLU   = "lu.update"
	cmdUpsertNode = "node.upsert"
	cmdRemoveNode = "node.remove"
	cmdSetSetting = "setting.set"
)

type command struct {
	Version int    `json:"v"`
	Type    string `json:"type"`
	// At is the proposer's clock; Apply uses it for timestamps so that
	// every node computes the same state.
	At        time.Time   `json:"at"`
	LU        *LU         `json:"lu,omitempty"`
	Name      string      `json:"name,omitempty"`
	SizeBytes int64       `json:"size_bytes,omitempty"`
	Node      *nodeRecord `json:"node,omitempty"`
	Value     string      `json:"value,omitempty"`
	// IfEpoch, when non-zero on lu.update, makes the update conditional:
	// it applies only if the recorded epoch equals IfEpoch.
	IfEpoch uint64 `json:"if_epoch,omitempty"`
}

// nodeRecord is what the state machine stores per node; raft's
// configuration holds membership, this holds the addresses clients need.
type nodeRecord struct {
	ID        string    `json:"id"`
	PeerAddr  string    `json:"peer_addr"`
	APIAddr   string    `json:"api_addr,omitempty"`
	NBDAddr   string    `json:"nbd_addr,omitempty"`
	UpdatedAt time.Time `json:"updated_at"`
}

func encodeCommand(c *command) ([]byte, error) {
	c.Version = commandVersion
	b, err := json.Marshal(c)
	if err != nil {
		return nil, fmt.Errorf("cluster: encode %s: %w", c.Type, err)
	}
	return b, nil
}

// decodeCommand parses and checks the envelope; the body is checked by the
// state machine. Errors wrap ErrUnknownCommand or ErrInvalid.
func decodeCommand(data []byte) (*command, error) {
	var c command
	if err := json.Unmarshal(data, &c); err != nil {
		return nil, fmt.Errorf("%w: undecodable command: %v", ErrInvalid, err)
	}
	if c.Version != commandVersion {
		return nil, fmt.Errorf("%w: version %d (this binary knows %d)", ErrUnknownCommand, c.Version, commandVersion)
	}
	switch c.Type {
	case cmdCreateLU, cmdUpdateLU:
		if c.LU == nil {
			return nil, fmt.Errorf("%w: %s without an LU", ErrInvalid, c.Type)
		}
	case cmdUpsertNode:
		if c.Node == nil || c.Node.ID == "" {
			return nil, fmt.Errorf("%w: %s without a node id", ErrInvalid, c.Type)
		}
	case cmdResizeLU, cmdDeleteLU, cmdRemoveNode, cmdSetSetting:
	default:
		return nil, fmt.Errorf("%w: type %q", ErrUnknownCommand, c.Type)
	}
	return &c, nil
}
