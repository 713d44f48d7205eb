package main

// End-to-end tests of the fixes the second security review of issue 10
// led to: the CA key stays on the node that created the cluster, raft is
// reachable only by members with the certificate their record is bound
// to, a node with a certificate never starts a new cluster, --join never
// sends the token in the clear beyond loopback, and the API caps its
// connections and closes idle ones. Helpers come from e2e_helpers_test.go
// and security_e2e_test.go.
//
// TestSecurity2CAKeyAndRaftMembers and TestSecurity2APIConnectionCap run
// in parallel: the cap test spends a minute waiting for the API's idle
// timeout, the cluster test does its work meanwhile.

import (
	"bufio"
	"bytes"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-msgpack/v2/codec"
	"github.com/hashicorp/raft"

	"github.com/lupool/lupool/cluster/pki"
	"github.com/lupool/lupool/server/api"
)

// TestSecurity2CAKeyAndRaftMembers runs on three nodes where n3 joins
// through n2 (a node without the CA key):
//
//  1. the join works, is signed on n1, only n1 holds DATA/pki/ca.key
//     (0600), and no join answer carries a private key;
//  2. a certificate POST /v1/join issued for "mallory" (never registered)
//     does not reach raft on a follower or the leader (closed without a
//     reply, lupool_peer_connections_total{outcome="raft_refused"} rises,
//     term, leader and members unchanged) and gets 403 on the peer port's
//     HTTP side, while a member's own certificate reaches raft;
//  3. every node's record carries the fingerprint of its DATA/pki/node.crt,
//     and a second certificate for n2 signed by the real CA (what two
//     racing joins would get) is refused on the peer port and cannot
//     rebind n2's record.
//
// Without the fixes it prints, in order: "n2 holds DATA/pki/ca.key" /
// "the join answer through n2 has a field holding a private key
// (ca_key_pem)"; "mallory's AppendEntries at term T to n2's peer port was
// answered"; "raft_refused on n2 rose by 0" and "n2's term jumped"; "node
// n2: cert_sha256 "" in node list" or "a second certificate for n2 ...
// answered 200".
func TestSecurity2CAKeyAndRaftMembers(t *testing.T) {
	t.Parallel()
	start := time.Now()
	n1 := newDaemon(t, "n1")
	n1.start()
	n2 := newJoiner(t, "n2", n1)
	n2.start()
	n3 := newJoiner(t, "n3", n2) // --join n2.api: n2 has no CA key, n1 signs
	n3.start()
	t.Logf("n1, n2 and n3 (joined through n2) ready in %v", time.Since(start).Round(time.Millisecond))
	nodes := []*daemon{n1, n2, n3}

	began := time.Now()
	mallory := caKeyStaysOnN1(t, n1, n2, n3)
	t.Logf("1. CA key only on n1, join answers without keys: checked in %v", time.Since(began).Round(time.Millisecond))

	began = time.Now()
	raftOnlyFromMembers(t, nodes, mallory)
	t.Logf("2. raft only from members: checked in %v", time.Since(began).Round(time.Millisecond))

	began = time.Now()
	recordsBoundToCertificates(t, nodes)
	t.Logf("3. records bound to certificates: checked in %v", time.Since(began).Round(time.Millisecond))
}

// caKeyStaysOnN1 checks fix 1 and returns the directory of a certificate
// and key for "mallory" that POST /v1/join (through n2) issued.
func caKeyStaysOnN1(t *testing.T, n1, n2, n3 *daemon) (malloryDir string) {
	fi, err := os.Stat(filepath.Join(n1.certDir(), pki.CAKeyFile))
	if err != nil {
		t.Errorf("n1, which created the cluster, has no DATA/pki/ca.key: %v", err)
	} else if fi.Mode().Perm() != 0o600 {
		t.Errorf("n1's DATA/pki/ca.key has mode %v, want 0600", fi.Mode().Perm())
	}
	for _, d := range []*daemon{n2, n3} {
		if _, err := os.Stat(filepath.Join(d.certDir(), pki.CAKeyFile)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s holds DATA/pki/ca.key (stat: %v); want it only on n1, which created the cluster", d.id, err)
		}
		if _, err := os.Stat(filepath.Join(d.certDir(), pki.CACertFile)); err != nil {
			t.Errorf("%s has no DATA/pki/ca.crt: %v", d.id, err)
		}
	}
	// n3's certificate was signed on n1, not on n2 it joined through.
	if !logHasLine(n1.logs(), "issued a node certificate to a joining node", "node=n3") {
		t.Errorf("n1's log has no \"issued a node certificate to a joining node\" for n3; n3 joined through n2 and only n1 can sign")
	}
	if strings.Contains(n2.logs(), "issued a node certificate") {
		t.Errorf("n2 (no CA key) logged that it issued a node certificate")
	}
	if got := nodeSummary(t, n1); !strings.Contains(got, "n3 ") {
		t.Errorf("n3 joined through n2 but is not in the node list: %s", got)
	}

	caPEM, err := os.ReadFile(filepath.Join(n1.certDir(), pki.CACertFile))
	if err != nil {
		t.Fatal(err)
	}
	ca, err := pki.ParseCA(caPEM, nil)
	if err != nil {
		t.Fatal(err)
	}
	// Raw joins for the never-registered id "mallory": through n2 and n3
	// (forwarded to n1) and on n1 itself, each with a fresh key and token.
	for _, via := range []*daemon{n2, n3, n1} {
		key, keyPEM, err := pki.NewKey()
		if err != nil {
			t.Fatal(err)
		}
		pub, err := pki.PublicKeyPEM(key)
		if err != nil {
			t.Fatal(err)
		}
		tok, _ := joinTokenOf(t, via, 0)
		body, _ := json.Marshal(api.JoinRequest{Token: tok, ID: "mallory", PublicKeyPEM: string(pub), Hosts: []string{"127.0.0.1"}})
		r := rawHTTP(t, nil, "POST", "http://"+via.api+"/v1/join", string(body), "")
		if r.status != http.StatusOK {
			t.Fatalf("POST /v1/join for mallory through %s: %d %s; want 200 with a certificate", via.id, r.status, r.body)
		}
		var doc any
		if err := json.Unmarshal([]byte(r.body), &doc); err != nil {
			t.Fatalf("POST /v1/join through %s: %v: %s", via.id, err, r.body)
		}
		for _, bad := range keyFields(doc, "") {
			t.Errorf("the join answer through %s has a field holding a private key (%s): %s", via.id, bad, r.body)
		}
		var jr api.JoinResponse
		if err := json.Unmarshal([]byte(r.body), &jr); err != nil {
			t.Fatal(err)
		}
		if jr.CACertPEM != string(caPEM) {
			t.Errorf("the join answer through %s carries a CA certificate that is not n1's DATA/pki/ca.crt", via.id)
		}
		cert := parseCertPEM(t, []byte(jr.NodeCertPEM))
		if id, err := pki.VerifyNode(ca.Pool(), cert, "mallory"); err != nil || id != "mallory" {
			t.Errorf("the certificate the join through %s issued: %q %v; want one for mallory from the cluster CA", via.id, id, err)
		}
		if !samePublicKey(t, cert.PublicKey, key.Public()) {
			t.Errorf("the certificate the join through %s issued is not for the key the joiner sent", via.id)
		}
		if via == n2 {
			malloryDir = writeCertDir(t, []byte(jr.NodeCertPEM), keyPEM)
			t.Logf("join answer through n2: fields %v, %d members", sortedKeys(doc), len(jr.Members))
		}
	}
	if got := nodeSummary(t, n1); strings.Contains(got, "mallory") {
		t.Errorf("mallory got a certificate and is in the node list without registering: %s", got)
	}
	return malloryDir
}

// keyFields lists the paths in a JSON document whose value holds a PEM
// private key, or whose name says it is a key.
func keyFields(v any, path string) []string {
	var out []string
	switch x := v.(type) {
	case map[string]any:
		for k, e := range x {
			p := path + "." + k
			if strings.Contains(strings.ToLower(k), "key") {
				out = append(out, p)
			}
			out = append(out, keyFields(e, p)...)
		}
	case []any:
		for i, e := range x {
			out = append(out, keyFields(e, fmt.Sprintf("%s[%d]", path, i))...)
		}
	case string:
		if strings.Contains(x, "PRIVATE KEY") {
			out = append(out, path)
		}
	}
	return out
}

func sortedKeys(v any) []string {
	m, _ := v.(map[string]any)
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

func parseCertPEM(t *testing.T, b []byte) *x509.Certificate {
	t.Helper()
	block, _ := pem.Decode(b)
	if block == nil || block.Type != "CERTIFICATE" {
		t.Fatalf("not a PEM certificate: %q", b)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

func samePublicKey(t *testing.T, a, b crypto.PublicKey) bool {
	t.Helper()
	da, err := x509.MarshalPKIXPublicKey(a)
	if err != nil {
		t.Fatal(err)
	}
	db, err := x509.MarshalPKIXPublicKey(b)
	if err != nil {
		t.Fatal(err)
	}
	return bytes.Equal(da, db)
}

// logHasLine reports whether one line of logs contains every part.
func logHasLine(logs string, parts ...string) bool {
	for _, line := range strings.Split(logs, "\n") {
		ok := true
		for _, p := range parts {
			if !strings.Contains(line, p) {
				ok = false
				break
			}
		}
		if ok {
			return true
		}
	}
	return false
}

// raftProbe is what a hand-made raft AppendEntries on a peer port got.
type raftProbe struct {
	replyBytes int                        // bytes read back before the connection ended
	answered   bool                       // a whole AppendEntries response was decoded
	rpcErr     string                     // the error string raft sent with it
	resp       raft.AppendEntriesResponse // valid if answered
	end        error                      // how reading ended (nil if answered)
}

// countingReader counts the bytes read through it.
type countingReader struct {
	r io.Reader
	n int
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}

// sendAppendEntries dials to's peer port with the certificate in certDir
// and sends what raft's network transport sends: the rpc type byte 0x00
// (AppendEntries) and a msgpack AppendEntriesRequest from leaderID at
// term with no entries (a heartbeat; term 0: a stale one any raft answers
// without a change). An error means the TLS handshake failed.
func sendAppendEntries(t *testing.T, to *daemon, certDir string, leaderID, leaderAddr string, term uint64) (raftProbe, error) {
	t.Helper()
	dialer := net.Dialer{Timeout: 5 * time.Second}
	conn, err := tls.DialWithDialer(&dialer, "tcp", to.peer, peerTLS(t, certDir))
	if err != nil {
		return raftProbe{}, err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	req := raft.AppendEntriesRequest{
		RPCHeader: raft.RPCHeader{ProtocolVersion: raft.ProtocolVersionMax, ID: []byte(leaderID), Addr: []byte(leaderAddr)},
		Term:      term,
		Leader:    []byte(leaderAddr),
	}
	var msg bytes.Buffer
	msg.WriteByte(0x00) // rpcAppendEntries
	if err := codec.NewEncoder(&msg, &codec.MsgpackHandle{}).Encode(&req); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Write(msg.Bytes()); err != nil {
		// The server may close before we write: that is a refusal too.
		return raftProbe{end: err}, nil
	}
	cr := &countingReader{r: conn}
	dec := codec.NewDecoder(bufio.NewReader(cr), &codec.MsgpackHandle{})
	var p raftProbe
	if err := dec.Decode(&p.rpcErr); err != nil {
		p.replyBytes, p.end = cr.n, err
		return p, nil
	}
	if err := dec.Decode(&p.resp); err != nil {
		p.replyBytes, p.end = cr.n, err
		return p, nil
	}
	p.replyBytes, p.answered = cr.n, true
	return p, nil
}

// raftRefused is lupool_peer_connections_total{outcome="raft_refused"} on d.
func raftRefused(t *testing.T, d *daemon) float64 {
	t.Helper()
	v := metricValue(d.metrics(), "lupool_peer_connections_total", `outcome="raft_refused"`)
	if v < 0 {
		t.Fatalf("%s's /metrics has no lupool_peer_connections_total{outcome=\"raft_refused\"}", d.id)
	}
	return v
}

func raftTerm(t *testing.T, d *daemon) uint64 {
	t.Helper()
	v := metricValue(d.metrics(), "lupool_raft_term")
	if v < 0 {
		t.Fatalf("%s's /metrics has no lupool_raft_term", d.id)
	}
	return uint64(v)
}

// clusterState is what the attacks must leave as it was: who leads, every
// node's term, the members.
func clusterState(t *testing.T, nodes []*daemon) string {
	t.Helper()
	var terms []string
	for _, d := range nodes {
		terms = append(terms, fmt.Sprintf("%s term %d", d.id, raftTerm(t, d)))
	}
	return fmt.Sprintf("leader %s; %s; members %s", leaderOf(t, nodes...).id, strings.Join(terms, ", "), nodeSummary(t, nodes[0]))
}

// raftOnlyFromMembers checks fix 2 with mallory's certificate.
func raftOnlyFromMembers(t *testing.T, nodes []*daemon, malloryDir string) {
	leader := leaderOf(t, nodes...)
	var followers []*daemon
	for _, d := range nodes {
		if d != leader {
			followers = append(followers, d)
		}
	}
	// Normal traffic is never refused: on a healthy cluster (n3 just
	// joined, heartbeats flow) every node counts 0, and still 0 a moment
	// later.
	for round := range 2 {
		for _, d := range nodes {
			if v := raftRefused(t, d); v != 0 {
				t.Errorf("round %d: %s counts %v raft connections refused on a healthy cluster before any attack; want 0 (a member was refused?)", round, d.id, v)
			}
		}
		if round == 0 {
			time.Sleep(time.Second)
		}
	}
	before := clusterState(t, nodes)

	// A member's own certificate reaches raft: n1's (and the leader's, if
	// another) stale heartbeat to a follower is answered with the
	// follower's term and changes nothing.
	for _, as := range []*daemon{nodes[0], leader} {
		to := followers[0]
		if to == as {
			to = followers[1]
		}
		p, err := sendAppendEntries(t, to, as.certDir(), as.id, as.peer, 0)
		if err != nil {
			t.Fatalf("%s's own certificate to %s's peer port: %v", as.id, to.id, err)
		}
		if !p.answered || p.resp.Term != raftTerm(t, to) || p.resp.Success {
			t.Errorf("a stale AppendEntries with %s's own certificate to %s: answered %v (%d bytes, %v) term %d success %v; want raft's answer with %s's term %d, not a success",
				as.id, to.id, p.answered, p.replyBytes, p.end, p.resp.Term, p.resp.Success, to.id, raftTerm(t, to))
		}
		if v := raftRefused(t, to); v != 0 {
			t.Errorf("%s's own certificate to %s: raft_refused is %v, want 0", as.id, to.id, v)
		}
	}

	// mallory: a certificate of the CA, never a member. A heartbeat at a
	// term far ahead would make any raft that reads it take that term and
	// mallory as leader (the leader would step down on the answer).
	const attempts = 2
	term := raftTerm(t, leader) + 1000
	for _, to := range append(followers, leader) {
		refusedBefore := raftRefused(t, to)
		for attempt := range attempts {
			p, err := sendAppendEntries(t, to, malloryDir, "mallory", "127.0.0.1:1", term)
			if err != nil {
				t.Errorf("attempt %d: mallory's TLS handshake with %s's peer port failed (%v); want it accepted (the certificate is the CA's) and raft refused after the first byte", attempt, to.id, err)
				continue
			}
			if p.replyBytes != 0 || p.answered {
				t.Errorf("attempt %d: mallory's AppendEntries at term %d to %s's peer port was answered (%d bytes, term %d success %v err %q); want the connection closed without a reply",
					attempt, term, to.id, p.replyBytes, p.resp.Term, p.resp.Success, p.rpcErr)
			} else if attempt == 0 {
				t.Logf("mallory's AppendEntries to %s (%s): closed without a reply (%v)", to.id, map[bool]string{true: "leader", false: "follower"}[to == leader], p.end)
			}
		}
		if got := raftRefused(t, to); got-refusedBefore < attempts {
			t.Errorf("raft_refused on %s rose by %v after %d raft connections with mallory's certificate; want it to count each", to.id, got-refusedBefore, attempts)
		}
		// The HTTP side of the peer port: a certificate of a non-member.
		r := rawHTTP(t, peerClient(t, malloryDir), "GET", "https://"+to.peer+"/v1/lus", "", "")
		if r.status != http.StatusForbidden || !strings.Contains(r.errorText(), "not a member") {
			t.Errorf("GET /v1/lus on %s's peer port with mallory's certificate: %d %s; want 403 saying mallory is not a member", to.id, r.status, r.body)
		}
		if r := rawHTTP(t, peerClient(t, nodes[0].certDir()), "GET", "https://"+to.peer+"/v1/lus", "", ""); r.status != http.StatusOK {
			t.Errorf("GET /v1/lus on %s's peer port with n1's own certificate: %d %s; want 200", to.id, r.status, r.body)
		}
	}
	time.Sleep(500 * time.Millisecond) // a term change would show by now
	if after := clusterState(t, nodes); after != before {
		t.Errorf("after mallory's raft attempts the cluster changed: %s; was %s", after, before)
	}
}

// recordsBoundToCertificates checks fix 3: cert_sha256 in node list, and
// a second certificate for n2 from the real CA is nobody.
func recordsBoundToCertificates(t *testing.T, nodes []*daemon) {
	n1, n2, n3 := nodes[0], nodes[1], nodes[2]
	listed := func() map[string]string {
		t.Helper()
		var list []api.Node
		if err := json.Unmarshal([]byte(n3.mustCLI("node", "list", "-o", "json")), &list); err != nil {
			t.Fatal(err)
		}
		out := map[string]string{}
		for _, n := range list {
			out[n.ID] = n.CertSHA256
		}
		return out
	}
	bound := listed()
	seen := map[string]string{}
	for _, d := range nodes {
		b, err := os.ReadFile(filepath.Join(d.certDir(), pki.NodeCertFile))
		if err != nil {
			t.Fatal(err)
		}
		want := pki.Fingerprint(parseCertPEM(t, b).Raw)
		if got := bound[d.id]; got != want {
			t.Errorf("node %s: cert_sha256 %q in lupool node list -o json; want %s, the fingerprint of its DATA/pki/node.crt", d.id, got, want)
		}
		if other, dup := seen[want]; dup {
			t.Errorf("%s and %s have the same certificate", other, d.id)
		}
		seen[want] = d.id
	}
	if len(bound) != len(nodes) {
		t.Errorf("node list has %d nodes (%v), want %d", len(bound), bound, len(nodes))
	}

	// A second certificate for n2, signed with n1's CA key: what two
	// racing joins for the same id would get. POST /v1/join itself refuses
	// an id that is a member (TestSecurityAttacksRefused), so the test
	// signs it from DATA/pki/ca.key.
	ca, err := pki.LoadCA(n1.certDir())
	if err != nil {
		t.Fatal(err)
	}
	key, keyPEM, err := pki.NewKey()
	if err != nil {
		t.Fatal(err)
	}
	certPEM, err := ca.IssueNode("n2", key.Public(), []string{"127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	twin := writeCertDir(t, certPEM, keyPEM)
	before := clusterState(t, nodes)
	leader := leaderOf(t, nodes...)
	for _, to := range []*daemon{n1, n3} {
		refusedBefore := raftRefused(t, to)
		p, err := sendAppendEntries(t, to, twin, "n2", n2.peer, raftTerm(t, to)+1000)
		if err != nil {
			t.Errorf("the second n2 certificate's TLS handshake with %s: %v; want it accepted and raft refused", to.id, err)
		} else if p.replyBytes != 0 {
			t.Errorf("a second certificate for n2 reached raft on %s (%d bytes back, term %d); want the connection closed: n2's record is bound to its own certificate",
				to.id, p.replyBytes, p.resp.Term)
		}
		if got := raftRefused(t, to); got-refusedBefore < 1 {
			t.Errorf("raft_refused on %s rose by %v after raft with the second n2 certificate; want 1", to.id, got-refusedBefore)
		}
		r := rawHTTP(t, peerClient(t, twin), "GET", "https://"+to.peer+"/v1/lus", "", "")
		if r.status == http.StatusOK {
			t.Errorf("GET /v1/lus on %s's peer port with a second certificate for n2 answered 200 %s; want it refused (not the certificate n2's record is bound to)", to.id, r.body)
		} else {
			t.Logf("GET /v1/lus on %s's peer port with a second certificate for n2: %d %s", to.id, r.status, r.errorText())
		}
		if r := rawHTTP(t, peerClient(t, n2.certDir()), "GET", "https://"+to.peer+"/v1/lus", "", ""); r.status != http.StatusOK {
			t.Errorf("GET /v1/lus on %s's peer port with n2's own certificate: %d %s; want 200", to.id, r.status, r.body)
		}
	}
	// Rebinding: register n2's addresses with the second certificate on
	// the leader's peer port (what a re-registering member sends).
	body, _ := json.Marshal(api.RegisterNodeRequest{PeerAddr: n2.peer, APIAddr: "10.6.6.6:10810", NBDAddr: "10.6.6.6:10809"})
	r := rawHTTP(t, peerClient(t, twin), "POST", "https://"+leader.peer+"/v1/internal/nodes", string(body), "")
	if r.status/100 == 2 {
		t.Errorf("POST /v1/internal/nodes on the leader %s with a second certificate for n2: %d %s; want it refused", leader.id, r.status, r.body)
	} else {
		t.Logf("re-register n2 with a second certificate: %d %s", r.status, r.errorText())
	}
	if after := listed(); after["n2"] != bound["n2"] {
		t.Errorf("n2's record is bound to %s after the second certificate, was %s", after["n2"], bound["n2"])
	}
	if after := clusterState(t, nodes); after != before {
		t.Errorf("after the second n2 certificate the cluster changed: %s; was %s", after, before)
	}
}

// TestSecurity2CertifiedNodeNeverBootstraps: the node that created a
// cluster (it holds the CA key and an LU) loses DATA/cluster-id and
// DATA/meta: it refuses to start, says how to recover, never reports
// ready and never bootstraps; with the two put back it starts as before.
// Without the fix it prints "lupool serve ... still running after 20s
// (killed)" and "exit -1, ready true", or "its log says it bootstrapped a
// one-member cluster".
func TestSecurity2CertifiedNodeNeverBootstraps(t *testing.T) {
	alongside(t)
	d := newDaemon(t, "solo")
	d.start()
	d.mustCLI("lu", "create", "keep", "--size", "4M")
	if !strings.Contains(d.logs(), "bootstrapped a one-member cluster") {
		t.Fatalf("the first start did not log \"bootstrapped a one-member cluster\"; the check below would mean nothing")
	}
	idBefore, err := os.ReadFile(filepath.Join(d.data, clusterIDName))
	if err != nil {
		t.Fatal(err)
	}
	d.stop(syscall.SIGTERM)
	if _, err := os.Stat(filepath.Join(d.certDir(), pki.CAKeyFile)); err != nil {
		t.Fatalf("the first node has no CA key: %v", err)
	}
	backup := t.TempDir()
	for _, name := range []string{"meta", clusterIDName} {
		if err := os.Rename(filepath.Join(d.data, name), filepath.Join(backup, name)); err != nil {
			t.Fatal(err)
		}
	}
	args := []string{"--data", d.data, "--nbd", d.nbd, "--api", d.api, "--peer", d.peer, "--node-id", d.id}
	for attempt := range 2 {
		began := time.Now()
		out, code, ready := serveExpectFail(t, 20*time.Second, d.api, args...)
		took := time.Since(began)
		if code <= 0 || ready || took > 10*time.Second {
			t.Errorf("attempt %d: the first node without DATA/cluster-id and DATA/meta: exit %d after %v, ready %v; want a non-zero exit within 10s, never ready:\n%s",
				attempt, code, took.Round(time.Millisecond), ready, out)
		} else if attempt == 0 {
			t.Logf("no DATA/cluster-id, no DATA/meta: exit %d after %v: %s", code, took.Round(time.Millisecond), lastLine(out))
		}
		for _, want := range []string{"metadata", "will not start a new cluster", "Restore DATA/meta", "--join"} {
			if !strings.Contains(out, want) {
				t.Errorf("attempt %d: the refusal does not say %q:\n%s", attempt, want, out)
			}
		}
		if strings.Contains(out, "bootstrapped a one-member cluster") {
			t.Errorf("attempt %d: its log says it bootstrapped a one-member cluster:\n%s", attempt, out)
		}
		if _, err := os.Stat(filepath.Join(d.data, clusterIDName)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("attempt %d: the refused start wrote DATA/cluster-id (stat: %v)", attempt, err)
		}
	}
	// The recovery the message names: restore DATA/meta from a backup
	// (DATA/cluster-id stays lost: the certificate says the node is a
	// member). It starts as the same cluster with its LU.
	if err := os.RemoveAll(filepath.Join(d.data, "meta")); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(backup, "meta"), filepath.Join(d.data, "meta")); err != nil {
		t.Fatal(err)
	}
	d.start()
	if lus := d.listLUs(); len(lus) != 1 || lus[0].Name != "keep" {
		t.Errorf("after restoring DATA/meta: LUs %+v, want keep", lus)
	}
	if strings.Count(d.logs(), "bootstrapped a one-member cluster") != 1 {
		t.Errorf("the start after restoring DATA/meta bootstrapped a new cluster")
	}
	if idAfter, err := os.ReadFile(filepath.Join(d.data, clusterIDName)); err == nil && !bytes.Equal(idAfter, idBefore) {
		t.Errorf("after restoring DATA/meta: DATA/cluster-id %q, was %q", idAfter, idBefore)
	} else if err != nil {
		t.Logf("after restoring DATA/meta the node runs without DATA/cluster-id (%v): its certificate's cluster id stands in", err)
	}
}

// TestSecurity2JoinRefusesPlainHTTP: --join http://HOST:PORT to a host
// that is not loopback is refused before anything is sent: to the
// documentation address 192.0.2.1, and to a listener of the test on this
// machine's own non-loopback address, which sees no connection. The same
// listener given as HOST:PORT (https) does get a TLS ClientHello, not the
// token. Without the fix it prints "--join http://192.0.2.1:10810: exit
// -1 after 15s" (it retries the join for a minute) and "the listener
// accepted 1 connection(s)" with the token in the clear.
func TestSecurity2JoinRefusesPlainHTTP(t *testing.T) {
	alongside(t)
	fp := pki.Fingerprint([]byte("a CA that does not exist"))
	tok, err := pki.NewJoinToken(fp)
	if err != nil {
		t.Fatal(err)
	}
	token := tok.String()
	type target struct {
		join string
		l    net.Listener // nil: nothing of the test listens
	}
	targets := []target{{join: "http://192.0.2.1:10810"}}
	l := listenNonLoopback(t)
	if l != nil {
		targets = append(targets, target{join: "http://" + l.Addr().String(), l: l})
	} else {
		t.Logf("no non-loopback IPv4 address on this machine: only 192.0.2.1 is tried")
	}
	accepted := make(chan []byte, 16)
	if l != nil {
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
				b, _ := io.ReadAll(io.LimitReader(c, 4096))
				c.Close()
				accepted <- b
			}
		}()
	}
	for _, tg := range targets {
		data := t.TempDir()
		api := freePort(t)
		began := time.Now()
		out, code, ready := serveExpectFail(t, 15*time.Second, api, "--data", data, "--nbd", freePort(t), "--api", api,
			"--peer", freePort(t), "--node-id", "n5", "--join", tg.join, "--join-token", token)
		took := time.Since(began)
		if code <= 0 || ready || took > 5*time.Second || !strings.Contains(out, "in the clear") {
			t.Errorf("--join %s: exit %d after %v, ready %v; want a non-zero exit within 5s saying the token would cross the network in the clear:\n%s",
				tg.join, code, took.Round(time.Millisecond), ready, out)
		} else {
			t.Logf("--join %s: exit %d after %v: %s", tg.join, code, took.Round(time.Millisecond), lastLine(out))
		}
		if _, err := os.Stat(filepath.Join(data, "pki", pki.NodeCertFile)); err == nil {
			t.Errorf("--join %s: refused, yet DATA/pki/node.crt exists", tg.join)
		}
		if tg.l != nil {
			select {
			case b := <-accepted:
				t.Errorf("--join %s: the listener accepted a connection (%d bytes: %q); want nothing sent", tg.join, len(b), b)
			case <-time.After(200 * time.Millisecond):
			}
		}
	}
	if l == nil {
		return
	}
	// The control: HOST:PORT means https, so the same listener gets a TLS
	// ClientHello (first byte 0x16) and never the token's secret.
	api := freePort(t)
	cmd, out := startServe(t, "--data", t.TempDir(), "--nbd", freePort(t), "--api", api, "--peer", freePort(t),
		"--node-id", "n5", "--join", l.Addr().String(), "--join-token", token)
	select {
	case b := <-accepted:
		if len(b) == 0 || b[0] != 0x16 || bytes.Contains(b, []byte(tok.Secret)) {
			t.Errorf("--join %s (https): the first connection sent %d bytes starting %x (secret in it: %v); want a TLS handshake without the secret",
				l.Addr(), len(b), b[:min(len(b), 8)], bytes.Contains(b, []byte(tok.Secret)))
		} else {
			t.Logf("--join %s (https): the listener got a TLS ClientHello (%d bytes), no secret", l.Addr(), len(b))
		}
	case <-time.After(10 * time.Second):
		t.Errorf("--join %s (https): no connection reached the listener in 10s; the control shows nothing:\n%s", l.Addr(), out.String())
	}
	_ = cmd.Process.Kill()
}

// listenNonLoopback listens on a port of this machine's first non-loopback
// IPv4 address; nil if there is none.
func listenNonLoopback(t *testing.T) net.Listener {
	t.Helper()
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range addrs {
		ipn, ok := a.(*net.IPNet)
		if !ok || ipn.IP.IsLoopback() || ipn.IP.To4() == nil || ipn.IP.IsLinkLocalUnicast() {
			continue
		}
		l, err := net.Listen("tcp", net.JoinHostPort(ipn.IP.String(), "0"))
		if err != nil {
			continue
		}
		t.Cleanup(func() { l.Close() })
		return l
	}
	return nil
}

// startServe runs `lupool serve args...` in the background; the caller
// kills it (the cleanup does too).
func startServe(t *testing.T, args ...string) (*exec.Cmd, *syncBuffer) {
	t.Helper()
	cmd := exec.Command(lupoolBin, append([]string{"serve"}, args...)...)
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(done)
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-done
	})
	return cmd, out
}

// TestSecurity2APIConnectionCap: 300 keep-alive connections to one node's
// API, each sending GET /healthz and then idling. The API serves at most
// 256 at a time: about 256 are answered at once, the rest wait in the
// kernel's accept queue, and the daemon's open files grow by about 256,
// not 300. The idle ones are closed after a minute; the waiting ones are
// then served, and a `lupool lu list` started meanwhile answers within 70s
// (its HTTP timeout is 60s, so it is started 10s after the flood).
//
// This is the slow variant the brief offered (a minute of the API's idle
// timeout): the fd count alone shows the cap, not that idle connections
// are closed, and without the idle timeout the cap would lock the API for
// as long as the flood stays open. It runs in parallel with the cluster
// test. Without the cap it prints "300 of 300 answered at once" and "open
// files rose by ~300"; without the idle timeout "lupool lu list: exit 1
// after 60s" and "0 of 256 idle connections closed by the daemon".
func TestSecurity2APIConnectionCap(t *testing.T) {
	t.Parallel()
	const (
		flood   = 300
		capConn = 256 // apiConnsMax
	)
	d := newDaemon(t, "capped")
	d.start()
	http.DefaultClient.CloseIdleConnections() // start's probe keeps one otherwise
	pid := d.cmd.Process.Pid
	fdsBefore := openFDs(t, pid)

	type connState struct {
		answered, closed time.Time
		status           int
		err              error
	}
	var mu sync.Mutex
	states := make([]connState, flood)
	conns := make([]net.Conn, 0, flood)
	var wg sync.WaitGroup
	t.Cleanup(wg.Wait) // runs after the conns are closed (cleanups run last first)
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	floodStart := time.Now()
	for i := range flood {
		c, err := net.DialTimeout("tcp", d.api, 5*time.Second)
		if err != nil {
			t.Fatalf("connection %d to the API: %v", i, err)
		}
		conns = append(conns, c)
		if _, err := io.WriteString(c, "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n"); err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		_ = c.SetReadDeadline(time.Now().Add(3 * time.Minute))
		wg.Add(1)
		go func(i int, c net.Conn) {
			defer wg.Done()
			br := bufio.NewReader(c)
			resp, err := http.ReadResponse(br, nil)
			if err == nil {
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
			mu.Lock()
			states[i].answered, states[i].err = time.Now(), err
			if resp != nil {
				states[i].status = resp.StatusCode
			}
			mu.Unlock()
			if err != nil {
				return
			}
			_, err = br.ReadByte() // blocks until the daemon closes the idle connection
			mu.Lock()
			states[i].closed, states[i].err = time.Now(), err
			mu.Unlock()
		}(i, c)
	}
	floodAt := time.Now()
	time.Sleep(5 * time.Second)
	mu.Lock()
	var early []int
	for i, s := range states {
		if !s.answered.IsZero() && s.status == http.StatusOK {
			early = append(early, i)
		}
	}
	mu.Unlock()
	fdsFlood := openFDs(t, pid)
	t.Logf("%d connections in %v: %d answered at once; daemon's open files %d -> %d",
		flood, floodAt.Sub(floodStart).Round(time.Millisecond), len(early), fdsBefore, fdsFlood)
	if len(early) > capConn || len(early) < capConn-4 {
		t.Errorf("%d of %d keep-alive connections answered at once; want the API to serve at most %d at a time (and about that many)", len(early), flood, capConn)
	}
	if grew := fdsFlood - fdsBefore; grew > capConn+16 {
		t.Errorf("the daemon's open files rose by %d (%d -> %d) with %d connections open; want at most about %d (the API's cap)", grew, fdsBefore, fdsFlood, flood, capConn)
	}

	// A well-behaved call meanwhile: it waits for idle connections to go.
	// Started 10s after the flood, so that its own 60s HTTP timeout ends
	// well after the idle ones (answered at the flood) are closed.
	time.Sleep(time.Until(floodAt.Add(10 * time.Second)))
	began := time.Now()
	out, errOut, code := d.cli("lu", "list")
	took := time.Since(began)
	if code != 0 || took > 70*time.Second {
		t.Errorf("lupool lu list with %d idle connections open: exit %d after %v: %s%s; want an answer within 70s (idle connections are closed after a minute)",
			flood, code, took.Round(time.Millisecond), out, errOut)
	} else {
		t.Logf("lupool lu list with the flood open: answered after %v", took.Round(time.Millisecond))
	}

	// Every connection served at once is closed by the daemon about a
	// minute after its answer, and the ones that waited are served.
	deadline := floodAt.Add(80 * time.Second)
	for {
		mu.Lock()
		closed, lateServed := 0, 0
		minIdle, maxIdle := time.Duration(1<<62), time.Duration(0)
		inEarly := map[int]bool{}
		for _, i := range early {
			inEarly[i] = true
			if s := states[i]; !s.closed.IsZero() {
				closed++
				idle := s.closed.Sub(s.answered)
				minIdle, maxIdle = min(minIdle, idle), max(maxIdle, idle)
			}
		}
		for i, s := range states {
			if !inEarly[i] && s.status == http.StatusOK {
				lateServed++
			}
		}
		mu.Unlock()
		if closed == len(early) && lateServed == flood-len(early) || time.Now().After(deadline) {
			if closed != len(early) {
				t.Errorf("%d of %d idle keep-alive connections closed by the daemon %v after the flood; want all (the API's idle timeout is %v)",
					closed, len(early), time.Since(floodAt).Round(time.Second), apiIdleTimeout)
			}
			if lateServed != flood-len(early) {
				t.Errorf("%d of the %d connections that waited were served %v after the flood; want all, once idle ones were closed",
					lateServed, flood-len(early), time.Since(floodAt).Round(time.Second))
			}
			if closed > 0 {
				t.Logf("idle connections closed by the daemon %v to %v after their answer; the %d that waited served %v after the flood",
					minIdle.Round(time.Millisecond), maxIdle.Round(time.Millisecond), lateServed, time.Since(floodAt).Round(time.Second))
				if minIdle < apiIdleTimeout-5*time.Second || maxIdle > apiIdleTimeout+20*time.Second {
					t.Errorf("idle connections closed %v to %v after their last answer; want about %v (IdleTimeout)", minIdle, maxIdle, apiIdleTimeout)
				}
			}
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// openFDs counts the open file descriptors of process pid.
func openFDs(t *testing.T, pid int) int {
	t.Helper()
	entries, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatalf("open files of the daemon: %v", err)
	}
	return len(entries)
}
