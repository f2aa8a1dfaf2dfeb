//! Errors of the etcd API, with etcd's exact codes and messages (`api/v3rpc/rpctypes`): Go
//! clients (clientv3, and through it the Kubernetes apiserver) recognise errors by their text,
//! so these strings are part of the contract.

use kvset_storage::ApplyError;
use kvset_storage::ReadError;
use tonic::Code;
use tonic::Status;

use crate::errors::KvError;
use crate::query::QueryError;

fn status(code: Code, message: &str) -> Status {
    Status::new(code, message)
}

/// "etcdserver: key is not provided"
pub fn empty_key() -> Status {
    status(Code::InvalidArgument, "etcdserver: key is not provided")
}

/// "etcdserver: key not found" (ignore_value / ignore_lease on a missing key, an empty op)
pub fn key_not_found() -> Status {
    status(Code::InvalidArgument, "etcdserver: key not found")
}

/// "etcdserver: value is provided"
pub fn value_provided() -> Status {
    status(Code::InvalidArgument, "etcdserver: value is provided")
}

/// "etcdserver: lease is provided"
pub fn lease_provided() -> Status {
    status(Code::InvalidArgument, "etcdserver: lease is provided")
}

/// "etcdserver: too many operations in txn request"
pub fn too_many_ops() -> Status {
    status(Code::InvalidArgument, "etcdserver: too many operations in txn request")
}

/// "etcdserver: duplicate key given in txn request"
pub fn duplicate_key() -> Status {
    status(Code::InvalidArgument, "etcdserver: duplicate key given in txn request")
}

/// "etcdserver: mvcc: required revision has been compacted"
pub fn compacted() -> Status {
    status(Code::OutOfRange, "etcdserver: mvcc: required revision has been compacted")
}

/// "etcdserver: mvcc: required revision is a future revision"
pub fn future_revision() -> Status {
    status(Code::OutOfRange, "etcdserver: mvcc: required revision is a future revision")
}

/// "etcdserver: requested lease not found"
pub fn lease_not_found() -> Status {
    status(Code::NotFound, "etcdserver: requested lease not found")
}

/// "etcdserver: lease already exists"
pub fn lease_exists() -> Status {
    status(Code::FailedPrecondition, "etcdserver: lease already exists")
}

/// "etcdserver: too large lease TTL"
pub fn lease_ttl_too_large() -> Status {
    status(Code::OutOfRange, "etcdserver: too large lease TTL")
}

/// "etcdserver: request is too large"
pub fn request_too_large() -> Status {
    status(Code::InvalidArgument, "etcdserver: request is too large")
}

/// "etcdserver: too many requests"
pub fn too_many_requests() -> Status {
    status(Code::ResourceExhausted, "etcdserver: too many requests")
}

/// "etcdserver: no leader"
pub fn no_leader() -> Status {
    status(Code::Unavailable, "etcdserver: no leader")
}

/// "etcdserver: request timed out"
pub fn timeout() -> Status {
    status(Code::Unavailable, "etcdserver: request timed out")
}

/// "etcdserver: request timed out, possibly due to connection lost"
pub fn timeout_connection_lost() -> Status {
    status(Code::Unavailable, "etcdserver: request timed out, possibly due to connection lost")
}

/// "etcdserver: server stopped"
pub fn stopped() -> Status {
    status(Code::Unavailable, "etcdserver: server stopped")
}

/// "etcdserver: authentication is not enabled"
pub fn auth_not_enabled() -> Status {
    status(Code::FailedPrecondition, "etcdserver: authentication is not enabled")
}

/// "etcdserver: not leader"
pub fn not_leader() -> Status {
    status(Code::FailedPrecondition, "etcdserver: not leader")
}

/// "etcdserver: bad leader transferee"
pub fn bad_leader_transferee() -> Status {
    status(Code::FailedPrecondition, "etcdserver: bad leader transferee")
}

/// "etcdserver: member not found"
pub fn member_not_found() -> Status {
    status(Code::NotFound, "etcdserver: member not found")
}

/// A membership change etcd clients ask for, which kvset makes by itself.
pub fn membership_follows_the_statefulset(what: &str) -> Status {
    status(
        Code::FailedPrecondition,
        &format!(
            "kvset: {what} refused: membership follows the StatefulSet's replicas (members join, are \
             promoted, replaced and removed by the cluster itself); scale the StatefulSet instead \
             (kubectl scale statefulset ... --replicas=N)"
        ),
    )
}

/// A call kvset does not serve, naming why.
pub fn unimplemented(what: &str) -> Status {
    status(Code::Unimplemented, &format!("kvset: {what}"))
}

/// A command refused by the state machine.
pub fn rejected(e: &ApplyError) -> Status {
    match e {
        ApplyError::LeaseNotFound(_) => lease_not_found(),
        ApplyError::LeaseExists(_) => lease_exists(),
        ApplyError::KeyNotFound => key_not_found(),
        ApplyError::Compacted { .. } => compacted(),
        ApplyError::FutureRevision { .. } => future_revision(),
        ApplyError::Auth(kvset_storage::auth::AuthError::PermissionDenied) => permission_denied(),
        ApplyError::Auth(a) => Status::from(crate::errors::auth_rejected(a)),
    }
}

/// etcd's `ErrGRPCPermissionDenied`.
pub fn permission_denied() -> Status {
    status(Code::PermissionDenied, "etcdserver: permission denied")
}

/// etcd's `ErrGRPCInvalidAuthToken`.
pub fn invalid_auth_token() -> Status {
    status(Code::Unauthenticated, "etcdserver: invalid auth token")
}

/// etcd's `ErrGRPCAuthFailed`.
pub fn auth_failed() -> Status {
    status(Code::InvalidArgument, "etcdserver: authentication failed, invalid user ID or password")
}

/// A failed read of the state machine.
pub fn read(e: &ReadError) -> Status {
    match e {
        ReadError::Compacted { .. } => compacted(),
        ReadError::FutureRevision { .. } => future_revision(),
        other => status(Code::Internal, &format!("etcdserver: {other}")),
    }
}

/// A read the state refused.
pub fn query(e: &QueryError) -> Status {
    match e {
        QueryError::Compacted { .. } => compacted(),
        QueryError::FutureRevision { .. } => future_revision(),
        QueryError::Storage(m) => status(Code::Internal, &format!("etcdserver: {m}")),
    }
}

/// A kvset error as etcd would report the same situation.
pub fn from_kv(e: KvError) -> Status {
    match e {
        KvError::NoLeader { .. } => no_leader(),
        KvError::Stopping(_) => stopped(),
        KvError::Unavailable(_) => no_leader(),
        KvError::Overloaded(_) => too_many_requests(),
        // etcd's ErrGRPCNoSpace.
        KvError::NoSpace(_) => status(Code::ResourceExhausted, "etcdserver: mvcc: database space exceeded"),
        KvError::Indeterminate(_) => timeout_connection_lost(),
        KvError::DeadlineExceeded(_) => timeout(),
        KvError::FutureRevision(_) => future_revision(),
        KvError::Compacted(_) => compacted(),
        KvError::LeaseNotFound(_) => lease_not_found(),
        KvError::PermissionDenied(_) => permission_denied(),
        KvError::Unauthenticated(_) => invalid_auth_token(),
        // Limits and other refusals keep kvset's message, which names the limit.
        other => Status::from(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_etcds() {
        // The exact strings of etcd's api/v3rpc/rpctypes/error.go (v3.5).
        assert_eq!(compacted().message(), "etcdserver: mvcc: required revision has been compacted");
        assert_eq!(compacted().code(), Code::OutOfRange);
        assert_eq!(lease_not_found().message(), "etcdserver: requested lease not found");
        assert_eq!(lease_not_found().code(), Code::NotFound);
        assert_eq!(duplicate_key().message(), "etcdserver: duplicate key given in txn request");
        assert_eq!(empty_key().message(), "etcdserver: key is not provided");
        assert_eq!(
            from_kv(KvError::NoLeader { leader_id: None, leader_addr: None, reason: String::new() })
                .message(),
            "etcdserver: no leader"
        );
        assert_eq!(
            rejected(&ApplyError::FutureRevision { requested: 9, current: 3 }).message(),
            "etcdserver: mvcc: required revision is a future revision"
        );
    }

    /// Issue 27, item 2: etcd's wording is chosen by the error's kind, never by its text (a
    /// message that happens to say "future" or "shutting down" changes nothing).
    #[test]
    fn etcds_wording_follows_the_kind_not_the_message() {
        let cases = [
            (KvError::Stopping("anything".into()), stopped()),
            (KvError::Unavailable("member is shutting down".into()), no_leader()),
            (KvError::FutureRevision("x".into()), future_revision()),
            (KvError::Compacted("a future revision".into()), compacted()),
            (KvError::LeaseNotFound("x".into()), lease_not_found()),
        ];
        for (e, want) in cases {
            let got = from_kv(e.clone());
            assert_eq!((got.code(), got.message()), (want.code(), want.message()), "{e:?}");
        }
    }
}
