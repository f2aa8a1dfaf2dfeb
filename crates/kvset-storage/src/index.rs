//! The in-memory key index: for every key, the revisions at which it changed (its versions,
//! tombstones included, oldest first), and which keys each lease holds.
//!
//! The store keeps one record per revision on disk ([`crate::keys::record`]); the index is what
//! finds them by key. It is rebuilt at open by one scan of the records in revision order, and
//! changed only by apply (which appends) and by compaction (which removes versions from the
//! front of a key's list). A key's list is a run of *generations*, as in etcd's `keyIndex`: a
//! generation starts at a put on a missing key and ends at a tombstone.
//!
//! Every read is a read *at a revision*: the version of a key visible at revision `r` is its
//! last change at or below `r`, none if that is a tombstone. Apply appends only above the
//! applied revision, so a reader that captured revision `r` reads the same versions however
//! many applies happen meanwhile; compaction only removes versions no read at or above the
//! compact revision can see (see [`Index::compact`]), so a reader below it is refused instead.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::collections::HashMap;
use std::ops::Bound;

use crate::types::KeyRange;
use crate::types::LeaseId;
use crate::types::RangeEnd;
use crate::types::Revision;

/// A revision and sub-revision: where one change of one key is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Rev {
    pub main: Revision,
    pub sub: u32,
}

impl Rev {
    pub(crate) fn new(main: Revision, sub: u32) -> Self {
        Self { main, sub }
    }
}

/// One version of a key in the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Indexed {
    pub rev: Rev,
    /// The key was deleted here.
    pub tombstone: bool,
}

/// The versions of one key, oldest first. Most keys have one: it is kept inline, with no
/// allocation of its own (a `Vec` would cost a 16-byte allocation and its allocator overhead).
#[derive(Debug, Clone)]
enum Versions {
    One(Indexed),
    Many(Vec<Indexed>),
}

impl Versions {
    fn as_slice(&self) -> &[Indexed] {
        match self {
            Versions::One(v) => std::slice::from_ref(v),
            Versions::Many(vs) => vs,
        }
    }

    fn push(&mut self, v: Indexed) {
        match self {
            Versions::One(first) => *self = Versions::Many(vec![*first, v]),
            Versions::Many(vs) => vs.push(v),
        }
    }

    /// Removes the first `n` versions (fewer than all) and returns where they were stored.
    fn remove_front(&mut self, n: usize, removed: &mut Vec<Rev>) {
        let Versions::Many(vs) = self else { return };
        removed.extend(vs.drain(..n).map(|r| r.rev));
        if let [only] = vs.as_slice() {
            *self = Versions::One(*only);
        }
    }
}

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct Index {
    keys: BTreeMap<Box<[u8]>, Versions>,
    /// The keys attached to each lease (their current version carries it).
    leases: HashMap<LeaseId, BTreeSet<Box<[u8]>>>,
    /// Versions over every key.
    versions: usize,
}

/// Bounds of a range of keys in the index.
type KeyBounds<'a> = (Bound<&'a [u8]>, Bound<&'a [u8]>);

/// The keys of `range` after `after` (exclusive), as map bounds; `None` when that is empty.
fn bounds<'a>(range: &'a KeyRange, after: Option<&'a [u8]>) -> Option<KeyBounds<'a>> {
    let start = match after {
        Some(a) if a >= range.start.as_slice() => Bound::Excluded(a),
        _ => Bound::Included(range.start.as_slice()),
    };
    let end = match &range.end {
        RangeEnd::Single => Bound::Included(range.start.as_slice()),
        RangeEnd::Unbounded => Bound::Unbounded,
        RangeEnd::Before(end) => Bound::Excluded(end.as_slice()),
    };
    let empty = match (start, end) {
        (Bound::Included(s), Bound::Included(e)) => s > e,
        (Bound::Included(s) | Bound::Excluded(s), Bound::Excluded(e)) => s >= e,
        (Bound::Excluded(s), Bound::Included(e)) => s >= e,
        _ => false,
    };
    (!empty).then_some((start, end))
}

/// The version of a key visible at `at` in `revs`: its last change at or below `at`.
fn visible(revs: &[Indexed], at: Revision) -> Option<&Indexed> {
    let n = revs.partition_point(|r| r.rev.main <= at);
    n.checked_sub(1).map(|i| &revs[i])
}

impl Index {
    /// Keys in the index (live or with retained history).
    pub(crate) fn keys(&self) -> usize {
        self.keys.len()
    }

    /// Versions over every key, tombstones included.
    pub(crate) fn versions(&self) -> usize {
        self.versions
    }

    /// Records a change of `key` at `rev`, which must be above every change of it so far.
    pub(crate) fn push(&mut self, key: &[u8], rev: Rev, tombstone: bool) {
        let entry = Indexed { rev, tombstone };
        match self.keys.get_mut(key) {
            Some(revs) => {
                debug_assert!(
                    revs.as_slice().last().is_none_or(|l| l.rev < rev),
                    "index appends in revision order"
                );
                revs.push(entry);
            }
            None => {
                self.keys.insert(key.into(), Versions::One(entry));
            }
        }
        self.versions += 1;
    }

    /// Records a change of `key` at `rev` unless it is not above every change of it so far
    /// (records read from disk or a snapshot file); returns whether it did.
    pub(crate) fn try_push(&mut self, key: &[u8], rev: Rev, tombstone: bool) -> bool {
        if self.keys.get(key).and_then(|revs| revs.as_slice().last()).is_some_and(|l| l.rev >= rev) {
            return false;
        }
        self.push(key, rev, tombstone);
        true
    }

    /// `key` now carries lease `id`.
    pub(crate) fn attach(&mut self, id: LeaseId, key: &[u8]) {
        self.leases.entry(id).or_default().insert(key.into());
    }

    /// `key` no longer carries lease `id`.
    pub(crate) fn detach(&mut self, id: LeaseId, key: &[u8]) {
        if let Some(keys) = self.leases.get_mut(&id) {
            keys.remove(key);
            if keys.is_empty() {
                self.leases.remove(&id);
            }
        }
    }

    /// The keys attached to lease `id`, in key order.
    pub(crate) fn lease_keys(&self, id: LeaseId) -> Vec<Vec<u8>> {
        self.leases.get(&id).map(|keys| keys.iter().map(|k| k.to_vec()).collect()).unwrap_or_default()
    }

    /// Where the current version of `key` is stored; `None` if the key does not exist.
    pub(crate) fn latest(&self, key: &[u8]) -> Option<Rev> {
        self.keys.get(key)?.as_slice().last().filter(|r| !r.tombstone).map(|r| r.rev)
    }

    /// Where the version of `key` visible at `at` is stored; `None` if the key did not exist then.
    pub(crate) fn visible_at(&self, key: &[u8], at: Revision) -> Option<Rev> {
        visible(self.keys.get(key)?.as_slice(), at).filter(|r| !r.tombstone).map(|r| r.rev)
    }

    /// The version of `key` at the revision before `at`: the previous value of an event at `at`.
    pub(crate) fn before(&self, key: &[u8], at: Revision) -> Option<Rev> {
        self.visible_at(key, at - 1)
    }

    /// Appends to `out` the keys of `range` after `after` that existed at `at`, with where
    /// their version then is stored, in key order: at most `max` index entries are looked at.
    /// Returns the last key looked at when the range goes on past them.
    pub(crate) fn visible_range(
        &self,
        range: &KeyRange,
        at: Revision,
        after: Option<&[u8]>,
        max: usize,
        out: &mut Vec<(Vec<u8>, Rev)>,
    ) -> Option<Vec<u8>> {
        let bounds = bounds(range, after)?;
        let mut last: Option<&[u8]> = None;
        for (looked, (key, revs)) in self.keys.range::<[u8], _>(bounds).enumerate() {
            if looked >= max.max(1) {
                return last.map(<[u8]>::to_vec);
            }
            if let Some(v) = visible(revs.as_slice(), at).filter(|r| !r.tombstone) {
                out.push((key.to_vec(), v.rev));
            }
            last = Some(key);
        }
        None
    }

    /// Appends to `out` what HashKV hashes of the keys after `after` (at most `max` keys): every
    /// version above `compact` up to `revision`, and of older ones only the key's version
    /// visible at `compact` when that is not a deletion; each with its tombstone flag. Returns
    /// the last key looked at when more keys follow.
    pub(crate) fn hashed(
        &self,
        revision: Revision,
        compact: Revision,
        after: Option<&[u8]>,
        max: usize,
        out: &mut Vec<(Vec<u8>, Indexed)>,
    ) -> Option<Vec<u8>> {
        let lower = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        let mut last = None;
        for (looked, (key, revs)) in self.keys.range::<[u8], _>((lower, Bound::Unbounded)).enumerate() {
            if looked >= max.max(1) {
                return last;
            }
            if let Some(v) = visible(revs.as_slice(), compact).filter(|r| !r.tombstone) {
                out.push((key.to_vec(), *v));
            }
            for r in revs.as_slice().iter().filter(|r| r.rev.main > compact && r.rev.main <= revision) {
                out.push((key.to_vec(), *r));
            }
            last = Some(key.to_vec());
        }
        None
    }

    /// Compacts the keys after `after` at `compact` (at most `max` keys, and no key after
    /// `max` versions have been removed): removes every
    /// version below it that a read at or above it cannot see. That is each version superseded
    /// at or before `compact`, except those at `compact` itself (the events of the compact
    /// revision stay whole), and a tombstone below it, together with everything before it (a
    /// key's tombstone and its older versions always go in the same step: removing the
    /// tombstone first would bring the older version back). A key left with no version leaves
    /// the index. The removed versions are appended to `removed`; returns the last key looked
    /// at when more keys follow.
    pub(crate) fn compact(
        &mut self,
        compact: Revision,
        after: Option<&[u8]>,
        max: usize,
        removed: &mut Vec<Rev>,
    ) -> Option<Vec<u8>> {
        let lower = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        let mut emptied = Vec::new();
        let mut last = None;
        let mut more = false;
        let removed_before = removed.len();
        for (looked, (key, revs)) in self.keys.range_mut::<[u8], _>((lower, Bound::Unbounded)).enumerate() {
            if looked > 0 && (looked >= max || removed.len() - removed_before >= max) {
                more = true;
                break;
            }
            let all = revs.as_slice();
            let below = all.partition_point(|r| r.rev.main < compact);
            let at_or_below = all.partition_point(|r| r.rev.main <= compact);
            let cut = if below == 0 {
                0
            } else if at_or_below > below || all[below - 1].tombstone {
                below
            } else {
                below - 1
            };
            if cut == all.len() {
                removed.extend(all.iter().map(|r| r.rev));
                emptied.push(key.clone());
            } else if cut > 0 {
                revs.remove_front(cut, removed);
            }
            self.versions -= cut;
            last = Some(key.to_vec());
        }
        for key in emptied {
            self.keys.remove(&key);
        }
        if more {
            last
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev(main: Revision) -> Rev {
        Rev::new(main, 0)
    }

    #[test]
    fn reads_at_a_revision_see_the_last_change_at_or_below_it() {
        let mut index = Index::default();
        index.push(b"a", rev(2), false);
        index.push(b"a", rev(4), true);
        index.push(b"a", rev(6), false);
        assert_eq!(index.visible_at(b"a", 1), None);
        assert_eq!(index.visible_at(b"a", 3), Some(rev(2)));
        assert_eq!(index.visible_at(b"a", 5), None, "deleted at 4");
        assert_eq!(index.latest(b"a"), Some(rev(6)));
        assert_eq!(index.before(b"a", 6), None);
        assert_eq!(index.before(b"a", 4), Some(rev(2)));
    }

    #[test]
    fn compaction_keeps_what_a_read_at_the_compact_revision_sees_and_the_events_there() {
        let mut index = Index::default();
        // a: put 2, put 3, put 5 → compact 4 keeps 3 (visible at 4) and 5.
        for r in [2, 3, 5] {
            index.push(b"a", rev(r), false);
        }
        // b: put 2, delete 3 → compact 4 removes both; the key leaves the index.
        index.push(b"b", rev(2), false);
        index.push(b"b", rev(3), true);
        // c: put 2, delete at 4 (the compact revision) → the tombstone stays, 2 goes.
        index.push(b"c", rev(2), false);
        index.push(b"c", rev(4), true);
        let mut removed = Vec::new();
        assert_eq!(index.compact(4, None, 100, &mut removed), None);
        removed.sort();
        assert_eq!(removed, vec![rev(2), rev(2), rev(2), rev(3)]);
        assert_eq!(index.visible_at(b"a", 4), Some(rev(3)));
        assert_eq!(index.keys(), 2);
        assert!(!index.keys.contains_key(&b"b"[..]));
        assert_eq!(index.versions(), 3);
    }

    #[test]
    fn compaction_and_ranges_go_in_chunks_and_resume_after_the_last_key() {
        let mut index = Index::default();
        for k in 0..10u8 {
            index.push(&[k], rev(2), false);
            index.push(&[k], rev(3), false);
        }
        let mut removed = Vec::new();
        let mut after = None;
        let mut steps = 0;
        loop {
            steps += 1;
            match index.compact(3, after.as_deref(), 3, &mut removed) {
                Some(last) => after = Some(last),
                None => break,
            }
        }
        assert_eq!((steps, removed.len(), index.versions()), (4, 10, 10));
        let mut out = Vec::new();
        let mut after = None;
        while let Some(last) = index.visible_range(&KeyRange::all(), 3, after.as_deref(), 4, &mut out) {
            after = Some(last);
        }
        assert_eq!(out.len(), 10);
        assert!(out.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[test]
    fn ranges_that_are_empty_or_resume_at_their_end_are_empty() {
        let mut index = Index::default();
        index.push(b"a", rev(2), false);
        index.push(b"b", rev(2), false);
        let mut out = Vec::new();
        assert_eq!(index.visible_range(&KeyRange::between("b", "a"), 2, None, 10, &mut out), None);
        assert_eq!(index.visible_range(&KeyRange::between("a", "b"), 2, Some(b"b"), 10, &mut out), None);
        assert_eq!(index.visible_range(&KeyRange::single("a"), 2, Some(b"a"), 10, &mut out), None);
        assert!(out.is_empty());
        assert_eq!(index.visible_range(&KeyRange::single("a"), 2, None, 10, &mut out), None);
        assert_eq!(out, vec![(b"a".to_vec(), rev(2))]);
    }

    #[test]
    fn a_key_with_one_version_holds_it_inline_and_compaction_keeps_the_list_minimal() {
        // 8 bytes more in the tree node than a Vec (no niche for the tag), 16 + allocator overhead
        // less on the heap for every key with one version.
        assert!(std::mem::size_of::<Versions>() <= 32);
        let mut index = Index::default();
        index.push(b"a", rev(2), false);
        assert!(matches!(index.keys.get(&b"a"[..]), Some(Versions::One(_))));
        index.push(b"a", rev(3), false);
        index.push(b"a", rev(4), false);
        let mut removed = Vec::new();
        index.compact(4, None, 10, &mut removed);
        assert_eq!(removed, vec![rev(2), rev(3)]);
        assert!(matches!(index.keys.get(&b"a"[..]), Some(Versions::One(v)) if v.rev == rev(4)));
        assert_eq!((index.keys(), index.versions()), (1, 1));
    }

    #[test]
    fn lease_attachments_follow_attach_and_detach() {
        let mut index = Index::default();
        index.attach(7, b"b");
        index.attach(7, b"a");
        assert_eq!(index.lease_keys(7), vec![b"a".to_vec(), b"b".to_vec()]);
        index.detach(7, b"a");
        index.detach(7, b"b");
        assert!(index.lease_keys(7).is_empty());
        assert!(index.leases.is_empty());
    }
}
