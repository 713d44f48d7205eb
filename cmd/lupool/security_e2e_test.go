package main

// End-to-end tests of issue 10 ("Trust nothing on the network"): every
// attack of the audit, repeated against the real binary, is refused and
// changes nothing. The state machine's own refusal of illegal copy changes
// in Apply (a leader that proposed one anyway) is unit-tested in package
// cluster (TestApplyRejectsIllegalCopies, TestRejectedCommands); here the
// proposals come over the network, where the leader's pre-check refuses
// them with the same rule functions.

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lupool/lupool/cluster/pki"
	"github.com/lupool/lupool/internal/realclient"
	"github.com/lupool/lupool/replication"
	"github.com/lupool/lupool/replication/replproto"
	"github.com/lupool/lupool/server/api"
)

// luSummary is what must not change when an attack is refused: epoch,
// writer, copy count and every copy's state.
func luSummary(l luDetail) string {
	var rs []string
	for _, r := range l.Replicas {
		rs = append(rs, r.Node+":"+r.State)
	}
	return fmt.Sprintf("epoch %d writer %s copies %d [%s]", l.Epoch, l.Writer, l.Copies, strings.Join(rs, " "))
}

// apiGet decodes the JSON answer of GET path on d's API (with the admin
// token) into v. The checks that run after every attack use the API, not
// the CLI: a CLI process costs about a second under -race.
func apiGet(t *testing.T, d *daemon, path string, v any) {
	t.Helper()
	resp := d.request("GET", path, "")
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s on %s: %s %s", path, d.id, resp.Status, b)
	}
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatalf("GET %s on %s: %v: %s", path, d.id, err, b)
	}
}

// luOf is GET /v1/lus/NAME on d (what lu show -o json prints).
func luOf(t *testing.T, d *daemon, name string) luDetail {
	t.Helper()
	var l luDetail
	apiGet(t, d, "/v1/lus/"+name, &l)
	return l
}

// verifyOf is POST /v1/lus/NAME/verify on d (what lu verify runs).
func verifyOf(t *testing.T, d *daemon, name string) verifyJSON {
	t.Helper()
	resp := d.request("POST", "/v1/lus/"+name+"/verify", "")
	defer resp.Body.Close()
	var v verifyJSON
	b, _ := io.ReadAll(resp.Body)
	if err := json.Unmarshal(b, &v); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("verify %s on %s: %s %v %s", name, d.id, resp.Status, err, b)
	}
	return v
}

// joinTokenOf makes a join token on d through the API (ttl 0: the
// default) and returns it and its id.
func joinTokenOf(t *testing.T, d *daemon, ttl time.Duration) (token, id string) {
	t.Helper()
	body, _ := json.Marshal(api.JoinTokenRequest{TTLSeconds: int64(ttl / time.Second)})
	resp := d.request("POST", "/v1/cluster/join-tokens", string(body))
	defer resp.Body.Close()
	var tok api.JoinTokenCreated
	b, _ := io.ReadAll(resp.Body)
	if err := json.Unmarshal(b, &tok); err != nil || resp.StatusCode != http.StatusCreated || tok.Token == "" {
		t.Fatalf("join token on %s: %s %v %s", d.id, resp.Status, err, b)
	}
	return tok.Token, tok.ID
}

// nodeSummary is the membership and every node's recorded addresses,
// without who leads.
func nodeSummary(t *testing.T, d *daemon) string {
	t.Helper()
	var nodes []api.Node
	apiGet(t, d, "/v1/nodes", &nodes)
	var out []string
	for _, n := range nodes {
		out = append(out, fmt.Sprintf("%s peer=%s api=%s nbd=%s voter=%v", n.ID, n.PeerAddr, n.APIAddr, n.NBDAddr, n.Voter))
	}
	sort.Strings(out)
	return strings.Join(out, "; ")
}

// leaderOf returns which of ds leads the metadata, as ds[0] sees it.
func leaderOf(t *testing.T, ds ...*daemon) *daemon {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		var nodes []api.Node
		apiGet(t, ds[0], "/v1/nodes", &nodes)
		for _, n := range nodes {
			if !n.Leader {
				continue
			}
			for _, d := range ds {
				if d.id == n.ID {
					return d
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no leader among the nodes after 30s: %s", nodeSummary(t, ds[0]))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// httpReply is a raw HTTP answer.
type httpReply struct {
	status int
	body   string
	header http.Header
}

// errorText is the "error" field of a JSON error body ("" if none).
func (r httpReply) errorText() string {
	var eb api.ErrorBody
	if err := json.Unmarshal([]byte(r.body), &eb); err != nil {
		return ""
	}
	return eb.Error
}

// rawHTTP sends a request like curl would: authorization is the whole
// Authorization header value ("" for none).
func rawHTTP(t *testing.T, client *http.Client, method, u, body, authorization string) httpReply {
	t.Helper()
	req, err := http.NewRequest(method, u, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if authorization != "" {
		req.Header.Set("Authorization", authorization)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	if client == nil {
		client = &http.Client{Timeout: 30 * time.Second}
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, u, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		t.Fatal(err)
	}
	return httpReply{status: resp.StatusCode, body: string(b), header: resp.Header}
}

// peerClient is an HTTPS client for peer ports presenting the node
// certificate in certDir.
func peerClient(t *testing.T, certDir string) *http.Client {
	t.Helper()
	return &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: peerTLS(t, certDir), Proxy: nil}}
}

// writeCertDir writes certPEM and keyPEM as node.crt and node.key in a new
// directory, the layout peerTLS and openStream load.
func writeCertDir(t *testing.T, certPEM, keyPEM []byte) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "node.crt"), certPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "node.key"), keyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	return dir
}

// foreignLupoolCert is a node certificate naming nodeID from another
// cluster's CA: a real lupool CA, not this cluster's.
func foreignLupoolCert(t *testing.T, nodeID string) string {
	t.Helper()
	ca, err := pki.NewCA("0123456789abcdef")
	if err != nil {
		t.Fatal(err)
	}
	key, keyPEM, err := pki.NewKey()
	if err != nil {
		t.Fatal(err)
	}
	certPEM, err := ca.IssueNode(nodeID, key.Public(), []string{"127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	return writeCertDir(t, certPEM, keyPEM)
}

// selfSignedCert is a self-signed certificate made with crypto/x509 that
// looks like a node certificate for nodeID (CN and URI SAN).
func selfSignedCert(t *testing.T, nodeID string) string {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(42),
		Subject:      pkix.Name{CommonName: nodeID},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
		URIs:         []*url.URL{{Scheme: "lupool", Host: "node", Path: "/" + nodeID}},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return writeCertDir(t, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}))
}

// forgedWrites sends n write frames of 4 KiB of 0xEE at epoch on s after
// its hello was refused, and returns how many got an OK reply (the
// connection is expected to be closed: errors end the loop).
func forgedWrites(s *rawStream, epoch uint64, n int) int {
	evil := bytes.Repeat([]byte{0xEE}, 4096)
	var frames []byte
	for i := range n {
		frames = replproto.AppendFrame(frames, replproto.Header{Type: replproto.TypeWrite, Handle: uint64(i + 1), Epoch: epoch,
			Offset: uint64(i) * 4096, Length: 4096}, evil)
	}
	frames = replproto.AppendFrame(frames, replproto.Header{Type: replproto.TypeFlush, Handle: uint64(n + 1), Epoch: epoch}, nil)
	_ = s.conn.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := s.conn.Write(frames); err != nil {
		return 0
	}
	ok := 0
	var hb [replproto.HeaderBytes]byte
	for {
		h, err := replproto.ReadHeader(s.br, &hb)
		if err != nil {
			return ok
		}
		_, _ = io.CopyN(io.Discard, s.br, int64(h.PayloadLen))
		if h.Status == replproto.StatusOK {
			ok++
		}
	}
}

// serveExpectFail runs `lupool serve args...` that must exit on its own
// within limit; it returns the combined output, the exit code and whether
// /readyz on api answered 200 meanwhile ("" api: not checked).
func serveExpectFail(t *testing.T, limit time.Duration, api string, args ...string) (string, int, bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	cmd := exec.CommandContext(ctx, lupoolBin, append([]string{"serve"}, args...)...)
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	ready := false
	for {
		select {
		case err := <-done:
			if ctx.Err() != nil {
				t.Errorf("lupool serve %s still running after %v (killed); want it to refuse and exit:\n%s", strings.Join(args, " "), limit, out.String())
				return out.String(), -1, ready
			}
			code := 0
			if ee, ok := err.(*exec.ExitError); ok {
				code = ee.ExitCode()
			} else if err != nil {
				t.Fatal(err)
			}
			return out.String(), code, ready
		case <-time.After(50 * time.Millisecond):
			if api != "" && !ready {
				if resp, err := http.Get("http://" + api + "/readyz"); err == nil {
					ready = resp.StatusCode == http.StatusOK
					resp.Body.Close()
				}
			}
		}
	}
}

// joinArgs are the arguments of a new node with a fresh data directory
// joining via with token.
func joinArgs(t *testing.T, id string, via *daemon, token string) (api string, args []string) {
	t.Helper()
	api = freePort(t)
	return api, []string{"--data", t.TempDir(), "--nbd", freePort(t), "--api", api, "--peer", freePort(t),
		"--node-id", id, "--join", via.api, "--join-token", token}
}

// pwriteRegions writes data through NBD at uri, len(data)/len(offsets)
// bytes at each offset, then flushes.
func pwriteRegions(t *testing.T, uri string, data []byte, offsets []int64) {
	t.Helper()
	file := filepath.Join(t.TempDir(), "data.raw")
	if err := os.WriteFile(file, data, 0o600); err != nil {
		t.Fatal(err)
	}
	var offs []string
	for _, o := range offsets {
		offs = append(offs, strconv.FormatInt(o, 10))
	}
	script := fmt.Sprintf(`
data = open(%q, "rb").read()
offs = [%s]
n = len(data) // len(offs)
for i, off in enumerate(offs):
    h.pwrite(data[i*n:(i+1)*n], off)
h.flush()
`, file, strings.Join(offs, ", "))
	if out, err := realclient.Nbdsh(t, uri, script).CombinedOutput(); err != nil {
		t.Fatalf("nbdsh write to %s: %v\n%s", uri, err, out)
	}
}

// TestSecurityAttacksRefused repeats the network attacks of the audit
// against three nodes on loopback: forged replication streams (without a
// node certificate, and from a member that is not the writer), the removed
// replicas endpoint, illegal copy-state proposals by members, requests
// without credentials, joins with bad tokens and with a member's id. Each
// is refused, and the LU's record, its copy's data and the membership are
// as before.
func TestSecurityAttacksRefused(t *testing.T) {
	alongside(t)
	needTools(t, "nbdcopy")
	realclient.NbdshPython(t)
	start := time.Now()
	n1, n2, n3 := cluster3(t)
	t.Logf("three nodes ready in %v", time.Since(start).Round(time.Millisecond))
	n1.mustCLI("lu", "create", "sec", "--size", "16M", "--copies", "2")
	img, _ := randomFile(t, 8<<20)
	runTool(t, "nbdcopy", img, n1.uri("sec"))
	before := n1.showLU("sec")
	if before.Writer != "n1" || before.state("n1") != "in-sync" || before.state("n2") != "in-sync" || before.state("n3") != "" {
		t.Fatalf("placement %s; want writer n1 with in-sync copies on n1 and n2", luSummary(before))
	}
	copySHA := volumeSHA(t, n2, "sec")
	if w := volumeSHA(t, n1, "sec"); w != copySHA {
		t.Fatalf("copies differ before any attack: n1 %s n2 %s", w, copySHA)
	}
	membersBefore := nodeSummary(t, n1)
	lusBefore := n1.listLUs()

	// unchanged checks what every refused attack must leave as it was.
	unchanged := func(after string, cliVerify bool) {
		t.Helper()
		if cliVerify {
			if v, code := n2.verify("sec"); code != 0 || !v.Equal || len(v.Copies) != 2 {
				t.Errorf("after %s: lupool lu verify exit %d %+v; want exit 0, two equal copies", after, code, v)
			}
		}
		for _, d := range []*daemon{n1, n2, n3} {
			if got := luSummary(luOf(t, d, "sec")); got != luSummary(before) {
				t.Errorf("after %s: lu show on %s says %s, was %s", after, d.id, got, luSummary(before))
			}
		}
		if got := volumeSHA(t, n2, "sec"); got != copySHA {
			t.Errorf("after %s: n2's copy changed (sha %s, was %s)", after, got, copySHA)
		}
		if v := verifyOf(t, n2, "sec"); !v.Equal || len(v.Copies) != 2 {
			t.Errorf("after %s: lu verify %+v; want two equal copies", after, v)
		}
		if got := nodeSummary(t, n1); got != membersBefore {
			t.Errorf("after %s: members %s, were %s", after, got, membersBefore)
		}
		var lus []luJSON
		apiGet(t, n1, "/v1/lus", &lus)
		if len(lus) != len(lusBefore) || lus[0].Name != "sec" {
			t.Errorf("after %s: LU table %+v, was %+v", after, lus, lusBefore)
		}
	}

	for _, section := range []struct {
		what      string
		run       func()
		cliVerify bool // also run `lupool lu verify` (a second under -race)
	}{
		{"streams without a node certificate", func() { forgedStreamsWithoutCertificate(t, n1, n2, before.Epoch) }, true},
		{"streams from members that are not the writer", func() { forgedStreamsFromMembers(t, n1, n2, n3, before.Epoch) }, true},
		{"POST /v1/lus/sec/replicas", func() { replicasEndpointGone(t, n1, n2, n3) }, false},
		{"illegal copy-change proposals", func() { illegalCopyChanges(t, []*daemon{n1, n2, n3}, "sec", before) }, false},
		{"requests without credentials", func() { noCredentials(t, n1, n2) }, false},
		{"joins with wrong tokens", func() { wrongJoinTokens(t, n1) }, false},
	} {
		began := time.Now()
		section.run()
		ran := time.Since(began)
		unchanged(section.what, section.cliVerify)
		t.Logf("%s: refused in %v, checked unchanged in %v", section.what, ran.Round(time.Millisecond), (time.Since(began) - ran).Round(time.Millisecond))
	}
	began := time.Now()
	joinHijack(t, n1, n2, n3)
	// The hijack section writes through n1 (to see that n2 still gets
	// the writes), so the copy's data changed on purpose: check the rest.
	if got := luSummary(n1.showLU("sec")); got != luSummary(before) {
		t.Errorf("after join hijacks and a write: %s, was %s", got, luSummary(before))
	}
	if got := nodeSummary(t, n1); got != membersBefore {
		t.Errorf("after join hijacks: members %s, were %s", got, membersBefore)
	}
	t.Logf("join hijacks: refused in %v", time.Since(began).Round(time.Millisecond))
	// The CLI's own verify and show, once at the end: exit 0, equal.
	if v, code := n3.verify("sec"); code != 0 || !v.Equal || len(v.Copies) != 2 {
		t.Errorf("lupool lu verify sec at the end: exit %d %+v; want exit 0, two equal copies", code, v)
	}
	t.Logf("all attacks refused in %v", time.Since(start).Round(time.Millisecond))
}

// forgedStreamsWithoutCertificate: no certificate, a certificate from
// another CA naming the writer, a self-signed one, plain TCP, and the
// stream path on the API port: no stream opens.
func forgedStreamsWithoutCertificate(t *testing.T, n1, n2 *daemon, epoch uint64) {
	hello := replproto.Hello{Role: replproto.RoleCopy, LU: "sec", Node: "n1"}
	for attempt := range 2 {
		for _, c := range []struct{ what, certDir string }{
			{"no client certificate", ""},
			{"a node certificate for n1 from another cluster's CA", foreignLupoolCert(t, "n1")},
			{"a self-signed certificate naming n1", selfSignedCert(t, "n1")},
		} {
			s, err := openStream(t, n2, c.certDir, hello, epoch)
			if err == nil {
				ok := forgedWrites(s, epoch, 4)
				s.conn.Close()
				t.Errorf("attempt %d: a stream to n2's peer port with %s opened (hello answered %v, %d forged writes acknowledged); want the TLS handshake refused",
					attempt, c.what, s.status, ok)
				continue
			}
			if attempt == 0 {
				t.Logf("stream with %s: %v", c.what, err)
			}
		}

		// Plain TCP: an HTTP upgrade, a hello and a write, no TLS.
		conn, err := net.DialTimeout("tcp", n2.peer, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		var msg []byte
		msg = fmt.Appendf(msg, "GET %s HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: %s\r\n\r\n", replication.StreamPath, replication.StreamUpgrade)
		msg = replproto.AppendFrame(msg, replproto.Header{Type: replproto.TypeHello, Epoch: epoch}, replproto.AppendHello(nil, hello))
		msg = replproto.AppendFrame(msg, replproto.Header{Type: replproto.TypeWrite, Handle: 1, Epoch: epoch, Length: 4096}, bytes.Repeat([]byte{0xEE}, 4096))
		_, _ = conn.Write(msg)
		_ = conn.SetReadDeadline(time.Now().Add(3 * time.Second))
		got, rerr := io.ReadAll(conn)
		conn.Close()
		if bytes.Contains(got, []byte("HTTP/")) || bytes.Contains(got, []byte("101")) || len(got) > 64 {
			t.Errorf("attempt %d: plain TCP to n2's peer port got %d bytes back %q; want nothing (a TLS alert at most)", attempt, len(got), got)
		}
		if attempt == 0 {
			t.Logf("plain TCP to the peer port: %d bytes back (%x), then %v", len(got), got, rerr)
		}

		// The stream path on the API port, with and without the admin
		// token: streams are for node certificates on the peer port.
		for _, auth := range []string{"", "Bearer " + n1.token()} {
			req, err := http.NewRequest("GET", "http://"+n2.api+replication.StreamPath, nil)
			if err != nil {
				t.Fatal(err)
			}
			req.Header.Set("Connection", "Upgrade")
			req.Header.Set("Upgrade", replication.StreamUpgrade)
			if auth != "" {
				req.Header.Set("Authorization", auth)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusForbidden || !strings.Contains(string(body), "node certificate") {
				t.Errorf("attempt %d: GET %s on the API port (token %v): %s %s; want 403 saying it is for node certificates",
					attempt, replication.StreamPath, auth != "", resp.Status, body)
			}
		}
	}
}

// forgedStreamsFromMembers: members' real certificates, but not the
// writer's: the hello is refused (StatusForbidden) and write frames sent
// anyway are not applied.
func forgedStreamsFromMembers(t *testing.T, n1, n2, n3 *daemon, epoch uint64) {
	for attempt := range 2 {
		for _, c := range []struct {
			what string
			as   *daemon // whose certificate
			to   *daemon
			node string // what the hello claims
		}{
			{"n3's certificate, hello naming the writer n1", n3, n2, "n1"},
			{"n3's certificate, hello naming n3", n3, n2, "n3"},
			{"n3's certificate, hello naming mallory", n3, n2, "mallory"},
			{"n2's own certificate against n2, hello naming n1", n2, n2, "n1"},
			{"n2's own certificate against n2, hello naming n2", n2, n2, "n2"},
		} {
			s, err := openStream(t, c.to, c.as.certDir(), replproto.Hello{Role: replproto.RoleCopy, LU: "sec", Node: c.node}, epoch)
			if err != nil {
				t.Errorf("attempt %d: %s: %v; want the hello answered StatusForbidden", attempt, c.what, err)
				continue
			}
			ok := forgedWrites(s, epoch, 4)
			s.conn.Close()
			if s.status != replproto.StatusForbidden || ok > 0 {
				t.Errorf("attempt %d: %s: hello answered %v, %d of 4 forged writes acknowledged; want Forbidden and none",
					attempt, c.what, s.status, ok)
			}
		}
	}
	// The writer's own certificate still opens a stream (the refusals
	// above are about identity, not a broken stream path).
	if st := helloStatus(t, n2, n1, "sec", epoch); st != replproto.StatusOK {
		t.Errorf("the writer n1's own hello to n2 answered %v, want OK", st)
	}
}

// replicasEndpointGone: the audit's body (move the writer to n3, which
// holds no data, at epoch 2^62) gets 404 on every node.
func replicasEndpointGone(t *testing.T, n1, n2, n3 *daemon) {
	body := `{"writer": "n3", "epoch": 4611686018427387904, "copies": 1, "replicas": [{"node": "n3", "state": "in-sync"}]}`
	for attempt := range 2 {
		for _, d := range []*daemon{n1, n2, n3} {
			resp := d.request("POST", "/v1/lus/sec/replicas", body)
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusNotFound {
				t.Errorf("attempt %d: POST /v1/lus/sec/replicas on %s with the admin token: %s %s; want 404", attempt, d.id, resp.Status, b)
			}
		}
	}
	for _, d := range []*daemon{n1, n2} {
		if _, err := os.Stat(filepath.Join(d.data, "volumes", "sec.lu")); err != nil {
			t.Errorf("%s's copy of sec: %v", d.id, err)
		}
	}
}

// copyChangeReply is the answer of a copy-change proposal.
type copyChangeReply struct {
	status             int
	err                string
	leaderID, leaderAt string
}

func proposeCopyChange(t *testing.T, certDir, peerAddr, name string, req api.CopyChangeRequest) copyChangeReply {
	t.Helper()
	body, err := json.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	r := rawHTTP(t, peerClient(t, certDir), "POST", "https://"+peerAddr+"/v1/internal/lus/"+name+"/copy-change", string(body), "")
	var nl api.NotLeaderBody
	_ = json.Unmarshal([]byte(r.body), &nl)
	return copyChangeReply{status: r.status, err: nl.Error, leaderID: nl.LeaderID, leaderAt: nl.LeaderPeer}
}

func copyChangeOf(l luDetail) api.CopyChangeRequest {
	req := api.CopyChangeRequest{ExpectedEpoch: l.Epoch, Epoch: l.Epoch, Writer: l.Writer, Copies: l.Copies}
	for _, r := range l.Replicas {
		req.Replicas = append(req.Replicas, api.Replica{Node: r.Node, State: r.State})
	}
	return req
}

// copyChangeCase is one illegal proposal: by is whose certificate sends
// it, change turns the current record into the proposal.
type copyChangeCase struct {
	what   string
	by     string
	change func(*api.CopyChangeRequest)
	status int
	rule   string // in the error
}

// runCopyChangeCases sends each case twice to the leader's peer port and
// checks it is refused with its rule and changes nothing; then once more
// to each follower's peer port, which answers 503 naming the leader.
// nodes are the running nodes; certs are the nodes whose certificates
// the cases use (running or not: the files are on disk).
func runCopyChangeCases(t *testing.T, nodes, certs []*daemon, name string, cases []copyChangeCase) {
	byID := map[string]*daemon{}
	for _, d := range certs {
		byID[d.id] = d
	}
	leader := leaderOf(t, nodes...)
	view := leader
	rec := luOf(t, view, name)
	for _, c := range cases {
		for attempt := range 2 {
			req := copyChangeOf(rec)
			c.change(&req)
			got := proposeCopyChange(t, byID[c.by].certDir(), leader.peer, name, req)
			if got.status != c.status || !strings.Contains(got.err, c.rule) {
				t.Errorf("attempt %d: %s (by %s, to the leader %s): %d %q; want %d naming %s",
					attempt, c.what, c.by, leader.id, got.status, got.err, c.status, c.rule)
			} else if attempt == 0 {
				t.Logf("%s: %d %s", c.what, got.status, got.err)
			}
			if after := luOf(t, view, name); luSummary(after) != luSummary(rec) {
				t.Fatalf("%s was applied: %s, was %s", c.what, luSummary(after), luSummary(rec))
			}
		}
		for _, f := range nodes {
			if f == leader {
				continue
			}
			req := copyChangeOf(rec)
			c.change(&req)
			got := proposeCopyChange(t, byID[c.by].certDir(), f.peer, name, req)
			if got.status != http.StatusServiceUnavailable || got.leaderID != leader.id || got.leaderAt != leader.peer {
				t.Errorf("%s sent to the follower %s: %d %q leader %q at %q; want 503 naming the leader %s at %s",
					c.what, f.id, got.status, got.err, got.leaderID, got.leaderAt, leader.id, leader.peer)
			}
		}
	}
	for _, d := range nodes {
		if after := luOf(t, d, name); luSummary(after) != luSummary(rec) {
			t.Errorf("after the refused proposals: %s sees %s, was %s", d.id, luSummary(after), luSummary(rec))
		}
	}
}

// illegalCopyChanges: members propose copy-state changes the rules
// forbid, on the leader's peer port with their own certificates.
func illegalCopyChanges(t *testing.T, nodes []*daemon, name string, rec luDetail) {
	e := rec.Epoch
	var cases []copyChangeCase
	for _, by := range []string{"n2", "n1"} { // a copy holder, and the writer itself
		cases = append(cases,
			copyChangeCase{"epoch + 2^62", by, func(r *api.CopyChangeRequest) { r.Epoch = e + 1<<62 }, 403, `rule "epoch +1"`},
			copyChangeCase{"move the writer to n2", by, func(r *api.CopyChangeRequest) { r.Writer, r.Epoch = "n2", e+1 }, 403, `rule "writer change"`},
			copyChangeCase{"drop the writer's copy", by, func(r *api.CopyChangeRequest) {
				r.Epoch, r.Copies, r.Replicas = e+1, 1, []api.Replica{{Node: "n2", State: "in-sync"}}
			}, 403, `rule "writer holds a copy"`},
			copyChangeCase{"a copy on the non-member mallory", by, func(r *api.CopyChangeRequest) {
				r.Epoch, r.Copies = e+1, 3
				r.Replicas = append(r.Replicas, api.Replica{Node: "mallory", State: "new"})
			}, 403, `rule "members only"`},
			copyChangeCase{"mark the writer's copy out of sync", by, func(r *api.CopyChangeRequest) {
				r.Epoch = e + 1
				r.Replicas = []api.Replica{{Node: "n1", State: "out-of-sync"}, {Node: "n2", State: "in-sync"}}
			}, 403, `rule "writer in sync"`},
			// The LU is at epoch 1 here, and expected_epoch 0 is a 400
			// (malformed); a stale one proper is in the corrupt-store test.
			copyChangeCase{"an expected epoch that is not the record's", by, func(r *api.CopyChangeRequest) { r.ExpectedEpoch, r.Epoch = e+7, e+8 }, 412, "epoch changed"},
		)
	}
	runCopyChangeCases(t, nodes, nodes, name, cases)

	// The copy-change endpoint on the API port, even with the admin token:
	// proposals come from node certificates only.
	for _, d := range nodes {
		body, _ := json.Marshal(copyChangeOf(rec))
		r := rawHTTP(t, nil, "POST", "http://"+d.api+"/v1/internal/lus/"+name+"/copy-change", string(body), "Bearer "+d.token())
		if r.status != http.StatusForbidden {
			t.Errorf("copy-change on %s's API port with the admin token: %d %s; want 403", d.id, r.status, r.body)
		}
	}
}

// noCredentials: create and force-delete without a token, with a wrong
// one and with a malformed header get 401 saying what to pass.
func noCredentials(t *testing.T, n1, n2 *daemon) {
	create := `{"name": "evil", "size_bytes": 1048576}`
	for attempt := range 2 {
		for _, d := range []*daemon{n1, n2} { // the leader, and a follower that would forward
			for _, auth := range []string{"", "Bearer lupool-admin-" + strings.Repeat("0", 64), "Bearer " + d.token() + "x", "Basic YWRtaW46YWRtaW4="} {
				for _, rq := range []struct{ method, path, body string }{
					{"POST", "/v1/lus", create},
					{"DELETE", "/v1/lus/sec?force=true", ""},
					{"POST", "/v1/lus/sec/resize", `{"size_bytes": 512}`},
				} {
					r := rawHTTP(t, nil, rq.method, "http://"+d.api+rq.path, rq.body, auth)
					msg := r.errorText()
					if r.status != http.StatusUnauthorized || !strings.Contains(msg, "--token-file") || !strings.Contains(msg, "LUPOOL_TOKEN") ||
						!strings.Contains(r.header.Get("Content-Type"), "application/json") {
						t.Errorf("attempt %d: %s %s on %s with Authorization %q: %d %s; want 401 with a JSON error naming --token-file and LUPOOL_TOKEN",
							attempt, rq.method, rq.path, d.id, auth, r.status, r.body)
					} else if attempt == 0 && d == n1 && rq.method == "POST" && rq.body == create {
						t.Logf("Authorization %q: 401 %s", auth, msg)
					}
				}
			}
		}
		// The CLI with a wrong token file.
		bad := filepath.Join(t.TempDir(), "wrong.token")
		if err := os.WriteFile(bad, []byte("lupool-admin-"+strings.Repeat("1", 64)+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		for _, args := range [][]string{
			{"lu", "create", "evil", "--size", "1M", "--token-file", bad},
			{"lu", "delete", "sec", "--force", "--token-file", bad},
		} {
			out, errOut, code := n1.cli(args...)
			if code != 1 || !strings.Contains(errOut, "--token-file") {
				t.Errorf("attempt %d: lupool %s: exit %d %q %q; want exit 1 naming --token-file", attempt, strings.Join(args, " "), code, out, errOut)
			}
		}
	}
	// The probes stay open.
	for _, path := range []string{"/healthz", "/readyz", "/metrics"} {
		if r := rawHTTP(t, nil, "GET", "http://"+n2.api+path, "", ""); r.status != http.StatusOK {
			t.Errorf("GET %s without a token: %d %s; want 200", path, r.status, r.body)
		}
	}
}

// wrongJoinTokens: a new node joining with a token that is not good is
// refused with a message saying why, and the pool is as before.
func wrongJoinTokens(t *testing.T, n1 *daemon) {
	members := nodeSummary(t, n1)
	good := n1.joinToken() // the CLI's, once
	parts := strings.Split(good, ".")
	if len(parts) != 4 {
		t.Fatalf("join token %q: want 4 dot-separated parts", good)
	}
	// Bad secret: one hex digit changed.
	sec := []byte(parts[2])
	if sec[0] == 'a' {
		sec[0] = 'b'
	} else {
		sec[0] = 'a'
	}
	badSecret := strings.Join([]string{parts[0], parts[1], string(sec), parts[3]}, ".")

	revoked, revokedID := joinTokenOf(t, n1, 0)
	n1.mustCLI("cluster", "join-token", "revoke", revokedID)

	expired := strings.TrimSpace(n1.mustCLI("cluster", "join-token", "--ttl", "1s"))

	other := newDaemon(t, "o1")
	other.start()
	foreign, _ := joinTokenOf(t, other, 0)
	other.stop(syscall.SIGTERM)

	time.Sleep(1500 * time.Millisecond) // past the 1s token's expiry
	for _, c := range []struct{ what, token, want string }{
		{"a wrong secret", badSecret, "wrong secret"},
		{"a revoked token", revoked, "was revoked"},
		{"an expired token", expired, "expired"},
		{"another cluster's token", foreign, "another cluster"},
		{"a malformed token", "lupool1.not-a-token", "--join-token"},
		{"a token with its fingerprint cut", strings.Join(parts[:3], "."), "--join-token"},
	} {
		for attempt := range 2 {
			api, args := joinArgs(t, "intruder", n1, c.token)
			out, code, ready := serveExpectFail(t, 30*time.Second, api, args...)
			if code <= 0 || ready || !strings.Contains(out, c.want) {
				t.Errorf("attempt %d: join with %s: exit %d, ready %v; want a non-zero exit saying %q:\n%s", attempt, c.what, code, ready, c.want, out)
			} else if attempt == 0 {
				t.Logf("join with %s: exit %d: %s", c.what, code, lastLine(out))
			}
		}
	}
	if got := nodeSummary(t, n1); got != members {
		t.Errorf("after refused joins: members %s, were %s", got, members)
	}
	// The good token still works for its purpose: it was never used, and
	// a refused join does not burn it (checked by parsing, not joining,
	// to keep the membership as it is).
	if _, err := pki.ParseJoinToken(good); err != nil {
		t.Errorf("the good token does not parse: %v", err)
	}
}

// lastLine is the last non-empty line of s.
func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

// joinHijack: a process joins with n2's id (a valid join token, a fresh
// data directory) and POST /v1/join names n2: refused, n2's record as it
// was, and writes through n1 still reach n2's copy.
func joinHijack(t *testing.T, n1, n2, n3 *daemon) {
	members := nodeSummary(t, n1)
	for attempt := range 2 {
		tok, _ := joinTokenOf(t, n1, 0)
		api, args := joinArgs(t, "n2", n1, tok)
		out, code, ready := serveExpectFail(t, 30*time.Second, api, args...)
		if code <= 0 || ready || !strings.Contains(out, `node id "n2" is already a member`) {
			t.Errorf("attempt %d: serve --node-id n2 --join: exit %d, ready %v; want a non-zero exit saying n2 is already a member:\n%s", attempt, code, ready, out)
		} else if attempt == 0 {
			t.Logf("join as n2: exit %d: %s", code, lastLine(out))
		}
	}
	key, _, err := pki.NewKey()
	if err != nil {
		t.Fatal(err)
	}
	pub, err := pki.PublicKeyPEM(key)
	if err != nil {
		t.Fatal(err)
	}
	for attempt := range 2 {
		for _, d := range []*daemon{n1, n3} { // the leader, and a follower that forwards
			tok, _ := joinTokenOf(t, n1, 0)
			body, _ := json.Marshal(api.JoinRequest{Token: tok, ID: "n2", PublicKeyPEM: string(pub), Hosts: []string{"10.6.6.6"}})
			r := rawHTTP(t, nil, "POST", "http://"+d.api+"/v1/join", string(body), "")
			if r.status != http.StatusConflict || !strings.Contains(r.errorText(), "already a member") {
				t.Errorf("attempt %d: POST /v1/join id n2 on %s: %d %s; want 409 saying n2 is already a member", attempt, d.id, r.status, r.body)
			}
			if strings.Contains(r.body, "CERTIFICATE") || strings.Contains(r.body, "PRIVATE KEY") {
				t.Errorf("attempt %d: the refused join on %s returned key material: %s", attempt, d.id, r.body)
			}
		}
	}
	if got := nodeSummary(t, n1); got != members {
		t.Errorf("after join hijacks: members %s, were %s", got, members)
	}
	// Writes through n1 reach n2's copy (not a fake peer).
	data := make([]byte, 1<<20)
	if _, err := rand.Read(data); err != nil {
		t.Fatal(err)
	}
	pwriteRegions(t, n1.uri("sec"), data, []int64{12 << 20})
	if a, b := volumeSHA(t, n1, "sec"), volumeSHA(t, n2, "sec"); a != b {
		t.Errorf("after a write through n1: n1 %s, n2 %s; n2's copy did not get it", a, b)
	}
	if v := verifyOf(t, n3, "sec"); !v.Equal {
		t.Errorf("lu verify after the write: %+v", v)
	}
}

// TestSecurityCorruptStateRefused: a flipped byte in the writer's
// dirty-region store makes the writer resync the copy by region hashes
// before it is recorded in sync (the audit found 8 KiB sent instead of
// 6 MiB and 4 regions of acknowledged data missing on the copy); a copy
// cannot be proposed in sync from out of sync meanwhile; an emptied
// DATA/meta on a former member refuses to start.
func TestSecurityCorruptStateRefused(t *testing.T) {
	alongside(t)
	realclient.NbdshPython(t)
	needTools(t, "nbdcopy")
	n1, n2, n3 := cluster3(t)
	const size = 32 << 20
	n1.mustCLI("lu", "create", "d", "--size", "32M", "--copies", "2")
	base, _ := randomFile(t, 16<<20)
	runTool(t, "nbdcopy", base, n1.uri("d"))
	if lu := n1.showLU("d"); lu.Writer != "n1" || lu.state("n2") != "in-sync" {
		t.Fatalf("placement %s; want writer n1, copy on n2", luSummary(lu))
	}

	n2.stop(syscall.SIGKILL)
	// 6 MiB of random data in 6 one-MiB regions, 4 MiB apart, some over
	// the base image and some beyond it.
	offsets := []int64{1 << 20, 5 << 20, 9 << 20, 13 << 20, 17 << 20, 21 << 20}
	acked := make([]byte, len(offsets)<<20)
	if _, err := rand.Read(acked); err != nil {
		t.Fatal(err)
	}
	pwriteRegions(t, n1.uri("d"), acked, offsets)
	lu := n1.showLU("d")
	if lu.state("n2") != "out-of-sync" {
		t.Fatalf("after writes with n2 down: %s; want n2 out-of-sync", luSummary(lu))
	}
	dirty := metricValue(n1.metrics(), "lupool_replication_dirty_bytes", `lu="d"`, `copy="n2"`)
	if dirty != float64(len(acked)) {
		t.Errorf("dirty bytes for n2 = %v, want %d (what was written while it was down)", dirty, len(acked))
	}

	// Meanwhile nobody can record n2's copy in sync straight from out of
	// sync: not n2 itself, not the writer.
	var cases []copyChangeCase
	for _, by := range []string{"n2", "n1"} {
		cases = append(cases, copyChangeCase{"n2's copy in sync from out of sync", by, func(r *api.CopyChangeRequest) {
			r.Epoch = r.ExpectedEpoch + 1
			for i := range r.Replicas {
				r.Replicas[i].State = "in-sync"
			}
		}, 403, `rule "state transition"`},
			copyChangeCase{"a stale expected epoch", by, func(r *api.CopyChangeRequest) {
				r.ExpectedEpoch--
				r.Epoch = r.ExpectedEpoch + 1
			}, 412, "epoch changed"})
	}
	runCopyChangeCases(t, []*daemon{n1, n3}, []*daemon{n1, n2, n3}, "d", cases)

	n1.stop(syscall.SIGTERM)
	flipped := flipDirtyByte(t, filepath.Join(n1.data, "dirty"))
	t.Logf("flipped %s", flipped)

	n1.start()
	if !strings.Contains(n1.logs(), "dirty-region store is not trusted") {
		t.Errorf("n1 restarted with a flipped byte in DATA/dirty and did not say the store is not trusted")
	}
	if st := luOf(t, n1, "d").state("n2"); st == "in-sync" {
		t.Fatalf("n2's copy is in sync while n2 is still down")
	}
	restart := time.Now()
	n2.start()
	var inSyncAt time.Duration
	deadline := time.Now().Add(60 * time.Second)
	for {
		lu := luOf(t, n1, "d")
		if lu.state("n2") == "in-sync" {
			inSyncAt = time.Since(restart)
			// At the moment it is recorded in sync, the hash resync is
			// done and the copies are identical.
			if !strings.Contains(n1.logs(), "hash resync done") {
				t.Errorf("n2's copy recorded in sync before the writer logged \"hash resync done\"")
			}
			if a, b := volumeSHA(t, n1, "d"), volumeSHA(t, n2, "d"); a != b {
				t.Errorf("n2's copy recorded in sync but differs: n1 %s, n2 %s", a, b)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("n2's copy not in sync 60s after n2 started: %s", luSummary(lu))
		}
		time.Sleep(100 * time.Millisecond)
	}
	logs := n1.logs()
	m := regexp.MustCompile(`hash resync done[^\n]*regions_compared=(\d+) regions_sent=(\d+) sent_bytes=(\d+) took=(\S+)`).FindStringSubmatch(logs)
	if m == nil {
		t.Fatalf("n1 did not log the hash resync's numbers:\n%s", logs)
	}
	compared, _ := strconv.Atoi(m[1])
	sentRegions, _ := strconv.Atoi(m[2])
	sentBytes, _ := strconv.ParseInt(m[3], 10, 64)
	resyncSent := metricValue(n1.metrics(), "lupool_replication_sent_bytes_total", `lu="d"`, `copy="n2"`, `kind="resync"`)
	t.Logf("hash resync: %d regions compared, %d sent, %d bytes (metric %v), took %s; n2 in sync %v after its start",
		compared, sentRegions, sentBytes, resyncSent, m[4], inSyncAt.Round(time.Millisecond))
	if compared != size>>20 || sentRegions != len(offsets) || sentBytes != int64(len(acked)) {
		t.Errorf("hash resync compared %d regions and sent %d (%d bytes); want all %d compared and the %d written ones sent (%d bytes)",
			compared, sentRegions, sentBytes, size>>20, len(offsets), len(acked))
	}
	if v, code := n3.verify("d"); code != 0 || !v.Equal {
		t.Errorf("lu verify after the hash resync: exit %d %+v", code, v)
	}
	// Read back through n2 (its own copy): every acknowledged byte is there.
	out := filepath.Join(t.TempDir(), "n2.raw")
	runTool(t, "nbdcopy", n2.uri("d"), out)
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	for i, off := range offsets {
		if !bytes.Equal(got[off:off+1<<20], acked[i<<20:(i+1)<<20]) {
			t.Errorf("region at %d MiB read through n2 differs from what was acknowledged", off>>20)
		}
	}

	// The doubt is settled: once every copy in doubt was compared, the
	// writer trusts its store again, and a clean restart does not resync
	// by hashes once more.
	mark := len(n1.logs())
	n1.stop(syscall.SIGTERM)
	n1.start()
	n1.waitState("d", "n2", "in-sync", 30*time.Second)
	if again := n1.logs()[mark:]; strings.Contains(again, "not trusted") || strings.Contains(again, "cannot mark the dirty-region store trusted") {
		t.Errorf("after the hash resync and a clean restart the writer still does not trust its dirty-region store "+
			"(DirtyStore.Trust cannot read past the corrupt table block, so the doubt is never settled):\n%s", again)
	}

	emptiedMetaRefused(t, n1, n2, n3)
}

// flipDirtyByte flips one byte inside a record of the dirty-region store
// in dir (a key starting "dirty/", in a table or the log) and says where.
func flipDirtyByte(t *testing.T, dir string) string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var listing []string
	for _, pass := range []string{".sst", ".log"} {
		for _, e := range entries {
			info, err := e.Info()
			if err != nil {
				t.Fatal(err)
			}
			if pass == ".sst" {
				listing = append(listing, fmt.Sprintf("%s (%d bytes)", e.Name(), info.Size()))
			}
			if !strings.HasSuffix(e.Name(), pass) {
				continue
			}
			path := filepath.Join(dir, e.Name())
			b, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			i := bytes.Index(b, []byte("dirty/d"))
			if i < 0 {
				continue
			}
			at := i + len("dirty/")
			b[at] ^= 0x01
			if err := os.WriteFile(path, b, info.Mode()); err != nil {
				t.Fatal(err)
			}
			return fmt.Sprintf("byte %d of %s (in the key of a dirty record); DATA/dirty holds %s", at, e.Name(), strings.Join(listing, ", "))
		}
	}
	t.Fatalf("no dirty record found in the tables or the log of %s: %s", dir, strings.Join(listing, ", "))
	return ""
}

// emptiedMetaRefused: n2, a member, loses its DATA/meta: it refuses to
// start, says how to recover, never reports ready, and the pool is as it
// was.
func emptiedMetaRefused(t *testing.T, n1, n2, n3 *daemon) {
	members := nodeSummary(t, n1)
	n2.stop(syscall.SIGTERM)
	meta := filepath.Join(n2.data, "meta")
	if err := os.RemoveAll(meta); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(meta, 0o755); err != nil {
		t.Fatal(err)
	}
	for attempt := range 2 {
		began := time.Now()
		out, code, ready := serveExpectFail(t, 20*time.Second, n2.api,
			"--data", n2.data, "--nbd", n2.nbd, "--api", n2.api, "--peer", n2.peer, "--node-id", n2.id)
		took := time.Since(began)
		for _, want := range []string{"cluster-id", "metadata", "will not start a new cluster", "--join", "Restore DATA/meta"} {
			if !strings.Contains(out, want) {
				t.Errorf("attempt %d: n2 with an empty DATA/meta: output lacks %q:\n%s", attempt, want, out)
			}
		}
		if code <= 0 || ready || took > 10*time.Second {
			t.Errorf("attempt %d: n2 with an empty DATA/meta: exit %d after %v, ready %v; want a non-zero exit within 10s, never ready",
				attempt, code, took.Round(time.Millisecond), ready)
		} else if attempt == 0 {
			t.Logf("empty DATA/meta: exit %d after %v: %s", code, took.Round(time.Millisecond), lastLine(out))
		}
		if entries, err := os.ReadDir(meta); err == nil && len(entries) != 0 && attempt == 0 {
			// Not a requirement (the second attempt still refuses), but
			// worth knowing: the refused start leaves empty stores behind.
			var names []string
			for _, e := range entries {
				names = append(names, e.Name())
			}
			t.Logf("the refused start left %v in DATA/meta", names)
		}
	}
	if got := nodeSummary(t, n1); got != members {
		t.Errorf("after n2 refused to start: members %s, were %s", got, members)
	}
	if got := nodeSummary(t, n3); got != members {
		t.Errorf("n3 after n2 refused to start: members %s, were %s", got, members)
	}
	if lus := n1.listLUs(); len(lus) != 1 || lus[0].Name != "d" {
		t.Errorf("LU table after n2 refused to start: %+v", lus)
	}
}

// needDefaultPortsFree ends the test unless the README's default ports
// 10809-10811 are free: a skip (make run may hold them), a failure in CI,
// which must leave them free.
func needDefaultPortsFree(t *testing.T) {
	t.Helper()
	for _, addr := range []string{"127.0.0.1:10809", "127.0.0.1:10810", "127.0.0.1:10811"} {
		l, err := net.Listen("tcp", addr)
		if err != nil {
			if os.Getenv("CI") == "true" {
				t.Fatalf("the README's default port %s is busy (%v); CI must leave 10809-10811 free", addr, err)
			}
			t.Skipf("the README's default port %s is busy (%v): stop whatever holds it (make run?) to run this test", addr, err)
		}
		l.Close()
	}
}

// TestSecurityREADMEDefaults: `lupool serve` with no flags in a fresh
// directory (what `make run` does), then `lupool lu create swap0 --size
// 8G` in that same directory with no token in the environment works: the
// CLI reads ./lupool-data/admin.token. (TestAuditDefaultsExactMetricsRestart
// runs the defaults too, but passes the token file by LUPOOL_TOKEN_FILE.)
func TestSecurityREADMEDefaults(t *testing.T) {
	needDefaultPortsFree(t)
	work := t.TempDir()
	d := serveInDir(t, work, "127.0.0.1:10810", nil)
	cli := func(dir string, args ...string) (string, int) {
		t.Helper()
		cmd := exec.Command(lupoolBin, args...)
		cmd.Dir = dir
		cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME")}
		out, err := cmd.CombinedOutput()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		return string(out), code
	}
	// Elsewhere, with no token file, the same command is refused: the
	// token file is what makes it work.
	elsewhere := t.TempDir()
	if out, code := cli(elsewhere, "lu", "create", "swap0", "--size", "8G"); code != 1 || !strings.Contains(out, "--token-file") {
		t.Errorf("lu create in a directory without lupool-data: exit %d %q; want 1 naming --token-file", code, out)
	}
	if out, code := cli(work, "lu", "create", "swap0", "--size", "8G"); code != 0 {
		t.Fatalf("the README's `lupool lu create swap0 --size 8G` next to `lupool serve`: exit %d:\n%s\ndaemon:\n%s", code, out, d.logs())
	}
	out, code := cli(work, "lu", "list", "-o", "json")
	var lus []luJSON
	if err := json.Unmarshal([]byte(out), &lus); code != 0 || err != nil || len(lus) != 1 || lus[0].Name != "swap0" || lus[0].SizeBytes != 8<<30 {
		t.Fatalf("lu list after the README's create: exit %d %v %q; want swap0 of 8 GiB", code, err, out)
	}
	if fi, err := os.Stat(filepath.Join(work, "lupool-data", "admin.token")); err != nil {
		t.Errorf("./lupool-data/admin.token: %v", err)
	} else if fi.Mode().Perm() != 0o600 {
		t.Errorf("./lupool-data/admin.token has mode %v, want 0600", fi.Mode().Perm())
	}
}
