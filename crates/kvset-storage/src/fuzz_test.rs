//! Property tests of the storage decoders that see bytes from outside the process: Raft log
//! entries and commands (a peer's AppendEntries, a log written by another version), snapshot
//! files (received from a leader, restored from a backup) and volume metadata (whatever is on
//! the disk). On garbage each returns an error: no panic, no unbounded allocation, and nothing
//! is changed on disk.
//!
//! Each property runs `PROPTEST_CASES` cases (proptest's default, 256, in `cargo test`); the
//! longer mode is the same tests with more, e.g. `PROPTEST_CASES=100000 cargo test --workspace
//! --lib fuzz`.

use std::fs;

use proptest::prelude::*;

use crate::codec;
use crate::keys::Version;
use crate::snapshot;
use crate::snapshot::SnapshotHeader;
use crate::snapshot::SnapshotWriter;
use crate::types::Lease;
use crate::Batch;
use crate::Command;
use crate::Entry;
use crate::Put;
use crate::SnapshotMeta;
use crate::StoredValue;
use crate::Volume;
use crate::VolumeError;

/// A real log entry carrying a batch of commands, encoded as the log stores it.
fn encoded_entry(keys: &[Vec<u8>]) -> Vec<u8> {
    let commands = keys.iter().map(|k| Command::Put(Put::new(k.clone(), k.repeat(2)))).collect();
    let entry = <Entry as openraft::entry::RaftEntry>::new_normal(crate::log_id(3, 1, 9), Batch { commands });
    codec::encode("entry", &entry).expect("encode")
}

/// Decodes `bytes` as every stored or sent type; none may panic.
fn decode_all(bytes: &[u8]) {
    let _ = codec::decode::<Entry>("entry", bytes);
    let _ = codec::decode::<Batch>("batch", bytes);
    let _ = codec::decode::<Command>("command", bytes);
    let _ = codec::decode::<Version>("version", bytes);
    let _ = codec::decode::<StoredValue>("stored value", bytes);
    let _ = codec::decode::<Lease>("lease", bytes);
    let _ = codec::decode::<SnapshotHeader>("snapshot header", bytes);
    let _ = codec::decode::<crate::Vote>("vote", bytes);
    let _ = codec::decode::<crate::auth::AuthCommand>("auth command", bytes);
    let _ = codec::decode::<crate::auth::AuthState>("auth state", bytes);
    let _ = crate::keys::record::decode(bytes);
    let _ = crate::keys::parse_record_key(bytes);
}

/// Applies `edits` (position, byte) to a copy of `good`, and cuts it to `len` if shorter.
fn mutate(good: &[u8], edits: &[(usize, u8)], len: usize) -> Vec<u8> {
    let mut out = good.to_vec();
    for (at, byte) in edits {
        if !out.is_empty() {
            let i = at % out.len();
            out[i] = *byte;
        }
    }
    out.truncate(len);
    out
}

proptest! {
    #[test]
    fn garbage_decodes_to_errors_not_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_all(&bytes);
    }

    #[test]
    fn a_record_decodes_to_what_was_encoded_and_a_damaged_one_never_panics(
        key in proptest::collection::vec(any::<u8>(), 0..32),
        value in proptest::collection::vec(any::<u8>(), 0..64),
        create_revision in 0i64..i64::MAX,
        version in 0i64..i64::MAX,
        lease in any::<i64>(),
        deleted in any::<bool>(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
    ) {
        let v = Version { value, create_revision, version, lease, deleted };
        let good = crate::keys::record::encode(&key, &v);
        let r = crate::keys::record::decode(&good).expect("a record decodes");
        prop_assert_eq!((r.key, r.version()), (key.as_slice(), v));
        let bad = mutate(&good, &edits, cut % (good.len() + 1));
        let _ = crate::keys::record::decode(&bad);
    }

    #[test]
    fn damaged_log_entries_decode_to_errors_or_to_entries(
        keys in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..16), 1..8),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
    ) {
        let good = encoded_entry(&keys);
        let bad = mutate(&good, &edits, cut % (good.len() + 1));
        decode_all(&bad);
        // A decoded damaged entry is still a well-formed value: it encodes again.
        if let Ok(entry) = codec::decode::<Entry>("entry", &bad) {
            prop_assert!(codec::encode("entry", &entry).is_ok());
        }
    }

    #[test]
    fn damaged_snapshot_files_are_refused_and_never_panic(
        records in proptest::collection::vec((proptest::collection::vec(any::<u8>(), 0..24), proptest::collection::vec(any::<u8>(), 0..24)), 0..6),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        cut in any::<usize>(),
        fix_checksum in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.snap");
        let header = SnapshotHeader {
            meta: SnapshotMeta::default(),
            revision: 9,
            compact_revision: 2,
            replicas: Some(3),
            leases: vec![Lease { id: 7, ttl: 30, grant: 0, applied_at: None }],
            auth: crate::auth::AuthState::default(),
        };
        let mut w = SnapshotWriter::create(&path, &header).unwrap();
        for (k, v) in &records {
            w.record(k, v).unwrap();
        }
        w.finish().unwrap();
        let good = fs::read(&path).unwrap();
        let mut bad = mutate(&good, &edits, cut % (good.len() + 1));
        if fix_checksum && bad.len() >= 4 {
            // Past the checksum: only the structure decoder stands between the bytes and a
            // state machine.
            let n = bad.len() - 4;
            let crc = crc32fast::hash(&bad[..n]).to_le_bytes();
            bad[n..].copy_from_slice(&crc);
        }
        fs::write(&path, &bad).unwrap();
        match snapshot::inspect(&path) {
            Ok((h, count)) => {
                // Only a file that still says something coherent passes.
                prop_assert!(fix_checksum || bad == good, "a damaged file passed: {h:?}");
                prop_assert!(count <= records.len() as u64 + bad.len() as u64);
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn garbage_volume_metadata_is_refused_and_left_as_it_was(
        bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..256),
            // JSON shaped like the real file, with arbitrary values.
            (any::<i64>(), any::<i64>(), any::<i64>(), "[0-9a-f]{0,40}", any::<bool>()).prop_map(|(v, n, o, c, null)| {
                let cluster = if null { "null".to_string() } else { format!("\"{c}\"") };
                format!(r#"{{"format_version":{v},"node_id":{n},"ordinal":{o},"cluster_id":{cluster},"created_unix_ms":1}}"#).into_bytes()
            }),
        ],
    ) {
        let dir = tempfile::tempdir().unwrap();
        let meta = dir.path().join(crate::volume::META_FILE);
        fs::write(&meta, &bytes).unwrap();
        let before: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        match Volume::open(dir.path(), 0, None) {
            Ok(v) => {
                // Only a well-formed file for ordinal 0 opens, and it is read as written.
                prop_assert_eq!(v.meta().ordinal, 0);
                prop_assert!(v.node_id() != 0);
            }
            Err(e) => {
                prop_assert!(matches!(
                    e,
                    VolumeError::Corrupt { .. } | VolumeError::NewerFormat { .. } | VolumeError::OlderFormat { .. }
                        | VolumeError::OrdinalMismatch { .. } | VolumeError::Unrecognized { .. }
                ), "{e}");
                prop_assert_eq!(fs::read(&meta).unwrap(), bytes, "a refused file was rewritten");
                let after: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
                prop_assert_eq!(after, before, "a refused volume was changed");
            }
        }
    }
}
