//! One kvset member, as a library: `Node::start(config, listeners, shutdown, options)` returns a
//! [`NodeHandle`]; the `kvset` binary and the tests use the same entry point.
//!
//! # How a request flows
//!
//! ```text
//! client ──gRPC──▶ kv_service ──▶ pb::request (limits) ──▶ node::route
//!                                                           │ leader?      │ follower
//!                                                           ▼              ▼
//!                         writes: batcher ─▶ openraft ─▶ storage    forward ─▶ leader
//!                         reads:  ReadIndex barrier ─▶ SmReader
//!                                                           │
//!                                   pb::response ◀──────────┘   errors ─▶ errors.rs (one mapping)
//! ```
//!
//! Peers talk on a separate port: `network` sends openraft's RPCs, `raft_service` receives
//! them, checking the cluster id and the intended node id on every message. The `membership`
//! task bootstraps, joins and reconciles membership with no operator; `identity` turns the pod
//! name into an ordinal and addresses. `ops` serves `/metrics`, `/healthz` and `/readyz`.
//!
//! # Module map
//!
//! | module | role |
//! |---|---|
//! | [`config`] | the one config struct, its defaults table and layered loading |
//! | [`identity`] | ordinal from the pod name; address templates |
//! | [`node`] | start, shared state, routing, shutdown |
//! | [`membership`] | bootstrap rule, join, promotion, replacement, scale-down |
//! | [`replicas`] | desired replicas from the StatefulSet (Kubernetes API) |
//! | [`batcher`] | many client writes → one Raft entry |
//! | [`read_index`] | concurrent linearizable reads share one ReadIndex round |
//! | [`kv_service`], [`cluster_service`] | client-facing gRPC |
//! | [`raft_service`], [`network`] | peer gRPC, both directions |
//! | [`forward`] | follower → leader forwarding |
//! | [`errors`] | every client error and its gRPC status, in one place |
//! | [`pb`] | protobuf ↔ domain conversions, limits |
//! | [`metrics`], [`ops`], [`logging`] | observability |
//!
//! # Caveats
//!
//! * openraft 0.9 has no leadership transfer: `TransferLeader` is `UNIMPLEMENTED` and a leader
//!   that shuts down costs the cluster about one election timeout of write unavailability.
//! * openraft 0.9 fsyncs once per entry and holds its core loop during the flush, so a disk
//!   stall also stalls heartbeats; the default election timeout (2.5–5 s) sits above the
//!   1–2 s stalls measured on shared disks.
//! * Watch, leases and Backup are specified in the protos but answer `UNIMPLEMENTED`.

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod batcher;
pub mod cluster_service;
pub mod config;
pub mod errors;
pub mod forward;
pub mod identity;
pub mod kv_service;
pub mod logging;
pub mod membership;
pub mod metrics;
pub mod network;
pub mod node;
pub mod ops;
pub mod pb;
pub mod raft_service;
pub mod read_index;
pub mod replicas;
pub mod server;

pub use config::Config;
pub use node::Listeners;
pub use node::Node;
pub use node::NodeHandle;
pub use node::NodeOptions;
pub use node::StartError;
