package cluster

import (
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"strings"
	"time"

	"github.com/cockroachdb/pebble/v2"
)

// Registered callers (issue 14): a subscriber names the event kinds it
// wants and where to send them, a tcp://HOST:PORT socket or an http(s)://
// webhook. Its record, with the seq of the last event it acknowledged, is
// in the replicated metadata, so whichever node is primary delivers from
// there: every matching event at least once, in seq order, with no event
// lost across a primary change or restart (events delivered but not yet
// acknowledged when a primary dies are delivered again by the next one).
//
// Keys (part of the on-disk format):
//
//	"meta/sub/" + id -> JSON Subscriber
//
// Commands: sub.add and sub.remove (the primary, for an operator), sub.ack
// (the primary's delivery loop). A sub.ack at or below the recorded
// position changes nothing (a late ack of an older primary); none of the
// three derives an event, so delivering and acknowledging never feed each
// other.
const subPrefix = "meta/sub/"

// Subscriber limits.
const (
	subscriberKindsMax   = 64
	subscriberTargetMax  = 2048
	subscribersMax       = 256
	SubscriberSchemeTCP  = "tcp"
	SubscriberSchemeHTTP = "http"
)

// Subscriber is a registered caller. Its JSON is part of the on-disk format.
type Subscriber struct {
	ID string `json:"id"`
	// Kinds are the event kinds delivered; empty means every kind.
	Kinds []string `json:"kinds,omitempty"`
	// To is tcp://HOST:PORT, http://... or https://...
	To        string    `json:"to"`
	CreatedAt time.Time `json:"created_at"`
	// AckedSeq is the seq of the last event the subscriber acknowledged
	// (or that did not match its kinds); delivery resumes after it. A new
	// subscriber starts at the last event at its registration.
	AckedSeq uint64 `json:"acked_seq"`
}

// Wants reports whether ev is of a kind the subscriber asked for.
func (s Subscriber) Wants(ev Event) bool {
	if len(s.Kinds) == 0 {
		return true
	}
	for _, k := range s.Kinds {
		if k == ev.Kind {
			return true
		}
	}
	return false
}

// checkSubscriber checks a subscriber record a sub.add carries.
func checkSubscriber(s Subscriber) error {
	if err := ValidateName(s.ID); err != nil {
		return fmt.Errorf("%w: subscriber id %q: 1 to %d characters of [A-Za-z0-9._-]", ErrInvalid, s.ID, NameLengthMax)
	}
	if len(s.Kinds) > subscriberKindsMax {
		return fmt.Errorf("%w: %d kinds, at most %d", ErrInvalid, len(s.Kinds), subscriberKindsMax)
	}
	for _, k := range s.Kinds {
		if !KnownEventKind(k) {
			return fmt.Errorf("%w: unknown event kind %q (known: %s)", ErrInvalid, k, strings.Join(EventKinds(), ", "))
		}
	}
	if len(s.To) > subscriberTargetMax {
		return fmt.Errorf("%w: target is %d bytes, at most %d", ErrInvalid, len(s.To), subscriberTargetMax)
	}
	u, err := url.Parse(s.To)
	if err != nil || u.Host == "" {
		return fmt.Errorf("%w: target %q: want tcp://HOST:PORT, http://HOST[:PORT]/PATH or https://...", ErrInvalid, s.To)
	}
	switch u.Scheme {
	case SubscriberSchemeTCP:
		if u.Port() == "" || (u.Path != "" && u.Path != "/") {
			return fmt.Errorf("%w: target %q: a tcp target is tcp://HOST:PORT", ErrInvalid, s.To)
		}
	case "http", "https":
	default:
		return fmt.Errorf("%w: target %q: scheme %q; use tcp, http or https", ErrInvalid, s.To, u.Scheme)
	}
	return nil
}

// applySubscriber applies sub.add, sub.remove and sub.ack.
func (f *fsm) applySubscriber(b *pebble.Batch, c *command) applyResult {
	if !c.Primary {
		return applyResult{err: fmt.Errorf("%w: %q proposes %s; only the primary manages subscribers", ErrForeignRecord, c.By, c.Type)}
	}
	switch c.Type {
	case cmdAddSubscriber:
		s := *c.Sub
		if err := checkSubscriber(s); err != nil {
			return applyResult{err: err}
		}
		var old Subscriber
		found, err := getJSON(f.db, subPrefix+s.ID, &old)
		if err != nil {
			return applyResult{err: err}
		}
		if found {
			return applyResult{err: fmt.Errorf("%w: subscriber %q", ErrExists, s.ID)}
		}
		subs, err := listSubscribers(f.db)
		if err != nil {
			return applyResult{err: err}
		}
		if len(subs) >= subscribersMax {
			return applyResult{err: fmt.Errorf("%w: %d subscribers, at most %d", ErrInvalid, len(subs), subscribersMax)}
		}
		s.CreatedAt, s.AckedSeq = c.At, f.eventSeq.Load()
		return applyResult{err: putJSON(b, subPrefix+s.ID, s)}
	case cmdRemoveSubscriber:
		var old Subscriber
		found, err := getJSON(f.db, subPrefix+c.Name, &old)
		if err != nil {
			return applyResult{err: err}
		}
		if !found {
			return applyResult{err: fmt.Errorf("%w: subscriber %q", ErrNotFound, c.Name)}
		}
		return applyResult{err: b.Delete([]byte(subPrefix+c.Name), nil)}
	default: // cmdAckSubscriber
		var s Subscriber
		found, err := getJSON(f.db, subPrefix+c.Name, &s)
		if err != nil {
			return applyResult{err: err}
		}
		if !found {
			return applyResult{err: fmt.Errorf("%w: subscriber %q", ErrNotFound, c.Name)}
		}
		if c.AckSeq > f.eventSeq.Load() {
			return applyResult{err: fmt.Errorf("%w: ack of %d beyond the last event %d", ErrInvalid, c.AckSeq, f.eventSeq.Load())}
		}
		if c.AckSeq <= s.AckedSeq {
			return applyResult{} // a late ack: nothing to record
		}
		s.AckedSeq = c.AckSeq
		return applyResult{err: putJSON(b, subPrefix+s.ID, s)}
	}
}

func listSubscribers(r reader) ([]Subscriber, error) {
	var out []Subscriber
	err := scan(r, subPrefix, func(k, v []byte) error {
		var s Subscriber
		if err := json.Unmarshal(v, &s); err != nil {
			return fmt.Errorf("cluster: decode %s: %w", k, err)
		}
		out = append(out, s)
		return nil
	})
	return out, err
}

// AddSubscriber registers a caller (proposed by this node as the primary;
// leader only). Its position starts at the last event now. Returns
// ErrInvalid, ErrExists or ErrNotLeader.
func (n *Node) AddSubscriber(ctx context.Context, s Subscriber) (Subscriber, error) {
	s.CreatedAt, s.AckedSeq = time.Time{}, 0
	if err := checkSubscriber(s); err != nil {
		return Subscriber{}, err
	}
	if _, err := n.propose(ctx, &command{Type: cmdAddSubscriber, Sub: &s, By: n.opts.NodeID, Primary: true}); err != nil {
		return Subscriber{}, err
	}
	return n.Subscriber(s.ID)
}

// RemoveSubscriber drops a registered caller (leader only). Returns
// ErrNotFound or ErrNotLeader.
func (n *Node) RemoveSubscriber(ctx context.Context, id string) error {
	_, err := n.propose(ctx, &command{Type: cmdRemoveSubscriber, Name: id, By: n.opts.NodeID, Primary: true})
	return err
}

// AckSubscriber records that subscriber id has every event up to seq
// (leader only; the delivery loop calls it).
func (n *Node) AckSubscriber(ctx context.Context, id string, seq uint64) error {
	_, err := n.propose(ctx, &command{Type: cmdAckSubscriber, Name: id, AckSeq: seq, By: n.opts.NodeID, Primary: true})
	return err
}

// Subscribers lists the registered callers from the local applied state.
func (n *Node) Subscribers() (subs []Subscriber, err error) {
	err = n.readDB(func() error {
		subs, err = listSubscribers(n.db)
		return err
	})
	return subs, err
}

// Subscriber reads one registered caller. Returns ErrNotFound.
func (n *Node) Subscriber(id string) (s Subscriber, err error) {
	err = n.readDB(func() error {
		found, err := getJSON(n.db, subPrefix+id, &s)
		if err == nil && !found {
			err = fmt.Errorf("%w: subscriber %q", ErrNotFound, id)
		}
		return err
	})
	return s, err
}
