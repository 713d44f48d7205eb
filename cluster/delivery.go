package cluster

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Event delivery to registered callers runs on the primary only: one
// worker per subscriber reads the event log after the subscriber's
// recorded position, sends the events of its kinds, waits for the
// acknowledgement and records the new position (sub.ack). A worker that
// fails (the caller is down, slow, or answers wrongly) retries with
// exponential backoff and reports it in DeliveryStatus; it runs apart from
// everything else, so a dead caller never slows the data path or another
// caller.
//
// Wire protocols (part of the API):
//
//	tcp://HOST:PORT  the primary connects and writes each event as one JSON
//	                 line (the Event encoding); the caller acknowledges by
//	                 writing back a line holding the seq of the last event it
//	                 has taken (cumulative: "42\n" acknowledges every event up
//	                 to 42). A batch unacknowledged within the ack timeout is
//	                 sent again on a new connection.
//	http(s)://...    the primary POSTs each batch as JSON lines
//	                 (Content-Type: application/x-ndjson); any 2xx answer
//	                 acknowledges the whole batch.
//
// Delivery is at least once: after a failure or a primary change, events
// after the recorded position are sent again, so a caller may see an
// event twice (it can drop a seq it has seen) but never misses one.
const (
	deliveryBatchMax     = 256
	deliveryAckTimeout   = 10 * time.Second
	deliveryDialTimeout  = 5 * time.Second
	deliveryBackoffFirst = 200 * time.Millisecond
	deliveryBackoffMax   = 30 * time.Second
	deliveryScanEvery    = 500 * time.Millisecond
	deliveryAckLineMax   = 64
)

// Delivery states in DeliveryStatus.State.
const (
	DeliveryOK       = "ok"
	DeliveryRetrying = "retrying"
)

// DeliveryStatus is how delivery to one subscriber goes, as the primary
// that runs it sees it (other nodes report nothing).
type DeliveryStatus struct {
	ID    string `json:"id"`
	State string `json:"state"`
	// SentSeq is the last event seq sent and acknowledged by this primary.
	SentSeq   uint64    `json:"sent_seq"`
	Delivered uint64    `json:"delivered"`
	Failures  uint64    `json:"failures"`
	LastError string    `json:"last_error,omitempty"`
	ErrorAt   time.Time `json:"error_at,omitzero"`
	NextRetry time.Time `json:"next_retry,omitzero"`
}

// delivery runs the workers of the subscribers while this node is primary.
type delivery struct {
	n  *Node // immutable; never nil
	mu sync.Mutex
	// workers by subscriber id; guarded by mu.
	workers map[string]*deliveryWorker
	// status by subscriber id; guarded by mu.
	status map[string]DeliveryStatus
}

type deliveryWorker struct {
	cancel context.CancelFunc
	done   chan struct{}
}

// DeliveryStatus returns the delivery state of every subscriber this node
// delivers to (empty on a node that is not the primary).
func (n *Node) DeliveryStatus() map[string]DeliveryStatus {
	d := n.delivery
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make(map[string]DeliveryStatus, len(d.status))
	for id, st := range d.status {
		if _, running := d.workers[id]; running {
			out[id] = st
		}
	}
	return out
}

func (d *delivery) setStatus(id string, fn func(*DeliveryStatus)) {
	d.mu.Lock()
	st := d.status[id]
	st.ID = id
	fn(&st)
	d.status[id] = st
	d.mu.Unlock()
}

// loop starts and stops workers as subscribers come and go and as this
// node gains and loses the primary role.
func (d *delivery) loop() {
	defer d.n.wg.Done()
	t := time.NewTicker(deliveryScanEvery)
	defer t.Stop()
	for {
		d.reconcile()
		select {
		case <-d.n.closed:
			d.stopAll()
			return
		case <-t.C:
		}
	}
}

func (d *delivery) reconcile() {
	if !d.n.IsLeader() {
		d.stopAll()
		return
	}
	subs, err := d.n.Subscribers()
	if err != nil {
		return
	}
	want := map[string]bool{}
	for _, s := range subs {
		want[s.ID] = true
	}
	d.mu.Lock()
	var stop []*deliveryWorker
	for id, w := range d.workers {
		if !want[id] {
			stop = append(stop, w)
			delete(d.workers, id)
			delete(d.status, id)
		}
	}
	for _, s := range subs {
		if _, ok := d.workers[s.ID]; ok {
			continue
		}
		ctx, cancel := context.WithCancel(context.Background())
		w := &deliveryWorker{cancel: cancel, done: make(chan struct{})}
		d.workers[s.ID] = w
		d.status[s.ID] = DeliveryStatus{ID: s.ID, State: DeliveryOK, SentSeq: s.AckedSeq}
		go func(id string) {
			defer close(w.done)
			d.run(ctx, id)
		}(s.ID)
	}
	d.mu.Unlock()
	for _, w := range stop {
		w.cancel()
		<-w.done
	}
}

func (d *delivery) stopAll() {
	d.mu.Lock()
	ws := d.workers
	d.workers = map[string]*deliveryWorker{}
	d.status = map[string]DeliveryStatus{}
	d.mu.Unlock()
	for _, w := range ws {
		w.cancel()
		<-w.done
	}
}

// run delivers to subscriber id until ctx ends or the record is gone.
func (d *delivery) run(ctx context.Context, id string) {
	n := d.n
	sub, err := n.Subscriber(id)
	if err != nil {
		return
	}
	pos := sub.AckedSeq
	var s sender
	defer func() {
		if s != nil {
			s.close()
		}
	}()
	backoff := deliveryBackoffFirst
	fail := func(err error) bool {
		if s != nil {
			s.close()
			s = nil
		}
		d.setStatus(id, func(st *DeliveryStatus) {
			st.State, st.Failures, st.LastError, st.ErrorAt = DeliveryRetrying, st.Failures+1, err.Error(), time.Now()
			st.NextRetry = time.Now().Add(backoff)
		})
		n.log.Warn("event delivery failed; retrying", "subscriber", id, "to", sub.To, "err", err, "retry_in", backoff)
		select {
		case <-ctx.Done():
			return false
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, deliveryBackoffMax)
		return true
	}
	for ctx.Err() == nil {
		changed := n.EventsChanged()
		evs, err := n.Events(pos, deliveryBatchMax)
		if err != nil {
			return
		}
		if len(evs) == 0 {
			select {
			case <-ctx.Done():
				return
			case <-changed:
			}
			continue
		}
		// Re-read the record: a removed subscriber gets nothing more.
		if sub, err = n.Subscriber(id); err != nil {
			return
		}
		var batch []Event
		for _, ev := range evs {
			if sub.Wants(ev) {
				batch = append(batch, ev)
			}
		}
		last := evs[len(evs)-1].Seq
		if len(batch) > 0 {
			if s == nil {
				if s, err = newSender(ctx, sub.To, n.opts.DeliveryAckTimeout); err != nil {
					if !fail(err) {
						return
					}
					continue
				}
			}
			if err := s.send(ctx, batch); err != nil {
				if !fail(err) {
					return
				}
				continue
			}
		}
		backoff = deliveryBackoffFirst
		if err := n.AckSubscriber(ctx, id, last); err != nil {
			if errors.Is(err, ErrNotFound) || errors.Is(err, ErrNotLeader) || errors.Is(err, ErrClosed) || ctx.Err() != nil {
				return // removed, or no longer primary: the next primary resumes
			}
			n.log.Warn("could not record a subscriber's position", "subscriber", id, "seq", last, "err", err)
		}
		pos = last
		d.setStatus(id, func(st *DeliveryStatus) {
			st.State, st.SentSeq, st.Delivered, st.NextRetry = DeliveryOK, last, st.Delivered+uint64(len(batch)), time.Time{}
		})
	}
}

// sender delivers batches to one caller.
type sender interface {
	send(ctx context.Context, evs []Event) error
	close()
}

func newSender(ctx context.Context, to string, ackTimeout time.Duration) (sender, error) {
	u, err := url.Parse(to)
	if err != nil {
		return nil, err
	}
	if u.Scheme == SubscriberSchemeTCP {
		dctx, cancel := context.WithTimeout(ctx, deliveryDialTimeout)
		defer cancel()
		var dialer net.Dialer
		conn, err := dialer.DialContext(dctx, "tcp", u.Host)
		if err != nil {
			return nil, fmt.Errorf("connect %s: %w", u.Host, err)
		}
		return &tcpSender{conn: conn, r: bufio.NewReaderSize(conn, 256), ackTimeout: ackTimeout}, nil
	}
	return &httpSender{url: to, client: &http.Client{Timeout: ackTimeout}}, nil
}

type tcpSender struct {
	conn       net.Conn
	r          *bufio.Reader
	ackTimeout time.Duration
}

func encodeLines(evs []Event) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	for _, ev := range evs {
		if err := enc.Encode(ev); err != nil {
			return nil, err
		}
	}
	return buf.Bytes(), nil
}

func (t *tcpSender) send(ctx context.Context, evs []Event) error {
	data, err := encodeLines(evs)
	if err != nil {
		return err
	}
	deadline := time.Now().Add(t.ackTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	_ = t.conn.SetDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { _ = t.conn.SetDeadline(time.Now()) })
	defer stop()
	if _, err := t.conn.Write(data); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	want := evs[len(evs)-1].Seq
	for {
		line, err := t.r.ReadSlice('\n')
		if err != nil {
			if errors.Is(err, io.EOF) {
				return errors.New("the subscriber closed the connection before acknowledging")
			}
			return fmt.Errorf("waiting for the acknowledgement of %d: %w", want, err)
		}
		got, err := parseAckLine(line)
		if err != nil {
			return err
		}
		if got >= want {
			return nil
		}
	}
}

// parseAckLine reads one acknowledgement line of the TCP protocol: a
// decimal seq, surrounding white space allowed.
func parseAckLine(line []byte) (uint64, error) {
	if len(line) > deliveryAckLineMax {
		return 0, fmt.Errorf("acknowledgement line of %d bytes; want a seq", len(line))
	}
	text := strings.TrimSpace(string(line))
	got, err := strconv.ParseUint(text, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("acknowledgement %q is not a seq", text)
	}
	return got, nil
}

func (t *tcpSender) close() { _ = t.conn.Close() }

type httpSender struct {
	url    string
	client *http.Client
}

func (h *httpSender) send(ctx context.Context, evs []Event) error {
	data, err := encodeLines(evs)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, h.url, bytes.NewReader(data))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/x-ndjson")
	resp, err := h.client.Do(req)
	if err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	_ = resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("webhook answered %s", resp.Status)
	}
	return nil
}

func (h *httpSender) close() { h.client.CloseIdleConnections() }
