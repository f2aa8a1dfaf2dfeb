//! The ops HTTP endpoints on the ops port.
//!
//! * `GET /` — the cluster page: one self-contained HTML file (inline CSS, JavaScript and SVG;
//!   no build step, no external assets) that polls `/status.json` every two seconds and draws
//!   the members, the leader, lag, volumes against the quota, alarms, the reconciler, recent
//!   membership events and charts of the last ten minutes ([`PAGE`]).
//! * `GET /status.json` — what the page shows, for scripts too ([`status::ClusterStatus`]
//!   documents every field). Answered by any member, with what it knows: the others are asked
//!   for their `Cluster.Status` (at most once a second, each bounded by a one-second timeout),
//!   and a member that does not answer is shown as unreachable since the last answer.
//! * `GET /metrics` — Prometheus text (see [`crate::metrics`]).
//! * `GET /healthz` — 200 while the process runs (liveness).
//! * `GET /readyz` — 200 while this member's storage is open and its servers serve; 503 while
//!   starting or shutting down. Member-local on purpose: it never requires a leader or a
//!   quorum, or a StatefulSet could neither start nor roll (docs/architecture.md,
//!   "Lifecycle").
//!
//! The endpoints see only what [`OpsSource`] gives them: the member's lifecycle phase, its
//! metrics and timeline, and a [`status::StatusSource`] of closures that `node.rs` builds.
//! Like `/metrics`, the page and `/status.json` need no credentials (etcd's metrics URLs do
//! not either): they show names, indexes, sizes and alarms, never keys or values. With
//! `tls.ops` they are served over TLS like the rest of the port.

pub mod status;

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::sync::watch;

use crate::member::Phase;
use crate::metrics::Metrics;
use crate::timeline::Timeline;
use status::PeerView;
use status::StatusSource;

/// Paths served on the ops port (the manifests' probes must use these).
pub const PATHS: &[&str] = &["/metrics", "/healthz", "/readyz", "/", "/status.json"];

/// The cluster page (`GET /`).
pub const PAGE: &str = include_str!("page.html");

/// What the ops endpoints read.
#[allow(missing_debug_implementations)]
pub struct OpsSource {
    /// The member's lifecycle phase (readiness).
    pub phase: watch::Receiver<Phase>,
    pub metrics: Arc<Metrics>,
    /// Samples and membership events for the page.
    pub timeline: Arc<Timeline>,
    /// This member's status and the way to ask the others for theirs.
    pub status: StatusSource,
}

#[derive(Clone)]
struct Ops {
    phase: watch::Receiver<Phase>,
    metrics: Arc<Metrics>,
    timeline: Arc<Timeline>,
    status: Arc<StatusSource>,
    peers: Arc<PeerView>,
}

/// The ops router over `source`.
pub fn router(source: OpsSource) -> Router {
    let OpsSource { phase, metrics, timeline, status } = source;
    let ops =
        Ops { phase, metrics, timeline, status: Arc::new(status), peers: Arc::new(PeerView::default()) };
    Router::new()
        .route("/", get(page))
        .route("/status.json", get(status_json))
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(ops)
}

async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            // Everything is inline: nothing may be loaded from elsewhere.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
            ),
        ],
        PAGE,
    )
}

async fn status_json(State(ops): State<Ops>) -> impl IntoResponse {
    let body = status::gather(&ops.status, &ops.peers, &ops.metrics, &ops.timeline).await;
    let json = serde_json::to_string(&body).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    ([(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")], json)
}

async fn render_metrics(State(ops): State<Ops>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        ops.metrics.render(),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(ops): State<Ops>) -> (StatusCode, String) {
    let phase = *ops.phase.borrow();
    match phase {
        Phase::Serving => (StatusCode::OK, "ready\n".into()),
        other => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {other:?}\n")),
    }
}
