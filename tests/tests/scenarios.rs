//! The chaos scenarios of `kvset_tests::chaos`, run on the in-process cluster: the same fault,
//! workload and checks (linearizability, no acknowledged write lost, convergence) as on the
//! Docker StatefulSet emulator (`tests/chaos.rs`), in a fraction of the time.

use kvset_tests::chaos;
use kvset_tests::cluster::Cluster;
use kvset_tests::history::History;
use rand::rngs::StdRng;
use rand::SeedableRng;

async fn scenario<F>(name: &str, fault: F)
where
    F: AsyncFnOnce(&mut Cluster, &History, &mut StdRng) -> Result<(), String>,
{
    let seed = chaos::seed();
    println!("scenario {name}: seed {seed} (replay with KVSET_CHAOS_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut c = Cluster::new(3, |_| {}).await;
    let outcome = chaos::run(name, seed, &mut c, &mut rng, fault).await;
    c.shutdown().await;
    match outcome {
        Ok(figures) => println!("scenario {name}: {}", serde_json::to_string(&figures).unwrap_or_default()),
        Err(e) => panic!("scenario {name} (seed {seed}): {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_kill() {
    scenario("leader-kill", chaos::kill_leader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn follower_kill_and_restart() {
    scenario("follower-kill", chaos::kill_follower).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scale_three_to_five_to_three() {
    scenario("scale-3-5-3", chaos::scale_3_5_3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leases_through_faults_and_on_time_expiry() {
    scenario("leases", chaos::leases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quorum_loss_recovered_from_the_survivor() {
    scenario("quorum-loss", chaos::quorum_loss).await;
}
