//! What the in-memory key index costs: memory per key and per retained version, and how long
//! its rebuild takes at open, for a million keys. Measured, not estimated: the volumes are
//! written through Raft, then each is opened in a fresh process (this test run again as a
//! child, so that no memory freed by the writing is reused) with a 1 MiB sled cache, and the
//! growth of the child's resident set across `Store::open` is reported: the index, plus that
//! cache, sled's own per-page structures and allocator slack.
//!
//! The README's figures come from
//! `cargo test --release -p kvset-storage --test index_cost -- --ignored --nocapture`
//! (`KVSET_INDEX_KEYS` changes the number of keys).

mod common;

use std::path::Path;
use std::process::Command as Process;
use std::time::Instant;

use kvset_storage::Batch;
use kvset_storage::Command;
use kvset_storage::Put;
use kvset_storage::Store;
use kvset_storage::StoreOptions;

/// Resident set of this process, in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).expect("resident pages");
    pages * 4096
}

const VALUE_BYTES: usize = 100;
const PER_ENTRY: usize = 1_000;

/// Writes `keys` keys (`key/0000000000`…, 14 B) `versions` times each through a one-member Raft.
async fn write(dir: &Path, keys: usize, versions: usize) {
    let (raft, _reader) = common::start_single(dir, u64::MAX / 2).await;
    let value = vec![b'v'; VALUE_BYTES];
    for _ in 0..versions {
        for chunk in (0..keys).collect::<Vec<_>>().chunks(PER_ENTRY) {
            let commands =
                chunk.iter().map(|i| Command::Put(Put::new(format!("key/{i:010}"), value.clone()))).collect();
            raft.client_write(Batch { commands }).await.expect("write");
        }
    }
    raft.shutdown().await.expect("shutdown");
}

/// In the child: opens the store in `dir` and prints its RSS growth, time, keys and versions.
fn open_and_report(dir: &Path) {
    let before = rss();
    let started = Instant::now();
    let store =
        Store::open_dir(dir, StoreOptions { cache_bytes: 1 << 20, ..StoreOptions::default() }).expect("open");
    let took = started.elapsed().as_secs_f64();
    let grew = rss() - before;
    let (keys, versions) = store.reader.index_size();
    println!("OPENED {grew} {took} {keys} {versions}");
    store.reader.close().expect("close");
}

/// In the child: reads every record of the state machine with sled alone (what sled itself
/// keeps in memory after such a scan: the part of the open that is not the index) and prints
/// its RSS growth.
fn scan_and_report(dir: &Path) {
    let before = rss();
    let db = sled::Config::new().path(dir.join("db")).cache_capacity(1 << 20).open().expect("sled");
    let slot = match db.open_tree("sm_slot").expect("slot").get("active").expect("slot") {
        Some(v) if v.as_ref() == [1] => "sm1",
        _ => "sm0",
    };
    let records = db.open_tree(slot).expect("tree").iter().count();
    println!("SCANNED {} 0 {records} 0", rss() - before);
}

/// Runs this test again in a fresh process with `mode` set to `dir`; returns the four numbers it
/// printed after `tag`.
fn child(mode: &str, tag: &str, dir: &Path) -> (u64, f64, usize, usize) {
    let out = Process::new(std::env::current_exe().expect("exe"))
        .args([
            "--ignored",
            "--exact",
            "--nocapture",
            "index_memory_per_key_and_per_version_and_rebuild_time",
        ])
        .env(mode, dir)
        .output()
        .expect("child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line =
        stdout.lines().find_map(|l| l.strip_prefix(tag)).unwrap_or_else(|| panic!("child said {stdout}"));
    let f: Vec<&str> = line.split_whitespace().collect();
    (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].parse().unwrap(), f[3].parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run it in release, see the module docs"]
async fn index_memory_per_key_and_per_version_and_rebuild_time() {
    if let Some(dir) = std::env::var_os("KVSET_INDEX_OPEN") {
        return open_and_report(Path::new(&dir));
    }
    if let Some(dir) = std::env::var_os("KVSET_INDEX_SCAN") {
        return scan_and_report(Path::new(&dir));
    }
    let keys: usize =
        std::env::var("KVSET_INDEX_KEYS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let one = tempfile::tempdir().expect("tempdir");
    let two = tempfile::tempdir().expect("tempdir");
    write(one.path(), keys, 1).await;
    write(two.path(), keys, 2).await;
    let (grew1, took1, keys1, versions1) = child("KVSET_INDEX_OPEN", "OPENED ", one.path());
    let (grew2, took2, keys2, versions2) = child("KVSET_INDEX_OPEN", "OPENED ", two.path());
    assert_eq!((keys1, versions1, keys2, versions2), (keys, keys, keys, 2 * keys));
    let sled1 = child("KVSET_INDEX_SCAN", "SCANNED ", one.path()).0;
    let sled2 = child("KVSET_INDEX_SCAN", "SCANNED ", two.path()).0;
    let index1 = grew1 as f64 - sled1 as f64;
    let index2 = grew2 as f64 - sled2 as f64;
    let mib = |b: f64| b / 1048576.0;
    println!(
        "index: {keys} keys of 14 B. One version each: RSS +{:.1} MiB at open, rebuilt in {took1:.2} s; a sled-only \
         scan of the same records +{:.1} MiB; the index {:.1} MiB = {:.0} B per key. Two versions each: +{:.1} MiB \
         at open, rebuilt in {took2:.2} s; sled-only +{:.1} MiB; the index {:.1} MiB = {:.0} B per extra retained \
         version",
        mib(grew1 as f64),
        mib(sled1 as f64),
        mib(index1),
        index1 / keys as f64,
        mib(grew2 as f64),
        mib(sled2 as f64),
        mib(index2),
        (index2 - index1) / keys as f64,
    );
}
