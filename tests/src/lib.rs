//! Test harnesses for kvset.
//!
//! [`cluster::Cluster`] runs members in-process on loopback, each with its own data directory
//! (its "volume"), through the same `Node::start` entry point the binary uses. Members can be
//! stopped, restarted with their volume, wiped (volume loss), and cut off from their peers
//! through a fault-injecting transport. The Docker [`statefulset::Emulator`] runs the real
//! image the way a StatefulSet controller would. Both implement [`harness::Harness`], and the
//! chaos scenarios of [`chaos`] (a fault under a recorded workload, then the checks) are written
//! once against it. Waits poll with a deadline: see [`poll_until`] and [`eventually`].

pub mod alerts;
pub mod chaos;
pub mod chromium;
pub mod cluster;
pub mod docker;
pub mod etcd;
pub mod harness;
pub mod history;
pub mod http;
pub mod k8s_stub;
pub mod linearizability;
pub mod lock_check;
pub mod manifests;
pub mod pki;
pub mod statefulset;
pub mod watch_check;

use std::future::Future;
use std::time::Duration;
use std::time::Instant;

/// Reads `key` from the state of the member `client` talks to (a serializable read: what that
/// member has applied, whoever leads); `None` when the key is absent there.
pub async fn member_get(
    client: &kvset_client::Client,
    key: impl Into<Vec<u8>>,
) -> Result<Option<kvset_client::pb::KeyValue>, kvset_client::Error> {
    use kvset_client::pb;
    let request = pb::GetRequest {
        key: key.into(),
        consistency: pb::ReadConsistency::Serializable as i32,
        ..Default::default()
    };
    Ok(client.get_request(request).await?.kv)
}

/// Installs a test logger once (`RUST_LOG` selects; default: warnings only).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,kvset_tests=info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false).with_test_writer().try_init();
}

/// Polls `probe` every 50 ms until it returns `Some`, or fails after `timeout` naming `what`.
pub async fn poll_until<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out after {timeout:?} waiting for: {what}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Like [`poll_until`], panicking on timeout (for tests that have nothing to clean up).
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    poll_until(what, timeout, probe).await.unwrap_or_else(|e| panic!("{e}"))
}

/// A minimal HTTP/1.1 GET over a plain socket (keeps an HTTP client out of the dependencies).
pub async fn http_get(addr: &str, path: &str) -> std::io::Result<String> {
    use tokio::io::AsyncReadExt;
    use tokio::io::AsyncWriteExt;
    let connect = tokio::net::TcpStream::connect(addr);
    let mut s = tokio::time::timeout(Duration::from_secs(2), connect)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "read timed out"))??;
    Ok(out)
}
