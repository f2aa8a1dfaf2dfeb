//! Reaching the leader from a follower: the call context every handler reads, the clients for
//! other members' client ports, and what a failed call to the leader means.
//!
//! Any member accepts any call (docs/architecture.md, "Request paths"). Commands, linearizable
//! reads and lease renewals that reach a follower go to the leader's peer port
//! (`LocalMember::execute`, `::read`, `::renew_lease`), whose replies carry the leader's errors
//! as data ([`peer_call_error`] maps the rest). Cluster administration calls are still re-sent
//! to the leader's client port with the `kvset-forwarded` metadata entry and the caller's
//! remaining deadline ([`Forwarder::cluster`], [`forwarded_error`]). A forwarded request is
//! never forwarded again: a member that is not the leader when one arrives answers
//! `UNAVAILABLE` with its own leader hint.

use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use kvset_proto::is_connect_error;
use kvset_proto::metadata;
use kvset_proto::v1::cluster_client::ClusterClient;
use kvset_proto::v1::kv_client::KvClient;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crate::auth::Credentials;
use crate::channels::PeerChannels;
use crate::errors::KvError;

/// Largest response accepted from the leader.
pub const CLIENT_MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Deadline used when the caller sent none.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);

/// What a handler needs to know about the incoming call.
#[derive(Debug, Clone)]
pub struct CallContext {
    /// The request was forwarded by another member.
    pub forwarded: bool,
    /// When the caller stops waiting.
    pub deadline: Instant,
    /// Who the caller says it is (checked by `crate::auth`).
    pub credentials: Credentials,
    /// The request came over the peer port (from another member).
    pub from_peer_port: bool,
    /// The member ordinal the connection's TLS certificate names, if any: with the forwarding
    /// marker (or on the peer port) a current member vouches for the caller, which it checked
    /// (see `LocalMember::authorize`). A client's own `kvset-forwarded` entry never does.
    pub member: Option<u32>,
    /// The caller the forwarding member authenticated (forwarded reads name it, so that the
    /// leader checks them against its own, newest state).
    pub user: Option<String>,
}

impl CallContext {
    /// Reads the forwarding marker and the `grpc-timeout` deadline of a request.
    pub fn of<T>(request: &tonic::Request<T>) -> Self {
        let md = request.metadata();
        let timeout = md
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .unwrap_or(DEFAULT_DEADLINE);
        Self {
            forwarded: md.get(metadata::FORWARDED).is_some(),
            deadline: Instant::now() + timeout,
            credentials: Credentials::of(request),
            from_peer_port: false,
            member: request.extensions().get::<crate::tls::ConnInfo>().and_then(|c| c.member),
            user: None,
        }
    }

    /// The same call, received from another member on the peer port: never forwarded again,
    /// its caller already checked there.
    pub fn forwarded(self) -> Self {
        Self { forwarded: true, from_peer_port: true, ..self }
    }

    /// Time left before the deadline.
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Wraps `message` for forwarding: marker plus the remaining deadline.
    pub fn forward<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.metadata_mut().insert(metadata::FORWARDED, MetadataValue::from_static("true"));
        // The receiver checks the caller again unless it can tell this member vouches.
        if let Some(token) = self.credentials.token.as_deref().and_then(|t| MetadataValue::try_from(t).ok()) {
            request.metadata_mut().insert("token", token);
        }
        request.set_timeout(self.remaining());
        request
    }
}

/// Parses a `grpc-timeout` header value ("100m", "5S", "2H").
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Clients for other members' client endpoints, over the member's shared channels.
#[derive(Debug, Clone)]
pub struct Forwarder {
    channels: Arc<PeerChannels>,
}

impl Forwarder {
    /// A forwarder over `channels`.
    pub fn new(channels: Arc<PeerChannels>) -> Self {
        Self { channels }
    }

    fn channel(&self, name: &str, addr: &str) -> Result<Channel, KvError> {
        self.channels.get(name, addr).map_err(|e| KvError::Unavailable(format!("member {name}: {e}")))
    }

    /// A Kv client for the member `name` at `addr`.
    pub fn kv(&self, name: &str, addr: &str) -> Result<KvClient<Channel>, KvError> {
        Ok(KvClient::new(self.channel(name, addr)?)
            .max_decoding_message_size(CLIENT_MAX_MESSAGE_BYTES)
            .max_encoding_message_size(CLIENT_MAX_MESSAGE_BYTES))
    }

    /// A Cluster client for the member `name` at `addr`.
    pub fn cluster(&self, name: &str, addr: &str) -> Result<ClusterClient<Channel>, KvError> {
        Ok(ClusterClient::new(self.channel(name, addr)?)
            .max_decoding_message_size(CLIENT_MAX_MESSAGE_BYTES)
            .max_encoding_message_size(CLIENT_MAX_MESSAGE_BYTES))
    }
}

/// Whether a status came from the server (it carries no transport error): the leader answered.
fn answered_by_server(status: &tonic::Status) -> bool {
    use std::error::Error;
    let mut source = status.source();
    while let Some(e) = source {
        if e.downcast_ref::<tonic::transport::Error>().is_some()
            || e.downcast_ref::<std::io::Error>().is_some()
        {
            return false;
        }
        source = e.source();
    }
    true
}

/// Maps the outcome of a call forwarded to the leader's client port (cluster admin calls),
/// where the leader answers with gRPC statuses. `write` tells whether the request changes
/// state, in which case a lost connection makes the outcome unknown.
pub fn forwarded_error(status: tonic::Status, leader_addr: &str, write: bool) -> KvError {
    if answered_by_server(&status) {
        return KvError::Remote(status);
    }
    lost_call(status, leader_addr, write)
}

/// Maps the gRPC status of a call to the leader's peer port, whose answers, errors included,
/// travel as data: a status is never the leader's answer. `write` tells whether the request
/// changes state: then anything but a connection that could not be made leaves the outcome
/// unknown — the leader may have applied the command and its answer was lost or could not be
/// read (larger than `limits.forward_response_max_bytes`, say).
pub fn peer_call_error(status: tonic::Status, leader_addr: &str, write: bool) -> KvError {
    lost_call(status, leader_addr, write)
}

fn lost_call(status: tonic::Status, leader_addr: &str, write: bool) -> KvError {
    if is_connect_error(&status) || !write {
        return KvError::NoLeader {
            leader_id: None,
            leader_addr: Some(leader_addr.to_string()),
            reason: format!("could not reach the leader at {leader_addr}: {}", status.message()),
        };
    }
    KvError::Indeterminate(format!(
        "the leader at {leader_addr} may have applied the write, but its answer was lost: {}",
        status.message()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("7"), None);
        assert_eq!(parse_grpc_timeout("xS"), None);
        assert_eq!(parse_grpc_timeout("5X"), None);
    }
}
