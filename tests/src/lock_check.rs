//! Mutual exclusion under faults: clients take a lease-based lock the way etcd's client-side
//! recipe does (`clientv3/concurrency.Mutex`) and do a read-modify-write of a counter inside it;
//! the checker fails on two holders at once, a lost increment, or a lease answered TTL 0 while
//! its holder kept renewing.
//!
//! Each client opens a session (etcd's `concurrency.Session`): it grants a lease (TTL `ttl`)
//! and renews it every `ttl / 3`, on a task of its own, for as long as the session lasts. A
//! renewal sent at `t` that answers a TTL proves the lease lives until `t + ttl` (the leader
//! counts from when it received the renewal, later than `t`): that is the client's *validity*.
//! While its validity lasts, the client takes the lock again and again:
//!
//! 1. creates `lock/chaos/<lease>` on the lease if absent, then waits until no key of the
//!    prefix has a smaller create revision (etcd's recipe waits for the predecessor's delete);
//! 2. holding the lock, reads the counter, sometimes works for up to half the TTL, and writes it
//!    back plus one, only while its validity has not run out and only if its key is still its
//!    own (the recipe's `IsOwner()` compare);
//! 3. deletes its key.
//!
//! A session whose validity runs out (or whose renewal answers TTL 0) ends: its lease is
//! revoked and the client opens another.
//!
//! A hold lasts from when the client saw itself first until it released, or until its
//! validity ran out if that came earlier: the lease (and so the key) cannot have ended before,
//! so no other client can legitimately hold the lock within it. The checks:
//!
//! * holds of different clients never overlap in time;
//! * no increment is lost: every acknowledged increment read a different value, and the final
//!   counter is their number plus at most the number of increments whose outcome is unknown;
//! * a lease is never answered TTL 0 before the client's validity from its previous renewal
//!   ran out (it kept renewing; a new leader, or a lagging one, must not end it).

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

use crate::harness::Endpoints;

/// The prefix of the lock's keys.
pub const LOCK_PREFIX: &str = "lock/chaos/";
/// The counter the holders increment.
pub const COUNTER: &str = "lock-counter";

/// A hold of the lock by one client.
#[derive(Debug, Clone, Copy)]
pub struct Hold {
    pub client: u32,
    pub start: Instant,
    pub end: Instant,
}

/// One read-modify-write of the counter inside a hold.
#[derive(Debug, Clone, Copy)]
pub struct Increment {
    pub client: u32,
    /// The value read; the value written is one more.
    pub read: i64,
    /// Whether the write's outcome is known to be success (false: unknown).
    pub acknowledged: bool,
}

/// A lease answered TTL 0 while its holder's validity had not run out.
#[derive(Debug, Clone)]
pub struct EarlyEnd {
    pub client: u32,
    pub lease: i64,
    /// How long before the validity from the previous renewal would have run out.
    pub early_by: Duration,
}

#[derive(Debug, Default)]
struct Records {
    holds: Vec<Hold>,
    increments: Vec<Increment>,
    early_ends: Vec<EarlyEnd>,
    renewals: u64,
    abandoned: u64,
    fenced: u64,
}

/// What the lock clients recorded.
#[derive(Debug, Default)]
pub struct LockRecords {
    pub holds: Vec<Hold>,
    pub increments: Vec<Increment>,
    pub early_ends: Vec<EarlyEnd>,
    pub renewals: u64,
    /// Attempts given up because the lease's validity ran out first (safe, and expected under
    /// faults).
    pub abandoned: u64,
    /// Increments refused because the client's key was gone when the write applied (its lease
    /// ended while it worked: safe, the fence did its job).
    pub fenced: u64,
}

/// The figures of a passing check.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LockFigures {
    pub holds: usize,
    pub increments: usize,
    pub unknown_increments: usize,
    pub renewals: u64,
    pub abandoned: u64,
    pub fenced: u64,
    pub counter: i64,
}

/// The lock clients of a scenario.
#[derive(Debug)]
pub struct LockWorkload {
    stop: Arc<AtomicBool>,
    records: Arc<Mutex<Records>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// A lease and the validity its renewals proved.
struct Session {
    lease: i64,
    /// The lease lives at least until this instant, as the grant and the renewals proved (it
    /// only moves forward: a renewal answered TTL 0 does not take back what an earlier one
    /// proved).
    valid_until: Mutex<Instant>,
    /// A renewal answered TTL 0: the session works no more.
    ended: AtomicBool,
    stop: AtomicBool,
}

impl Session {
    fn valid_until(&self) -> Instant {
        *self.valid_until.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn prove(&self, until: Instant) {
        let mut v = self.valid_until.lock().unwrap_or_else(|e| e.into_inner());
        *v = (*v).max(until);
    }

    /// Whether the lease provably lives for `margin` more (and was not answered TTL 0).
    fn valid_for(&self, margin: Duration) -> bool {
        !self.ended.load(Ordering::Relaxed) && Instant::now() + margin < self.valid_until()
    }
}

fn client_of(
    endpoints: &RwLock<Endpoints>,
    version: &mut u64,
    client: &mut Option<Client>,
) -> Option<Client> {
    let e = endpoints.read().unwrap_or_else(|e| e.into_inner());
    if e.version != *version || client.is_none() {
        *version = e.version;
        *client = Client::new(
            e.client.values().cloned().collect::<Vec<_>>(),
            e.options(Duration::from_secs(2), true),
        )
        .ok();
    }
    client.clone()
}

impl LockWorkload {
    /// Starts `clients` lock clients over `endpoints`, with leases of `ttl`.
    pub fn start(endpoints: Arc<RwLock<Endpoints>>, clients: u32, ttl: Duration, seed: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let records = Arc::new(Mutex::new(Records::default()));
        let tasks = (0..clients)
            .map(|id| {
                tokio::spawn(lock_client(id, endpoints.clone(), ttl, seed, stop.clone(), records.clone()))
            })
            .collect();
        Self { stop, records, tasks }
    }

    /// Stops the clients (each finishes what it is doing) and returns what they recorded.
    pub async fn stop(self) -> LockRecords {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        let r = std::mem::take(&mut *self.records.lock().unwrap_or_else(|e| e.into_inner()));
        LockRecords {
            holds: r.holds,
            increments: r.increments,
            early_ends: r.early_ends,
            renewals: r.renewals,
            abandoned: r.abandoned,
            fenced: r.fenced,
        }
    }
}

/// Renews `session`'s lease every `ttl / 3` until told to stop, recording its validity.
async fn renewer(
    id: u32,
    client: Client,
    session: Arc<Session>,
    ttl: Duration,
    records: Arc<Mutex<Records>>,
) {
    while !session.stop.load(Ordering::Relaxed) {
        let sent = Instant::now();
        match tokio::time::timeout(ttl / 3, client.lease_renew(session.lease)).await {
            Ok(Ok(0)) => {
                session.ended.store(true, Ordering::Relaxed);
                let until = session.valid_until();
                if until > Instant::now() {
                    records.lock().unwrap_or_else(|e| e.into_inner()).early_ends.push(EarlyEnd {
                        client: id,
                        lease: session.lease,
                        early_by: until - Instant::now(),
                    });
                }
                return;
            }
            Ok(Ok(_)) => {
                session.prove(sent + ttl);
                records.lock().unwrap_or_else(|e| e.into_inner()).renewals += 1;
            }
            Ok(Err(_)) | Err(_) => {}
        }
        let next = sent + ttl / 3;
        while Instant::now() < next && !session.stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn lock_client(
    id: u32,
    endpoints: Arc<RwLock<Endpoints>>,
    ttl: Duration,
    seed: u64,
    stop: Arc<AtomicBool>,
    records: Arc<Mutex<Records>>,
) {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(17).wrapping_add(u64::from(id)));
    let (mut version, mut cached) = (u64::MAX, None);
    // Work is done only while the lease provably outlives it by this much.
    let margin = ttl / 5;
    while !stop.load(Ordering::Relaxed) {
        let Some(client) = client_of(&endpoints, &mut version, &mut cached) else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        // A session (etcd's `concurrency.Session`): one lease, kept alive, for many holds.
        let granted_at = Instant::now();
        let Ok(grant) = client.lease_grant(ttl.as_secs() as i64, 0).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let session = Arc::new(Session {
            lease: grant.id,
            valid_until: Mutex::new(granted_at + ttl),
            ended: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let renewals = tokio::spawn(renewer(id, client.clone(), session.clone(), ttl, records.clone()));
        while !stop.load(Ordering::Relaxed) && session.valid_for(margin) {
            // Most holds are short; one in five works for up to half the TTL, across renewals
            // (and faults), so a lease that ends early ends under a holder.
            let work =
                if rng.gen_range(0..5) == 0 { ttl.mul_f64(rng.gen_range(0.0..0.5)) } else { Duration::ZERO };
            if !attempt(id, &client, &session, margin, work, &stop, &records).await {
                records.lock().unwrap_or_else(|e| e.into_inner()).abandoned += 1;
            }
            tokio::time::sleep(Duration::from_millis(rng.gen_range(5..40))).await;
        }
        session.stop.store(true, Ordering::Relaxed);
        let _ = renewals.await;
        let _ = client.lease_revoke(session.lease).await;
    }
}

/// One lock attempt in `session`: returns whether the lock was held (and released).
async fn attempt(
    id: u32,
    client: &Client,
    session: &Session,
    margin: Duration,
    work: Duration,
    stop: &AtomicBool,
    records: &Mutex<Records>,
) -> bool {
    let key = format!("{LOCK_PREFIX}{:016x}", session.lease);
    // Create the key on the lease if absent (etcd's recipe: Compare(CreateRevision == 0)).
    let create = pb::TxnRequest {
        compare: vec![pb::Compare {
            result: pb::compare::Result::Equal as i32,
            target: pb::compare::Target::Create as i32,
            key: key.clone().into_bytes(),
            target_union: Some(pb::compare::TargetUnion::CreateRevision(0)),
        }],
        success: vec![pb::RequestOp {
            request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                key: key.clone().into_bytes(),
                value: id.to_string().into_bytes(),
                lease: session.lease,
                prev_kv: false,
            })),
        }],
        failure: vec![],
    };
    if client.txn(create).await.is_err() {
        // Unknown outcome: the key may exist; it goes with the lease.
        return false;
    }
    // Wait until this key is the oldest of the prefix.
    let (acquired, mine) = loop {
        if stop.load(Ordering::Relaxed) || !session.valid_for(margin) {
            return false;
        }
        let page = client
            .range(pb::RangeRequest {
                key: LOCK_PREFIX.as_bytes().to_vec(),
                prefix: true,
                keys_only: true,
                ..Default::default()
            })
            .await;
        let Ok(page) = page else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let mine = page.kvs.iter().find(|kv| kv.key == key.as_bytes()).map(|kv| kv.create_revision);
        let Some(mine) = mine else { return false }; // the lease (and the key) ended
        if page.kvs.iter().all(|kv| kv.create_revision >= mine) {
            break (Instant::now(), mine);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The critical section: read the counter, and write it back plus one only while this
    // client's key is still the one it created (`concurrency.Mutex.IsOwner()`): a write whose
    // outcome is unknown and that lands late cannot overwrite a later holder's increment.
    if session.valid_for(margin) {
        if let Ok(current) = client.get(COUNTER).await {
            let read =
                current.map_or(Ok(0), |kv| String::from_utf8_lossy(&kv.value).parse::<i64>()).unwrap_or(-1);
            // The work the lock protects (the workload's shape, not a synchronisation point).
            tokio::time::sleep(work).await;
            if session.valid_for(margin) {
                let written = client.txn(increment(&key, mine, read)).await;
                let mut r = records.lock().unwrap_or_else(|e| e.into_inner());
                match written {
                    Ok(reply) if !reply.succeeded => r.fenced += 1,
                    written => {
                        r.increments.push(Increment { client: id, read, acknowledged: written.is_ok() })
                    }
                }
            }
        }
    }
    // Release: delete this client's key (if that fails, the key goes with the lease). The hold
    // ends when the release is sent: nothing is done under the lock after it, and the next
    // holder can only see itself first once the delete applied.
    let released = Instant::now();
    let _ = client.delete(pb::DeleteRequest { key: key.into_bytes(), ..Default::default() }).await;
    // The hold ends at the release, or earlier when the lease's validity ran out first.
    let until = session.valid_until();
    let end = released.min(until).max(acquired);
    records.lock().unwrap_or_else(|e| e.into_inner()).holds.push(Hold { client: id, start: acquired, end });
    true
}

/// `counter = read + 1` if `key` still has create revision `mine` (the lock is still held).
fn increment(key: &str, mine: i64, read: i64) -> pb::TxnRequest {
    pb::TxnRequest {
        compare: vec![pb::Compare {
            result: pb::compare::Result::Equal as i32,
            target: pb::compare::Target::Create as i32,
            key: key.as_bytes().to_vec(),
            target_union: Some(pb::compare::TargetUnion::CreateRevision(mine)),
        }],
        success: vec![pb::RequestOp {
            request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                key: COUNTER.as_bytes().to_vec(),
                value: (read + 1).to_string().into_bytes(),
                ..Default::default()
            })),
        }],
        failure: vec![],
    }
}

/// Checks the records; `counter` is the counter's final value. Returns the figures, or every
/// violation found.
pub fn check(records: &LockRecords, counter: i64) -> Result<LockFigures, Vec<String>> {
    let mut problems = Vec::new();
    let mut holds = records.holds.clone();
    holds.sort_by_key(|h| h.start);
    for (i, a) in holds.iter().enumerate() {
        for b in holds[i + 1..].iter().take_while(|b| b.start < a.end) {
            if b.client != a.client {
                problems.push(format!(
                    "clients {} and {} held the lock at once, for {:?}",
                    a.client,
                    b.client,
                    a.end.min(b.end) - b.start
                ));
            }
        }
    }
    let acknowledged: Vec<&Increment> = records.increments.iter().filter(|i| i.acknowledged).collect();
    let unknown = records.increments.len() - acknowledged.len();
    let mut reads: Vec<i64> = acknowledged.iter().map(|i| i.read).collect();
    reads.sort_unstable();
    for w in reads.windows(2) {
        if w[0] == w[1] {
            problems.push(format!("two increments read the counter at {}: one was lost", w[0]));
        }
    }
    if reads.contains(&-1) {
        problems.push("the counter held something that is not a number".into());
    }
    let least = acknowledged.len() as i64;
    if counter < least || counter > least + unknown as i64 {
        problems.push(format!(
            "the counter is {counter} after {least} acknowledged increments and {unknown} of unknown outcome"
        ));
    }
    for e in &records.early_ends {
        problems.push(format!(
            "client {}'s lease {} was answered TTL 0 {:?} before the validity of its last renewal ran out",
            e.client, e.lease, e.early_by
        ));
    }
    if problems.is_empty() {
        Ok(LockFigures {
            holds: holds.len(),
            increments: acknowledged.len(),
            unknown_increments: unknown,
            renewals: records.renewals,
            abandoned: records.abandoned,
            fenced: records.fenced,
            counter,
        })
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_holds_lost_increments_and_early_ends_are_caught() {
        let t = Instant::now();
        let s = Duration::from_secs(1);
        let hold = |client, a: u32, b: u32| Hold { client, start: t + s * a, end: t + s * b };
        let inc = |client, read| Increment { client, read, acknowledged: true };
        let fine = LockRecords {
            holds: vec![hold(0, 0, 2), hold(1, 2, 3), hold(0, 4, 5)],
            increments: vec![inc(0, 0), inc(1, 1), inc(0, 2)],
            ..Default::default()
        };
        assert!(check(&fine, 3).is_ok());
        let overlap = LockRecords { holds: vec![hold(0, 0, 3), hold(1, 2, 4)], ..Default::default() };
        assert!(check(&overlap, 0).unwrap_err()[0].contains("at once"));
        let lost = LockRecords { increments: vec![inc(0, 0), inc(1, 0)], ..Default::default() };
        let problems = check(&lost, 1).unwrap_err();
        assert!(problems.iter().any(|p| p.contains("was lost")), "{problems:?}");
        let unknown = LockRecords {
            increments: vec![inc(0, 0), Increment { client: 1, read: 1, acknowledged: false }],
            ..Default::default()
        };
        assert!(check(&unknown, 1).is_ok() && check(&unknown, 2).is_ok() && check(&unknown, 3).is_err());
        let early = LockRecords {
            early_ends: vec![EarlyEnd { client: 2, lease: 7, early_by: s }],
            ..Default::default()
        };
        assert!(check(&early, 0).unwrap_err()[0].contains("TTL 0"));
    }
}
