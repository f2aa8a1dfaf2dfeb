//! Access to the Docker engine for the chaos suite.
//!
//! * [`engine`] connects bollard (re-exported by testcontainers) with API version negotiation,
//!   or says why there is no engine (the suite is then skipped with that reason).
//! * testcontainers 0.28 always speaks Docker API 1.53 and never negotiates, so engines older
//!   than that (Debian's docker.io 20.10 speaks 1.41) refuse every call it makes. When the
//!   engine is older, [`testcontainers_compat`] starts a loopback shim in front of the engine
//!   socket that rewrites the version prefix of each request path (`/v1.53/` → `/v1.41/`, same
//!   length, so no framing changes) and points testcontainers at it through `DOCKER_HOST`.
//!   Everything else passes through byte for byte.

use std::sync::OnceLock;

use testcontainers::bollard::Docker;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::net::UnixStream;

/// The engine socket.
const SOCKET: &str = "/var/run/docker.sock";

/// The version testcontainers' bollard sends.
const CLIENT_API: &str = "1.53";

/// Connects to the local engine with a negotiated API version.
pub async fn engine() -> Result<Docker, String> {
    let docker = Docker::connect_with_local_defaults().map_err(|e| format!("no Docker client: {e}"))?;
    let docker =
        docker.negotiate_version().await.map_err(|e| format!("no Docker engine answers on {SOCKET}: {e}"))?;
    docker.ping().await.map_err(|e| format!("the Docker engine does not answer: {e}"))?;
    Ok(docker)
}

/// The engine's maximum API version, e.g. "1.41".
pub async fn engine_api(docker: &Docker) -> Result<String, String> {
    let v = docker.version().await.map_err(|e| e.to_string())?;
    v.api_version.ok_or_else(|| "the engine did not report its API version".into())
}

static SHIM: OnceLock<String> = OnceLock::new();

/// Makes testcontainers usable with this engine: when the engine is older than the API
/// testcontainers speaks, starts the rewriting shim (once per process, on a thread of its own)
/// and sets `DOCKER_HOST` to it. Returns the `DOCKER_HOST` testcontainers will use.
pub async fn testcontainers_compat(docker: &Docker) -> Result<String, String> {
    let api = engine_api(docker).await?;
    if version_at_least(&api, CLIENT_API) {
        return Ok(format!("unix://{SOCKET}"));
    }
    if api.len() != CLIENT_API.len() {
        return Err(format!("engine API {api} cannot be rewritten in place from {CLIENT_API}"));
    }
    if let Some(host) = SHIM.get() {
        return Ok(host.clone());
    }
    // The shim lives for the whole test process, on its own runtime, so it survives the
    // per-test runtimes that come and go.
    let (tx, rx) = std::sync::mpsc::channel();
    let api_owned = api.clone();
    std::thread::Builder::new()
        .name("docker-api-shim".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match TcpListener::bind("127.0.0.1:0").await {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
                let _ = tx.send(Ok(addr));
                let from = format!("/v{CLIENT_API}/").into_bytes();
                let to = format!("/v{api_owned}/").into_bytes();
                while let Ok((conn, _)) = listener.accept().await {
                    let (from, to) = (from.clone(), to.clone());
                    tokio::spawn(async move {
                        let _ = relay(conn, &from, &to).await;
                    });
                }
            });
        })
        .map_err(|e| e.to_string())?;
    let addr = rx.recv().map_err(|e| e.to_string())??;
    let host = format!("tcp://{addr}");
    // testcontainers reads DOCKER_HOST when it first builds its client.
    std::env::set_var("DOCKER_HOST", &host);
    let _ = SHIM.set(host.clone());
    tracing::info!(engine_api = %api, shim = %host, "testcontainers talks to the engine through a version shim");
    Ok(host)
}

/// Relays one client connection to the engine socket, rewriting `from` to `to` (equal lengths)
/// in the client→engine direction.
async fn relay(client: tokio::net::TcpStream, from: &[u8], to: &[u8]) -> std::io::Result<()> {
    let engine = UnixStream::connect(SOCKET).await?;
    let (mut cr, mut cw) = client.into_split();
    let (mut er, mut ew) = engine.into_split();
    let upstream = async {
        let mut buf = vec![0u8; 64 * 1024];
        // Bytes that may be the start of a pattern split across reads are held back (only
        // those: holding back anything else would stall a request waiting for its last bytes).
        let mut pending: Vec<u8> = Vec::new();
        loop {
            let n = cr.read(&mut buf).await?;
            if n == 0 {
                ew.write_all(&pending).await?;
                return ew.shutdown().await;
            }
            pending.extend_from_slice(&buf[..n]);
            let mut i = 0;
            while i + from.len() <= pending.len() {
                if &pending[i..i + from.len()] == from {
                    pending[i..i + from.len()].copy_from_slice(to);
                    i += from.len();
                } else {
                    i += 1;
                }
            }
            let keep = (1..from.len()).rev().find(|l| pending.ends_with(&from[..*l])).unwrap_or(0);
            let send = pending.len() - keep;
            ew.write_all(&pending[..send]).await?;
            pending.drain(..send);
        }
    };
    let downstream = async {
        tokio::io::copy(&mut er, &mut cw).await?;
        cw.shutdown().await
    };
    let (a, b) = tokio::join!(upstream, downstream);
    a.and(b)
}

fn version_at_least(have: &str, want: &str) -> bool {
    let parse = |v: &str| -> (u32, u32) {
        let mut it = v.split('.').map(|p| p.parse().unwrap_or(0));
        (it.next().unwrap_or(0), it.next().unwrap_or(0))
    };
    parse(have) >= parse(want)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        assert!(version_at_least("1.53", "1.53"));
        assert!(version_at_least("1.54", "1.53"));
        assert!(!version_at_least("1.41", "1.53"));
        assert!(version_at_least("2.0", "1.53"));
    }
}
