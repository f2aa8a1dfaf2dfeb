//! Keeping a lease alive in the background.
//!
//! [`KeepAlive`] sends a renewal every third of the lease's TTL over a LeaseKeepAlive stream to
//! any member (followers pass renewals to the leader), reopening the stream on another member
//! when it breaks. It stops when dropped, or when the server answers TTL 0 (the lease is gone).

use std::sync::atomic::AtomicI64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kvset_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::kv;
use crate::Client;
use crate::Error;

/// A lease kept alive in the background; dropping it stops the renewals. Reading its reports
/// ([`KeepAlive::next`]) is optional: renewals never wait for the reader.
#[derive(Debug)]
pub struct KeepAlive {
    id: i64,
    ttl: Arc<AtomicI64>,
    responses: mpsc::Receiver<Result<i64, Error>>,
    task: JoinHandle<()>,
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl KeepAlive {
    /// The lease id.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// The TTL the last renewal answered (0 once the lease is gone).
    pub fn ttl(&self) -> i64 {
        self.ttl.load(Ordering::Relaxed)
    }

    /// The next renewal's answer: the lease's TTL (0: the lease is gone and renewals stopped),
    /// or an error from a stream that broke (renewals go on elsewhere).
    pub async fn next(&mut self) -> Option<Result<i64, Error>> {
        self.responses.recv().await
    }
}

impl Client {
    /// Keeps lease `id` (granted with `ttl_seconds`) alive until the returned handle is dropped.
    pub fn keep_alive(&self, id: i64, ttl_seconds: i64) -> KeepAlive {
        let ttl = Arc::new(AtomicI64::new(ttl_seconds));
        let (tx, responses) = mpsc::channel(16);
        let client = self.clone();
        let shared = ttl.clone();
        let task = tokio::spawn(async move { run(client, id, shared, tx).await });
        KeepAlive { id, ttl, responses, task }
    }
}

/// One LeaseKeepAlive stream to one member, renewing on demand (no failover: for load tests
/// and tools that manage their own retries).
#[derive(Debug)]
pub struct KeepAliveStream {
    id: i64,
    tx: mpsc::Sender<pb::LeaseKeepAliveRequest>,
    rx: tonic::Streaming<pb::LeaseKeepAliveResponse>,
}

impl KeepAliveStream {
    /// Renews the lease once; returns its TTL (0: it does not exist).
    pub async fn renew(&mut self) -> Result<i64, Error> {
        let closed = || Error::Unavailable { message: "keep-alive stream closed".into(), leader: None };
        self.tx.send(pb::LeaseKeepAliveRequest { id: self.id }).await.map_err(|_| closed())?;
        match self.rx.next().await {
            Some(Ok(r)) => Ok(r.ttl_seconds),
            Some(Err(s)) => Err(crate::final_error(&s, crate::Kind::Read)),
            None => Err(closed()),
        }
    }
}

impl Client {
    /// Opens a keep-alive stream for lease `id` on the next endpoint.
    pub async fn keep_alive_stream(&self, id: i64) -> Result<KeepAliveStream, Error> {
        let channel = self.channel(&self.pick())?;
        let (tx, req_rx) = mpsc::channel(4);
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(req_rx));
        self.authorize(&mut request).await?;
        let rx = kv(channel)
            .lease_keep_alive(request)
            .await
            .map_err(|s| crate::final_error(&s, crate::Kind::Read))?
            .into_inner();
        Ok(KeepAliveStream { id, tx, rx })
    }

    /// Renews lease `id` once (through any member, retried on other members until the
    /// deadline). Returns its TTL, 0 when the lease does not exist.
    pub async fn lease_renew(&self, id: i64) -> Result<i64, Error> {
        let deadline = tokio::time::Instant::now() + self.options().timeout;
        let mut last = Error::DeadlineExceeded("no renewal completed".into());
        while tokio::time::Instant::now() < deadline {
            let endpoint = self.pick();
            let attempt = async {
                let channel = self.channel(&endpoint)?;
                let mut request =
                    tonic::Request::new(futures::stream::iter([pb::LeaseKeepAliveRequest { id }]));
                self.authorize(&mut request).await?;
                let mut answers = kv(channel)
                    .lease_keep_alive(request)
                    .await
                    .map_err(|s| crate::final_error(&s, crate::Kind::Read))?
                    .into_inner();
                match answers.next().await {
                    Some(Ok(r)) => Ok(r.ttl_seconds),
                    Some(Err(s)) => Err(crate::final_error(&s, crate::Kind::Read)),
                    None => Err(Error::Unavailable { message: "no renewal answer".into(), leader: None }),
                }
            };
            match tokio::time::timeout_at(deadline, attempt).await {
                Ok(Ok(ttl)) => return Ok(ttl),
                Ok(Err(e)) if !e.not_applied() || matches!(e, Error::Unavailable { .. }) => last = e,
                Ok(Err(e)) => return Err(e),
                Err(_) => break,
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(last)
    }
}

fn interval(ttl: i64) -> Duration {
    Duration::from_millis((ttl.max(1) as u64 * 1000 / 3).max(100))
}

async fn run(client: Client, id: i64, ttl: Arc<AtomicI64>, tx: mpsc::Sender<Result<i64, Error>>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let endpoint = client.pick();
        let result = async {
            let channel = client.channel(&endpoint)?;
            let (req_tx, req_rx) = mpsc::channel(4);
            let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(req_rx));
            client.authorize(&mut request).await?;
            let mut responses = kv(channel)
                .lease_keep_alive(request)
                .await
                .map_err(|s| crate::final_error(&s, crate::Kind::Read))?
                .into_inner();
            loop {
                req_tx.send(pb::LeaseKeepAliveRequest { id }).await.map_err(|_| Error::Unavailable {
                    message: "keep-alive stream closed".into(),
                    leader: None,
                })?;
                let answer = tokio::time::timeout(client.options().timeout, responses.next()).await;
                let answer = match answer {
                    Err(_) => return Err(Error::DeadlineExceeded("no keep-alive answer".into())),
                    Ok(None) => {
                        return Err(Error::Unavailable {
                            message: "keep-alive stream ended".into(),
                            leader: None,
                        })
                    }
                    Ok(Some(Err(s))) => return Err(crate::final_error(&s, crate::Kind::Read)),
                    Ok(Some(Ok(r))) => r.ttl_seconds,
                };
                ttl.store(answer, Ordering::Relaxed);
                // Never wait for a reader: a full queue drops the report, not the renewal.
                let _ = tx.try_send(Ok(answer));
                if tx.is_closed() || answer <= 0 {
                    return Ok(());
                }
                tokio::time::sleep(interval(answer)).await;
            }
        }
        .await;
        match result {
            Ok(()) => return,
            Err(e) => {
                tracing::debug!(lease = id, endpoint = %endpoint, error = %e, "keep-alive stream broke; renewing elsewhere");
                let _ = tx.try_send(Err(e));
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}
