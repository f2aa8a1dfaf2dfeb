//! Errors of the client-facing services, and their one mapping to gRPC status codes.
//!
//! | error | code | metadata |
//! |---|---|---|
//! | [`KvError::InvalidArgument`] | `INVALID_ARGUMENT` | — |
//! | [`KvError::NoLeader`] | `UNAVAILABLE` | `kvset-not-applied`, `kvset-leader`, `kvset-leader-id` (when known) |
//! | [`KvError::Unavailable`] | `UNAVAILABLE` | `kvset-not-applied` |
//! | [`KvError::Indeterminate`] | `UNKNOWN` | — (a write may or may not have been applied) |
//! | [`KvError::DeadlineExceeded`] | `DEADLINE_EXCEEDED` | — |
//! | [`KvError::Unimplemented`] | `UNIMPLEMENTED` | — |
//! | [`KvError::FailedPrecondition`] | `FAILED_PRECONDITION` | — |
//! | [`KvError::Internal`] | `INTERNAL` | — |
//! | [`KvError::Remote`] | whatever the leader answered | passed through |
//!
//! Messages are stable: clients and tests may match on their first words.

use kvset_proto::metadata;
use tonic::metadata::MetadataMap;
use tonic::metadata::MetadataValue;
use tonic::Code;
use tonic::Status;

/// An error answered to a client.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// The request breaks a limit or is malformed; nothing was applied.
    #[error("{0}")]
    InvalidArgument(String),
    /// No leader could serve the request; nothing was applied.
    #[error("no leader: {reason}")]
    NoLeader { leader_id: Option<u64>, leader_addr: Option<String>, reason: String },
    /// The member cannot take the request now (shutting down, overloaded); nothing was applied.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A write's outcome is unknown: it may or may not have been applied.
    #[error("outcome unknown: {0}")]
    Indeterminate(String),
    /// The request's deadline passed; a write may or may not have been applied.
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    /// The call is part of the contract but not served by this version.
    #[error("not implemented: {0}")]
    Unimplemented(String),
    /// The cluster is not in a state that allows the request.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A storage or internal error; the member stops itself after a storage error.
    #[error("internal error: {0}")]
    Internal(String),
    /// The status the leader answered to a forwarded request.
    #[error("{0}")]
    Remote(Status),
}

impl KvError {
    /// An `INVALID_ARGUMENT` error naming a limit: "`what` is `got` bytes, limit `name` = `max`".
    pub fn over_limit(what: &str, got: u64, name: &str, max: u64) -> Self {
        KvError::InvalidArgument(format!("{what} is {got}, over the limit {name} = {max}"))
    }
}

fn not_applied(map: &mut MetadataMap) {
    map.insert(metadata::NOT_APPLIED, MetadataValue::from_static("true"));
}

impl From<KvError> for Status {
    fn from(e: KvError) -> Status {
        let message = e.to_string();
        let mut map = MetadataMap::new();
        let code = match e {
            KvError::InvalidArgument(_) => Code::InvalidArgument,
            KvError::NoLeader { leader_id, leader_addr, .. } => {
                not_applied(&mut map);
                if let Some(addr) = leader_addr.and_then(|a| MetadataValue::try_from(a.as_str()).ok()) {
                    map.insert(metadata::LEADER, addr);
                }
                if let Some(id) = leader_id {
                    map.insert(metadata::LEADER_ID, MetadataValue::from(id));
                }
                Code::Unavailable
            }
            KvError::Unavailable(_) => {
                not_applied(&mut map);
                Code::Unavailable
            }
            KvError::Indeterminate(_) => Code::Unknown,
            KvError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            KvError::Unimplemented(_) => Code::Unimplemented,
            KvError::FailedPrecondition(_) => Code::FailedPrecondition,
            KvError::Internal(_) => Code::Internal,
            KvError::Remote(status) => return status,
        };
        Status::with_metadata(code, message, map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_leader_carries_the_hint_and_the_not_applied_marker() {
        let status: Status = KvError::NoLeader {
            leader_id: Some(7),
            leader_addr: Some("10.0.0.7:2379".into()),
            reason: "x".into(),
        }
        .into();
        assert_eq!(status.code(), Code::Unavailable);
        let md = status.metadata();
        assert_eq!(md.get(metadata::LEADER).unwrap(), "10.0.0.7:2379");
        assert_eq!(md.get(metadata::LEADER_ID).unwrap(), "7");
        assert_eq!(md.get(metadata::NOT_APPLIED).unwrap(), "true");
    }

    #[test]
    fn indeterminate_outcomes_are_not_marked_retryable() {
        let status: Status = KvError::Indeterminate("raft stopped".into()).into();
        assert_eq!(status.code(), Code::Unknown);
        assert!(status.metadata().get(metadata::NOT_APPLIED).is_none());
    }
}
