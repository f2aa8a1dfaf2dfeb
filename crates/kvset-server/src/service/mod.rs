//! The gRPC services and HTTP endpoints a member serves, one file per service.
//!
//! * [`kv`] — `kvset.v1.Kv` on the client port: keys, ranges, transactions, watches, leases;
//! * [`etcd`] — etcd's v3 services (`etcdserverpb`) on the client port, over the same member;
//! * [`cluster`] — `kvset.v1.Cluster` on the client port: status and membership administration;
//! * [`raft`] — `kvset.v1.Raft` on the peer port: Raft messages, probes and joins;
//! * [`ops`] — HTTP `/metrics`, `/healthz`, `/readyz` on the ops port.
//!
//! Services sit on [`crate::member::LocalMember`] and never import one another; what they share
//! (the per-call span and metrics, `observe`) lives here.

pub mod cluster;
pub mod etcd;
pub mod kv;
pub mod ops;
pub mod raft;

use std::future::Future;
use std::time::Instant;

use tonic::Response;
use tonic::Status;
use tracing::Instrument;

use crate::forward::CallContext;
use crate::metrics::Metrics;

/// The gRPC metadata key with which a client asks that a watch stream end when the member it
/// talks to knows no leader (etcd's `WithRequireLeader`: `hasleader: true`).
pub const REQUIRE_LEADER: &str = "hasleader";

/// Whether the call asks for a member that knows a leader.
pub(crate) fn requires_leader(metadata: &tonic::metadata::MetadataMap) -> bool {
    metadata.get(REQUIRE_LEADER).and_then(|v| v.to_str().ok()) == Some("true")
}

/// Runs a handler inside a span and records its outcome in the metrics.
pub(crate) async fn observe<T, E: Into<Status>>(
    metrics: &Metrics,
    method: &'static str,
    ctx: &CallContext,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<Response<T>, Status> {
    let started = Instant::now();
    let span = tracing::info_span!(
        "request",
        method,
        from_peer_port = ctx.from_peer_port,
        code = tracing::field::Empty
    );
    let result = fut.instrument(span.clone()).await.map_err(Into::into);
    let code = match &result {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    };
    span.record("code", crate::metrics::code_name(code));
    metrics.grpc(method, code, started.elapsed());
    if let Err(status) = &result {
        tracing::debug!(parent: &span, method, code = ?status.code(), message = status.message(), "request failed");
    }
    result.map(Response::new)
}
