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
//	{"v":1,"type":"lu.create","at":"2026-11-22T03:00:00Z","by":"n1","primary":true,"lu":{...}}
//	{"v":1,"type":"lu.resize","at":"...","by":"n1","primary":true,"name":"vm1","size_bytes":1073741824}
//	{"v":1,"type":"lu.delete","at":"...","by":"n1","primary":true,"name":"vm1"}
//	{"v":1,"type":"lu.qos","at":"...","by":"n1","primary":true,"name":"vm1","qos":{"write_iops":2000}}
//	{"v":1,"type":"lu.copies","at":"...","by":"n2","change":{"name":"vm1","expected_epoch":4,
//	    "epoch":5,"writer":"n2","copies":2,"replicas":[{"node_id":"n2","state":"in-sync"},...]}}
//	{"v":1,"type":"move","at":"...","by":"n2","move":{"lu":"vm1","op":"switch","role":"source","step":"drained"}}
//	{"v":1,"type":"node.upsert","at":"...","by":"n2","node":{...}}
//	{"v":1,"type":"node.upsert","at":"...","by":"n1","primary":true,"join":true,"node":{...}}
//	{"v":1,"type":"node.remove","at":"...","by":"n1","primary":true,"name":"node-id"}
//	{"v":1,"type":"setting.set","at":"...","by":"n1","primary":true,"name":"key","value":"val"}
//	{"v":1,"type":"event.append","at":"...","by":"n2","event":{"kind":"PoolThreshold","node":"n2","details":{...}}}
//	{"v":1,"type":"event.prune","at":"...","by":"n1","primary":true,"below_seq":1200}
//	{"v":1,"type":"sub.add","at":"...","by":"n1","primary":true,"sub":{"id":"ops","kinds":["LUDeleted"],"to":"tcp://h:9000"}}
//	{"v":1,"type":"sub.remove","at":"...","by":"n1","primary":true,"name":"ops"}
//	{"v":1,"type":"sub.ack","at":"...","by":"n1","primary":true,"name":"ops","ack_seq":1234}
//	{"v":1,"type":"ffdc.put","at":"...","by":"n2","ffdc":{"id":"...","node":"n2","bytes":300000,"chunks":2,...},"data":"BASE64"}
//	{"v":1,"type":"ffdc.put","at":"...","by":"n2","ffdc":{"id":"..."},"chunk_index":1,"data":"BASE64"}
//	{"v":1,"type":"image.create","at":"...","by":"n1","primary":true,"image":{"name":"deb","copies":1,
//	    "disks":[{"lu":"deb/0","size_bytes":1073741824,"source":"deb.raw"}]},"lus":[{"name":"deb/0","image":"deb",...}]}
//	{"v":1,"type":"image.ready","at":"...","by":"n1","primary":true,"image":{"name":"deb",
//	    "disks":[{"lu":"deb/0","size_bytes":1073741824,"sha256":"...","sent_bytes":104857600}]}}
//	{"v":1,"type":"image.delete","at":"...","by":"n1","primary":true,"name":"deb"}
//	{"v":1,"type":"lu.flatten","at":"...","by":"n1","primary":true,"name":"vm1"}
//
// "by" and "primary" are the proposer (Proposer): the authenticated node id
// of the requester and whether the primary proposes the command as the
// pool's control plane. The leader sets them; they never come from a
// request body. lu.copies is checked by CheckCopyChange; node.upsert is
// applied only for the proposer's own record, or as a join (primary) of an
// id without a record; node.remove needs the primary.
//
// Retired: {"v":1,"type":"lu.update","lu":{...},"if_epoch":N} replaced an
// LU's writer, epoch and copies wholesale. It still decodes (old entries
// sit in logs and were applied when they were new), but Apply rejects it
// and nothing proposes it; lu.copies replaces it.
const commandVersion = 1

// Command types. Part of the on-disk format.
const (
	cmdCreateLU   = "lu.create"
	cmdResizeLU   = "lu.resize"
	cmdDeleteLU   = "lu.delete"
	cmdSetQoS     = "lu.qos"
	cmdUpdateLU   = "lu.update" // retired: decoded, always rejected
	cmdCopies     = "lu.copies"
	cmdMove       = "move" // a planned writer move (move.go), checked by NextMove
	cmdUpsertNode = "node.upsert"
	cmdRemoveNode = "node.remove"
	cmdSetSetting = "setting.set"
	// The event log (events.go).
	cmdAppendEvent = "event.append"
	cmdPruneEvents = "event.prune"
	// Registered callers (subscribers.go).
	cmdAddSubscriber    = "sub.add"
	cmdRemoveSubscriber = "sub.remove"
	cmdAckSubscriber    = "sub.ack"
	// The FFDC repository (ffdc.go).
	cmdFFDCPut = "ffdc.put"
	// Images and linked clones (images.go).
	cmdCreateImage = "image.create"
	cmdImageReady  = "image.ready"
	cmdDeleteImage = "image.delete"
	cmdFlattenLU   = "lu.flatten"

	cmdECCreate = "image.ec.create" // ec.go
	cmdECReady  = "image.ec.ready"
	cmdECAbort  = "image.ec.abort"
	// ec_move.go
	cmdECShardAdd  = "image.ec.shard.add"
	cmdECShardSwap = "image.ec.shard.swap"
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
	// IfEpoch belonged to the retired lu.update; kept so old entries decode.
	IfEpoch uint64 `json:"if_epoch,omitempty"`
	// By is the node id of the authenticated proposer; Primary says the
	// primary (metadata leader) proposes it as the control plane. Set by the
	// leader, never from a request body (see Proposer).
	By      string `json:"by,omitempty"`
	Primary bool   `json:"primary,omitempty"`
	// QoS is the body of lu.qos: the LU's new limits, all of them.
	QoS *QoS `json:"qos,omitempty"`
	// Change is the body of lu.copies.
	Change *CopyChange `json:"change,omitempty"`
	// LUsPerNodeMax is the limit of LU copies per node the proposer
	// applies to an lu.create or lu.copies that places copies on nodes
	// (rules.LUsPerNodeLimit: 0, as in entries from before it existed,
	// means rules.LUsPerNodeMax). Carried in the entry, so that every
	// node reaches the same verdict.
	LUsPerNodeMax int `json:"lus_per_node_max,omitempty"`
	// Move is the body of move.
	Move *MoveOp `json:"move,omitempty"`
	// Join marks a node.upsert that adds a new member's record (proposed by
	// the primary); it is applied only if no record with that id exists.
	Join bool `json:"join,omitempty"`
	// Event is the body of event.append (kind, lu, node, details).
	Event *Event `json:"event,omitempty"`
	// BelowSeq is the body of event.prune: events below it are deleted.
	BelowSeq uint64 `json:"below_seq,omitempty"`
	// Sub is the body of sub.add; AckSeq of sub.ack (with Name the id).
	Sub    *Subscriber `json:"sub,omitempty"`
	AckSeq uint64      `json:"ack_seq,omitempty"`
	// FFDC, ChunkIndex and Data are the body of ffdc.put (the first
	// chunk carries the whole description, later ones only the id).
	FFDC       *FFDCInfo `json:"ffdc,omitempty"`
	ChunkIndex int       `json:"chunk_index,omitempty"`
	Data       []byte    `json:"data,omitempty"`
	// Image and LUs are the body of image.create (the record and its
	// disks' LU records); Image alone (name, state, disks with hashes) of
	// image.ready.
	Image *Image `json:"image,omitempty"`
	LUs   []LU   `json:"lus,omitempty"`
	// EC is the body of image.ec.create (with LUs, its shard LUs).
	EC *ECLayout `json:"ec,omitempty"`
	// ECMove is the body of image.ec.shard.add (with LU) and .swap.
	ECMove *ECShardMove `json:"ec_move,omitempty"`
}

func (c *command) proposer() Proposer { return Proposer{NodeID: c.By, Primary: c.Primary} }

// nodeRecord is what the state machine stores per node; raft's
// configuration holds membership, this holds the addresses clients need.
type nodeRecord struct {
	ID       string `json:"id"`
	PeerAddr string `json:"peer_addr"`
	APIAddr  string `json:"api_addr,omitempty"`
	NBDAddr  string `json:"nbd_addr,omitempty"`
	// CertSHA256 is the fingerprint (pki.Fingerprint) of the certificate
	// the node registered with: peers accept that certificate only, so
	// another certificate naming the same id (a losing concurrent join)
	// is not the member. Set at join; never changed by an upsert.
	CertSHA256 string    `json:"cert_sha256,omitempty"`
	UpdatedAt  time.Time `json:"updated_at"`
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
	case cmdSetQoS:
		if c.QoS == nil {
			return nil, fmt.Errorf("%w: %s without limits", ErrInvalid, c.Type)
		}
	case cmdCopies:
		if c.Change == nil {
			return nil, fmt.Errorf("%w: %s without a change", ErrInvalid, c.Type)
		}
	case cmdMove:
		if c.Move == nil {
			return nil, fmt.Errorf("%w: %s without an operation", ErrInvalid, c.Type)
		}
	case cmdUpsertNode:
		if c.Node == nil || c.Node.ID == "" {
			return nil, fmt.Errorf("%w: %s without a node id", ErrInvalid, c.Type)
		}
	case cmdAppendEvent:
		if c.Event == nil {
			return nil, fmt.Errorf("%w: %s without an event", ErrInvalid, c.Type)
		}
	case cmdFFDCPut:
		if c.FFDC == nil {
			return nil, fmt.Errorf("%w: %s without a bundle", ErrInvalid, c.Type)
		}
	case cmdAddSubscriber:
		if c.Sub == nil {
			return nil, fmt.Errorf("%w: %s without a subscriber", ErrInvalid, c.Type)
		}
	case cmdSnapshotLU:
		if c.LU == nil {
			return nil, fmt.Errorf("%w: %s without the snapshot's record", ErrInvalid, c.Type)
		}
	case cmdCreateImage, cmdImageReady:
		if c.Image == nil {
			return nil, fmt.Errorf("%w: %s without an image", ErrInvalid, c.Type)
		}
	case cmdECCreate:
		if c.EC == nil {
			return nil, fmt.Errorf("%w: %s without a layout", ErrInvalid, c.Type)
		}
	case cmdECShardAdd, cmdECShardSwap:
		if c.ECMove == nil {
			return nil, fmt.Errorf("%w: %s without a shard", ErrInvalid, c.Type)
		}
	case cmdECReady, cmdECAbort, cmdDeleteImage, cmdFlattenLU, cmdResizeLU, cmdDeleteLU, cmdRemoveNode, cmdSetSetting, cmdPruneEvents, cmdRemoveSubscriber, cmdAckSubscriber:
	default:
		return nil, fmt.Errorf("%w: type %q", ErrUnknownCommand, c.Type)
	}
	return &c, nil
}
