//! The domain types replicated through Raft: commands, their results and stored keys.
//!
//! These are what a Raft log entry carries ([`Batch`]) and what applying it returns
//! ([`BatchResult`]). They are independent of the wire format: `kvset-server` converts protobuf
//! requests into [`Command`]s after validating every limit, so nothing here ever needs to reject
//! a command. Applying a command is deterministic and infallible except for storage I/O.

use serde::Deserialize;
use serde::Serialize;

/// Revision of the store: starts at 1 on an empty store, +1 for every write command that
/// changed something (a put, a delete that removed a key, a txn whose branch wrote).
pub type Revision = i64;

/// One Raft log entry's payload: client commands gathered by the server's write batcher.
///
/// Commands apply in order, each atomically, and the whole batch applies atomically together
/// with `last_applied` (see [`crate::StateMachine`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub commands: Vec<Command>,
}

/// The results of one [`Batch`], one per command, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchResult {
    pub results: Vec<CommandResult>,
}

/// A write command.
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
}

impl Command {
    /// Whether applying it touches at most one key (so its cost is bounded).
    pub fn is_single_key(&self) -> bool {
        match self {
            Command::Put(_) | Command::SetReplicas(_) => true,
            Command::Delete(d) => d.range.end == RangeEnd::Single,
            Command::Txn(_) => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Put {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// Lease id the key is attached to; 0 for none.
    pub lease: i64,
    /// Whether the result carries the previous key.
    pub prev_kv: bool,
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

    /// Whether `key` lies in this range.
    pub fn contains(&self, key: &[u8]) -> bool {
        match &self.end {
            RangeEnd::Single => key == self.start.as_slice(),
            RangeEnd::Unbounded => key >= self.start.as_slice(),
            RangeEnd::Before(end) => key >= self.start.as_slice() && key < end.as_slice(),
        }
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

/// A read of a key range, inside a Txn or on its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeQuery {
    pub range: KeyRange,
    /// Largest number of keys to return; at least 1.
    pub limit: usize,
    /// Largest sum of key and value bytes to return; a page ends early (with `more`) once it
    /// would exceed this, but always holds at least one key.
    pub max_bytes: usize,
    /// Leave values out.
    pub keys_only: bool,
    /// Return only the count.
    pub count_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<TxnOp>,
    pub failure: Vec<TxnOp>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    pub key: Vec<u8>,
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
}

impl Compare {
    /// Evaluates this compare against the key's current state.
    pub fn holds(&self, current: Option<&StoredValue>) -> bool {
        use std::cmp::Ordering;
        let ordering: Ordering = match (&self.target, current) {
            (CompareTarget::Value(_), None) => return false,
            (CompareTarget::Value(v), Some(cur)) => cur.value.as_slice().cmp(v.as_slice()),
            (CompareTarget::Version(v), cur) => cur.map_or(0, |c| c.version).cmp(v),
            (CompareTarget::CreateRevision(v), cur) => cur.map_or(0, |c| c.create_revision).cmp(v),
            (CompareTarget::ModRevision(v), cur) => cur.map_or(0, |c| c.mod_revision).cmp(v),
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
}

/// The result of one [`Command`]. `revision` is the store revision after the command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    Put { revision: Revision, prev: Option<KeyValue> },
    Delete { revision: Revision, deleted: i64, prev: Vec<KeyValue> },
    Txn { revision: Revision, succeeded: bool, responses: Vec<OpResult> },
    SetReplicas { revision: Revision, replicas: u32 },
}

impl CommandResult {
    /// The store revision right after this command applied.
    pub fn revision(&self) -> Revision {
        match self {
            CommandResult::Put { revision, .. }
            | CommandResult::Delete { revision, .. }
            | CommandResult::Txn { revision, .. }
            | CommandResult::SetReplicas { revision, .. } => *revision,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpResult {
    Range(RangeResult),
    Put { prev: Option<KeyValue> },
    Delete { deleted: i64, prev: Vec<KeyValue> },
}

/// One page of a range read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeResult {
    pub kvs: Vec<KeyValue>,
    /// More keys follow the last one returned.
    pub more: bool,
    /// Keys in the whole range.
    pub count: i64,
    /// Where the next page starts, when `more`.
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
    pub lease: i64,
}

/// A key's record as stored in the state machine tree (the key itself is the tree key).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredValue {
    pub value: Vec<u8>,
    pub create_revision: Revision,
    pub mod_revision: Revision,
    pub version: i64,
    pub lease: i64,
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
        let put = Command::Put(Put { key: b"k".to_vec(), value: b"v".to_vec(), lease: 0, prev_kv: false });
        let delete = |range| Command::Delete(Delete { range, prev_kv: false });
        assert!(put.is_single_key());
        assert!(Command::SetReplicas(3).is_single_key());
        assert!(delete(KeyRange::single("k")).is_single_key());
        assert!(!delete(KeyRange::prefix("k")).is_single_key());
        assert!(!delete(KeyRange::between("a", "b")).is_single_key());
        let txn = Txn { compares: Vec::new(), success: Vec::new(), failure: Vec::new() };
        assert!(!Command::Txn(txn).is_single_key());
    }

    #[test]
    fn key_range_contains() {
        assert!(KeyRange::single("a").contains(b"a"));
        assert!(!KeyRange::single("a").contains(b"ab"));
        let p = KeyRange::prefix("ab");
        assert!(p.contains(b"ab") && p.contains(b"ab\xff\xff") && !p.contains(b"ac") && !p.contains(b"aa"));
        let all = KeyRange::prefix(vec![0xff]);
        assert!(all.contains(&[0xff, 0x00]) && !all.contains(&[0xfe]));
    }

    #[test]
    fn compares_on_absent_keys() {
        let c = |target| Compare { key: b"k".to_vec(), op: CompareOp::Equal, target };
        assert!(c(CompareTarget::Version(0)).holds(None));
        assert!(c(CompareTarget::CreateRevision(0)).holds(None));
        assert!(!c(CompareTarget::Value(Vec::new())).holds(None));
        let not_equal = Compare { op: CompareOp::NotEqual, ..c(CompareTarget::Value(b"x".to_vec())) };
        assert!(!not_equal.holds(None), "a value compare on an absent key is false whatever the op");
    }

    #[test]
    fn compares_order_values_bytewise() {
        let cur = StoredValue { value: b"b".to_vec(), version: 3, ..Default::default() };
        let c = |op, target| Compare { key: b"k".to_vec(), op, target };
        assert!(c(CompareOp::Greater, CompareTarget::Value(b"a".to_vec())).holds(Some(&cur)));
        assert!(c(CompareOp::Less, CompareTarget::Value(b"c".to_vec())).holds(Some(&cur)));
        assert!(c(CompareOp::Equal, CompareTarget::Version(3)).holds(Some(&cur)));
        assert!(c(CompareOp::NotEqual, CompareTarget::Version(2)).holds(Some(&cur)));
    }
}
