//! kvset.v1 client requests → validated commands, queries and watch requests. The limits are
//! checked here and only here.

use std::collections::BTreeSet;

use kvset_proto::v1 as pb;
use kvset_storage::Command;
use kvset_storage::Compare;
use kvset_storage::CompareOp;
use kvset_storage::CompareTarget;
use kvset_storage::Delete;
use kvset_storage::KeyRange;
use kvset_storage::LeaseId;
use kvset_storage::Put;
use kvset_storage::RangeEnd;
use kvset_storage::RangeQuery;
use kvset_storage::Revision;
use kvset_storage::Txn;
use kvset_storage::TxnOp;
use prost::Message;

use crate::config::LeaseConfig;
use crate::config::Limits;
use crate::errors::KvError;
use crate::watch_types::StreamRequest;
use crate::watch_types::WatchSpec;

type Result<T> = std::result::Result<T, KvError>;

/// Checks the encoded size of a whole request.
pub fn check_size(request: &impl Message, limits: &Limits) -> Result<()> {
    let len = request.encoded_len() as u64;
    if len > limits.request_max_bytes {
        return Err(KvError::over_limit(
            "request size in bytes",
            len,
            "limits.request_max_bytes",
            limits.request_max_bytes,
        ));
    }
    Ok(())
}

/// Checks a key: non-empty and within the key limit.
pub fn check_key(key: &[u8], limits: &Limits) -> Result<()> {
    if key.is_empty() {
        return Err(KvError::InvalidArgument("key is empty; keys must be 1 or more bytes".into()));
    }
    check_key_len(key, "key", limits)
}

fn check_key_len(key: &[u8], what: &str, limits: &Limits) -> Result<()> {
    if key.len() as u64 > limits.key_max_bytes {
        return Err(KvError::over_limit(
            &format!("{what} length in bytes"),
            key.len() as u64,
            "limits.key_max_bytes",
            limits.key_max_bytes,
        ));
    }
    Ok(())
}

fn check_value(value: &[u8], limits: &Limits) -> Result<()> {
    if value.len() as u64 > limits.value_max_bytes {
        return Err(KvError::over_limit(
            "value length in bytes",
            value.len() as u64,
            "limits.value_max_bytes",
            limits.value_max_bytes,
        ));
    }
    Ok(())
}

fn check_lease(lease: i64) -> Result<()> {
    if lease < 0 {
        return Err(KvError::InvalidArgument(format!(
            "lease is {lease}; lease ids are positive (0: no lease)"
        )));
    }
    Ok(())
}

fn check_revision(what: &str, revision: i64) -> Result<Revision> {
    if revision < 0 {
        return Err(KvError::InvalidArgument(format!("{what} is {revision}, must not be negative")));
    }
    Ok(revision)
}

/// A Put request → its domain form (the key and value move, no copy).
pub fn put(req: pb::PutRequest, limits: &Limits) -> Result<Put> {
    check_key(&req.key, limits)?;
    check_value(&req.value, limits)?;
    check_lease(req.lease)?;
    Ok(Put { lease: req.lease, prev_kv: req.prev_kv, ..Put::new(req.key, req.value) })
}

/// A Put request → a command.
pub fn put_command(req: pb::PutRequest, limits: &Limits) -> Result<Command> {
    check_size(&req, limits)?;
    Ok(Command::Put(put(req, limits)?))
}

/// Resolves `key`, `range_end` and `prefix` into a key range.
fn key_range(key: &[u8], range_end: &[u8], prefix: bool, limits: &Limits) -> Result<KeyRange> {
    check_key_len(key, "key", limits)?;
    check_key_len(range_end, "range_end", limits)?;
    if prefix {
        if !range_end.is_empty() {
            return Err(KvError::InvalidArgument("range_end must be empty when prefix is set".into()));
        }
        return Ok(KeyRange::prefix(key.to_vec()));
    }
    if range_end.is_empty() {
        check_key(key, limits)?;
        return Ok(KeyRange::single(key.to_vec()));
    }
    if range_end == [0] {
        return Ok(KeyRange { start: key.to_vec(), end: RangeEnd::Unbounded });
    }
    if range_end <= key {
        return Err(KvError::InvalidArgument("range_end must be greater than key".into()));
    }
    Ok(KeyRange::between(key.to_vec(), range_end.to_vec()))
}

/// A Delete request → its domain form.
pub fn delete(req: &pb::DeleteRequest, limits: &Limits) -> Result<Delete> {
    Ok(Delete { range: key_range(&req.key, &req.range_end, req.prefix, limits)?, prev_kv: req.prev_kv })
}

/// A Delete request → a command.
pub fn delete_command(req: &pb::DeleteRequest, limits: &Limits) -> Result<Command> {
    check_size(req, limits)?;
    Ok(Command::Delete(delete(req, limits)?))
}

/// A Range request → a query.
pub fn range(req: &pb::RangeRequest, limits: &Limits) -> Result<RangeQuery> {
    if req.limit < 0 {
        return Err(KvError::InvalidArgument(format!("limit is {}, must not be negative", req.limit)));
    }
    if req.limit as u64 > limits.range_max_keys {
        return Err(KvError::over_limit(
            "limit",
            req.limit as u64,
            "limits.range_max_keys",
            limits.range_max_keys,
        ));
    }
    let limit = if req.limit == 0 { limits.range_max_keys } else { req.limit as u64 };
    let mut range = key_range(&req.key, &req.range_end, req.prefix, limits)?;
    if !req.page_key.is_empty() {
        check_key_len(&req.page_key, "page_key", limits)?;
        if req.page_key > range.start {
            if range.end == RangeEnd::Single {
                // Past the only key: an empty page.
                range = KeyRange::between(req.page_key.clone(), req.page_key.clone());
            } else {
                range.start = req.page_key.clone();
            }
        }
    }
    Ok(RangeQuery {
        revision: check_revision("revision", req.revision)?,
        limit: limit as usize,
        max_bytes: limits.response_max_bytes as usize,
        keys_only: req.keys_only,
        count_only: req.count_only,
        ..RangeQuery::new(range)
    })
}

/// A Get request → the key and the revision to read it at (0: now).
pub fn get(req: &pb::GetRequest, limits: &Limits) -> Result<(Vec<u8>, Revision)> {
    check_key(&req.key, limits)?;
    Ok((req.key.clone(), check_revision("revision", req.revision)?))
}

/// A Compact request → a command.
pub fn compact(req: &pb::CompactRequest) -> Result<Command> {
    if req.revision < 1 {
        return Err(KvError::InvalidArgument(format!("revision is {}, must be at least 1", req.revision)));
    }
    Ok(Command::Compact(req.revision))
}

/// A lease TTL, within the configured bounds.
pub fn lease_ttl(ttl: i64, config: &LeaseConfig) -> Result<i64> {
    let (min, max) = (config.min_ttl_seconds as i64, config.max_ttl_seconds as i64);
    if ttl < min || ttl > max {
        return Err(KvError::InvalidArgument(format!(
            "ttl_seconds is {ttl}, must be between lease.min_ttl_seconds = {min} and lease.max_ttl_seconds = {max}"
        )));
    }
    Ok(ttl)
}

/// A lease id named by a request: positive.
pub fn lease_id(id: i64) -> Result<LeaseId> {
    if id <= 0 {
        return Err(KvError::InvalidArgument(format!("lease id is {id}; lease ids are positive")));
    }
    Ok(id)
}

/// A message on a Watch stream → its domain form. A create request that cannot be served is
/// answered (in order) with a cancel naming the problem, not by ending the stream.
pub fn watch(req: pb::WatchRequest, limits: &Limits) -> Result<StreamRequest> {
    use pb::watch_request::Request;
    match req.request {
        Some(Request::Create(c)) => {
            let range = if c.prefix || !c.range_end.is_empty() || !c.key.is_empty() {
                key_range(&c.key, &c.range_end, c.prefix, limits)
            } else {
                Err(KvError::InvalidArgument(
                    "key is empty; watch one key, a prefix (prefix: true) or a range".into(),
                ))
            };
            let watch_id = (c.watch_id != 0).then_some(c.watch_id);
            let checked = range.and_then(|range| {
                if c.watch_id < 0 {
                    return Err(KvError::InvalidArgument(format!(
                        "watch_id is {}, must not be negative",
                        c.watch_id
                    )));
                }
                Ok(WatchSpec {
                    range,
                    start_revision: check_revision("start_revision", c.start_revision)?,
                    prev_kv: c.prev_kv,
                    progress_notify: c.progress_notify,
                    no_put: c.no_put,
                    no_delete: c.no_delete,
                    watch_id,
                    fragment: false,
                })
            });
            Ok(match checked {
                Ok(spec) => StreamRequest::Create(spec),
                Err(e) => StreamRequest::Refuse { watch_id: c.watch_id.max(-1), reason: e.to_string() },
            })
        }
        Some(Request::Cancel(c)) => Ok(StreamRequest::Cancel(c.watch_id)),
        Some(Request::Progress(_)) => Ok(StreamRequest::Progress),
        None => Err(KvError::InvalidArgument("empty WatchRequest: set create, cancel or progress".into())),
    }
}

fn compare(c: &pb::Compare, limits: &Limits) -> Result<Compare> {
    use pb::compare::Result as R;
    use pb::compare::Target as T;
    use pb::compare::TargetUnion as U;
    check_key(&c.key, limits)?;
    let op = match R::try_from(c.result) {
        Ok(R::Equal) => CompareOp::Equal,
        Ok(R::NotEqual) => CompareOp::NotEqual,
        Ok(R::Greater) => CompareOp::Greater,
        Ok(R::Less) => CompareOp::Less,
        Err(_) => {
            return Err(KvError::InvalidArgument(format!("compare result {} is not a known value", c.result)))
        }
    };
    let target = match (T::try_from(c.target), &c.target_union) {
        (Ok(T::Version), Some(U::Version(v))) => CompareTarget::Version(*v),
        (Ok(T::Create), Some(U::CreateRevision(v))) => CompareTarget::CreateRevision(*v),
        (Ok(T::Mod), Some(U::ModRevision(v))) => CompareTarget::ModRevision(*v),
        (Ok(T::Value), Some(U::Value(v))) => {
            check_value(v, limits)?;
            CompareTarget::Value(v.clone())
        }
        (Ok(T::Lease), Some(U::Lease(v))) => CompareTarget::Lease(*v),
        (Ok(t), _) => {
            return Err(KvError::InvalidArgument(format!(
                "compare target {} needs its operand: set the matching field of target_union",
                t.as_str_name()
            )))
        }
        (Err(_), _) => {
            return Err(KvError::InvalidArgument(format!("compare target {} is not a known value", c.target)))
        }
    };
    Ok(Compare { range: KeyRange::single(c.key.clone()), op, target })
}

fn ops(list: &[pb::RequestOp], branch: &str, limits: &Limits) -> Result<Vec<TxnOp>> {
    let mut out = Vec::with_capacity(list.len());
    let mut put_keys = BTreeSet::new();
    let mut deletes: Vec<KeyRange> = Vec::new();
    for op in list {
        out.push(match &op.request {
            Some(pb::request_op::Request::RequestPut(p)) => {
                let p = put(p.clone(), limits)?;
                if !put_keys.insert(p.key.clone()) {
                    return Err(KvError::InvalidArgument(format!("txn {branch} writes the same key twice")));
                }
                TxnOp::Put(p)
            }
            Some(pb::request_op::Request::RequestDelete(d)) => {
                let d = delete(d, limits)?;
                deletes.push(d.range.clone());
                TxnOp::Delete(d)
            }
            Some(pb::request_op::Request::RequestRange(r)) => TxnOp::Range(range(r, limits)?),
            None => return Err(KvError::InvalidArgument(format!("txn {branch} has an empty op"))),
        });
    }
    if put_keys.iter().any(|k| deletes.iter().any(|d| d.contains(k))) {
        return Err(KvError::InvalidArgument(format!("txn {branch} puts a key it also deletes")));
    }
    Ok(out)
}

/// A Txn request → a command.
pub fn txn_command(req: &pb::TxnRequest, limits: &Limits) -> Result<Command> {
    check_size(req, limits)?;
    let n = (req.compare.len() + req.success.len() + req.failure.len()) as u64;
    if n > limits.txn_max_ops {
        return Err(KvError::over_limit(
            "number of compares and ops",
            n,
            "limits.txn_max_ops",
            limits.txn_max_ops,
        ));
    }
    Ok(Command::Txn(Txn {
        compares: req.compare.iter().map(|c| compare(c, limits)).collect::<Result<_>>()?,
        success: ops(&req.success, "success", limits)?,
        failure: ops(&req.failure, "failure", limits)?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::default()
    }

    fn msg(e: KvError) -> String {
        e.to_string()
    }

    #[test]
    fn empty_and_oversized_keys_are_refused_naming_the_limit() {
        let l = limits();
        let empty = pb::PutRequest { key: vec![], value: b"v".to_vec(), ..Default::default() };
        assert!(msg(put_command(empty, &l).unwrap_err()).contains("key is empty"));
        let long = pb::PutRequest { key: vec![b'k'; 4097], ..Default::default() };
        let m = msg(put_command(long, &l).unwrap_err());
        assert!(m.contains("limits.key_max_bytes") && m.contains("4097"), "{m}");
        let ok = pb::PutRequest { key: vec![b'k'; 4096], ..Default::default() };
        assert!(put_command(ok, &l).is_ok());
    }

    #[test]
    fn oversized_values_and_requests_are_refused() {
        let l = limits();
        let big = pb::PutRequest { key: b"k".to_vec(), value: vec![0; (1 << 20) + 1], ..Default::default() };
        assert!(msg(put_command(big, &l).unwrap_err()).contains("limits.value_max_bytes"));
        let small = Limits { request_max_bytes: 100, ..limits() };
        let req = pb::PutRequest { key: b"k".to_vec(), value: vec![0; 200], ..Default::default() };
        assert!(msg(put_command(req, &small).unwrap_err()).contains("limits.request_max_bytes"));
    }

    #[test]
    fn leases_must_be_positive_and_ttls_within_bounds() {
        let req = pb::PutRequest { key: b"k".to_vec(), lease: 5, ..Default::default() };
        assert!(put_command(req, &limits()).is_ok());
        let req = pb::PutRequest { key: b"k".to_vec(), lease: -5, ..Default::default() };
        assert!(msg(put_command(req, &limits()).unwrap_err()).contains("positive"));
        let config = LeaseConfig::default();
        assert!(msg(lease_ttl(1, &config).unwrap_err()).contains("lease.min_ttl_seconds = 5"));
        assert!(msg(lease_ttl(9_000_000_001, &config).unwrap_err()).contains("lease.max_ttl_seconds"));
        assert_eq!(lease_ttl(60, &config).unwrap(), 60);
        assert!(lease_id(0).is_err() && lease_id(-1).is_err() && lease_id(3).is_ok());
    }

    #[test]
    fn revisions_and_compactions_must_not_be_negative() {
        let l = limits();
        let g = pb::GetRequest { key: b"k".to_vec(), revision: -1, ..Default::default() };
        assert!(msg(get(&g, &l).unwrap_err()).contains("negative"));
        let r = pb::RangeRequest { key: b"k".to_vec(), revision: -2, ..Default::default() };
        assert!(msg(range(&r, &l).unwrap_err()).contains("negative"));
        assert!(compact(&pb::CompactRequest { revision: 0 }).is_err());
        assert_eq!(compact(&pb::CompactRequest { revision: 9 }).unwrap(), Command::Compact(9));
    }

    #[test]
    fn bad_watch_creates_are_refused_in_the_stream_not_fatal() {
        let l = limits();
        let create = |c: pb::WatchCreateRequest| {
            watch(pb::WatchRequest { request: Some(pb::watch_request::Request::Create(c)) }, &l).unwrap()
        };
        let refused = create(pb::WatchCreateRequest::default());
        assert!(
            matches!(&refused, StreamRequest::Refuse { reason, .. } if reason.contains("key is empty")),
            "{refused:?}"
        );
        let refused = create(pb::WatchCreateRequest {
            key: b"b".to_vec(),
            range_end: b"a".to_vec(),
            ..Default::default()
        });
        assert!(
            matches!(&refused, StreamRequest::Refuse { reason, .. } if reason.contains("range_end")),
            "{refused:?}"
        );
        let refused =
            create(pb::WatchCreateRequest { key: b"k".to_vec(), start_revision: -1, ..Default::default() });
        assert!(matches!(refused, StreamRequest::Refuse { .. }));
        let all = create(pb::WatchCreateRequest { prefix: true, ..Default::default() });
        assert!(matches!(all, StreamRequest::Create(WatchSpec { watch_id: None, .. })));
        assert!(watch(pb::WatchRequest { request: None }, &l).is_err());
    }

    #[test]
    fn ranges() {
        let l = limits();
        let r = |key: &[u8], end: &[u8], prefix: bool, limit: i64| {
            range(
                &pb::RangeRequest {
                    key: key.to_vec(),
                    range_end: end.to_vec(),
                    prefix,
                    limit,
                    ..Default::default()
                },
                &l,
            )
        };
        assert_eq!(r(b"a", b"", false, 0).unwrap().range, KeyRange::single("a"));
        assert_eq!(r(b"a", b"", true, 0).unwrap().range, KeyRange::prefix("a"));
        assert_eq!(r(b"", b"", true, 0).unwrap().range.end, RangeEnd::Unbounded, "empty prefix = everything");
        assert_eq!(r(b"a", b"\0", false, 0).unwrap().range.end, RangeEnd::Unbounded);
        assert_eq!(r(b"a", b"", false, 0).unwrap().limit, 10_000);
        assert!(msg(r(b"", b"", false, 0).unwrap_err()).contains("key is empty"));
        assert!(msg(r(b"b", b"a", false, 0).unwrap_err()).contains("range_end must be greater"));
        assert!(msg(r(b"a", b"b", true, 0).unwrap_err()).contains("range_end must be empty"));
        assert!(msg(r(b"a", b"", false, -1).unwrap_err()).contains("negative"));
        assert!(msg(r(b"a", b"", false, 10_001).unwrap_err()).contains("limits.range_max_keys"));

        let page = |page_key: &[u8], prefix: bool| {
            range(
                &pb::RangeRequest {
                    key: b"p/".to_vec(),
                    prefix,
                    page_key: page_key.to_vec(),
                    ..Default::default()
                },
                &l,
            )
            .unwrap()
            .range
        };
        assert_eq!(
            page(b"p/5", true),
            KeyRange { start: b"p/5".to_vec(), end: RangeEnd::Before(b"p0".to_vec()) }
        );
        assert_eq!(page(b"a", true), KeyRange::prefix("p/"), "a page key before the range changes nothing");
        assert!(!page(b"p/5", false).contains(b"p/"), "past a single key: empty");
    }

    fn cas(key: &[u8]) -> pb::TxnRequest {
        pb::TxnRequest {
            compare: vec![pb::Compare {
                result: pb::compare::Result::Equal as i32,
                target: pb::compare::Target::Value as i32,
                key: key.to_vec(),
                target_union: Some(pb::compare::TargetUnion::Value(b"old".to_vec())),
            }],
            success: vec![pb::RequestOp {
                request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                    key: key.to_vec(),
                    value: b"new".to_vec(),
                    ..Default::default()
                })),
            }],
            failure: vec![],
        }
    }

    #[test]
    fn txns() {
        let l = limits();
        assert!(txn_command(&cas(b"k"), &l).is_ok());

        let mut bad = cas(b"k");
        bad.compare[0].target_union = Some(pb::compare::TargetUnion::Version(1));
        assert!(msg(txn_command(&bad, &l).unwrap_err()).contains("needs its operand"));

        let mut bad = cas(b"k");
        bad.compare[0].result = 42;
        assert!(msg(txn_command(&bad, &l).unwrap_err()).contains("not a known value"));

        let mut twice = cas(b"k");
        twice.success.push(twice.success[0].clone());
        assert!(msg(txn_command(&twice, &l).unwrap_err()).contains("same key twice"));

        let mut overlap = cas(b"k");
        overlap.success.push(pb::RequestOp {
            request: Some(pb::request_op::Request::RequestDelete(pb::DeleteRequest {
                key: b"k".to_vec(),
                prefix: true,
                ..Default::default()
            })),
        });
        assert!(msg(txn_command(&overlap, &l).unwrap_err()).contains("also deletes"));

        let mut many = cas(b"k");
        many.failure = (0..128)
            .map(|i| pb::RequestOp {
                request: Some(pb::request_op::Request::RequestRange(pb::RangeRequest {
                    key: format!("k{i}").into_bytes(),
                    ..Default::default()
                })),
            })
            .collect();
        assert!(msg(txn_command(&many, &l).unwrap_err()).contains("limits.txn_max_ops"));

        let mut empty_op = cas(b"k");
        empty_op.failure.push(pb::RequestOp { request: None });
        assert!(msg(txn_command(&empty_op, &l).unwrap_err()).contains("empty op"));
    }
}
