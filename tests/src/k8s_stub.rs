//! A stub Kubernetes API server that serves one StatefulSet, for the `kubernetes` replicas
//! source. It speaks the real wire format: the `apps/v1` StatefulSet JSON on `GET`, a
//! `StatefulSetList` on a list by field selector, and a streaming watch (`?watch=true`) of
//! newline-delimited `{"type": ..., "object": ...}` events. It records every request so tests
//! can check the client asks for exactly what the RBAC Role allows (get, list and watch of its
//! own StatefulSet, selected by name).

use std::sync::Arc;
use std::sync::Mutex;

use axum::body::Body;
use axum::extract::Path;
use axum::extract::RawQuery;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use serde_json::json;
use tokio::sync::watch;

/// A running stub API server.
#[derive(Debug, Clone)]
pub struct K8sStub {
    pub url: String,
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    namespace: String,
    name: String,
    replicas: watch::Sender<(i32, u64)>,
    requests: Mutex<Vec<String>>,
}

fn object(inner: &Inner, replicas: i32, version: u64) -> serde_json::Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {
            "name": inner.name,
            "namespace": inner.namespace,
            "resourceVersion": version.to_string(),
            "uid": "4b1b7c4e-0000-4000-8000-000000000001",
        },
        "spec": {
            "replicas": replicas,
            "serviceName": "kvset-peers",
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": {"app.kubernetes.io/name": "kvset"}},
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/name": "kvset"}},
                "spec": {"containers": [{"name": "kvset", "image": "kvset:dev"}]},
            },
        },
        "status": {"replicas": replicas, "availableReplicas": replicas},
    })
}

impl K8sStub {
    /// Serves StatefulSet `namespace/name` with `replicas` on loopback.
    pub async fn start(namespace: &str, name: &str, replicas: i32) -> Self {
        Self::start_on("127.0.0.1", namespace, name, replicas).await
    }

    /// Serves on `ip` (e.g. a Docker network's gateway, for containers).
    pub async fn start_on(ip: &str, namespace: &str, name: &str, replicas: i32) -> Self {
        let (tx, _) = watch::channel((replicas, 1));
        let inner = Arc::new(Inner {
            namespace: namespace.into(),
            name: name.into(),
            replicas: tx,
            requests: Mutex::default(),
        });
        let app = Router::new()
            .route("/apis/apps/v1/namespaces/{ns}/statefulsets", get(list_or_watch))
            .route("/apis/apps/v1/namespaces/{ns}/statefulsets/{name}", get(get_one))
            .fallback(fallback)
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.expect("bind stub");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, inner }
    }

    /// Changes `spec.replicas` (as `kubectl scale` would); watchers get a MODIFIED event.
    pub fn scale(&self, replicas: i32) {
        self.inner.replicas.send_modify(|(r, v)| {
            *r = replicas;
            *v += 1;
        });
    }

    /// Every request seen, as "METHOD path?query".
    pub fn requests(&self) -> Vec<String> {
        self.inner.requests.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn log(inner: &Inner, path: &str, query: &Option<String>) {
    let line = match query {
        Some(q) => format!("GET {path}?{q}"),
        None => format!("GET {path}"),
    };
    inner.requests.lock().unwrap_or_else(|e| e.into_inner()).push(line);
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response {
    (status, [("content-type", "application/json")], body.to_string()).into_response()
}

fn not_found(what: &str) -> Response {
    json_response(
        StatusCode::NOT_FOUND,
        json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": format!("{what} not found"), "reason": "NotFound", "code": 404
        }),
    )
}

async fn get_one(
    State(inner): State<Arc<Inner>>,
    Path((ns, name)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Response {
    log(&inner, &format!("/apis/apps/v1/namespaces/{ns}/statefulsets/{name}"), &query);
    if ns != inner.namespace || name != inner.name {
        return not_found(&format!("statefulsets.apps \"{name}\""));
    }
    let (r, v) = *inner.replicas.borrow();
    json_response(StatusCode::OK, object(&inner, r, v))
}

async fn list_or_watch(
    State(inner): State<Arc<Inner>>,
    Path(ns): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    log(&inner, &format!("/apis/apps/v1/namespaces/{ns}/statefulsets"), &query);
    let q = query.unwrap_or_default();
    if ns != inner.namespace {
        return (StatusCode::FORBIDDEN, "only the StatefulSet's own namespace is allowed").into_response();
    }
    // RBAC with resourceNames allows a list or watch only when it selects that one name.
    if !q.contains(&format!("fieldSelector=metadata.name%3D{}", inner.name)) {
        return (StatusCode::FORBIDDEN, "list and watch must select the StatefulSet by name").into_response();
    }
    if !q.contains("watch=true") {
        let (r, v) = *inner.replicas.borrow();
        return json_response(
            StatusCode::OK,
            json!({
                "apiVersion": "apps/v1",
                "kind": "StatefulSetList",
                "metadata": {"resourceVersion": v.to_string()},
                "items": [object(&inner, r, v)],
            }),
        );
    }
    let mut rx = inner.replicas.subscribe();
    rx.mark_unchanged();
    let stream = async_stream(inner.clone(), rx);
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn async_stream(
    inner: Arc<Inner>,
    rx: watch::Receiver<(i32, u64)>,
) -> impl futures::Stream<Item = Result<String, std::io::Error>> {
    futures::stream::unfold((inner, rx), |(inner, mut rx)| async move {
        rx.changed().await.ok()?;
        let (r, v) = *rx.borrow_and_update();
        let line = format!("{}\n", json!({"type": "MODIFIED", "object": object(&inner, r, v)}));
        Some((Ok(line), (inner, rx)))
    })
}

async fn fallback(State(inner): State<Arc<Inner>>, uri: axum::http::Uri) -> Response {
    log(&inner, uri.path(), &uri.query().map(str::to_string));
    not_found(uri.path())
}
