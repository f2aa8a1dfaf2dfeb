//! What the in-memory key index costs: heap per key and per retained version, and how long its
//! rebuild takes at open, for a million keys. Measured, not estimated: this test binary counts
//! every heap allocation, and the store is opened on a volume written through Raft beforehand.
//! The sled cache is set to 1 MiB for the measurement, so the growth of the heap across
//! `Store::open` is the index (plus that cache, the Raft log's metadata and allocator slack).
//!
//! The README's figures come from
//! `cargo test --release -p kvset-storage --test index_cost -- --ignored --nocapture`
//! (`KVSET_INDEX_KEYS` changes the number of keys).

mod common;

use std::alloc::GlobalAlloc;
use std::alloc::Layout;
use std::alloc::System;
use std::path::Path;
use std::sync::atomic::AtomicIsize;
use std::sync::atomic::Ordering;
use std::time::Instant;

use kvset_storage::Batch;
use kvset_storage::Command;
use kvset_storage::Put;
use kvset_storage::Store;
use kvset_storage::StoreOptions;

/// Bytes allocated and not freed, over the whole process.
static LIVE: AtomicIsize = AtomicIsize::new(0);

struct Counting;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

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

/// Opens the store in `dir`: heap growth, time, keys and versions in the index.
fn open(dir: &Path) -> (isize, f64, usize, usize) {
    let before = LIVE.load(Ordering::Relaxed);
    let started = Instant::now();
    let store =
        Store::open_dir(dir, StoreOptions { cache_bytes: 1 << 20, ..StoreOptions::default() }).expect("open");
    let took = started.elapsed().as_secs_f64();
    let grew = LIVE.load(Ordering::Relaxed) - before;
    let (keys, versions) = store.reader.index_size();
    store.state_machine.close().expect("close");
    (grew, took, keys, versions)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run it in release, see the module docs"]
async fn index_memory_per_key_and_per_version_and_rebuild_time() {
    let keys: usize =
        std::env::var("KVSET_INDEX_KEYS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let one = tempfile::tempdir().expect("tempdir");
    let two = tempfile::tempdir().expect("tempdir");
    write(one.path(), keys, 1).await;
    write(two.path(), keys, 2).await;
    let (grew1, took1, keys1, versions1) = open(one.path());
    let (grew2, took2, keys2, versions2) = open(two.path());
    assert_eq!((keys1, versions1, keys2, versions2), (keys, keys, keys, 2 * keys));
    let per_key = grew1 as f64 / keys as f64;
    let per_version = (grew2 - grew1) as f64 / keys as f64;
    println!(
        "index: {keys} keys of 14 B, one version each: heap +{:.1} MiB at open ({per_key:.0} B per key), rebuilt \
         in {took1:.2} s; two versions each: +{:.1} MiB ({per_version:.0} B per extra retained version), rebuilt in \
         {took2:.2} s",
        grew1 as f64 / 1048576.0,
        grew2 as f64 / 1048576.0,
    );
}
