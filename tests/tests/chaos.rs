//! StatefulSet chaos in Docker: the rendered `deploy/k8s` StatefulSet runs on the emulator of
//! `kvset_tests::statefulset` while a concurrent workload records a history; each scenario
//! injects one kind of fault, heals, and then checks (see `kvset_tests::chaos`, where the
//! scenarios are written once for every harness)
//!
//! * the history is linearizable per key (porcupine; an `Unknown` verdict fails),
//! * no acknowledged write was lost (final reads after healing),
//! * every member converged to the same applied index and the same state digest,
//! * there is still exactly one cluster,
//! * the watchers that ran through the fault saw exactly what etcd's watch guarantees promise,
//! * the key of a lease kept alive through the fault never disappeared.
//!
//! Scenarios run one at a time. The seed is printed (`KVSET_CHAOS_SEED` replays it); a failing
//! scenario leaves its history (JSON) and porcupine's HTML visualisation under `target/chaos/`.
//! Without a Docker engine the scenarios report themselves skipped, with the reason. The image
//! `kvset:dev` must be built first (`deploy/docker/build.sh`; `scripts/check.sh` does it).

use kvset_tests::chaos;
use kvset_tests::history::History;
use kvset_tests::manifests::render;
use kvset_tests::statefulset::Emulator;
use rand::rngs::StdRng;
use rand::SeedableRng;

const IMAGE: &str = "kvset:dev";

/// One scenario at a time: each runs a whole cluster on two cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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

/// Runs one scenario on a fresh emulator: a 3-member cluster, a workload, `fault`, healing and
/// every check.
async fn scenario<F>(name: &str, fault: F)
where
    F: AsyncFnOnce(&mut Emulator, &History, &mut StdRng) -> Result<(), String>,
{
    scenario_on("deploy/k8s", name, fault).await
}

/// [`scenario`] on the rendering of `dir` (an overlay).
async fn scenario_on<F>(dir: &str, name: &str, fault: F)
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
    let seed = chaos::seed();
    println!("chaos {name}: seed {seed} (replay with KVSET_CHAOS_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let rendered = render(dir).unwrap_or_else(|e| panic!("{e}"));
    let mut em = Emulator::new(docker, &rendered, IMAGE).await.unwrap_or_else(|e| panic!("{name}: {e}"));
    let outcome = chaos::run(name, seed, &mut em, &mut rng, fault).await;
    em.teardown().await;
    match outcome {
        Ok(figures) => println!("chaos {name}: {}", serde_json::to_string(&figures).unwrap_or_default()),
        Err(e) => panic!("chaos {name} (seed {seed}): {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kill_a_follower_and_reschedule() {
    scenario("a-kill-follower", chaos::kill_follower).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn b_kill_the_leader_and_reschedule() {
    scenario("b-kill-leader", chaos::kill_leader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn c_rolling_restart_in_reverse_ordinal_order() {
    scenario("c-rolling-restart", chaos::rolling_restart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn d_partition_the_leader_then_heal() {
    scenario("d-partition-leader", chaos::partition_leader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn e_scale_three_to_five_to_three() {
    scenario("e-scale-3-5-3", chaos::scale_3_5_3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn f_volume_loss_means_replacement() {
    scenario("f-volume-loss", chaos::volume_loss).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn g_full_restart_of_every_pod_at_once() {
    scenario("g-full-restart", chaos::full_restart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn j_quorum_loss_recovered_from_the_survivor() {
    scenario("j-quorum-loss", chaos::quorum_loss).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn i_leases_through_faults_and_on_time_expiry() {
    scenario("i-leases", chaos::leases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h_random_mix_from_a_seed() {
    scenario("h-random-mix", chaos::random_mix).await;
}

/// The TLS overlay (cert-manager's certificates, mutual TLS between members, client
/// certificates): a killed leader and a lost volume, with every check.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn k_tls_kill_the_leader_and_reschedule() {
    scenario_on("deploy/k8s/overlays/tls", "k-tls-kill-leader", chaos::kill_leader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn l_tls_volume_loss_means_replacement() {
    scenario_on("deploy/k8s/overlays/tls", "l-tls-volume-loss", chaos::volume_loss).await;
}
