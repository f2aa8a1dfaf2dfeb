//! Write batching: many client writes, one Raft entry.
//!
//! Every Raft entry costs a log write, an fsync (shared with whatever else the flusher finds
//! pending) and a replication round, so throughput is bounded by entries per second, not
//! commands. The batcher puts every write on a
//! bounded queue; a loop takes one of `batch.in_flight` permits, then everything queued at
//! that moment (up to `batch.max_commands` commands and `batch.max_bytes` bytes) becomes one
//! [`Batch`] proposed with `client_write`. Each caller gets its own result back.
//!
//! * **No added delay when idle**: with a permit free, the first write is proposed at once.
//! * **Batches grow under load**: while all permits are busy, writes accumulate in the queue.
//! * **Backpressure**: a full queue answers `RESOURCE_EXHAUSTED` (not applied).
//! * **Honest errors**: a failed proposal is classified by [`crate::errors::client_write`]
//!   (`ForwardToLeader`: not applied, safe to retry elsewhere; a stopped Raft: outcome unknown),
//!   and counted in `kvset_proposals_failed_total`.

use std::sync::Arc;

use kvset_storage::Batch;
use kvset_storage::Command;
use kvset_storage::CommandResult;
use kvset_storage::Raft;
use tokio::sync::mpsc;
use tokio::sync::oneshot;
use tokio::sync::Semaphore;

use crate::config::BatchConfig;
use crate::errors;
use crate::errors::KvError;
use crate::metrics::Metrics;

struct Pending {
    command: Command,
    bytes: usize,
    reply: oneshot::Sender<Result<CommandResult, KvError>>,
}

/// Handle to the batching loop.
#[derive(Debug, Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Pending>,
}

impl Batcher {
    /// Starts the batching loop for `raft`. It ends when every `Batcher` clone is dropped,
    /// after the writes in flight have finished.
    pub fn start(raft: Raft, config: &BatchConfig, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = mpsc::channel(config.queue as usize);
        tokio::spawn(run(raft, rx, config.clone(), metrics));
        Self { tx }
    }

    /// Submits one command and waits for its result.
    pub async fn submit(&self, command: Command) -> Result<CommandResult, KvError> {
        let (reply, rx) = oneshot::channel();
        let bytes = command.approx_bytes();
        self.tx.try_send(Pending { command, bytes, reply }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                KvError::Overloaded("the write queue is full (batch.queue)".into())
            }
            mpsc::error::TrySendError::Closed(_) => KvError::Stopping("member is shutting down".into()),
        })?;
        rx.await
            .unwrap_or_else(|_| Err(KvError::Indeterminate("the write was dropped while in flight".into())))
    }
}

async fn run(raft: Raft, mut rx: mpsc::Receiver<Pending>, config: BatchConfig, metrics: Arc<Metrics>) {
    let in_flight = config.in_flight as usize;
    let permits = Arc::new(Semaphore::new(in_flight));
    let mut carry: Option<Pending> = None;
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else { break };
        let first = match carry.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => break,
            },
        };
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        while batch.len() < config.max_commands as usize {
            match rx.try_recv() {
                Ok(p) if bytes + p.bytes > config.max_bytes as usize => {
                    carry = Some(p);
                    break;
                }
                Ok(p) => {
                    bytes += p.bytes;
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        metrics.batch_commands.observe(batch.len() as f64);
        metrics.batch_bytes.observe(bytes as f64);
        let raft = raft.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let (commands, replies): (Vec<_>, Vec<_>) =
                batch.into_iter().map(|p| (p.command, p.reply)).unzip();
            let n = commands.len();
            let outcome = raft.client_write(Batch { commands }).await;
            drop(permit);
            if !matches!(&outcome, Ok(resp) if resp.data.results.len() == n) {
                metrics.proposals_failed.inc();
            }
            match outcome {
                Ok(resp) if resp.data.results.len() == n => {
                    for (reply, result) in replies.into_iter().zip(resp.data.results) {
                        let _ = reply.send(Ok(result));
                    }
                }
                Ok(resp) => {
                    tracing::error!(
                        expected = n,
                        got = resp.data.results.len(),
                        "batch result count mismatch"
                    );
                    for reply in replies {
                        let _ = reply.send(Err(KvError::Indeterminate("batch result count mismatch".into())));
                    }
                }
                Err(e) => {
                    for reply in replies {
                        let _ = reply.send(Err(errors::client_write(&e)));
                    }
                }
            }
        });
    }
    // Queue closed: wait for the writes in flight so their callers get their results.
    let _ = permits.acquire_many(in_flight as u32).await;
}
