//! Errors answered to clients and peers, the one classifier of openraft's errors, and the one
//! mapping to gRPC status codes.
//!
//! | error | code | metadata |
//! |---|---|---|
//! | [`KvError::InvalidArgument`] | `INVALID_ARGUMENT` | — |
//! | [`KvError::NoLeader`] | `UNAVAILABLE` | `kvset-not-applied`, `kvset-leader`, `kvset-leader-id` (when known) |
//! | [`KvError::Unavailable`], [`KvError::Stopping`] | `UNAVAILABLE` | `kvset-not-applied` |
//! | [`KvError::Overloaded`] | `RESOURCE_EXHAUSTED` | `kvset-not-applied` (a transient queue: retry) |
//! | [`KvError::LimitReached`] | `RESOURCE_EXHAUSTED` | — (a table is full: retrying will not help) |
//! | [`KvError::NoSpace`] | `RESOURCE_EXHAUSTED` | — (past `quota_bytes`: free space first) |
//! | [`KvError::Indeterminate`] | `UNKNOWN` | — (a write may or may not have been applied) |
//! | [`KvError::DeadlineExceeded`] | `DEADLINE_EXCEEDED` | — |
//! | [`KvError::Unimplemented`] | `UNIMPLEMENTED` | — |
//! | [`KvError::FailedPrecondition`] | `FAILED_PRECONDITION` | — |
//! | [`KvError::PermissionDenied`] | `PERMISSION_DENIED` | — |
//! | [`KvError::Unauthenticated`] | `UNAUTHENTICATED` | — (log in again) |
//! | [`KvError::LeaseNotFound`] | `NOT_FOUND` | — |
//! | [`KvError::Compacted`], [`KvError::FutureRevision`] | `OUT_OF_RANGE` | — |
//! | [`KvError::Internal`] | `INTERNAL` | — |
//!
//! Messages are stable: clients and tests may match on their first words.
//!
//! # What a failed Raft call means
//!
//! openraft reports three kinds of failure, and each says something different about whether a
//! proposal took effect. [`client_write`], [`membership_change`] and [`read_index`] are the only
//! places that turn them into client errors, so every caller (the write batcher, the cluster
//! service, the ReadIndex rounds, the peer service) answers the same way:
//!
//! * `ForwardToLeader`: this member is not the leader; nothing was appended (or the entry was
//!   truncated), so nothing was applied and another member may take the request.
//! * a membership-change error (`InProgress`, `EmptyMembership`, `LearnerNotFound`, …): the
//!   change was refused before it was proposed: `FAILED_PRECONDITION`, nothing applied.
//! * `Fatal` (Raft stopped, storage failed): a write or membership change may already be in the
//!   log and may yet commit on the other members, so its outcome is **unknown** (`UNKNOWN`,
//!   never marked not-applied). A read changed nothing, so it is simply `UNAVAILABLE`.

use kvset_proto::metadata;
use kvset_storage::TypeConfig;
use openraft::error::ClientWriteError;
use openraft::error::Fatal;
use openraft::error::LinearizableReadError;
use openraft::error::RaftError;
use tonic::metadata::MetadataMap;
use tonic::metadata::MetadataValue;
use tonic::Code;
use tonic::Status;

/// An error answered to a client (or, on the peer port, to another member).
#[derive(Debug, Clone, thiserror::Error)]
pub enum KvError {
    /// The request breaks a limit or is malformed; nothing was applied.
    #[error("{0}")]
    InvalidArgument(String),
    /// No leader could serve the request; nothing was applied.
    #[error("no leader: {reason}")]
    NoLeader { leader_id: Option<u64>, leader_addr: Option<String>, reason: String },
    /// The member cannot take the request now (no quorum confirmed its leadership, a task it
    /// needs ended, an address it needs is unknown); nothing was applied.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The member is stopping (shutting down, or Raft stopped before the request was proposed);
    /// nothing was applied: another member may take the request.
    #[error("unavailable: {0}")]
    Stopping(String),
    /// Too many requests are waiting on this member (a bounded queue is full); nothing was
    /// applied.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// A bounded table is full (leases); nothing was applied.
    #[error("{0}")]
    LimitReached(String),
    /// A member's volume is past `quota_bytes` and the write would add data; nothing was
    /// applied. Not retryable until space is freed.
    #[error("database space exceeded: {0}")]
    NoSpace(String),
    /// A write's outcome is unknown: it may or may not have been applied.
    #[error("outcome unknown: {0}")]
    Indeterminate(String),
    /// The request's deadline passed; a write may or may not have been applied.
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    /// The call is part of the contract but not served by this version.
    #[error("not implemented: {0}")]
    Unimplemented(String),
    /// The cluster is not in a state that allows the request; nothing was applied.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The caller may not make this request (a peer whose certificate names another member);
    /// nothing was applied.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The caller's credentials are not (or no longer) valid; nothing was applied.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The lease the request names does not exist; nothing was applied.
    #[error("{0}")]
    LeaseNotFound(String),
    /// The revision asked for is compacted; nothing was read or applied.
    #[error("{0}")]
    Compacted(String),
    /// The revision asked for is in the future; nothing was read or applied.
    #[error("{0}")]
    FutureRevision(String),
    /// A storage or internal error; the member stops itself after a storage error.
    #[error("internal error: {0}")]
    Internal(String),
}

/// A [`KvError`] as it crosses the hop from the leader to the member that forwarded a request:
/// the kind and the values it names, encoded (postcard) in the peer reply, never a message to
/// parse. The variants keep their places (postcard encodes the index), so members of
/// consecutive releases read each other's errors during a rolling upgrade: new kinds are added
/// at the end.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum WireError {
    InvalidArgument(String),
    NoLeader {
        leader_id: Option<u64>,
        leader_addr: Option<String>,
        reason: String,
    },
    Unavailable(String),
    Overloaded(String),
    LimitReached(String),
    NoSpace(String),
    Indeterminate(String),
    DeadlineExceeded(String),
    Unimplemented(String),
    FailedPrecondition(String),
    PermissionDenied(String),
    Unauthenticated(String),
    LeaseNotFound(String),
    /// The previous release's one kind for both compacted and future revisions.
    Compacted(String),
    Internal(String),
    FutureRevision(String),
    Stopping(String),
}

impl From<KvError> for WireError {
    fn from(e: KvError) -> Self {
        match e {
            KvError::InvalidArgument(m) => WireError::InvalidArgument(m),
            KvError::NoLeader { leader_id, leader_addr, reason } => {
                WireError::NoLeader { leader_id, leader_addr, reason }
            }
            KvError::Unavailable(m) => WireError::Unavailable(m),
            KvError::Overloaded(m) => WireError::Overloaded(m),
            KvError::LimitReached(m) => WireError::LimitReached(m),
            KvError::NoSpace(m) => WireError::NoSpace(m),
            KvError::Indeterminate(m) => WireError::Indeterminate(m),
            KvError::DeadlineExceeded(m) => WireError::DeadlineExceeded(m),
            KvError::Unimplemented(m) => WireError::Unimplemented(m),
            KvError::FailedPrecondition(m) => WireError::FailedPrecondition(m),
            KvError::PermissionDenied(m) => WireError::PermissionDenied(m),
            KvError::Unauthenticated(m) => WireError::Unauthenticated(m),
            KvError::LeaseNotFound(m) => WireError::LeaseNotFound(m),
            KvError::Compacted(m) => WireError::Compacted(m),
            KvError::FutureRevision(m) => WireError::FutureRevision(m),
            KvError::Stopping(m) => WireError::Stopping(m),
            KvError::Internal(m) => WireError::Internal(m),
        }
    }
}

impl From<WireError> for KvError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::InvalidArgument(m) => KvError::InvalidArgument(m),
            WireError::NoLeader { leader_id, leader_addr, reason } => {
                KvError::NoLeader { leader_id, leader_addr, reason }
            }
            WireError::Unavailable(m) => KvError::Unavailable(m),
            WireError::Overloaded(m) => KvError::Overloaded(m),
            WireError::LimitReached(m) => KvError::LimitReached(m),
            WireError::NoSpace(m) => KvError::NoSpace(m),
            WireError::Indeterminate(m) => KvError::Indeterminate(m),
            WireError::DeadlineExceeded(m) => KvError::DeadlineExceeded(m),
            WireError::Unimplemented(m) => KvError::Unimplemented(m),
            WireError::FailedPrecondition(m) => KvError::FailedPrecondition(m),
            WireError::PermissionDenied(m) => KvError::PermissionDenied(m),
            WireError::Unauthenticated(m) => KvError::Unauthenticated(m),
            WireError::LeaseNotFound(m) => KvError::LeaseNotFound(m),
            WireError::Compacted(m) => KvError::Compacted(m),
            WireError::FutureRevision(m) => KvError::FutureRevision(m),
            WireError::Stopping(m) => KvError::Stopping(m),
            WireError::Internal(m) => KvError::Internal(m),
        }
    }
}

impl KvError {
    /// This error encoded for a peer reply (see [`WireError`]).
    pub fn to_wire(self) -> Vec<u8> {
        kvset_storage::codec::encode("error", &WireError::from(self)).unwrap_or_default()
    }

    /// The error a peer reply carries, or `None` when it carries none.
    pub fn from_wire(bytes: &[u8]) -> Option<Result<KvError, String>> {
        if bytes.is_empty() {
            return None;
        }
        Some(
            kvset_storage::codec::decode::<WireError>("error", bytes)
                .map(KvError::from)
                .map_err(|e| e.to_string()),
        )
    }

    /// A client's request stream that failed (a message that does not decode, say).
    pub fn request_stream(status: &Status) -> Self {
        KvError::InvalidArgument(format!("the request stream failed: {}", status.message()))
    }

    /// An `INVALID_ARGUMENT` error naming a limit: "`what` is `got`, over the limit `name` = `max`".
    pub fn over_limit(what: &str, got: u64, name: &str, max: u64) -> Self {
        KvError::InvalidArgument(format!("{what} is {got}, over the limit {name} = {max}"))
    }

    /// Whether the error guarantees that nothing was applied (so a write may be retried).
    pub fn not_applied(&self) -> bool {
        matches!(
            self,
            KvError::InvalidArgument(_)
                | KvError::NoLeader { .. }
                | KvError::Unavailable(_)
                | KvError::Stopping(_)
                | KvError::Overloaded(_)
                | KvError::LimitReached(_)
                | KvError::NoSpace(_)
                | KvError::FailedPrecondition(_)
                | KvError::PermissionDenied(_)
                | KvError::Unauthenticated(_)
                | KvError::LeaseNotFound(_)
                | KvError::Compacted(_)
                | KvError::FutureRevision(_)
                | KvError::Unimplemented(_)
        )
    }
}

/// What a failed `client_write` (a batch of client writes) means for its callers.
pub fn client_write(e: &RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> KvError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => KvError::NoLeader {
            leader_id: f.leader_id,
            leader_addr: f.leader_node.as_ref().map(|m| m.client_addr.clone()),
            reason: "leadership moved before the write was appended".into(),
        },
        // The entry was appended here, then replaced while this member took another leader's
        // log (or a snapshot): it may have committed through that leader, or may yet.
        RaftError::APIError(ClientWriteError::LogEntryDiscarded(f)) => KvError::Indeterminate(format!(
            "the entry was discarded here when leadership moved{}; it may have been applied",
            f.leader_id.map(|id| format!(" to node {id}")).unwrap_or_default()
        )),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            KvError::FailedPrecondition(e.to_string())
        }
        RaftError::APIError(ClientWriteError::PreconditionFailed(e)) => {
            KvError::FailedPrecondition(e.to_string())
        }
        RaftError::Fatal(f) => stopped_mid_proposal(f),
    }
}

/// What a failed membership change (`change_membership`, `add_learner`) means for its caller.
/// The same rules as [`client_write`]: a change cut short by a fatal error may still commit.
pub fn membership_change(e: &RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> KvError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => KvError::NoLeader {
            leader_id: f.leader_id,
            leader_addr: f.leader_node.as_ref().map(|m| m.client_addr.clone()),
            reason: "this member is no longer the leader".into(),
        },
        other => client_write(other),
    }
}

/// What a failed ReadIndex round (`ensure_linearizable`) means for the reads waiting on it.
pub fn read_index(e: &RaftError<TypeConfig, LinearizableReadError<TypeConfig>>) -> KvError {
    match e {
        RaftError::APIError(LinearizableReadError::ForwardToLeader(f)) => KvError::NoLeader {
            leader_id: f.leader_id,
            leader_addr: f.leader_node.as_ref().map(|m| m.client_addr.clone()),
            reason: "this member is no longer the leader".into(),
        },
        RaftError::APIError(LinearizableReadError::QuorumNotEnough(q)) => {
            KvError::Unavailable(format!("cannot confirm leadership with a quorum: {q}"))
        }
        RaftError::Fatal(f) => stopped(f),
    }
}

/// A command the state machine refused (deterministically, on every member).
pub fn rejected(e: &kvset_storage::ApplyError) -> KvError {
    use kvset_storage::ApplyError as A;
    match e {
        A::LeaseNotFound(_) => KvError::LeaseNotFound(e.to_string()),
        A::LeaseExists(_) | A::KeyNotFound => KvError::FailedPrecondition(e.to_string()),
        A::Compacted { .. } => KvError::Compacted(e.to_string()),
        A::FutureRevision { .. } => KvError::FutureRevision(e.to_string()),
        A::Auth(a) => auth_rejected(a),
    }
}

/// An access control change the state machine refused.
pub fn auth_rejected(e: &kvset_storage::auth::AuthError) -> KvError {
    use kvset_storage::auth::AuthError as E;
    match e {
        E::UserEmpty | E::RoleEmpty | E::InvalidAuthMgmt => KvError::InvalidArgument(e.to_string()),
        E::PermissionDenied => KvError::PermissionDenied(e.to_string()),
        _ => KvError::FailedPrecondition(e.to_string()),
    }
}

/// A failed read of the state machine.
pub fn read(e: kvset_storage::ReadError) -> KvError {
    use kvset_storage::ReadError as R;
    match e {
        R::Compacted { .. } => KvError::Compacted(e.to_string()),
        R::FutureRevision { .. } => KvError::FutureRevision(e.to_string()),
        other => KvError::Internal(other.to_string()),
    }
}

/// A read the state refused.
impl From<crate::query::QueryError> for KvError {
    fn from(e: crate::query::QueryError) -> Self {
        use crate::query::QueryError as Q;
        match e {
            Q::Compacted { .. } => KvError::Compacted(e.to_string()),
            Q::FutureRevision { .. } => KvError::FutureRevision(e.to_string()),
            Q::Storage(_) => KvError::Internal(e.to_string()),
        }
    }
}

/// Raft stopped before a request that changes nothing (a read, a trigger) could run.
pub fn stopped(f: &Fatal<TypeConfig>) -> KvError {
    KvError::Stopping(format!("raft stopped: {f}"))
}

/// Raft stopped while a proposal may have been in its log.
fn stopped_mid_proposal(f: &Fatal<TypeConfig>) -> KvError {
    KvError::Indeterminate(format!("raft stopped while the change was in flight: {f}"))
}

fn mark_not_applied(map: &mut MetadataMap) {
    map.insert(metadata::NOT_APPLIED, MetadataValue::from_static("true"));
}

impl From<KvError> for Status {
    fn from(e: KvError) -> Status {
        let message = e.to_string();
        let mut map = MetadataMap::new();
        // The marker tells clients a retry elsewhere is safe; it is set on the codes a client
        // retries (the others say "do not retry" by themselves).
        if matches!(
            e,
            KvError::NoLeader { .. }
                | KvError::Unavailable(_)
                | KvError::Stopping(_)
                | KvError::Overloaded(_)
        ) {
            mark_not_applied(&mut map);
        }
        let code = match e {
            KvError::InvalidArgument(_) => Code::InvalidArgument,
            KvError::NoLeader { leader_id, leader_addr, .. } => {
                if let Some(addr) = leader_addr.and_then(|a| MetadataValue::try_from(a.as_str()).ok()) {
                    map.insert(metadata::LEADER, addr);
                }
                if let Some(id) = leader_id {
                    map.insert(metadata::LEADER_ID, MetadataValue::from(id));
                }
                Code::Unavailable
            }
            KvError::Unavailable(_) | KvError::Stopping(_) => Code::Unavailable,
            KvError::Overloaded(_) | KvError::LimitReached(_) | KvError::NoSpace(_) => {
                Code::ResourceExhausted
            }
            KvError::Indeterminate(_) => Code::Unknown,
            KvError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            KvError::Unimplemented(_) => Code::Unimplemented,
            KvError::FailedPrecondition(_) => Code::FailedPrecondition,
            KvError::PermissionDenied(_) => Code::PermissionDenied,
            KvError::Unauthenticated(_) => Code::Unauthenticated,
            KvError::LeaseNotFound(_) => Code::NotFound,
            KvError::Compacted(_) | KvError::FutureRevision(_) => Code::OutOfRange,
            KvError::Internal(_) => Code::Internal,
        };
        Status::with_metadata(code, message, map)
    }
}

#[cfg(test)]
mod tests {
    use kvset_storage::Member;
    use openraft::error::ForwardToLeader;
    use openraft::error::QuorumNotEnough;

    use super::*;

    fn leader() -> Member {
        Member {
            ordinal: 7,
            name: "kvset-7".into(),
            peer_addr: "p:1".into(),
            client_addr: "10.0.0.7:2379".into(),
        }
    }

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

    #[test]
    fn every_error_kind_crosses_the_hop_as_data_unchanged() {
        let errors = [
            KvError::InvalidArgument("key is empty".into()),
            KvError::NoLeader {
                leader_id: Some(7),
                leader_addr: Some("10.0.0.7:2379".into()),
                reason: "moved".into(),
            },
            KvError::NoLeader { leader_id: None, leader_addr: None, reason: "none known".into() },
            KvError::Unavailable("no quorum".into()),
            KvError::Stopping("member is shutting down".into()),
            KvError::Overloaded("queue full".into()),
            KvError::LimitReached("lease.max_leases".into()),
            KvError::NoSpace("kvset-1".into()),
            KvError::Indeterminate("lost".into()),
            KvError::DeadlineExceeded("slow".into()),
            KvError::Unimplemented("alarm activate".into()),
            KvError::FailedPrecondition("exists".into()),
            KvError::PermissionDenied("no".into()),
            KvError::Unauthenticated("stale token".into()),
            KvError::LeaseNotFound("lease 5 not found".into()),
            KvError::Compacted("revision 3 has been compacted".into()),
            KvError::FutureRevision("revision 9 is a future revision".into()),
            KvError::Internal("disk".into()),
        ];
        for e in errors {
            let back = KvError::from_wire(&e.clone().to_wire()).expect("an error").expect("decodable");
            assert_eq!(WireError::from(back.clone()), WireError::from(e.clone()));
            assert_eq!(back.not_applied(), e.not_applied(), "{e:?}");
            let (a, b) = (Status::from(back), Status::from(e));
            assert_eq!((a.code(), a.message()), (b.code(), b.message()));
        }
        assert!(KvError::from_wire(&[]).is_none(), "an empty error field is no error");
        assert!(KvError::from_wire(&[0xff, 0xff, 0xff]).expect("an error").is_err(), "garbage is refused");
    }

    #[test]
    fn overload_is_resource_exhausted_and_not_applied() {
        let status: Status = KvError::Overloaded("queue full".into()).into();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(status.metadata().get(metadata::NOT_APPLIED).unwrap(), "true");
    }

    #[test]
    fn a_fatal_error_leaves_writes_and_membership_changes_unknown_but_reads_unavailable() {
        let fatal = || RaftError::Fatal(Fatal::Stopped);
        for e in [client_write(&fatal()), membership_change(&fatal())] {
            assert!(matches!(e, KvError::Indeterminate(_)), "{e:?}");
            assert!(!e.not_applied());
        }
        let read = read_index(&RaftError::Fatal(Fatal::Stopped));
        assert!(matches!(read, KvError::Stopping(_)), "{read:?}");
        assert!(read.not_applied());
        assert_eq!(Status::from(read).code(), Code::Unavailable);
    }

    #[test]
    fn a_discarded_entry_is_indeterminate_not_retryable() {
        let f = ForwardToLeader::<TypeConfig>::new(7, leader());
        let e = client_write(&RaftError::APIError(ClientWriteError::LogEntryDiscarded(f)));
        assert!(matches!(e, KvError::Indeterminate(_)), "{e:?}");
        assert!(!e.not_applied());
    }

    #[test]
    fn forward_to_leader_is_not_applied_with_the_leader_hint() {
        let f = ForwardToLeader::<TypeConfig>::new(7, leader());
        let e = client_write(&RaftError::APIError(ClientWriteError::ForwardToLeader(f.clone())));
        let KvError::NoLeader { leader_id: Some(7), leader_addr: Some(addr), .. } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(addr, "10.0.0.7:2379");
        assert!(e.not_applied());
        let r = read_index(&RaftError::APIError(LinearizableReadError::ForwardToLeader(f)));
        assert!(matches!(r, KvError::NoLeader { leader_id: Some(7), .. }), "{r:?}");
        let q = read_index(&RaftError::APIError(LinearizableReadError::QuorumNotEnough(QuorumNotEnough {
            cluster: "{1,2,3}".into(),
            got: Default::default(),
        })));
        assert!(matches!(q, KvError::Unavailable(_)), "{q:?}");
    }
}
