//! StatefulSet chaos in Docker: the rendered `deploy/k8s` StatefulSet runs on the emulator of
//! `kvset_tests::statefulset` while a concurrent workload records a history; each scenario
//! injects one kind of fault, heals, and then checks that
//!
//! * the history is linearizable per key (porcupine; an `Unknown` verdict fails),
//! * no acknowledged write was lost (final reads after healing),
//! * every member converged to the same applied index and the same state digest,
//! * there is still exactly one cluster.
//!
//! Scenarios run one at a time. The seed is printed (`KVSET_CHAOS_SEED` replays it); a failing
//! scenario leaves its history (JSON) and porcupine's HTML visualisation under `target/chaos/`.
//! Without a Docker engine the scenarios report themselves skipped, with the reason. The image
//! `kvset:dev` must be built first (`deploy/docker/build.sh`; `scripts/check.sh` does it).

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::time::Duration;
use std::time::Instant;

use kvset_client::pb;
use kvset_client::Client;
use kvset_client::ClientOptions;
use kvset_tests::history;
use kvset_tests::history::History;
use kvset_tests::history::Kind;
use kvset_tests::history::Workload;
use kvset_tests::linearizability;
use kvset_tests::linearizability::Figures;
use kvset_tests::manifests::render;
use kvset_tests::statefulset::Emulator;
use porcupine_rs::CheckResult;
use rand::rngs::StdRng;
use rand::Rng;
use rand::SeedableRng;
use tracing::info;

const IMAGE: &str = "kvset:dev";
const CLIENTS: u32 = 6;
/// How long the workload runs before the fault and after healing (the workload's duration,
/// not a synchronisation point: every wait on the cluster polls a condition).
const STEADY: Duration = Duration::from_secs(4);

/// One scenario at a time: each runs a whole cluster on two cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn seed() -> u64 {
    std::env::var("KVSET_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random)
}

/// The Docker engine, or the reason the suite is skipped.
async fn engine() -> Result<testcontainers::bollard::Docker, String> {
    if std::env::var("KVSET_CHAOS").as_deref() == Ok("skip") {
        return Err("KVSET_CHAOS=skip".into());
    }
    let docker = kvset_tests::docker::engine().await?;
    docker
        .inspect_image(IMAGE)
        .await
        .unwrap_or_else(|e| panic!("image {IMAGE} is missing ({e}): build it with deploy/docker/build.sh"));
    // An engine is here: from now on a problem fails the suite instead of skipping it.
    kvset_tests::docker::testcontainers_compat(&docker)
        .await
        .unwrap_or_else(|e| panic!("the Docker engine answers but the harness cannot use it: {e}"));
    Ok(docker)
}

fn client(em: &Emulator, timeout: Duration) -> Client {
    let endpoints: Vec<String> = em.running().iter().filter_map(|o| em.client_endpoint(*o)).collect();
    Client::new(endpoints, ClientOptions { timeout, prefer_leader: false, ..Default::default() })
        .expect("client")
}

/// Status of every running pod (skipping those that do not answer).
async fn statuses(em: &Emulator, digest: bool) -> BTreeMap<u32, pb::StatusResponse> {
    let c = client(em, Duration::from_secs(3));
    let mut out = BTreeMap::new();
    for o in em.running() {
        if let Some(ep) = em.client_endpoint(o) {
            if let Ok(s) = c.status_request(&ep, digest).await {
                out.insert(o, s);
            }
        }
    }
    out
}

/// The ordinal of the leader, once every running pod agrees on one.
async fn leader(em: &Emulator, timeout: Duration) -> Result<u32, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let s = statuses(em, false).await;
        let leaders: BTreeSet<u64> = s.values().map(|s| s.leader_id).collect();
        if s.len() == em.running().len() && leaders.len() == 1 && !leaders.contains(&0) {
            if let Some((o, _)) = s.iter().find(|(_, s)| s.role == pb::Role::Leader as i32) {
                return Ok(*o);
            }
        }
        if Instant::now() > deadline {
            return Err(format!("no agreed leader after {timeout:?}: {s:?}"));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until the cluster has `n` voters, all of them running pods, and one agreed leader.
async fn wait_voters(em: &Emulator, n: usize, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let c = client(em, Duration::from_secs(3));
        if let Ok(list) = c.member_list().await {
            let voters: Vec<_> = list.members.iter().filter(|m| m.voter).collect();
            let s = statuses(em, false).await;
            let running_ids: BTreeSet<u64> = s.values().map(|s| s.node_id).collect();
            if voters.len() == n
                && voters.iter().all(|v| running_ids.contains(&v.node_id))
                && leader(em, Duration::from_secs(1)).await.is_ok()
            {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!("the cluster did not reach {n} running voters in {timeout:?}"));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits until every running pod applied the same index and holds the same state digest.
async fn wait_converged(em: &Emulator, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let s = statuses(em, true).await;
        let applied: BTreeSet<u64> = s.values().map(|s| s.applied_index).collect();
        let digests: BTreeSet<(u32, u64)> = s.values().map(|s| (s.state_digest, s.state_keys)).collect();
        let clusters: BTreeSet<&str> = s.values().map(|s| s.cluster_id.as_str()).collect();
        if s.len() == em.running().len() && applied.len() == 1 && digests.len() == 1 && clusters.len() == 1 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "members did not converge: applied {applied:?}, digests {digests:?}, clusters {clusters:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits until the workload has acknowledged `n` more writes.
async fn writes_flow(h: &History, n: usize, timeout: Duration) -> Result<(), String> {
    let count = || h.ops().iter().filter(|o| o.kind.is_write() && !o.indeterminate()).count();
    let target = count() + n;
    let deadline = Instant::now() + timeout;
    while count() < target {
        if Instant::now() > deadline {
            return Err(format!("writes did not resume within {timeout:?}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Runs one scenario: a 3-member cluster, a workload, `fault`, healing and every check.
async fn scenario<F>(name: &str, fault: F)
where
    F: AsyncFnOnce(&mut Emulator, &History, &mut StdRng) -> Result<(), String>,
{
    let _one = ONE_AT_A_TIME.lock().await;
    kvset_tests::init_logging();
    let docker = match engine().await {
        Ok(d) => d,
        Err(reason) => {
            println!("chaos {name}: SKIPPED: {reason}");
            return;
        }
    };
    let seed = seed();
    println!("chaos {name}: seed {seed} (replay with KVSET_CHAOS_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let rendered = render("deploy/k8s").unwrap_or_else(|e| panic!("{e}"));
    let mut em = Emulator::new(docker, &rendered, IMAGE).await.unwrap_or_else(|e| panic!("{name}: {e}"));
    let outcome = run(name, seed, &mut em, &mut rng, fault).await;
    em.teardown().await;
    match outcome {
        Ok(figures) => println!("chaos {name}: {}", serde_json::to_string(&figures).unwrap_or_default()),
        Err(e) => panic!("chaos {name} (seed {seed}): {e}"),
    }
}

async fn run<F>(
    name: &str,
    seed: u64,
    em: &mut Emulator,
    rng: &mut StdRng,
    fault: F,
) -> Result<Figures, String>
where
    F: AsyncFnOnce(&mut Emulator, &History, &mut StdRng) -> Result<(), String>,
{
    info!("--- {name}: start 3 pods");
    em.start_all(3).await?;
    wait_voters(em, 3, Duration::from_secs(90)).await?;
    let workload = Workload::start(em.endpoints.clone(), CLIENTS, seed, History::new());
    let h = workload.history.clone();
    writes_flow(&h, 20, Duration::from_secs(30)).await?;
    tokio::time::sleep(STEADY).await;
    let fault_start = h.now();
    info!("--- {name}: fault");
    fault(em, &h, rng).await?;
    info!("--- {name}: healed; writes must flow again");
    let voters = em.replicas as usize;
    wait_voters(em, voters, Duration::from_secs(120)).await?;
    writes_flow(&h, 20, Duration::from_secs(60)).await?;
    let fault_end = h.now();
    tokio::time::sleep(STEADY).await;
    let history = workload.stop().await;

    info!("--- {name}: final reads, convergence, checks");
    history::final_reads(&em.endpoints, &history, Duration::from_secs(60)).await?;
    wait_converged(em, Duration::from_secs(60)).await?;
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
    };
    let dir = linearizability::artifact_dir();
    let _ = std::fs::write(
        dir.join(format!("{name}-figures.json")),
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

async fn follower(em: &Emulator) -> Result<u32, String> {
    let l = leader(em, Duration::from_secs(60)).await?;
    em.running().into_iter().find(|o| *o != l).ok_or_else(|| "no follower".into())
}

/// kill -9 a pod, then reschedule it: a new container with the same name and volume (and a
/// new IP), as the StatefulSet controller does when a node dies.
async fn kill_and_reschedule(em: &mut Emulator, ordinal: u32) -> Result<(), String> {
    info!("--- kill -9 kvset-{ordinal} and reschedule it");
    em.kill(ordinal).await?;
    em.start_pod(ordinal).await?;
    em.wait_ready(ordinal, Duration::from_secs(60)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kill_a_follower_and_reschedule() {
    scenario("a-kill-follower", async |em, _h, _rng| {
        let f = follower(em).await?;
        kill_and_reschedule(em, f).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn b_kill_the_leader_and_reschedule() {
    scenario("b-kill-leader", async |em, _h, _rng| {
        let l = leader(em, Duration::from_secs(60)).await?;
        kill_and_reschedule(em, l).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn c_rolling_restart_in_reverse_ordinal_order() {
    scenario("c-rolling-restart", async |em, _h, _rng| {
        for o in (0..em.replicas).rev() {
            info!("--- rolling restart: kvset-{o} (SIGTERM, grace period from the manifest)");
            em.delete_pod(o).await?;
            em.start_pod(o).await?;
            em.wait_ready(o, Duration::from_secs(60)).await?;
        }
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn d_partition_the_leader_then_heal() {
    scenario("d-partition-leader", async |em, h, _rng| {
        let l = leader(em, Duration::from_secs(60)).await?;
        info!("--- cut kvset-{l} (the leader) off the raft network");
        em.partition(l).await?;
        // The majority elects a new leader and takes writes while the old one is cut off.
        writes_flow(h, 20, Duration::from_secs(60)).await?;
        info!("--- heal");
        em.heal(l).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn e_scale_three_to_five_to_three() {
    scenario("e-scale-3-5-3", async |em, h, _rng| {
        info!("--- kubectl scale --replicas=5");
        em.scale(5).await?;
        wait_voters(em, 5, Duration::from_secs(120)).await?;
        writes_flow(h, 20, Duration::from_secs(60)).await?;
        info!("--- kubectl scale --replicas=3");
        em.scale(3).await?;
        wait_voters(em, 3, Duration::from_secs(120)).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn f_volume_loss_means_replacement() {
    scenario("f-volume-loss", async |em, _h, _rng| {
        let f = follower(em).await?;
        let before = statuses(em, false).await;
        let old_id = before.get(&f).map(|s| s.node_id).ok_or("no status")?;
        let cluster = before.get(&f).map(|s| s.cluster_id.clone()).ok_or("no status")?;
        info!("--- kvset-{f} loses its pod and its volume");
        em.kill(f).await?;
        em.delete_volume(f).await?;
        em.start_pod(f).await?;
        em.wait_ready(f, Duration::from_secs(60)).await?;
        wait_voters(em, 3, Duration::from_secs(120)).await?;
        let after = statuses(em, false).await;
        let new = after.get(&f).ok_or("no status")?;
        if new.node_id == old_id {
            return Err("an empty volume came back with the old node id".into());
        }
        if after.values().any(|s| s.cluster_id != cluster) {
            return Err(format!("a second cluster appeared: {after:?}"));
        }
        let members = client(em, Duration::from_secs(5)).member_list().await.map_err(|e| e.to_string())?;
        if members.members.iter().any(|m| m.node_id == old_id) {
            return Err("the old node id is still a member".into());
        }
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn g_full_restart_of_every_pod_at_once() {
    scenario("g-full-restart", async |em, _h, _rng| {
        info!("--- kill -9 every pod at the same instant, then start them all (Parallel)");
        let all = em.running();
        em.kill_many(&all).await?;
        let n = em.replicas;
        em.start_all(n).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h_random_mix_from_a_seed() {
    scenario("h-random-mix", async |em, h, rng| {
        let until = Instant::now() + Duration::from_secs(60);
        let mut step = 0;
        while Instant::now() < until {
            step += 1;
            let action = rng.gen_range(0..5);
            info!("--- random mix step {step}: action {action}");
            match action {
                0 => {
                    let f = follower(em).await?;
                    kill_and_reschedule(em, f).await?;
                }
                1 => {
                    let l = leader(em, Duration::from_secs(60)).await?;
                    kill_and_reschedule(em, l).await?;
                }
                2 => {
                    let l = leader(em, Duration::from_secs(60)).await?;
                    em.partition(l).await?;
                    writes_flow(h, 10, Duration::from_secs(60)).await?;
                    em.heal(l).await?;
                }
                3 => {
                    let o = rng.gen_range(0..em.replicas);
                    em.delete_pod(o).await?;
                    em.start_pod(o).await?;
                    em.wait_ready(o, Duration::from_secs(60)).await?;
                }
                _ => {
                    let f = follower(em).await?;
                    em.partition(f).await?;
                    writes_flow(h, 10, Duration::from_secs(60)).await?;
                    em.heal(f).await?;
                }
            }
            wait_voters(em, em.replicas as usize, Duration::from_secs(120)).await?;
            writes_flow(h, 10, Duration::from_secs(60)).await?;
        }
        Ok(())
    })
    .await;
}
