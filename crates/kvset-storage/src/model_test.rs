//! The state machine against a model, on random histories.
//!
//! [`Model`] is a plain reference implementation of the MVCC store's semantics (etcd's): every
//! version of every key ever written, kept in maps; the store revision, the compact revision
//! and the leases. It never forgets anything physically: compaction only moves the line below
//! which reads are refused. What the real store does to save space (physical compaction,
//! snapshots carrying only the reachable history, indexes rebuilt at open) must never show.
//!
//! The property runs random sequences of steps — batches of puts (with and without leases),
//! deletes, range deletes, transactions (every compare target and result, nested, ranges at
//! past revisions), lease grants and revokes, compactions at any revision (legal or not),
//! physical compaction in small chunks interleaved with everything else, snapshot builds
//! installed into a fresh store, and close/reopen — on a real store on disk and on the model,
//! and after every step compares:
//!
//! * every command's result (revisions, `prev_kv`, txn responses, refusals);
//! * every key at every retained revision, and the compacted / future-revision errors just
//!   outside them;
//! * a random range query (limit, sort, keys-only, count-only, revision filters) at a random
//!   retained revision;
//! * the events from every retained revision on (with their previous values), and a bounded
//!   read of them;
//! * HashKV at every retained revision;
//! * the lease table and each lease's keys.
//!
//! Each property runs `PROPTEST_CASES` cases (256 in `cargo test`); the long mode is
//! `PROPTEST_CASES=100000 cargo test -p kvset-storage --lib model` (see the README for how long
//! it takes). A failing case is shrunk by proptest and printed as a list of steps.

use std::collections::BTreeMap;
use std::time::Duration;
use std::time::Instant;

use openraft::storage::RaftStateMachine;
use openraft::RaftSnapshotBuilder;
use proptest::prelude::*;

use crate::history;
use crate::keys::Version;
use crate::types::*;
use crate::Entry;
use crate::EntryPayload;
use crate::EventLogLimits;
use crate::ReadError;
use crate::SnapshotFile;
use crate::Store;
use crate::StoreOptions;

/// The keys the steps use: a prefix of another, keys with `0x00` and `0xff` bytes.
const KEYS: [&[u8]; 7] = [b"a", b"ab", b"abc", b"b", b"b\x00", b"c", b"\xff"];
/// The lease ids the steps use.
const LEASES: [LeaseId; 3] = [1, 2, 3];

// ---------------------------------------------------------------------------------------------
// The model

/// One version of a key: `None` is a tombstone.
#[derive(Debug, Clone)]
struct ModelVersion {
    revision: Revision,
    sub: u32,
    kv: Option<KeyValue>,
}

/// See the module docs.
#[derive(Debug, Clone)]
struct Model {
    revision: Revision,
    compact: Revision,
    /// Every version of every key, oldest first.
    keys: BTreeMap<Vec<u8>, Vec<ModelVersion>>,
    /// Granted leases and their TTLs.
    leases: BTreeMap<LeaseId, i64>,
}

/// The writes of one command in progress: its revision and the sub-revisions used.
struct ModelWriter {
    revision: Revision,
    sub: u32,
}

impl Model {
    fn new() -> Self {
        Self { revision: 1, compact: crate::NEVER_COMPACTED, keys: BTreeMap::new(), leases: BTreeMap::new() }
    }

    /// The key as it is now.
    fn current(&self, key: &[u8]) -> Option<KeyValue> {
        self.keys.get(key).and_then(|v| v.last()).and_then(|v| v.kv.clone())
    }

    /// The key as it was at `revision`.
    fn at(&self, key: &[u8], revision: Revision) -> Option<KeyValue> {
        self.keys.get(key)?.iter().rev().find(|v| v.revision <= revision).and_then(|v| v.kv.clone())
    }

    /// Every key of `range` at `revision`, in key order.
    fn range_at(&self, range: &KeyRange, revision: Revision) -> Vec<KeyValue> {
        self.keys.keys().filter(|k| range.contains(k)).filter_map(|k| self.at(k, revision)).collect()
    }

    /// The current keys attached to lease `id`, in key order.
    fn lease_keys(&self, id: LeaseId) -> Vec<Vec<u8>> {
        self.keys.keys().filter(|k| self.current(k).is_some_and(|kv| kv.lease == id)).cloned().collect()
    }

    /// etcd's range: count before filters and limit; a sort or a revision filter gathers,
    /// filters, sorts (by the target; ties in key order) and cuts to the limit; otherwise keys
    /// are taken in order up to the limit and the byte budget (at least one).
    fn query(&self, q: &RangeQuery, revision: Revision) -> RangeResult {
        let all = self.range_at(&q.range, revision);
        let mut out = RangeResult { count: all.len() as i64, ..Default::default() };
        if q.count_only {
            return out;
        }
        let strip = |mut kv: KeyValue| {
            if q.keys_only {
                kv.value.clear();
            }
            kv
        };
        let sorted = q.sort.is_some_and(|s| s != (SortTarget::Key, SortOrder::Ascend));
        if sorted || q.has_revision_filters() {
            let mut kvs: Vec<KeyValue> = all.into_iter().filter(|kv| q.keeps(kv)).collect();
            if let Some((target, order)) = q.sort {
                let field = |kv: &KeyValue| match target {
                    SortTarget::Key => 0,
                    SortTarget::Version => kv.version,
                    SortTarget::Create => kv.create_revision,
                    SortTarget::Mod => kv.mod_revision,
                    SortTarget::Value => 0,
                };
                let by_target = |a: &KeyValue, b: &KeyValue| match target {
                    SortTarget::Key => a.key.cmp(&b.key),
                    SortTarget::Value => a.value.cmp(&b.value),
                    _ => field(a).cmp(&field(b)),
                };
                // Ties stay in key order in both directions (etcd: a stable sort, reversed
                // comparison).
                if order == SortOrder::AscendFirstPage && q.limit > 0 && !q.has_revision_filters() {
                    kvs.truncate(q.limit + 1);
                }
                kvs.sort_by(|a, b| match order {
                    SortOrder::Ascend | SortOrder::AscendFirstPage => by_target(a, b),
                    SortOrder::Descend => by_target(b, a),
                });
            }
            if q.limit > 0 && kvs.len() > q.limit {
                kvs.truncate(q.limit);
                out.more = true;
            }
            out.kvs = kvs.into_iter().map(strip).collect();
            return out;
        }
        let mut bytes = 0;
        for kv in all {
            let size = kv.key.len() + if q.keys_only { 0 } else { kv.value.len() };
            let under_limit = q.limit == 0 || out.kvs.len() < q.limit;
            if out.kvs.is_empty() || (under_limit && bytes + size <= q.max_bytes) {
                bytes += size;
                out.kvs.push(strip(kv));
            } else {
                out.more = true;
                out.next_key = Some(kv.key);
                break;
            }
        }
        out
    }

    /// The events of every revision from `from` on. An event's previous value is the key at
    /// the revision before, when that revision is not compacted (etcd reads it at
    /// `mod_revision - 1`).
    fn events_from(&self, from: Revision) -> Vec<RevisionEvents> {
        let mut by_revision: BTreeMap<Revision, Vec<(u32, Event)>> = BTreeMap::new();
        for (key, versions) in &self.keys {
            for v in versions {
                if v.revision < from {
                    continue;
                }
                let prev = if v.revision > self.compact { self.at(key, v.revision - 1) } else { None };
                let event = match &v.kv {
                    Some(kv) => Event { kind: EventKind::Put, kv: kv.clone(), prev },
                    None => Event {
                        kind: EventKind::Delete,
                        kv: KeyValue { key: key.clone(), mod_revision: v.revision, ..Default::default() },
                        prev,
                    },
                };
                by_revision.entry(v.revision).or_default().push((v.sub, event));
            }
        }
        by_revision
            .into_iter()
            .map(|(revision, mut events)| {
                events.sort_by_key(|(sub, _)| *sub);
                RevisionEvents { revision, events: events.into_iter().map(|(_, e)| e).collect() }
            })
            .collect()
    }

    /// HashKV at `revision`, by its definition: every version above the compact revision, and
    /// of older ones each key's version visible at the compact revision when it is not a
    /// deletion; hashed in key, then revision order.
    fn hash_kv(&self, revision: Revision) -> u32 {
        let mut hasher = history::KvHasher::default();
        for (key, versions) in &self.keys {
            let visible_at_compact = versions.iter().rposition(|v| v.revision <= self.compact);
            for (i, v) in versions.iter().enumerate() {
                if v.revision > revision {
                    break;
                }
                let kept = v.revision > self.compact || (Some(i) == visible_at_compact && v.kv.is_some());
                if kept {
                    let version = match &v.kv {
                        Some(kv) => Version {
                            value: kv.value.clone(),
                            create_revision: kv.create_revision,
                            version: kv.version,
                            lease: kv.lease,
                            deleted: false,
                        },
                        None => Version { deleted: true, ..Default::default() },
                    };
                    hasher.add(key, v.revision, v.sub, &version);
                }
            }
        }
        hasher.finish()
    }

    fn write(&mut self, w: &mut ModelWriter, key: &[u8], kv: Option<KeyValue>) {
        let sub = w.sub;
        w.sub += 1;
        self.keys.entry(key.to_vec()).or_default().push(ModelVersion { revision: w.revision, sub, kv });
    }

    fn put(&mut self, w: &mut ModelWriter, put: &Put) -> Option<KeyValue> {
        let prev = self.current(&put.key);
        let kv = KeyValue {
            key: put.key.clone(),
            value: match (&prev, put.ignore_value) {
                (Some(p), true) => p.value.clone(),
                _ => put.value.clone(),
            },
            create_revision: prev.as_ref().map_or(w.revision, |p| p.create_revision),
            mod_revision: w.revision,
            version: prev.as_ref().map_or(1, |p| p.version + 1),
            lease: match (&prev, put.ignore_lease) {
                (Some(p), true) => p.lease,
                _ => put.lease,
            },
        };
        self.write(w, &put.key, Some(kv));
        prev
    }

    fn delete(&mut self, w: &mut ModelWriter, range: &KeyRange) -> Vec<KeyValue> {
        let doomed = self.range_at(range, Revision::MAX);
        for kv in &doomed {
            self.write(w, &kv.key, None);
        }
        doomed
    }

    /// etcd checks a put on its own lease first, a put in a transaction key first.
    fn check_put(&self, put: &Put, in_txn: bool) -> Result<(), ApplyError> {
        let lease = || {
            if put.lease != 0 && !self.leases.contains_key(&put.lease) {
                return Err(ApplyError::LeaseNotFound(put.lease));
            }
            Ok(())
        };
        let key = || {
            if (put.ignore_value || put.ignore_lease) && self.current(&put.key).is_none() {
                return Err(ApplyError::KeyNotFound);
            }
            Ok(())
        };
        if in_txn {
            key().and_then(|()| lease())
        } else {
            lease().and_then(|()| key())
        }
    }

    fn compare_holds(&self, c: &Compare) -> bool {
        let found = self.range_at(&c.range, Revision::MAX);
        if found.is_empty() {
            return c.holds(None);
        }
        found.iter().all(|kv| c.holds(Some(kv)))
    }

    /// etcd's `compareToPath`: every branch taken, depth first, on the state before the txn.
    fn path(&self, txn: &Txn, path: &mut Vec<bool>) {
        let holds = txn.compares.iter().all(|c| self.compare_holds(c));
        path.push(holds);
        for op in if holds { &txn.success } else { &txn.failure } {
            if let TxnOp::Txn(nested) = op {
                self.path(nested, path);
            }
        }
    }

    /// etcd's `checkRequests`, once for the puts of the path, once for its ranges; and a put
    /// keeping the value or lease of a key the transaction deleted before is refused.
    fn check_txn(
        &self,
        txn: &Txn,
        puts: bool,
        path: &mut impl Iterator<Item = bool>,
        deleted: &mut Vec<KeyRange>,
    ) -> Result<(), ApplyError> {
        let holds = path.next().unwrap_or(false);
        for op in if holds { &txn.success } else { &txn.failure } {
            match op {
                TxnOp::Put(put) if puts => {
                    self.check_put(put, true)?;
                    if (put.ignore_value || put.ignore_lease) && deleted.iter().any(|r| r.contains(&put.key))
                    {
                        return Err(ApplyError::KeyNotFound);
                    }
                }
                TxnOp::Range(q) if !puts && q.revision > self.revision => {
                    return Err(ApplyError::FutureRevision { requested: q.revision, current: self.revision })
                }
                TxnOp::Range(q) if !puts && q.revision != 0 && q.revision < self.compact => {
                    return Err(ApplyError::Compacted {
                        requested: q.revision,
                        compact_revision: self.compact,
                    })
                }
                TxnOp::Delete(d) => deleted.push(d.range.clone()),
                TxnOp::Txn(nested) => self.check_txn(nested, puts, path, deleted)?,
                TxnOp::Put(_) | TxnOp::Range(_) => {}
            }
        }
        Ok(())
    }

    fn run_txn(
        &mut self,
        w: &mut ModelWriter,
        txn: &Txn,
        path: &mut impl Iterator<Item = bool>,
    ) -> (bool, Vec<OpResult>) {
        let holds = path.next().unwrap_or(false);
        let mut responses = Vec::new();
        for op in if holds { &txn.success } else { &txn.failure } {
            responses.push(match op {
                // A range sees the txn's own earlier writes; one at an explicit revision reads
                // that revision (at most the revision before the txn).
                TxnOp::Range(q) => {
                    let at = if q.revision == 0 { Revision::MAX } else { q.revision };
                    OpResult::Range(self.query(q, at))
                }
                TxnOp::Put(put) => OpResult::Put { prev: self.put(w, put).filter(|_| put.prev_kv) },
                TxnOp::Delete(d) => {
                    let prev = self.delete(w, &d.range);
                    OpResult::Delete {
                        deleted: prev.len() as i64,
                        prev: if d.prev_kv { prev } else { vec![] },
                    }
                }
                TxnOp::Txn(nested) => {
                    let (succeeded, responses) = self.run_txn(w, nested, path);
                    OpResult::Txn { succeeded, responses }
                }
            });
        }
        (holds, responses)
    }

    /// Applies a command the way etcd does; returns what the state machine must return.
    fn apply(&mut self, command: &Command) -> CommandResult {
        let mut w = ModelWriter { revision: self.revision + 1, sub: 0 };
        let rejected = |revision, error| CommandResult::Rejected { revision, error };
        let result = match command {
            Command::Put(put) => {
                if let Err(e) = self.check_put(put, false) {
                    return rejected(self.revision, e);
                }
                let prev = self.put(&mut w, put);
                CommandResult::Put { revision: w.revision, prev: prev.filter(|_| put.prev_kv) }
            }
            Command::Delete(d) => {
                let prev = self.delete(&mut w, &d.range);
                let revision = if prev.is_empty() { self.revision } else { w.revision };
                CommandResult::Delete {
                    revision,
                    deleted: prev.len() as i64,
                    prev: if d.prev_kv { prev } else { vec![] },
                }
            }
            Command::Txn(txn) => {
                let mut path = Vec::new();
                self.path(txn, &mut path);
                for puts in [true, false] {
                    if let Err(e) = self.check_txn(txn, puts, &mut path.iter().copied(), &mut Vec::new()) {
                        return rejected(self.revision, e);
                    }
                }
                let (succeeded, responses) = self.run_txn(&mut w, txn, &mut path.iter().copied());
                let revision = if w.sub > 0 { w.revision } else { self.revision };
                CommandResult::Txn { revision, succeeded, responses }
            }
            Command::Compact(at) => {
                if *at <= self.compact {
                    return rejected(
                        self.revision,
                        ApplyError::Compacted { requested: *at, compact_revision: self.compact },
                    );
                }
                if *at > self.revision {
                    return rejected(
                        self.revision,
                        ApplyError::FutureRevision { requested: *at, current: self.revision },
                    );
                }
                self.compact = *at;
                CommandResult::Compact { revision: self.revision }
            }
            Command::LeaseGrant { id, ttl } => {
                if self.leases.contains_key(id) {
                    return rejected(self.revision, ApplyError::LeaseExists(*id));
                }
                self.leases.insert(*id, *ttl);
                CommandResult::LeaseGrant { revision: self.revision, id: *id, ttl: *ttl }
            }
            Command::LeaseRevoke(id) => {
                if !self.leases.contains_key(id) {
                    return rejected(self.revision, ApplyError::LeaseNotFound(*id));
                }
                let mut deleted = 0;
                for key in self.lease_keys(*id) {
                    deleted += self.delete(&mut w, &KeyRange::single(key)).len() as i64;
                }
                self.leases.remove(id);
                let revision = if deleted > 0 { w.revision } else { self.revision };
                CommandResult::LeaseRevoke { revision, deleted }
            }
            Command::SetReplicas(_) | Command::Auth(_) | Command::AsUser { .. } => {
                unreachable!("not generated")
            }
        };
        self.revision = result.revision();
        result
    }
}

// ---------------------------------------------------------------------------------------------
// The steps

/// A key range, by indexes into [`KEYS`].
#[derive(Debug, Clone)]
enum RangeSpec {
    Single(usize),
    Prefix(usize),
    Between(usize, usize),
    From(usize),
    All,
}

impl RangeSpec {
    fn build(&self) -> KeyRange {
        match self {
            RangeSpec::Single(k) => KeyRange::single(KEYS[*k]),
            RangeSpec::Prefix(k) => KeyRange::prefix(KEYS[*k]),
            RangeSpec::Between(a, b) => KeyRange::between(KEYS[*a], KEYS[*b]),
            RangeSpec::From(k) => KeyRange { start: KEYS[*k].to_vec(), end: RangeEnd::Unbounded },
            RangeSpec::All => KeyRange::all(),
        }
    }
}

/// A revision chosen relative to the state it is used in: `at` picks a point between the
/// compact revision and the current one; `shift` moves it outside (−1: just below the compact
/// revision, +1: a future one).
#[derive(Debug, Clone, Copy)]
struct RevSpec {
    at: u8,
    shift: i8,
}

impl RevSpec {
    fn resolve(self, model: &Model) -> Revision {
        let lo = model.compact.max(1);
        let span = model.revision - lo;
        let base = lo + (span * self.at as i64) / 255;
        match self.shift {
            s if s < 0 => lo - 1,
            s if s > 0 => model.revision + 1,
            _ => base,
        }
    }
}

#[derive(Debug, Clone)]
struct QuerySpec {
    range: RangeSpec,
    revision: Option<RevSpec>,
    limit: usize,
    keys_only: bool,
    count_only: bool,
    sort: Option<(SortTarget, SortOrder)>,
    min_mod: Option<RevSpec>,
    max_create: Option<RevSpec>,
    small_pages: bool,
}

impl QuerySpec {
    fn build(&self, model: &Model) -> RangeQuery {
        RangeQuery {
            revision: self.revision.map_or(0, |r| r.resolve(model)),
            limit: self.limit,
            max_bytes: if self.small_pages { 5 } else { usize::MAX },
            keys_only: self.keys_only,
            count_only: self.count_only,
            sort: self.sort,
            min_mod_revision: self.min_mod.map_or(0, |r| r.resolve(model)),
            max_create_revision: self.max_create.map_or(0, |r| r.resolve(model)),
            ..RangeQuery::new(self.range.build())
        }
    }
}

#[derive(Debug, Clone)]
enum CompareSpec {
    Value(Vec<u8>),
    Version(i64),
    Create(RevSpec),
    Mod(RevSpec),
    Lease(usize),
}

#[derive(Debug, Clone)]
struct TxnSpec {
    compares: Vec<(RangeSpec, CompareOp, CompareSpec)>,
    success: Vec<OpSpec>,
    failure: Vec<OpSpec>,
}

#[derive(Debug, Clone)]
enum OpSpec {
    Put(PutSpec),
    Delete(RangeSpec, bool),
    Range(QuerySpec),
    Txn(TxnSpec),
}

#[derive(Debug, Clone)]
struct PutSpec {
    key: usize,
    value: u8,
    lease: Option<usize>,
    prev_kv: bool,
    ignore_value: bool,
    ignore_lease: bool,
}

#[derive(Debug, Clone)]
enum CommandSpec {
    Put(PutSpec),
    Delete(RangeSpec, bool),
    Txn(TxnSpec),
    Grant(usize, i64),
    Revoke(usize),
    Compact(RevSpec),
}

/// One step of a history.
#[derive(Debug, Clone)]
enum Step {
    /// One apply call: entries of commands.
    Apply(Vec<Vec<CommandSpec>>),
    /// Runs up to this many chunks of physical compaction, of this many changes each.
    PhysicalCompaction { chunks: u8, chunk: u8 },
    /// Builds a snapshot and continues on a fresh store it was installed into.
    SnapshotInstall,
    /// Closes the store and opens it again.
    Reopen,
    /// A range query at a revision, compared with the model's answer.
    Query(QuerySpec),
}

fn build_put(p: &PutSpec) -> Put {
    Put {
        key: KEYS[p.key].to_vec(),
        value: if p.ignore_value { Vec::new() } else { vec![b'v', p.value] },
        lease: if p.ignore_lease { 0 } else { p.lease.map_or(0, |l| LEASES[l]) },
        prev_kv: p.prev_kv,
        ignore_value: p.ignore_value,
        ignore_lease: p.ignore_lease,
    }
}

fn build_txn(t: &TxnSpec, model: &Model) -> Txn {
    let op = |o: &OpSpec| match o {
        OpSpec::Put(p) => TxnOp::Put(build_put(p)),
        OpSpec::Delete(r, prev_kv) => TxnOp::Delete(Delete { range: r.build(), prev_kv: *prev_kv }),
        OpSpec::Range(q) => TxnOp::Range(q.build(model)),
        OpSpec::Txn(nested) => TxnOp::Txn(build_txn(nested, model)),
    };
    Txn {
        compares: t
            .compares
            .iter()
            .map(|(range, op, target)| Compare {
                range: range.build(),
                op: *op,
                target: match target {
                    CompareSpec::Value(v) => CompareTarget::Value(v.clone()),
                    CompareSpec::Version(v) => CompareTarget::Version(*v),
                    CompareSpec::Create(r) => CompareTarget::CreateRevision(r.resolve(model)),
                    CompareSpec::Mod(r) => CompareTarget::ModRevision(r.resolve(model)),
                    CompareSpec::Lease(l) => CompareTarget::Lease(LEASES[*l]),
                },
            })
            .collect(),
        success: t.success.iter().map(op).collect(),
        failure: t.failure.iter().map(op).collect(),
    }
}

fn build_command(c: &CommandSpec, model: &Model) -> Command {
    match c {
        CommandSpec::Put(p) => Command::Put(build_put(p)),
        CommandSpec::Delete(r, prev_kv) => Command::Delete(Delete { range: r.build(), prev_kv: *prev_kv }),
        CommandSpec::Txn(t) => Command::Txn(build_txn(t, model)),
        CommandSpec::Grant(l, ttl) => Command::LeaseGrant { id: LEASES[*l], ttl: *ttl },
        CommandSpec::Revoke(l) => Command::LeaseRevoke(LEASES[*l]),
        CommandSpec::Compact(r) => Command::Compact(r.resolve(model)),
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies

fn key() -> impl Strategy<Value = usize> {
    0..KEYS.len()
}

fn range_spec() -> impl Strategy<Value = RangeSpec> {
    prop_oneof![
        4 => key().prop_map(RangeSpec::Single),
        2 => key().prop_map(RangeSpec::Prefix),
        1 => (key(), key()).prop_map(|(a, b)| RangeSpec::Between(a, b)),
        1 => key().prop_map(RangeSpec::From),
        1 => Just(RangeSpec::All),
    ]
}

fn rev_spec() -> impl Strategy<Value = RevSpec> {
    (any::<u8>(), prop_oneof![8 => Just(0i8), 1 => Just(-1i8), 1 => Just(1i8)])
        .prop_map(|(at, shift)| RevSpec { at, shift })
}

fn in_range_rev() -> impl Strategy<Value = RevSpec> {
    any::<u8>().prop_map(|at| RevSpec { at, shift: 0 })
}

fn put_spec() -> impl Strategy<Value = PutSpec> {
    (key(), 0u8..4, prop::option::weighted(0.3, 0..LEASES.len()), any::<bool>(), 0u8..10).prop_map(
        |(key, value, lease, prev_kv, ignore)| PutSpec {
            key,
            value,
            lease,
            prev_kv,
            ignore_value: ignore == 0 || ignore == 2,
            ignore_lease: ignore == 1 || ignore == 2,
        },
    )
}

fn query_spec() -> impl Strategy<Value = QuerySpec> {
    let sort = prop::option::weighted(
        0.3,
        (
            prop_oneof![
                Just(SortTarget::Key),
                Just(SortTarget::Version),
                Just(SortTarget::Create),
                Just(SortTarget::Mod),
                Just(SortTarget::Value)
            ],
            prop_oneof![Just(SortOrder::Ascend), Just(SortOrder::Descend), Just(SortOrder::AscendFirstPage)],
        ),
    );
    (
        range_spec(),
        prop::option::weighted(0.5, rev_spec()),
        prop_oneof![3 => Just(0usize), 2 => 1usize..4],
        (any::<bool>(), prop::bool::weighted(0.15)),
        sort,
        (prop::option::weighted(0.15, in_range_rev()), prop::option::weighted(0.15, in_range_rev())),
        prop::bool::weighted(0.15),
    )
        .prop_map(
            |(range, revision, limit, (keys_only, count_only), sort, (min_mod, max_create), small_pages)| {
                QuerySpec {
                    range,
                    revision,
                    limit,
                    keys_only,
                    count_only,
                    sort,
                    min_mod,
                    max_create,
                    small_pages,
                }
            },
        )
}

fn compare_op() -> impl Strategy<Value = CompareOp> {
    prop_oneof![
        Just(CompareOp::Equal),
        Just(CompareOp::NotEqual),
        Just(CompareOp::Greater),
        Just(CompareOp::Less)
    ]
}

fn compare_spec() -> impl Strategy<Value = CompareSpec> {
    prop_oneof![
        (0u8..4).prop_map(|v| CompareSpec::Value(vec![b'v', v])),
        (0i64..4).prop_map(CompareSpec::Version),
        in_range_rev().prop_map(CompareSpec::Create),
        in_range_rev().prop_map(CompareSpec::Mod),
        (0..LEASES.len()).prop_map(CompareSpec::Lease),
    ]
}

fn op_spec(depth: u32) -> BoxedStrategy<OpSpec> {
    let leaf = prop_oneof![
        3 => put_spec().prop_map(OpSpec::Put),
        2 => (range_spec(), any::<bool>()).prop_map(|(r, p)| OpSpec::Delete(r, p)),
        2 => query_spec().prop_map(OpSpec::Range),
    ];
    if depth == 0 {
        return leaf.boxed();
    }
    prop_oneof![4 => leaf, 1 => txn_spec(depth - 1).prop_map(OpSpec::Txn)].boxed()
}

fn txn_spec(depth: u32) -> BoxedStrategy<TxnSpec> {
    (
        prop::collection::vec((range_spec(), compare_op(), compare_spec()), 0..3),
        prop::collection::vec(op_spec(depth), 0..4),
        prop::collection::vec(op_spec(depth), 0..3),
    )
        .prop_map(|(compares, success, failure)| TxnSpec { compares, success, failure })
        .boxed()
}

fn command_spec() -> impl Strategy<Value = CommandSpec> {
    prop_oneof![
        8 => put_spec().prop_map(CommandSpec::Put),
        3 => (range_spec(), any::<bool>()).prop_map(|(r, p)| CommandSpec::Delete(r, p)),
        3 => txn_spec(2).prop_map(CommandSpec::Txn),
        2 => (0..LEASES.len(), 1i64..100).prop_map(|(l, ttl)| CommandSpec::Grant(l, ttl)),
        1 => (0..LEASES.len()).prop_map(CommandSpec::Revoke),
        2 => rev_spec().prop_map(CommandSpec::Compact),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        12 => prop::collection::vec(prop::collection::vec(command_spec(), 1..4), 1..3).prop_map(Step::Apply),
        3 => (1u8..4, 1u8..4).prop_map(|(chunks, chunk)| Step::PhysicalCompaction { chunks, chunk }),
        1 => Just(Step::SnapshotInstall),
        1 => Just(Step::Reopen),
        3 => query_spec().prop_map(Step::Query),
    ]
}

// ---------------------------------------------------------------------------------------------
// Running a history

/// The real store under test, on its own directory.
struct Real {
    dir: tempfile::TempDir,
    store: Store,
    next_index: u64,
}

fn options() -> StoreOptions {
    // A ring of three revisions: recent events come from memory, older ones from the history.
    StoreOptions {
        events: EventLogLimits { max_revisions: 3, max_bytes: usize::MAX },
        manual_compaction: true,
        ..StoreOptions::default()
    }
}

impl Real {
    fn open() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open_dir(dir.path(), options()).expect("open");
        Self { dir, store, next_index: 1 }
    }

    async fn apply(&mut self, entries: Vec<Vec<Command>>) -> Vec<CommandResult> {
        let entries: Vec<Entry> = entries
            .into_iter()
            .map(|commands| {
                let index = self.next_index;
                self.next_index += 1;
                Entry {
                    log_id: crate::log_id(1, 0, index),
                    payload: EntryPayload::Normal(Batch { commands }),
                }
            })
            .collect();
        let results = self.store.state_machine.apply_entries(entries).await.expect("apply");
        results.into_iter().flat_map(|r| r.results).collect()
    }

    async fn snapshot_install(&mut self) {
        let snapshot =
            self.store.state_machine.get_snapshot_builder().await.build_snapshot().await.expect("build");
        let fresh = Real::open();
        let mut sm = fresh.store.state_machine;
        let mut recv = SnapshotFile::create_receiving(sm.snapshot_dir()).await.expect("receive");
        let path = self.store.reader.current_snapshot().expect("current snapshot").1;
        tokio::io::copy(&mut tokio::fs::File::open(&path).await.expect("open snapshot"), &mut recv)
            .await
            .expect("copy");
        sm.install_snapshot(&snapshot.meta, recv).await.expect("install");
        let Store { log, reader, db, .. } = fresh.store;
        *self = Real {
            dir: fresh.dir,
            store: Store { log, state_machine: sm, reader, db },
            next_index: self.next_index,
        };
    }

    fn reopen(&mut self) {
        self.store.reader.close().expect("close");
        let placeholder = tempfile::tempdir().expect("tempdir");
        let dir = std::mem::replace(&mut self.dir, placeholder);
        let old =
            std::mem::replace(&mut self.store, Store::open_dir(self.dir.path(), options()).expect("open"));
        drop(old);
        // In one process, sled's own threads can hold the closed database's lock a moment
        // longer (a real restart is a new process).
        let deadline = Instant::now() + Duration::from_secs(10);
        self.store = loop {
            match Store::open_dir(dir.path(), options()) {
                Ok(store) => break store,
                Err(e) if e.to_string().contains("could not acquire lock") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("reopen: {e}"),
            }
        };
        self.dir = dir;
    }
}

/// Compares everything the module docs list; returns the first difference.
fn compare(real: &Real, model: &Model) -> Result<(), String> {
    let reader = &real.store.reader;
    let applied = reader.applied();
    check_eq("revision", applied.revision, model.revision)?;
    check_eq("compact revision", applied.compact_revision, model.compact)?;
    let lo = model.compact.max(1);
    for revision in lo..=model.revision {
        let q = RangeQuery { revision, ..RangeQuery::new(KeyRange::all()) };
        let (got, current) = reader.range(&q).map_err(|e| format!("range at {revision}: {e}"))?;
        check_eq("current revision of a range", current, model.revision)?;
        check_eq(
            &format!("every key at revision {revision}"),
            got.kvs,
            model.range_at(&KeyRange::all(), revision),
        )?;
        for key in KEYS {
            let (kv, _) = reader.get(key, revision).map_err(|e| format!("get at {revision}: {e}"))?;
            check_eq(&format!("{key:?} at revision {revision}"), kv, model.at(key, revision))?;
        }
        let (hash, compact, hashed) =
            reader.hash_kv(revision).map_err(|e| format!("hash_kv({revision}): {e}"))?;
        check_eq(
            &format!("HashKV at {revision}"),
            (hash, compact, hashed),
            (model.hash_kv(revision), model.compact, revision),
        )?;
    }
    let (current, _) = reader.get(b"a", 0).map_err(|e| e.to_string())?;
    check_eq("a now", current, model.current(b"a"))?;
    if model.compact > 1 {
        let below = model.compact - 1;
        match reader.get(b"a", below) {
            Err(ReadError::Compacted { requested, compact_revision })
                if requested == below && compact_revision == model.compact => {}
            other => return Err(format!("get at {below} below compact {}: {other:?}", model.compact)),
        }
        match reader.events(below, model.revision, 100) {
            Err(ReadError::Compacted { .. }) => {}
            other => return Err(format!("events from {below} below compact {}: {other:?}", model.compact)),
        }
        match reader.hash_kv(below) {
            Err(ReadError::Compacted { .. }) => {}
            other => return Err(format!("hash_kv at {below}: {other:?}")),
        }
    }
    let future = model.revision + 1;
    match reader.range(&RangeQuery { revision: future, ..RangeQuery::new(KeyRange::all()) }) {
        Err(ReadError::FutureRevision { requested, current })
            if requested == future && current == model.revision => {}
        other => return Err(format!("range at the future revision {future}: {other:?}")),
    }
    // Events from every retained revision (and from after the last one: nothing).
    for from in lo..=model.revision + 1 {
        let got: Vec<RevisionEvents> = reader
            .events(from, model.revision, usize::MAX)
            .map_err(|e| format!("events from {from}: {e}"))?
            .iter()
            .map(|r| (**r).clone())
            .collect();
        check_eq(&format!("events from revision {from}"), got, model.events_from(from))?;
    }
    let bounded = reader.events(lo, model.revision, 2).map_err(|e| e.to_string())?;
    let all = model.events_from(lo);
    let n = bounded.len();
    if n > all.len() || bounded.iter().map(|r| (**r).clone()).ne(all.iter().take(n).cloned()) {
        return Err(format!("a bounded read of the events is not a prefix: {bounded:?}"));
    }
    // Whole revisions, at least one, and no revision started once the bound was reached.
    let before_last: usize = bounded.iter().take(n.saturating_sub(1)).map(|r| r.events.len()).sum();
    if !all.is_empty() && (n == 0 || before_last >= 2) {
        return Err(format!("a bounded read of the events broke its bound: {bounded:?}"));
    }
    // Leases and their keys.
    let leases: BTreeMap<LeaseId, i64> = reader.leases().values().map(|l| (l.id, l.ttl)).collect();
    check_eq("leases", leases, model.leases.clone())?;
    for id in LEASES {
        let got = reader.lease(id).map_err(|e| e.to_string())?.map(|(l, keys)| ((l.id, l.ttl), keys));
        let want = model.leases.get(&id).map(|ttl| ((id, *ttl), model.lease_keys(id)));
        check_eq(&format!("lease {id}"), got, want)?;
    }
    Ok(())
}

fn check_eq<T: PartialEq + std::fmt::Debug>(what: &str, got: T, want: T) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}:\n  store: {got:?}\n  model: {want:?}"))
    }
}

/// Runs `steps` on a fresh store and the model; fails at the first difference.
async fn run(steps: &[Step]) -> Result<(), String> {
    let mut real = Real::open();
    let mut model = Model::new();
    for (i, step) in steps.iter().enumerate() {
        let at = |e: String| format!("after step {i} ({step:?}):\n{e}");
        match step {
            Step::Apply(entries) => {
                // Commands are resolved against the state they apply to, one by one.
                let mut built = Vec::new();
                let mut want = Vec::new();
                for entry in entries {
                    let mut commands = Vec::new();
                    for spec in entry {
                        let command = build_command(spec, &model);
                        want.push(model.apply(&command));
                        commands.push(command);
                    }
                    built.push(commands);
                }
                let got = real.apply(built).await;
                check_eq("results", got, want).map_err(at)?;
            }
            Step::PhysicalCompaction { chunks, chunk } => {
                for _ in 0..*chunks {
                    real.store.reader.compact_chunk_now(*chunk as usize).map_err(|e| at(e.to_string()))?;
                }
            }
            Step::SnapshotInstall => real.snapshot_install().await,
            Step::Reopen => real.reopen(),
            Step::Query(spec) => {
                let q = spec.build(&model);
                let revision = if q.revision == 0 { model.revision } else { q.revision };
                let got = real.store.reader.range(&q).map(|(r, _)| r);
                if revision > model.revision {
                    if !matches!(got, Err(ReadError::FutureRevision { .. })) {
                        return Err(at(format!("a future read answered {got:?}")));
                    }
                } else if revision < model.compact {
                    if !matches!(got, Err(ReadError::Compacted { .. })) {
                        return Err(at(format!("a compacted read answered {got:?}")));
                    }
                } else {
                    let got = got.map_err(|e| at(e.to_string()))?;
                    check_eq(&format!("{q:?}"), got, model.query(&q, revision)).map_err(at)?;
                }
            }
        }
        compare(&real, &model).map_err(at)?;
    }
    // Finally, whatever physical compaction still has to do changes nothing visible.
    while real.store.reader.compact_chunk_now(1000).map_err(|e| e.to_string())? {}
    compare(&real, &model).map_err(|e| format!("after the last physical compaction:\n{e}"))
}

proptest! {
    #![proptest_config(ProptestConfig { max_shrink_iters: 2000, ..ProptestConfig::default() })]

    #[test]
    fn the_state_machine_behaves_like_the_model(steps in prop::collection::vec(step(), 1..40)) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        let started = Instant::now();
        let outcome = runtime.block_on(run(&steps));
        prop_assert!(started.elapsed() < Duration::from_secs(60), "one case took {:?}", started.elapsed());
        if let Err(e) = outcome {
            return Err(TestCaseError::fail(e));
        }
    }
}
