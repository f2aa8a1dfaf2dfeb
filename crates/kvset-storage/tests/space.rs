//! Disk space: bytes on disk per logical byte written, after N writes and after the log was
//! purged behind a snapshot. Prints the figures (run with `--nocapture`) quoted in the README,
//! and fails if the amplification is far beyond what was measured when they were written.

mod common;

use std::time::Duration;

use kvset_storage::dir_size;

const WRITES: usize = 20_000;
const KEY_BYTES: usize = 16;
const VALUE_BYTES: usize = 256;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_on_disk_per_logical_byte() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (raft, reader) = common::start_single(dir.path(), u64::MAX).await;
    let value = vec![b'x'; VALUE_BYTES];

    // 8 concurrent writers proposing batches of 25 puts, the way the server's write batcher
    // packs a loaded member's writes into Raft entries.
    let mut tasks = Vec::new();
    for w in 0..8 {
        let raft = raft.clone();
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            let mine: Vec<usize> = (w..WRITES).step_by(8).collect();
            for chunk in mine.chunks(25) {
                let mut batch = kvset_storage::Batch::default();
                for i in chunk {
                    let key = format!("key-{i:012}");
                    assert_eq!(key.len(), KEY_BYTES);
                    batch.commands.extend(common::put(&key, &value).commands);
                }
                raft.client_write(batch).await.expect("write");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    let logical = (WRITES * (KEY_BYTES + VALUE_BYTES)) as f64;
    let after_writes = dir_size(dir.path()) as f64;

    raft.trigger().snapshot().await.expect("trigger snapshot");
    let applied = reader.applied().last_applied.map(|l| l.index).expect("applied");
    raft.wait(Some(Duration::from_secs(60)))
        .snapshot(reader.applied().last_applied.expect("applied"), "snapshot built")
        .await
        .expect("snapshot");
    raft.trigger().purge_log(applied).await.expect("purge");
    raft.wait(Some(Duration::from_secs(60)))
        .purged(reader.applied().last_applied, "log purged")
        .await
        .expect("purged");
    raft.shutdown().await.expect("shutdown");
    let after_purge = dir_size(dir.path()) as f64;
    let snapshots = dir_size(&dir.path().join("snapshots")) as f64;

    println!(
        "disk space: {WRITES} puts of {KEY_BYTES} B keys + {VALUE_BYTES} B values = {:.1} MiB logical; \
         on disk after writes {:.1} MiB ({:.1}x), after snapshot + log purge {:.1} MiB ({:.1}x, of which \
         the snapshot file {:.1} MiB)",
        logical / 1048576.0,
        after_writes / 1048576.0,
        after_writes / logical,
        after_purge / 1048576.0,
        after_purge / logical,
        snapshots / 1048576.0,
    );
    // sled keeps its segments and never shrinks; what matters is that it stays bounded.
    assert!(after_writes / logical < 40.0, "space amplification exploded: {:.1}x", after_writes / logical);
}
