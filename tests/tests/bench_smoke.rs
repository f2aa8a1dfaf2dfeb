//! A smoke run of the load generator against an in-process cluster: it proves `kvset bench`
//! works end to end. Nothing here is timed; speeds are measured by `kvset bench` itself.

use std::time::Duration;

use kvset_bench::BenchConfig;
use kvset_bench::Target;
use kvset_bench::Workload;
use kvset_tests::cluster::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_workload_runs_without_errors() {
    let c = Cluster::start(3).await;
    for workload in [
        Workload::Put,
        Workload::Get,
        Workload::GetSerializable,
        Workload::Mixed { read_percent: 50 },
        Workload::Txn,
    ] {
        let config = BenchConfig {
            workload,
            clients: 8,
            duration: Duration::from_millis(700),
            key_space: 200,
            value_size: 64,
            ..Default::default()
        };
        let report = kvset_bench::run(Target::Kvset(c.client()), &config, false).await.unwrap();
        assert!(report.ops > 0, "{workload:?} made no progress: {report:?}");
        assert!(report.errors.is_empty(), "{workload:?} had errors: {:?}", report.errors);
        assert!(report.latency.p50_us > 0 && report.latency.p50_us <= report.latency.max_us);
        println!("{}", report.line());
    }
    c.shutdown().await;
}
