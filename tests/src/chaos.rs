//! Chaos scenarios, written once against [`Harness`]: a 3-member cluster, a recorded workload,
//! one kind of fault, healing, and then the checks:
//!
//! * the history is linearizable per key (porcupine; an `Unknown` verdict fails),
//! * no acknowledged write was lost (final reads after healing),
//! * every member converged to the same applied index and the same state digest,
//! * there is still exactly one cluster,
//! * the watchers that ran through the faults saw what etcd's watch guarantees promise
//!   ([`crate::watch_check`]), and every member serves the same event history,
//! * a key on a lease kept alive through the faults never disappeared,
//! * clients taking a lease-based lock through the faults never held it at once, lost no
//!   increment of the counter they guard, and never had a kept-alive lease answered TTL 0
//!   ([`crate::lock_check`]).
//!
//! [`run`] does the common part; the faults ([`kill_follower`], [`kill_leader`], …) are plain
//! async functions over any harness. `tests/chaos.rs` runs every scenario on the Docker
//! StatefulSet emulator; `tests/scenarios.rs` runs leader kill, follower restart and scaling
//! in-process too.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::time::Duration;
use std::time::Instant;

use porcupine_rs::CheckResult;
use rand::rngs::StdRng;
use rand::Rng;
use tracing::info;

use crate::harness;
use crate::harness::Harness;
use crate::history;
use crate::history::History;
use crate::history::Kind;
use crate::history::Workload;
use crate::linearizability;
use crate::linearizability::Figures;
use crate::lock_check;
use crate::lock_check::LockWorkload;
use crate::poll_until;
use crate::watch_check;
use crate::watch_check::WatchRecorder;

/// Watchers recording through every scenario.
pub const WATCHERS: u32 = 2;
/// The key attached to the lease kept alive through every scenario (inside the watched prefix).
pub const KEPT_KEY: &str = "k-lease-kept";

/// Workload clients.
pub const CLIENTS: u32 = 6;
/// Clients taking the lease-based lock through every scenario (`crate::lock_check`).
pub const LOCK_CLIENTS: u32 = 3;
/// How long the workload runs before the fault and after healing (the workload's duration,
/// not a synchronisation point: every wait on the cluster polls a condition).
pub const STEADY: Duration = Duration::from_secs(4);

/// The seed of a run: `KVSET_CHAOS_SEED` to replay one, else random.
pub fn seed() -> u64 {
    std::env::var("KVSET_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random)
}

/// Waits until the workload has acknowledged `n` more writes.
pub async fn writes_flow(h: &History, n: usize, timeout: Duration) -> Result<(), String> {
    let count = || h.ops().iter().filter(|o| o.kind.is_write() && !o.indeterminate()).count();
    let target = count() + n;
    poll_until(&format!("{n} more acknowledged writes"), timeout, || async {
        (count() >= target).then_some(())
    })
    .await
}

/// Runs one scenario on `h`: start 3 members, run the workload, inject `fault`, heal, check.
pub async fn run<H, F>(
    name: &str,
    seed: u64,
    h: &mut H,
    rng: &mut StdRng,
    fault: F,
) -> Result<Figures, String>
where
    H: Harness,
    F: AsyncFnOnce(&mut H, &History, &mut StdRng) -> Result<(), String>,
{
    info!("--- {name} ({}): start 3 members", h.kind());
    h.start_all(3).await?;
    harness::wait_voters(h, 3, Duration::from_secs(90)).await?;
    let kept = KeptLease::start(h).await?;
    let lock_ttl = Duration::from_secs(h.member_config().lease.min_ttl_seconds.max(1));
    let locks = LockWorkload::start(h.endpoints(), LOCK_CLIENTS, lock_ttl, seed);
    let watchers = WatchRecorder::start(h.endpoints(), WATCHERS);
    let workload = Workload::start(h.endpoints(), CLIENTS, seed, History::new());
    let hist = workload.history.clone();
    writes_flow(&hist, 20, Duration::from_secs(30)).await?;
    tokio::time::sleep(STEADY).await;
    let fault_start = hist.now();
    info!("--- {name}: fault");
    fault(h, &hist, rng).await?;
    info!("--- {name}: healed; writes must flow again");
    harness::wait_voters(h, h.replicas() as usize, Duration::from_secs(120)).await?;
    writes_flow(&hist, 20, Duration::from_secs(60)).await?;
    let fault_end = hist.now();
    tokio::time::sleep(STEADY).await;
    let history = workload.stop().await;
    let watched = watchers.stop().await;
    let renewals = kept.stop().await?;
    let locked = locks.stop().await;

    info!("--- {name}: final reads, convergence, checks");
    history::final_reads(&h.endpoints(), &history, Duration::from_secs(60)).await?;
    harness::wait_converged(h, Duration::from_secs(60)).await?;
    let final_revision = harness::statuses(h, false).await.values().map(|s| s.revision).max().unwrap_or(0);
    let mut reference: Option<Vec<watch_check::Ev>> = None;
    let endpoints: Vec<String> =
        h.endpoints().read().unwrap_or_else(|e| e.into_inner()).client.values().cloned().collect();
    for endpoint in &endpoints {
        let channel = h
            .endpoints()
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .channel(endpoint, Duration::from_secs(5))?;
        let events =
            watch_check::reference(endpoint, channel, final_revision, Duration::from_secs(60)).await?;
        match &reference {
            Some(r) if *r != events => {
                return Err(format!("{endpoint} serves another event history than the first member"));
            }
            Some(_) => {}
            None => reference = Some(events),
        }
    }
    let reference = reference.unwrap_or_default();
    if let Some(gone) = reference.iter().find(|e| e.key == KEPT_KEY && e.value.is_none()) {
        return Err(format!(
            "the key of the lease kept alive was deleted at revision {} ({renewals} renewals)",
            gone.revision
        ));
    }
    let ops = history.ops();
    let finals: BTreeMap<String, Option<String>> = ops
        .iter()
        .filter(|o| o.client == u32::MAX)
        .filter_map(|o| match &o.kind {
            Kind::Get { result } => Some((o.key.clone(), result.clone())),
            _ => None,
        })
        .collect();
    let lost = linearizability::lost_writes(&ops, &finals);
    let (verdict, info) = linearizability::check(&ops, Duration::from_secs(120));
    let watch_figures = watch_check::check(&watched, &reference, &ops).map_err(|problems| {
        let path = linearizability::artifact_dir().join(format!("{name}-{}-watch.json", h.kind()));
        let _ = std::fs::write(&path, serde_json::to_vec_pretty(&(&watched, &reference)).unwrap_or_default());
        format!(
            "watch guarantees broken ({} problems; records in {}):\n{}",
            problems.len(),
            path.display(),
            problems.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
        )
    })?;
    info!("--- {name}: watch checks passed: {watch_figures:?}, {renewals} lease renewals");
    let counter = harness::client(h, Duration::from_secs(10))
        .get(lock_check::COUNTER)
        .await
        .map_err(|e| format!("reading the lock counter: {e}"))?
        .map_or(0, |kv| String::from_utf8_lossy(&kv.value).parse::<i64>().unwrap_or(-1));
    let lock_figures = lock_check::check(&locked, counter).map_err(|problems| {
        format!("mutual exclusion broken ({} problems):\n{}", problems.len(), problems.join("\n"))
    })?;
    info!("--- {name}: lock checks passed: {lock_figures:?}");
    let figures = Figures {
        scenario: name.to_string(),
        seed,
        attempted: history.attempted.load(std::sync::atomic::Ordering::Relaxed),
        recorded: ops.len(),
        acknowledged: ops.iter().filter(|o| !o.indeterminate()).count(),
        indeterminate: ops.iter().filter(|o| o.indeterminate()).count(),
        writes_lost: lost.len(),
        linearizable: format!("{verdict:?}"),
        longest_write_gap_ms: linearizability::longest_write_gap(&ops, fault_start, fault_end),
        watch_events_delivered: watch_figures.delivered_events,
        watch_reconnects: watch_figures.reconnects,
        lease_renewals: renewals,
        lock_holds: lock_figures.holds,
        lock_increments: lock_figures.increments,
    };
    let dir = linearizability::artifact_dir();
    let _ = std::fs::write(
        dir.join(format!("{name}-{}-figures.json", h.kind())),
        serde_json::to_vec_pretty(&figures).unwrap_or_default(),
    );
    if verdict != CheckResult::Ok || !lost.is_empty() {
        let (json, html) = linearizability::save_artifacts(name, seed, &ops, &info);
        return Err(format!(
            "verdict {verdict:?}, {} writes lost {:?}; history {} and visualisation {}",
            lost.len(),
            lost.iter().take(5).collect::<Vec<_>>(),
            json.display(),
            html.display()
        ));
    }
    Ok(figures)
}

/// kill -9 a member, then reschedule it with its volume (a new IP in Docker), as the
/// StatefulSet controller does when a node dies.
pub async fn kill_and_reschedule<H: Harness>(h: &mut H, ordinal: u32) -> Result<(), String> {
    info!("--- kill -9 kvset-{ordinal} and reschedule it");
    h.kill(&[ordinal]).await?;
    h.start(ordinal).await
}

/// (a) kill -9 a follower and reschedule it.
pub async fn kill_follower<H: Harness>(h: &mut H, _: &History, _: &mut StdRng) -> Result<(), String> {
    let f = harness::follower(h).await?;
    kill_and_reschedule(h, f).await
}

/// (b) kill -9 the leader and reschedule it.
pub async fn kill_leader<H: Harness>(h: &mut H, _: &History, _: &mut StdRng) -> Result<(), String> {
    let l = harness::leader(h, Duration::from_secs(60)).await?;
    kill_and_reschedule(h, l).await
}

/// (c) a rolling restart in reverse ordinal order (SIGTERM with the manifest's grace period).
pub async fn rolling_restart<H: Harness>(h: &mut H, _: &History, _: &mut StdRng) -> Result<(), String> {
    for o in (0..h.replicas()).rev() {
        info!("--- rolling restart: kvset-{o}");
        h.stop(o).await?;
        h.start(o).await?;
    }
    Ok(())
}

/// (d) cut the leader off from both followers; the majority goes on; heal.
pub async fn partition_leader<H: Harness>(h: &mut H, hist: &History, _: &mut StdRng) -> Result<(), String> {
    let l = harness::leader(h, Duration::from_secs(60)).await?;
    info!("--- cut kvset-{l} (the leader) off its peers");
    h.partition(l).await?;
    // The majority elects a new leader and takes writes while the old one is cut off.
    writes_flow(hist, 20, Duration::from_secs(60)).await?;
    info!("--- heal");
    h.heal(l).await
}

/// (e) scale 3→5→3.
pub async fn scale_3_5_3<H: Harness>(h: &mut H, hist: &History, _: &mut StdRng) -> Result<(), String> {
    info!("--- kubectl scale --replicas=5");
    h.scale(5).await?;
    harness::wait_voters(h, 5, Duration::from_secs(120)).await?;
    writes_flow(hist, 20, Duration::from_secs(60)).await?;
    info!("--- kubectl scale --replicas=3");
    h.scale(3).await?;
    harness::wait_voters(h, 3, Duration::from_secs(120)).await
}

/// (f) a follower loses its pod and its volume: it must come back as a new member that
/// replaces the old one, in the same cluster.
pub async fn volume_loss<H: Harness>(h: &mut H, _: &History, _: &mut StdRng) -> Result<(), String> {
    let f = harness::follower(h).await?;
    let before = harness::statuses(h, false).await;
    let old_id = before.get(&f).map(|s| s.node_id).ok_or("no status")?;
    let cluster = before.get(&f).map(|s| s.cluster_id.clone()).ok_or("no status")?;
    info!("--- kvset-{f} loses its pod and its volume");
    h.kill(&[f]).await?;
    h.wipe(f).await?;
    h.start(f).await?;
    harness::wait_voters(h, 3, Duration::from_secs(120)).await?;
    let after = harness::statuses(h, false).await;
    let new = after.get(&f).ok_or("no status")?;
    if new.node_id == old_id {
        return Err("an empty volume came back with the old node id".into());
    }
    if after.values().any(|s| s.cluster_id != cluster) {
        return Err(format!("a second cluster appeared: {after:?}"));
    }
    let members =
        harness::client(h, Duration::from_secs(5)).member_list().await.map_err(|e| e.to_string())?;
    if members.members.iter().any(|m| m.node_id == old_id) {
        return Err("the old node id is still a member".into());
    }
    Ok(())
}

/// Environment variable of the `force_new_cluster` key.
const FORCE_NEW_CLUSTER: &str = "KVSET_FORCE_NEW_CLUSTER";
/// Environment variable of the `force_new_cluster_bump_revision` key.
const FORCE_NEW_CLUSTER_BUMP: &str = "KVSET_FORCE_NEW_CLUSTER_BUMP_REVISION";

/// (j) quorum loss: every pod dies at once and two of the three volumes are gone for good. The
/// operator names the survivor in `force_new_cluster` (one env var on the StatefulSet, seen by
/// every pod): it becomes a cluster of one with its data, and the other ordinals, started with
/// empty volumes, join it with no member command. The survivor is the old leader, which had
/// applied every acknowledged write, so the workload's checks (no acknowledged write lost,
/// linearizable, watch histories) hold across the recovery. Leaving the setting in place and
/// restarting the survivor must not split the cluster again.
pub async fn quorum_loss<H: Harness>(h: &mut H, _: &History, _: &mut StdRng) -> Result<(), String> {
    let survivor = harness::leader(h, Duration::from_secs(30)).await?;
    let old_cluster =
        harness::statuses(h, false).await.get(&survivor).map(|s| s.cluster_id.clone()).ok_or("no status")?;
    let all = h.running();
    let lost: Vec<u32> = all.iter().copied().filter(|o| *o != survivor).collect();
    info!("--- every pod dies; the volumes of {lost:?} are gone for good; kvset-{survivor} survives");
    // The two whose volumes are lost die first, then the leader, once its log is on its disk.
    // A leader writes its log while it replicates it (its fsync runs beside the followers'), so
    // at any instant the followers may have made durable, and committed, an entry that is not
    // yet on the leader's disk: a recovery from the leader alone would lose it (as from etcd's),
    // and the watchers that saw it would see its revision reused. Without followers the leader
    // commits nothing more, and its log is on disk once it stops growing.
    h.kill(&lost).await?;
    let last = std::sync::Mutex::new(None);
    poll_until(&format!("kvset-{survivor}'s log to stop growing"), Duration::from_secs(30), || async {
        let now = harness::statuses(h, false).await.get(&survivor).map(|s| s.last_log_index);
        let previous = std::mem::replace(&mut *last.lock().unwrap_or_else(|e| e.into_inner()), now);
        (now.is_some() && now == previous).then_some(())
    })
    .await?;
    h.kill(&[survivor]).await?;
    for o in &lost {
        h.wipe(*o).await?;
    }
    let name = format!("kvset-{survivor}");
    h.set_env(FORCE_NEW_CLUSTER, Some(&name));
    // The survivor here is the old leader, which applied every acknowledged write, and the
    // watch check compares every watcher with the whole event history from revision 1: the
    // recovery keeps the revisions (by default it bumps them and compacts everything below,
    // which `recovery.rs` tests).
    h.set_env(FORCE_NEW_CLUSTER_BUMP, Some("0"));
    h.start(survivor).await?;
    for o in &lost {
        h.start(*o).await?;
    }
    harness::wait_voters(h, 3, Duration::from_secs(120)).await?;
    let after = harness::statuses(h, false).await;
    let clusters: BTreeSet<&String> = after.values().map(|s| &s.cluster_id).collect();
    if clusters.len() != 1 || clusters.contains(&old_cluster) {
        return Err(format!("after recovery the members report clusters {clusters:?} (old: {old_cluster})"));
    }
    let new_cluster = (*clusters.iter().next().ok_or("no member answered")?).clone();
    info!("--- recovered as cluster {new_cluster}; restart kvset-{survivor} with the setting still in place");
    h.stop(survivor).await?;
    h.start(survivor).await?;
    harness::wait_voters(h, 3, Duration::from_secs(120)).await?;
    let again = harness::statuses(h, false).await;
    if again.values().any(|s| s.cluster_id != new_cluster) {
        return Err(format!(
            "a second forced cluster appeared after a restart with the setting left in place: {again:?}"
        ));
    }
    h.set_env(FORCE_NEW_CLUSTER, None);
    h.set_env(FORCE_NEW_CLUSTER_BUMP, None);
    Ok(())
}

/// (g) kill -9 every member at the same instant, then start them all.
pub async fn full_restart<H: Harness>(h: &mut H, _: &History, _: &mut StdRng) -> Result<(), String> {
    info!("--- kill -9 every member at the same instant, then start them all (Parallel)");
    let all = h.running();
    h.kill(&all).await?;
    let n = h.replicas();
    h.start_all(n).await
}

/// (h) a random mix of the faults above for 60 s, chosen by the seeded `rng`.
pub async fn random_mix<H: Harness>(h: &mut H, hist: &History, rng: &mut StdRng) -> Result<(), String> {
    let until = Instant::now() + Duration::from_secs(60);
    let mut step = 0;
    while Instant::now() < until {
        step += 1;
        let action = rng.gen_range(0..5);
        info!("--- random mix step {step}: action {action}");
        match action {
            0 => {
                let f = harness::follower(h).await?;
                kill_and_reschedule(h, f).await?;
            }
            1 => {
                let l = harness::leader(h, Duration::from_secs(60)).await?;
                kill_and_reschedule(h, l).await?;
            }
            2 => {
                let l = harness::leader(h, Duration::from_secs(60)).await?;
                h.partition(l).await?;
                writes_flow(hist, 10, Duration::from_secs(60)).await?;
                h.heal(l).await?;
            }
            3 => {
                let o = rng.gen_range(0..h.replicas());
                h.stop(o).await?;
                h.start(o).await?;
            }
            _ => {
                let f = harness::follower(h).await?;
                h.partition(f).await?;
                writes_flow(hist, 10, Duration::from_secs(60)).await?;
                h.heal(f).await?;
            }
        }
        harness::wait_voters(h, h.replicas() as usize, Duration::from_secs(120)).await?;
        writes_flow(hist, 10, Duration::from_secs(60)).await?;
    }
    Ok(())
}

/// A lease kept alive through a scenario, renewed every second over the current endpoints
/// (like the workload, it follows rescheduled members to their new addresses), with one key on
/// it.
struct KeptLease {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Result<u64, String>>,
}

impl KeptLease {
    async fn start<H: Harness>(h: &H) -> Result<Self, String> {
        let client = harness::client(h, Duration::from_secs(10));
        let ttl = h.member_config().lease.min_ttl_seconds as i64;
        let lease = client.lease_grant(ttl, 0).await.map_err(|e| format!("lease grant: {e}"))?;
        client
            .put_request(kvset_client::pb::PutRequest {
                key: KEPT_KEY.into(),
                value: b"kept".to_vec(),
                lease: lease.id,
                prev_kv: false,
            })
            .await
            .map_err(|e| format!("put on the kept lease: {e}"))?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (endpoints, flag) = (h.endpoints(), stop.clone());
        let task = tokio::spawn(async move {
            let mut renewals = 0u64;
            let mut version = u64::MAX;
            let mut client = None;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let (now, list, options) = {
                    let e = endpoints.read().unwrap_or_else(|e| e.into_inner());
                    (
                        e.version,
                        e.client.values().cloned().collect::<Vec<_>>(),
                        e.options(Duration::from_secs(2), true),
                    )
                };
                if now != version {
                    version = now;
                    client = kvset_client::Client::new(list, options).ok();
                }
                if let Some(c) = &client {
                    match c.lease_renew(lease.id).await {
                        Ok(0) => {
                            return Err(format!(
                                "the kept lease {} expired after {renewals} renewals",
                                lease.id
                            ))
                        }
                        Ok(_) => renewals += 1,
                        Err(e) => tracing::debug!(error = %e, "kept lease: renewal failed; retrying"),
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Ok(renewals)
        });
        Ok(Self { stop, task })
    }

    async fn stop(self) -> Result<u64, String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.map_err(|e| e.to_string())?
    }
}

/// The lease scenario: the kept lease (of every scenario) lives through a leader kill, a leader
/// partition and a rolling restart; then, with no fault, a lease whose client stops renewing
/// must expire no earlier than its TTL and within TTL + one election timeout + 1 s after its
/// last renewal, its key gone on every member.
pub async fn leases<H: Harness>(h: &mut H, hist: &History, rng: &mut StdRng) -> Result<(), String> {
    kill_leader(h, hist, rng).await?;
    harness::wait_voters(h, h.replicas() as usize, Duration::from_secs(120)).await?;
    partition_leader(h, hist, rng).await?;
    harness::wait_voters(h, h.replicas() as usize, Duration::from_secs(120)).await?;
    rolling_restart(h, hist, rng).await?;
    harness::wait_voters(h, h.replicas() as usize, Duration::from_secs(120)).await?;

    info!("--- a lease whose client stops renewing expires on time");
    let config = h.member_config();
    let ttl = config.lease.min_ttl_seconds as i64;
    let client = harness::client(h, Duration::from_secs(10));
    let lease = client.lease_grant(ttl, 0).await.map_err(|e| format!("lease grant: {e}"))?;
    let key = "k-lease-abandoned";
    client
        .put_request(kvset_client::pb::PutRequest {
            key: key.into(),
            value: b"v".to_vec(),
            lease: lease.id,
            prev_kv: false,
        })
        .await
        .map_err(|e| format!("put on the abandoned lease: {e}"))?;
    // Never early: the leader renewed it at most a round trip before the renewal's answer, and
    // the poll can only see the key gone later than it went.
    let earliest = Duration::from_secs(ttl as u64) - Duration::from_millis(500);
    let mut last_renewal = Instant::now();
    for i in 0..3 {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let started = Instant::now();
        let remaining = client.lease_renew(lease.id).await.map_err(|e| format!("renewal: {e}"))?;
        if remaining <= 0 {
            // The lease ended before this renewal reached the leader (renewals can take
            // seconds while a leader is elected): it must not have ended before its TTL ran
            // out since the last renewal that did reach it.
            let took = last_renewal.elapsed();
            info!(
                "--- renewal {i} found the lease gone {took:?} after the last renewal (it took {:?})",
                started.elapsed()
            );
            if took < earliest {
                return Err(format!(
                    "the abandoned lease expired less than {took:?} after its last renewal, before its TTL of {ttl}s"
                ));
            }
            break;
        }
        last_renewal = Instant::now();
    }
    let bound = Duration::from_secs(ttl as u64)
        + Duration::from_millis(config.raft.election_timeout_max_ms)
        + Duration::from_secs(1);
    let (endpoints, options): (Vec<String>, _) = {
        let e = h.endpoints();
        let e = e.read().unwrap_or_else(|e| e.into_inner());
        (e.client.values().cloned().collect(), e.options(Duration::from_secs(10), false))
    };
    poll_until(
        &format!("{key} gone on every member within {bound:?}"),
        bound + Duration::from_secs(30),
        || async {
            for e in &endpoints {
                let member = kvset_client::Client::new([e.clone()], options.clone()).ok()?;
                crate::member_get(&member, key).await.ok()?.is_none().then_some(())?;
            }
            Some(())
        },
    )
    .await?;
    let took = last_renewal.elapsed();
    info!("--- the abandoned lease expired {took:?} after its last renewal (bound {bound:?})");
    if took > bound {
        return Err(format!("the abandoned lease expired {took:?} after its last renewal, beyond {bound:?}"));
    }
    if took < earliest {
        return Err(format!(
            "the abandoned lease expired {took:?} after its last renewal, before its TTL of {ttl}s"
        ));
    }
    let ttl_now = client.lease_time_to_live(lease.id, false).await.map_err(|e| e.to_string())?;
    if ttl_now.ttl_seconds != -1 {
        return Err(format!("the expired lease still exists: {ttl_now:?}"));
    }
    Ok(())
}
