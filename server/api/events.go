package api

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// Event is one entry of the pool's event log (GET /v1/events): Seq is
// assigned by the metadata state machine, without gaps; LU and Node are
// set when the event has one.
type Event struct {
	Seq     uint64            `json:"seq"`
	Time    time.Time         `json:"time"`
	Kind    string            `json:"kind"`
	LU      string            `json:"lu,omitempty"`
	Node    string            `json:"node,omitempty"`
	By      string            `json:"by,omitempty"`
	Details map[string]string `json:"details,omitempty"`
}

// EventSource is what the event endpoints serve (Options.Events). Safe for
// concurrent use.
type EventSource interface {
	// Events returns up to limit events after seq after, in seq order.
	Events(after uint64, limit int) ([]Event, error)
	// LastEventSeq is the newest event's seq (0 when none).
	LastEventSeq() uint64
	// EventsChanged returns a channel closed when the next events are
	// stored (take it before reading, so nothing is missed).
	EventsChanged() <-chan struct{}
	// AppendEvent records an event a member node observed (POST
	// /v1/internal/events from CallerFrom(ctx).Node); ErrUnavailable with
	// a NotLeaderError on a follower.
	AppendEvent(ctx context.Context, ev Event) error
	// AddSubscriber, RemoveSubscriber and Subscribers manage the
	// registered callers; they run on the primary (a NotLeaderError
	// elsewhere makes the handler forward the request).
	AddSubscriber(ctx context.Context, req SubscribeRequest) (Subscriber, error)
	RemoveSubscriber(ctx context.Context, id string) error
	Subscribers(ctx context.Context) ([]Subscriber, error)
}

// SubscribeRequest is the body of POST /v1/events/subscribers.
type SubscribeRequest struct {
	// ID names the subscriber; empty means one is made up.
	ID string `json:"id,omitempty"`
	// Kinds are the event kinds wanted; empty means every kind.
	Kinds []string `json:"kinds,omitempty"`
	// To is tcp://HOST:PORT, http://... or https://...
	To string `json:"to"`
}

// Subscriber is a registered caller and how delivery to it goes.
type Subscriber struct {
	ID        string    `json:"id"`
	Kinds     []string  `json:"kinds,omitempty"`
	To        string    `json:"to"`
	CreatedAt time.Time `json:"created_at"`
	// AckedSeq is the recorded position: every event up to it is
	// delivered and acknowledged.
	AckedSeq uint64 `json:"acked_seq"`
	// State is "ok" or "retrying" (as the primary reports it); empty when
	// no primary delivers to it yet.
	State     string    `json:"state,omitempty"`
	Delivered uint64    `json:"delivered"`
	Failures  uint64    `json:"failures"`
	LastError string    `json:"last_error,omitempty"`
	NextRetry time.Time `json:"next_retry,omitzero"`
}

func (h *Handler) addSubscriber(ctx context.Context, _ *http.Request, body []byte) (int, any, error) {
	var req SubscribeRequest
	if err := decode(body, &req); err != nil {
		return 0, nil, err
	}
	if req.To == "" {
		return 0, nil, fmt.Errorf("%w: a subscriber needs to (tcp://HOST:PORT or an http(s) URL)", ErrInvalid)
	}
	s, err := h.opts.Events.AddSubscriber(ctx, req)
	return http.StatusCreated, s, err
}

func (h *Handler) removeSubscriber(ctx context.Context, r *http.Request, _ []byte) (int, any, error) {
	return http.StatusNoContent, nil, h.opts.Events.RemoveSubscriber(ctx, r.PathValue("id"))
}

// subscribers is answered by the primary (forwarded like a change), which
// knows how delivery goes.
func (h *Handler) subscribers(ctx context.Context, _ *http.Request, _ []byte) (int, any, error) {
	subs, err := h.opts.Events.Subscribers(ctx)
	if subs == nil {
		subs = []Subscriber{}
	}
	return http.StatusOK, subs, err
}

// AddSubscriber registers a caller for events.
func (c *Client) AddSubscriber(ctx context.Context, req SubscribeRequest) (Subscriber, error) {
	var out Subscriber
	err := c.do(ctx, http.MethodPost, "/v1/events/subscribers", req, &out)
	return out, err
}

// RemoveSubscriber drops a registered caller.
func (c *Client) RemoveSubscriber(ctx context.Context, id string) error {
	return c.do(ctx, http.MethodDelete, "/v1/events/subscribers/"+url.PathEscape(id), nil, nil)
}

// Subscribers lists the registered callers with their delivery state.
func (c *Client) Subscribers(ctx context.Context) ([]Subscriber, error) {
	var out []Subscriber
	err := c.do(ctx, http.MethodGet, "/v1/events/subscribers", nil, &out)
	return out, err
}

// Event stream limits.
const (
	// eventsTailDefault is how many of the latest events a stream without
	// after= starts with.
	eventsTailDefault = 10
	eventsTailMax     = 10000
	eventsBatchMax    = 512
	// eventsKeepalive: an idle stream writes an empty line this often, so
	// proxies keep it and a dead client is noticed.
	eventsKeepalive = 15 * time.Second
)

// EventFilter selects events of a stream (GET /v1/events query).
type EventFilter struct {
	// Kinds, when not empty, keeps only these kinds.
	Kinds map[string]bool
	// LU and Node, when set, keep only events of that LU or node.
	LU, Node string
}

// Match reports whether ev passes the filter.
func (f EventFilter) Match(ev Event) bool {
	return (len(f.Kinds) == 0 || f.Kinds[ev.Kind]) && (f.LU == "" || ev.LU == f.LU) && (f.Node == "" || ev.Node == f.Node)
}

// ParseKinds splits a comma-separated kind list ("" means every kind).
func ParseKinds(s string) map[string]bool {
	out := map[string]bool{}
	for _, k := range strings.Split(s, ",") {
		if k = strings.TrimSpace(k); k != "" {
			out[k] = true
		}
	}
	return out
}

// events streams the event log as JSON lines (GET /v1/events):
//
//	after=SEQ   start right after SEQ (without it: the tail= latest, default 10)
//	kind=K,K    only these kinds; lu=NAME, node=ID only those
//	follow=false  end after the events stored now (default: keep streaming)
//
// Every line is one Event; an empty line is a keep-alive. The stream reads
// the node's applied log, which on a follower may lag the leader briefly.
func (h *Handler) events(w http.ResponseWriter, r *http.Request) {
	src := h.opts.Events
	q := r.URL.Query()
	filter := EventFilter{Kinds: ParseKinds(q.Get("kind")), LU: q.Get("lu"), Node: q.Get("node")}
	follow := true
	if v := q.Get("follow"); v != "" {
		var err error
		if follow, err = strconv.ParseBool(v); err != nil {
			h.fail(w, fmt.Errorf("%w: follow=%q: use true or false", ErrInvalid, v))
			return
		}
	}
	var after uint64
	if v := q.Get("after"); v != "" {
		var err error
		if after, err = strconv.ParseUint(v, 10, 64); err != nil {
			h.fail(w, fmt.Errorf("%w: after=%q: want a sequence number", ErrInvalid, v))
			return
		}
	} else {
		tail := uint64(eventsTailDefault)
		if v := q.Get("tail"); v != "" {
			n, err := strconv.ParseUint(v, 10, 64)
			if err != nil || n > eventsTailMax {
				h.fail(w, fmt.Errorf("%w: tail=%q: want 0 to %d", ErrInvalid, v, eventsTailMax))
				return
			}
			tail = n
		}
		if last := src.LastEventSeq(); last > tail {
			after = last - tail
		}
	}
	// The server's read timeout would otherwise end a long stream (its
	// background read fails and cancels the request).
	rc := http.NewResponseController(w)
	_ = rc.SetReadDeadline(time.Time{})
	_ = rc.SetWriteDeadline(time.Time{})
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	flush := func() { _ = rc.Flush() }
	flush()
	enc := json.NewEncoder(w)
	keepalive := time.NewTicker(eventsKeepalive)
	defer keepalive.Stop()
	for {
		changed := src.EventsChanged()
		evs, err := src.Events(after, eventsBatchMax)
		if err != nil {
			h.opts.Logger.Warn("event stream: read failed", "err", err)
			return
		}
		for _, ev := range evs {
			after = ev.Seq
			if filter.Match(ev) {
				if err := enc.Encode(ev); err != nil {
					return
				}
			}
		}
		if len(evs) > 0 {
			flush()
		}
		if len(evs) == eventsBatchMax {
			continue
		}
		if !follow {
			return
		}
		select {
		case <-r.Context().Done():
			return
		case <-changed:
		case <-keepalive.C:
			if _, err := io.WriteString(w, "\n"); err != nil {
				return
			}
			flush()
		}
	}
}

// appendEvent records an event proposed by the calling member node.
func (h *Handler) appendEvent(ctx context.Context, _ *http.Request, body []byte) (int, any, error) {
	var ev Event
	if err := decode(body, &ev); err != nil {
		return 0, nil, err
	}
	if ev.Kind == "" {
		return 0, nil, fmt.Errorf("%w: an event needs a kind", ErrInvalid)
	}
	return http.StatusNoContent, nil, h.opts.Events.AppendEvent(ctx, ev)
}

// WatchEvents streams events after seq after (nil: the tail latest ones)
// matching kinds (comma-separated; "" for all) and calls fn for each, in
// order, until ctx ends, fn returns an error, or (follow false) the stored
// events are delivered. The stream has no overall timeout.
func (c *Client) WatchEvents(ctx context.Context, after *uint64, tail int, kinds string, follow bool, fn func(Event) error) error {
	q := url.Values{}
	if after != nil {
		q.Set("after", strconv.FormatUint(*after, 10))
	} else if tail >= 0 {
		q.Set("tail", strconv.Itoa(tail))
	}
	if kinds != "" {
		q.Set("kind", kinds)
	}
	if !follow {
		q.Set("follow", "false")
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base+"/v1/events?"+q.Encode(), nil)
	if err != nil {
		return err
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	hc := *c.http
	hc.Timeout = 0 // a stream: ctx bounds it
	resp, err := hc.Do(req)
	if err != nil {
		return fmt.Errorf("cannot reach the lupool API at %s: %w", c.base, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		data, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		var eb ErrorBody
		if json.Unmarshal(data, &eb) == nil && eb.Error != "" {
			return &StatusError{StatusCode: resp.StatusCode, Message: eb.Error}
		}
		return &StatusError{StatusCode: resp.StatusCode, Message: "GET /v1/events: " + resp.Status}
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Bytes()
		if len(strings.TrimSpace(string(line))) == 0 {
			continue // keep-alive
		}
		var ev Event
		if err := json.Unmarshal(line, &ev); err != nil {
			return fmt.Errorf("event stream: bad line %q: %w", line, err)
		}
		if err := fn(ev); err != nil {
			return err
		}
	}
	if err := sc.Err(); err != nil && !errors.Is(ctx.Err(), context.Canceled) {
		return fmt.Errorf("event stream: %w", err)
	}
	return nil
}

// AppendEvent sends an event this node observed to the leader (node-only,
// POST /v1/internal/events on the peer port).
func (c *Client) AppendEvent(ctx context.Context, ev Event) error {
	return c.do(ctx, http.MethodPost, "/v1/internal/events", ev, nil)
}
