//! etcd v3 requests → validated domain commands, queries and watch requests, with etcd's
//! checks and error texts (`api/v3rpc/key.go`, `watch.go`, `lease.go`) and kvset's limits.
//!
//! Where etcd's conventions differ from kvset.v1's they are resolved here, so the domain sees
//! one meaning: `range_end` "\0" is every key from `key` on, a `range_end` at or below `key`
//! is an empty range (not an error), a negative revision is the current one, a `limit` of 0
//! or less is no limit, an empty watch key is "\0".

use std::collections::BTreeSet;

use kvset_proto::etcdserverpb as epb;
use kvset_storage::Command;
use kvset_storage::Compare;
use kvset_storage::CompareOp;
use kvset_storage::CompareTarget;
use kvset_storage::Delete;
use kvset_storage::KeyRange;
use kvset_storage::Put;
use kvset_storage::RangeEnd;
use kvset_storage::RangeQuery;
use kvset_storage::SortOrder;
use kvset_storage::SortTarget;
use kvset_storage::Txn;
use kvset_storage::TxnOp;
use prost::Message;
use tonic::Code;
use tonic::Status;

use super::errors;
use crate::config::LeaseConfig;
use crate::config::Limits;
use crate::query::Consistency;
use crate::watch_types::StreamRequest;
use crate::watch_types::WatchSpec;

type Result<T> = std::result::Result<T, Status>;

/// etcd's largest lease TTL (`lease.MaxLeaseTTL`).
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

/// A kvset limit etcd does not have, named in the error.
fn over_limit(what: &str, got: u64, name: &str, max: u64) -> Status {
    Status::new(Code::InvalidArgument, format!("kvset: {what} is {got}, over the limit {name} = {max}"))
}

/// etcd refuses a request larger than its `--max-request-bytes` with this error; kvset's limit
/// is `limits.request_max_bytes`.
pub fn check_size(request: &impl Message, limits: &Limits) -> Result<()> {
    if request.encoded_len() as u64 > limits.request_max_bytes {
        return Err(errors::request_too_large());
    }
    Ok(())
}

fn check_key_len(key: &[u8], what: &str, limits: &Limits) -> Result<()> {
    if key.len() as u64 > limits.key_max_bytes {
        return Err(over_limit(
            &format!("{what} length in bytes"),
            key.len() as u64,
            "limits.key_max_bytes",
            limits.key_max_bytes,
        ));
    }
    Ok(())
}

/// `key` and `range_end` as etcd reads them: empty end one key, "\0" every key from `key`
/// on, otherwise `[key, range_end)` (empty when `range_end <= key`).
fn key_range(key: &[u8], range_end: &[u8], limits: &Limits) -> Result<KeyRange> {
    if key.is_empty() {
        return Err(errors::empty_key());
    }
    check_key_len(key, "key", limits)?;
    check_key_len(range_end, "range_end", limits)?;
    Ok(match range_end {
        [] => KeyRange::single(key.to_vec()),
        [0] => KeyRange { start: key.to_vec(), end: RangeEnd::Unbounded },
        end => KeyRange::between(key.to_vec(), end.to_vec()),
    })
}

/// A Range request → a query, its consistency, and whether the client set a limit.
pub fn range(r: &epb::RangeRequest, limits: &Limits) -> Result<(RangeQuery, Consistency)> {
    use epb::range_request::SortOrder as O;
    use epb::range_request::SortTarget as T;
    let range = key_range(&r.key, &r.range_end, limits)?;
    let target = match T::try_from(r.sort_target) {
        Ok(T::Key) => SortTarget::Key,
        Ok(T::Version) => SortTarget::Version,
        Ok(T::Create) => SortTarget::Create,
        Ok(T::Mod) => SortTarget::Mod,
        Ok(T::Value) => SortTarget::Value,
        Err(_) => return Err(unknown("sort_target", r.sort_target)),
    };
    let filtered = r.min_mod_revision != 0
        || r.max_mod_revision != 0
        || r.min_create_revision != 0
        || r.max_create_revision != 0;
    let sort = match O::try_from(r.sort_order) {
        Ok(O::None) if target == SortTarget::Key => None,
        // etcd sorts by a target other than the key ascending when no order is given, but then
        // reads only what the limit asks for (plus one) before sorting: the first keys in key
        // order, not the smallest of the range.
        Ok(O::None) if r.limit > 0 && !filtered => Some((target, SortOrder::AscendFirstPage)),
        Ok(O::None) | Ok(O::Ascend) => Some((target, SortOrder::Ascend)),
        Ok(O::Descend) => Some((target, SortOrder::Descend)),
        Err(_) => return Err(unknown("sort_order", r.sort_order)),
    };
    // A client that sets a limit gets pages of at most range_max_keys keys and
    // response_max_bytes bytes, and pages on `more`. One that sets none gets every key, as from
    // etcd, up to the opt-in unpaged bounds; past them it is refused (see `complete`), never
    // given a silently short answer.
    let (limit, max_bytes) = if r.limit > 0 {
        ((r.limit as u64).min(limits.range_max_keys) as usize, limits.response_max_bytes as usize)
    } else {
        // 0: no key bound (the collector's "no limit").
        (limits.unpaged_range_max_keys as usize, limits.unpaged_range_max_bytes as usize)
    };
    let query = RangeQuery {
        range,
        revision: r.revision.max(0),
        limit,
        max_bytes,
        keys_only: r.keys_only,
        count_only: r.count_only,
        sort,
        min_mod_revision: r.min_mod_revision,
        max_mod_revision: r.max_mod_revision,
        min_create_revision: r.min_create_revision,
        max_create_revision: r.max_create_revision,
    };
    let consistency = if r.serializable { Consistency::Serializable } else { Consistency::Linearizable };
    Ok((query, consistency))
}

/// Refuses a range result that the opt-in unpaged bounds cut short when the client set no
/// limit (etcd would have returned every key).
pub fn complete(r: &epb::RangeRequest, more: bool, limits: &Limits) -> Result<()> {
    if more && r.limit <= 0 {
        return Err(Status::new(
            Code::ResourceExhausted,
            format!(
                "kvset: the range holds more than limits.unpaged_range_max_keys = {} keys or \
                 limits.unpaged_range_max_bytes = {} bytes; read it in pages (set limit, continue after the last \
                 key while more is true)",
                limits.unpaged_range_max_keys, limits.unpaged_range_max_bytes
            ),
        ));
    }
    Ok(())
}

fn unknown(field: &str, value: i32) -> Status {
    Status::new(Code::InvalidArgument, format!("kvset: {field} {value} is not a known value"))
}

/// A Put request → its domain form (the key and value move, no copy).
pub fn put(r: epb::PutRequest, limits: &Limits) -> Result<Put> {
    if r.key.is_empty() {
        return Err(errors::empty_key());
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(errors::value_provided());
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(errors::lease_provided());
    }
    check_key_len(&r.key, "key", limits)?;
    if r.value.len() as u64 > limits.value_max_bytes {
        return Err(over_limit(
            "value length in bytes",
            r.value.len() as u64,
            "limits.value_max_bytes",
            limits.value_max_bytes,
        ));
    }
    Ok(Put {
        key: r.key,
        value: r.value,
        lease: r.lease,
        prev_kv: r.prev_kv,
        ignore_value: r.ignore_value,
        ignore_lease: r.ignore_lease,
    })
}

/// A DeleteRange request → its domain form.
pub fn delete(r: &epb::DeleteRangeRequest, limits: &Limits) -> Result<Delete> {
    Ok(Delete { range: key_range(&r.key, &r.range_end, limits)?, prev_kv: r.prev_kv })
}

/// A Txn request → its domain form, after etcd's checks: at most `limits.txn_max_ops`
/// compares and ops per branch (nested transactions share the budget), keys present, no key
/// written twice on one path (`checkIntervals`).
pub fn txn(r: &epb::TxnRequest, limits: &Limits) -> Result<Txn> {
    check_txn(r, limits.txn_max_ops as usize)?;
    intervals(&r.success)?;
    intervals(&r.failure)?;
    convert_txn(r, limits)
}

/// etcd's `checkTxnRequest`.
fn check_txn(r: &epb::TxnRequest, max_ops: usize) -> Result<()> {
    let ops = r.compare.len().max(r.success.len()).max(r.failure.len());
    if ops > max_ops {
        return Err(errors::too_many_ops());
    }
    if r.compare.iter().any(|c| c.key.is_empty()) {
        return Err(errors::empty_key());
    }
    for op in r.success.iter().chain(&r.failure) {
        use epb::request_op::Request as R;
        match &op.request {
            Some(R::RequestRange(q)) if q.key.is_empty() => return Err(errors::empty_key()),
            Some(R::RequestPut(p)) if p.key.is_empty() => return Err(errors::empty_key()),
            Some(R::RequestPut(p)) if p.ignore_value && !p.value.is_empty() => {
                return Err(errors::value_provided())
            }
            Some(R::RequestPut(p)) if p.ignore_lease && p.lease != 0 => return Err(errors::lease_provided()),
            Some(R::RequestDeleteRange(d)) if d.key.is_empty() => return Err(errors::empty_key()),
            Some(R::RequestTxn(t)) => check_txn(t, max_ops - ops)?,
            Some(_) => {}
            None => return Err(errors::key_not_found()),
        }
    }
    Ok(())
}

/// A deleted interval as etcd's `checkIntervals` sees it: `[key, range_end)` compared as
/// bytes, or the point `key`; a `range_end` at or below `key` (including "\0") holds nothing.
#[derive(Debug, Clone)]
struct Deleted {
    key: Vec<u8>,
    end: Option<Vec<u8>>,
}

impl Deleted {
    fn holds(&self, k: &[u8]) -> bool {
        match &self.end {
            None => self.key == k,
            Some(end) => self.key.as_slice() <= k && k < end.as_slice(),
        }
    }
}

/// etcd's `checkIntervals`: the keys a list of ops puts and the intervals it deletes, or
/// "duplicate key" when one path through it writes a key twice.
fn intervals(ops: &[epb::RequestOp]) -> Result<(BTreeSet<Vec<u8>>, Vec<Deleted>)> {
    use epb::request_op::Request as R;
    let mut dels: Vec<Deleted> = ops
        .iter()
        .filter_map(|op| match &op.request {
            Some(R::RequestDeleteRange(d)) => Some(Deleted {
                key: d.key.clone(),
                end: (!d.range_end.is_empty()).then(|| d.range_end.clone()),
            }),
            _ => None,
        })
        .collect();
    let deleted = |dels: &[Deleted], k: &[u8]| dels.iter().any(|d| d.holds(k));
    let mut puts = BTreeSet::new();
    for op in ops {
        let Some(R::RequestTxn(t)) = &op.request else { continue };
        let (puts_then, dels_then) = intervals(&t.success)?;
        let (puts_else, dels_else) = intervals(&t.failure)?;
        for k in &puts_then {
            if puts.contains(k) || deleted(&dels, k) {
                return Err(errors::duplicate_key());
            }
            puts.insert(k.clone());
        }
        for k in &puts_else {
            // The two branches exclude each other: a key both put is fine.
            if (puts.contains(k) && !puts_then.contains(k)) || deleted(&dels, k) {
                return Err(errors::duplicate_key());
            }
            puts.insert(k.clone());
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }
    for op in ops {
        let Some(R::RequestPut(p)) = &op.request else { continue };
        if puts.contains(&p.key) || deleted(&dels, &p.key) {
            return Err(errors::duplicate_key());
        }
        puts.insert(p.key.clone());
    }
    Ok((puts, dels))
}

fn convert_txn(r: &epb::TxnRequest, limits: &Limits) -> Result<Txn> {
    Ok(Txn {
        compares: r.compare.iter().map(|c| compare(c, limits)).collect::<Result<_>>()?,
        success: r.success.iter().map(|op| txn_op(op, limits)).collect::<Result<_>>()?,
        failure: r.failure.iter().map(|op| txn_op(op, limits)).collect::<Result<_>>()?,
    })
}

fn txn_op(op: &epb::RequestOp, limits: &Limits) -> Result<TxnOp> {
    use epb::request_op::Request as R;
    Ok(match &op.request {
        Some(R::RequestRange(q)) => TxnOp::Range(range(q, limits)?.0),
        Some(R::RequestPut(p)) => TxnOp::Put(put(p.clone(), limits)?),
        Some(R::RequestDeleteRange(d)) => TxnOp::Delete(delete(d, limits)?),
        Some(R::RequestTxn(t)) => TxnOp::Txn(convert_txn(t, limits)?),
        None => return Err(errors::key_not_found()),
    })
}

/// A compare; as in etcd, an operand of another kind than the target compares as zero.
fn compare(c: &epb::Compare, limits: &Limits) -> Result<Compare> {
    use epb::compare::CompareResult as R;
    use epb::compare::CompareTarget as T;
    use epb::compare::TargetUnion as U;
    let op = match R::try_from(c.result) {
        Ok(R::Equal) => CompareOp::Equal,
        Ok(R::NotEqual) => CompareOp::NotEqual,
        Ok(R::Greater) => CompareOp::Greater,
        Ok(R::Less) => CompareOp::Less,
        Err(_) => return Err(unknown("compare result", c.result)),
    };
    let u = c.target_union.as_ref();
    let target = match T::try_from(c.target) {
        Ok(T::Version) => CompareTarget::Version(match u {
            Some(U::Version(v)) => *v,
            _ => 0,
        }),
        Ok(T::Create) => CompareTarget::CreateRevision(match u {
            Some(U::CreateRevision(v)) => *v,
            _ => 0,
        }),
        Ok(T::Mod) => CompareTarget::ModRevision(match u {
            Some(U::ModRevision(v)) => *v,
            _ => 0,
        }),
        Ok(T::Value) => CompareTarget::Value(match u {
            Some(U::Value(v)) => v.clone(),
            _ => Vec::new(),
        }),
        Ok(T::Lease) => CompareTarget::Lease(match u {
            Some(U::Lease(v)) => *v,
            _ => 0,
        }),
        Err(_) => return Err(unknown("compare target", c.target)),
    };
    Ok(Compare { range: key_range(&c.key, &c.range_end, limits)?, op, target })
}

/// A Compaction request → a command. (`physical` needs no wait: kvset refuses reads below the
/// compact revision as soon as the compaction applies.)
pub fn compact(r: &epb::CompactionRequest) -> Command {
    Command::Compact(r.revision)
}

/// A LeaseGrant's TTL as etcd treats it: raised to the minimum, refused above etcd's maximum
/// or kvset's `lease.max_ttl_seconds`.
pub fn lease_ttl(ttl: i64, config: &LeaseConfig) -> Result<i64> {
    if ttl > MAX_LEASE_TTL {
        return Err(errors::lease_ttl_too_large());
    }
    let max = config.max_ttl_seconds as i64;
    if ttl > max {
        return Err(over_limit("TTL", ttl as u64, "lease.max_ttl_seconds", max as u64));
    }
    Ok(ttl.max(config.min_ttl_seconds as i64))
}

/// A message on a Watch stream → its domain form, as etcd's watch server reads it: an empty
/// key is "\0"; a create it cannot serve is answered created-and-canceled; a message with no
/// request is ignored (`None`).
pub fn watch(r: epb::WatchRequest, limits: &Limits) -> Option<StreamRequest> {
    use epb::watch_request::RequestUnion as U;
    match r.request_union? {
        U::CreateRequest(c) => Some(watch_create(c, limits)),
        U::CancelRequest(c) => Some(StreamRequest::Cancel(c.watch_id)),
        U::ProgressRequest(_) => Some(StreamRequest::Progress),
    }
}

fn watch_create(c: epb::WatchCreateRequest, limits: &Limits) -> StreamRequest {
    use epb::watch_create_request::FilterType;
    let key = if c.key.is_empty() { vec![0] } else { c.key };
    let refuse = |reason: String| StreamRequest::Refuse { watch_id: -1, reason };
    if let Err(e) =
        check_key_len(&key, "key", limits).and_then(|()| check_key_len(&c.range_end, "range_end", limits))
    {
        return refuse(e.message().to_string());
    }
    let range = match c.range_end.as_slice() {
        [] => KeyRange::single(key),
        [0] => KeyRange { start: key, end: RangeEnd::Unbounded },
        end if end <= key.as_slice() => return refuse("mvcc: watcher range is empty".into()),
        end => KeyRange::between(key, end.to_vec()),
    };
    let (mut no_put, mut no_delete) = (false, false);
    for f in &c.filters {
        match FilterType::try_from(*f) {
            Ok(FilterType::Noput) => no_put = true,
            Ok(FilterType::Nodelete) => no_delete = true,
            Err(_) => return refuse(format!("kvset: watch filter {f} is not a known value")),
        }
    }
    if c.start_revision < 0 {
        return refuse(format!("kvset: start_revision is {}, must not be negative", c.start_revision));
    }
    StreamRequest::Create(WatchSpec {
        range,
        start_revision: c.start_revision,
        prev_kv: c.prev_kv,
        progress_notify: c.progress_notify,
        no_put,
        no_delete,
        watch_id: (c.watch_id != 0).then_some(c.watch_id),
        fragment: c.fragment,
    })
}

#[cfg(test)]
mod tests {
    use epb::request_op::Request as R;

    use super::*;

    fn limits() -> Limits {
        Limits::default()
    }

    fn put_op(key: &str) -> epb::RequestOp {
        epb::RequestOp {
            request: Some(R::RequestPut(epb::PutRequest {
                key: key.into(),
                value: b"v".to_vec(),
                ..Default::default()
            })),
        }
    }

    fn del_op(key: &str, end: &str) -> epb::RequestOp {
        epb::RequestOp {
            request: Some(R::RequestDeleteRange(epb::DeleteRangeRequest {
                key: key.into(),
                range_end: end.into(),
                ..Default::default()
            })),
        }
    }

    fn txn_op(success: Vec<epb::RequestOp>, failure: Vec<epb::RequestOp>) -> epb::RequestOp {
        epb::RequestOp { request: Some(R::RequestTxn(epb::TxnRequest { compare: vec![], success, failure })) }
    }

    fn txn_of(success: Vec<epb::RequestOp>) -> epb::TxnRequest {
        epb::TxnRequest { compare: vec![], success, failure: vec![] }
    }

    fn message<T: std::fmt::Debug>(r: Result<T>) -> String {
        r.expect_err("refused").message().to_string()
    }

    #[test]
    fn key_ranges_follow_etcd_conventions() {
        let l = limits();
        let q = |key: &[u8], end: &[u8]| {
            range(&epb::RangeRequest { key: key.to_vec(), range_end: end.to_vec(), ..Default::default() }, &l)
        };
        assert_eq!(q(b"a", b"").unwrap().0.range, KeyRange::single("a"));
        assert_eq!(q(b"a", b"\0").unwrap().0.range.end, RangeEnd::Unbounded);
        assert_eq!(q(b"\0", b"\0").unwrap().0.range, KeyRange { start: vec![0], end: RangeEnd::Unbounded });
        assert_eq!(
            q(b"b", b"a").unwrap().0.range,
            KeyRange::between("b", "a"),
            "an empty range, not an error"
        );
        assert_eq!(message(q(b"", b"")), "etcdserver: key is not provided");
        assert_eq!(message(q(b"", b"\0")), "etcdserver: key is not provided");
    }

    #[test]
    fn range_options() {
        let l = limits();
        use epb::range_request::SortOrder as O;
        use epb::range_request::SortTarget as T;
        let q = |f: &dyn Fn(&mut epb::RangeRequest)| {
            let mut r = epb::RangeRequest { key: b"a".to_vec(), ..Default::default() };
            f(&mut r);
            range(&r, &l)
        };
        assert_eq!(q(&|_| {}).unwrap().0.sort, None);
        assert_eq!(
            q(&|r| r.sort_target = T::Mod as i32).unwrap().0.sort,
            Some((SortTarget::Mod, SortOrder::Ascend))
        );
        assert_eq!(
            q(&|r| r.sort_order = O::Descend as i32).unwrap().0.sort,
            Some((SortTarget::Key, SortOrder::Descend))
        );
        assert!(message(q(&|r| r.sort_target = 9)).contains("sort_target 9"));
        assert!(message(q(&|r| r.sort_order = 9)).contains("sort_order 9"));
        assert_eq!(q(&|r| r.revision = -3).unwrap().0.revision, 0, "a negative revision is the current one");
        let unpaged = q(&|r| r.limit = -1).unwrap().0;
        assert_eq!(
            (unpaged.limit, unpaged.max_bytes),
            (0, i32::MAX as usize),
            "no limit: every key, as etcd"
        );
        assert_eq!(q(&|r| r.limit = 50_000).unwrap().0.limit, 10_000, "a limit: pages of range_max_keys");
        assert_eq!(q(&|r| r.serializable = true).unwrap().1, Consistency::Serializable);
        let unlimited = epb::RangeRequest::default();
        assert!(message(complete(&unlimited, true, &l).map(|_| ())).contains("limits.unpaged_range_max_keys"));
        assert!(complete(&epb::RangeRequest { limit: 5, ..Default::default() }, true, &l).is_ok());
    }

    #[test]
    fn puts_are_checked_as_etcd_does() {
        let l = limits();
        let p = |f: &dyn Fn(&mut epb::PutRequest)| {
            let mut r = epb::PutRequest { key: b"k".to_vec(), ..Default::default() };
            f(&mut r);
            put(r, &l)
        };
        assert_eq!(message(p(&|r| r.key.clear())), "etcdserver: key is not provided");
        assert_eq!(
            message(p(&|r| {
                r.ignore_value = true;
                r.value = b"x".to_vec()
            })),
            "etcdserver: value is provided"
        );
        assert_eq!(
            message(p(&|r| {
                r.ignore_lease = true;
                r.lease = 7
            })),
            "etcdserver: lease is provided"
        );
        assert!(message(p(&|r| r.key = vec![b'k'; 5000])).contains("limits.key_max_bytes"));
        assert!(p(&|r| r.ignore_value = true).unwrap().ignore_value);
        let big = epb::PutRequest { key: b"k".to_vec(), value: vec![0; 3 << 20], ..Default::default() };
        assert_eq!(message(check_size(&big, &l)), "etcdserver: request is too large");
    }

    #[test]
    fn txn_checks_match_etcd() {
        let l = limits();
        // Duplicate puts on one path.
        assert_eq!(
            message(txn(&txn_of(vec![put_op("a"), put_op("a")]), &l)),
            "etcdserver: duplicate key given in txn request"
        );
        // A put inside a deleted interval, at any depth.
        assert_eq!(
            message(txn(&txn_of(vec![del_op("a", "c"), put_op("b")]), &l)),
            "etcdserver: duplicate key given in txn request"
        );
        assert_eq!(
            message(txn(&txn_of(vec![del_op("a", ""), txn_op(vec![put_op("a")], vec![])]), &l)),
            "etcdserver: duplicate key given in txn request"
        );
        assert_eq!(
            message(txn(&txn_of(vec![put_op("a"), txn_op(vec![put_op("a")], vec![])]), &l)),
            "etcdserver: duplicate key given in txn request"
        );
        // Then and else of a nested txn exclude each other.
        assert!(txn(&txn_of(vec![txn_op(vec![put_op("a")], vec![put_op("a")])]), &l).is_ok());
        // Deleting then putting elsewhere, or a "\0" end (etcd's interval is empty), is fine.
        assert!(txn(&txn_of(vec![del_op("a", "b"), put_op("b")]), &l).is_ok());
        assert!(txn(&txn_of(vec![del_op("a", "\0"), put_op("b")]), &l).is_ok());
        // Success and failure are separate paths.
        let both =
            epb::TxnRequest { compare: vec![], success: vec![put_op("a")], failure: vec![put_op("a")] };
        assert!(txn(&both, &l).is_ok());
        // Empty ops and keys.
        assert_eq!(
            message(txn(&txn_of(vec![epb::RequestOp { request: None }]), &l)),
            "etcdserver: key not found"
        );
        assert_eq!(message(txn(&txn_of(vec![put_op("")]), &l)), "etcdserver: key is not provided");
        let empty_compare = epb::TxnRequest { compare: vec![epb::Compare::default()], ..Default::default() };
        assert_eq!(message(txn(&empty_compare, &l)), "etcdserver: key is not provided");
        // Too many ops per branch (128 by default); nested txns share the budget.
        let many = txn_of((0..129).map(|i| put_op(&format!("k{i}"))).collect());
        assert_eq!(message(txn(&many, &l)), "etcdserver: too many operations in txn request");
        let exactly = txn_of((0..128).map(|i| put_op(&format!("k{i}"))).collect());
        assert!(txn(&exactly, &l).is_ok());
        let nested =
            txn_of(vec![put_op("x"), txn_op((0..128).map(|i| put_op(&format!("k{i}"))).collect(), vec![])]);
        assert_eq!(message(txn(&nested, &l)), "etcdserver: too many operations in txn request");
    }

    #[test]
    fn compares_read_a_mismatched_operand_as_zero() {
        use epb::compare::CompareResult as CR;
        use epb::compare::CompareTarget as CT;
        let c = epb::Compare {
            result: CR::Equal as i32,
            target: CT::Version as i32,
            key: b"k".to_vec(),
            range_end: vec![],
            target_union: Some(epb::compare::TargetUnion::Value(b"x".to_vec())),
        };
        assert_eq!(compare(&c, &limits()).unwrap().target, CompareTarget::Version(0));
        let bad = epb::Compare { target: 9, ..c };
        assert!(message(compare(&bad, &limits())).contains("compare target 9"));
    }

    #[test]
    fn lease_ttls_are_raised_to_the_minimum_and_bounded() {
        let config = LeaseConfig::default();
        assert_eq!(lease_ttl(0, &config).unwrap(), config.min_ttl_seconds as i64);
        assert_eq!(lease_ttl(-5, &config).unwrap(), config.min_ttl_seconds as i64);
        assert_eq!(lease_ttl(60, &config).unwrap(), 60);
        assert_eq!(message(lease_ttl(MAX_LEASE_TTL + 1, &config)), "etcdserver: too large lease TTL");
    }

    #[test]
    fn watch_creates_follow_the_watch_server() {
        let l = limits();
        let create = |c: epb::WatchCreateRequest| {
            watch(
                epb::WatchRequest { request_union: Some(epb::watch_request::RequestUnion::CreateRequest(c)) },
                &l,
            )
            .expect("a request")
        };
        let StreamRequest::Create(spec) = create(epb::WatchCreateRequest::default()) else {
            panic!("created")
        };
        assert_eq!(spec.range, KeyRange::single(vec![0u8]), "an empty key watches \"\\0\"");
        let StreamRequest::Create(spec) = create(epb::WatchCreateRequest {
            key: b"a".to_vec(),
            range_end: vec![0],
            fragment: true,
            ..Default::default()
        }) else {
            panic!("created")
        };
        assert_eq!(spec.range.end, RangeEnd::Unbounded);
        assert!(spec.fragment);
        let refused = create(epb::WatchCreateRequest {
            key: b"b".to_vec(),
            range_end: b"a".to_vec(),
            ..Default::default()
        });
        assert_eq!(
            refused,
            StreamRequest::Refuse { watch_id: -1, reason: "mvcc: watcher range is empty".into() }
        );
        let StreamRequest::Create(spec) = create(epb::WatchCreateRequest {
            key: b"a".to_vec(),
            filters: vec![epb::watch_create_request::FilterType::Nodelete as i32],
            ..Default::default()
        }) else {
            panic!("created")
        };
        assert!(spec.no_delete && !spec.no_put);
        assert!(watch(epb::WatchRequest { request_union: None }, &l).is_none(), "ignored, as etcd does");
    }
}
