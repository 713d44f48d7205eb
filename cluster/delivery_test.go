package cluster

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"
)

// tcpCaller is a registered caller's TCP socket: it records every event
// line and acknowledges it (unless ack is false: a caller that stopped).
type tcpCaller struct {
	ln  net.Listener
	mu  sync.Mutex
	got []Event // guarded by mu
	ack bool    // guarded by mu
}

func newTCPCaller(t *testing.T, ack bool) *tcpCaller {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c := &tcpCaller{ln: ln, ack: ack}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go c.serve(conn)
		}
	}()
	return c
}

func (c *tcpCaller) serve(conn net.Conn) {
	defer conn.Close()
	sc := bufio.NewScanner(conn)
	for sc.Scan() {
		var ev Event
		if json.Unmarshal(sc.Bytes(), &ev) != nil {
			return
		}
		c.mu.Lock()
		c.got = append(c.got, ev)
		ack := c.ack
		c.mu.Unlock()
		if ack {
			fmt.Fprintf(conn, "%d\n", ev.Seq)
		}
	}
}

func (c *tcpCaller) events() []Event {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]Event(nil), c.got...)
}

// TestDeliveryToCallers: a TCP caller and a webhook get the events of
// their kinds in order and their positions are recorded; a caller that
// never acknowledges is retried and reported, and does not hold the others
// back; a removed caller gets nothing more.
func TestDeliveryToCallers(t *testing.T) {
	opts := testOptions(t, t.TempDir(), "n1", true)
	opts.DeliveryAckTimeout = time.Second
	n := openNode(t, opts)
	ctx := ctxT(t)
	if err := n.WaitLeader(ctx); err != nil {
		t.Fatal(err)
	}
	waitPrimaryEvent(t, n)
	good := newTCPCaller(t, true)
	stuck := newTCPCaller(t, false)
	var hookMu sync.Mutex
	var hooked []Event
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sc := bufio.NewScanner(r.Body)
		for sc.Scan() {
			var ev Event
			if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
				w.WriteHeader(http.StatusBadRequest)
				return
			}
			hookMu.Lock()
			hooked = append(hooked, ev)
			hookMu.Unlock()
		}
	}))
	defer hook.Close()

	start := n.LastEventSeq()
	for _, s := range []Subscriber{
		{ID: "good", To: "tcp://" + good.ln.Addr().String(), Kinds: []string{EventLUCreated, EventLUDeleted}},
		{ID: "stuck", To: "tcp://" + stuck.ln.Addr().String()},
		{ID: "hook", To: hook.URL + "/events"},
	} {
		got, err := n.AddSubscriber(ctx, s)
		if err != nil {
			t.Fatal(err)
		}
		if got.AckedSeq != start {
			t.Fatalf("new subscriber %s starts at %d, want the last event %d", s.ID, got.AckedSeq, start)
		}
	}
	if _, err := n.AddSubscriber(ctx, Subscriber{ID: "bad", To: "tcp://x", Kinds: []string{"Nope"}}); err == nil {
		t.Fatal("a subscriber with an unknown kind was accepted")
	}
	for i := range 5 {
		name := fmt.Sprintf("d%d", i)
		if err := n.CreateLU(ctx, LU{Name: name, SizeBytes: 1 << 20}); err != nil {
			t.Fatal(err)
		}
		if err := n.AppendEvent(ctx, Proposer{NodeID: "n1"}, Event{Kind: EventPoolThreshold}); err != nil {
			t.Fatal(err)
		}
		if err := n.DeleteLU(ctx, name); err != nil {
			t.Fatal(err)
		}
	}
	last := n.LastEventSeq()
	waitFor(t, "the good caller to get 10 events and be acknowledged", func() bool {
		s, err := n.Subscriber("good")
		return err == nil && len(good.events()) >= 10 && s.AckedSeq == last
	})
	evs := good.events()
	if len(evs) != 10 {
		t.Fatalf("good caller got %d events, want 10 (no duplicates without a failure)", len(evs))
	}
	for i, ev := range evs {
		want := EventLUCreated
		if i%2 == 1 {
			want = EventLUDeleted
		}
		if ev.Kind != want || (i > 0 && ev.Seq <= evs[i-1].Seq) {
			t.Fatalf("event %d: %s at %d; want %s, in seq order", i, ev.Kind, ev.Seq, want)
		}
	}
	waitFor(t, "the webhook to get every event", func() bool {
		s, err := n.Subscriber("hook")
		hookMu.Lock()
		defer hookMu.Unlock()
		return err == nil && s.AckedSeq == last && len(hooked) == int(last-start)
	})
	waitFor(t, "the stuck caller to be reported retrying", func() bool {
		st := n.DeliveryStatus()["stuck"]
		return st.State == DeliveryRetrying && st.Failures >= 1 && st.LastError != ""
	})
	if s, err := n.Subscriber("stuck"); err != nil || s.AckedSeq != start {
		t.Fatalf("stuck caller's position %d (%v), want %d (nothing acknowledged)", s.AckedSeq, err, start)
	}
	if err := n.RemoveSubscriber(ctx, "good"); err != nil {
		t.Fatal(err)
	}
	if err := n.CreateLU(ctx, LU{Name: "after", SizeBytes: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * deliveryScanEvery)
	if got := len(good.events()); got != 10 {
		t.Fatalf("removed caller got %d events, want 10", got)
	}
	if _, ok := n.DeliveryStatus()["good"]; ok {
		t.Fatal("removed caller still in DeliveryStatus")
	}
}
