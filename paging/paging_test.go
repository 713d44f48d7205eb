package paging

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"sort"
	"strings"
	"sync"
	"testing"
)

// memLUs is the in-memory twin of the control plane: an LU table, the
// storage nodes and the clients attached per LU. Create refuses a name
// that is taken, like the control plane.
type memLUs struct {
	mu      sync.Mutex
	nodes   []Node
	lus     map[string]LU
	clients map[string]int
	creates int
}

var _ LUs = (*memLUs)(nil)

var errTaken = errors.New("twin: name taken")

func newMemLUs(nodes ...string) *memLUs {
	m := &memLUs{lus: map[string]LU{}, clients: map[string]int{}}
	for i, id := range nodes {
		m.nodes = append(m.nodes, Node{ID: id, NBDAddr: fmt.Sprintf("10.0.0.%d:10809", i+1), APIAddr: fmt.Sprintf("10.0.0.%d:10810", i+1)})
	}
	return m
}

func (m *memLUs) Create(_ context.Context, s CreateSpec) (LU, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.lus[s.Name]; ok {
		return LU{}, errTaken
	}
	m.creates++
	lu := LU{Name: s.Name, Description: s.Description, Kind: s.Kind, Writer: s.Node, SizeBytes: s.SizeBytes, Copies: s.Copies, Epoch: 1}
	lu.Replicas = append(lu.Replicas, Copy{Node: s.Node, State: "in-sync"})
	for _, n := range m.nodes {
		if len(lu.Replicas) < s.Copies && n.ID != s.Node {
			lu.Replicas = append(lu.Replicas, Copy{Node: n.ID, State: "in-sync"})
		}
	}
	m.lus[s.Name] = lu
	return lu, nil
}

func (m *memLUs) Get(_ context.Context, name string) (LU, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	lu, ok := m.lus[name]
	if !ok {
		return LU{}, fmt.Errorf("%w: twin: no %q", ErrNotFound, name)
	}
	return lu, nil
}

func (m *memLUs) List(context.Context) ([]LU, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []LU
	for _, lu := range m.lus {
		out = append(out, lu)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

func (m *memLUs) Delete(_ context.Context, name string, force bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.clients[name] > 0 && !force {
		return errors.New("twin: busy")
	}
	delete(m.lus, name)
	return nil
}

func (m *memLUs) Clients(_ context.Context, name string) (int, []string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if n := m.clients[name]; n > 0 {
		return n, []string{fmt.Sprintf("%d on %s", n, m.nodes[0].ID)}
	}
	return 0, nil
}

func (m *memLUs) Nodes(context.Context) ([]Node, error) { return m.nodes, nil }

func (m *memLUs) snapshot() map[string]LU {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := map[string]LU{}
	for k, v := range m.lus {
		out[k] = v
	}
	return out
}

func newService(t *testing.T, lus *memLUs) *Service {
	t.Helper()
	s, err := New(Options{LUs: lus, NodeID: lus.nodes[0].ID})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestRequestRefusalsChangeNothing: every refused request leaves the LU
// table as it was and matches its sentinel.
func TestRequestRefusalsChangeNothing(t *testing.T) {
	ctx := context.Background()
	lus := newMemLUs("n1")
	s := newService(t, lus)
	if _, err := lus.Create(ctx, CreateSpec{Name: "paging-other", Description: "not paging", Kind: KindFile, SizeBytes: 1 << 20, Copies: 1, Node: "n1"}); err != nil {
		t.Fatal(err)
	}
	before := lus.snapshot()
	for _, c := range []struct {
		req  Request
		want error
		text string
	}{
		{Request{VM: "vm1", SizeBytes: 0}, ErrInvalid, "size 0"},
		{Request{VM: "vm1", SizeBytes: -4096}, ErrInvalid, "size -4096"},
		{Request{VM: "", SizeBytes: 1 << 20}, ErrInvalid, "no VM id"},
		{Request{VM: "a/b", SizeBytes: 1 << 20}, ErrInvalid, "VM id"},
		{Request{VM: strings.Repeat("v", 122), SizeBytes: 1 << 20}, ErrInvalid, "at most 121"},
		{Request{VM: "vm1", SizeBytes: 1 << 20, Kind: "tape"}, ErrInvalid, "use memory or file"},
		{Request{VM: "vm1", SizeBytes: 1 << 20, Copies: 2}, ErrInvalid, "no node for copy 2"},
		{Request{VM: "vm1", SizeBytes: 1 << 20, Copies: -1}, ErrInvalid, "copies -1"},
		{Request{VM: "vm1", SizeBytes: 1 << 20, Host: "n9"}, ErrInvalid, `host "n9"`},
		{Request{VM: "other", SizeBytes: 1 << 20}, ErrExists, "not paging space"},
	} {
		_, err := s.Request(ctx, c.req)
		if !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.text) {
			t.Errorf("request %+v: %v; want %v saying %q", c.req, err, c.want, c.text)
		}
	}
	for _, vm := range []string{"ghost", "other"} {
		if _, err := s.Show(ctx, vm); !errors.Is(err, ErrNotFound) {
			t.Errorf("show %s: %v, want ErrNotFound", vm, err)
		}
		if err := s.Release(ctx, vm, true); !errors.Is(err, ErrNotFound) {
			t.Errorf("release %s: %v, want ErrNotFound", vm, err)
		}
	}
	if after := lus.snapshot(); !reflect.DeepEqual(before, after) {
		t.Fatalf("refused requests changed the LU table:\n%+v\n%+v", before, after)
	}
}

// TestRequestIdempotent: a second request for the same VM, size and kind
// creates nothing and returns the same space; another size conflicts.
func TestRequestIdempotent(t *testing.T) {
	ctx := context.Background()
	lus := newMemLUs("n1", "n2", "n3")
	s := newService(t, lus)
	first, err := s.Request(ctx, Request{VM: "vm1", SizeBytes: 8 << 20, Host: "n2"})
	if err != nil {
		t.Fatal(err)
	}
	if first.Existed || first.Copies != DefaultCopies || first.Host != "n2" || first.Kind != KindMemory || len(first.Notes) != 0 {
		t.Fatalf("first request: %+v", first)
	}
	if first.Attach.URI != "nbd://10.0.0.2:10809/paging-vm1" || first.Attach.Socket != "/run/lupool/paging-vm1.sock" ||
		first.Attach.NBDClient != "nbd-client -N paging-vm1 -b 4096 -swap -timeout 0 10.0.0.2 10809 /dev/nbd0" ||
		first.Attach.Lupool != "lupool --api 10.0.0.2:10810 attach paging-vm1 --listen unix:/run/lupool/paging-vm1.sock" {
		t.Fatalf("attach lines for n2: %+v", first.Attach)
	}
	again, err := s.Request(ctx, Request{VM: "vm1", SizeBytes: 8 << 20, Host: "n1", Copies: 3})
	if err != nil {
		t.Fatal(err)
	}
	if !again.Existed || again.LU != first.LU || again.Host != "n2" || lus.creates != 1 || len(again.Notes) != 3 {
		t.Fatalf("second request: %+v (creates %d)", again, lus.creates)
	}
	if _, err := s.Request(ctx, Request{VM: "vm1", SizeBytes: 16 << 20, Host: "n2"}); !errors.Is(err, ErrExists) {
		t.Fatalf("another size: %v, want ErrExists", err)
	}
	if _, err := s.Request(ctx, Request{VM: "vm1", SizeBytes: 8 << 20, Kind: KindFile}); !errors.Is(err, ErrExists) {
		t.Fatalf("another kind: %v, want ErrExists", err)
	}
	list, err := s.List(ctx)
	if err != nil || len(list) != 1 || list[0].VM != "vm1" {
		t.Fatalf("list: %+v %v", list, err)
	}
}

// TestDefaultCopiesOneNode: on one node the default is one copy, and the
// answer says so.
func TestDefaultCopiesOneNode(t *testing.T) {
	s := newService(t, newMemLUs("solo"))
	sp, err := s.Request(context.Background(), Request{VM: "vm1", SizeBytes: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if sp.Copies != 1 || len(sp.Notes) != 1 || !strings.Contains(sp.Notes[0], "one copy only") {
		t.Fatalf("%+v", sp)
	}
}

// TestReleaseRefusedWhileAttached: release is refused with ErrBusy while
// a client is attached, forced release frees it, and a VM without paging
// space cannot be released twice.
func TestReleaseRefusedWhileAttached(t *testing.T) {
	ctx := context.Background()
	lus := newMemLUs("n1", "n2")
	var notices []Notice
	s, err := New(Options{LUs: lus, NodeID: "n1", Notify: func(n Notice) { notices = append(notices, n) }})
	if err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if _, err := s.Request(ctx, Request{VM: "vm1", SizeBytes: 1 << 20}); err != nil {
			t.Fatal(err)
		}
	}
	lus.clients["paging-vm1"] = 1
	err = s.Release(ctx, "vm1", false)
	if !errors.Is(err, ErrBusy) || !strings.Contains(err.Error(), "1 on n1") {
		t.Fatalf("release while attached: %v", err)
	}
	if sp, err := s.Show(ctx, "vm1"); err != nil || sp.Clients != 1 {
		t.Fatalf("show: %+v %v", sp, err)
	}
	if err := s.Release(ctx, "vm1", true); err != nil {
		t.Fatal(err)
	}
	if err := s.Release(ctx, "vm1", true); !errors.Is(err, ErrNotFound) {
		t.Fatalf("second release: %v", err)
	}
	want := []Notice{{Kind: NoticeRequested, VM: "vm1", LU: "paging-vm1", SizeBytes: 1 << 20},
		{Kind: NoticeReleased, VM: "vm1", LU: "paging-vm1", SizeBytes: 1 << 20}}
	if !reflect.DeepEqual(notices, want) {
		t.Fatalf("notices %+v, want %+v", notices, want)
	}
}

// TestMigrateWithoutMover: until the planned writer move is wired,
// Migrate says it is not built in and changes nothing.
func TestMigrateWithoutMover(t *testing.T) {
	ctx := context.Background()
	lus := newMemLUs("n1", "n2")
	s := newService(t, lus)
	if _, err := s.Request(ctx, Request{VM: "vm1", SizeBytes: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Migrate(ctx, "vm1", "n2"); !errors.Is(err, ErrUnsupported) {
		t.Fatalf("migrate: %v", err)
	}
	if lu, _ := lus.Get(ctx, "paging-vm1"); lu.Writer != "n1" {
		t.Fatalf("writer %s", lu.Writer)
	}
}
