//! The ops page (`GET /` on the ops port) in a real browser: Debian's headless Chromium loads
//! it from a 3-member cluster with TLS everywhere (the ops port too, and client certificates
//! required on the client port, which is where members ask each other for their status), and
//! the test reads the DOM the page's scripts built: every member, the one leader, the charts
//! drawn from the member's samples. Then a member stops: the page shows it down, from another
//! member; it comes back with an empty volume and the page shows it replaced (a new node id at
//! its ordinal, the reconciler's replacement in the events). Screenshots are kept under
//! `target/ops-page/` as test artifacts (the README's is one of them).
//!
//! Skips, saying so, only when no Chromium is installed (`scripts/check.sh` installs Debian's).

use std::collections::BTreeMap;
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;
use std::time::Instant;

use kvset_tests::chromium;
use kvset_tests::cluster::Cluster;
use kvset_tests::pki::Pki;
use tracing::info;

/// The page's rows, by member name.
fn rows(dom: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    chromium::elements(dom, "<tr data-member=")
        .into_iter()
        .filter_map(|attrs| attrs.get("data-member").cloned().map(|name| (name, attrs)))
        .collect()
}

/// How many points each chart drew.
fn chart_points(dom: &str) -> Vec<u64> {
    chromium::elements(dom, "<svg ")
        .into_iter()
        .filter_map(|attrs| attrs.get("data-points").and_then(|p| p.parse().ok()))
        .collect()
}

/// Loads the page until `check` accepts its DOM (each load lets the page poll for 3 s of
/// virtual time); returns that DOM. Fails after `timeout` with the last DOM and reason.
async fn until(
    browser: &Path,
    url: &str,
    what: &str,
    timeout: Duration,
    check: impl Fn(&str) -> Result<(), String>,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match chromium::dump_dom(browser, url, Duration::from_secs(3)).await {
            Ok(dom) => match check(&dom) {
                Ok(()) => return dom,
                Err(why) => format!("{why}\n--- DOM ---\n{dom}"),
            },
            Err(e) => e,
        };
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for the page to show {what}: {last}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn artifacts() -> PathBuf {
    let dir = kvset_tests::manifests::repo_root().join("target/ops-page");
    std::fs::create_dir_all(&dir).expect("artifacts dir");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_page_shows_members_leader_and_charts_then_a_member_down_and_replaced() {
    let Some(browser) = chromium::find() else {
        // The one reason to skip: everything else fails loudly.
        eprintln!(
            "SKIPPED: no Chromium on this machine (apt-get install chromium; scripts/check.sh installs it)"
        );
        return;
    };
    let started = Instant::now();
    let pki = Pki::new();
    let tweak = pki.tweak();
    let mut c = Cluster::start_with(3, move |config| {
        tweak(config);
        config.tls.ops = true;
    })
    .await;
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    // The page is served by kvset-0; kvset-2 is the member that goes away.
    let url = format!("https://{}/", c.ops_endpoint(0));
    info!("--- writes and reads through kvset-0 while the page loads");
    let client = pki.client(&[c.endpoint(0)]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workload = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = client.put(format!("page/{}", i % 50), format!("v{i}")).await;
                let _ = client.get(format!("page/{}", i % 50)).await;
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    info!("--- every member, the leader and the charts");
    let leader_name = format!("kvset-{leader}");
    let dom = until(&browser, &url, "three members up, one leader, charts", Duration::from_secs(60), |dom| {
        let rows = rows(dom);
        let up: Vec<&String> = rows.iter().filter(|(_, r)| r["data-state"] == "up").map(|(n, _)| n).collect();
        if up.len() != 3 {
            return Err(format!("members up: {up:?}"));
        }
        let leaders: Vec<&String> =
            rows.iter().filter(|(_, r)| r["data-role"] == "leader").map(|(n, _)| n).collect();
        if leaders != [&leader_name] {
            return Err(format!("leaders {leaders:?}, expected {leader_name}"));
        }
        if chromium::text_of(dom, "leader") != Some(leader_name.as_str()) {
            return Err(format!("#leader is {:?}", chromium::text_of(dom, "leader")));
        }
        let points = chart_points(dom);
        if points.len() != 3 || points.iter().any(|p| *p < 2) {
            return Err(format!("chart points {points:?}"));
        }
        Ok(())
    })
    .await;
    assert_eq!(chromium::text_of(&dom, "served-by"), Some("kvset-0"));
    assert!(dom.contains("data-state=\"in_sync\""), "the reconciler is in sync");
    assert!(dom.contains("All 3 members answer"), "no notes while all is well");
    assert!(
        dom.contains("<path class=\"line\" data-series=\"applied\" d=\"M"),
        "the applied chart has a line"
    );
    let png = artifacts().join("cluster.png");
    chromium::screenshot(&browser, &url, &png, (1200, 820), Duration::from_secs(3))
        .await
        .expect("screenshot");
    info!(png = %png.display(), elapsed_s = started.elapsed().as_secs(), "--- page rendered");

    info!("--- kvset-2 stops: the page on kvset-0 shows it down");
    let old = c.node(2).node_id();
    c.stop(2).await;
    let dom = until(&browser, &url, "kvset-2 down", Duration::from_secs(60), |dom| {
        let rows = rows(dom);
        match rows.get("kvset-2").map(|r| r["data-state"].as_str()) {
            Some("down") => Ok(()),
            other => Err(format!("kvset-2 is {other:?}")),
        }
    })
    .await;
    assert!(dom.contains("kvset-2 unreachable from kvset-0"), "a note says who cannot be reached");
    chromium::screenshot(
        &browser,
        &url,
        &artifacts().join("member-down.png"),
        (1200, 820),
        Duration::from_secs(3),
    )
    .await
    .expect("screenshot");

    info!("--- kvset-2 comes back with an empty volume: replaced by a new node");
    c.wipe(2);
    c.start_node(2).await;
    let new = c.node(2).node_id();
    assert_ne!(old, new);
    let dom = until(&browser, &url, "kvset-2 replaced and up", Duration::from_secs(90), |dom| {
        let rows = rows(dom);
        let row = rows.get("kvset-2").ok_or("no kvset-2 row")?;
        if row["data-node"] != new.to_string() || row["data-state"] != "up" {
            return Err(format!("kvset-2 row {row:?}, new node {new}"));
        }
        if rows.values().any(|r| r["data-node"] == old.to_string()) {
            return Err("the old node is still listed".into());
        }
        if !dom.contains(&format!("with node {new}")) {
            return Err("no replacement in the events".into());
        }
        Ok(())
    })
    .await;
    assert!(dom.contains("membership changed"), "membership events are listed");
    chromium::screenshot(
        &browser,
        &url,
        &artifacts().join("replaced.png"),
        (1200, 820),
        Duration::from_secs(3),
    )
    .await
    .expect("screenshot");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = workload.await;
    info!(elapsed_s = started.elapsed().as_secs(), "--- done");
    c.shutdown().await;
}

/// The JSON the page polls, for scripts: answered by every member (followers too), with every
/// member up, also once access control is on (members ask each other for `Cluster.Status`,
/// which needs no credentials, as etcd's `endpoint status` does not).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_json_is_served_by_every_member_also_with_access_control_on() {
    let c = Cluster::start(3).await;
    c.wait_converged(Duration::from_secs(20)).await;
    let every_member_sees_three_up = async |when: &str| {
        for o in 0..3 {
            let what = format!("status.json of kvset-{o} with three members up, in sync ({when})");
            let doc = kvset_tests::eventually(&what, Duration::from_secs(20), || {
                let addr = c.ops_endpoint(o);
                async move {
                    let response = kvset_tests::alerts::http10_get(&addr, "/status.json").await.ok()?;
                    let body = response.split_once("\r\n\r\n")?.1;
                    let doc: serde_json::Value = serde_json::from_str(body).ok()?;
                    let members = doc["members"].as_array()?;
                    let up = members.len() == 3 && members.iter().all(|m| m["state"] == "up");
                    (up && doc["reconciler"]["state"] == "in_sync").then_some(doc)
                }
            })
            .await;
            assert_eq!(doc["format"], 1);
            assert_eq!(doc["served_by"], format!("kvset-{o}"));
            assert!(doc["leader"].as_str().is_some_and(|l| l.starts_with("kvset-")), "{doc}");
            assert!(doc["leader_id"].as_str().is_some_and(|id| id.parse::<u64>().is_ok()), "{doc}");
            assert!(doc["notes"].as_array().is_some_and(Vec::is_empty), "{doc}");
        }
    };
    every_member_sees_three_up("no access control").await;
    for o in 0..3 {
        let page = kvset_tests::http_get(&c.ops_endpoint(o), "/").await.expect("page");
        assert!(page.contains("200 OK") && page.contains("status.json"), "the page is served");
        assert!(
            !page.contains("http://") && !page.contains("https://"),
            "the page loads nothing from elsewhere"
        );
    }

    info!("--- access control on: the client port now refuses anonymous calls");
    let endpoint = c.endpoint(0);
    for args in [
        &["user", "add", "root", "--new-user-password=rootpw", "--interactive=false"][..],
        &["user", "grant-role", "root", "root"],
        &["auth", "enable"],
    ] {
        let (ok, out, err) = kvset_tests::etcd::run_etcdctl(&endpoint, args, None);
        assert!(ok, "etcdctl {args:?}: {out} {err}");
    }
    let (ok, _, err) = kvset_tests::etcd::run_etcdctl(&endpoint, &["put", "k", "v"], None);
    assert!(!ok && err.contains("user name is empty"), "anonymous writes are refused: {err}");
    c.wait_converged(Duration::from_secs(20)).await;
    every_member_sees_three_up("access control on").await;
    c.shutdown().await;
}
