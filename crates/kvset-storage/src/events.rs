//! The recent events of the state machine, in memory, for watchers.
//!
//! Apply publishes the events of every revision it makes here, after they are written to the
//! tree, and then announces the new revision on a `watch` channel. Watchers pull: a watcher at
//! revision `r` asks for the events from `r` on; the ring answers from memory while it still
//! holds `r`, else the caller reads the same events from the records on disk. So apply
//! never waits for a watcher, and a slow watcher costs memory only up to the ring's bound.
//!
//! Invariant: the ring holds the events of a contiguous run of revisions `first..=last`, and
//! every revision in it has at least one event (revisions only advance when a key changes). A
//! snapshot install clears it (the installed state's recent events are only in its history).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;

use tokio::sync::watch;

use crate::types::Revision;
use crate::types::RevisionEvents;

/// Bounds of the ring.
#[derive(Debug, Clone, Copy)]
pub struct EventLogLimits {
    /// Most revisions held.
    pub max_revisions: usize,
    /// Most bytes (approximate) held.
    pub max_bytes: usize,
}

impl Default for EventLogLimits {
    fn default() -> Self {
        Self { max_revisions: 100_000, max_bytes: 64 << 20 }
    }
}

#[derive(Debug)]
struct Ring {
    revisions: VecDeque<Arc<RevisionEvents>>,
    bytes: usize,
}

/// Recent events and the announcement of new revisions.
#[derive(Debug)]
pub struct EventLog {
    ring: Mutex<Ring>,
    limits: EventLogLimits,
    /// The applied revision, announced after its events are readable.
    announce: watch::Sender<Revision>,
}

impl EventLog {
    /// An empty log at `revision`.
    pub(crate) fn new(revision: Revision, limits: EventLogLimits) -> Self {
        let (announce, _) = watch::channel(revision);
        Self { ring: Mutex::new(Ring { revisions: VecDeque::new(), bytes: 0 }), limits, announce }
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds the events of newly applied revisions and announces `applied` (the revision after
    /// them). Call only after the events are readable from the tree.
    pub(crate) fn publish(&self, batch: Vec<RevisionEvents>, applied: Revision) {
        if !batch.is_empty() {
            let mut ring = self.ring();
            for events in batch {
                if ring.revisions.back().is_some_and(|last| last.revision + 1 != events.revision) {
                    // Not contiguous (cannot happen after apply; be safe): start over.
                    ring.revisions.clear();
                    ring.bytes = 0;
                }
                ring.bytes += events.bytes();
                ring.revisions.push_back(Arc::new(events));
            }
            while ring.revisions.len() > self.limits.max_revisions
                || (ring.bytes > self.limits.max_bytes && ring.revisions.len() > 1)
            {
                if let Some(old) = ring.revisions.pop_front() {
                    ring.bytes = ring.bytes.saturating_sub(old.bytes());
                }
            }
        }
        self.announce.send_replace(applied);
    }

    /// Forgets every event (after a snapshot install) and announces `applied`.
    pub(crate) fn reset(&self, applied: Revision) {
        let mut ring = self.ring();
        ring.revisions.clear();
        ring.bytes = 0;
        drop(ring);
        self.announce.send_replace(applied);
    }

    /// A receiver of applied-revision announcements.
    pub fn subscribe(&self) -> watch::Receiver<Revision> {
        self.announce.subscribe()
    }

    /// The last announced revision.
    pub fn revision(&self) -> Revision {
        *self.announce.borrow()
    }

    /// The events of `from..=to` if the ring still holds `from` (whole revisions, at most about
    /// `max_events` events, at least one revision); `None` when `from` is older than the ring.
    pub fn get(&self, from: Revision, to: Revision, max_events: usize) -> Option<Vec<Arc<RevisionEvents>>> {
        let ring = self.ring();
        let first = ring.revisions.front()?.revision;
        if from < first {
            return None;
        }
        let start = (from - first) as usize;
        let mut out = Vec::new();
        let mut events = 0;
        for r in ring.revisions.iter().skip(start) {
            if r.revision > to || (!out.is_empty() && events >= max_events) {
                break;
            }
            events += r.events.len();
            out.push(r.clone());
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Event;
    use crate::types::EventKind;
    use crate::types::KeyValue;

    fn rev(revision: Revision, n: usize) -> RevisionEvents {
        let events = (0..n)
            .map(|i| Event {
                kind: EventKind::Put,
                kv: KeyValue {
                    key: format!("k{i}").into_bytes(),
                    mod_revision: revision,
                    ..Default::default()
                },
                prev: None,
            })
            .collect();
        RevisionEvents { revision, events }
    }

    #[test]
    fn holds_a_bounded_contiguous_run_and_answers_whole_revisions() {
        let log = EventLog::new(1, EventLogLimits { max_revisions: 3, max_bytes: usize::MAX });
        log.publish(vec![rev(2, 1), rev(3, 2), rev(4, 1), rev(5, 3)], 5);
        assert_eq!(log.revision(), 5);
        assert!(log.get(2, 5, 100).is_none(), "revision 2 was evicted");
        let got = log.get(3, 5, 100).unwrap();
        assert_eq!(got.iter().map(|r| r.revision).collect::<Vec<_>>(), vec![3, 4, 5]);
        let capped = log.get(3, 5, 1).unwrap();
        assert_eq!(
            capped.iter().map(|r| r.revision).collect::<Vec<_>>(),
            vec![3],
            "at least one revision, whole"
        );
        assert!(log.get(6, 9, 100).unwrap().is_empty());
        log.reset(9);
        assert!(log.get(6, 9, 100).is_none());
        assert_eq!(log.revision(), 9);
    }

    #[test]
    fn the_byte_bound_evicts_but_keeps_the_newest_revision() {
        let log = EventLog::new(1, EventLogLimits { max_revisions: 100, max_bytes: 1 });
        log.publish(vec![rev(2, 5), rev(3, 5)], 3);
        assert!(log.get(2, 3, 100).is_none());
        assert_eq!(log.get(3, 3, 100).unwrap().len(), 1);
    }
}
