use super::*;

fn tree() -> (sled::Db, Slot) {
    let db = sled::Config::new().temporary(true).open().unwrap();
    let t = db.open_tree("t").unwrap();
    (db, Slot::new(t, crate::index::Index::default()))
}

fn scalars() -> Scalars {
    Scalars { revision: 1, compact_revision: 0, replicas: None }
}

fn put(key: &str, value: &str) -> Command {
    Command::Put(Put { prev_kv: true, ..Put::new(key, value) })
}

fn put_leased(key: &str, value: &str, lease: LeaseId) -> Command {
    Command::Put(Put { lease, ..Put::new(key, value) })
}

fn del(range: KeyRange) -> Command {
    Command::Delete(Delete { range, prev_kv: true })
}

fn all(ov: &Overlay<'_>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    ov.scan(&KeyRange::all(), |k, v| {
        out.push((String::from_utf8_lossy(k).into(), String::from_utf8_lossy(&v.value).into()));
        true
    })
    .unwrap();
    out
}

fn query(range: KeyRange) -> RangeQuery {
    RangeQuery::new(range)
}

fn cmp(key: &str, op: CompareOp, target: CompareTarget) -> Compare {
    Compare { range: KeyRange::single(key), op, target }
}

#[test]
fn put_tracks_versions_revisions_history_and_events() {
    let (_db, t) = tree();
    let leases = BTreeMap::new();
    let mut ov = Overlay::new(&t, 1, &leases);
    let mut s = scalars();
    let r1 = apply_command(&mut ov, &mut s, &put("a", "1")).unwrap();
    assert_eq!(r1, CommandResult::Put { revision: 2, prev: None });
    let r2 = apply_command(&mut ov, &mut s, &put("a", "2")).unwrap();
    let CommandResult::Put { revision: 3, prev: Some(prev) } = r2 else { panic!("{r2:?}") };
    assert_eq!(
        (prev.value.as_slice(), prev.version, prev.create_revision, prev.mod_revision),
        (&b"1"[..], 1, 2, 2)
    );
    let now = ov.get(b"a").unwrap().unwrap();
    assert_eq!((now.version, now.create_revision, now.mod_revision), (2, 2, 3));
    assert_eq!(
        ov.records.iter().map(|(r, k, _)| (k.clone(), r.main, r.sub)).collect::<Vec<_>>(),
        vec![(b"a".to_vec(), 2, 0), (b"a".to_vec(), 3, 0)]
    );
    assert_eq!(ov.events.iter().map(|e| e.revision).collect::<Vec<_>>(), vec![2, 3]);
    let second = &ov.events[1].events[0];
    assert_eq!(second.kind, EventKind::Put);
    assert_eq!(second.prev.as_ref().map(|p| p.value.as_slice()), Some(&b"1"[..]));
}

#[test]
fn a_delete_writes_a_tombstone_and_a_recreate_starts_over() {
    let (_db, t) = tree();
    let leases = BTreeMap::new();
    let mut ov = Overlay::new(&t, 1, &leases);
    let mut s = scalars();
    apply_command(&mut ov, &mut s, &put("k", "1")).unwrap();
    apply_command(&mut ov, &mut s, &put("k", "2")).unwrap();
    let r = apply_command(&mut ov, &mut s, &del(KeyRange::single("k"))).unwrap();
    let CommandResult::Delete { revision: 4, deleted: 1, prev } = r else { panic!("{r:?}") };
    assert_eq!(prev[0].value, b"2");
    let tomb = &ov.records[2];
    assert!(tomb.2.deleted && tomb.0.main == 4);
    let event = &ov.events[2].events[0];
    assert_eq!(event.kind, EventKind::Delete);
    assert_eq!((event.kv.key.as_slice(), event.kv.mod_revision, event.kv.version), (&b"k"[..], 4, 0));
    apply_command(&mut ov, &mut s, &put("k", "3")).unwrap();
    let now = ov.get(b"k").unwrap().unwrap();
    assert_eq!((now.version, now.create_revision, now.mod_revision), (1, 5, 5), "a new life: version 1");
}

#[test]
fn scan_merges_tree_and_overlay_in_order() {
    let (_db, t) = tree();
    for (k, v) in [("a", "tree"), ("c", "tree"), ("e", "tree")] {
        let version = Version { value: v.into(), create_revision: 1, version: 1, ..Default::default() };
        let rev = Rev::new(1, t.index().keys() as u32);
        t.tree
            .insert(crate::keys::record_key(rev), crate::keys::record::encode(k.as_bytes(), &version))
            .unwrap();
        t.index_mut().push(k.as_bytes(), rev, false);
    }
    let leases = BTreeMap::new();
    let mut ov = Overlay::new(&t, 1, &leases);
    let mut s = scalars();
    apply_command(&mut ov, &mut s, &put("b", "over")).unwrap();
    apply_command(&mut ov, &mut s, &put("c", "over")).unwrap();
    apply_command(&mut ov, &mut s, &del(KeyRange::single("e"))).unwrap();
    apply_command(&mut ov, &mut s, &put("f", "over")).unwrap();
    let want: Vec<(String, String)> = [("a", "tree"), ("b", "over"), ("c", "over"), ("f", "over")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(all(&ov), want);
}

#[test]
fn deleting_nothing_does_not_advance_the_revision() {
    let (_db, t) = tree();
    let leases = BTreeMap::new();
    let mut ov = Overlay::new(&t, 1, &leases);
    let mut s = scalars();
    let r = apply_command(&mut ov, &mut s, &del(KeyRange::prefix("x"))).unwrap();
    assert_eq!(r, CommandResult::Delete { revision: 1, deleted: 0, prev: vec![] });
    assert_eq!(s.revision, 1);
    assert!(ov.events.is_empty() && ov.records.is_empty());
}

#[test]
fn range_pages_counts_sorts_and_filters() {
    let (_db, t) = tree();
    let leases = BTreeMap::new();
    let mut ov = Overlay::new(&t, 1, &leases);
    let mut s = scalars();
    for i in 0..10 {
        apply_command(&mut ov, &mut s, &put(&format!("k{i}"), &format!("{}", 9 - i))).unwrap();
    }
    let q = RangeQuery { limit: 4, keys_only: true, ..query(KeyRange::prefix("k")) };
    let page = ov.range_current(&q).unwrap();
    assert_eq!((page.kvs.len(), page.count, page.more), (4, 10, true));
    assert_eq!(page.next_key.as_deref(), Some(&b"k4"[..]));
    assert!(page.kvs.iter().all(|kv| kv.value.is_empty()));

    // A byte budget ends the page early, but never below one key.
    let q = RangeQuery { limit: 10, max_bytes: 5, ..query(KeyRange::prefix("k")) };
    let page = ov.range_current(&q).unwrap();
    assert_eq!(page.kvs.len(), 1, "k0 + 9 is 3 bytes; k1 + 8 would make 6 > 5");
    assert_eq!((page.more, page.count), (true, 10));
    let q = RangeQuery { max_bytes: 0, ..q };
    assert_eq!(ov.range_current(&q).unwrap().kvs.len(), 1);

    // count_only counts and returns no keys.
    let q = RangeQuery { count_only: true, ..query(KeyRange::prefix("k")) };
    let page = ov.range_current(&q).unwrap();
    assert_eq!((page.count, page.kvs.len(), page.more), (10, 0, false));

    // Sort by value descending, limit 3: the largest values, `more` set, count unchanged.
    let q = RangeQuery {
        limit: 3,
        sort: Some((SortTarget::Value, SortOrder::Descend)),
        ..query(KeyRange::prefix("k"))
    };
    let page = ov.range_current(&q).unwrap();
    let values: Vec<&[u8]> = page.kvs.iter().map(|kv| kv.value.as_slice()).collect();
    assert_eq!(values, vec![&b"9"[..], b"8", b"7"]);
    assert_eq!((page.count, page.more, page.next_key), (10, true, None));

    // Filters on mod revision (k3..k5 were written at revisions 5..7); count ignores filters.
    let q = RangeQuery { min_mod_revision: 5, max_mod_revision: 7, ..query(KeyRange::prefix("k")) };
    let page = ov.range_current(&q).unwrap();
    let keys: Vec<&[u8]> = page.kvs.iter().map(|kv| kv.key.as_slice()).collect();
    assert_eq!(keys, vec![&b"k3"[..], b"k4", b"k5"]);
    assert_eq!(page.count, 10);
}

#[test]
fn inverted_and_empty_ranges_hold_nothing() {
    let (_db, t) = tree();
    let leases = BTreeMap::new();
    let mut ov = Overlay::new(&t, 1, &leases);
    let mut s = scalars();
    apply_command(&mut ov, &mut s, &put("b", "1")).unwrap();
    for range in [KeyRange::between("c", "a"), KeyRange::between("b", "b")] {
        assert_eq!(ov.range_current(&query(range)).unwrap().count, 0);
    }
}

fn cas(expect: &str, new: &str) -> Command {
    Command::Txn(Txn {
        compares: vec![cmp("k", CompareOp::Equal, CompareTarget::Value(expect.into()))],
        success: vec![TxnOp::Put(Put::new("k", new))],
        failure: vec![TxnOp::Range(query(KeyRange::single("k")))],
    })
}

#[test]
fn txn_compare_and_swap() {
    let (_db, t) = tree();
    let leases = BTreeMap::new();
    let mut ov = Overlay::new(&t, 1, &leases);
    let mut s = scalars();
    apply_command(&mut ov, &mut s, &put("k", "old")).unwrap();
    let ok = apply_command(&mut ov, &mut s, &cas("old", "new")).unwrap();
    assert!(matches!(ok, CommandResult::Txn { revision: 3, succeeded: true, .. }), "{ok:?}");
    let failed = apply_command(&mut ov, &mut s, &cas("old", "newer")).unwrap();
    let CommandResult::Txn { revision: 3, succeeded: false, responses } = failed else {
        panic!("{failed:?}")
    };
    let OpResult::Range(r) = &responses[0] else { panic!() };
    assert_eq!(r.kvs[0].value, b"new");
}

#[test]
fn a_txn_is_one_revision_its_ranges_see_its_writes_and_nested_compares_see_the_state_before() {
    let (_db, t) = tree();
    let leases = BTreeMap::new();
    let mut ov = Overlay::new(&t, 1, &leases);
    let mut s = scalars();
    let txn = Command::Txn(Txn {
        compares: vec![cmp("missing", CompareOp::Equal, CompareTarget::Version(0))],
        success: vec![
            TxnOp::Put(Put::new("a", "1")),
            TxnOp::Put(Put::new("b", "2")),
            TxnOp::Range(query(KeyRange::prefix(""))),
            // "a" did not exist before the txn, so this nested compare fails even though the
            // txn wrote "a" just above (etcd chooses every branch first).
            TxnOp::Txn(Txn {
                compares: vec![cmp("a", CompareOp::Equal, CompareTarget::Version(1))],
                success: vec![TxnOp::Put(Put::new("c", "nested-success"))],
                failure: vec![TxnOp::Put(Put::new("c", "nested-failure"))],
            }),
        ],
        failure: vec![],
    });
    let r = apply_command(&mut ov, &mut s, &txn).unwrap();
    let CommandResult::Txn { revision: 2, succeeded: true, responses } = r else { panic!("{r:?}") };
    let OpResult::Range(seen) = &responses[2] else { panic!() };
    assert_eq!(seen.count, 2, "the range saw the txn's own writes");
    let OpResult::Txn { succeeded: false, .. } = &responses[3] else { panic!("{:?}", responses[3]) };
    assert_eq!(ov.get(b"c").unwrap().unwrap().value, b"nested-failure");
    assert_eq!(ov.events.len(), 1, "one revision");
    let subs: Vec<u32> = ov.records.iter().map(|h| h.0.sub).collect();
    assert_eq!(subs, vec![0, 1, 2], "sub-revisions in op order");
    assert!(ov.records.iter().all(|h| h.0.main == 2));
}

#[test]
fn compares_over_a_range_need_every_key_and_an_empty_range_is_one_absent_key() {
    let (_db, t) = tree();
    let leases = BTreeMap::new();
    let mut ov = Overlay::new(&t, 1, &leases);
    let mut s = scalars();
    apply_command(&mut ov, &mut s, &put("p/a", "x")).unwrap();
    apply_command(&mut ov, &mut s, &put("p/b", "y")).unwrap();
    let over = |op, target| Compare { range: KeyRange::prefix("p/"), op, target };
    assert!(compare_holds(&ov, &over(CompareOp::Greater, CompareTarget::CreateRevision(1))).unwrap());
    assert!(!compare_holds(&ov, &over(CompareOp::Equal, CompareTarget::Value(b"x".to_vec()))).unwrap());
    let none =
        Compare { range: KeyRange::prefix("q/"), op: CompareOp::Equal, target: CompareTarget::Version(0) };
    assert!(compare_holds(&ov, &none).unwrap());
}

#[test]
fn an_unknown_lease_or_a_missing_key_for_ignore_value_is_refused_and_changes_nothing() {
    let (_db, t) = tree();
    let leases = BTreeMap::new();
    let mut ov = Overlay::new(&t, 1, &leases);
    let mut s = scalars();
    let r = apply_command(&mut ov, &mut s, &put_leased("k", "v", 99)).unwrap();
    assert_eq!(r, CommandResult::Rejected { revision: 1, error: ApplyError::LeaseNotFound(99) });
    let ignore = Command::Put(Put { ignore_value: true, value: Vec::new(), ..Put::new("k", "") });
    let r = apply_command(&mut ov, &mut s, &ignore).unwrap();
    assert_eq!(r, CommandResult::Rejected { revision: 1, error: ApplyError::KeyNotFound });
    // In a txn, the whole txn is refused before any op runs.
    let txn = Command::Txn(Txn {
        compares: vec![],
        success: vec![TxnOp::Put(Put::new("a", "1")), TxnOp::Put(Put { lease: 5, ..Put::new("b", "2") })],
        failure: vec![],
    });
    let r = apply_command(&mut ov, &mut s, &txn).unwrap();
    assert_eq!(r, CommandResult::Rejected { revision: 1, error: ApplyError::LeaseNotFound(5) });
    assert!(all(&ov).is_empty() && ov.records.is_empty() && ov.events.is_empty());
    assert_eq!(s.revision, 1);
}

#[test]
fn ignore_value_and_ignore_lease_keep_what_the_key_had() {
    let (_db, t) = tree();
    let leases = BTreeMap::new();
    let mut ov = Overlay::new(&t, 1, &leases);
    let mut s = scalars();
    apply_command(&mut ov, &mut s, &Command::LeaseGrant { id: 7, ttl: 10 }).unwrap();
    apply_command(&mut ov, &mut s, &put_leased("k", "value", 7)).unwrap();
    let keep_value = Command::Put(Put { ignore_value: true, ..Put::new("k", "") });
    apply_command(&mut ov, &mut s, &keep_value).unwrap();
    let now = ov.get(b"k").unwrap().unwrap();
    assert_eq!(
        (now.value.as_slice(), now.lease, now.version),
        (&b"value"[..], 0, 2),
        "lease dropped, value kept"
    );
    apply_command(&mut ov, &mut s, &put_leased("k", "v2", 7)).unwrap();
    let keep_lease = Command::Put(Put { ignore_lease: true, ..Put::new("k", "v3") });
    apply_command(&mut ov, &mut s, &keep_lease).unwrap();
    let now = ov.get(b"k").unwrap().unwrap();
    assert_eq!((now.value.as_slice(), now.lease), (&b"v3"[..], 7));
}

#[test]
fn a_lease_revoke_deletes_every_attached_key_at_one_revision() {
    let (_db, t) = tree();
    let leases = BTreeMap::new();
    let mut ov = Overlay::new(&t, 1, &leases);
    let mut s = scalars();
    let r = apply_command(&mut ov, &mut s, &Command::LeaseGrant { id: 7, ttl: 10 }).unwrap();
    assert_eq!(
        r,
        CommandResult::LeaseGrant { revision: 1, id: 7, ttl: 10 },
        "a grant does not change the revision"
    );
    let again = apply_command(&mut ov, &mut s, &Command::LeaseGrant { id: 7, ttl: 10 }).unwrap();
    assert_eq!(again, CommandResult::Rejected { revision: 1, error: ApplyError::LeaseExists(7) });
    apply_command(&mut ov, &mut s, &put_leased("b", "1", 7)).unwrap();
    apply_command(&mut ov, &mut s, &put_leased("a", "1", 7)).unwrap();
    apply_command(&mut ov, &mut s, &put("c", "unleased")).unwrap();
    // Re-putting "b" without a lease detaches it.
    apply_command(&mut ov, &mut s, &put("b", "2")).unwrap();
    let r = apply_command(&mut ov, &mut s, &Command::LeaseRevoke(7)).unwrap();
    assert_eq!(r, CommandResult::LeaseRevoke { revision: 6, deleted: 1 });
    let keys: Vec<String> = all(&ov).into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, vec!["b", "c"]);
    let unknown = apply_command(&mut ov, &mut s, &Command::LeaseRevoke(7)).unwrap();
    assert_eq!(unknown, CommandResult::Rejected { revision: 6, error: ApplyError::LeaseNotFound(7) });
}

#[test]
fn compaction_refuses_the_past_and_the_future() {
    let (_db, t) = tree();
    let leases = BTreeMap::new();
    let mut ov = Overlay::new(&t, 1, &leases);
    let mut s = scalars();
    for i in 0..5 {
        apply_command(&mut ov, &mut s, &put("k", &i.to_string())).unwrap();
    }
    assert_eq!(s.revision, 6);
    let future = apply_command(&mut ov, &mut s, &Command::Compact(7)).unwrap();
    assert_eq!(
        future,
        CommandResult::Rejected {
            revision: 6,
            error: ApplyError::FutureRevision { requested: 7, current: 6 }
        }
    );
    assert_eq!(
        apply_command(&mut ov, &mut s, &Command::Compact(4)).unwrap(),
        CommandResult::Compact { revision: 6 }
    );
    assert_eq!(s.compact_revision, 4);
    let past = apply_command(&mut ov, &mut s, &Command::Compact(4)).unwrap();
    assert_eq!(
        past,
        CommandResult::Rejected {
            revision: 6,
            error: ApplyError::Compacted { requested: 4, compact_revision: 4 }
        }
    );
}

/// Found by the random differential (etcd 3.4 crashes on it): a transaction that deletes a key
/// and then puts it keeping its value or lease passed the check against the state before the
/// transaction and then created the key with an empty value. It is refused as a put on a
/// missing key, and nothing changes.
#[test]
fn a_put_keeping_the_value_of_a_key_the_same_transaction_deleted_is_refused() {
    let (_db, t) = tree();
    let leases = BTreeMap::new();
    let mut ov = Overlay::new(&t, 1, &leases);
    let mut s = scalars();
    apply_command(&mut ov, &mut s, &put("k", "v")).unwrap();
    let keep = |ignore_value, ignore_lease| {
        TxnOp::Put(Put { ignore_value, ignore_lease, ..Put::new("k", if ignore_value { "" } else { "x" }) })
    };
    for (ignore_value, ignore_lease) in [(true, false), (false, true)] {
        for delete in [KeyRange::single("k"), KeyRange { start: b"a".to_vec(), end: RangeEnd::Unbounded }] {
            let nested =
                Txn { compares: vec![], success: vec![keep(ignore_value, ignore_lease)], failure: vec![] };
            for success in [
                vec![
                    TxnOp::Delete(Delete { range: delete.clone(), prev_kv: false }),
                    keep(ignore_value, ignore_lease),
                ],
                vec![TxnOp::Delete(Delete { range: delete.clone(), prev_kv: false }), TxnOp::Txn(nested)],
            ] {
                let txn = Command::Txn(Txn { compares: vec![], success, failure: vec![] });
                let before = all(&ov);
                let r = apply_command(&mut ov, &mut s, &txn).unwrap();
                assert_eq!(r, CommandResult::Rejected { revision: 2, error: ApplyError::KeyNotFound });
                assert_eq!(all(&ov), before, "nothing changed");
            }
        }
    }
    // Put first, then delete: fine (nothing is kept from a deleted key).
    let txn = Command::Txn(Txn {
        compares: vec![],
        success: vec![
            keep(true, false),
            TxnOp::Delete(Delete { range: KeyRange::single("k"), prev_kv: false }),
        ],
        failure: vec![],
    });
    assert!(matches!(apply_command(&mut ov, &mut s, &txn).unwrap(), CommandResult::Txn { revision: 3, .. }));
}
