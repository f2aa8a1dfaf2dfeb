//! The Kubernetes replicas source: the desired voter count is the StatefulSet's
//! `spec.replicas` (docs/architecture.md, "Membership"), read through the Kubernetes API.
//!
//! With `replicas_source = "kubernetes"` every member watches its own StatefulSet (name = the
//! set part of its pod name, namespace from `POD_NAMESPACE`) with kube's `watcher` (list, then
//! watch from that resource version, re-listing and backing off on errors by itself). The
//! leader's reconciler reads the latest value (see `membership`). RBAC needed: `get`, `list`
//! and `watch` on that one StatefulSet (`deploy/k8s/base/rbac.yaml`).
//!
//! In a pod the API server and credentials come from the in-cluster environment
//! (`KUBERNETES_SERVICE_HOST`, the service account token and CA); `kubernetes_api_url`
//! overrides it (tests point it at a stub server speaking the real JSON).
//!
//! The task sees only what it needs: the API location, the StatefulSet's name and namespace,
//! and the counter it keeps up to date.

use std::sync::atomic::AtomicU32;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use kube::api::Api;
use kube::runtime::watcher;
use kube::runtime::WatchStreamExt;
use tokio::sync::watch;

/// Where the StatefulSet is and how to reach the API.
#[derive(Debug, Clone)]
pub struct StatefulSetRef {
    /// `kubernetes_api_url`; empty for the in-cluster API.
    pub api_url: String,
    pub namespace: String,
    pub name: String,
}

/// Why the StatefulSet could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReplicasError {
    #[error("not running in a Kubernetes pod: {0}")]
    NotInCluster(String),
    #[error("kubernetes_api_url {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("cannot build a Kubernetes client: {0}")]
    Client(String),
    #[error("timed out reading StatefulSet {0}")]
    Timeout(String),
    #[error("reading StatefulSet {name}: {reason}")]
    Api { name: String, reason: String },
}

impl StatefulSetRef {
    fn api(&self) -> Result<Api<StatefulSet>, ReplicasError> {
        let config = if self.api_url.is_empty() {
            kube::Config::incluster().map_err(|e| ReplicasError::NotInCluster(e.to_string()))?
        } else {
            let url = self.api_url.parse().map_err(|e: http::uri::InvalidUri| ReplicasError::BadUrl {
                url: self.api_url.clone(),
                reason: e.to_string(),
            })?;
            kube::Config::new(url)
        };
        let client = kube::Client::try_from(config).map_err(|e| ReplicasError::Client(e.to_string()))?;
        Ok(Api::namespaced(client, &self.namespace))
    }
}

/// `spec.replicas` of `sts` (Kubernetes defaults a missing value to 1).
fn replicas_of(sts: &StatefulSet) -> u32 {
    sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1).max(0) as u32
}

fn record(counter: &AtomicU32, name: &str, n: u32) {
    let old = counter.swap(n, Ordering::AcqRel);
    if old != n {
        tracing::info!(statefulset = %name, replicas = n, previous = old, "StatefulSet spec.replicas");
    }
}

/// Reads `spec.replicas` once (used at SIGTERM, when the watch may lag the scale-down), and
/// records it in `counter`.
pub async fn fetch_once(sts: &StatefulSetRef, counter: &AtomicU32) -> Result<u32, ReplicasError> {
    let api = sts.api()?;
    let found = tokio::time::timeout(Duration::from_secs(5), api.get(&sts.name))
        .await
        .map_err(|_| ReplicasError::Timeout(sts.name.clone()))?
        .map_err(|e| ReplicasError::Api { name: sts.name.clone(), reason: e.to_string() })?;
    let n = replicas_of(&found);
    record(counter, &sts.name, n);
    Ok(n)
}

/// Keeps `counter` equal to the StatefulSet's `spec.replicas` until `stop`.
pub async fn run(sts: StatefulSetRef, counter: Arc<AtomicU32>, mut stop: watch::Receiver<bool>) {
    let api = match sts.api() {
        Ok(api) => api,
        Err(e) => {
            tracing::error!(error = %e, "the kubernetes replicas source cannot start; scaling follows the last known count");
            return;
        }
    };
    let config = watcher::Config::default().fields(&format!("metadata.name={}", sts.name));
    let mut objects = std::pin::pin!(watcher(api, config).default_backoff().applied_objects());
    loop {
        tokio::select! {
            next = objects.next() => match next {
                Some(Ok(found)) => record(&counter, &sts.name, replicas_of(&found)),
                Some(Err(e)) => tracing::warn!(statefulset = %sts.name, error = %e, "watching the StatefulSet; retrying"),
                None => return,
            },
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
