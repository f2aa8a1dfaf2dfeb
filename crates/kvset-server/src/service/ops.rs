//! The ops HTTP endpoints on the ops port.
//!
//! * `GET /metrics` — Prometheus text (see [`crate::metrics`]).
//! * `GET /healthz` — 200 while the process runs (liveness).
//! * `GET /readyz` — 200 while this member's storage is open and its servers serve; 503 while
//!   starting or shutting down. Member-local on purpose: it never requires a leader or a
//!   quorum, or a StatefulSet could neither start nor roll (DESIGN.md §6).
//!
//! The endpoints see only the member's lifecycle phase and its metrics.

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

/// Paths served on the ops port (the manifests' probes must use these).
pub const PATHS: &[&str] = &["/metrics", "/healthz", "/readyz"];

#[derive(Clone)]
struct Ops {
    phase: watch::Receiver<Phase>,
    metrics: Arc<Metrics>,
}

/// The ops router over a member's phase and metrics.
pub fn router(phase: watch::Receiver<Phase>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Ops { phase, metrics })
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
