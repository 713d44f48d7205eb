package api

import (
	"context"
	"errors"
	"net/http"
	"sync"
	"testing"
	"time"
)

// memEvents is an in-memory EventSource: seq i+1 is evs[i].
type memEvents struct {
	mu      sync.Mutex
	evs     []Event       // guarded by mu
	changed chan struct{} // guarded by mu
	// appended records AppendEvent calls with the caller's node.
	appended []string // guarded by mu
}

func newMemEvents() *memEvents { return &memEvents{changed: make(chan struct{})} }

func (m *memEvents) add(kind, lu string) {
	m.mu.Lock()
	m.evs = append(m.evs, Event{Seq: uint64(len(m.evs) + 1), Time: time.Now(), Kind: kind, LU: lu})
	close(m.changed)
	m.changed = make(chan struct{})
	m.mu.Unlock()
}

func (m *memEvents) Events(after uint64, limit int) ([]Event, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []Event
	for _, ev := range m.evs {
		if ev.Seq > after && len(out) < limit {
			out = append(out, ev)
		}
	}
	return out, nil
}

func (m *memEvents) LastEventSeq() uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return uint64(len(m.evs))
}

func (m *memEvents) EventsChanged() <-chan struct{} {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.changed
}

func (m *memEvents) AppendEvent(ctx context.Context, ev Event) error {
	m.mu.Lock()
	m.appended = append(m.appended, CallerFrom(ctx).Node+":"+ev.Kind)
	m.mu.Unlock()
	return nil
}

func (m *memEvents) AddSubscriber(_ context.Context, req SubscribeRequest) (Subscriber, error) {
	return Subscriber{ID: req.ID, Kinds: req.Kinds, To: req.To}, nil
}

func (m *memEvents) RemoveSubscriber(context.Context, string) error { return nil }

func (m *memEvents) Subscribers(context.Context) ([]Subscriber, error) { return nil, nil }

// collect watches until n events arrived (or the stream ended).
func collect(t *testing.T, c *Client, after *uint64, tail int, kinds string, follow bool, n int) []Event {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var got []Event
	errStop := errors.New("enough")
	err := c.WatchEvents(ctx, after, tail, kinds, follow, func(ev Event) error {
		got = append(got, ev)
		if len(got) == n {
			return errStop
		}
		return nil
	})
	if err != nil && !errors.Is(err, errStop) {
		t.Fatalf("WatchEvents: %v", err)
	}
	return got
}

func seqs(evs []Event) []uint64 {
	out := make([]uint64, len(evs))
	for i, ev := range evs {
		out[i] = ev.Seq
	}
	return out
}

// TestEventStream checks GET /v1/events: exactly the events after SEQ, in
// order; the latest ones without after; the kind filter; follow delivers
// events stored later; credentials are required; nodes report events.
func TestEventStream(t *testing.T) {
	src := newMemEvents()
	for i := range 30 {
		kind := "LUCreated"
		if i%3 == 2 {
			kind = "LUDeleted"
		}
		src.add(kind, "lu")
	}
	srv, c := newTestServerWith(t, Options{Backend: newMemBackend(), NodeID: "n1", Events: src})

	after := uint64(25)
	if got := seqs(collect(t, c, &after, 0, "", false, 0)); len(got) != 5 || got[0] != 26 || got[4] != 30 {
		t.Fatalf("after=25: seqs %v, want 26..30", got)
	}
	if got := seqs(collect(t, c, nil, -1, "", false, 0)); len(got) != 10 || got[0] != 21 {
		t.Fatalf("no after: seqs %v, want the 10 latest (21..30)", got)
	}
	if got := seqs(collect(t, c, nil, 3, "", false, 0)); len(got) != 3 || got[0] != 28 {
		t.Fatalf("tail=3: seqs %v, want 28..30", got)
	}
	zero := uint64(0)
	got := collect(t, c, &zero, 0, "LUDeleted", false, 0)
	if len(got) != 10 {
		t.Fatalf("kind=LUDeleted: %d events, want 10", len(got))
	}
	for _, ev := range got {
		if ev.Kind != "LUDeleted" {
			t.Fatalf("kind filter let %s through", ev.Kind)
		}
	}
	// Following: events stored after the stream started arrive.
	last := uint64(30)
	go func() {
		time.Sleep(100 * time.Millisecond)
		src.add("PoolThreshold", "")
		src.add("LUCreated", "x")
	}()
	if got := seqs(collect(t, c, &last, 0, "", true, 2)); len(got) != 2 || got[0] != 31 || got[1] != 32 {
		t.Fatalf("follow: seqs %v, want 31 32", got)
	}

	if resp := send(t, srv.URL, "GET", "/v1/events?follow=false", ""); resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("no token: %d, want 401", resp.StatusCode)
	}
	if resp := send(t, srv.URL, "GET", "/v1/events?after=x", "", bearerHeader(testToken)...); resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("after=x: %d, want 400", resp.StatusCode)
	}
	// A member node reports an event; an operator may not.
	pc, err := NewClientWith(srv.URL, ClientOptions{HTTP: peerHTTPClient(t, "n2")})
	if err != nil {
		t.Fatal(err)
	}
	if err := pc.AppendEvent(context.Background(), Event{Kind: "PoolThreshold"}); err != nil {
		t.Fatal(err)
	}
	var se *StatusError
	if err := c.AppendEvent(context.Background(), Event{Kind: "PoolThreshold"}); !errors.As(err, &se) || se.StatusCode != http.StatusForbidden {
		t.Fatalf("admin AppendEvent: %v, want 403", err)
	}
	src.mu.Lock()
	defer src.mu.Unlock()
	if len(src.appended) != 1 || src.appended[0] != "n2:PoolThreshold" {
		t.Fatalf("appended %v, want [n2:PoolThreshold]", src.appended)
	}
}

// panicBackend panics in ListLUs.
type panicBackend struct{ *memBackend }

func (panicBackend) ListLUs(context.Context) ([]LU, error) { panic("boom") }

// TestPanicRecoveredAndReported: a panic in a request is answered 500 and
// reported to OnPanic (which the daemon turns into a failure data
// capture); the server goes on serving.
func TestPanicRecoveredAndReported(t *testing.T) {
	var mu sync.Mutex
	var got []any
	h := newTestHandler(t, Options{Backend: panicBackend{newMemBackend()}, OnPanic: func(_ *http.Request, v any, stack []byte) {
		mu.Lock()
		defer mu.Unlock()
		if len(stack) == 0 {
			t.Error("OnPanic without a stack")
		}
		got = append(got, v)
	}})
	w := serve(h, "GET", "/v1/lus", "", bearerHeader(testToken)...)
	if w.Code != http.StatusInternalServerError || errorText(w) == "" {
		t.Fatalf("panicking request answered %d %q, want 500 with a JSON error", w.Code, w.Body.String())
	}
	if w := serve(h, "GET", "/v1/pool", "", bearerHeader(testToken)...); w.Code != http.StatusOK {
		t.Fatalf("after a panic: %d", w.Code)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(got) != 1 || got[0] != "boom" {
		t.Fatalf("OnPanic saw %v, want [boom]", got)
	}
}
