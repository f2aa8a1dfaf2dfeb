//! A concurrent workload that records a history for the linearizability checker.
//!
//! Each client loops over put / get / compare-and-swap on a small rotating key set (4 keys per
//! 5-second epoch, so each key's history stays short enough to check). Every written value is
//! unique (`c<client>-<seq>`). Each operation is recorded with call and return times from one
//! monotonic clock (nanoseconds since the workload started) and an outcome:
//!
//! * **ok** — the answer is known;
//! * **failed** — certainly not applied (the server said so, or nothing was sent): dropped
//!   from the history, it had no effect;
//! * **indeterminate** — a write whose outcome is unknown (timeout, connection lost mid-call):
//!   kept with return time "never", so the checker may place it anywhere after its call, or
//!   treat it as not having happened.
//!
//! Clients go to any pod (no leader following) and never retry a write whose outcome is
//! unknown; the kvset client only retries writes the server reported as not applied, which
//! leaves one operation with one call and one return in the history.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::RwLock;
use std::time::Duration;
use std::time::Instant;

use kvset_client::pb;
use kvset_client::Client;
use rand::rngs::StdRng;
use rand::Rng;
use rand::SeedableRng;
use serde::Serialize;
use tokio::task::JoinHandle;

use crate::harness::Endpoints;

/// Return time of an operation whose outcome is unknown.
pub const NEVER: i64 = i64::MAX;

/// What an operation did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Kind {
    Put {
        value: String,
    },
    Get {
        result: Option<String>,
    },
    /// `succeeded` is `None` when the outcome is unknown.
    Cas {
        expected: Option<String>,
        new: String,
        succeeded: Option<bool>,
    },
}

impl Kind {
    /// The value this operation may have written.
    pub fn written(&self) -> Option<&str> {
        match self {
            Kind::Put { value } => Some(value),
            Kind::Cas { new, succeeded: Some(true) | None, .. } => Some(new),
            _ => None,
        }
    }

    /// Whether this is a write (put or CAS).
    pub fn is_write(&self) -> bool {
        !matches!(self, Kind::Get { .. })
    }
}

/// One recorded operation.
#[derive(Debug, Clone, Serialize)]
pub struct Op {
    pub client: u32,
    pub key: String,
    pub kind: Kind,
    pub call_ns: i64,
    /// [`NEVER`] when indeterminate.
    pub return_ns: i64,
    /// For an acknowledged write: the store revision it was applied at (0 otherwise).
    pub revision: i64,
}

impl Op {
    /// Whether the outcome is unknown.
    pub fn indeterminate(&self) -> bool {
        self.return_ns == NEVER
    }
}

/// A shared, append-only history.
#[derive(Debug)]
pub struct History {
    start: Instant,
    ops: Mutex<Vec<Op>>,
    /// Operations attempted (including those dropped as certainly failed).
    pub attempted: std::sync::atomic::AtomicU64,
}

impl History {
    /// An empty history whose clock starts now.
    pub fn new() -> Arc<Self> {
        Arc::new(Self { start: Instant::now(), ops: Mutex::default(), attempted: Default::default() })
    }

    /// Nanoseconds since the start.
    pub fn now(&self) -> i64 {
        self.start.elapsed().as_nanos() as i64
    }

    fn push(&self, op: Op) {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).push(op);
    }

    /// Every recorded operation.
    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Every key operated on.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.ops().into_iter().map(|o| o.key).collect();
        keys.sort();
        keys.dedup();
        keys
    }
}

/// Builds a client for the current endpoints.
fn client_for(endpoints: &RwLock<Endpoints>, timeout: Duration) -> Option<(u64, Client)> {
    let e = endpoints.read().unwrap_or_else(|e| e.into_inner());
    let list: Vec<String> = e.client.values().cloned().collect();
    let client = Client::new(list, e.options(timeout, false)).ok()?;
    Some((e.version, client))
}

/// Running workload clients.
#[derive(Debug)]
pub struct Workload {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
    pub history: Arc<History>,
}

/// What happened to one call.
enum Outcome<T> {
    Ok(T),
    Failed,
    Unknown,
}

fn classify<T>(r: Result<T, kvset_client::Error>) -> Outcome<T> {
    match r {
        Ok(v) => Outcome::Ok(v),
        Err(e) if e.not_applied() => Outcome::Failed,
        Err(_) => Outcome::Unknown,
    }
}

impl Workload {
    /// Starts `clients` clients against the pods in `endpoints`.
    pub fn start(endpoints: Arc<RwLock<Endpoints>>, clients: u32, seed: u64, history: Arc<History>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..clients)
            .map(|c| {
                let (endpoints, stop, history) = (endpoints.clone(), stop.clone(), history.clone());
                tokio::spawn(async move { run_client(c, seed, endpoints, stop, history).await })
            })
            .collect();
        Self { stop, tasks, history }
    }

    /// Stops the clients, letting calls in flight finish (each is bounded by its deadline).
    pub async fn stop(self) -> Arc<History> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            // A client that panicked would leave a shorter history that still checks out.
            t.await.expect("a workload client panicked");
        }
        self.history
    }
}

async fn run_client(
    id: u32,
    seed: u64,
    endpoints: Arc<RwLock<Endpoints>>,
    stop: Arc<AtomicBool>,
    history: Arc<History>,
) {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(31).wrapping_add(id as u64));
    let timeout = Duration::from_secs(3);
    let mut current = client_for(&endpoints, timeout);
    let mut seq = 0u64;
    let mut last_seen: BTreeMap<String, Option<String>> = BTreeMap::new();
    while !stop.load(Ordering::Relaxed) {
        let version = endpoints.read().unwrap_or_else(|e| e.into_inner()).version;
        if current.as_ref().map(|(v, _)| *v) != Some(version) {
            current = client_for(&endpoints, timeout);
        }
        let Some((_, client)) = current.clone() else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let epoch = history.start.elapsed().as_secs() / 5;
        let key = format!("k{epoch}-{}", rng.gen_range(0..4));
        let dice = rng.gen_range(0..100);
        history.attempted.fetch_add(1, Ordering::Relaxed);
        let call_ns = history.now();
        if dice < 40 {
            seq += 1;
            let value = format!("c{id}-{seq}");
            let outcome = classify(client.put(key.clone(), value.clone()).await);
            let return_ns = history.now();
            match outcome {
                Outcome::Ok(resp) => {
                    history.push(Op {
                        client: id,
                        key: key.clone(),
                        kind: Kind::Put { value: value.clone() },
                        call_ns,
                        return_ns,
                        revision: resp.header.map_or(0, |h| h.revision),
                    });
                    last_seen.insert(key, Some(value));
                }
                Outcome::Unknown => {
                    history.push(Op {
                        client: id,
                        key,
                        kind: Kind::Put { value },
                        call_ns,
                        return_ns: NEVER,
                        revision: 0,
                    });
                }
                Outcome::Failed => {}
            }
        } else if dice < 80 {
            let outcome = classify(client.get(key.clone()).await);
            let return_ns = history.now();
            if let Outcome::Ok(kv) = outcome {
                let result = kv.map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
                history.push(Op {
                    client: id,
                    key: key.clone(),
                    kind: Kind::Get { result: result.clone() },
                    call_ns,
                    return_ns,
                    revision: 0,
                });
                last_seen.insert(key, result);
            }
        } else {
            seq += 1;
            let new = format!("c{id}-{seq}");
            let expected = last_seen.get(&key).cloned().flatten();
            let outcome = classify(
                client
                    .compare_and_swap(key.clone(), expected.as_deref().map(str::as_bytes), new.clone())
                    .await,
            );
            let return_ns = history.now();
            match outcome {
                Outcome::Ok(resp) => {
                    history.push(Op {
                        client: id,
                        key: key.clone(),
                        kind: Kind::Cas { expected, new: new.clone(), succeeded: Some(resp.succeeded) },
                        call_ns,
                        return_ns,
                        revision: if resp.succeeded { resp.header.map_or(0, |h| h.revision) } else { 0 },
                    });
                    if resp.succeeded {
                        last_seen.insert(key, Some(new));
                    }
                }
                Outcome::Unknown => {
                    history.push(Op {
                        client: id,
                        key,
                        kind: Kind::Cas { expected, new, succeeded: None },
                        call_ns,
                        return_ns: NEVER,
                        revision: 0,
                    });
                }
                Outcome::Failed => {}
            }
        }
        // A little think time keeps per-key histories checkable.
        tokio::time::sleep(Duration::from_millis(rng.gen_range(5..25))).await;
    }
}

/// After the faults healed: reads every key linearizably (retrying until `deadline`) and
/// records the reads in the history, so the checker also verifies the final state.
pub async fn final_reads(
    endpoints: &RwLock<Endpoints>,
    history: &History,
    deadline: Duration,
) -> Result<(), String> {
    let (_, client) = client_for(endpoints, Duration::from_secs(5)).ok_or("no endpoints")?;
    let until = Instant::now() + deadline;
    for key in history.keys() {
        loop {
            let call_ns = history.now();
            match client
                .get_request(pb::GetRequest {
                    key: key.clone().into_bytes(),
                    consistency: pb::ReadConsistency::Linearizable as i32,
                    revision: 0,
                })
                .await
            {
                Ok(r) => {
                    let result = r.kv.map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
                    history.push(Op {
                        client: u32::MAX,
                        key: key.clone(),
                        kind: Kind::Get { result },
                        call_ns,
                        return_ns: history.now(),
                        revision: 0,
                    });
                    break;
                }
                Err(e) if Instant::now() < until => {
                    tracing::debug!(error = %e, "final read retry");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(format!("final read of {key} failed: {e}")),
            }
        }
    }
    Ok(())
}
