//! The cluster this member belongs to: read on every peer message, recorded once.
//!
//! A fresh volume has no cluster id; it gets one when this member bootstraps a cluster, joins
//! one, or receives the first Raft message addressed to its own node id. The id is written to
//! the volume (fsync and rename, on the blocking pool) *before* the in-memory copy changes, so
//! a member never acts for a cluster its volume does not name.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::RwLock;

use kvset_storage::ClusterId;
use kvset_storage::Volume;
use kvset_storage::VolumeError;

/// The cluster id of this member and the volume that records it; cheap to clone.
#[derive(Debug, Clone)]
pub struct ClusterIdCell {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    id: RwLock<Option<ClusterId>>,
    /// The volume, to record an adopted id; `None` for cells that only carry an id (tests).
    volume: Option<Mutex<Volume>>,
}

/// Why a cluster id could not be recorded.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error("this member belongs to cluster {mine}, not {theirs}")]
    Other { mine: ClusterId, theirs: ClusterId },
    #[error("recording the cluster id was interrupted: {0}")]
    Interrupted(String),
}

impl ClusterIdCell {
    /// The cell of the member whose volume is `volume`.
    pub fn new(volume: Volume) -> Self {
        let id = volume.cluster_id();
        Self { inner: Arc::new(Inner { id: RwLock::new(id), volume: Some(Mutex::new(volume)) }) }
    }

    /// A cell holding `id` with no volume behind it.
    pub fn fixed(id: Option<ClusterId>) -> Self {
        Self { inner: Arc::new(Inner { id: RwLock::new(id), volume: None }) }
    }

    /// The cluster id, if this member has one.
    pub fn get(&self) -> Option<ClusterId> {
        *self.inner.id.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The cluster id as a string, empty when there is none (the wire form).
    pub fn to_wire(&self) -> String {
        self.get().map(|c| c.to_string()).unwrap_or_default()
    }

    /// Records that this member belongs to `id`: in the volume first (durably), then here.
    /// Adopting the id the member already has is a no-op; another id is refused.
    pub async fn adopt(&self, id: ClusterId) -> Result<(), AdoptError> {
        match self.get() {
            Some(mine) if mine == id => return Ok(()),
            Some(mine) => return Err(AdoptError::Other { mine, theirs: id }),
            None => {}
        }
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || -> Result<(), AdoptError> {
            if let Some(volume) = &inner.volume {
                let mut volume = volume.lock().unwrap_or_else(|e| e.into_inner());
                volume.set_cluster_id(id)?;
            }
            *inner.id.write().unwrap_or_else(|e| e.into_inner()) = Some(id);
            Ok(())
        })
        .await
        .map_err(|e| AdoptError::Interrupted(e.to_string()))?
    }
}
