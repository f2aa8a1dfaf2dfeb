//! The key spaces of a state machine tree, each under a one-byte prefix, and the encoding of a
//! revision record.
//!
//! | prefix | key | value |
//! |---|---|---|
//! | `0x00` | metadata name | the applied state, access control, the layout version |
//! | `0x04` | lease id (8 B) | the lease ([`crate::Lease`]) |
//! | `0x06` | revision (8 B), sub-revision (4 B) | one change of one key: a [`record`] |
//!
//! This is etcd's shape: the history is one record per change, keyed by revision, appended in
//! revision order; the keys are found through the in-memory [`crate::index`], rebuilt from the
//! records at open. One put is one record. Numbers are big-endian so sled's byte order is
//! numeric order.
//!
//! The layout before it (volume format 2) is in [`legacy`]: it is read once, to upgrade a volume
//! in place, and in snapshot files of format 3.

use serde::Deserialize;
use serde::Serialize;

use crate::index::Rev;
use crate::types::KeyValue;
use crate::types::LeaseId;
use crate::types::Revision;

pub(crate) const META: u8 = 0x00;
pub(crate) const LEASE: u8 = 0x04;
pub(crate) const RECORD: u8 = 0x06;

/// One version of a key: what a record holds besides the key.
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

    /// The client view, taking the value.
    pub fn into_key_value(self, key: Vec<u8>, revision: Revision) -> Option<KeyValue> {
        (!self.deleted).then_some(KeyValue {
            key,
            value: self.value,
            create_revision: self.create_revision,
            mod_revision: revision,
            version: self.version,
            lease: self.lease,
        })
    }
}

/// `0x06` + revision + sub: the key of the record of one change.
pub(crate) fn record_key(rev: Rev) -> [u8; 13] {
    let mut k = [0u8; 13];
    k[0] = RECORD;
    k[1..9].copy_from_slice(&(rev.main as u64).to_be_bytes());
    k[9..].copy_from_slice(&rev.sub.to_be_bytes());
    k
}

/// The revision and sub-revision a record key names.
pub(crate) fn parse_record_key(bytes: &[u8]) -> Option<Rev> {
    if bytes.len() != 13 || bytes[0] != RECORD {
        return None;
    }
    let main = u64::from_be_bytes(bytes[1..9].try_into().ok()?) as Revision;
    let sub = u32::from_be_bytes(bytes[9..].try_into().ok()?);
    Some(Rev::new(main, sub))
}

/// `0x04` + lease id.
pub(crate) fn lease(id: LeaseId) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = LEASE;
    k[1..].copy_from_slice(&(id as u64).to_be_bytes());
    k
}

/// `0x00` + name: a metadata key.
pub(crate) fn meta(name: &str) -> Vec<u8> {
    let mut k = vec![META];
    k.extend_from_slice(name.as_bytes());
    k
}

/// The record of one change of one key:
///
/// ```text
/// u8       flags: 1 = tombstone, 2 = a lease follows
/// varint   create revision        (0 for a tombstone)
/// varint   version                (0 for a tombstone)
/// u64 BE   lease                  (only with flag 2)
/// varint   key length, key bytes
/// the value: every remaining byte
/// ```
///
/// The mod revision is the record's own key. Decoding borrows (see [`RecordRef`]), so the index
/// rebuild at open reads a key and two flags without copying the value.
pub(crate) mod record {
    use super::Version;
    use crate::types::LeaseId;
    use crate::types::Revision;

    const TOMBSTONE: u8 = 1;
    const LEASED: u8 = 2;

    /// A decoded record over the bytes it was read from.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) struct RecordRef<'a> {
        pub key: &'a [u8],
        pub value: &'a [u8],
        pub create_revision: Revision,
        pub version: i64,
        pub lease: LeaseId,
        pub deleted: bool,
    }

    impl RecordRef<'_> {
        pub(crate) fn version(&self) -> Version {
            Version {
                value: self.value.to_vec(),
                create_revision: self.create_revision,
                version: self.version,
                lease: self.lease,
                deleted: self.deleted,
            }
        }
    }

    fn put_varint(out: &mut Vec<u8>, mut n: u64) {
        while n >= 0x80 {
            out.push((n as u8) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
    }

    fn take_varint(bytes: &mut &[u8]) -> Option<u64> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = bytes.split_first()?;
            *bytes = rest;
            n |= u64::from(b & 0x7f).checked_shl(shift)?;
            if b & 0x80 == 0 {
                return Some(n);
            }
        }
        None
    }

    /// Encodes the record of `key` at `version`.
    pub(crate) fn encode(key: &[u8], version: &Version) -> Vec<u8> {
        let mut out = Vec::with_capacity(key.len() + version.value.len() + 16);
        let flags = if version.deleted { TOMBSTONE } else { 0 } | if version.lease != 0 { LEASED } else { 0 };
        out.push(flags);
        put_varint(&mut out, version.create_revision as u64);
        put_varint(&mut out, version.version as u64);
        if version.lease != 0 {
            out.extend_from_slice(&(version.lease as u64).to_be_bytes());
        }
        put_varint(&mut out, key.len() as u64);
        out.extend_from_slice(key);
        out.extend_from_slice(&version.value);
        out
    }

    /// Decodes a record; `None` if the bytes are not one.
    pub(crate) fn decode(bytes: &[u8]) -> Option<RecordRef<'_>> {
        let (&flags, mut rest) = bytes.split_first()?;
        if flags & !(TOMBSTONE | LEASED) != 0 {
            return None;
        }
        let create_revision = Revision::try_from(take_varint(&mut rest)?).ok()?;
        let version = i64::try_from(take_varint(&mut rest)?).ok()?;
        let lease = if flags & LEASED != 0 {
            let (l, r) = rest.split_first_chunk::<8>()?;
            rest = r;
            u64::from_be_bytes(*l) as LeaseId
        } else {
            0
        };
        let klen = usize::try_from(take_varint(&mut rest)?).ok()?;
        if klen > rest.len() {
            return None;
        }
        let (key, value) = rest.split_at(klen);
        Some(RecordRef { key, value, create_revision, version, lease, deleted: flags & TOMBSTONE != 0 })
    }
}

/// The layout of volume format 2 (kvset 0.2): live records, a history keyed by user key, and a
/// change log, each its own key space. Only read: to upgrade a volume (see the state machine's
/// open) and to read snapshot files of format 3.
pub(crate) mod legacy {
    use crate::types::Revision;

    // `0x01` held the live records, `0x03` the change log and `0x05` the lease attachments:
    // all three are derived from the history, which is all an upgrade reads.
    pub(crate) const HISTORY: u8 = 0x02;

    /// Splits a history key (escaped user key, `0x00 0x00`, revision, sub-revision; `with_prefix`
    /// when it starts with the `0x02` prefix byte) into user key, revision and sub-revision.
    pub(crate) fn parse_history(bytes: &[u8], with_prefix: bool) -> Option<(Vec<u8>, Revision, u32)> {
        let body = if with_prefix { bytes.strip_prefix(&[HISTORY])? } else { bytes };
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

    /// The history key of `key` at (`revision`, `sub`), with its prefix byte (tests write
    /// format 3 snapshot files with it).
    #[cfg(test)]
    pub(crate) fn history(key: &[u8], revision: Revision, sub: u32) -> Vec<u8> {
        let mut k = vec![HISTORY];
        for &b in key {
            k.push(b);
            if b == 0 {
                k.push(0xff);
            }
        }
        k.extend_from_slice(&[0, 0]);
        k.extend_from_slice(&(revision as u64).to_be_bytes());
        k.extend_from_slice(&sub.to_be_bytes());
        k
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_keys_round_trip_and_sort_in_revision_order() {
        let revs = [Rev::new(1, 0), Rev::new(1, 7), Rev::new(2, 0), Rev::new(300, 1), Rev::new(i64::MAX, 0)];
        for w in revs.windows(2) {
            assert!(record_key(w[0]) < record_key(w[1]));
        }
        for r in revs {
            assert_eq!(parse_record_key(&record_key(r)), Some(r));
        }
        assert_eq!(parse_record_key(b"\x06short"), None);
    }

    #[test]
    fn records_round_trip_with_and_without_lease_and_as_tombstones() {
        let cases = [
            (
                b"k".to_vec(),
                Version { value: b"v".to_vec(), create_revision: 2, version: 1, lease: 0, deleted: false },
            ),
            (
                b"".to_vec(),
                Version {
                    value: vec![0; 300],
                    create_revision: 1 << 40,
                    version: 9,
                    lease: i64::MAX,
                    deleted: false,
                },
            ),
            (b"a\x00b".to_vec(), Version { deleted: true, ..Default::default() }),
        ];
        for (key, version) in cases {
            let bytes = record::encode(&key, &version);
            let r = record::decode(&bytes).expect("decodes");
            assert_eq!((r.key, r.version()), (key.as_slice(), version));
        }
    }

    #[test]
    fn garbage_is_not_a_record() {
        assert_eq!(record::decode(b""), None);
        assert_eq!(record::decode(&[4]), None, "unknown flag");
        assert_eq!(record::decode(&[0, 1, 1, 5, b'a']), None, "key longer than the record");
        assert_eq!(record::decode(&[2, 1, 1, 0]), None, "lease cut short");
        assert_eq!(
            record::decode(&[0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]),
            None
        );
    }

    #[test]
    fn legacy_history_keys_parse() {
        let k = legacy::history(b"a\x00b", 9, 3);
        assert_eq!(legacy::parse_history(&k, true), Some((b"a\x00b".to_vec(), 9, 3)));
        assert_eq!(legacy::parse_history(&k[1..], false), Some((b"a\x00b".to_vec(), 9, 3)));
        assert_eq!(legacy::parse_history(b"\x02abc", true), None);
    }
}
