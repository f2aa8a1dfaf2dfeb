//! Property tests of every decoder the member runs on outside input: client requests of both
//! APIs (protobuf from any bytes, and structured transactions nested at random) into commands,
//! queries and watch requests; the payloads of peer messages; and credentials (tokens, the
//! subject of a client certificate). On garbage each returns a
//! clear error, never panics; whatever a conversion accepts respects every limit, so nothing
//! over a limit can reach Raft.
//!
//! `PROPTEST_CASES` sets the cases per property (256 by default); the longer mode is
//! `PROPTEST_CASES=100000 cargo test --workspace --lib fuzz`.

use kvset_proto::etcdserverpb as epb;
use kvset_proto::v1 as pb;
use kvset_storage::codec;
use kvset_storage::Command;
use kvset_storage::RangeEnd;
use kvset_storage::Txn;
use kvset_storage::TxnOp;
use kvset_storage::TypeConfig;
use proptest::prelude::*;
use prost::Message;

use crate::config::LeaseConfig;
use crate::config::Limits;

/// Small limits, so that random input crosses every one of them often.
fn limits() -> Limits {
    Limits {
        key_max_bytes: 8,
        value_max_bytes: 16,
        request_max_bytes: 160,
        txn_max_ops: 12,
        range_max_keys: 5,
        ..Limits::default()
    }
}

fn key_ok(key: &[u8], l: &Limits) -> bool {
    key.len() as u64 <= l.key_max_bytes
}

/// Every key and value of an accepted transaction is within the limits, at every depth.
fn txn_ok(t: &Txn, l: &Limits) -> bool {
    let op = |op: &TxnOp| match op {
        TxnOp::Put(p) => !p.key.is_empty() && key_ok(&p.key, l) && p.value.len() as u64 <= l.value_max_bytes,
        TxnOp::Delete(d) => key_ok(&d.range.start, l) && end_ok(&d.range.end, l),
        TxnOp::Range(r) => key_ok(&r.range.start, l) && end_ok(&r.range.end, l),
        TxnOp::Txn(t) => txn_ok(t, l),
    };
    t.compares.iter().all(|c| key_ok(&c.range.start, l))
        && t.success.iter().all(op)
        && t.failure.iter().all(op)
}

fn end_ok(end: &RangeEnd, l: &Limits) -> bool {
    match end {
        RangeEnd::Before(k) => key_ok(k, l),
        _ => true,
    }
}

fn command_ok(c: &Command, l: &Limits) -> bool {
    match c {
        Command::Put(p) => {
            !p.key.is_empty() && key_ok(&p.key, l) && p.value.len() as u64 <= l.value_max_bytes
        }
        Command::Delete(d) => key_ok(&d.range.start, l) && end_ok(&d.range.end, l),
        Command::Txn(t) => txn_ok(t, l),
        _ => true,
    }
}

/// Short byte strings, empty and over the key limit included.
fn bytes() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..12)
}

/// Keys: mostly present, sometimes over the limit, rarely empty.
fn key() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![40 => proptest::collection::vec(any::<u8>(), 1..12), 1 => Just(Vec::new())]
}

/// An enum value: mostly a known one (`0..n`), sometimes anything.
fn enum_value(n: i32) -> impl Strategy<Value = i32> {
    prop_oneof![30 => 0..n, 1 => any::<i32>()]
}

/// etcd requests: a transaction of random compares and ops, nested up to three deep.
fn etcd_txn() -> impl Strategy<Value = epb::TxnRequest> {
    let compare = (key(), bytes(), enum_value(4), enum_value(5), any::<i64>()).prop_map(
        |(key, end, result, target, n)| {
            use epb::compare::TargetUnion as T;
            let union = match target.rem_euclid(5) {
                0 => T::Version(n),
                1 => T::CreateRevision(n),
                2 => T::ModRevision(n),
                3 => T::Value(end.clone()),
                _ => T::Lease(n),
            };
            epb::Compare { result, target, key, range_end: end, target_union: Some(union) }
        },
    );
    let kind = prop_oneof![30 => 0u8..3, 1 => Just(3u8)];
    let leaf = (kind, key(), bytes(), any::<i64>()).prop_map(|(kind, key, other, n)| {
        use epb::request_op::Request as R;
        let request = match kind {
            0 => Some(R::RequestPut(epb::PutRequest { key, value: other, lease: n, ..Default::default() })),
            1 => Some(R::RequestDeleteRange(epb::DeleteRangeRequest {
                key,
                range_end: other,
                ..Default::default()
            })),
            2 => Some(R::RequestRange(epb::RangeRequest {
                key,
                range_end: other,
                limit: n,
                revision: n,
                ..Default::default()
            })),
            _ => None,
        };
        epb::RequestOp { request }
    });
    let compares = proptest::collection::vec(compare, 0..3);
    let ops = leaf.prop_recursive(2, 12, 3, move |inner| {
        let c = proptest::collection::vec(
            (key(), enum_value(4)).prop_map(|(key, result)| epb::Compare {
                key,
                result,
                ..Default::default()
            }),
            0..2,
        );
        (c, proptest::collection::vec(inner.clone(), 0..3), proptest::collection::vec(inner, 0..3)).prop_map(
            |(compare, success, failure)| epb::RequestOp {
                request: Some(epb::request_op::Request::RequestTxn(epb::TxnRequest {
                    compare,
                    success,
                    failure,
                })),
            },
        )
    });
    (compares, proptest::collection::vec(ops.clone(), 0..4), proptest::collection::vec(ops, 0..4))
        .prop_map(|(compare, success, failure)| epb::TxnRequest { compare, success, failure })
}

/// Runs every kvset.v1 conversion on `bytes` decoded as its request; checks what is accepted.
fn kvset_requests(bytes: &[u8]) -> Result<(), TestCaseError> {
    let l = limits();
    if let Ok(r) = pb::PutRequest::decode(bytes) {
        if let Ok(c) = crate::pb::request::put_command(r, &l) {
            prop_assert!(command_ok(&c, &l), "accepted over a limit: {c:?}");
        }
    }
    if let Ok(r) = pb::DeleteRequest::decode(bytes) {
        if let Ok(c) = crate::pb::request::delete_command(&r, &l) {
            prop_assert!(command_ok(&c, &l), "accepted over a limit: {c:?}");
        }
    }
    if let Ok(r) = pb::TxnRequest::decode(bytes) {
        if let Ok(c) = crate::pb::request::txn_command(&r, &l) {
            prop_assert!(command_ok(&c, &l), "accepted over a limit: {c:?}");
        }
    }
    if let Ok(r) = pb::RangeRequest::decode(bytes) {
        if let Ok(q) = crate::pb::request::range(&r, &l) {
            prop_assert!(key_ok(&q.range.start, &l));
        }
    }
    if let Ok(r) = pb::GetRequest::decode(bytes) {
        let _ = crate::pb::request::get(&r, &l);
    }
    if let Ok(r) = pb::CompactRequest::decode(bytes) {
        let _ = crate::pb::request::compact(&r);
    }
    if let Ok(r) = pb::WatchRequest::decode(bytes) {
        let _ = crate::pb::request::watch(r, &l);
    }
    if let Ok(r) = pb::LeaseGrantRequest::decode(bytes) {
        let _ = crate::pb::request::lease_ttl(r.ttl_seconds, &LeaseConfig::default());
    }
    Ok(())
}

/// Runs every etcd conversion on `bytes` decoded as its request; checks what is accepted.
fn etcd_requests(bytes: &[u8]) -> Result<(), TestCaseError> {
    let l = limits();
    if let Ok(r) = epb::PutRequest::decode(bytes) {
        if let Ok(p) = crate::pb::etcd::request::put(r, &l) {
            prop_assert!(command_ok(&Command::Put(p), &l));
        }
    }
    if let Ok(r) = epb::DeleteRangeRequest::decode(bytes) {
        if let Ok(d) = crate::pb::etcd::request::delete(&r, &l) {
            prop_assert!(command_ok(&Command::Delete(d), &l));
        }
    }
    if let Ok(r) = epb::TxnRequest::decode(bytes) {
        etcd_txn_checked(&r)?;
    }
    if let Ok(r) = epb::RangeRequest::decode(bytes) {
        if crate::pb::etcd::request::range(&r, &l).is_ok() {
            let _ = crate::pb::etcd::request::complete(&r, true, &l);
        }
    }
    if let Ok(r) = epb::CompactionRequest::decode(bytes) {
        let _ = crate::pb::etcd::request::compact(&r);
    }
    if let Ok(r) = epb::WatchRequest::decode(bytes) {
        let _ = crate::pb::etcd::request::watch(r, &l);
    }
    if let Ok(r) = epb::LeaseGrantRequest::decode(bytes) {
        let _ = crate::pb::etcd::request::lease_ttl(r.ttl, &LeaseConfig::default());
    }
    Ok(())
}

fn etcd_txn_checked(r: &epb::TxnRequest) -> Result<(), TestCaseError> {
    let l = limits();
    if let Ok(t) = crate::pb::etcd::request::txn(r, &l) {
        prop_assert!(txn_ok(&t, &l), "accepted over a limit: {t:?}");
    }
    Ok(())
}

/// Decodes `bytes` as every peer message payload; none may panic.
fn peer_payloads(bytes: &[u8]) {
    let _ = codec::decode::<openraft::raft::AppendEntriesRequest<TypeConfig>>("append", bytes);
    let _ = codec::decode::<openraft::raft::VoteRequest<TypeConfig>>("vote", bytes);
    let _ = codec::decode::<openraft::raft::TransferLeaderRequest<TypeConfig>>("transfer", bytes);
    let _ = codec::decode::<crate::network::SnapshotChunk>("snapshot chunk", bytes);
    let _ = codec::decode::<Command>("command", bytes);
    let _ = codec::decode::<crate::query::Query>("query", bytes);
    let _ = codec::decode::<crate::query::Answer>("answer", bytes);
    let _ = codec::decode::<kvset_storage::CommandResult>("command result", bytes);
    let _ = pb::RaftRequest::decode(bytes);
    let _ = pb::JoinRequest::decode(bytes);
    let _ = pb::ProposeRequest::decode(bytes);
}

proptest! {
    #[test]
    fn client_requests_from_any_bytes_are_refused_or_within_limits(
        bytes in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        kvset_requests(&bytes)?;
        etcd_requests(&bytes)?;
    }

    #[test]
    fn nested_etcd_transactions_are_refused_or_within_limits(txn in etcd_txn()) {
        etcd_txn_checked(&txn)?;
        // The same transaction through the wire: decoding what a client sends changes nothing.
        let bytes = txn.encode_to_vec();
        prop_assert_eq!(epb::TxnRequest::decode(bytes.as_slice()).ok(), Some(txn));
    }

    #[test]
    fn credentials_from_any_bytes_are_refused_not_panics(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
        token in "[0-9a-f.]{0,200}",
    ) {
        // A client certificate's subject, and a token: both come from the caller.
        let _ = crate::tls::subject_common_name(&bytes);
        let _ = crate::tls::common_name(&bytes);
        let mut state = kvset_storage::auth::AuthState::default();
        state.apply(&kvset_storage::auth::AuthCommand::UserAdd { name: "root".into(), password_hash: None }).unwrap();
        state.token_key = vec![1; 32];
        prop_assert!(crate::auth::verify_token(&state, &Default::default(), &token, 0).is_err(), "a made-up token was accepted");
        prop_assert!(crate::auth::verify_token(&state, &Default::default(), &String::from_utf8_lossy(&bytes), 0).is_err());
    }

    #[test]
    fn peer_payloads_from_any_bytes_decode_to_errors_not_panics(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        peer_payloads(&bytes);
    }
}
