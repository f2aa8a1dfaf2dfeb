//! Evaluation of commands against the state machine tree, through an in-memory overlay.
//!
//! Applying a batch of log entries must be atomic together with `last_applied`, so nothing is
//! written to sled while commands are evaluated: every change goes into an [`Overlay`] (the
//! pending current records, revision records, events and lease changes over the slot), later
//! commands read through it, and the state machine turns it into one `sled::Batch` (one record
//! per changed key, the leases, the applied state) and index changes at the end. See
//! [`crate::keys`] for the layout.
//!
//! Revisions follow etcd: a command that changes keys gets the next revision; every key it
//! changes gets a sub-revision there, in order; a delete writes a tombstone version. A Txn
//! chooses its branches (nested ones included) on the state before it, checks that branch's
//! puts and ranges, and only then runs it; its ranges see its own earlier writes.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::ops::Bound;

use crate::codec::CodecError;
use crate::history::RangeCollector;
use crate::history::Slot;
use crate::index::Rev;
use crate::keys::Version;
use crate::types::*;

/// Error reading the tree while applying or reading.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("state machine read failed: {0}")]
    Sled(#[from] sled::Error),
    #[error("state machine holds an undecodable record: {0}")]
    Codec(#[from] CodecError),
    #[error("state machine is corrupt: {0}")]
    Corrupt(String),
    #[error("required revision {requested} has been compacted (compact revision {compact_revision})")]
    Compacted { requested: Revision, compact_revision: Revision },
    #[error("required revision {requested} is a future revision (current revision {current})")]
    FutureRevision { requested: Revision, current: Revision },
}

/// The replicated scalars a command may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Scalars {
    pub revision: Revision,
    pub compact_revision: Revision,
    pub replicas: Option<u32>,
}

/// Pending changes over a tree.
pub(crate) struct Overlay<'t> {
    slot: &'t Slot,
    /// The revision of the state in `slot` (before this overlay's changes).
    tree_revision: Revision,
    /// The lease table before this overlay's changes.
    leases_before: &'t BTreeMap<LeaseId, Lease>,
    /// Live records to write: `Some` = the key's new record, `None` = the key is deleted.
    pub(crate) live: BTreeMap<Vec<u8>, Option<StoredValue>>,
    /// Records to add, one per change, in revision order.
    pub(crate) records: Vec<(Rev, Vec<u8>, Version)>,
    /// The events of each new revision, in order.
    pub(crate) events: Vec<RevisionEvents>,
    /// Lease changes: `Some` = granted, `None` = revoked.
    pub(crate) leases: BTreeMap<LeaseId, Option<Lease>>,
    /// Lease attachments to add (`true`) or remove (`false`).
    pub(crate) attachments: BTreeMap<(LeaseId, Vec<u8>), bool>,
    /// The access control state as this overlay's commands left it, when one changed it.
    pub(crate) auth: Option<crate::auth::AuthState>,
    auth_before: Option<&'t crate::auth::AuthState>,
}

/// The revision one command writes at.
struct Writer {
    revision: Revision,
    sub: u32,
    events: Vec<Event>,
    /// The keys written at this revision so far, each as it was at the revision before: an
    /// event's previous value is the key at the revision before (etcd's watch reads it at
    /// `mod_revision - 1`), also for a key a transaction changes twice.
    before: BTreeMap<Vec<u8>, Option<KeyValue>>,
}

impl Writer {
    fn new(revision: Revision) -> Self {
        Self { revision, sub: 0, events: Vec::new(), before: BTreeMap::new() }
    }

    /// The previous value for the event of `key`, which is `current` now.
    fn event_prev(&mut self, key: &[u8], current: Option<KeyValue>) -> Option<KeyValue> {
        self.before.entry(key.to_vec()).or_insert(current).clone()
    }

    fn next_sub(&mut self) -> u32 {
        let s = self.sub;
        self.sub += 1;
        s
    }

    fn wrote(&self) -> bool {
        !self.events.is_empty()
    }
}

impl<'t> Overlay<'t> {
    pub(crate) fn new(slot: &'t Slot, tree_revision: Revision, leases: &'t BTreeMap<LeaseId, Lease>) -> Self {
        Self {
            slot,
            tree_revision,
            leases_before: leases,
            live: BTreeMap::new(),
            records: Vec::new(),
            events: Vec::new(),
            leases: BTreeMap::new(),
            attachments: BTreeMap::new(),
            auth: None,
            auth_before: None,
        }
    }

    /// The overlay over access control state `auth` (what `Command::Auth` changes).
    pub(crate) fn with_auth(self, auth: &'t crate::auth::AuthState) -> Self {
        Self { auth_before: Some(auth), ..self }
    }

    /// Reads a user key through the overlay.
    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<StoredValue>, ReadError> {
        if let Some(change) = self.live.get(key) {
            return Ok(change.clone());
        }
        self.slot.current(key)
    }

    fn lease(&self, id: LeaseId) -> Option<Lease> {
        match self.leases.get(&id) {
            Some(change) => *change,
            None => self.leases_before.get(&id).copied(),
        }
    }

    /// The keys attached to lease `id`, in key order.
    fn lease_keys(&self, id: LeaseId) -> Result<Vec<Vec<u8>>, ReadError> {
        let mut out: BTreeSet<Vec<u8>> = self.slot.index().lease_keys(id).into_iter().collect();
        for ((lease, key), present) in self.attachments.range((id, Vec::new())..) {
            if *lease != id {
                break;
            }
            if *present {
                out.insert(key.clone());
            } else {
                out.remove(key);
            }
        }
        Ok(out.into_iter().collect())
    }

    /// Visits the current keys of `range` in order, merging the slot with the overlay, until
    /// `visit` returns `false`.
    pub(crate) fn scan(
        &self,
        range: &KeyRange,
        mut visit: impl FnMut(&[u8], &StoredValue) -> bool,
    ) -> Result<(), ReadError> {
        if let RangeEnd::Before(end) = &range.end {
            if end.as_slice() <= range.start.as_slice() {
                return Ok(()); // an empty range
            }
        }
        let overlay_end = match &range.end {
            RangeEnd::Single => Bound::Included(range.start.clone()),
            RangeEnd::Unbounded => Bound::Unbounded,
            RangeEnd::Before(end) => Bound::Excluded(end.clone()),
        };
        let mut in_slot = Vec::new();
        self.slot.scan_at(range, self.tree_revision, |key, rev| {
            in_slot.push((key, rev));
            Ok(true)
        })?;
        let mut over_iter =
            self.live.range::<Vec<u8>, _>((Bound::Included(range.start.clone()), overlay_end));
        let mut over_cur = over_iter.next();
        let mut slot_iter = in_slot.into_iter();
        let mut slot_cur = slot_iter.next();
        loop {
            let take_slot = match (&slot_cur, over_cur) {
                (None, None) => return Ok(()),
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some((sk, _)), Some((ok, _))) => sk < ok,
            };
            if take_slot {
                if let Some((key, rev)) = slot_cur.take() {
                    let (_, v) = self.slot.fetch(rev)?;
                    let value = StoredValue {
                        value: v.value,
                        create_revision: v.create_revision,
                        mod_revision: rev.main,
                        version: v.version,
                        lease: v.lease,
                    };
                    if !visit(&key, &value) {
                        return Ok(());
                    }
                }
                slot_cur = slot_iter.next();
            } else if let Some((ok, change)) = over_cur.take() {
                // The overlay shadows the slot's version of the same key.
                if slot_cur.as_ref().is_some_and(|(sk, _)| sk == ok) {
                    slot_cur = slot_iter.next();
                }
                if let Some(value) = change {
                    if !visit(ok, value) {
                        return Ok(());
                    }
                }
                over_cur = over_iter.next();
            }
        }
    }

    /// Reads one page of `query` at the current state (its `revision` is ignored).
    pub(crate) fn range_current(&self, query: &RangeQuery) -> Result<RangeResult, ReadError> {
        if self.live.is_empty() {
            return self.slot.range_at(query, self.tree_revision);
        }
        let mut collector = RangeCollector::new(query);
        self.scan(&query.range, |key, value| collector.push(value.to_key_value(key, false)))?;
        Ok(collector.finish())
    }

    /// The current keys (and records) of `range`.
    fn collect(&self, range: &KeyRange) -> Result<Vec<(Vec<u8>, StoredValue)>, ReadError> {
        let mut out = Vec::new();
        self.scan(range, |k, v| {
            out.push((k.to_vec(), v.clone()));
            true
        })?;
        Ok(out)
    }

    /// Reads one page of `query` at its past `revision`: the slot, plus the versions this
    /// overlay made at or below that revision (earlier commands of the batch).
    fn range_at(&self, query: &RangeQuery) -> Result<RangeResult, ReadError> {
        let revision = query.revision;
        if revision <= self.tree_revision {
            return self.slot.range_at(query, revision);
        }
        let mut keys: BTreeMap<Vec<u8>, Option<KeyValue>> = BTreeMap::new();
        self.slot.scan_at(&query.range, self.tree_revision, |key, rev| {
            let (_, v) = self.slot.fetch(rev)?;
            keys.insert(key.clone(), v.into_key_value(key, rev.main));
            Ok(true)
        })?;
        for (rev, key, version) in &self.records {
            if rev.main <= revision && query.range.contains(key) {
                keys.insert(key.clone(), version.to_key_value(key, rev.main, false));
            }
        }
        let mut collector = RangeCollector::new(query);
        for kv in keys.into_values().flatten() {
            collector.push(kv);
        }
        Ok(collector.finish())
    }

    fn attach(&mut self, lease: LeaseId, key: &[u8]) {
        self.attachments.insert((lease, key.to_vec()), true);
    }

    fn detach(&mut self, lease: LeaseId, key: &[u8]) {
        self.attachments.insert((lease, key.to_vec()), false);
    }

    fn commit(&mut self, w: Writer, scalars: &mut Scalars) {
        if w.wrote() {
            scalars.revision = w.revision;
            self.events.push(RevisionEvents { revision: w.revision, events: w.events });
        }
    }
}

/// Applies one command to the overlay, advancing `scalars` when it changes them.
pub(crate) fn apply_command(
    overlay: &mut Overlay<'_>,
    scalars: &mut Scalars,
    command: &Command,
) -> Result<CommandResult, ReadError> {
    let rejected = |scalars: &Scalars, error| CommandResult::Rejected { revision: scalars.revision, error };
    match command {
        Command::AsUser { user, command } => {
            let auth = match (&overlay.auth, overlay.auth_before) {
                (Some(a), _) => Some(a),
                (None, a) => a,
            };
            if let Some(auth) = auth.filter(|a| a.enabled) {
                let lease_keys = match command.inner() {
                    Command::LeaseRevoke(id) => overlay.lease_keys(*id)?,
                    _ => Vec::new(),
                };
                let needs = crate::auth::Needs::of_command(command, |_| lease_keys.clone());
                if !auth.allows(user, &needs) {
                    return Ok(rejected(scalars, ApplyError::Auth(crate::auth::AuthError::PermissionDenied)));
                }
            }
            apply_command(overlay, scalars, command)
        }
        Command::SetReplicas(replicas) => {
            scalars.replicas = Some(*replicas);
            Ok(CommandResult::SetReplicas { revision: scalars.revision, replicas: *replicas })
        }
        Command::Put(put) => {
            if let Err(e) = check_put(overlay, put, false)? {
                return Ok(rejected(scalars, e));
            }
            let mut w = Writer::new(scalars.revision + 1);
            let prev = do_put(overlay, &mut w, put)?;
            overlay.commit(w, scalars);
            Ok(CommandResult::Put { revision: scalars.revision, prev: if put.prev_kv { prev } else { None } })
        }
        Command::Delete(delete) => {
            let mut w = Writer::new(scalars.revision + 1);
            let (deleted, prev) = do_delete(overlay, &mut w, &delete.range, delete.prev_kv)?;
            overlay.commit(w, scalars);
            Ok(CommandResult::Delete { revision: scalars.revision, deleted, prev })
        }
        Command::Txn(txn) => {
            let mut path = Vec::new();
            choose_path(overlay, txn, &mut path)?;
            // As etcd: every put of the path is checked before any range is.
            for pass in [Check::Puts, Check::Ranges] {
                if let Err(e) =
                    check_path(overlay, scalars, txn, pass, &mut path.iter().copied(), &mut Vec::new())?
                {
                    return Ok(rejected(scalars, e));
                }
            }
            let mut w = Writer::new(scalars.revision + 1);
            let (succeeded, responses) = run_txn(overlay, &mut w, txn, &mut path.iter().copied())?;
            overlay.commit(w, scalars);
            Ok(CommandResult::Txn { revision: scalars.revision, succeeded, responses })
        }
        Command::Compact(revision) => {
            if *revision <= scalars.compact_revision {
                return Ok(rejected(
                    scalars,
                    ApplyError::Compacted {
                        requested: *revision,
                        compact_revision: scalars.compact_revision,
                    },
                ));
            }
            if *revision > scalars.revision {
                return Ok(rejected(
                    scalars,
                    ApplyError::FutureRevision { requested: *revision, current: scalars.revision },
                ));
            }
            scalars.compact_revision = *revision;
            Ok(CommandResult::Compact { revision: scalars.revision })
        }
        Command::LeaseGrant { id, ttl } => {
            if overlay.lease(*id).is_some() {
                return Ok(rejected(scalars, ApplyError::LeaseExists(*id)));
            }
            overlay.leases.insert(*id, Some(Lease { id: *id, ttl: *ttl, grant: 0, applied_at: None }));
            Ok(CommandResult::LeaseGrant { revision: scalars.revision, id: *id, ttl: *ttl })
        }
        Command::Auth(change) => {
            let mut auth = match (&overlay.auth, overlay.auth_before) {
                (Some(a), _) => a.clone(),
                (None, Some(a)) => a.clone(),
                (None, None) => crate::auth::AuthState::default(),
            };
            if let Err(e) = auth.apply(change) {
                return Ok(rejected(scalars, ApplyError::Auth(e)));
            }
            let auth_revision = auth.revision;
            overlay.auth = Some(auth);
            Ok(CommandResult::Auth { revision: scalars.revision, auth_revision })
        }
        Command::LeaseRevoke(id) => {
            if overlay.lease(*id).is_none() {
                return Ok(rejected(scalars, ApplyError::LeaseNotFound(*id)));
            }
            let mut w = Writer::new(scalars.revision + 1);
            let mut deleted = 0;
            for key in overlay.lease_keys(*id)? {
                deleted += do_delete(overlay, &mut w, &KeyRange::single(key), false)?.0;
            }
            overlay.leases.insert(*id, None);
            overlay.commit(w, scalars);
            Ok(CommandResult::LeaseRevoke { revision: scalars.revision, deleted })
        }
    }
}

/// Whether a put may run: its lease exists, and a key it keeps the value or lease of exists.
/// When both fail, etcd names the lease for a put on its own and the key for a put in a
/// transaction (its two code paths check in opposite orders); so does this.
fn check_put(overlay: &Overlay<'_>, put: &Put, in_txn: bool) -> Result<Result<(), ApplyError>, ReadError> {
    let lease_missing = put.lease != 0 && overlay.lease(put.lease).is_none();
    let key_missing = (put.ignore_value || put.ignore_lease) && overlay.get(&put.key)?.is_none();
    Ok(match (lease_missing, key_missing) {
        (true, true) if in_txn => Err(ApplyError::KeyNotFound),
        (true, _) => Err(ApplyError::LeaseNotFound(put.lease)),
        (false, true) => Err(ApplyError::KeyNotFound),
        (false, false) => Ok(()),
    })
}

/// Whether a range at a past revision may be read at `scalars`.
fn check_revision(scalars: &Scalars, revision: Revision) -> Result<(), ApplyError> {
    if revision > scalars.revision {
        return Err(ApplyError::FutureRevision { requested: revision, current: scalars.revision });
    }
    if revision < scalars.compact_revision {
        return Err(ApplyError::Compacted {
            requested: revision,
            compact_revision: scalars.compact_revision,
        });
    }
    Ok(())
}

/// Whether every key of `range` satisfies `compare` (an empty range compares as one absent key).
fn compare_holds(overlay: &Overlay<'_>, compare: &Compare) -> Result<bool, ReadError> {
    let found = overlay.collect(&compare.range)?;
    if found.is_empty() {
        return Ok(compare.holds(None));
    }
    Ok(found.iter().all(|(k, v)| compare.holds(Some(&v.to_key_value(k, false)))))
}

/// Chooses every branch of `txn` and of the txns nested in the chosen branches, depth first,
/// on the state before the txn (as etcd's `compareToPath`).
fn choose_path(overlay: &Overlay<'_>, txn: &Txn, path: &mut Vec<bool>) -> Result<(), ReadError> {
    let mut holds = true;
    for c in &txn.compares {
        if !compare_holds(overlay, c)? {
            holds = false;
            break;
        }
    }
    path.push(holds);
    for op in if holds { &txn.success } else { &txn.failure } {
        if let TxnOp::Txn(nested) = op {
            choose_path(overlay, nested, path)?;
        }
    }
    Ok(())
}

/// Which ops of a transaction [`check_path`] checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Puts,
    Ranges,
}

/// Checks the puts or the ranges of the chosen path before any op runs. `deleted` collects the
/// ranges the path deletes, in the order it runs them: a put that keeps a key's value or lease
/// after the same transaction deleted that key has nothing to keep and is refused like one on a
/// missing key (etcd 3.4 crashes on it; the whole transaction is refused, nothing changes).
fn check_path<'a>(
    overlay: &Overlay<'_>,
    scalars: &Scalars,
    txn: &'a Txn,
    check: Check,
    path: &mut impl Iterator<Item = bool>,
    deleted: &mut Vec<&'a KeyRange>,
) -> Result<Result<(), ApplyError>, ReadError> {
    let succeeded = path.next().unwrap_or(false);
    for op in if succeeded { &txn.success } else { &txn.failure } {
        let checked = match op {
            TxnOp::Put(put) if check == Check::Puts => match check_put(overlay, put, true)? {
                Ok(())
                    if (put.ignore_value || put.ignore_lease)
                        && deleted.iter().any(|r| r.contains(&put.key)) =>
                {
                    Err(ApplyError::KeyNotFound)
                }
                checked => checked,
            },
            TxnOp::Range(q) if check == Check::Ranges && q.revision != 0 => {
                check_revision(scalars, q.revision)
            }
            TxnOp::Delete(d) => {
                deleted.push(&d.range);
                Ok(())
            }
            TxnOp::Txn(nested) => check_path(overlay, scalars, nested, check, path, deleted)?,
            TxnOp::Put(_) | TxnOp::Range(_) => Ok(()),
        };
        if checked.is_err() {
            return Ok(checked);
        }
    }
    Ok(Ok(()))
}

fn run_txn(
    overlay: &mut Overlay<'_>,
    w: &mut Writer,
    txn: &Txn,
    path: &mut impl Iterator<Item = bool>,
) -> Result<(bool, Vec<OpResult>), ReadError> {
    let succeeded = path.next().unwrap_or(false);
    let ops = if succeeded { &txn.success } else { &txn.failure };
    let mut responses = Vec::with_capacity(ops.len());
    for op in ops {
        responses.push(match op {
            TxnOp::Range(query) if query.revision == 0 => OpResult::Range(overlay.range_current(query)?),
            TxnOp::Range(query) => OpResult::Range(overlay.range_at(query)?),
            TxnOp::Put(put) => OpResult::Put { prev: do_put(overlay, w, put)?.filter(|_| put.prev_kv) },
            TxnOp::Delete(delete) => {
                let (deleted, prev) = do_delete(overlay, w, &delete.range, delete.prev_kv)?;
                OpResult::Delete { deleted, prev }
            }
            TxnOp::Txn(nested) => {
                let (succeeded, responses) = run_txn(overlay, w, nested, path)?;
                OpResult::Txn { succeeded, responses }
            }
        });
    }
    Ok((succeeded, responses))
}

/// Writes a put at the writer's revision; returns the key as it was before.
fn do_put(overlay: &mut Overlay<'_>, w: &mut Writer, put: &Put) -> Result<Option<KeyValue>, ReadError> {
    let rev = w.revision;
    let prev = overlay.get(&put.key)?;
    let value = match (&prev, put.ignore_value) {
        (Some(p), true) => p.value.clone(),
        _ => put.value.clone(),
    };
    let lease = match (&prev, put.ignore_lease) {
        (Some(p), true) => p.lease,
        _ => put.lease,
    };
    let next = StoredValue {
        value,
        create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
        mod_revision: rev,
        version: prev.as_ref().map_or(1, |p| p.version + 1),
        lease,
    };
    if let Some(p) = &prev {
        if p.lease != 0 && p.lease != lease {
            overlay.detach(p.lease, &put.key);
        }
    }
    if lease != 0 {
        overlay.attach(lease, &put.key);
    }
    let sub = w.next_sub();
    overlay.records.push((
        Rev::new(rev, sub),
        put.key.clone(),
        Version {
            value: next.value.clone(),
            create_revision: next.create_revision,
            version: next.version,
            lease,
            deleted: false,
        },
    ));
    let prev_kv = prev.map(|p| p.to_key_value(&put.key, false));
    let event_prev = w.event_prev(&put.key, prev_kv.clone());
    w.events.push(Event { kind: EventKind::Put, kv: next.to_key_value(&put.key, false), prev: event_prev });
    overlay.live.insert(put.key.clone(), Some(next));
    Ok(prev_kv)
}

/// Deletes every current key of `range` at the writer's revision (a tombstone each).
fn do_delete(
    overlay: &mut Overlay<'_>,
    w: &mut Writer,
    range: &KeyRange,
    prev_kv: bool,
) -> Result<(i64, Vec<KeyValue>), ReadError> {
    let doomed = overlay.collect(range)?;
    let deleted = doomed.len() as i64;
    let mut prevs = Vec::new();
    for (key, value) in doomed {
        if value.lease != 0 {
            overlay.detach(value.lease, &key);
        }
        let sub = w.next_sub();
        overlay.records.push((
            Rev::new(w.revision, sub),
            key.clone(),
            Version { deleted: true, ..Default::default() },
        ));
        let prev = value.to_key_value(&key, false);
        if prev_kv {
            prevs.push(prev.clone());
        }
        let event_prev = w.event_prev(&key, Some(prev));
        w.events.push(Event {
            kind: EventKind::Delete,
            kv: KeyValue { key: key.clone(), mod_revision: w.revision, ..Default::default() },
            prev: event_prev,
        });
        overlay.live.insert(key, None);
    }
    Ok((deleted, prevs))
}

#[cfg(test)]
#[path = "apply_test.rs"]
mod tests;
