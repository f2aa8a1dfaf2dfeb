//! What a handler knows of an incoming call, and what a failed call to the leader means.
//!
//! Any member accepts any call (docs/architecture.md, "Request paths"). Whatever needs the leader — commands, linearizable
//! reads, lease renewals, cluster administration — reaches it one way: its peer port (`Raft`'s
//! `Propose`, `Read`, `LeaseRenew`, `Admin`), with the caller's remaining deadline, and the
//! leader's answer or error comes back as data (see `crate::errors::WireError`). A call that
//! arrives on the peer port is never passed on again: a member that is not the leader when it
//! arrives answers with its own leader hint.

use std::time::Duration;
use std::time::Instant;

use kvset_proto::is_connect_error;

use crate::auth::Credentials;
use crate::errors::KvError;

/// Largest message the client port sends: gRPC's ceiling (2 GiB − 1), what etcd's server
/// sends, so an unpaged etcd Range as large as `limits.unpaged_range_max_bytes` allows fits.
pub const CLIENT_MAX_MESSAGE_BYTES: usize = i32::MAX as usize;

/// Deadline used when the caller sent none.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);

/// What a handler needs to know about the incoming call.
#[derive(Debug, Clone)]
pub struct CallContext {
    /// When the caller stops waiting.
    pub deadline: Instant,
    /// Who the caller says it is (checked by `crate::auth`).
    pub credentials: Credentials,
    /// The request came over the peer port: another member received it from a client and
    /// passed it to this one, the leader (it is never passed on again).
    pub from_peer_port: bool,
    /// The member ordinal the connection's TLS certificate names, if any: on the peer port a
    /// current member vouches for the caller, which it checked (see `LocalMember::authorize`).
    pub member: Option<u32>,
    /// The caller the passing member authenticated (commands, reads and administration name
    /// it, so that the leader checks them against its own, newest state).
    pub user: Option<String>,
}

impl CallContext {
    /// Reads the `grpc-timeout` deadline, the credentials and the TLS identity of a request.
    pub fn of<T>(request: &tonic::Request<T>) -> Self {
        let md = request.metadata();
        let timeout = md
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .unwrap_or(DEFAULT_DEADLINE);
        Self {
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
        Self { from_peer_port: true, ..self }
    }

    /// Time left before the deadline.
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
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
