//! One kvset member, as a library: `Node::start(config, listeners, shutdown, options)` returns a
//! [`NodeHandle`]; the `kvset` binary and the tests use the same entry point.
//!
//! # How a request flows
//!
//! ```text
//! client ──gRPC──▶ service::kv   ──▶ pb::request       ─┐  a domain Command or Query
//!                  service::etcd ──▶ pb::etcd::request ─┤  (same for both APIs)
//!                                                       ▼
//!                               LocalMember::execute / ::read ── follower ──▶ leader's peer port
//!                                          │ leader                          (Propose / Read)
//!                                          ▼
//!                         writes: batcher ─▶ openraft ─▶ storage
//!                         reads:  read_index (ReadIndex round) ─▶ SmReader
//!                                          │
//!        pb::response / pb::etcd::response ◀┘   errors ─▶ errors.rs, pb/etcd/errors.rs
//! ```
//!
//! Watches are not routed: `watch_hub` serves each stream from this member's applied state,
//! pulling events from the state machine (memory for recent revisions, the history for older
//! ones). Leases: grants and revokes are writes; keep-alives renew the deadline on the leader
//! (`lessor`), forwarded through its peer port by followers; the leader's `tasks::leases`
//! revokes expired leases through Raft.
//!
//! Peers talk on a separate port: `network` sends openraft's RPCs, `service::raft` receives
//! them, checking the cluster id and the intended node id on every message. The membership
//! task bootstraps, joins and reconciles membership with no operator; `identity` turns the pod
//! name into an ordinal and addresses. `service::ops` serves the cluster page (`/`), its data
//! (`/status.json`), `/metrics`, `/healthz` and `/readyz`. On the client port, requests that
//! are not gRPC go to `gateway`, etcd's JSON gateway, which calls the same etcd service handlers.
//!
//! # Layers
//!
//! Modules import only from layers below their own (a test, `layers_point_one_way`, fails the
//! build otherwise), and no service or task imports another:
//!
//! | layer | modules | role |
//! |---|---|---|
//! | 6 assembly | [`node`] | start, handle, shutdown |
//! | 5 assembly | [`server`] | the three listeners and servers |
//! | 4 services | [`service::kv`], [`service::etcd`], [`service::cluster`], [`service::raft`], [`service::ops`], [`gateway`] | one file per gRPC service (etcd's eight under `service::etcd`), the ops HTTP endpoints (cluster page, status JSON, metrics, probes), and etcd's JSON gateway (generic over etcd's services, so it imports none) |
//! | 4 tasks | [`tasks::membership`], [`tasks::replicas`], [`tasks::raft_metrics`], [`tasks::leases`], [`tasks::compactor`], [`tasks::quota`] | background work; the compactor, the lease expirer, the quota, Raft-metrics and replicas tasks are given only what they use (a `member::Proposer`, the reader, the lessor, the alarm cell, channels); the membership task still holds the whole `LocalMember` |
//! | 3 member | [`member`] | this member's shared state: identity, Raft, routing, the write and read entry points, lifecycle |
//! | 2 transport and pipeline | [`network`], [`forward`], [`batcher`], [`read_index`], [`watch_hub`], [`lessor`], [`recovery`], [`tls`], [`auth`] | peer RPCs out, forwarding to the leader, write batching, shared ReadIndex rounds, watch streams, lease deadlines, restore and quorum-loss recovery of the volume before Raft starts, TLS on the listeners and its rotation, who a caller is and what it may do |
//! | 1 leaves | [`config`], [`identity`], [`errors`], [`metrics`], [`logging`], [`pb`], [`query`], [`watch_types`], [`cluster_id`], [`channels`], [`devcerts`], [`timeline`] | configuration, identity, errors and their one mapping, observability (metrics, the ops page's samples and events), wire conversions, the domain form of reads and watch messages, the cluster id cell, the peer-channel cache, throwaway certificates for local clusters and tests |
//!
//! # Caveats
//!
//! * A leader that stops hands leadership over first (openraft 0.10's `transfer_leader`); a
//!   leader that crashes costs the cluster an election timeout of write unavailability.
//! * The log's fsync runs on its own thread and openraft does not wait for it before it
//!   replicates, so a disk stall on the leader delays commits but not heartbeats.
//! * Lease deadlines live in the leader's memory (as in etcd); a new leader gives every lease a
//!   full TTL plus an election timeout, so expiry can be late after a failover, never early.

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

// Layer 1: leaves.
pub mod channels;
pub mod cluster_id;
pub mod config;
pub mod devcerts;
pub mod errors;
pub mod identity;
pub mod logging;
pub mod metrics;
pub mod pb;
pub mod query;
pub mod timeline;
pub mod watch_types;
// Layer 2: transport and pipeline.
pub mod auth;
pub mod batcher;
pub mod forward;
pub mod lessor;
pub mod network;
pub mod read_index;
pub mod recovery;
pub mod tls;
pub mod watch_hub;
// Layer 3: the member's shared state.
pub mod member;
// Layer 4: services and background tasks.
pub mod gateway;
pub mod service;
pub mod tasks;
// Layers 5 and 6: assembly.
pub mod node;
pub mod server;

#[cfg(test)]
mod layers_test;

#[cfg(test)]
mod fuzz_test;

pub use config::Config;
pub use node::Listeners;
pub use node::Node;
pub use node::NodeHandle;
pub use node::NodeOptions;
pub use node::StartError;
pub use node::StopError;
