//! The Kubernetes replicas source: the desired voter count is the StatefulSet's
//! `spec.replicas` (DESIGN.md §3), read through the Kubernetes API.
//!
//! With `replicas_source = "kubernetes"` every member gets its own StatefulSet (name = the set
//! part of its pod name, namespace from `POD_NAMESPACE`) and then watches it from that
//! resource version; a closed or failed watch is re-established with backoff. The leader's
//! reconciler reads the latest value (see `membership`). RBAC needed: `get` and `watch` on
//! that one StatefulSet (`deploy/k8s/rbac.yaml`).
//!
//! In a pod the API server and credentials come from the in-cluster environment
//! (`KUBERNETES_SERVICE_HOST`, the service account token and CA); `kubernetes_api_url`
//! overrides it (tests point it at a stub server speaking the real JSON).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::TryStreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use kube::api::Api;
use kube::api::WatchEvent;
use kube::api::WatchParams;
use tokio::sync::watch;

use crate::node::NodeShared;

/// Builds a Kubernetes client from the config (in-cluster unless `kubernetes_api_url`).
pub fn client(shared: &NodeShared) -> Result<kube::Client, String> {
    let config = if shared.config.kubernetes_api_url.is_empty() {
        kube::Config::incluster().map_err(|e| format!("not running in a Kubernetes pod: {e}"))?
    } else {
        let url = shared
            .config
            .kubernetes_api_url
            .parse()
            .map_err(|e| format!("kubernetes_api_url {:?}: {e}", shared.config.kubernetes_api_url))?;
        kube::Config::new(url)
    };
    kube::Client::try_from(config).map_err(|e| format!("cannot build a Kubernetes client: {e}"))
}

fn api(shared: &NodeShared, client: kube::Client) -> Api<StatefulSet> {
    Api::namespaced(client, &shared.config.namespace)
}

/// Records `spec.replicas` of `sts` (Kubernetes defaults a missing value to 1).
fn record(shared: &NodeShared, sts: &StatefulSet) -> u32 {
    let n = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1).max(0) as u32;
    let old = shared.k8s_replicas.swap(n, Ordering::AcqRel);
    if old != n {
        tracing::info!(statefulset = %shared.identity.set, replicas = n, previous = old, "StatefulSet spec.replicas");
    }
    n
}

/// Reads `spec.replicas` once (used at SIGTERM, when the watch may lag the scale-down).
pub async fn fetch_once(shared: &NodeShared) -> Result<u32, String> {
    let api = api(shared, client(shared)?);
    let sts = tokio::time::timeout(Duration::from_secs(5), api.get(&shared.identity.set))
        .await
        .map_err(|_| "timed out reading the StatefulSet".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(record(shared, &sts))
}

/// Keeps `shared.k8s_replicas` up to date until `stop`.
pub async fn run(shared: Arc<NodeShared>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(500);
    loop {
        let round = async {
            let api = api(&shared, client(&shared)?);
            let name = shared.identity.set.clone();
            let sts = api.get(&name).await.map_err(|e| format!("get statefulset {name}: {e}"))?;
            record(&shared, &sts);
            let version = sts.metadata.resource_version.clone().unwrap_or_else(|| "0".into());
            let params = WatchParams::default().fields(&format!("metadata.name={name}")).timeout(290);
            let mut events = api
                .watch(&params, &version)
                .await
                .map_err(|e| format!("watch statefulset {name}: {e}"))?
                .boxed();
            while let Some(event) =
                events.try_next().await.map_err(|e| format!("watch statefulset {name}: {e}"))?
            {
                match event {
                    WatchEvent::Added(s) | WatchEvent::Modified(s) => {
                        record(&shared, &s);
                    }
                    WatchEvent::Deleted(_) => {
                        tracing::warn!(statefulset = %name, "the StatefulSet was deleted; keeping the last replica count");
                    }
                    WatchEvent::Bookmark(_) => {}
                    WatchEvent::Error(e) => return Err(format!("watch statefulset {name}: {}", e.message)),
                }
            }
            Ok::<(), String>(())
        };
        let outcome = tokio::select! {
            r = round => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        match outcome {
            Ok(()) => backoff = Duration::from_millis(500),
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "Kubernetes replicas source");
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
