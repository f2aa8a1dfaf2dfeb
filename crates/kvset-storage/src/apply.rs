//! Evaluation of commands against the state machine tree, through an in-memory overlay.
//!
//! Applying a batch of log entries must be atomic together with `last_applied`, so nothing is
//! written to sled while commands are evaluated: every change goes into an [`Overlay`] (a
//! sorted map of pending writes over the tree), later commands read through it, and the
//! state machine turns it into one `sled::Batch` at the end.
//!
//! Data keys in the tree are the user key prefixed with [`DATA_PREFIX`] (`0x01`); state machine
//! metadata lives under `0x00` in the same tree, so one batch covers both.

use std::collections::BTreeMap;
use std::ops::Bound;

use crate::codec;
use crate::codec::CodecError;
use crate::types::*;

/// Prefix of user data keys.
pub(crate) const DATA_PREFIX: u8 = 0x01;

/// Error reading the tree while applying or reading.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("state machine read failed: {0}")]
    Sled(#[from] sled::Error),
    #[error("state machine holds an undecodable record: {0}")]
    Codec(#[from] CodecError),
}

pub(crate) fn data_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(DATA_PREFIX);
    k.extend_from_slice(key);
    k
}

/// The tree-key bounds of a [`KeyRange`].
pub(crate) fn tree_bounds(range: &KeyRange) -> (Bound<Vec<u8>>, Bound<Vec<u8>>) {
    let start = Bound::Included(data_key(&range.start));
    let end = match &range.end {
        RangeEnd::Single => Bound::Included(data_key(&range.start)),
        RangeEnd::Unbounded => Bound::Excluded(vec![DATA_PREFIX + 1]),
        RangeEnd::Before(end) => Bound::Excluded(data_key(end)),
    };
    (start, end)
}

/// Pending writes over a tree. `None` marks a deletion.
pub(crate) struct Overlay<'t> {
    tree: &'t sled::Tree,
    pub(crate) changes: BTreeMap<Vec<u8>, Option<StoredValue>>,
}

impl<'t> Overlay<'t> {
    pub(crate) fn new(tree: &'t sled::Tree) -> Self {
        Self { tree, changes: BTreeMap::new() }
    }

    /// Reads a user key through the overlay.
    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<StoredValue>, ReadError> {
        if let Some(change) = self.changes.get(key) {
            return Ok(change.clone());
        }
        match self.tree.get(data_key(key))? {
            Some(bytes) => Ok(Some(codec::decode("stored value", &bytes)?)),
            None => Ok(None),
        }
    }

    fn put(&mut self, key: Vec<u8>, value: StoredValue) {
        self.changes.insert(key, Some(value));
    }

    fn delete(&mut self, key: Vec<u8>) {
        self.changes.insert(key, None);
    }

    /// Visits the keys of `range` in order, merging the tree with the overlay, until `visit`
    /// returns `false`.
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
        let mut over_iter =
            self.changes.range::<Vec<u8>, _>((Bound::Included(range.start.clone()), overlay_end));
        let mut over_cur = over_iter.next();
        let mut tree_iter = self.tree.range(tree_bounds(range));
        let mut tree_cur = tree_iter.next().transpose()?;
        loop {
            // Tree keys carry DATA_PREFIX; overlay keys are bare user keys.
            let take_tree = match (&tree_cur, over_cur) {
                (None, None) => return Ok(()),
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some((tk, _)), Some((ok, _))) => &tk[1..] < ok.as_slice(),
            };
            if take_tree {
                if let Some((tk, tv)) = tree_cur.take() {
                    let value: StoredValue = codec::decode("stored value", &tv)?;
                    if !visit(&tk[1..], &value) {
                        return Ok(());
                    }
                }
                tree_cur = tree_iter.next().transpose()?;
            } else if let Some((ok, change)) = over_cur.take() {
                // The overlay shadows the tree's version of the same key.
                if tree_cur.as_ref().is_some_and(|(tk, _)| &tk[1..] == ok.as_slice()) {
                    tree_cur = tree_iter.next().transpose()?;
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

    /// Reads one page of `query`.
    pub(crate) fn range(&self, query: &RangeQuery) -> Result<RangeResult, ReadError> {
        let mut out = RangeResult::default();
        let limit = query.limit.max(1);
        let mut bytes = 0usize;
        self.scan(&query.range, |key, value| {
            out.count += 1;
            if !query.count_only && out.next_key.is_none() {
                let size = key.len() + if query.keys_only { 0 } else { value.value.len() };
                let fits = out.kvs.is_empty() || (out.kvs.len() < limit && bytes + size <= query.max_bytes);
                if fits {
                    bytes += size;
                    out.kvs.push(value.to_key_value(key, query.keys_only));
                } else {
                    out.more = true;
                    out.next_key = Some(key.to_vec());
                }
            }
            true
        })?;
        Ok(out)
    }

    /// The keys (and values) a delete of `range` removes.
    fn collect(&self, range: &KeyRange) -> Result<Vec<(Vec<u8>, StoredValue)>, ReadError> {
        let mut out = Vec::new();
        self.scan(range, |k, v| {
            out.push((k.to_vec(), v.clone()));
            true
        })?;
        Ok(out)
    }
}

/// Applies one command to the overlay. `revision` is the store revision, advanced when the
/// command changes something.
pub(crate) fn apply_command(
    overlay: &mut Overlay<'_>,
    revision: &mut Revision,
    command: &Command,
) -> Result<CommandResult, ReadError> {
    match command {
        Command::SetReplicas(replicas) => {
            Ok(CommandResult::SetReplicas { revision: *revision, replicas: *replicas })
        }
        Command::Put(put) => {
            let rev = *revision + 1;
            let prev = do_put(overlay, rev, put)?;
            *revision = rev;
            Ok(CommandResult::Put { revision: rev, prev })
        }
        Command::Delete(delete) => {
            let rev = *revision + 1;
            let (deleted, prev) = do_delete(overlay, delete)?;
            if deleted > 0 {
                *revision = rev;
            }
            Ok(CommandResult::Delete { revision: *revision, deleted, prev })
        }
        Command::Txn(txn) => {
            let mut holds = true;
            for compare in &txn.compares {
                if !compare.holds(overlay.get(&compare.key)?.as_ref()) {
                    holds = false;
                    break;
                }
            }
            let ops = if holds { &txn.success } else { &txn.failure };
            let rev = *revision + 1;
            let mut wrote = false;
            let mut responses = Vec::with_capacity(ops.len());
            for op in ops {
                responses.push(match op {
                    TxnOp::Range(query) => OpResult::Range(overlay.range(query)?),
                    TxnOp::Put(put) => {
                        wrote = true;
                        OpResult::Put { prev: do_put(overlay, rev, put)? }
                    }
                    TxnOp::Delete(delete) => {
                        let (deleted, prev) = do_delete(overlay, delete)?;
                        wrote |= deleted > 0;
                        OpResult::Delete { deleted, prev }
                    }
                });
            }
            if wrote {
                *revision = rev;
            }
            Ok(CommandResult::Txn { revision: *revision, succeeded: holds, responses })
        }
    }
}

fn do_put(overlay: &mut Overlay<'_>, rev: Revision, put: &Put) -> Result<Option<KeyValue>, ReadError> {
    let prev = overlay.get(&put.key)?;
    let next = StoredValue {
        value: put.value.clone(),
        create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
        mod_revision: rev,
        version: prev.as_ref().map_or(1, |p| p.version + 1),
        lease: put.lease,
    };
    overlay.put(put.key.clone(), next);
    Ok(if put.prev_kv { prev.map(|p| p.to_key_value(&put.key, false)) } else { None })
}

fn do_delete(overlay: &mut Overlay<'_>, delete: &Delete) -> Result<(i64, Vec<KeyValue>), ReadError> {
    let doomed = overlay.collect(&delete.range)?;
    let deleted = doomed.len() as i64;
    let mut prev = Vec::new();
    for (key, value) in doomed {
        if delete.prev_kv {
            prev.push(value.to_key_value(&key, false));
        }
        overlay.delete(key);
    }
    Ok((deleted, prev))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> (sled::Db, sled::Tree) {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let t = db.open_tree("t").unwrap();
        (db, t)
    }

    fn put(key: &str, value: &str) -> Command {
        Command::Put(Put { key: key.into(), value: value.into(), lease: 0, prev_kv: true })
    }

    fn all(ov: &Overlay<'_>) -> Vec<(String, String)> {
        let mut out = Vec::new();
        ov.scan(&KeyRange { start: Vec::new(), end: RangeEnd::Unbounded }, |k, v| {
            out.push((String::from_utf8_lossy(k).into(), String::from_utf8_lossy(&v.value).into()));
            true
        })
        .unwrap();
        out
    }

    #[test]
    fn put_tracks_versions_and_revisions() {
        let (_db, t) = tree();
        let mut ov = Overlay::new(&t);
        let mut rev = 1;
        let r1 = apply_command(&mut ov, &mut rev, &put("a", "1")).unwrap();
        assert_eq!(r1, CommandResult::Put { revision: 2, prev: None });
        let r2 = apply_command(&mut ov, &mut rev, &put("a", "2")).unwrap();
        let CommandResult::Put { revision: 3, prev: Some(prev) } = r2 else { panic!("{r2:?}") };
        assert_eq!(
            (prev.value.as_slice(), prev.version, prev.create_revision, prev.mod_revision),
            (&b"1"[..], 1, 2, 2)
        );
        let now = ov.get(b"a").unwrap().unwrap();
        assert_eq!((now.version, now.create_revision, now.mod_revision), (2, 2, 3));
    }

    #[test]
    fn scan_merges_tree_and_overlay_in_order() {
        let (_db, t) = tree();
        for (k, v) in [("a", "tree"), ("c", "tree"), ("e", "tree")] {
            let sv = StoredValue { value: v.into(), ..Default::default() };
            t.insert(data_key(k.as_bytes()), codec::encode("v", &sv).unwrap()).unwrap();
        }
        let mut ov = Overlay::new(&t);
        let mut rev = 1;
        apply_command(&mut ov, &mut rev, &put("b", "over")).unwrap();
        apply_command(&mut ov, &mut rev, &put("c", "over")).unwrap();
        apply_command(
            &mut ov,
            &mut rev,
            &Command::Delete(Delete { range: KeyRange::single("e"), prev_kv: false }),
        )
        .unwrap();
        apply_command(&mut ov, &mut rev, &put("f", "over")).unwrap();
        let got = all(&ov);
        let want: Vec<(String, String)> = [("a", "tree"), ("b", "over"), ("c", "over"), ("f", "over")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn inverted_and_empty_ranges_hold_nothing() {
        let (_db, t) = tree();
        let mut ov = Overlay::new(&t);
        let mut rev = 1;
        apply_command(&mut ov, &mut rev, &put("b", "1")).unwrap();
        for range in [KeyRange::between("c", "a"), KeyRange::between("b", "b")] {
            let q =
                RangeQuery { range, limit: 10, max_bytes: usize::MAX, keys_only: false, count_only: false };
            assert_eq!(ov.range(&q).unwrap().count, 0);
        }
    }

    #[test]
    fn delete_of_nothing_does_not_advance_the_revision() {
        let (_db, t) = tree();
        let mut ov = Overlay::new(&t);
        let mut rev = 1;
        let r = apply_command(
            &mut ov,
            &mut rev,
            &Command::Delete(Delete { range: KeyRange::prefix("x"), prev_kv: true }),
        )
        .unwrap();
        assert_eq!(r, CommandResult::Delete { revision: 1, deleted: 0, prev: vec![] });
        assert_eq!(rev, 1);
    }

    #[test]
    fn range_pages_and_counts() {
        let (_db, t) = tree();
        let mut ov = Overlay::new(&t);
        let mut rev = 1;
        for i in 0..10 {
            apply_command(&mut ov, &mut rev, &put(&format!("k{i}"), "v")).unwrap();
        }
        let q = RangeQuery {
            range: KeyRange::prefix("k"),
            limit: 4,
            max_bytes: usize::MAX,
            keys_only: true,
            count_only: false,
        };
        let page = ov.range(&q).unwrap();
        assert_eq!(page.kvs.len(), 4);
        assert_eq!(page.count, 10);
        assert!(page.more);
        assert_eq!(page.next_key.as_deref(), Some(&b"k4"[..]));
        assert!(page.kvs.iter().all(|kv| kv.value.is_empty()));

        // A byte budget ends the page early, but never below one key.
        let q = RangeQuery {
            range: KeyRange::prefix("k"),
            limit: 10,
            max_bytes: 5,
            keys_only: false,
            count_only: false,
        };
        let page = ov.range(&q).unwrap();
        assert_eq!(page.kvs.len(), 1, "k0 + v is 3 bytes; k1 + v would make 6 > 5");
        assert_eq!((page.more, page.count), (true, 10));
        assert_eq!(page.next_key.as_deref(), Some(&b"k1"[..]));
        let q = RangeQuery { max_bytes: 0, ..q };
        assert_eq!(ov.range(&q).unwrap().kvs.len(), 1);
    }

    #[test]
    fn txn_compare_and_swap() {
        let (_db, t) = tree();
        let mut ov = Overlay::new(&t);
        let mut rev = 1;
        apply_command(&mut ov, &mut rev, &put("k", "old")).unwrap();
        let cas = |expect: &str, new: &str| {
            Command::Txn(Txn {
                compares: vec![Compare {
                    key: b"k".to_vec(),
                    op: CompareOp::Equal,
                    target: CompareTarget::Value(expect.into()),
                }],
                success: vec![TxnOp::Put(Put {
                    key: b"k".to_vec(),
                    value: new.into(),
                    lease: 0,
                    prev_kv: false,
                })],
                failure: vec![TxnOp::Range(RangeQuery {
                    range: KeyRange::single("k"),
                    limit: 1,
                    max_bytes: usize::MAX,
                    keys_only: false,
                    count_only: false,
                })],
            })
        };
        let ok = apply_command(&mut ov, &mut rev, &cas("old", "new")).unwrap();
        assert!(matches!(ok, CommandResult::Txn { revision: 3, succeeded: true, .. }), "{ok:?}");
        let failed = apply_command(&mut ov, &mut rev, &cas("old", "newer")).unwrap();
        let CommandResult::Txn { revision: 3, succeeded: false, responses } = failed else {
            panic!("{failed:?}")
        };
        let OpResult::Range(r) = &responses[0] else { panic!() };
        assert_eq!(r.kvs[0].value, b"new");
        assert_eq!(ov.get(b"k").unwrap().unwrap().value, b"new");
    }
}
