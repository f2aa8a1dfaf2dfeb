//! Watchers that record what they receive through faults, and the checker of etcd's watch
//! guarantees (as etcd's robustness tests check them, `tests/robustness/validate/watch.go`).
//!
//! Each [`WatchRecorder`] watcher holds a raw kvset.v1 Watch stream on some member: a prefix
//! watch over the workload's keys from revision 1, with `prev_kv`, asking for progress every
//! second. When its stream breaks it opens a new one on another member from the revision after
//! the last one it was told about (events or progress) — the resumption a client does — and
//! records that it did. It records every response exactly as received.
//!
//! After healing, the *reference* is the full event history from revision 1, read by a fresh
//! watch on every member (they must all agree), and tied to the workload: every acknowledged
//! write must appear in it, at the revision its response named, with its value. The checker
//! then verifies, per watcher:
//!
//! * **ordered** — event revisions never decrease (across reconnects too);
//! * **unique** — no (revision, key) is delivered twice;
//! * **atomic** — a revision's events arrive in one response, all of them;
//! * **reliable** — the delivered events equal the reference between the first revision
//!   requested and the last revision the watcher was told about;
//! * **resumable** — after a reconnect from revision s, the first event is the reference's first
//!   event at or after s;
//! * **bookmarkable** — after a progress response at revision R, no event at or below R arrives;
//! * **prev_kv** — every event's previous key equals the key's state at revision − 1.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::RwLock;
use std::time::Duration;

use futures::StreamExt;
use kvset_client::pb;
use serde::Serialize;
use tokio::task::JoinHandle;

use crate::harness::Endpoints;
use crate::history::Kind;
use crate::history::Op;

/// One event as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ev {
    pub revision: i64,
    pub key: String,
    /// `None` for a delete.
    pub value: Option<String>,
    /// The previous value and its mod revision, when the key existed.
    pub prev: Option<(String, i64)>,
}

impl Ev {
    fn of(e: &pb::Event) -> Ev {
        let kv = e.kv.clone().unwrap_or_default();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        Ev {
            revision: kv.mod_revision,
            key: text(&kv.key),
            value: (e.r#type != pb::event::EventType::Delete as i32).then(|| text(&kv.value)),
            prev: e.prev_kv.as_ref().map(|p| (text(&p.value), p.mod_revision)),
        }
    }
}

/// One thing a watcher saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Record {
    /// A stream was (re)opened, asking for events from `start`.
    Opened {
        start: i64,
    },
    Events(Vec<Ev>),
    Progress {
        revision: i64,
    },
    /// The stream broke.
    Broken {
        reason: String,
    },
}

/// Watchers recording through a scenario.
#[derive(Debug)]
pub struct WatchRecorder {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
    records: Vec<Arc<Mutex<Vec<Record>>>>,
}

/// The watched prefix (the workload's keys).
pub const PREFIX: &str = "k";

impl WatchRecorder {
    /// Starts `n` watchers over the members in `endpoints`.
    pub fn start(endpoints: Arc<RwLock<Endpoints>>, n: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        let mut records = Vec::new();
        for i in 0..n {
            let log = Arc::new(Mutex::new(Vec::new()));
            records.push(log.clone());
            let (endpoints, stop) = (endpoints.clone(), stop.clone());
            tasks.push(tokio::spawn(async move { watcher(i, endpoints, stop, log).await }));
        }
        Self { stop, tasks, records }
    }

    /// Stops the watchers; returns what each recorded.
    pub async fn stop(self) -> Vec<Vec<Record>> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        self.records.iter().map(|r| r.lock().unwrap_or_else(|e| e.into_inner()).clone()).collect()
    }
}

fn create(start: i64) -> pb::WatchRequest {
    pb::WatchRequest {
        request: Some(pb::watch_request::Request::Create(pb::WatchCreateRequest {
            key: PREFIX.as_bytes().to_vec(),
            prefix: true,
            start_revision: start,
            prev_kv: true,
            ..Default::default()
        })),
    }
}

fn progress() -> pb::WatchRequest {
    pb::WatchRequest { request: Some(pb::watch_request::Request::Progress(pb::WatchProgressRequest {})) }
}

async fn watcher(
    id: u32,
    endpoints: Arc<RwLock<Endpoints>>,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Record>>>,
) {
    let push = |r: Record| log.lock().unwrap_or_else(|e| e.into_inner()).push(r);
    let mut next = 1i64;
    let mut turn = id as usize;
    while !stop.load(Ordering::Relaxed) {
        let endpoint = {
            let e = endpoints.read().unwrap_or_else(|e| e.into_inner());
            let list: Vec<&String> = e.client.values().collect();
            if list.is_empty() {
                None
            } else {
                turn += 1;
                Some(list[turn % list.len()].clone())
            }
        };
        let Some(endpoint) = endpoint else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let channel =
            endpoints.read().unwrap_or_else(|e| e.into_inner()).channel(&endpoint, Duration::from_secs(1));
        let outcome = async {
            let channel = channel?;
            let (tx, rx) = tokio::sync::mpsc::channel(8);
            tx.send(create(next)).await.map_err(|e| e.to_string())?;
            let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            request.metadata_mut().insert("hasleader", tonic::metadata::MetadataValue::from_static("true"));
            let mut kv = kvset_proto::v1::kv_client::KvClient::new(channel);
            let mut responses = tokio::time::timeout(Duration::from_secs(3), kv.watch(request))
                .await
                .map_err(|_| "timed out opening the stream".to_string())?
                .map_err(|s| s.message().to_string())?
                .into_inner();
            push(Record::Opened { start: next });
            let mut ask = tokio::time::interval(Duration::from_secs(1));
            loop {
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                tokio::select! {
                    _ = ask.tick() => { let _ = tx.send(progress()).await; }
                    r = tokio::time::timeout(Duration::from_millis(500), responses.next()) => match r {
                        Err(_) => {}
                        Ok(None) => return Err("the member closed the stream".to_string()),
                        Ok(Some(Err(s))) => return Err(s.message().to_string()),
                        Ok(Some(Ok(r))) => {
                            let revision = r.header.as_ref().map_or(0, |h| h.revision);
                            if r.canceled {
                                return Err(format!("canceled: {} (compact revision {})", r.cancel_reason, r.compact_revision));
                            }
                            if r.progress {
                                next = next.max(revision + 1);
                                push(Record::Progress { revision });
                            } else if !r.events.is_empty() {
                                let evs: Vec<Ev> = r.events.iter().map(Ev::of).collect();
                                next = next.max(evs.iter().map(|e| e.revision).max().unwrap_or(0) + 1);
                                push(Record::Events(evs));
                            }
                        }
                    },
                }
            }
        }
        .await;
        match outcome {
            Ok(()) => return,
            Err(reason) => {
                push(Record::Broken { reason });
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// The full event history (from revision 1 to at least `to`) as one member serves it.
pub async fn reference(
    endpoint: &str,
    channel: tonic::transport::Channel,
    to: i64,
    timeout: Duration,
) -> Result<Vec<Ev>, String> {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(create(1)).await.map_err(|e| e.to_string())?;
    let mut kv = kvset_proto::v1::kv_client::KvClient::new(channel);
    let mut responses = kv
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("{endpoint}: {}", s.message()))?
        .into_inner();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let _ = tx.send(progress()).await;
        let r = tokio::time::timeout_at(deadline, responses.next())
            .await
            .map_err(|_| format!("{endpoint}: the reference watch did not reach revision {to}"))?
            .ok_or_else(|| format!("{endpoint}: the reference watch ended"))?
            .map_err(|s| format!("{endpoint}: {}", s.message()))?;
        if r.canceled {
            return Err(format!("{endpoint}: reference watch canceled: {}", r.cancel_reason));
        }
        out.extend(r.events.iter().map(Ev::of));
        if r.progress && r.header.as_ref().is_some_and(|h| h.revision >= to) {
            return Ok(out);
        }
    }
}

/// What the checks found, for the figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WatchFigures {
    pub watchers: usize,
    pub reference_events: usize,
    pub delivered_events: usize,
    pub reconnects: usize,
    pub progress_responses: usize,
}

/// Checks every watcher's records against the reference and the workload's acknowledged
/// writes. Returns the figures, or every violation found.
pub fn check(records: &[Vec<Record>], reference: &[Ev], ops: &[Op]) -> Result<WatchFigures, Vec<String>> {
    let mut problems = Vec::new();
    // The reference itself: revisions ascend, (revision, key) unique, prev_kv = the state at
    // revision - 1, and every acknowledged write is in it.
    let mut state: BTreeMap<String, (String, i64)> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    let mut last = 0;
    for e in reference {
        if e.revision < last {
            problems.push(format!("reference: revision {} after {last}", e.revision));
        }
        last = e.revision;
        if !seen.insert((e.revision, e.key.clone())) {
            problems.push(format!("reference: ({}, {}) twice", e.revision, e.key));
        }
        if e.prev != state.get(&e.key).cloned() {
            problems.push(format!(
                "reference: prev_kv of {} at {} is {:?}, the state was {:?}",
                e.key,
                e.revision,
                e.prev,
                state.get(&e.key)
            ));
        }
        match &e.value {
            Some(v) => state.insert(e.key.clone(), (v.clone(), e.revision)),
            None => state.remove(&e.key),
        };
    }
    let by_revision_key: BTreeMap<(i64, &str), &Ev> =
        reference.iter().map(|e| ((e.revision, e.key.as_str()), e)).collect();
    for op in ops.iter().filter(|o| o.revision > 0 && o.key.starts_with(PREFIX)) {
        let wrote = match &op.kind {
            Kind::Put { value } => Some(value),
            Kind::Cas { new, succeeded: Some(true), .. } => Some(new),
            _ => None,
        };
        let Some(value) = wrote else { continue };
        match by_revision_key.get(&(op.revision, op.key.as_str())) {
            Some(e) if e.value.as_ref() == Some(value) => {}
            other => problems.push(format!(
                "the acknowledged write {}={value} at revision {} is not in the event history (found {other:?})",
                op.key, op.revision
            )),
        }
    }

    let mut figures =
        WatchFigures { watchers: records.len(), reference_events: reference.len(), ..Default::default() };
    for (w, recs) in records.iter().enumerate() {
        let mut delivered: Vec<Ev> = Vec::new();
        let mut unique = BTreeSet::new();
        let mut bookmark = 0i64;
        let mut told = 0i64;
        let mut resume_from: Option<i64> = None;
        let mut first_start = None;
        for r in recs {
            match r {
                Record::Opened { start } => {
                    first_start.get_or_insert(*start);
                    resume_from = Some(*start);
                    if first_start != Some(*start) {
                        figures.reconnects += 1;
                    }
                }
                Record::Broken { .. } => {}
                Record::Progress { revision } => {
                    figures.progress_responses += 1;
                    bookmark = bookmark.max(*revision);
                    told = told.max(*revision);
                }
                Record::Events(evs) => {
                    if let Some(start) = resume_from.take() {
                        let expected = reference.iter().find(|e| e.revision >= start);
                        if expected.map(|e| (e.revision, &e.key)) != evs.first().map(|e| (e.revision, &e.key))
                        {
                            problems.push(format!(
                                "watcher {w}: resumed at {start}, first event {:?}, expected {:?}",
                                evs.first().map(|e| (e.revision, &e.key)),
                                expected.map(|e| (e.revision, &e.key))
                            ));
                        }
                    }
                    for rev in evs.iter().map(|e| e.revision).collect::<BTreeSet<_>>() {
                        let here = evs.iter().filter(|e| e.revision == rev).count();
                        let all = reference.iter().filter(|e| e.revision == rev).count();
                        if here != all {
                            problems.push(format!("watcher {w}: revision {rev} split: {here} of its {all} events in one response"));
                        }
                    }
                    for e in evs {
                        if e.revision <= bookmark {
                            problems.push(format!(
                                "watcher {w}: event at {} after a progress response at {bookmark}",
                                e.revision
                            ));
                        }
                        if delivered.last().is_some_and(|l| e.revision < l.revision) {
                            problems.push(format!(
                                "watcher {w}: event at {} after one at {}",
                                e.revision,
                                delivered.last().map_or(0, |l| l.revision)
                            ));
                        }
                        if !unique.insert((e.revision, e.key.clone())) {
                            problems
                                .push(format!("watcher {w}: ({}, {}) delivered twice", e.revision, e.key));
                        }
                        match by_revision_key.get(&(e.revision, e.key.as_str())) {
                            Some(r) if *r == e => {}
                            other => problems
                                .push(format!("watcher {w}: delivered {e:?}, the history has {other:?}")),
                        }
                        told = told.max(e.revision);
                        delivered.push(e.clone());
                    }
                }
            }
        }
        figures.delivered_events += delivered.len();
        // Reliable: everything between the first requested revision and the last one the
        // watcher was told about, exactly once.
        let from = first_start.unwrap_or(1);
        let expected: Vec<&Ev> =
            reference.iter().filter(|e| e.revision >= from && e.revision <= told).collect();
        let got: Vec<&Ev> = delivered.iter().collect();
        if expected != got {
            let missing: Vec<_> = expected.iter().filter(|e| !got.contains(e)).take(3).collect();
            problems.push(format!(
                "watcher {w}: delivered {} events for revisions {from}..={told}, the history has {} (missing e.g. {missing:?})",
                got.len(),
                expected.len()
            ));
        }
    }
    if problems.is_empty() {
        Ok(figures)
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(revision: i64, key: &str, value: Option<&str>, prev: Option<(&str, i64)>) -> Ev {
        Ev {
            revision,
            key: key.into(),
            value: value.map(String::from),
            prev: prev.map(|(v, r)| (v.to_string(), r)),
        }
    }

    fn reference() -> Vec<Ev> {
        vec![
            ev(2, "k1", Some("a"), None),
            ev(3, "k1", Some("b"), Some(("a", 2))),
            ev(3, "k2", Some("c"), None),
            ev(4, "k1", None, Some(("b", 3))),
            ev(5, "k2", Some("d"), Some(("c", 3))),
        ]
    }

    fn good() -> Vec<Record> {
        let r = reference();
        vec![
            Record::Opened { start: 1 },
            Record::Events(vec![r[0].clone(), r[1].clone(), r[2].clone()]),
            Record::Broken { reason: "leader killed".into() },
            Record::Opened { start: 4 },
            Record::Events(vec![r[3].clone()]),
            Record::Progress { revision: 4 },
            Record::Events(vec![r[4].clone()]),
        ]
    }

    #[test]
    fn a_faithful_watcher_passes() {
        let figures = check(&[good()], &reference(), &[]).unwrap();
        assert_eq!((figures.delivered_events, figures.reconnects, figures.progress_responses), (5, 1, 1));
    }

    #[test]
    fn a_dropped_event_is_caught() {
        let mut recs = good();
        recs[4] = Record::Events(vec![]);
        let err = check(&[recs], &reference(), &[]).unwrap_err().join("\n");
        assert!(err.contains("delivered 4 events"), "{err}");
    }

    #[test]
    fn every_other_violation_is_caught() {
        let r = reference();
        let cases: Vec<(Vec<Record>, &str)> = vec![
            (
                vec![
                    Record::Opened { start: 1 },
                    Record::Events(vec![r[0].clone(), r[1].clone()]),
                    Record::Events(vec![r[2].clone()]),
                ],
                "split",
            ),
            (
                vec![
                    Record::Opened { start: 1 },
                    Record::Events(vec![r[0].clone()]),
                    Record::Events(vec![r[0].clone()]),
                ],
                "twice",
            ),
            (
                vec![
                    Record::Opened { start: 1 },
                    Record::Events(vec![r[3].clone()]),
                    Record::Events(vec![r[0].clone()]),
                ],
                "after one at",
            ),
            (
                vec![
                    Record::Opened { start: 1 },
                    Record::Progress { revision: 4 },
                    Record::Events(vec![r[3].clone()]),
                ],
                "after a progress response",
            ),
            (vec![Record::Opened { start: 4 }, Record::Events(vec![r[4].clone()])], "resumed at 4"),
            (
                vec![
                    Record::Opened { start: 5 },
                    Record::Events(vec![ev(5, "k2", Some("d"), Some(("c", 2)))]),
                ],
                "the history has",
            ),
        ];
        for (recs, want) in cases {
            let err = check(&[recs], &r, &[]).unwrap_err().join("\n");
            assert!(err.contains(want), "expected {want:?} in {err}");
        }
    }

    #[test]
    fn a_bad_reference_or_a_missing_acknowledged_write_is_caught() {
        let mut r = reference();
        r[1].prev = None;
        assert!(check(&[], &r, &[]).unwrap_err().join("").contains("prev_kv"));
        let op = Op {
            client: 0,
            key: "k9".into(),
            kind: Kind::Put { value: "z".into() },
            call_ns: 0,
            return_ns: 1,
            revision: 6,
        };
        assert!(check(&[], &reference(), &[op]).unwrap_err().join("").contains("not in the event history"));
    }
}
