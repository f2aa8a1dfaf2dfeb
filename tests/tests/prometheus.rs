//! A real Prometheus (Debian's `prometheus`) scrapes a real 3-member cluster every second,
//! with kvset's alerting rules loaded, while clients write and read; then its HTTP API is
//! asked what it stored: every metric family the members export is there, counters rise under
//! writes, exactly one member reports itself leader, histograms have buckets, and every
//! alerting rule was evaluated against the live data without error (none firing on a healthy
//! cluster).

use std::collections::BTreeSet;
use std::time::Duration;
use std::time::Instant;

use kvset_tests::alerts::metric_names;
use kvset_tests::alerts::rules;
use kvset_tests::alerts::Prometheus;
use kvset_tests::cluster::Cluster;
use serde_json::Value;
use tracing::info;

/// Families that have no series in a plain cluster that took no snapshot: TLS refusals and
/// certificate expiry (no TLS), snapshots (none built in a few seconds).
const ABSENT_HERE: &[&str] =
    &["kvset_tls_connections_refused", "kvset_tls_certificate_expiry_timestamp_seconds", "kvset_snapshots"];

/// A member's `/metrics`: (the families it declares, the metric names with a sample).
async fn exported(addr: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let text = kvset_tests::alerts::http10_get(addr, "/metrics").await.expect("scrape /metrics");
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let families = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect();
    let names = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect();
    (families, names)
}

/// The numeric value of an instant-vector sample.
fn value(sample: &Value) -> f64 {
    sample["value"][1].as_str().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
}

/// How long Prometheus gets to show something (scrapes and rule evaluations every second).
const WAIT: Duration = Duration::from_secs(30);

/// Polls `expr` until `accept` takes its result (Prometheus needs a few scrapes for rates).
async fn until(prom: &Prometheus, what: &str, expr: &str, accept: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let last = match prom.query(expr).await {
            Ok(r) if accept(&r) => return r,
            Ok(r) => format!("{r:?}"),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            panic!(
                "timed out after {WAIT:?} waiting for {what}: `{expr}` answered {last}\nprometheus log:\n{}",
                prom.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_real_prometheus_scrapes_every_family_and_evaluates_every_rule() {
    let started = Instant::now();
    let c = Cluster::start(3).await;
    let targets: Vec<String> = (0..3).map(|o| c.ops_endpoint(o)).collect();
    let prom = Prometheus::start(&targets).await;
    info!(url = %prom.url, "--- prometheus started, scraping every second");

    info!("--- writes, reads, a lease and a watch through every member");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for o in 0..3 {
        let client = c.client_for(o);
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = client.put(format!("prom/{o}/{}", i % 20), format!("v{i}")).await;
                let _ = client.get(format!("prom/{o}/{}", i % 20)).await;
                i += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    let client = c.client();
    let lease = client.lease_grant(60, 0).await.expect("lease grant").id;
    let leased = kvset_client::pb::PutRequest {
        key: b"prom/leased".to_vec(),
        value: b"x".to_vec(),
        lease,
        ..Default::default()
    };
    client.put_request(leased).await.expect("put with lease");
    let options = kvset_client::WatchOptions { prefix: true, ..Default::default() };
    let _watch = client.watch("prom/", options).await.expect("watch");

    // Every member up, and its counters rising while the clients write.
    until(&prom, "three targets up", "up{job=\"kvset\"} == 1", |r| r.len() == 3).await;
    until(
        &prom,
        "applied writes rising on every member",
        "rate(kvset_commands_applied_total[5s]) > 0",
        |r| r.len() == 3,
    )
    .await;
    until(
        &prom,
        "puts answered by every member",
        "sum by (instance) (rate(kvset_grpc_requests_total{method=\"Put\",code=\"OK\"}[5s])) > 0",
        |r| r.len() == 3,
    )
    .await;
    until(&prom, "the leader's proposals", "rate(kvset_batch_commands_count[5s]) > 0", |r| r.len() == 1)
        .await;
    until(&prom, "leases counted on every member", "kvset_leases >= 1", |r| r.len() == 3).await;
    until(&prom, "the watch counted", "sum(kvset_watches) >= 1", |r| r.len() == 1).await;

    // Exactly one leader; everyone knows it; three voters; ready.
    let leaders = until(&prom, "one leader", "kvset_raft_is_leader == 1", |r| r.len() == 1).await;
    let leader = leaders[0]["metric"]["instance"].as_str().unwrap_or_default().to_string();
    until(&prom, "the leader by state", "sum(kvset_raft_state{state=\"leader\"})", |r| {
        r.len() == 1 && value(&r[0]) == 1.0
    })
    .await;
    for (expr, want) in [
        ("kvset_raft_has_leader", 1.0),
        ("kvset_raft_voters", 3.0),
        ("kvset_ready", 1.0),
        ("kvset_quota_bytes", kvset_server::Config::default().quota_bytes as f64),
    ] {
        let r = prom.query(expr).await.expect(expr);
        assert_eq!(r.len(), 3, "{expr}: {r:?}");
        assert!(r.iter().all(|s| value(s) == want), "{expr} should be {want} everywhere: {r:?}");
    }
    // Only the leader sees the others' lag and acknowledgements.
    let lag =
        until(&prom, "the leader's view of both followers", "kvset_member_lag_entries", |r| r.len() == 2)
            .await;
    assert!(lag.iter().all(|s| s["metric"]["instance"] == leader.as_str()), "{lag:?}");
    let acks = prom.query("kvset_member_last_ack_seconds < 5").await.expect("acks");
    assert_eq!(acks.len(), 2, "both followers acknowledged the leader recently: {acks:?}");
    until(&prom, "volumes measured", "kvset_volume_bytes > 0", |r| r.len() == 3).await;
    until(&prom, "reconciler in sync", "kvset_membership_reconciler_state{state=\"in_sync\"} == 1", |r| {
        r.len() == 1 && r[0]["metric"]["instance"] == leader.as_str()
    })
    .await;

    // Histograms have buckets up to +Inf, and a p99 that is a number.
    for family in ["kvset_log_flush_seconds", "kvset_apply_seconds", "kvset_grpc_request_duration_seconds"] {
        let buckets = prom.query(&format!("count by (instance) ({family}_bucket)")).await.expect("buckets");
        assert_eq!(buckets.len(), 3, "{family}: {buckets:?}");
        assert!(buckets.iter().all(|b| value(b) >= 10.0), "{family} has its buckets: {buckets:?}");
        let inf = prom.query(&format!("{family}_bucket{{le=\"+Inf\"}}")).await.expect("+Inf");
        assert!(!inf.is_empty(), "{family} has a +Inf bucket");
    }
    let p99 = until(
        &prom,
        "a write p99",
        "histogram_quantile(0.99, sum by (le) (rate(kvset_grpc_request_duration_seconds_bucket{method=\"Put\"}[10s])))",
        |r| r.len() == 1 && value(&r[0]).is_finite(),
    )
    .await;
    let p99 = value(&p99[0]);
    assert!(p99 > 0.0 && p99 < 5.0, "write p99 {p99} s");
    info!(p99_ms = p99 * 1000.0, "--- families and values are sane");

    // Every family a member exports is stored, and every metric the rules read exists (the
    // certificate expiry only with TLS).
    let (mut families, mut names) = (BTreeSet::new(), BTreeSet::new());
    for target in &targets {
        let (f, n) = exported(target).await;
        families.extend(f);
        names.extend(n);
    }
    let stored: BTreeSet<String> = prom
        .api("label/__name__/values")
        .await
        .expect("names")
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|n| n.as_str().map(str::to_string))
        .collect();
    let missing: Vec<&String> = names.iter().filter(|n| !stored.contains(*n)).collect();
    assert!(missing.is_empty(), "exported but not in Prometheus: {missing:?}");
    // Every family the binary registers (labelled ones appear once they have a series: give
    // the three that stay empty here one).
    let all = kvset_server::metrics::Metrics::new();
    all.tls_refused("client", "no_tls");
    all.snapshots.get_or_create(&kvset_server::metrics::KindLabel { kind: "built" }).inc();
    all.cert_expiry.get_or_create(&kvset_server::metrics::CertLabel { cert: "member" }).set(1);
    let mut registered: BTreeSet<String> = all
        .render()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect();
    registered.extend(families.iter().cloned());
    for family in &registered {
        let stored_as = ["", "_total", "_bucket"].map(|suffix| format!("{family}{suffix}"));
        let present = stored_as.iter().any(|n| stored.contains(n));
        assert!(
            present || ABSENT_HERE.contains(&family.as_str()),
            "family {family} has no series in Prometheus"
        );
    }
    info!(families = families.len(), names = names.len(), "--- every family the members declare is stored");
    for name in metric_names() {
        if name == "kvset_tls_certificate_expiry_timestamp_seconds" {
            continue;
        }
        let base = name.trim_end_matches("_bucket");
        assert!(
            stored.contains(&name) || stored.contains(&format!("{base}_bucket")),
            "the rules read {name}, which Prometheus did not get"
        );
    }

    // Every alerting rule evaluated against the live data, without error; none fires.
    let expected: BTreeSet<String> =
        rules().iter().filter_map(|r| r["alert"].as_str().map(str::to_string)).collect();
    let deadline = Instant::now() + WAIT;
    let evaluated = loop {
        let data = prom.api("rules").await.unwrap_or_default();
        let rules: Vec<Value> = data["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let all = rules.iter().all(|r| r["lastEvaluation"].as_str().is_some_and(|t| !t.starts_with("0001")));
        if all && rules.len() == expected.len() {
            break rules;
        }
        assert!(
            Instant::now() < deadline,
            "rules not all evaluated: {data}\nprometheus log:\n{}",
            prom.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    for rule in &evaluated {
        let name = rule["name"].as_str().unwrap_or_default();
        assert!(expected.contains(name), "unexpected rule {name}");
        assert_eq!(rule["health"], "ok", "{name}: {rule}");
        assert_eq!(rule["lastError"].as_str().unwrap_or_default(), "", "{name}: {rule}");
        assert_ne!(rule["state"], "firing", "{name} fires on a healthy cluster: {rule}");
    }
    info!(rules = evaluated.len(), elapsed_s = started.elapsed().as_secs(), "--- every rule evaluated: ok");

    // The Grafana dashboard's queries run against the same data; those of a healthy cluster
    // under writes have answers.
    for (title, expr) in kvset_tests::alerts::dashboard_queries() {
        let result =
            prom.query(&expr).await.unwrap_or_else(|e| panic!("dashboard panel {title}: `{expr}`: {e}"));
        let expect_data = [
            "Leader",
            "Writes applied /s (cluster)",
            "Requests /s by member",
            "Lag behind the leader (entries)",
        ];
        if expect_data.contains(&title.as_str()) {
            assert!(!result.is_empty(), "dashboard panel {title}: `{expr}` has no data");
        }
    }

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    drop(prom);
    c.shutdown().await;
}
