//! Reads of the history (MVCC): a key or a range at a past revision, the events between two
//! revisions, and the one piece of range logic both current and past reads share.
//!
//! History below the applied revision never changes except by compaction, which only removes
//! versions superseded before the compact revision. A reader therefore needs no lock: it reads,
//! then checks that the compact revision has not passed the revision it read at (the caller
//! does; see `SmReader`).

use std::sync::Arc;

use crate::codec;
use crate::keys;
use crate::keys::Version;
use crate::types::*;
use crate::ReadError;

/// Decodes one history entry.
pub(crate) fn decode_entry(k: &[u8], v: &[u8]) -> Result<(Vec<u8>, Revision, u32, Version), ReadError> {
    let (key, revision, sub) =
        keys::parse_history(k).ok_or_else(|| ReadError::Corrupt(format!("bad history key {k:?}")))?;
    let version: Version = codec::decode("key version", v)?;
    Ok((key, revision, sub, version))
}

/// The version of `key` visible at `revision` (the last one at or below it), if the key existed
/// then.
pub(crate) fn get_at(
    tree: &sled::Tree,
    key: &[u8],
    revision: Revision,
) -> Result<Option<KeyValue>, ReadError> {
    let lo = keys::history(key, 0, 0);
    let hi = keys::history(key, revision, u32::MAX);
    match tree.range(lo..=hi).next_back().transpose()? {
        Some((k, v)) => {
            let (_, rev, _, version) = decode_entry(&k, &v)?;
            Ok(version.to_key_value(key, rev, false))
        }
        None => Ok(None),
    }
}

/// The version of `key` at the revision before `revision`: the previous value of an event at
/// `revision` (also when the same revision changed the key before, as etcd reads it at
/// `mod_revision - 1`).
pub(crate) fn prev_of(
    tree: &sled::Tree,
    key: &[u8],
    revision: Revision,
) -> Result<Option<KeyValue>, ReadError> {
    let lo = keys::history(key, 0, 0);
    let hi = keys::history(key, revision, 0);
    match tree.range(lo..hi).next_back().transpose()? {
        Some((k, v)) => {
            let (_, rev, _, version) = decode_entry(&k, &v)?;
            Ok(version.to_key_value(key, rev, false))
        }
        None => Ok(None),
    }
}

/// Visits the keys of `range` as they were at `revision`, in key order, until `visit` says stop.
pub(crate) fn scan_at(
    tree: &sled::Tree,
    range: &KeyRange,
    revision: Revision,
    mut visit: impl FnMut(KeyValue) -> bool,
) -> Result<(), ReadError> {
    if let RangeEnd::Before(end) = &range.end {
        if end.as_slice() <= range.start.as_slice() {
            return Ok(());
        }
    }
    let (lo, hi) = keys::history_bounds(range);
    // The last version at or below `revision` of the key being walked.
    let mut current: Option<(Vec<u8>, Option<KeyValue>)> = None;
    for item in tree.range(lo..hi) {
        let (k, v) = item?;
        let (key, rev, _, version) = decode_entry(&k, &v)?;
        if current.as_ref().is_some_and(|(ck, _)| *ck != key) {
            if let Some((_, Some(kv))) = current.take() {
                if !visit(kv) {
                    return Ok(());
                }
            }
        }
        if rev <= revision {
            let kv = version.to_key_value(&key, rev, false);
            current = Some((key, kv));
        } else if current.is_none() {
            current = Some((key, None));
        }
    }
    if let Some((_, Some(kv))) = current {
        visit(kv);
    }
    Ok(())
}

/// Builds a range result the way etcd does, from the keys of a range in key order.
///
/// * `count` is every key of the range at the revision, before filters and the limit;
/// * with a sort or a revision filter every key is gathered, filtered, sorted, then cut to the
///   limit (`more` if the filtered list was longer) — for [`SortOrder::AscendFirstPage`], only
///   the first `limit + 1` keys;
/// * otherwise keys are taken in order up to the limit and the byte budget (at least one key),
///   and `next_key` says where the next page starts.
pub(crate) struct RangeCollector<'q> {
    query: &'q RangeQuery,
    out: RangeResult,
    bytes: usize,
    gather_all: bool,
}

impl<'q> RangeCollector<'q> {
    pub(crate) fn new(query: &'q RangeQuery) -> Self {
        Self {
            query,
            out: RangeResult::default(),
            bytes: 0,
            gather_all: query.sort.is_some_and(|s| s != (SortTarget::Key, SortOrder::Ascend))
                || query.has_revision_filters(),
        }
    }

    /// Takes the next key of the range. Always returns true (every key is counted).
    pub(crate) fn push(&mut self, kv: KeyValue) -> bool {
        let q = self.query;
        self.out.count += 1;
        if q.count_only {
            return true;
        }
        if self.gather_all {
            let first_page = matches!(q.sort, Some((_, SortOrder::AscendFirstPage)))
                && q.limit > 0
                && !q.has_revision_filters();
            let full = first_page && self.out.kvs.len() > q.limit;
            if q.keeps(&kv) && !full {
                self.out.kvs.push(kv);
            }
            return true;
        }
        if self.out.next_key.is_some() {
            return true;
        }
        let size = kv.key.len() + if q.keys_only { 0 } else { kv.value.len() };
        let under_limit = q.limit == 0 || self.out.kvs.len() < q.limit;
        let fits = self.out.kvs.is_empty() || (under_limit && self.bytes + size <= q.max_bytes);
        if fits {
            self.bytes += size;
            let mut kv = kv;
            if q.keys_only {
                kv.value = Vec::new();
            }
            self.out.kvs.push(kv);
        } else {
            self.out.more = true;
            self.out.next_key = Some(kv.key);
        }
        true
    }

    pub(crate) fn finish(mut self) -> RangeResult {
        let q = self.query;
        if self.gather_all {
            if let Some((target, order)) = q.sort {
                // A stable sort of the key-ordered list: keys that tie on the target stay in key
                // order whichever the direction, as etcd's sort of its (small) results leaves them.
                let by_target = |a: &KeyValue, b: &KeyValue| match target {
                    SortTarget::Key => a.key.cmp(&b.key),
                    SortTarget::Version => a.version.cmp(&b.version),
                    SortTarget::Create => a.create_revision.cmp(&b.create_revision),
                    SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
                    SortTarget::Value => a.value.cmp(&b.value),
                };
                match order {
                    SortOrder::Ascend | SortOrder::AscendFirstPage => self.out.kvs.sort_by(by_target),
                    SortOrder::Descend => self.out.kvs.sort_by(|a, b| by_target(b, a)),
                }
            }
            if q.limit > 0 && self.out.kvs.len() > q.limit {
                self.out.kvs.truncate(q.limit);
                self.out.more = true;
            }
            if q.keys_only {
                for kv in &mut self.out.kvs {
                    kv.value = Vec::new();
                }
            }
        }
        self.out
    }
}

/// The events of revisions `from..=to` from the change log, at most about `max_events` events
/// (whole revisions only, at least one), oldest first.
pub(crate) fn events_between(
    tree: &sled::Tree,
    from: Revision,
    to: Revision,
    max_events: usize,
    after_first_change: &mut dyn FnMut(),
) -> Result<Vec<Arc<RevisionEvents>>, ReadError> {
    let mut out: Vec<Arc<RevisionEvents>> = Vec::new();
    let mut current: Option<RevisionEvents> = None;
    let lo = keys::change(from.max(1), 0);
    let hi = keys::change(to, u32::MAX);
    for (events, item) in tree.range(lo..=hi).enumerate() {
        let (k, key) = item?;
        let (revision, sub) =
            keys::parse_change(&k).ok_or_else(|| ReadError::Corrupt(format!("bad change key {k:?}")))?;
        if events == 0 {
            after_first_change();
        }
        if current.as_ref().is_some_and(|c| c.revision != revision) {
            if let Some(done) = current.take() {
                out.push(Arc::new(done));
            }
            if events >= max_events {
                return Ok(out);
            }
        }
        let version = match tree.get(keys::history(&key, revision, sub))? {
            Some(v) => codec::decode::<Version>("key version", &v)?,
            None => {
                return Err(ReadError::Corrupt(format!(
                    "the change log names key {key:?} at revision {revision}.{sub} but the history has no such version"
                )))
            }
        };
        let prev = prev_of(tree, &key, revision)?;
        let event = match version.to_key_value(&key, revision, false) {
            Some(kv) => Event { kind: EventKind::Put, kv, prev },
            None => Event {
                kind: EventKind::Delete,
                kv: KeyValue { key: key.to_vec(), mod_revision: revision, ..Default::default() },
                prev,
            },
        };
        current.get_or_insert_with(|| RevisionEvents { revision, events: Vec::new() }).events.push(event);
    }
    if let Some(done) = current {
        out.push(Arc::new(done));
    }
    Ok(out)
}

/// The hash HashKV answers: CRC-32 over versions fed in key, then revision order, each in a
/// canonical encoding (key, revision, sub-revision, tombstone, create revision, version, lease,
/// value), so that it depends on the versions hashed and not on how a store lays them out.
#[derive(Default)]
pub(crate) struct KvHasher(crc32fast::Hasher);

impl KvHasher {
    pub(crate) fn add(&mut self, key: &[u8], revision: Revision, sub: u32, version: &Version) {
        let h = &mut self.0;
        h.update(&(key.len() as u64).to_le_bytes());
        h.update(key);
        h.update(&revision.to_le_bytes());
        h.update(&sub.to_le_bytes());
        h.update(&[version.deleted as u8]);
        h.update(&version.create_revision.to_le_bytes());
        h.update(&version.version.to_le_bytes());
        h.update(&version.lease.to_le_bytes());
        h.update(&(version.value.len() as u64).to_le_bytes());
        h.update(&version.value);
    }

    pub(crate) fn finish(self) -> u32 {
        self.0.finalize()
    }
}

/// A hash of the history up to `revision` as it reads once compaction at `compact` has run:
/// every version above `compact`, and of older ones only each key's version visible at
/// `compact` (when it is not a deletion). Physical compaction removes only versions this leaves
/// out, so members agree on the hash wherever their compaction has got to.
pub(crate) fn hash_kv(tree: &sled::Tree, revision: Revision, compact: Revision) -> Result<u32, ReadError> {
    let mut hasher = KvHasher::default();
    // The newest version at or below `compact` of the key being walked, not yet hashed.
    let mut kept: Option<(Vec<u8>, Revision, u32, Version)> = None;
    let hash_kept = |kept: &mut Option<(Vec<u8>, Revision, u32, Version)>, hasher: &mut KvHasher| {
        if let Some((key, rev, sub, version)) = kept.take() {
            if !version.deleted {
                hasher.add(&key, rev, sub, &version);
            }
        }
    };
    for item in tree.range(vec![keys::HISTORY]..vec![keys::HISTORY + 1]) {
        let (k, v) = item?;
        let (key, rev, sub, version) = decode_entry(&k, &v)?;
        if kept.as_ref().is_some_and(|(kept_key, ..)| *kept_key != key) {
            hash_kept(&mut kept, &mut hasher);
        }
        if rev > revision {
            continue;
        }
        if rev <= compact {
            kept = Some((key, rev, sub, version));
        } else {
            hash_kept(&mut kept, &mut hasher);
            hasher.add(&key, rev, sub, &version);
        }
    }
    hash_kept(&mut kept, &mut hasher);
    Ok(hasher.finish())
}
