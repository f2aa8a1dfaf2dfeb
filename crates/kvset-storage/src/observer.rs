//! A seam for metrics: the storage layer reports what it did, the server decides how to count it.

use std::time::Duration;

/// Receives storage events. Every method has a no-op default.
pub trait StorageObserver: Send + Sync + 'static {
    /// A log flush finished; it covered `appends` pending append calls and took `elapsed`.
    fn log_flushed(&self, appends: usize, elapsed: Duration) {
        let _ = (appends, elapsed);
    }

    /// A vote was flushed, taking `elapsed`.
    fn vote_flushed(&self, elapsed: Duration) {
        let _ = elapsed;
    }

    /// Entries were applied to the state machine: `entries` log entries holding `commands`
    /// client commands, taking `elapsed`.
    fn applied(&self, entries: usize, commands: usize, elapsed: Duration) {
        let _ = (entries, commands, elapsed);
    }

    /// A snapshot was built (`installed == false`) or installed, of `bytes` bytes.
    fn snapshot(&self, installed: bool, bytes: u64, elapsed: Duration) {
        let _ = (installed, bytes, elapsed);
    }
}

/// An observer that ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopObserver;

impl StorageObserver for NoopObserver {}

/// Makes the disk misbehave, for tests; production runs without one.
pub trait DiskFault: Send + Sync + 'static {
    /// Called by the log flusher before each fsync: how long that fsync stalls (a slow or
    /// congested disk), during which no append it covers is acknowledged.
    fn flush_stall(&self) -> Duration {
        Duration::ZERO
    }

    /// Called by the state machine before it applies committed entries: how long applying
    /// stalls (a member whose applied state lags its log).
    fn apply_stall(&self) -> Duration {
        Duration::ZERO
    }
}
