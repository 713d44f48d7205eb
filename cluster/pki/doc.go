// Package pki is a lupool cluster's identity: the cluster CA, node
// certificates whose identity is the node id, the TLS configurations every
// node-to-node path uses, join tokens and admin tokens.
//
// # Trust model
//
// The first node of a cluster creates the cluster CA (NewCA). A node that
// joins proves a join token's secret to a member, checks the member's CA
// against the token's CA fingerprint, and receives a node certificate
// (CA.IssueNode) for a key it generated itself (NewKey): the private key
// never leaves the joining node. A peer's node id is taken from its
// certificate (VerifyNode, PeerNodeID), never from a message field. Host
// names are not part of the identity and are not checked.
//
// # Files (part of the on-disk format)
//
// A node keeps its identity in one directory, DATA/pki, created 0700:
//
//	ca.crt    PEM "CERTIFICATE", the cluster CA            0644  every node
//	ca.key    PEM "PRIVATE KEY" (PKCS#8), the CA's key      0600  nodes that issue certificates
//	node.crt  PEM "CERTIFICATE", this node's certificate    0644  every node
//	node.key  PEM "PRIVATE KEY" (PKCS#8), this node's key   0600  every node
//
// Every file is written atomically: a temporary file in the same directory
// is written, synced, renamed over the target, and the directory is synced.
// Secret: ca.key and node.key. Public: ca.crt and node.crt.
//
// # Certificates
//
//	CA    ECDSA P-256, self-signed, IsCA, path length 0, 10 years,
//	      Subject O=lupool, CN="lupool cluster <cluster id>"
//	node  signed by the CA, ECDSA P-256 or Ed25519 key, 5 years (never past
//	      the CA), Subject O=lupool, CN=<node id>, URI SAN lupool://node/<node id>,
//	      ExtKeyUsage ServerAuth+ClientAuth, KeyUsage DigitalSignature,
//	      random 128-bit serial; optional IP and DNS SANs (informational)
//
// A node id is 1 to 128 characters of [A-Za-z0-9._-].
//
// # Join tokens (part of the wire format)
//
//	lupool1.<id>.<secret>.<cafp>
//
//	id      8 lowercase hex characters: names the token (listing, revoking); not secret
//	secret  32 lowercase hex characters, 128 bits from crypto/rand: SECRET
//	cafp    64 lowercase hex characters: sha256 of the CA certificate (DER)
//
// Members store only HashSecret(secret), never the secret, and compare with
// SecretMatches (constant time). Admin tokens are "lupool-admin-" followed by
// 64 lowercase hex characters (256 bits) and are secret.
//
// # Concurrency
//
// Every function is safe for concurrent use. A *CA is immutable after
// construction and may be shared; the returned *tls.Config values may be
// used by any number of connections at once.
package pki
