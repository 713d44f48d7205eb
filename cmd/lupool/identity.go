package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/lupool/lupool/cluster/pki"
	"github.com/lupool/lupool/server/api"
)

// Files of a node's identity under DATA (part of the on-disk layout):
//
//	DATA/pki/         the cluster CA (ca.crt, ca.key) and this node's
//	                  certificate (node.crt, node.key); keys 0600 (package pki)
//	DATA/admin.token  the admin token, 0600 (the first node writes it; the
//	                  cluster keeps only its SHA-256)
//	DATA/cluster-id   written once the node is a member with metadata: a
//	                  node with this file never starts a new cluster
const (
	pkiDirName       = "pki"
	adminTokenName   = "admin.token"
	clusterIDName    = "cluster-id"
	joinTokenTTLDflt = 24 * time.Hour
)

// Settings in the replicated metadata that hold identities (their values
// are hashes, never secrets).
const (
	settingAdminTokenHash = "security/admin-token-sha256"
	settingClusterID      = "security/cluster-id"
	settingJoinToken      = "security/join-token/" // + token id: JSON joinTokenRecord
	settingRemovedNode    = "security/removed-node/"
	// settingCAHolder names the node that holds the CA key and signs
	// joiners' certificates.
	settingCAHolder = "security/ca-holder"
)

// joinTokenRecord is what the metadata keeps of a join token.
type joinTokenRecord struct {
	SecretSHA256 string    `json:"secret_sha256"`
	CreatedAt    time.Time `json:"created_at"`
	ExpiresAt    time.Time `json:"expires_at"`
	Revoked      bool      `json:"revoked,omitempty"`
}

// identity is this node's place in the cluster's trust: the CA and its
// own certificate.
type identity struct {
	dir  string          // DATA/pki
	ca   *pki.CA         // with Key: every member can sign joiners
	pool *x509.CertPool  // the cluster CA
	cert tls.Certificate // this node's, with the CA appended to the chain
}

func loadIdentity(data string) (*identity, error) {
	dir := filepath.Join(data, pkiDirName)
	ca, err := pki.LoadCA(dir)
	if err != nil {
		return nil, err
	}
	cert, err := pki.LoadNode(dir)
	if err != nil {
		return nil, err
	}
	// Send the CA with the leaf: a joiner checks it against the join
	// token's fingerprint before it trusts the API.
	cert.Certificate = append(cert.Certificate, ca.Cert.Raw)
	return &identity{dir: dir, ca: ca, pool: ca.Pool(), cert: cert}, nil
}

func identityExists(data string) bool { return pkiFileExists(data, pki.NodeCertFile) }

// pkiFileExists reports whether DATA/pki/name exists.
func pkiFileExists(data, name string) bool {
	_, err := os.Stat(filepath.Join(data, pkiDirName, name))
	return err == nil
}

// hostsOf returns the hosts of addrs, for certificate SANs.
func hostsOf(addrs ...string) []string {
	var out []string
	seen := map[string]bool{}
	for _, a := range addrs {
		host, _, err := net.SplitHostPort(a)
		if err != nil || host == "" || seen[host] {
			continue
		}
		seen[host] = true
		out = append(out, host)
	}
	return out
}

// createIdentity makes a new cluster: a cluster id, a CA, this node's
// certificate and the admin token, all written under data.
func createIdentity(data, id string, hosts []string, log *slog.Logger) error {
	clusterID, err := pki.NewClusterID()
	if err != nil {
		return err
	}
	ca, err := pki.NewCA(clusterID)
	if err != nil {
		return err
	}
	key, keyPEM, err := pki.NewKey()
	if err != nil {
		return err
	}
	certPEM, err := ca.IssueNode(id, key.Public(), hosts)
	if err != nil {
		return err
	}
	dir := filepath.Join(data, pkiDirName)
	if err := pki.SaveCA(dir, ca); err != nil {
		return err
	}
	if err := pki.SaveNode(dir, certPEM, keyPEM); err != nil {
		return err
	}
	token, err := pki.NewAdminToken()
	if err != nil {
		return err
	}
	if err := writeSecret(filepath.Join(data, adminTokenName), token+"\n"); err != nil {
		return err
	}
	if err := writeSecret(filepath.Join(data, pkiDirName, clusterIDName), clusterID+"\n"); err != nil {
		return err
	}
	log.Info("created a new cluster identity", "cluster_id", clusterID, "ca", ca.Fingerprint(),
		"admin_token_file", filepath.Join(data, adminTokenName))
	return nil
}

// writeSecret writes a 0600 file atomically.
func writeSecret(path, content string) error {
	tmp := path + ".tmp"
	_ = os.Remove(tmp) // a leftover would keep its own mode
	if err := os.WriteFile(tmp, []byte(content), 0o600); err != nil {
		return err
	}
	f, err := os.Open(tmp)
	if err == nil {
		err = f.Sync()
		f.Close()
	}
	if err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	if d, err := os.Open(filepath.Dir(path)); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}

func readTrimmed(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(b)), nil
}

// clusterIDOf returns the cluster id kept in the node's pki directory.
func clusterIDOf(data string) string {
	id, _ := readTrimmed(filepath.Join(data, pkiDirName, clusterIDName))
	return id
}

// memberMarker is DATA/cluster-id: present once the node is a member
// with metadata.
func memberMarker(data string) (clusterID string, member bool, err error) {
	id, err := readTrimmed(filepath.Join(data, clusterIDName))
	if errors.Is(err, fs.ErrNotExist) {
		return "", false, nil
	}
	if err != nil {
		return "", false, err
	}
	return id, true, nil
}

func writeMemberMarker(data, clusterID string) error {
	if clusterID == "" {
		return errors.New("no cluster id to record")
	}
	return writeSecret(filepath.Join(data, clusterIDName), clusterID+"\n")
}

// joinURL is the URL of the --join address: http on loopback, else https
// (the join token's secret never crosses a network in the clear).
func joinURL(addr string) (string, error) {
	if rest, ok := strings.CutPrefix(addr, "https://"); ok {
		return "https://" + rest, nil
	}
	rest, plain := strings.CutPrefix(addr, "http://")
	if strings.Contains(rest, "://") {
		return "", fmt.Errorf("--join %q: give HOST:PORT or https://HOST:PORT", addr)
	}
	if isLoopback(strings.TrimRight(rest, "/")) {
		return "http://" + rest, nil
	}
	if plain {
		return "", fmt.Errorf("--join %q: the join token would cross the network in the clear; give HOST:PORT or https://HOST:PORT", addr)
	}
	return "https://" + rest, nil
}

// fingerprintPinnedClient trusts a server whose certificate chains to a CA
// with the join token's fingerprint (the CA travels with the leaf).
func fingerprintPinnedClient(fingerprint string) *http.Client {
	conf := &tls.Config{
		MinVersion:         tls.VersionTLS13,
		InsecureSkipVerify: true, // verified below against the pinned CA
		VerifyConnection: func(cs tls.ConnectionState) error {
			for _, c := range cs.PeerCertificates {
				if !c.IsCA || pki.Fingerprint(c.Raw) != fingerprint {
					continue
				}
				pool := x509.NewCertPool()
				pool.AddCert(c)
				if _, err := pki.VerifyNode(pool, cs.PeerCertificates[0], ""); err != nil {
					return err
				}
				return nil
			}
			return fmt.Errorf("the server's certificate is not from the cluster CA %s named in the join token", fingerprint)
		},
	}
	return &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: conf, Proxy: nil}}
}

// requestCertificate is the first step of joining: prove the join token's
// secret to the node at cfg.Join, get a node certificate for this node's
// own key and the cluster CA, and keep them under DATA/pki.
func requestCertificate(ctx context.Context, cfg serveConfig, id string, log *slog.Logger) error {
	tok, err := pki.ParseJoinToken(cfg.JoinToken)
	if err != nil {
		return fmt.Errorf("--join-token: %w (copy it whole from `lupool cluster join-token`)", err)
	}
	key, keyPEM, err := pki.NewKey()
	if err != nil {
		return err
	}
	pubPEM, err := pki.PublicKeyPEM(key)
	if err != nil {
		return err
	}
	u, err := joinURL(cfg.Join)
	if err != nil {
		return err
	}
	opts := api.ClientOptions{}
	if strings.HasPrefix(u, "https://") {
		opts.HTTP = fingerprintPinnedClient(tok.CAFingerprint)
	}
	c, err := api.NewClientWith(u, opts)
	if err != nil {
		return fmt.Errorf("--join: %w", err)
	}
	req := api.JoinRequest{Token: cfg.JoinToken, ID: id, PublicKeyPEM: string(pubPEM), Hosts: hostsOf(cfg.Peer, cfg.API, cfg.NBD)}
	deadline := time.Now().Add(time.Minute)
	var resp api.JoinResponse
	for {
		resp, err = c.Join(ctx, req)
		if err == nil {
			break
		}
		var se *api.StatusError
		if errors.As(err, &se) && se.StatusCode < 500 {
			return fmt.Errorf("join via %s refused: %w", cfg.Join, err)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("join via %s: %w", cfg.Join, err)
		}
		log.Info("join not accepted yet; retrying", "via", cfg.Join, "err", err)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Second):
		}
	}
	ca, err := pki.ParseCA([]byte(resp.CACertPEM), nil)
	if err != nil {
		return fmt.Errorf("join via %s: the CA it sent: %w", cfg.Join, err)
	}
	if ca.Fingerprint() != tok.CAFingerprint {
		return fmt.Errorf("join via %s: its cluster CA is %s but the join token names %s: the address is of another cluster", cfg.Join, ca.Fingerprint(), tok.CAFingerprint)
	}
	dir := filepath.Join(cfg.Data, pkiDirName)
	if err := pki.SaveCA(dir, ca); err != nil {
		return err
	}
	if err := pki.SaveNode(dir, []byte(resp.NodeCertPEM), keyPEM); err != nil {
		return err
	}
	cert, err := pki.LoadNode(dir)
	if err != nil {
		return err
	}
	if got, err := pki.VerifyNode(ca.Pool(), cert.Leaf, id); err != nil || got != id {
		return fmt.Errorf("join via %s: the certificate it issued does not name this node %q: %v", cfg.Join, id, err)
	}
	if err := writeSecret(filepath.Join(dir, clusterIDName), resp.ClusterID+"\n"); err != nil {
		return err
	}
	log.Info("received a node certificate", "via", cfg.Join, "cluster_id", resp.ClusterID, "ca", ca.Fingerprint())
	members, err := json.Marshal(resp.Members)
	if err != nil {
		return err
	}
	return writeSecret(filepath.Join(dir, joinMembersName), string(members))
}

// joinMembersName keeps, under DATA/pki, the members a joining node was
// told of, until it has registered with their leader.
const joinMembersName = "join-members.json"

// bootstrapPendingName marks, under DATA/pki, a cluster identity created
// by this start whose one-member cluster is not bootstrapped yet.
const bootstrapPendingName = "bootstrap-pending"

func markBootstrap(data string) error {
	if err := os.MkdirAll(filepath.Join(data, pkiDirName), 0o700); err != nil {
		return err
	}
	return writeSecret(filepath.Join(data, pkiDirName, bootstrapPendingName), "")
}

func pendingBootstrap(data string) bool { return pkiFileExists(data, bootstrapPendingName) }

// clearBootstrap removes the marker once the metadata holds the cluster.
func clearBootstrap(data string) error {
	err := os.Remove(filepath.Join(data, pkiDirName, bootstrapPendingName))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return err
}

// pendingJoin reports whether a join got its certificate but has not
// registered yet.
func pendingJoin(data string) bool { return pkiFileExists(data, joinMembersName) }

func readJoinMembers(data string) ([]api.Node, error) {
	b, err := os.ReadFile(filepath.Join(data, pkiDirName, joinMembersName))
	if err != nil {
		return nil, err
	}
	var out []api.Node
	return out, json.Unmarshal(b, &out)
}
