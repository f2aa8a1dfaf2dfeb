//! The domain form of a watch stream's messages, shared by the watch hub and the conversions of
//! both client APIs (kvset.v1 and etcd's).

use kvset_storage::Event;
use kvset_storage::KeyRange;
use kvset_storage::Revision;

/// What a client asked a watch for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchSpec {
    pub range: KeyRange,
    /// First revision to deliver; 0 for "after now".
    pub start_revision: Revision,
    pub prev_kv: bool,
    pub progress_notify: bool,
    pub no_put: bool,
    pub no_delete: bool,
    /// The id wanted; `None` lets the stream choose.
    pub watch_id: Option<i64>,
    /// Split a revision whose events exceed the response budget into several responses.
    pub fragment: bool,
}

/// A message from the client on a watch stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamRequest {
    Create(WatchSpec),
    Cancel(i64),
    /// One progress response once every watch of the stream is caught up.
    Progress,
    /// A create request the façade could not accept: answered canceled, in order.
    Refuse {
        watch_id: i64,
        reason: String,
    },
}

/// A message to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamResponse {
    Created {
        watch_id: i64,
        revision: Revision,
    },
    /// Events of whole revisions (or, with `fragment`, part of one revision, more to follow).
    Events {
        watch_id: i64,
        revision: Revision,
        events: Vec<Event>,
        fragment: bool,
    },
    /// Every event of the watch (`watch_id` -1: of every watch of the stream) up to `revision`
    /// was delivered.
    Progress {
        watch_id: i64,
        revision: Revision,
    },
    Canceled {
        watch_id: i64,
        revision: Revision,
        reason: String,
        compact_revision: Revision,
        cause: CancelCause,
    },
}

/// Why a watch ended (each API words it its own way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelCause {
    /// The client canceled it.
    Client,
    /// The create request could not be served (bad range, id in use, a limit).
    Refused,
    /// Its next revision was compacted.
    Compacted,
    /// The member could not read its history.
    Failed,
}
