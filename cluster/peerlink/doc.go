// Package peerlink is the one mutual-TLS port that carries all node-to-node
// traffic of a lupool cluster: raft's transport and the internal HTTP API
// (replication streams as HTTP upgrades, region hashes, requests forwarded
// to the leader).
//
// # Wire format
//
// A connection is TCP, then TLS 1.3 in which both sides present a node
// certificate of the cluster CA (package pki); the server requires a client
// certificate and the client checks the server's node id when it knows which
// node it dials. Host names are never checked. After the handshake the
// server reads the connection's first byte and routes on it:
//
//	first byte   0x00..0x09   raft: a hashicorp/raft NetworkTransport rpc type
//	                          (raft v1.8.0 uses 0..4: AppendEntries, RequestVote,
//	                          InstallSnapshot, TimeoutNow, RequestPreVote; 5..9
//	                          are kept for raft's future types)     -> Link.Raft()
//	             'A'..'Z'     HTTP/1.1: the first letter of a request method -> Link.HTTP()
//	             anything else                                       closed
//
// The byte is not consumed: the consumer reads it as the first byte of the
// stream. Part of the wire format: changing the ranges breaks mixed-version
// clusters.
//
// # Limits
//
// The accept loop never waits on a peer: each handshake and first-byte read
// runs on its own goroutine under Options.HandshakeTimeout. At most
// Options.MaxHandshakes connections are in that phase; when one more
// arrives the oldest is dropped, so a flood of silent connections costs
// bounded memory and cannot lock a well-behaved peer out for long. At most
// Options.MaxPending routed connections wait per side for Accept; beyond
// that they are closed. Every refusal is counted (Stats), logged at debug,
// and warned about at most once per 10 seconds per kind.
//
// # Identity
//
// Connections handed out by the listeners are *Conn values that carry the
// peer's verified node id (Conn.PeerID). They are not *tls.Conn; net/http
// (Go 1.26) still fills Request.TLS from Conn.ConnectionState, but its
// VerifiedChains is empty because verification is lupool's own (package
// pki). Serve with http.Server{ConnContext: link.ConnContext} and read the
// caller's node id with PeerID(r.Context()), never from Request.TLS.
package peerlink
