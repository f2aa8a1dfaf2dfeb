//! Domain results → etcd v3 responses, with the headers etcd fills: `cluster_id` and
//! `member_id` as integers, the revision, the Raft term; inside a Txn, each sub-response
//! carries the revision etcd's MVCC reports for it and nothing else.

use kvset_proto::etcdserverpb as epb;
use kvset_proto::mvccpb;
use kvset_storage::CommandResult;
use kvset_storage::Event;
use kvset_storage::EventKind;
use kvset_storage::KeyValue;
use kvset_storage::OpResult;
use kvset_storage::RangeResult;
use kvset_storage::Revision;

use crate::pb::response::HeaderInfo;
use crate::watch_types::CancelCause;
use crate::watch_types::StreamResponse;

/// The cluster id as etcd clients expect it: a 64-bit integer (the first half of kvset's
/// 128-bit id); 0 before the cluster has one.
pub fn cluster_id(info: &HeaderInfo) -> u64 {
    info.cluster_id.get(..16).and_then(|hex| u64::from_str_radix(hex, 16).ok()).unwrap_or(0)
}

/// A full response header at `revision`.
pub fn header(info: &HeaderInfo, revision: Revision) -> Option<epb::ResponseHeader> {
    Some(epb::ResponseHeader {
        cluster_id: cluster_id(info),
        member_id: info.member_id,
        revision,
        raft_term: info.raft_term,
    })
}

/// A sub-response header: only the revision (etcd fills the rest on the outer response).
fn revision_only(revision: Revision) -> Option<epb::ResponseHeader> {
    Some(epb::ResponseHeader { revision, ..Default::default() })
}

/// A key-value pair.
pub fn kv(kv: KeyValue) -> mvccpb::KeyValue {
    mvccpb::KeyValue {
        key: kv.key,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        value: kv.value,
        lease: kv.lease,
    }
}

/// A range result.
pub fn range(r: RangeResult, header: Option<epb::ResponseHeader>) -> epb::RangeResponse {
    epb::RangeResponse { header, kvs: r.kvs.into_iter().map(kv).collect(), more: r.more, count: r.count }
}

/// The result of a Put.
pub fn put(result: CommandResult, info: &HeaderInfo) -> epb::PutResponse {
    match result {
        CommandResult::Put { revision, prev } => {
            epb::PutResponse { header: header(info, revision), prev_kv: prev.map(kv) }
        }
        other => epb::PutResponse { header: header(info, other.revision()), prev_kv: None },
    }
}

/// The result of a DeleteRange.
pub fn delete(result: CommandResult, info: &HeaderInfo) -> epb::DeleteRangeResponse {
    match result {
        CommandResult::Delete { revision, deleted, prev } => epb::DeleteRangeResponse {
            header: header(info, revision),
            deleted,
            prev_kvs: prev.into_iter().map(kv).collect(),
        },
        other => epb::DeleteRangeResponse { header: header(info, other.revision()), ..Default::default() },
    }
}

/// The result of a Txn.
pub fn txn(result: CommandResult, info: &HeaderInfo) -> epb::TxnResponse {
    match result {
        CommandResult::Txn { revision, succeeded, responses } => {
            // etcd's MVCC numbers a txn's reads and writes from the revision before it: reads
            // see `begin`, or `begin + 1` once the txn has changed something; writes `begin + 1`.
            let begin = if changes(&responses) { revision - 1 } else { revision };
            let mut changed = false;
            epb::TxnResponse {
                header: header(info, revision),
                succeeded,
                responses: ops(responses, begin, &mut changed),
            }
        }
        other => epb::TxnResponse { header: header(info, other.revision()), ..Default::default() },
    }
}

/// Whether any executed op changed a key.
fn changes(results: &[OpResult]) -> bool {
    results.iter().any(|r| match r {
        OpResult::Put { .. } => true,
        OpResult::Delete { deleted, .. } => *deleted > 0,
        OpResult::Txn { responses, .. } => changes(responses),
        OpResult::Range(_) => false,
    })
}

fn ops(results: Vec<OpResult>, begin: Revision, changed: &mut bool) -> Vec<epb::ResponseOp> {
    use epb::response_op::Response as R;
    results
        .into_iter()
        .map(|r| {
            let response = match r {
                OpResult::Range(rr) => R::ResponseRange(range(rr, revision_only(begin + *changed as i64))),
                OpResult::Put { prev } => {
                    *changed = true;
                    R::ResponsePut(epb::PutResponse {
                        header: revision_only(begin + 1),
                        prev_kv: prev.map(kv),
                    })
                }
                OpResult::Delete { deleted, prev } => {
                    *changed |= deleted > 0;
                    R::ResponseDeleteRange(epb::DeleteRangeResponse {
                        header: revision_only(begin + *changed as i64),
                        deleted,
                        prev_kvs: prev.into_iter().map(kv).collect(),
                    })
                }
                OpResult::Txn { succeeded, responses } => R::ResponseTxn(epb::TxnResponse {
                    header: revision_only(0),
                    succeeded,
                    responses: ops(responses, begin, changed),
                }),
            };
            epb::ResponseOp { response: Some(response) }
        })
        .collect()
}

/// One event.
pub fn event(e: Event) -> mvccpb::Event {
    mvccpb::Event {
        r#type: match e.kind {
            EventKind::Put => mvccpb::event::EventType::Put as i32,
            EventKind::Delete => mvccpb::event::EventType::Delete as i32,
        },
        kv: Some(kv(e.kv)),
        prev_kv: e.prev.map(kv),
    }
}

/// A message of a Watch stream. As in etcd, a watch canceled because its start was compacted
/// carries the compact revision, and `created` comes with the current revision.
pub fn watch(r: StreamResponse, info: &HeaderInfo) -> epb::WatchResponse {
    match r {
        StreamResponse::Created { watch_id, revision } => epb::WatchResponse {
            header: header(info, revision),
            watch_id,
            created: true,
            ..Default::default()
        },
        StreamResponse::Events { watch_id, revision, events, fragment } => epb::WatchResponse {
            header: header(info, revision),
            watch_id,
            events: events.into_iter().map(event).collect(),
            fragment,
            ..Default::default()
        },
        // etcd marks a progress notification only by an empty event list.
        StreamResponse::Progress { watch_id, revision } => {
            epb::WatchResponse { header: header(info, revision), watch_id, ..Default::default() }
        }
        // A create etcd cannot serve: created and canceled at once, watch id -1.
        StreamResponse::Canceled { revision, reason, cause: CancelCause::Refused, .. } => {
            epb::WatchResponse {
                header: header(info, revision),
                watch_id: -1,
                created: true,
                canceled: true,
                cancel_reason: reason,
                ..Default::default()
            }
        }
        // etcd's compaction cancel carries the compact revision and nothing else (header
        // revision 0, no reason); clients turn it into ErrCompacted.
        StreamResponse::Canceled { watch_id, compact_revision, cause: CancelCause::Compacted, .. } => {
            epb::WatchResponse {
                header: header(info, 0),
                watch_id,
                canceled: true,
                compact_revision,
                ..Default::default()
            }
        }
        StreamResponse::Canceled { watch_id, revision, cause: CancelCause::Client, .. } => {
            epb::WatchResponse {
                header: header(info, revision),
                watch_id,
                canceled: true,
                ..Default::default()
            }
        }
        StreamResponse::Canceled { watch_id, revision, reason, cause: CancelCause::Failed, .. } => {
            epb::WatchResponse {
                header: header(info, revision),
                watch_id,
                canceled: true,
                cancel_reason: reason,
                ..Default::default()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> HeaderInfo {
        HeaderInfo { cluster_id: "00000000000000ff0123456789abcdef".into(), member_id: 3, raft_term: 2 }
    }

    #[test]
    fn headers_carry_integer_ids() {
        let h = header(&info(), 9).unwrap();
        assert_eq!((h.cluster_id, h.member_id, h.revision, h.raft_term), (255, 3, 9, 2));
        assert_eq!(cluster_id(&HeaderInfo::default()), 0);
    }

    #[test]
    fn txn_sub_responses_carry_etcds_revisions() {
        // Before the txn the store is at 5: a range before any write reads 5, the put is 6, a
        // range after it reads 6, a delete that removed nothing after the put reports 6.
        let result = CommandResult::Txn {
            revision: 6,
            succeeded: true,
            responses: vec![
                OpResult::Range(RangeResult::default()),
                OpResult::Put { prev: None },
                OpResult::Range(RangeResult::default()),
                OpResult::Delete { deleted: 0, prev: vec![] },
            ],
        };
        let r = txn(result, &info());
        let revisions: Vec<i64> = r
            .responses
            .iter()
            .map(|op| match op.response.as_ref().unwrap() {
                epb::response_op::Response::ResponseRange(x) => x.header.as_ref().unwrap().revision,
                epb::response_op::Response::ResponsePut(x) => x.header.as_ref().unwrap().revision,
                epb::response_op::Response::ResponseDeleteRange(x) => x.header.as_ref().unwrap().revision,
                epb::response_op::Response::ResponseTxn(x) => x.header.as_ref().unwrap().revision,
            })
            .collect();
        assert_eq!(revisions, vec![5, 6, 6, 6]);
        assert_eq!(r.header.unwrap().revision, 6);

        // A read-only txn: every read at the current revision, a delete of nothing too.
        let result = CommandResult::Txn {
            revision: 5,
            succeeded: false,
            responses: vec![OpResult::Delete { deleted: 0, prev: vec![] }],
        };
        let r = txn(result, &info());
        let epb::response_op::Response::ResponseDeleteRange(d) = r.responses[0].response.clone().unwrap()
        else {
            panic!("a delete")
        };
        assert_eq!(d.header.unwrap().revision, 5);
    }
}
