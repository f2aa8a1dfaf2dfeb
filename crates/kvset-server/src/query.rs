//! Reads in their domain form: what both client APIs (kvset.v1 and etcd's) ask of the state
//! machine, how it answers, and how one member evaluates them.
//!
//! A linearizable read runs on the leader after a ReadIndex round; when a follower receives
//! one, it sends the [`Query`] itself to the leader (the peer `Read` RPC) and gets the
//! [`Answer`] back, so neither API needs forwarding code of its own. Refusals that depend on
//! the state only (a compacted or future revision) are answers too ([`QueryError`]), so each API
//! can word them its own way.

use std::time::Duration;

use kvset_storage::KeyValue;
use kvset_storage::Lease;
use kvset_storage::LeaseId;
use kvset_storage::RangeQuery;
use kvset_storage::RangeResult;
use kvset_storage::ReadError;
use kvset_storage::Revision;
use kvset_storage::SmReader;
use serde::Deserialize;
use serde::Serialize;

/// A read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Query {
    /// One key at a revision (0: now).
    Get { key: Vec<u8>, revision: Revision },
    /// A range with its options.
    Range(RangeQuery),
    /// A lease: TTLs and, when `keys`, its keys. Needs the leader (the remaining time lives
    /// there).
    Lease { id: LeaseId, keys: bool },
    /// Every lease.
    Leases,
}

/// A lease as the leader reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseStatus {
    pub lease: Lease,
    /// Milliseconds left before it expires.
    pub remaining_ms: u64,
    pub keys: Vec<Vec<u8>>,
}

/// The answer to a [`Query`]; `revision` is the store's current revision when it was read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    Get { kv: Option<KeyValue>, revision: Revision },
    Range { result: RangeResult, revision: Revision },
    Lease { status: Option<LeaseStatus>, revision: Revision },
    Leases { leases: Vec<Lease>, revision: Revision },
}

/// A read the state refuses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum QueryError {
    #[error("required revision {requested} has been compacted (compact revision {compact_revision})")]
    Compacted { requested: Revision, compact_revision: Revision },
    #[error("required revision {requested} is a future revision (current revision {current})")]
    FutureRevision { requested: Revision, current: Revision },
    /// A storage failure (the member stops itself after one).
    #[error("state machine read failed: {0}")]
    Storage(String),
}

impl From<ReadError> for QueryError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Compacted { requested, compact_revision } => {
                QueryError::Compacted { requested, compact_revision }
            }
            ReadError::FutureRevision { requested, current } => {
                QueryError::FutureRevision { requested, current }
            }
            other => QueryError::Storage(other.to_string()),
        }
    }
}

impl Query {
    /// Whether only the leader can answer (whatever the consistency asked for).
    pub fn needs_leader(&self) -> bool {
        matches!(self, Query::Lease { .. })
    }

    /// Whether answering may scan many keys (so it belongs on the blocking pool).
    pub fn is_scan(&self) -> bool {
        matches!(self, Query::Range(_) | Query::Leases)
    }

    /// Answers from `reader`; `remaining` gives a lease's time left (the leader's lessor).
    pub fn answer(
        &self,
        reader: &SmReader,
        remaining: impl Fn(LeaseId) -> Option<Duration>,
    ) -> Result<Answer, QueryError> {
        Ok(match self {
            Query::Get { key, revision } => {
                let (kv, revision) = reader.get(key, *revision)?;
                Answer::Get { kv, revision }
            }
            Query::Range(q) => {
                let (result, revision) = reader.range(q)?;
                Answer::Range { result, revision }
            }
            Query::Lease { id, keys } => {
                let revision = reader.applied().revision;
                let status = reader.lease(*id)?.map(|(lease, attached)| {
                    // A lease granted since the lessor last looked has its whole TTL left.
                    let left = remaining(*id).unwrap_or_else(|| Duration::from_secs(lease.ttl.max(0) as u64));
                    LeaseStatus {
                        lease,
                        remaining_ms: left.as_millis() as u64,
                        keys: if *keys { attached } else { Vec::new() },
                    }
                });
                Answer::Lease { status, revision }
            }
            Query::Leases => {
                let revision = reader.applied().revision;
                Answer::Leases { leases: reader.leases().values().copied().collect(), revision }
            }
        })
    }
}

/// When a read must be served by: a ReadIndex barrier on the leader, or the member's own
/// state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    Linearizable,
    Serializable,
}
