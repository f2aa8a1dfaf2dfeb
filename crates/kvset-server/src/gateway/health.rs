//! `GET /version` and `GET /health`, as etcd 3.5 answers them on its client port, from the
//! same services the gateway calls.
//!
//! * `/version`: `{"etcdserver":"3.5.21","etcdcluster":"3.5.0"}` — the version `Status`
//!   reports, and its major.minor as the cluster version.
//! * `/health`: `{"health":"true","reason":""}` (200), or `"false"` with etcd's reason (503):
//!   an alarm (`ALARM NOSPACE`; `?exclude=NOSPACE` ignores it), no leader (`RAFT NO LEADER`;
//!   not checked with `?serializable=true`), or a failed read (`RANGE ERROR:…`; a read refused
//!   for want of credentials or permission counts as healthy, as in etcd).

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use kvset_proto::etcdserverpb as epb;
use serde::Serialize;
use tonic::body::Body;
use tonic::Code;

use super::reply;
use super::reply::Reply;
use super::EtcdApi;

/// How long the health check's read may take (etcd: its request timeout).
const HEALTH_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// etcd's `version.Versions`.
#[derive(Serialize)]
struct Versions {
    etcdserver: String,
    etcdcluster: String,
}

/// etcd's `etcdhttp.Health`.
#[derive(Serialize)]
struct Health {
    health: &'static str,
    reason: String,
}

/// `GET /version`.
pub async fn version<A: EtcdApi>(api: &A) -> Reply {
    use epb::maintenance_server::Maintenance;
    let server = match Maintenance::status(api, tonic::Request::new(epb::StatusRequest {})).await {
        Ok(status) => status.into_inner().version,
        Err(_) => "not_decided".to_string(),
    };
    let cluster = match server.split('.').collect::<Vec<_>>().as_slice() {
        [major, minor, ..] => format!("{major}.{minor}.0"),
        _ => "not_decided".to_string(),
    };
    let body = serde_json::to_vec(&Versions { etcdserver: server, etcdcluster: cluster }).unwrap_or_default();
    let mut reply = http::Response::new(Body::new(http_body_util::Full::new(Bytes::from(body))));
    reply
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    reply
}

/// `GET /health[?serializable=true][&exclude=NOSPACE]`.
pub async fn health<A: EtcdApi>(api: &A, query: Option<&str>) -> Reply {
    let params: Vec<(&str, &str)> =
        query.unwrap_or("").split('&').filter_map(|p| p.split_once('=').or(Some((p, "")))).collect();
    let serializable = params.iter().any(|(k, v)| *k == "serializable" && *v == "true");
    let excluded: Vec<&str> = params.iter().filter(|(k, _)| *k == "exclude").map(|(_, v)| *v).collect();
    let checked = check(api, serializable, &excluded).await;
    let healthy = checked.is_ok();
    let health =
        Health { health: if healthy { "true" } else { "false" }, reason: checked.err().unwrap_or_default() };
    let body = serde_json::to_vec(&health).unwrap_or_default();
    if healthy {
        // etcd writes it without a content type; Go sniffs text/plain.
        let mut reply = http::Response::new(Body::new(http_body_util::Full::new(Bytes::from(body))));
        reply
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
        return reply;
    }
    // etcd answers with http.Error: text, a newline, 503.
    let mut text = body;
    text.push(b'\n');
    let mut reply = reply::text(StatusCode::SERVICE_UNAVAILABLE, "");
    *reply.body_mut() = Body::new(http_body_util::Full::new(Bytes::from(text)));
    reply
}

/// etcd's `checkHealth` and `checkV3Health`: `Err(reason)` when unhealthy.
async fn check<A: EtcdApi>(api: &A, serializable: bool, excluded: &[&str]) -> Result<(), String> {
    use epb::kv_server::Kv;
    use epb::maintenance_server::Maintenance;
    let status = Maintenance::status(api, tonic::Request::new(epb::StatusRequest {}))
        .await
        .map_err(|e| format!("STATUS ERROR:{}", e.message()))?
        .into_inner();
    // Status lists each alarm as etcd's AlarmMember text ("memberID:1 alarm:NOSPACE ").
    for alarm in &status.errors {
        let Some(name) = alarm.split("alarm:").nth(1).map(str::trim) else { continue };
        if excluded.contains(&name) {
            continue;
        }
        return Err(match name {
            "NOSPACE" => "ALARM NOSPACE".to_string(),
            "CORRUPT" => "ALARM CORRUPT".to_string(),
            _ => "ALARM UNKNOWN".to_string(),
        });
    }
    if !serializable && status.leader == 0 {
        return Err("RAFT NO LEADER".to_string());
    }
    let mut read = tonic::Request::new(epb::RangeRequest {
        key: b"health".to_vec(),
        keys_only: true,
        limit: 1,
        serializable,
        ..Default::default()
    });
    read.set_timeout(HEALTH_READ_TIMEOUT);
    match Kv::range(api, read).await {
        Ok(_) => Ok(()),
        // No credentials, or no permission: the member answered.
        Err(e) if e.code() == Code::PermissionDenied || e.message().ends_with("user name is empty") => Ok(()),
        Err(e) => Err(format!("RANGE ERROR:{}", e.message())),
    }
}
