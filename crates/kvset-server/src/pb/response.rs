//! Domain results → kvset.v1 protobuf responses.

use kvset_proto::v1 as pb;
use kvset_storage::CommandResult;
use kvset_storage::Event;
use kvset_storage::EventKind;
use kvset_storage::KeyValue;
use kvset_storage::OpResult;
use kvset_storage::RangeResult;
use kvset_storage::Revision;

use crate::watch_types::StreamResponse;

/// Fields of every response header that depend on the member, not on the result.
#[derive(Debug, Clone, Default)]
pub struct HeaderInfo {
    pub cluster_id: String,
    pub member_id: u64,
    pub raft_term: u64,
}

impl HeaderInfo {
    /// The header for a response at `revision`.
    pub fn at(&self, revision: Revision) -> Option<pb::ResponseHeader> {
        Some(pb::ResponseHeader {
            cluster_id: self.cluster_id.clone(),
            member_id: self.member_id,
            revision,
            raft_term: self.raft_term,
        })
    }
}

/// A key-value pair.
pub fn kv(kv: KeyValue) -> pb::KeyValue {
    pb::KeyValue {
        key: kv.key,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        value: kv.value,
        lease: kv.lease,
    }
}

/// A range page.
pub fn range(r: RangeResult, header: Option<pb::ResponseHeader>) -> pb::RangeResponse {
    pb::RangeResponse {
        header,
        kvs: r.kvs.into_iter().map(kv).collect(),
        more: r.more,
        count: r.count,
        next_key: r.next_key.unwrap_or_default(),
    }
}

/// The result of a Put command.
pub fn put(result: CommandResult, info: &HeaderInfo) -> pb::PutResponse {
    match result {
        CommandResult::Put { revision, prev } => {
            pb::PutResponse { header: info.at(revision), prev_kv: prev.map(kv) }
        }
        other => pb::PutResponse { header: info.at(other.revision()), prev_kv: None },
    }
}

/// The result of a Delete command.
pub fn delete(result: CommandResult, info: &HeaderInfo) -> pb::DeleteResponse {
    match result {
        CommandResult::Delete { revision, deleted, prev } => pb::DeleteResponse {
            header: info.at(revision),
            deleted,
            prev_kvs: prev.into_iter().map(kv).collect(),
        },
        other => pb::DeleteResponse { header: info.at(other.revision()), ..Default::default() },
    }
}

/// The result of a Txn command.
pub fn txn(result: CommandResult, info: &HeaderInfo) -> pb::TxnResponse {
    match result {
        CommandResult::Txn { revision, succeeded, responses } => pb::TxnResponse {
            header: info.at(revision),
            succeeded,
            responses: responses
                .into_iter()
                .map(|r| pb::ResponseOp {
                    response: match r {
                        OpResult::Range(rr) => {
                            Some(pb::response_op::Response::ResponseRange(range(rr, info.at(revision))))
                        }
                        OpResult::Put { prev } => {
                            Some(pb::response_op::Response::ResponsePut(pb::PutResponse {
                                header: info.at(revision),
                                prev_kv: prev.map(kv),
                            }))
                        }
                        OpResult::Delete { deleted, prev } => {
                            Some(pb::response_op::Response::ResponseDelete(pb::DeleteResponse {
                                header: info.at(revision),
                                deleted,
                                prev_kvs: prev.into_iter().map(kv).collect(),
                            }))
                        }
                        // kvset.v1 has no nested transactions, so none comes back.
                        OpResult::Txn { .. } => None,
                    },
                })
                .collect(),
        },
        other => pb::TxnResponse { header: info.at(other.revision()), ..Default::default() },
    }
}

/// One event.
pub fn event(e: Event) -> pb::Event {
    pb::Event {
        r#type: match e.kind {
            EventKind::Put => pb::event::EventType::Put as i32,
            EventKind::Delete => pb::event::EventType::Delete as i32,
        },
        kv: Some(kv(e.kv)),
        prev_kv: e.prev.map(kv),
    }
}

/// A message of a Watch stream.
pub fn watch(r: StreamResponse, info: &HeaderInfo) -> pb::WatchResponse {
    match r {
        StreamResponse::Created { watch_id, revision } => {
            pb::WatchResponse { header: info.at(revision), watch_id, created: true, ..Default::default() }
        }
        StreamResponse::Events { watch_id, revision, events, .. } => pb::WatchResponse {
            header: info.at(revision),
            watch_id,
            events: events.into_iter().map(event).collect(),
            ..Default::default()
        },
        StreamResponse::Progress { watch_id, revision } => {
            pb::WatchResponse { header: info.at(revision), watch_id, progress: true, ..Default::default() }
        }
        StreamResponse::Canceled { watch_id, revision, reason, compact_revision, .. } => pb::WatchResponse {
            header: info.at(revision),
            watch_id,
            canceled: true,
            cancel_reason: reason,
            compact_revision,
            ..Default::default()
        },
    }
}
