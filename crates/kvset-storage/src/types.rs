//! The domain types replicated through Raft: commands, their results, stored keys and events.
//!
//! These are what a Raft log entry carries ([`Batch`]) and what applying it returns
//! ([`BatchResult`]). They are independent of the wire format: `kvset-server` converts protobuf
//! requests (kvset.v1 and etcd's v3 API alike) into [`Command`]s after validating every limit.
//! Applying a command is deterministic: it either changes the state or is [`ApplyError`]-refused
//! with nothing changed (an unknown lease, a compacted revision), identically on every member.
//!
//! The semantics follow etcd's v3 API: a store revision that starts at 1 and grows by one for
//! every command that changes a key; create/mod revision and version per key; a delete writes a
//! tombstone; leases own keys; compaction forgets history older than a revision.

use serde::Deserialize;
use serde::Serialize;

/// Revision of the store: starts at 1 on an empty store, +1 for every command that changed a
/// key (a put, a delete that removed a key, a txn whose branch wrote, a lease revoke that
/// deleted keys).
pub type Revision = i64;

/// A lease id; 0 means "no lease".
pub type LeaseId = i64;

/// One Raft log entry's payload: client commands gathered by the server's write batcher.
///
/// Commands apply in order, each atomically, and the whole batch applies atomically together
/// with `last_applied` (see [`crate::StateMachine`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub commands: Vec<Command>,
}

/// How openraft logs a batch: its size, never its keys or values.
impl std::fmt::Display for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "batch of {} command(s)", self.commands.len())
    }
}

/// The results of one [`Batch`], one per command, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchResult {
    pub results: Vec<CommandResult>,
}

/// A replicated command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Sets `key` to `value`, creating it if absent.
    Put(Put),
    /// Removes the keys in a range.
    Delete(Delete),
    /// Compares, then runs one of two op lists, at one revision.
    Txn(Txn),
    /// Records the desired number of voters (the `static` replicas source). Does not change the
    /// store revision.
    SetReplicas(u32),
    /// Forgets history before `revision`: reads and watches below it are refused from then on.
    /// Does not change the store revision.
    Compact(Revision),
    /// Creates lease `id` with a time to live of `ttl` seconds. Does not change the revision.
    LeaseGrant { id: LeaseId, ttl: i64 },
    /// Ends lease `id` and deletes every key attached to it, at one revision.
    LeaseRevoke(LeaseId),
    /// Changes users, roles or permissions (`crate::auth`). Does not change the revision.
    /// (After the others, so that logs written before it existed still decode.)
    Auth(crate::auth::AuthCommand),
    /// `command` on behalf of `user`, checked when it applies against the users, roles and
    /// lease keys of that moment (as etcd checks at apply): a permission taken away, or a key
    /// attached to a lease, after the receiving member checked the request cannot be used
    /// through it. Refused with [`crate::auth::AuthError::PermissionDenied`], changing nothing;
    /// no check while access control is disabled. (Last, for the same reason as `Auth`.)
    AsUser { user: String, command: Box<Command> },
}

impl Command {
    /// The command itself, without the caller it may be wrapped with ([`Command::AsUser`]).
    pub fn inner(&self) -> &Command {
        match self {
            Command::AsUser { command, .. } => command.inner(),
            other => other,
        }
    }

    /// Whether applying it touches at most one key (so its cost is bounded).
    pub fn is_single_key(&self) -> bool {
        match self {
            Command::AsUser { command, .. } => command.is_single_key(),
            Command::Put(_) | Command::SetReplicas(_) | Command::LeaseGrant { .. } | Command::Auth(_) => true,
            Command::Delete(d) => d.range.end == RangeEnd::Single,
            Command::Txn(_) | Command::Compact(_) | Command::LeaseRevoke(_) => false,
        }
    }

    /// Whether applying it may add data (a put anywhere in it, a new lease): what a space
    /// quota refuses. Deletes, compaction and revokes only free space.
    pub fn adds_data(&self) -> bool {
        fn txn(t: &Txn) -> bool {
            let op = |op: &TxnOp| match op {
                TxnOp::Put(_) => true,
                TxnOp::Txn(t) => txn(t),
                TxnOp::Delete(_) | TxnOp::Range(_) => false,
            };
            t.success.iter().any(op) || t.failure.iter().any(op)
        }
        match self {
            Command::AsUser { command, .. } => command.adds_data(),
            Command::Put(_) | Command::LeaseGrant { .. } => true,
            Command::Txn(t) => txn(t),
            Command::Delete(_)
            | Command::SetReplicas(_)
            | Command::Compact(_)
            | Command::LeaseRevoke(_)
            | Command::Auth(_) => false,
        }
    }

    /// Approximate encoded size (keys and values dominate), for byte budgets.
    pub fn approx_bytes(&self) -> usize {
        fn txn(t: &Txn) -> usize {
            let op = |op: &TxnOp| match op {
                TxnOp::Put(p) => p.key.len() + p.value.len() + 16,
                TxnOp::Delete(d) => d.range.start.len() + 16,
                TxnOp::Range(r) => r.range.start.len() + 16,
                TxnOp::Txn(t) => txn(t),
            };
            t.compares.iter().map(|c| c.range.start.len() + 16).sum::<usize>()
                + t.success.iter().map(op).sum::<usize>()
                + t.failure.iter().map(op).sum::<usize>()
        }
        match self {
            Command::AsUser { user, command } => user.len() + command.approx_bytes(),
            Command::Put(p) => p.key.len() + p.value.len() + 16,
            Command::Delete(d) => d.range.start.len() + 16,
            Command::Txn(t) => txn(t),
            Command::SetReplicas(_)
            | Command::Compact(_)
            | Command::LeaseGrant { .. }
            | Command::LeaseRevoke(_) => 16,
            Command::Auth(_) => 256,
        }
    }
}

/// A put, with etcd's options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Put {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// Lease the key is attached to; 0 for none.
    pub lease: LeaseId,
    /// Whether the result carries the previous key.
    pub prev_kv: bool,
    /// Keep the key's current value (`value` must be empty); refused if the key is absent.
    pub ignore_value: bool,
    /// Keep the key's current lease (`lease` must be 0); refused if the key is absent.
    pub ignore_lease: bool,
}

impl Put {
    /// A plain put of `key` = `value`.
    pub fn new(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Self {
            key: key.into(),
            value: value.into(),
            lease: 0,
            prev_kv: false,
            ignore_value: false,
            ignore_lease: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delete {
    pub range: KeyRange,
    /// Whether the result carries the deleted keys.
    pub prev_kv: bool,
}

/// A set of keys: one key, or the keys in `[start, end)`, or every key `>= start`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRange {
    pub start: Vec<u8>,
    pub end: RangeEnd,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RangeEnd {
    /// Only `start` itself.
    Single,
    /// Every key `>= start`.
    Unbounded,
    /// Keys in `[start, end)`.
    Before(Vec<u8>),
}

impl KeyRange {
    /// The single key `key`.
    pub fn single(key: impl Into<Vec<u8>>) -> Self {
        Self { start: key.into(), end: RangeEnd::Single }
    }

    /// Every key that starts with `prefix`.
    pub fn prefix(prefix: impl Into<Vec<u8>>) -> Self {
        let start = prefix.into();
        let end = match prefix_end(&start) {
            Some(end) => RangeEnd::Before(end),
            None => RangeEnd::Unbounded,
        };
        Self { start, end }
    }

    /// The keys in `[start, end)`.
    pub fn between(start: impl Into<Vec<u8>>, end: impl Into<Vec<u8>>) -> Self {
        Self { start: start.into(), end: RangeEnd::Before(end.into()) }
    }

    /// Every key.
    pub fn all() -> Self {
        Self { start: Vec::new(), end: RangeEnd::Unbounded }
    }

    /// Whether `key` lies in this range.
    pub fn contains(&self, key: &[u8]) -> bool {
        match &self.end {
            RangeEnd::Single => key == self.start.as_slice(),
            RangeEnd::Unbounded => key >= self.start.as_slice(),
            RangeEnd::Before(end) => key >= self.start.as_slice() && key < end.as_slice(),
        }
    }

    /// Whether the two ranges share a key.
    pub fn overlaps(&self, other: &KeyRange) -> bool {
        let end_after = |r: &KeyRange, key: &[u8]| match &r.end {
            RangeEnd::Single => r.start.as_slice() >= key,
            RangeEnd::Unbounded => true,
            RangeEnd::Before(end) => end.as_slice() > key,
        };
        let nonempty = |r: &KeyRange| !matches!(&r.end, RangeEnd::Before(end) if end <= &r.start);
        nonempty(self) && nonempty(other) && end_after(self, &other.start) && end_after(other, &self.start)
    }
}

/// Returns the smallest key greater than every key with `prefix`, or `None` when no such key
/// exists (the prefix is empty or all `0xff`).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Which field a range sorts by (etcd's `SortTarget`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SortTarget {
    Key,
    Version,
    Create,
    Mod,
    Value,
}

/// Sort direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SortOrder {
    Ascend,
    Descend,
    /// etcd's sort when a target other than the key is given with no order (`NONE`) and a
    /// limit: ascending, but only of the first `limit + 1` keys in key order (what etcd reads
    /// before it sorts), then cut to the limit. Without a limit, or with a revision filter,
    /// it is [`SortOrder::Ascend`]. (Last, so that logs written before it existed still decode.)
    AscendFirstPage,
}

/// A read of a key range, inside a Txn or on its own, with etcd's options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeQuery {
    pub range: KeyRange,
    /// The revision to read at; 0 for the current one.
    pub revision: Revision,
    /// Largest number of keys to return; 0 for no limit.
    pub limit: usize,
    /// Largest sum of key and value bytes to return; a page ends early (with `more`) once it
    /// would exceed this, but always holds at least one key (kvset.v1's page budget; etcd
    /// has none: `usize::MAX`).
    pub max_bytes: usize,
    /// Leave values out.
    pub keys_only: bool,
    /// Return only the count.
    pub count_only: bool,
    /// Sort the keys (etcd); `None` keeps key order.
    pub sort: Option<(SortTarget, SortOrder)>,
    /// Keep only keys with a mod revision `>=` this (0: no bound).
    pub min_mod_revision: Revision,
    /// Keep only keys with a mod revision `<=` this (0: no bound).
    pub max_mod_revision: Revision,
    /// Keep only keys with a create revision `>=` this (0: no bound).
    pub min_create_revision: Revision,
    /// Keep only keys with a create revision `<=` this (0: no bound).
    pub max_create_revision: Revision,
}

impl RangeQuery {
    /// A query of `range` at the current revision, with no limit and no options.
    pub fn new(range: KeyRange) -> Self {
        Self {
            range,
            revision: 0,
            limit: 0,
            max_bytes: usize::MAX,
            keys_only: false,
            count_only: false,
            sort: None,
            min_mod_revision: 0,
            max_mod_revision: 0,
            min_create_revision: 0,
            max_create_revision: 0,
        }
    }

    /// Whether a filter on revisions is set.
    pub fn has_revision_filters(&self) -> bool {
        self.min_mod_revision != 0
            || self.max_mod_revision != 0
            || self.min_create_revision != 0
            || self.max_create_revision != 0
    }

    /// Whether `kv` passes the revision filters.
    pub fn keeps(&self, kv: &KeyValue) -> bool {
        (self.min_mod_revision == 0 || kv.mod_revision >= self.min_mod_revision)
            && (self.max_mod_revision == 0 || kv.mod_revision <= self.max_mod_revision)
            && (self.min_create_revision == 0 || kv.create_revision >= self.min_create_revision)
            && (self.max_create_revision == 0 || kv.create_revision <= self.max_create_revision)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<TxnOp>,
    pub failure: Vec<TxnOp>,
}

/// A condition on every key of a range (usually one key). A range with no keys compares as one
/// absent key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    pub range: KeyRange,
    pub op: CompareOp,
    pub target: CompareTarget,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareOp {
    Equal,
    NotEqual,
    Greater,
    Less,
}

/// What a [`Compare`] looks at, and the operand it is compared with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareTarget {
    /// The key's version; 0 when absent.
    Version(i64),
    /// The key's create revision; 0 when absent.
    CreateRevision(Revision),
    /// The key's mod revision; 0 when absent.
    ModRevision(Revision),
    /// The key's value; any compare on the value of an absent key is false.
    Value(Vec<u8>),
    /// The key's lease; 0 when absent or unleased.
    Lease(LeaseId),
}

impl Compare {
    /// Evaluates this compare against one key's current state (`None`: absent).
    pub fn holds(&self, current: Option<&KeyValue>) -> bool {
        use std::cmp::Ordering;
        let ordering: Ordering = match (&self.target, current) {
            (CompareTarget::Value(_), None) => return false,
            (CompareTarget::Value(v), Some(cur)) => cur.value.as_slice().cmp(v.as_slice()),
            (CompareTarget::Version(v), cur) => cur.map_or(0, |c| c.version).cmp(v),
            (CompareTarget::CreateRevision(v), cur) => cur.map_or(0, |c| c.create_revision).cmp(v),
            (CompareTarget::ModRevision(v), cur) => cur.map_or(0, |c| c.mod_revision).cmp(v),
            (CompareTarget::Lease(v), cur) => cur.map_or(0, |c| c.lease).cmp(v),
        };
        match self.op {
            CompareOp::Equal => ordering == Ordering::Equal,
            CompareOp::NotEqual => ordering != Ordering::Equal,
            CompareOp::Greater => ordering == Ordering::Greater,
            CompareOp::Less => ordering == Ordering::Less,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnOp {
    Range(RangeQuery),
    Put(Put),
    Delete(Delete),
    /// A nested transaction (etcd 3.3+): its compares see the writes of earlier ops.
    Txn(Txn),
}

/// Why a command was refused when applied. Nothing changed; every member refuses it alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ApplyError {
    #[error("lease {0} not found")]
    LeaseNotFound(LeaseId),
    #[error("lease {0} already exists")]
    LeaseExists(LeaseId),
    #[error("key not found (ignore_value and ignore_lease need an existing key)")]
    KeyNotFound,
    #[error("revision {requested} has been compacted (the compact revision is {compact_revision})")]
    Compacted { requested: Revision, compact_revision: Revision },
    #[error("revision {requested} is a future revision (the current revision is {current})")]
    FutureRevision { requested: Revision, current: Revision },
    #[error("{0}")]
    Auth(crate::auth::AuthError),
}

/// The result of one [`Command`]. `revision` is the store revision after the command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    Put {
        revision: Revision,
        prev: Option<KeyValue>,
    },
    Delete {
        revision: Revision,
        deleted: i64,
        prev: Vec<KeyValue>,
    },
    Txn {
        revision: Revision,
        succeeded: bool,
        responses: Vec<OpResult>,
    },
    SetReplicas {
        revision: Revision,
        replicas: u32,
    },
    Compact {
        revision: Revision,
    },
    LeaseGrant {
        revision: Revision,
        id: LeaseId,
        ttl: i64,
    },
    LeaseRevoke {
        revision: Revision,
        deleted: i64,
    },
    /// The command was refused; nothing changed.
    Rejected {
        revision: Revision,
        error: ApplyError,
    },
    /// An access control change applied; `auth_revision` is the auth state's new revision.
    Auth {
        revision: Revision,
        auth_revision: u64,
    },
}

impl CommandResult {
    /// The store revision right after this command applied.
    pub fn revision(&self) -> Revision {
        match self {
            CommandResult::Put { revision, .. }
            | CommandResult::Delete { revision, .. }
            | CommandResult::Txn { revision, .. }
            | CommandResult::SetReplicas { revision, .. }
            | CommandResult::Compact { revision }
            | CommandResult::LeaseGrant { revision, .. }
            | CommandResult::LeaseRevoke { revision, .. }
            | CommandResult::Rejected { revision, .. }
            | CommandResult::Auth { revision, .. } => *revision,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpResult {
    Range(RangeResult),
    Put { prev: Option<KeyValue> },
    Delete { deleted: i64, prev: Vec<KeyValue> },
    Txn { succeeded: bool, responses: Vec<OpResult> },
}

/// One page of a range read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeResult {
    pub kvs: Vec<KeyValue>,
    /// More keys follow the last one returned.
    pub more: bool,
    /// Keys in the whole range at the revision read (before the limit and the filters, as in
    /// etcd).
    pub count: i64,
    /// Where the next page starts, when `more` and the keys are in key order.
    pub next_key: Option<Vec<u8>>,
}

/// A key as clients see it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub create_revision: Revision,
    pub mod_revision: Revision,
    pub version: i64,
    pub lease: LeaseId,
}

/// A key's current record in the live tree (the key itself is the tree key).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredValue {
    pub value: Vec<u8>,
    pub create_revision: Revision,
    pub mod_revision: Revision,
    pub version: i64,
    pub lease: LeaseId,
}

impl StoredValue {
    /// Returns the client view of this record under `key`; `keys_only` drops the value.
    pub fn to_key_value(&self, key: &[u8], keys_only: bool) -> KeyValue {
        KeyValue {
            key: key.to_vec(),
            value: if keys_only { Vec::new() } else { self.value.clone() },
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            lease: self.lease,
        }
    }
}

/// What happened to a key at one revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change of one key, as watchers see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    /// The key after the change. For a delete: the key and the delete's mod revision only.
    pub kv: KeyValue,
    /// The key before the change (absent when it did not exist, or was compacted away).
    pub prev: Option<KeyValue>,
}

/// The events of one revision, in the order the command made them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevisionEvents {
    pub revision: Revision,
    pub events: Vec<Event>,
}

impl RevisionEvents {
    /// Approximate memory held by these events, in bytes.
    pub fn bytes(&self) -> usize {
        let kv = |kv: &KeyValue| kv.key.len() + kv.value.len() + 48;
        self.events.iter().map(|e| kv(&e.kv) + e.prev.as_ref().map_or(0, kv) + 16).sum::<usize>() + 32
    }
}

/// A lease as the state machine records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub id: LeaseId,
    /// Granted time to live, in seconds.
    pub ttl: i64,
    /// Which grant this is: a number the member's state machine gives each grant as it applies
    /// or loads it, different for a lease revoked and granted again under the same id. Kept in
    /// memory only (neither replicated nor stored), for the leader's lessor.
    #[serde(skip)]
    pub grant: u64,
    /// When this member applied the grant (`None` for a lease loaded at open or from a
    /// snapshot). In memory only, like `grant`: a leader's lessor counts a new lease's TTL from
    /// here, not from when it happened to look.
    #[serde(skip)]
    pub applied_at: Option<std::time::Instant>,
}

/// A cluster member as recorded in the Raft membership config (openraft's `Node` type).
///
/// The node id is the membership map's key; this is what else the cluster must know about the
/// member to reach it and to order it among its StatefulSet siblings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Member {
    /// StatefulSet ordinal (the N of `kvset-N`).
    pub ordinal: u32,
    /// Pod / member name, e.g. `kvset-2`.
    pub name: String,
    /// host:port of the peer (Raft) endpoint.
    pub peer_addr: String,
    /// host:port of the client endpoint.
    pub client_addr: String,
}

impl std::fmt::Display for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}(ordinal {}, peer {}, client {})",
            self.name, self.ordinal, self.peer_addr, self.client_addr
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte_that_can_be() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert_eq!(prefix_end(b""), None);
    }

    #[test]
    fn only_commands_touching_one_key_are_single_key() {
        let put = Command::Put(Put::new("k", "v"));
        let delete = |range| Command::Delete(Delete { range, prev_kv: false });
        assert!(put.is_single_key());
        assert!(Command::SetReplicas(3).is_single_key());
        assert!(delete(KeyRange::single("k")).is_single_key());
        assert!(!delete(KeyRange::prefix("k")).is_single_key());
        assert!(!delete(KeyRange::between("a", "b")).is_single_key());
        let txn = Txn { compares: Vec::new(), success: Vec::new(), failure: Vec::new() };
        assert!(!Command::Txn(txn).is_single_key());
        assert!(!Command::LeaseRevoke(1).is_single_key(), "a revoke deletes every attached key");
    }

    #[test]
    fn key_range_contains_and_overlaps() {
        assert!(KeyRange::single("a").contains(b"a"));
        assert!(!KeyRange::single("a").contains(b"ab"));
        let p = KeyRange::prefix("ab");
        assert!(p.contains(b"ab") && p.contains(b"ab\xff\xff") && !p.contains(b"ac") && !p.contains(b"aa"));
        let all = KeyRange::prefix(vec![0xff]);
        assert!(all.contains(&[0xff, 0x00]) && !all.contains(&[0xfe]));
        assert!(KeyRange::prefix("a").overlaps(&KeyRange::single("ab")));
        assert!(!KeyRange::prefix("a").overlaps(&KeyRange::single("b")));
        assert!(KeyRange::between("a", "c").overlaps(&KeyRange::between("b", "d")));
        assert!(!KeyRange::between("a", "b").overlaps(&KeyRange::between("b", "c")));
        assert!(!KeyRange::between("b", "b").overlaps(&KeyRange::all()), "an empty range overlaps nothing");
        assert!(KeyRange::single("x").overlaps(&KeyRange { start: b"a".to_vec(), end: RangeEnd::Unbounded }));
    }

    #[test]
    fn compares_on_absent_keys() {
        let c = |target| Compare { range: KeyRange::single("k"), op: CompareOp::Equal, target };
        assert!(c(CompareTarget::Version(0)).holds(None));
        assert!(c(CompareTarget::CreateRevision(0)).holds(None));
        assert!(c(CompareTarget::Lease(0)).holds(None));
        assert!(!c(CompareTarget::Value(Vec::new())).holds(None));
        let not_equal = Compare { op: CompareOp::NotEqual, ..c(CompareTarget::Value(b"x".to_vec())) };
        assert!(!not_equal.holds(None), "a value compare on an absent key is false whatever the op");
    }

    #[test]
    fn compares_order_values_bytewise() {
        let cur = KeyValue { value: b"b".to_vec(), version: 3, lease: 7, ..Default::default() };
        let c = |op, target| Compare { range: KeyRange::single("k"), op, target };
        assert!(c(CompareOp::Greater, CompareTarget::Value(b"a".to_vec())).holds(Some(&cur)));
        assert!(c(CompareOp::Less, CompareTarget::Value(b"c".to_vec())).holds(Some(&cur)));
        assert!(c(CompareOp::Equal, CompareTarget::Version(3)).holds(Some(&cur)));
        assert!(c(CompareOp::NotEqual, CompareTarget::Version(2)).holds(Some(&cur)));
        assert!(c(CompareOp::Equal, CompareTarget::Lease(7)).holds(Some(&cur)));
    }
}
