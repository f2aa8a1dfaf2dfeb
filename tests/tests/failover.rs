//! The election timeout against slow disks. The default is etcd's 1-2 s although these disks
//! stall for 1-2 s at times: with openraft 0.10 a member's fsync runs on the log's flusher
//! thread, off the Raft core, and heartbeats are sent by per-follower workers, so nothing a
//! member's election timer depends on waits behind a flush. This test stalls every member's
//! fsyncs for longer than the longest election timeout while clients write, and requires that
//! no member starts an election and that writes go on.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use kvset_server::node::NodeOptions;
use kvset_storage::WatchReceiver;
use kvset_tests::cluster::Cluster;

/// Stalls one fsync in every `every`, for `stall`, and counts the stalls.
struct PeriodicStall {
    every: Duration,
    stall: Duration,
    last: Mutex<Instant>,
    stalls: AtomicU64,
}

impl kvset_storage::DiskFault for PeriodicStall {
    fn flush_stall(&self) -> Duration {
        let mut last = self.last.lock().unwrap();
        if last.elapsed() < self.every {
            return Duration::ZERO;
        }
        *last = Instant::now() + self.stall;
        self.stalls.fetch_add(1, Ordering::Relaxed);
        self.stall
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fsync_stalls_longer_than_the_election_timeout_cause_no_election() {
    let mut c = Cluster::new(3, |_| {}).await;
    let config = c.config(0);
    // Longer than the longest election timeout.
    let stall = Duration::from_millis(config.raft.election_timeout_max_ms + 500);
    let faults: Vec<Arc<PeriodicStall>> = (0..3)
        .map(|o| {
            Arc::new(PeriodicStall {
                every: stall + Duration::from_millis(1000 + 300 * o),
                stall,
                // Members start their stall cycles at different moments.
                last: Mutex::new(Instant::now() + Duration::from_millis(500 * o)),
                stalls: AtomicU64::new(0),
            })
        })
        .collect();
    for o in 0..3 {
        let options = NodeOptions { disk_fault: Some(faults[o as usize].clone()), ..Default::default() };
        c.start_node_with(o, options).await;
    }
    let leader = c.wait_voters(3, Duration::from_secs(60)).await;
    let terms = |c: &Cluster| -> Vec<u64> {
        (0..3).map(|o| c.node(o).member().raft().metrics().borrow_watched().current_term).collect()
    };
    let before = terms(&c);

    // Writers for a while: every member stalls several times, each stall longer than the
    // election timeout.
    let acked = Arc::new(AtomicU64::new(0));
    let run_for = Duration::from_secs(15);
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (client, acked) = (c.client(), acked.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let mut i = 0u64;
                while started.elapsed() < run_for {
                    if client.put(format!("w{w}-{}", i % 50), format!("{i}")).await.is_ok() {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    i += 1;
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }

    let stalls: Vec<u64> = faults.iter().map(|f| f.stalls.load(Ordering::Relaxed)).collect();
    assert_eq!(
        terms(&c),
        before,
        "a member started an election during fsync stalls of {stall:?} ({stalls:?})"
    );
    assert!(stalls.iter().all(|s| *s >= 2), "every member's disk stalled several times: {stalls:?}");
    assert!(acked.load(Ordering::Relaxed) > 100, "writes went on: {}", acked.load(Ordering::Relaxed));
    assert_eq!(c.leader(), Some(leader), "leadership stayed where it was");
    c.shutdown().await;
}
