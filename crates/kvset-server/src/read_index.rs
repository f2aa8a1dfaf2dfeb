//! Linearizable reads share ReadIndex rounds.
//!
//! A linearizable read on the leader needs a ReadIndex round: confirm leadership with a quorum
//! (a heartbeat round trip) and wait until the state machine has applied the commit index of
//! that moment (openraft's `ensure_linearizable`). One round per read makes reads cost as much
//! as a heartbeat each; instead, reads that arrive while a round is running wait for the next
//! round, and one round serves them all.
//!
//! Why it stays linearizable: a read only uses a round that *started after the read arrived*
//! (a round takes exactly the waiters queued before it starts), so the read index it confirms
//! covers every write acknowledged before the read was sent.
//!
//! The reads waiting at once — queued for the next round plus those of the round in flight —
//! are bounded (`limits.pending_reads_max`): past it a read is refused at once with
//! [`KvError::Overloaded`] instead of queueing without limit behind a slow quorum.

use std::sync::Arc;
use std::sync::Mutex;

use kvset_storage::Raft;
use tokio::sync::oneshot;

use crate::errors;
use crate::errors::KvError;
use crate::metrics::Metrics;

type Waiter = oneshot::Sender<Result<(), KvError>>;

#[derive(Default)]
struct State {
    running: bool,
    waiters: Vec<Waiter>,
    /// Reads of the round in flight.
    in_flight: usize,
}

/// Batches linearizable reads into shared ReadIndex rounds.
pub struct ReadIndex {
    raft: Raft,
    metrics: Arc<Metrics>,
    max_waiters: usize,
    state: Mutex<State>,
}

impl std::fmt::Debug for ReadIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadIndex").field("max_waiters", &self.max_waiters).finish_non_exhaustive()
    }
}

impl ReadIndex {
    /// Rounds for `raft`, with at most `max_waiters` reads waiting at once; each round's size
    /// goes to `metrics.read_index_reads`.
    pub fn new(raft: Raft, metrics: Arc<Metrics>, max_waiters: usize) -> Arc<Self> {
        Arc::new(Self { raft, metrics, max_waiters: max_waiters.max(1), state: Mutex::default() })
    }

    /// Waits for a ReadIndex round that started after this call.
    pub async fn wait(self: &Arc<Self>) -> Result<(), KvError> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let waiting = st.waiters.len() + st.in_flight;
            if waiting >= self.max_waiters {
                return Err(KvError::Overloaded(format!(
                    "{waiting} linearizable reads are already waiting for leadership confirmation \
                     (limits.pending_reads_max = {})",
                    self.max_waiters
                )));
            }
            st.waiters.push(tx);
            !std::mem::replace(&mut st.running, true)
        };
        if start {
            tokio::spawn(self.clone().rounds());
        }
        rx.await.unwrap_or_else(|_| Err(KvError::Unavailable("the read index task ended".into())))
    }

    async fn rounds(self: Arc<Self>) {
        loop {
            let batch = {
                let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                st.in_flight = 0;
                if st.waiters.is_empty() {
                    st.running = false;
                    return;
                }
                st.in_flight = st.waiters.len();
                std::mem::take(&mut st.waiters)
            };
            self.metrics.read_index_reads.observe(batch.len() as f64);
            let result = match self.raft.ensure_linearizable(openraft::ReadPolicy::ReadIndex).await {
                Ok(_) => Ok(()),
                Err(e) => Err(errors::read_index(&e)),
            };
            for waiter in batch {
                let _ = waiter.send(result.clone());
            }
        }
    }
}
