//! kvset's alerting rules (`deploy/prometheus/kvset-rules.yaml`) and Debian's Prometheus
//! (`prometheus`, with `promtool`) to check them and to scrape a live cluster with them.
//!
//! The tools are required (`scripts/check.sh` installs Debian's `prometheus`); a missing one
//! fails the test with the package to install, as the etcd tools do.

use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use crate::manifests::repo_root;

/// The plain rules file, relative to the repository root.
pub const RULES_FILE: &str = "deploy/prometheus/kvset-rules.yaml";

/// `promtool` (Debian's `prometheus`).
pub fn promtool() -> PathBuf {
    crate::etcd::tool("promtool", "KVSET_TEST_PROMTOOL", "prometheus")
}

/// Every alerting rule of the rules file, as JSON.
pub fn rules() -> Vec<Value> {
    let text = std::fs::read_to_string(repo_root().join(RULES_FILE)).expect("rules file");
    let doc: Value = serde_saphyr::from_str(&text).expect("rules YAML");
    doc["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// The Grafana dashboard, relative to the repository root.
pub const DASHBOARD_FILE: &str = "deploy/grafana/kvset-dashboard.json";

/// Every query of the dashboard: (panel title, PromQL).
pub fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_root().join(DASHBOARD_FILE)).expect("dashboard file");
    let doc: Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut out = Vec::new();
    for panel in doc["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().unwrap_or_default().to_string();
        for target in panel["targets"].as_array().expect("targets") {
            out.push((title.clone(), target["expr"].as_str().expect("expr").to_string()));
        }
    }
    out
}

/// The metric names the rules' expressions read (`kvset_…`, and `up`).
pub fn metric_names() -> std::collections::BTreeSet<String> {
    metric_names_in(rules().iter().map(|r| r["expr"].as_str().unwrap_or_default().to_string()))
}

/// The metric names PromQL expressions read (`kvset_…`, and `up`).
pub fn metric_names_in(exprs: impl IntoIterator<Item = String>) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for expr in exprs {
        let mut rest = expr.as_str();
        while !rest.is_empty() {
            let start = rest.find(|c: char| c.is_ascii_alphabetic() || c == '_').unwrap_or(rest.len());
            rest = &rest[start..];
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
            let (token, after) = rest.split_at(end);
            if token.starts_with("kvset_") || (token == "up" && after.starts_with('{')) {
                names.insert(token.to_string());
            }
            // Skip label values and strings whole.
            rest = match after.strip_prefix('"') {
                Some(s) => s.split_once('"').map_or("", |(_, r)| r),
                None => after,
            };
        }
    }
    names
}

/// A Prometheus server (Debian's `prometheus`) on a free loopback port with a temporary data
/// directory, scraping `targets` (ops `host:port`s) as job `kvset` every second and evaluating
/// kvset's rules every second; stopped on drop.
#[derive(Debug)]
pub struct Prometheus {
    child: Child,
    dir: tempfile::TempDir,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

impl Prometheus {
    /// Starts it and waits until it answers `/-/ready`.
    pub async fn start(targets: &[String]) -> Self {
        let prometheus = crate::etcd::tool("prometheus", "KVSET_TEST_PROMETHEUS", "prometheus");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::copy(repo_root().join(RULES_FILE), dir.path().join("kvset-rules.yaml")).expect("copy rules");
        let list = targets.iter().map(|t| format!("'{t}'")).collect::<Vec<_>>().join(", ");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n\
             rule_files: [kvset-rules.yaml]\n\
             scrape_configs:\n  - job_name: kvset\n    static_configs:\n      - targets: [{list}]\n"
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).expect("config");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let child = Command::new(prometheus)
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--web.enable-lifecycle")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let server = Self { child, dir, url: format!("http://127.0.0.1:{port}") };
        let addr = format!("127.0.0.1:{port}");
        crate::eventually("prometheus answers /-/ready", Duration::from_secs(30), || {
            let addr = addr.clone();
            async move {
                crate::http_get(&addr, "/-/ready").await.ok().filter(|r| r.contains(" 200 ")).map(|_| ())
            }
        })
        .await;
        server
    }

    /// Its log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// `GET /api/v1/<path>` as JSON (`data` of a successful answer).
    pub async fn api(&self, path_and_query: &str) -> Result<Value, String> {
        let addr = self.url.trim_start_matches("http://");
        let response = http10_get(addr, &format!("/api/v1/{path_and_query}"))
            .await
            .map_err(|e| format!("prometheus: {e}"))?;
        let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let json: Value = serde_json::from_str(body).map_err(|e| format!("{e}: {body}"))?;
        if json["status"] != "success" {
            return Err(format!("prometheus answered {json}"));
        }
        Ok(json["data"].clone())
    }

    /// An instant query's result vector.
    pub async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let data = self.api(&format!("query?query={}", url_encode(expr))).await?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A GET as HTTP/1.0, so that the answer comes whole (no chunked encoding) and the server
/// closes the connection after it.
pub async fn http10_get(addr: &str, path: &str) -> std::io::Result<String> {
    use tokio::io::AsyncReadExt;
    use tokio::io::AsyncWriteExt;
    let timed_out =
        |what: &str| std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{what} timed out"));
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| timed_out("connect"))??;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .map_err(|_| timed_out("read"))??;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Percent-encodes a query parameter.
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
