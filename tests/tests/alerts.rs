//! The alerting rules (`deploy/prometheus/`) and the monitoring overlay
//! (`deploy/k8s/overlays/monitoring`): promtool checks and unit-tests the rules, the
//! PrometheusRule is the plain rules file wrapped (regenerated with `KVSET_UPDATE_RULES=1`),
//! and the Prometheus Operator's objects, which `kubernetes-validate` has no schema for, are
//! checked here for the shape the operator needs and for agreeing with the binary.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use kvset_tests::alerts::dashboard_queries;
use kvset_tests::alerts::metric_names;
use kvset_tests::alerts::metric_names_in;
use kvset_tests::alerts::promtool;
use kvset_tests::alerts::rules;
use kvset_tests::alerts::RULES_FILE;
use kvset_tests::manifests::render;
use kvset_tests::manifests::repo_root;
use serde_json::Value;

const PROMETHEUS_RULE: &str = "deploy/k8s/overlays/monitoring/prometheusrule.yaml";

/// The PrometheusRule: the plain file's groups under `spec`, with a header.
fn prometheus_rule(plain: &str) -> String {
    let at = plain.find("\ngroups:").expect("the rules file has a top-level `groups:`") + 1;
    let mut out = String::from(
        "# GENERATED from deploy/prometheus/kvset-rules.yaml by tests/tests/alerts.rs\n\
         # (KVSET_UPDATE_RULES=1 cargo test -p kvset-tests --test alerts): edit that file, not this one.\n\
         apiVersion: monitoring.coreos.com/v1\n\
         kind: PrometheusRule\n\
         metadata:\n  name: kvset\n  labels:\n    app.kubernetes.io/name: kvset\n\
         spec:\n",
    );
    for line in plain[at..].lines() {
        if !line.is_empty() {
            out.push_str("  ");
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn path(relative: &str) -> PathBuf {
    repo_root().join(relative)
}

#[test]
fn the_prometheus_rule_is_the_plain_rules_file() {
    let plain = std::fs::read_to_string(path(RULES_FILE)).expect("rules file");
    let expected = prometheus_rule(&plain);
    if std::env::var("KVSET_UPDATE_RULES").is_ok_and(|v| v == "1") {
        std::fs::write(path(PROMETHEUS_RULE), &expected).expect("write the PrometheusRule");
    }
    let actual = std::fs::read_to_string(path(PROMETHEUS_RULE)).expect("PrometheusRule");
    assert!(
        actual == expected,
        "{PROMETHEUS_RULE} is not {RULES_FILE} wrapped: regenerate it with \
         `KVSET_UPDATE_RULES=1 cargo test -p kvset-tests --test alerts`"
    );
    // And as data: the same groups.
    let wrapped: Value = serde_saphyr::from_str(&actual).expect("PrometheusRule YAML");
    let groups: Value = serde_saphyr::from_str(&plain).expect("rules YAML");
    assert_eq!(wrapped["spec"]["groups"], groups["groups"]);
}

#[test]
fn promtool_checks_the_rules_and_their_unit_tests_pass() {
    let promtool = promtool();
    for args in
        [vec!["check", "rules", RULES_FILE], vec!["test", "rules", "deploy/prometheus/kvset-rules.test.yaml"]]
    {
        let out =
            Command::new(&promtool).args(&args).current_dir(repo_root()).output().expect("run promtool");
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "promtool {}: {text}", args.join(" "));
        assert!(text.contains("SUCCESS"), "promtool {}: {text}", args.join(" "));
    }
}

#[test]
fn every_rule_is_unit_tested_firing_and_documented() {
    let tests: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(path("deploy/prometheus/kvset-rules.test.yaml")).expect("tests file"),
    )
    .expect("tests YAML");
    let mut fired = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for test in tests["tests"].as_array().expect("tests") {
        for check in test["alert_rule_test"].as_array().expect("alert_rule_test") {
            let name = check["alertname"].as_str().expect("alertname").to_string();
            match check["exp_alerts"].as_array().map(Vec::len) {
                Some(n) if n > 0 => fired.insert(name),
                _ => quiet.insert(name),
            };
        }
    }
    let readme = std::fs::read_to_string(path("README.md")).expect("README");
    for rule in rules() {
        let name = rule["alert"].as_str().expect("alert name");
        assert!(fired.contains(name), "{name}: no unit test where it fires");
        assert!(quiet.contains(name), "{name}: no unit test where it stays quiet");
        let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
        assert!(["warning", "critical"].contains(&severity), "{name}: severity {severity:?}");
        for key in ["summary", "description"] {
            assert!(rule["annotations"][key].as_str().is_some_and(|s| !s.is_empty()), "{name}: no {key}");
        }
        assert!(readme.contains(&format!("`{name}`")), "{name} is not in the README's alert list");
    }
}

#[test]
fn the_dashboard_queries_job_kvset() {
    let queries = dashboard_queries();
    assert!(queries.len() >= 10, "{queries:?}");
    for (title, expr) in queries {
        assert!(expr.contains("job=\"kvset\""), "{title}: `{expr}` does not select job=\"kvset\"");
    }
}

/// The rules and the Grafana dashboard read only families the binary exports.
#[test]
fn the_rules_use_only_metrics_the_binary_exports() {
    // Families appear in the text once a labelled series exists; the docs of metrics.rs name
    // every family (a unit test there keeps that true).
    let docs = std::fs::read_to_string(path("crates/kvset-server/src/metrics.rs")).expect("metrics.rs");
    let dashboard = metric_names_in(dashboard_queries().into_iter().map(|(_, expr)| expr));
    for name in metric_names().into_iter().chain(dashboard) {
        if name == "up" {
            continue;
        }
        let family = name.strip_prefix("kvset_").unwrap_or_else(|| panic!("{name}: not a kvset metric"));
        let base = family.trim_end_matches("_bucket").trim_end_matches("_total");
        assert!(docs.contains(&format!("`{base}")), "{name}: no family `{base}` in metrics.rs");
    }
}

/// The Prometheus Operator's objects in the monitoring overlay, which kubernetes-validate only
/// warns about (it has no schema for CRDs): checked for the shape the operator reads.
#[test]
fn the_monitoring_overlay_scrapes_the_ops_port_and_carries_the_rules() {
    let r = render("deploy/k8s/overlays/monitoring").unwrap_or_else(|e| panic!("{e}"));
    let by_kind =
        |kind: &str| -> Vec<Value> { r.objects.iter().filter(|o| o["kind"] == kind).cloned().collect() };
    let [monitor] = by_kind("ServiceMonitor").try_into().expect("one ServiceMonitor");
    let [rule] = by_kind("PrometheusRule").try_into().expect("one PrometheusRule");
    for o in [&monitor, &rule] {
        assert_eq!(o["apiVersion"], "monitoring.coreos.com/v1");
        assert!(o["metadata"]["name"].as_str().is_some_and(|n| !n.is_empty()));
        let spec = o["spec"].as_object().expect("spec");
        let known = ["selector", "endpoints", "jobLabel", "groups", "namespaceSelector"];
        for key in spec.keys() {
            assert!(known.contains(&key.as_str()), "{}: unexpected spec.{key}", o["kind"]);
        }
    }

    // The ServiceMonitor selects exactly the metrics Service, on a port of it that is the
    // container's ops port, at a path the ops server serves; the job is "kvset".
    let selector = monitor["spec"]["selector"]["matchLabels"].as_object().expect("matchLabels");
    let services: Vec<k8s_openapi::api::core::v1::Service> = r.all("Service");
    let selected: Vec<_> = services
        .iter()
        .filter(|s| {
            let labels = s.metadata.labels.clone().unwrap_or_default();
            selector.iter().all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str())
        })
        .collect();
    assert_eq!(selected.len(), 1, "the ServiceMonitor must select one Service");
    let service = selected[0];
    let spec = service.spec.clone().expect("service spec");
    assert_eq!(spec.publish_not_ready_addresses, Some(true), "not-ready members must be scraped too");
    let job_label = monitor["spec"]["jobLabel"].as_str().expect("jobLabel");
    let labels = service.metadata.labels.clone().unwrap_or_default();
    assert_eq!(labels.get(job_label).map(String::as_str), Some("kvset"), "the rules select job=\"kvset\"");
    let ops_port = kvset_server::Config::default().ops_port as i32;
    for endpoint in monitor["spec"]["endpoints"].as_array().expect("endpoints") {
        let port = endpoint["port"].as_str().expect("a named port");
        let service_port =
            spec.ports.clone().unwrap_or_default().into_iter().find(|p| p.name.as_deref() == Some(port));
        assert_eq!(service_port.map(|p| p.port), Some(ops_port), "port {port}");
        let path = endpoint["path"].as_str().expect("path");
        assert!(kvset_server::service::ops::PATHS.contains(&path), "{path} is not served");
        assert!(endpoint["interval"].as_str().is_some());
    }
    assert_eq!(
        r.container()
            .ports
            .unwrap_or_default()
            .iter()
            .find(|p| p.name.as_deref() == Some("ops"))
            .map(|p| p.container_port),
        Some(ops_port)
    );

    // The PrometheusRule's groups: named, each rule an alert with an expression.
    for group in rule["spec"]["groups"].as_array().expect("groups") {
        assert!(group["name"].as_str().is_some());
        for r in group["rules"].as_array().expect("rules") {
            assert!(r["alert"].as_str().is_some() && r["expr"].as_str().is_some(), "{r}");
        }
    }
}
