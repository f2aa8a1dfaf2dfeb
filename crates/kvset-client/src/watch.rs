//! A watch that resumes across member failures.
//!
//! The [`Watch`] handle is fed by a background task that keeps one Watch stream open to some
//! member. It remembers `next`: the first revision not yet delivered (after a response with
//! events of revision R, every matching event up to R was delivered: a response never splits a
//! revision). When the stream breaks, the task opens a new one on the next endpoint and creates
//! the watch again from `next`, so the events that follow are exactly the ones not yet seen.
//! Progress responses move `next` forward too. A watch whose `next` was compacted cannot resume
//! without a gap: it ends with [`Error::OutOfRange`].

use std::time::Duration;

use futures::StreamExt;
use kvset_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::Status;

use crate::kv;
use crate::Client;
use crate::Error;

/// What to watch and how.
#[derive(Debug, Clone, Default)]
pub struct WatchOptions {
    /// Watch every key starting with the key.
    pub prefix: bool,
    /// Watch the keys in [key, range_end) instead.
    pub range_end: Option<Vec<u8>>,
    /// First revision to deliver; 0 for "after now".
    pub start_revision: i64,
    /// Each event carries the key as it was before the change.
    pub prev_kv: bool,
    /// Ask the server for periodic progress responses.
    pub progress_notify: bool,
    pub no_put: bool,
    pub no_delete: bool,
    /// Do not end the stream when the member loses its leader (by default the client moves to
    /// another member, so a partitioned member's stale view is never watched for long).
    pub allow_leaderless: bool,
}

/// What a watch delivers.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent {
    /// Events of whole revisions, up to and including `revision`.
    Events { revision: i64, events: Vec<pb::Event> },
    /// Every event up to `revision` was delivered.
    Progress { revision: i64 },
}

/// A running watch; dropping it stops the watch.
#[derive(Debug)]
pub struct Watch {
    rx: mpsc::Receiver<Result<WatchEvent, Error>>,
    progress: mpsc::UnboundedSender<()>,
    task: JoinHandle<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Watch {
    /// The next delivery; `None` once the watch ended (after an error was delivered).
    pub async fn next(&mut self) -> Option<Result<WatchEvent, Error>> {
        self.rx.recv().await
    }

    /// Asks for a progress response (delivered as [`WatchEvent::Progress`]).
    pub fn request_progress(&self) {
        let _ = self.progress.send(());
    }
}

impl Client {
    /// Watches `key` (or a prefix or range, see [`WatchOptions`]) until the returned [`Watch`]
    /// is dropped, resuming on another member when a stream breaks.
    pub async fn watch(&self, key: impl Into<Vec<u8>>, options: WatchOptions) -> Result<Watch, Error> {
        let key = key.into();
        if key.is_empty() && !options.prefix && options.range_end.is_none() {
            return Err(Error::InvalidArgument("watch needs a key, a prefix or a range".into()));
        }
        let (tx, rx) = mpsc::channel(64);
        let (progress, progress_rx) = mpsc::unbounded_channel();
        let client = self.clone();
        let task = tokio::spawn(async move { run(client, key, options, tx, progress_rx).await });
        Ok(Watch { rx, progress, task })
    }
}

/// How one stream ended.
enum Ended {
    /// The watcher is gone or the watch cannot go on: stop.
    Stop,
    /// The stream broke: open another.
    Broken(String),
}

async fn run(
    client: Client,
    key: Vec<u8>,
    options: WatchOptions,
    tx: mpsc::Sender<Result<WatchEvent, Error>>,
    mut progress: mpsc::UnboundedReceiver<()>,
) {
    // The first revision not yet delivered; 0 until the first stream says what "now" is.
    let mut next = options.start_revision;
    let mut backoff = Duration::from_millis(50);
    loop {
        let endpoint = client.pick();
        let outcome = stream_once(&client, &endpoint, &key, &options, &mut next, &tx, &mut progress).await;
        match outcome {
            Ended::Stop => return,
            Ended::Broken(why) => {
                tracing::debug!(endpoint = %endpoint, reason = %why, next, "watch stream broke; resuming elsewhere");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

async fn stream_once(
    client: &Client,
    endpoint: &str,
    key: &[u8],
    options: &WatchOptions,
    next: &mut i64,
    tx: &mpsc::Sender<Result<WatchEvent, Error>>,
    progress: &mut mpsc::UnboundedReceiver<()>,
) -> Ended {
    let channel = match client.channel(endpoint) {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.send(Err(e)).await;
            return Ended::Stop;
        }
    };
    let (req_tx, req_rx) = mpsc::channel::<pb::WatchRequest>(16);
    let create = pb::WatchCreateRequest {
        key: key.to_vec(),
        range_end: options.range_end.clone().unwrap_or_default(),
        prefix: options.prefix,
        start_revision: *next,
        prev_kv: options.prev_kv,
        progress_notify: options.progress_notify,
        no_put: options.no_put,
        no_delete: options.no_delete,
        watch_id: 0,
    };
    if req_tx
        .send(pb::WatchRequest { request: Some(pb::watch_request::Request::Create(create)) })
        .await
        .is_err()
    {
        return Ended::Broken("request channel closed".into());
    }
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(req_rx));
    if let Err(e) = client.authorize(&mut request).await {
        return Ended::Broken(format!("logging in: {e}"));
    }
    if !options.allow_leaderless {
        request.metadata_mut().insert("hasleader", tonic::metadata::MetadataValue::from_static("true"));
    }
    let mut kv_client = kv(channel);
    let connect = tokio::time::timeout(client.options().timeout, kv_client.watch(request));
    let mut responses = match connect.await {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(status)) => return broken_or_fatal(status, tx).await,
        Err(_) => return Ended::Broken("timed out opening the stream".into()),
    };
    loop {
        tokio::select! {
            asked = progress.recv() => {
                if asked.is_none() {
                    return Ended::Stop;
                }
                let req = pb::WatchRequest { request: Some(pb::watch_request::Request::Progress(pb::WatchProgressRequest {})) };
                if req_tx.send(req).await.is_err() {
                    return Ended::Broken("request channel closed".into());
                }
            }
            r = responses.next() => {
                let r = match r {
                    Some(Ok(r)) => r,
                    Some(Err(status)) => return broken_or_fatal(status, tx).await,
                    None => return Ended::Broken("the member closed the stream".into()),
                };
                let revision = r.header.as_ref().map_or(0, |h| h.revision);
                if r.canceled {
                    let error = if r.compact_revision > 0 {
                        Error::OutOfRange(format!(
                            "the watch cannot resume at revision {next}: history was compacted to {} ({})",
                            r.compact_revision, r.cancel_reason
                        ))
                    } else {
                        Error::FailedPrecondition(format!("watch canceled: {}", r.cancel_reason))
                    };
                    let _ = tx.send(Err(error)).await;
                    return Ended::Stop;
                }
                let delivery = if r.created {
                    if *next == 0 {
                        *next = revision + 1;
                    }
                    None
                } else if r.progress {
                    // A progress response of a stream with one watch: everything up to it was
                    // delivered.
                    *next = (*next).max(revision + 1);
                    Some(WatchEvent::Progress { revision })
                } else if r.events.is_empty() {
                    None
                } else {
                    // The server starts every (re)created watch at `next` and sends whole
                    // revisions in order, so the last event's revision is all delivered.
                    let last = r.events.iter().filter_map(|e| e.kv.as_ref()).map(|kv| kv.mod_revision).max().unwrap_or(revision);
                    *next = last + 1;
                    Some(WatchEvent::Events { revision: last, events: r.events })
                };
                if let Some(d) = delivery {
                    if tx.send(Ok(d)).await.is_err() {
                        return Ended::Stop;
                    }
                }
            }
        }
    }
}

/// Decides whether a failed stream may be reopened elsewhere.
async fn broken_or_fatal(status: Status, tx: &mpsc::Sender<Result<WatchEvent, Error>>) -> Ended {
    use tonic::Code;
    match status.code() {
        Code::InvalidArgument
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::PermissionDenied
        | Code::Unauthenticated => {
            let _ = tx.send(Err(crate::final_error(&status, crate::Kind::Read))).await;
            Ended::Stop
        }
        _ => Ended::Broken(status.message().to_string()),
    }
}
