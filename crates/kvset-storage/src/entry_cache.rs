//! The last appended Raft log entries, decoded, shared by the log store and its readers.
//!
//! Replication and apply read entries right after they were appended. Without this cache each
//! read is a sled range scan on the blocking pool plus a decode, once per follower and once
//! more for apply. The cache holds a contiguous run of the newest entries, bounded by count and
//! by encoded bytes; a read it does not cover completely (a lagging follower, a restart) falls
//! back to sled.
//!
//! Coherence: the log store updates the cache in the same call that changes sled (append,
//! truncate, purge), so a cached entry is always the entry sled holds at that index, and the
//! newest cached entry is the last entry of the log.

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::Entry;

/// Most entries kept (each is one batch of up to `batch.max_commands` commands).
pub const MAX_ENTRIES: usize = 4096;
/// Most encoded bytes kept: many times a follower's in-flight window (a few 1 MiB-capped
/// AppendEntries), small against a member's memory. How often reads miss is not measured yet.
pub const MAX_BYTES: usize = 16 << 20;

#[derive(Default)]
struct Inner {
    /// Contiguous by index, oldest first; each with its encoded size.
    entries: VecDeque<(Entry, usize)>,
    bytes: usize,
}

/// See the module docs.
pub struct EntryCache {
    inner: Mutex<Inner>,
    max_entries: usize,
    max_bytes: usize,
}

impl std::fmt::Debug for EntryCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        f.debug_struct("EntryCache")
            .field("entries", &inner.entries.len())
            .field("bytes", &inner.bytes)
            .finish()
    }
}

impl Default for EntryCache {
    fn default() -> Self {
        Self::new()
    }
}

impl EntryCache {
    pub fn new() -> Self {
        Self::with_limits(MAX_ENTRIES, MAX_BYTES)
    }

    pub fn with_limits(max_entries: usize, max_bytes: usize) -> Self {
        Self { inner: Mutex::default(), max_entries: max_entries.max(1), max_bytes }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every critical section leaves `Inner` consistent, so a poisoned lock is usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records appended entries, each with its encoded size, in log order. An entry that does
    /// not follow the newest cached one (the log restarted after a snapshot install) empties
    /// the cache first.
    pub fn extend(&self, appended: impl IntoIterator<Item = (Entry, usize)>) {
        let mut inner = self.lock();
        for (entry, size) in appended {
            if inner.entries.back().is_some_and(|(last, _)| last.log_id.index + 1 != entry.log_id.index) {
                inner.entries.clear();
                inner.bytes = 0;
            }
            inner.bytes += size;
            inner.entries.push_back((entry, size));
        }
        while inner.entries.len() > self.max_entries
            || (inner.bytes > self.max_bytes && inner.entries.len() > 1)
        {
            if let Some((_, size)) = inner.entries.pop_front() {
                inner.bytes -= size;
            }
        }
    }

    #[cfg(test)]
    fn push(&self, entry: Entry, size: usize) {
        self.extend([(entry, size)]);
    }

    /// Forgets entries at index `first` and after (the log's suffix was removed).
    pub fn truncate_from(&self, first: u64) {
        let mut inner = self.lock();
        while inner.entries.back().is_some_and(|(e, _)| e.log_id.index >= first) {
            if let Some((_, size)) = inner.entries.pop_back() {
                inner.bytes -= size;
            }
        }
    }

    /// Forgets entries at index `last` and before (the log's prefix was purged).
    pub fn purge_upto(&self, last: u64) {
        let mut inner = self.lock();
        while inner.entries.front().is_some_and(|(e, _)| e.log_id.index <= last) {
            if let Some((_, size)) = inner.entries.pop_front() {
                inner.bytes -= size;
            }
        }
    }

    /// The entries `start .. end` (`end` exclusive; `None` means to the end of the log) if the
    /// cache holds all of them; `None` when the read must go to sled.
    pub fn get(&self, start: u64, end: Option<u64>) -> Option<Vec<Entry>> {
        let inner = self.lock();
        let first = inner.entries.front()?.0.log_id.index;
        let next = inner.entries.back()?.0.log_id.index + 1;
        let end = end.unwrap_or(next);
        if start < first || end > next {
            return None;
        }
        if start >= end {
            return Some(Vec::new());
        }
        let (from, to) = ((start - first) as usize, (end - first) as usize);
        Some(inner.entries.range(from..to).map(|(e, _)| e.clone()).collect())
    }

    /// Number of cached entries and their encoded bytes.
    #[cfg(test)]
    pub fn usage(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.entries.len(), inner.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log_id;
    use openraft::entry::RaftEntry;

    fn entry(index: u64) -> Entry {
        Entry::new_blank(log_id(1, 0, index))
    }

    fn indexes(v: Option<Vec<Entry>>) -> Option<Vec<u64>> {
        v.map(|v| v.iter().map(|e| e.log_id.index).collect())
    }

    #[test]
    fn serves_only_ranges_it_holds_completely() {
        let cache = EntryCache::new();
        assert_eq!(indexes(cache.get(1, None)), None, "empty cache serves nothing");
        for i in 5..=9 {
            cache.push(entry(i), 10);
        }
        assert_eq!(indexes(cache.get(5, Some(10))), Some(vec![5, 6, 7, 8, 9]));
        assert_eq!(indexes(cache.get(7, None)), Some(vec![7, 8, 9]));
        assert_eq!(indexes(cache.get(8, Some(8))), Some(vec![]));
        assert_eq!(indexes(cache.get(4, Some(6))), None, "starts before the cache");
        assert_eq!(indexes(cache.get(9, Some(11))), None, "ends after the log");
    }

    #[test]
    fn evicts_oldest_by_count_and_by_bytes() {
        let cache = EntryCache::with_limits(3, 1000);
        for i in 1..=5 {
            cache.push(entry(i), 10);
        }
        assert_eq!(cache.usage(), (3, 30));
        assert_eq!(indexes(cache.get(3, None)), Some(vec![3, 4, 5]));
        let cache = EntryCache::with_limits(100, 25);
        for i in 1..=5 {
            cache.push(entry(i), 10);
        }
        assert_eq!(cache.usage(), (2, 20));
        cache.push(entry(6), 100);
        assert_eq!(cache.usage(), (1, 100), "one entry larger than the budget is still kept");
    }

    #[test]
    fn truncate_purge_and_gaps_keep_it_coherent() {
        let cache = EntryCache::new();
        for i in 1..=10 {
            cache.push(entry(i), 1);
        }
        cache.truncate_from(8);
        assert_eq!(indexes(cache.get(5, None)), Some(vec![5, 6, 7]));
        assert_eq!(indexes(cache.get(5, Some(9))), None, "truncated entries are gone");
        cache.purge_upto(3);
        assert_eq!(indexes(cache.get(3, None)), None);
        assert_eq!(indexes(cache.get(4, None)), Some(vec![4, 5, 6, 7]));
        cache.push(entry(20), 1);
        assert_eq!(cache.usage(), (1, 1), "a gap (snapshot install) restarts the cache");
        assert_eq!(indexes(cache.get(20, None)), Some(vec![20]));
        cache.truncate_from(0);
        assert_eq!(cache.usage(), (0, 0));
    }
}
