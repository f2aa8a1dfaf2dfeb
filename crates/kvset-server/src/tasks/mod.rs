//! Background tasks of a member, each started by `node.rs` and stopped by its stop signal.
//!
//! * [`membership`] — bootstrap, join, and (on the leader) reconciliation of the membership
//!   with the desired replica count; its decisions are a pure function ([`membership::plan`]);
//! * [`replicas`] — the StatefulSet's `spec.replicas`, watched through the Kubernetes API;
//! * [`raft_metrics`] — openraft's metrics mirrored into Prometheus, elections counted, the
//!   volume's size measured;
//! * [`leases`] — the leader revokes expired leases;
//! * [`compactor`] — the leader compacts history by the retention config;
//! * [`quota`] — the space quota: NOSPACE alarms for members past `quota_bytes`.
//!
//! A task receives what it uses: the replicas task a config and a counter, the metrics task the
//! Raft metrics channel, the metrics and the leadership clock. Tasks never import one another
//! or a service.

pub mod compactor;
pub mod leases;
pub mod membership;
pub mod quota;
pub mod raft_metrics;
pub mod replicas;
