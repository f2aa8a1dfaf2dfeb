//! Watch streams, served by any member from its own applied state.
//!
//! One task per stream holds the stream's watches. It learns of new revisions from the state
//! machine's announcements and *pulls* each watch's events (`SmReader::events`: recent ones
//! from memory, older ones from the records on disk), filters them, and sends responses
//! through the stream's bounded queue. Nothing here is pushed from apply, so:
//!
//! * **a slow watcher never holds up apply or other streams**: only its own stream task waits
//!   on its full queue; when it resumes, events it missed in memory are read from the history;
//!   if compaction passed its position, the watch is canceled with the compact revision;
//! * **ordered, unique, atomic**: each watch keeps the next revision to deliver and moves it
//!   forward only after sending everything up to a revision; a response holds whole revisions
//!   (a single revision is split only when the client asked for fragments);
//! * **resumable**: a watch starts at any revision still in the history;
//! * **bookmarkable**: a progress response at revision R is sent only when every watch it
//!   covers has delivered everything up to R (requested progress waits until then).
//!
//! The two client APIs (kvset.v1 and etcd's) convert their messages to [`StreamRequest`] and
//! from [`StreamResponse`]; the logic is here once.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use futures::Stream;
use futures::StreamExt;
use kvset_storage::Event;
use kvset_storage::EventKind;
use kvset_storage::ReadError;
use kvset_storage::Revision;
use kvset_storage::SmReader;
use tokio::sync::mpsc;

use crate::config::WatchConfig;
use crate::errors::KvError;
use crate::metrics::Metrics;
pub use crate::watch_types::CancelCause;
pub use crate::watch_types::StreamRequest;
use crate::watch_types::StreamResponse;
pub use crate::watch_types::WatchSpec;

/// Events read from the history per step of one watch (whole revisions).
const EVENTS_PER_READ: usize = 1_000;
/// How often a stream checks periodic progress and the leader requirement.
const TICK: Duration = Duration::from_millis(500);

struct Watcher {
    spec: WatchSpec,
    /// The next revision to deliver.
    next: Revision,
    /// When something was last sent (for periodic progress).
    last_sent: Instant,
}

impl Watcher {
    fn wants(&self, e: &Event) -> bool {
        self.spec.range.contains(&e.kv.key)
            && match e.kind {
                EventKind::Put => !self.spec.no_put,
                EventKind::Delete => !self.spec.no_delete,
            }
    }
}

/// Serves watch streams over one member's state machine.
pub struct WatchHub {
    reader: SmReader,
    config: WatchConfig,
    metrics: Arc<Metrics>,
    /// Watches open on this member, over every stream.
    active: AtomicU64,
    /// Whether the member knows a leader (for streams that require one).
    has_leader: Box<dyn Fn() -> bool + Send + Sync>,
    /// Set when the member shuts down: every stream ends.
    closing: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for WatchHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchHub").field("active", &self.active).finish_non_exhaustive()
    }
}

type Responses = mpsc::Sender<Result<StreamResponse, KvError>>;

impl WatchHub {
    /// A hub over `reader`; `has_leader` says whether the member knows a leader now.
    pub fn new(
        reader: SmReader,
        config: WatchConfig,
        metrics: Arc<Metrics>,
        has_leader: impl Fn() -> bool + Send + Sync + 'static,
    ) -> Arc<Self> {
        let (closing, _) = tokio::sync::watch::channel(false);
        Arc::new(Self {
            reader,
            config,
            metrics,
            active: AtomicU64::new(0),
            has_leader: Box::new(has_leader),
            closing,
        })
    }

    /// Ends every stream (with `UNAVAILABLE`, so clients resume elsewhere) and refuses new
    /// ones: the member is shutting down, and long-lived streams must not hold up its drain.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Watches open on this member.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    /// Serves one stream: `requests` from the client, responses on the returned receiver. With
    /// `require_leader`, the stream ends with `UNAVAILABLE` once the member knows no leader.
    pub fn open(
        self: &Arc<Self>,
        requests: impl Stream<Item = Result<StreamRequest, KvError>> + Send + Unpin + 'static,
        require_leader: bool,
    ) -> mpsc::Receiver<Result<StreamResponse, KvError>> {
        let (tx, rx) = mpsc::channel(self.config.send_queue as usize);
        let hub = self.clone();
        tokio::spawn(async move {
            let mut stream = StreamTask {
                hub: hub.clone(),
                watchers: BTreeMap::new(),
                progress_requested: false,
                next_id: 0,
            };
            let outcome = stream.run(requests, &tx, require_leader).await;
            if let Err(e) = outcome {
                let _ = tx.send(Err(e)).await;
            }
            hub.active.fetch_sub(stream.watchers.len() as u64, Ordering::Relaxed);
            hub.metrics.watches.set(hub.active() as i64);
        });
        rx
    }
}

struct StreamTask {
    hub: Arc<WatchHub>,
    watchers: BTreeMap<i64, Watcher>,
    progress_requested: bool,
    /// The next id to try for a watch created without one. As in etcd, ids are not reused on a
    /// stream: a late response of a canceled watch can never be taken for a new one's.
    next_id: i64,
}

/// The stream ended because the client went away.
struct Gone;

impl From<Gone> for KvError {
    fn from(_: Gone) -> Self {
        KvError::Unavailable("the watch stream closed".into())
    }
}

async fn send(tx: &Responses, r: StreamResponse) -> Result<(), Gone> {
    tx.send(Ok(r)).await.map_err(|_| Gone)
}

impl StreamTask {
    async fn run(
        &mut self,
        mut requests: impl Stream<Item = Result<StreamRequest, KvError>> + Unpin,
        tx: &Responses,
        require_leader: bool,
    ) -> Result<(), KvError> {
        let mut announced = self.hub.reader.subscribe();
        let mut closing = self.hub.closing.subscribe();
        let shutting_down =
            || KvError::Stopping("the member is shutting down; resume the watch elsewhere".into());
        if *closing.borrow() {
            return Err(shutting_down());
        }
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let current = *announced.borrow_and_update();
            // Deliver one step to every watch that is behind.
            let mut behind = false;
            let ids: Vec<i64> = self.watchers.keys().copied().collect();
            for id in ids {
                if self.step(id, current, tx).await.map_err(KvError::from)? {
                    behind = true;
                }
            }
            if self.progress_requested && !behind {
                self.progress_requested = false;
                send(tx, StreamResponse::Progress { watch_id: -1, revision: current }).await?;
            }
            if behind {
                // More to deliver: take requests that are waiting, then go on.
                tokio::select! {
                    biased;
                    req = requests.next() => match req {
                        Some(r) => self.handle(r?, tx).await?,
                        None => return Ok(()),
                    },
                    _ = std::future::ready(()) => {}
                }
                continue;
            }
            tokio::select! {
                req = requests.next() => match req {
                    Some(r) => self.handle(r?, tx).await?,
                    None => return Ok(()),
                },
                changed = announced.changed() => if changed.is_err() {
                    return Err(shutting_down());
                },
                closed = closing.changed() => if closed.is_err() || *closing.borrow() {
                    return Err(shutting_down());
                },
                _ = tick.tick() => {
                    if require_leader && !(self.hub.has_leader)() {
                        return Err(KvError::NoLeader {
                            leader_id: None,
                            leader_addr: None,
                            reason: "this member knows no leader and the watch requires one".into(),
                        });
                    }
                    self.periodic_progress(current, tx).await?;
                }
                _ = tx.closed() => return Ok(()),
            }
        }
    }

    async fn handle(&mut self, req: StreamRequest, tx: &Responses) -> Result<(), KvError> {
        let current = self.hub.reader.applied().revision;
        match req {
            StreamRequest::Create(spec) => self.create(spec, current, tx).await?,
            StreamRequest::Cancel(id) => {
                if self.watchers.remove(&id).is_some() {
                    self.hub.active.fetch_sub(1, Ordering::Relaxed);
                    self.hub.metrics.watches.set(self.hub.active() as i64);
                    send(
                        tx,
                        StreamResponse::Canceled {
                            watch_id: id,
                            revision: current,
                            reason: "canceled by the client".into(),
                            compact_revision: 0,
                            cause: CancelCause::Client,
                        },
                    )
                    .await?;
                }
            }
            StreamRequest::Progress => self.progress_requested = true,
            StreamRequest::Refuse { watch_id, reason } => {
                send(
                    tx,
                    StreamResponse::Canceled {
                        watch_id,
                        revision: current,
                        reason,
                        compact_revision: 0,
                        cause: CancelCause::Refused,
                    },
                )
                .await?
            }
        }
        Ok(())
    }

    async fn create(&mut self, spec: WatchSpec, current: Revision, tx: &Responses) -> Result<(), Gone> {
        let config = &self.hub.config;
        let refuse = |watch_id: i64, reason: String| StreamResponse::Canceled {
            watch_id,
            revision: current,
            reason,
            compact_revision: 0,
            cause: CancelCause::Refused,
        };
        let id = match spec.watch_id {
            Some(id) if self.watchers.contains_key(&id) => {
                // etcd's wording.
                return send(tx, refuse(id, "mvcc: duplicate watch ID provided on the WatchStream".into()))
                    .await;
            }
            Some(id) => id,
            None => {
                while self.watchers.contains_key(&self.next_id) {
                    self.next_id += 1;
                }
                self.next_id += 1;
                self.next_id - 1
            }
        };
        if self.watchers.len() as u64 >= config.max_per_stream {
            let reason = format!(
                "this stream holds {} watches, the limit watch.max_per_stream = {}",
                self.watchers.len(),
                config.max_per_stream
            );
            return send(tx, refuse(id, reason)).await;
        }
        if self.hub.active.fetch_add(1, Ordering::Relaxed) >= config.max_per_member {
            self.hub.active.fetch_sub(1, Ordering::Relaxed);
            let reason = format!(
                "this member serves {} watches, the limit watch.max_per_member = {}",
                self.hub.active(),
                config.max_per_member
            );
            return send(tx, refuse(id, reason)).await;
        }
        self.hub.metrics.watches.set(self.hub.active() as i64);
        let next = if spec.start_revision <= 0 { current + 1 } else { spec.start_revision };
        self.watchers.insert(id, Watcher { spec, next, last_sent: Instant::now() });
        send(tx, StreamResponse::Created { watch_id: id, revision: current }).await
    }

    /// Delivers the next chunk of watch `id`'s events up to `current`. Returns whether the watch
    /// is still behind afterwards.
    async fn step(&mut self, id: i64, current: Revision, tx: &Responses) -> Result<bool, Gone> {
        let Some(w) = self.watchers.get(&id) else { return Ok(false) };
        if w.next > current {
            return Ok(false);
        }
        let revisions = match self.hub.reader.events(w.next, current, EVENTS_PER_READ) {
            Ok(r) => r,
            Err(ReadError::Compacted { compact_revision, .. }) => {
                let wanted = w.next;
                self.watchers.remove(&id);
                self.hub.active.fetch_sub(1, Ordering::Relaxed);
                self.hub.metrics.watches.set(self.hub.active() as i64);
                let reason = format!(
                    "the watch fell behind the history kept: its next revision {wanted} was compacted \
                     (compact revision {compact_revision})"
                );
                send(
                    tx,
                    StreamResponse::Canceled {
                        watch_id: id,
                        revision: current,
                        reason,
                        compact_revision,
                        cause: CancelCause::Compacted,
                    },
                )
                .await?;
                return Ok(false);
            }
            Err(e) => {
                self.watchers.remove(&id);
                self.hub.active.fetch_sub(1, Ordering::Relaxed);
                send(
                    tx,
                    StreamResponse::Canceled {
                        watch_id: id,
                        revision: current,
                        reason: format!("reading the history failed: {e}"),
                        compact_revision: 0,
                        cause: CancelCause::Failed,
                    },
                )
                .await?;
                return Ok(false);
            }
        };
        let Some(last) = revisions.last().map(|r| r.revision) else {
            // No revision in `next..=current` changed a key (only revision 1, the empty store,
            // has no events): nothing to deliver up to `current`.
            if let Some(w) = self.watchers.get_mut(&id) {
                w.next = current + 1;
            }
            return Ok(false);
        };
        let budget = self.hub.config.response_max_bytes as usize;
        let Some(w) = self.watchers.get(&id) else { return Ok(false) };
        let (prev_kv, fragment) = (w.spec.prev_kv, w.spec.fragment);
        let mut pending: Vec<Event> = Vec::new();
        let mut pending_bytes = 0usize;
        let mut pending_rev = 0;
        let mut sent = false;
        for r in &revisions {
            let matching: Vec<Event> = r
                .events
                .iter()
                .filter(|e| w.wants(e))
                .map(|e| Event {
                    kind: e.kind,
                    kv: e.kv.clone(),
                    prev: if prev_kv { e.prev.clone() } else { None },
                })
                .collect();
            if matching.is_empty() {
                continue;
            }
            let bytes: usize = matching.iter().map(event_bytes).sum();
            if !pending.is_empty() && pending_bytes + bytes > budget {
                let events = std::mem::take(&mut pending);
                send(
                    tx,
                    StreamResponse::Events { watch_id: id, revision: pending_rev, events, fragment: false },
                )
                .await?;
                sent = true;
                pending_bytes = 0;
            }
            if fragment && bytes > budget {
                // One revision larger than the budget, and the client accepts fragments.
                let mut part = Vec::new();
                let mut part_bytes = 0;
                for e in matching {
                    let b = event_bytes(&e);
                    if !part.is_empty() && part_bytes + b > budget {
                        let events = std::mem::take(&mut part);
                        send(
                            tx,
                            StreamResponse::Events {
                                watch_id: id,
                                revision: r.revision,
                                events,
                                fragment: true,
                            },
                        )
                        .await?;
                        part_bytes = 0;
                    }
                    part_bytes += b;
                    part.push(e);
                }
                send(
                    tx,
                    StreamResponse::Events {
                        watch_id: id,
                        revision: r.revision,
                        events: part,
                        fragment: false,
                    },
                )
                .await?;
                sent = true;
                continue;
            }
            pending.extend(matching);
            pending_bytes += bytes;
            pending_rev = r.revision;
        }
        if !pending.is_empty() {
            // The header says how far the watcher has been brought: every revision read, its
            // events filtered out or not (etcd's catch-up sends its current revision).
            send(
                tx,
                StreamResponse::Events { watch_id: id, revision: last, events: pending, fragment: false },
            )
            .await?;
            sent = true;
        }
        if let Some(w) = self.watchers.get_mut(&id) {
            w.next = last + 1;
            if sent {
                w.last_sent = Instant::now();
            }
        }
        self.hub.metrics.watch_events.inc_by(revisions.iter().map(|r| r.events.len() as u64).sum());
        Ok(last < current)
    }

    async fn periodic_progress(&mut self, current: Revision, tx: &Responses) -> Result<(), Gone> {
        let interval = Duration::from_millis(self.hub.config.progress_interval_ms);
        let due: Vec<i64> = self
            .watchers
            .iter()
            .filter(|(_, w)| w.spec.progress_notify && w.next > current && w.last_sent.elapsed() >= interval)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            send(tx, StreamResponse::Progress { watch_id: id, revision: current }).await?;
            if let Some(w) = self.watchers.get_mut(&id) {
                w.last_sent = Instant::now();
            }
        }
        Ok(())
    }
}

fn event_bytes(e: &Event) -> usize {
    let kv = |kv: &kvset_storage::KeyValue| kv.key.len() + kv.value.len() + 40;
    kv(&e.kv) + e.prev.as_ref().map_or(0, kv) + 8
}
