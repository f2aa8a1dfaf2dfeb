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

use std::sync::Arc;
use std::sync::Mutex;

use kvset_storage::Member;
use kvset_storage::TypeConfig;
use openraft::error::CheckIsLeaderError;
use openraft::error::RaftError;
use openraft::Raft;
use tokio::sync::oneshot;

use crate::metrics::Metrics;

/// Why a round could not confirm a read.
#[derive(Debug, Clone)]
pub enum ReadIndexError {
    /// This member is not the leader.
    NotLeader { leader_id: Option<u64>, leader: Option<Member> },
    /// Leadership could not be confirmed with a quorum.
    NoQuorum(String),
    /// Raft stopped.
    Stopped(String),
}

#[derive(Default)]
struct State {
    running: bool,
    waiters: Vec<oneshot::Sender<Result<(), ReadIndexError>>>,
}

/// Batches linearizable reads into shared ReadIndex rounds.
pub struct ReadIndex {
    raft: Raft<TypeConfig>,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
}

impl std::fmt::Debug for ReadIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadIndex").finish_non_exhaustive()
    }
}

impl ReadIndex {
    /// A batcher for `raft`; each round's size goes to `metrics.read_index_reads`.
    pub fn new(raft: Raft<TypeConfig>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self { raft, metrics, state: Mutex::default() })
    }

    /// Waits for a ReadIndex round that started after this call.
    pub async fn wait(self: &Arc<Self>) -> Result<(), ReadIndexError> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st.waiters.push(tx);
            !std::mem::replace(&mut st.running, true)
        };
        if start {
            tokio::spawn(self.clone().rounds());
        }
        rx.await.unwrap_or_else(|_| Err(ReadIndexError::Stopped("read index task ended".into())))
    }

    async fn rounds(self: Arc<Self>) {
        loop {
            let batch = {
                let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                if st.waiters.is_empty() {
                    st.running = false;
                    return;
                }
                std::mem::take(&mut st.waiters)
            };
            self.metrics.read_index_reads.observe(batch.len() as f64);
            let result = match self.raft.ensure_linearizable().await {
                Ok(_) => Ok(()),
                Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                    Err(ReadIndexError::NotLeader { leader_id: f.leader_id, leader: f.leader_node })
                }
                Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q))) => {
                    Err(ReadIndexError::NoQuorum(q.to_string()))
                }
                Err(RaftError::Fatal(f)) => Err(ReadIndexError::Stopped(f.to_string())),
            };
            for waiter in batch {
                let _ = waiter.send(result.clone());
            }
        }
    }
}
