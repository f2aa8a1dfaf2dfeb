//! The ops HTTP endpoints on the ops port.
//!
//! * `GET /metrics` — Prometheus text (see [`crate::metrics`]).
//! * `GET /healthz` — 200 while the process runs (liveness).
//! * `GET /readyz` — 200 while this member's storage is open and its servers serve; 503 while
//!   starting or shutting down. Member-local on purpose: it never requires a leader or a
//!   quorum, or a StatefulSet could neither start nor roll (DESIGN.md §6).

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::node::NodeShared;
use crate::node::Phase;

/// Paths served on the ops port (the manifests' probes must use these).
pub const PATHS: &[&str] = &["/metrics", "/healthz", "/readyz"];

/// The ops router.
pub fn router(shared: Arc<NodeShared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(shared)
}

async fn metrics(State(shared): State<Arc<NodeShared>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        shared.metrics.render(),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(shared): State<Arc<NodeShared>>) -> (StatusCode, String) {
    let phase = *shared.phase.borrow();
    match phase {
        Phase::Serving => (StatusCode::OK, "ready\n".into()),
        other => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {other:?}\n")),
    }
}
