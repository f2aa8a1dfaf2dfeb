//! Reads of the store at a revision: a key, a range, the events between two revisions, HashKV,
//! and the one piece of range logic both current and past reads share.
//!
//! A read first finds, in the [`Index`], where the version it wants of each key is stored (under
//! the index's read lock, for a bounded number of keys at a time), then reads those records
//! from sled with no lock held. Records are never changed once written, and the index only
//! gains versions above the applied revision, so a read at a revision it captured sees the same
//! versions however many applies run meanwhile. Only compaction removes records: a read that
//! finds one missing was passed by compaction, which its caller checks (see `SmReader`).

use std::sync::Arc;
use std::sync::RwLock;
use std::sync::RwLockReadGuard;

use crate::index::Index;
use crate::index::Indexed;
use crate::index::Rev;
use crate::keys;
use crate::keys::record;
use crate::keys::Version;
use crate::types::*;
use crate::ReadError;

/// Index entries a read looks at per hold of the index lock.
const INDEX_CHUNK: usize = 1024;

/// The state of one slot: the records in sled and the index over them. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Slot {
    pub tree: sled::Tree,
    pub index: Arc<RwLock<Index>>,
}

impl Slot {
    pub(crate) fn new(tree: sled::Tree, index: Index) -> Self {
        Self { tree, index: Arc::new(RwLock::new(index)) }
    }

    /// The index, for reading.
    pub(crate) fn index(&self) -> RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The index, for changing (apply and compaction).
    pub(crate) fn index_mut(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The record at `rev`: its key and version. A missing record is an error (a read passed by
    /// compaction, or corruption; the caller tells which).
    pub(crate) fn fetch(&self, rev: Rev) -> Result<(Vec<u8>, Version), ReadError> {
        match self.tree.get(keys::record_key(rev))? {
            Some(bytes) => {
                let r = record::decode(&bytes).ok_or_else(|| {
                    ReadError::Corrupt(format!("undecodable record at {}.{}", rev.main, rev.sub))
                })?;
                Ok((r.key.to_vec(), r.version()))
            }
            None => Err(ReadError::Corrupt(format!("no record at revision {}.{}", rev.main, rev.sub))),
        }
    }

    /// The key-value of the (live) version at `rev`.
    fn fetch_kv(&self, rev: Rev) -> Result<KeyValue, ReadError> {
        let (key, version) = self.fetch(rev)?;
        version.into_key_value(key, rev.main).ok_or_else(|| {
            ReadError::Corrupt(format!("the index holds a tombstone at {}.{} as live", rev.main, rev.sub))
        })
    }

    /// The current record of `key`, if it exists.
    pub(crate) fn current(&self, key: &[u8]) -> Result<Option<StoredValue>, ReadError> {
        let Some(rev) = self.index().latest(key) else { return Ok(None) };
        let (_, v) = self.fetch(rev)?;
        Ok(Some(StoredValue {
            value: v.value,
            create_revision: v.create_revision,
            mod_revision: rev.main,
            version: v.version,
            lease: v.lease,
        }))
    }

    /// The version of `key` visible at `revision`, if the key existed then.
    pub(crate) fn get_at(&self, key: &[u8], revision: Revision) -> Result<Option<KeyValue>, ReadError> {
        let Some(rev) = self.index().visible_at(key, revision) else { return Ok(None) };
        self.fetch_kv(rev).map(Some)
    }

    /// Visits the keys of `range` that existed at `revision`, in key order, with where their
    /// version then is stored, until `visit` says stop.
    pub(crate) fn scan_at(
        &self,
        range: &KeyRange,
        revision: Revision,
        mut visit: impl FnMut(Vec<u8>, Rev) -> Result<bool, ReadError>,
    ) -> Result<(), ReadError> {
        let mut after: Option<Vec<u8>> = None;
        let mut found = Vec::new();
        loop {
            let next = self.index().visible_range(range, revision, after.as_deref(), INDEX_CHUNK, &mut found);
            for (key, rev) in found.drain(..) {
                if !visit(key, rev)? {
                    return Ok(());
                }
            }
            match next {
                Some(last) => after = Some(last),
                None => return Ok(()),
            }
        }
    }

    /// Reads one page of `query` at `revision`.
    pub(crate) fn range_at(&self, query: &RangeQuery, revision: Revision) -> Result<RangeResult, ReadError> {
        let mut collector = RangeCollector::new(query);
        self.scan_at(&query.range, revision, |_, rev| {
            if collector.needs_value() {
                collector.push(self.fetch_kv(rev)?);
            } else {
                collector.push_key();
            }
            Ok(true)
        })?;
        Ok(collector.finish())
    }

    /// The events of revisions `from..=to`, at most about `max_events` events (whole revisions
    /// only, at least one), oldest first. `after_records` runs once the records are read and
    /// before the previous values are (tests park a read there).
    pub(crate) fn events_between(
        &self,
        from: Revision,
        to: Revision,
        max_events: usize,
        after_records: &mut dyn FnMut(),
    ) -> Result<Vec<Arc<RevisionEvents>>, ReadError> {
        // The records, whole revisions only.
        let mut changes: Vec<(Rev, Vec<u8>, Version)> = Vec::new();
        let lo = keys::record_key(Rev::new(from.max(1), 0));
        let hi = keys::record_key(Rev::new(to, u32::MAX));
        for item in self.tree.range(lo..=hi) {
            let (k, v) = item?;
            let rev = keys::parse_record_key(&k)
                .ok_or_else(|| ReadError::Corrupt(format!("bad record key {k:?}")))?;
            if changes.len() >= max_events && changes.last().is_some_and(|(last, ..)| last.main != rev.main) {
                break;
            }
            let r = record::decode(&v).ok_or_else(|| {
                ReadError::Corrupt(format!("undecodable record at {}.{}", rev.main, rev.sub))
            })?;
            changes.push((rev, r.key.to_vec(), r.version()));
        }
        after_records();
        // Each event's previous value: the key at the revision before (etcd reads it at
        // `mod_revision - 1`, also for a key the same revision changed before).
        let prev_revs: Vec<Option<Rev>> = {
            let index = self.index();
            changes.iter().map(|(rev, key, _)| index.before(key, rev.main)).collect()
        };
        let mut out: Vec<Arc<RevisionEvents>> = Vec::new();
        let mut current: Option<RevisionEvents> = None;
        for ((rev, key, version), prev_rev) in changes.into_iter().zip(prev_revs) {
            let prev = prev_rev.map(|p| self.fetch_kv(p)).transpose()?;
            if current.as_ref().is_some_and(|c| c.revision != rev.main) {
                out.extend(current.take().map(Arc::new));
            }
            let event = match version.into_key_value(key.clone(), rev.main) {
                Some(kv) => Event { kind: EventKind::Put, kv, prev },
                None => Event {
                    kind: EventKind::Delete,
                    kv: KeyValue { key, mod_revision: rev.main, ..Default::default() },
                    prev,
                },
            };
            current
                .get_or_insert_with(|| RevisionEvents { revision: rev.main, events: Vec::new() })
                .events
                .push(event);
        }
        out.extend(current.map(Arc::new));
        Ok(out)
    }

    /// A hash of the history up to `revision` as it reads once compaction at `compact` has run:
    /// every version above `compact`, and of older ones only each key's version visible at
    /// `compact` (when it is not a deletion), in key then revision order. It depends on the
    /// versions hashed only, not on how far physical compaction has got, so members agree.
    pub(crate) fn hash_kv(&self, revision: Revision, compact: Revision) -> Result<u32, ReadError> {
        let mut hasher = KvHasher::default();
        let mut after: Option<Vec<u8>> = None;
        let mut found: Vec<(Vec<u8>, Indexed)> = Vec::new();
        loop {
            let next = self.index().hashed(revision, compact, after.as_deref(), INDEX_CHUNK, &mut found);
            for (key, indexed) in found.drain(..) {
                let (_, version) = self.fetch(indexed.rev)?;
                hasher.add(&key, indexed.rev.main, indexed.rev.sub, &version);
            }
            match next {
                Some(last) => after = Some(last),
                None => return Ok(hasher.finish()),
            }
        }
    }
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

    /// Whether the next key's value and record are needed, or only its key (a count, or a key
    /// past the page).
    pub(crate) fn needs_value(&self) -> bool {
        !self.query.count_only && (self.gather_all || self.out.next_key.is_none())
    }

    /// Takes the next key of the range when [`Self::needs_value`] said its record is not needed.
    pub(crate) fn push_key(&mut self) {
        debug_assert!(!self.needs_value());
        self.out.count += 1;
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
