//! The key spaces of a state machine tree, each under a one-byte prefix.
//!
//! | prefix | key | value |
//! |---|---|---|
//! | `0x00` | metadata name | last applied, membership, revision, compact revision, … |
//! | `0x01` | user key | the key's current record ([`crate::StoredValue`]); live keys only |
//! | `0x02` | escaped user key, revision (8 B), sub-revision (4 B) | one version of the key ([`Version`]), tombstones included |
//! | `0x03` | revision (8 B), sub-revision (4 B) | the user key changed there (the change log, in revision order) |
//! | `0x04` | lease id (8 B) | the lease ([`crate::Lease`]) |
//! | `0x05` | lease id (8 B), user key | empty: the key is attached to the lease |
//!
//! Numbers are big-endian so sled's byte order is numeric order. User keys inside history keys
//! are escaped (`0x00` → `0x00 0xff`) and terminated by `0x00 0x00`, which keeps the order of
//! user keys and puts every version of one key together, oldest first: a key and another key
//! it is a prefix of never interleave.

use serde::Deserialize;
use serde::Serialize;

use crate::types::KeyRange;
use crate::types::KeyValue;
use crate::types::LeaseId;
use crate::types::RangeEnd;
use crate::types::Revision;

pub(crate) const META: u8 = 0x00;
pub(crate) const LIVE: u8 = 0x01;
pub(crate) const HISTORY: u8 = 0x02;
pub(crate) const CHANGES: u8 = 0x03;
pub(crate) const LEASE: u8 = 0x04;
pub(crate) const LEASE_KEY: u8 = 0x05;

/// One version of a key, as the history keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Version {
    pub value: Vec<u8>,
    pub create_revision: Revision,
    pub version: i64,
    pub lease: LeaseId,
    /// A tombstone: the key was deleted at this revision.
    pub deleted: bool,
}

impl Version {
    /// The client view of this version of `key` at `revision`; `None` for a tombstone.
    pub fn to_key_value(&self, key: &[u8], revision: Revision, keys_only: bool) -> Option<KeyValue> {
        (!self.deleted).then(|| KeyValue {
            key: key.to_vec(),
            value: if keys_only { Vec::new() } else { self.value.clone() },
            create_revision: self.create_revision,
            mod_revision: revision,
            version: self.version,
            lease: self.lease,
        })
    }
}

/// `0x01` + key.
pub(crate) fn live(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(LIVE);
    k.extend_from_slice(key);
    k
}

/// Appends `key` escaped and terminated (see the module docs).
fn escape_into(key: &[u8], out: &mut Vec<u8>) {
    for &b in key {
        out.push(b);
        if b == 0 {
            out.push(0xff);
        }
    }
    out.extend_from_slice(&[0, 0]);
}

/// `0x02` + escaped key: the prefix of every version of `key`.
pub(crate) fn history_prefix(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 16);
    k.push(HISTORY);
    escape_into(key, &mut k);
    k
}

/// The history key of `key` at (`revision`, `sub`).
pub(crate) fn history(key: &[u8], revision: Revision, sub: u32) -> Vec<u8> {
    let mut k = history_prefix(key);
    k.extend_from_slice(&(revision as u64).to_be_bytes());
    k.extend_from_slice(&sub.to_be_bytes());
    k
}

/// Splits a history key (with its prefix byte) into user key, revision and sub-revision.
pub(crate) fn parse_history(bytes: &[u8]) -> Option<(Vec<u8>, Revision, u32)> {
    let body = bytes.strip_prefix(&[HISTORY])?;
    let (escaped, tail) = body.split_at(body.len().checked_sub(12)?);
    let revision = u64::from_be_bytes(tail[..8].try_into().ok()?) as Revision;
    let sub = u32::from_be_bytes(tail[8..].try_into().ok()?);
    let escaped = escaped.strip_suffix(&[0, 0])?;
    let mut key = Vec::with_capacity(escaped.len());
    let mut i = 0;
    while i < escaped.len() {
        key.push(escaped[i]);
        if escaped[i] == 0 {
            if escaped.get(i + 1) != Some(&0xff) {
                return None;
            }
            i += 1;
        }
        i += 1;
    }
    Some((key, revision, sub))
}

/// The bounds of the history keys of every key in `range`.
pub(crate) fn history_bounds(range: &KeyRange) -> (Vec<u8>, Vec<u8>) {
    let start = history_prefix(&range.start);
    let end = match &range.end {
        RangeEnd::Single => {
            let mut e = start.clone();
            e.extend_from_slice(&[0xff; 12]);
            e.push(0xff);
            e
        }
        RangeEnd::Unbounded => vec![HISTORY + 1],
        RangeEnd::Before(end) => history_prefix(end),
    };
    (start, end)
}

/// `0x03` + revision + sub: the change log key.
pub(crate) fn change(revision: Revision, sub: u32) -> [u8; 13] {
    let mut k = [0u8; 13];
    k[0] = CHANGES;
    k[1..9].copy_from_slice(&(revision as u64).to_be_bytes());
    k[9..].copy_from_slice(&sub.to_be_bytes());
    k
}

/// Splits a change log key into revision and sub-revision.
pub(crate) fn parse_change(bytes: &[u8]) -> Option<(Revision, u32)> {
    if bytes.len() != 13 || bytes[0] != CHANGES {
        return None;
    }
    let revision = u64::from_be_bytes(bytes[1..9].try_into().ok()?) as Revision;
    let sub = u32::from_be_bytes(bytes[9..].try_into().ok()?);
    Some((revision, sub))
}

/// `0x04` + lease id.
pub(crate) fn lease(id: LeaseId) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = LEASE;
    k[1..].copy_from_slice(&(id as u64).to_be_bytes());
    k
}

/// `0x05` + lease id: the prefix of the keys attached to a lease.
pub(crate) fn lease_keys_prefix(id: LeaseId) -> [u8; 9] {
    let mut k = lease(id);
    k[0] = LEASE_KEY;
    k
}

/// `0x05` + lease id + key: `key` is attached to lease `id`.
pub(crate) fn lease_key(id: LeaseId, key: &[u8]) -> Vec<u8> {
    let mut k = lease_keys_prefix(id).to_vec();
    k.extend_from_slice(key);
    k
}

/// `0x00` + name: a metadata key.
pub(crate) fn meta(name: &str) -> Vec<u8> {
    let mut k = vec![META];
    k.extend_from_slice(name.as_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_keys_round_trip_and_keep_key_then_revision_order() {
        let keys: Vec<&[u8]> =
            vec![b"", b"\x00", b"\x00\x00", b"\x00\x01", b"a", b"a\x00", b"a\x00b", b"ab", b"\xff"];
        let mut encoded = Vec::new();
        for k in &keys {
            for rev in [1i64, 2, 300, i64::MAX] {
                for sub in [0u32, 7] {
                    let e = history(k, rev, sub);
                    assert_eq!(parse_history(&e), Some((k.to_vec(), rev, sub)));
                    encoded.push((e, (k.to_vec(), rev, sub)));
                }
            }
        }
        let mut by_bytes = encoded.clone();
        by_bytes.sort_by(|a, b| a.0.cmp(&b.0));
        let mut by_meaning = encoded;
        by_meaning.sort_by(|a, b| a.1.cmp(&b.1));
        assert_eq!(by_bytes, by_meaning, "byte order is (key, revision, sub) order");
    }

    #[test]
    fn history_bounds_hold_exactly_the_keys_of_the_range() {
        let inside = |range: &KeyRange, key: &[u8]| {
            let (lo, hi) = history_bounds(range);
            let h = history(key, 5, 0);
            h >= lo && h < hi
        };
        let keys: Vec<&[u8]> = vec![b"a", b"a\x00", b"ab", b"b", b"b\x00"];
        for range in
            [KeyRange::single("a"), KeyRange::prefix("a"), KeyRange::between("a\x00", "b"), KeyRange::all()]
        {
            for k in &keys {
                assert_eq!(inside(&range, k), range.contains(k), "{range:?} {k:?}");
            }
        }
    }

    #[test]
    fn garbage_history_and_change_keys_are_rejected() {
        assert_eq!(parse_history(b"\x02abc"), None);
        assert_eq!(parse_history(&[HISTORY, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), None);
        assert_eq!(parse_change(b"\x03short"), None);
        assert_eq!(parse_change(&change(9, 3)), Some((9, 3)));
    }
}
