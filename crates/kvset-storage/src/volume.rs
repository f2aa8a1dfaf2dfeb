//! Volume metadata: who this volume belongs to (docs/architecture.md, "Identity").
//!
//! Every data directory carries a small JSON file, [`META_FILE`], written when the directory is
//! first initialised:
//!
//! ```json
//! {"format_version":2,"node_id":1234,"ordinal":0,"cluster_id":"9f0c…","created_unix_ms":…}
//! ```
//!
//! * The **node id** is minted at random the first time a volume is initialised and never
//!   changes. Same volume ⇒ same Raft node id, wherever the pod runs; an empty volume ⇒ a new id.
//!   A voter that lost its log and vote can therefore never come back as the same voter.
//! * The **cluster id** is empty until the node bootstraps a cluster or joins one, then set once.
//! * The file is replaced atomically: written to a temporary file, fsynced, renamed over the old
//!   one, and the directory fsynced. A crash leaves either the old or the new file.
//! * A missing file in a non-empty directory, a truncated or unparsable file, a newer format, a
//!   volume of another ordinal or of another cluster are all typed errors that name the file.
//!   Nothing here ever deletes data.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::path::PathBuf;
use std::str::FromStr;

use serde::Deserialize;
use serde::Serialize;

/// Name of the metadata file inside the data directory.
pub const META_FILE: &str = "kvset-volume.json";

/// The volume format this build writes and understands.
///
/// * 1 — kvset 0.1: the latest version of each key only.
/// * 2 — history (MVCC), leases, compaction; a new log entry and snapshot format.
/// * 3 — one record per revision and an in-memory key index (etcd's shape); snapshot format 4.
///   A volume of format 2 is upgraded in place when its store is first opened (the state
///   machine's `upgrade_slot`), and only then is this file rewritten with 3.
pub const FORMAT_VERSION: u32 = 3;

/// The oldest format this build upgrades in place.
pub const UPGRADABLE_FROM: u32 = 2;

/// Entries a fresh Kubernetes volume may already hold and that do not make it "used".
const IGNORED_ENTRIES: &[&str] = &["lost+found"];

/// A 128-bit cluster id, shown as 32 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterId([u8; 16]);

impl ClusterId {
    /// Mints a new random cluster id.
    pub fn random() -> Self {
        Self(rand::random())
    }
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterId({self})")
    }
}

/// Error parsing a [`ClusterId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cluster id must be 32 hex characters, got {0:?}")]
pub struct ParseClusterIdError(String);

impl FromStr for ClusterId {
    type Err = ParseClusterIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseClusterIdError(s.chars().take(40).collect());
        if s.len() != 32 || !s.is_ascii() {
            return Err(err());
        }
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| err())?;
        }
        Ok(Self(out))
    }
}

impl Serialize for ClusterId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ClusterId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a volume says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeMeta {
    /// Format of the data directory; see [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Raft node id, minted at initialisation; never 0.
    pub node_id: u64,
    /// StatefulSet ordinal of the pod that initialised the volume.
    pub ordinal: u32,
    /// Cluster this volume belongs to; `None` until bootstrap or join.
    pub cluster_id: Option<ClusterId>,
    /// Wall-clock time of initialisation, milliseconds since the Unix epoch (informational).
    pub created_unix_ms: u64,
    /// Set when `force_new_cluster` made this member a new cluster of one, and cleared at the
    /// first start without that setting: while set, the setting is ignored, so leaving it in
    /// place cannot split the cluster a second time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forced_new_cluster: Option<ForcedNewCluster>,
}

/// A record of a quorum-loss recovery on this volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForcedNewCluster {
    /// The cluster the volume belonged to before.
    pub from_cluster: Option<ClusterId>,
    /// When, milliseconds since the Unix epoch (informational).
    pub unix_ms: u64,
    /// Whether the volume has been seeded as the new cluster (until then the recovery is
    /// finished at every start).
    #[serde(default)]
    pub done: bool,
}

/// Why a volume cannot be used. Each message names the file and the problem on one line.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: corrupt volume metadata: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "{path}: volume format {found} is newer than this kvset understands ({supported}); \
         run a newer kvset"
    )]
    NewerFormat { path: PathBuf, found: u32, supported: u32 },
    #[error(
        "{path}: volume format {found} was written by an older kvset (this one writes {supported}, with \
         history and leases) and is not converted in place; copy the keys into a new cluster (e.g. \
         `kvset range --output json` against the old cluster, then put them into the new one)"
    )]
    OlderFormat { path: PathBuf, found: u32, supported: u32 },
    #[error(
        "{path}: data directory is not empty but has no {META_FILE}; refusing to use or wipe it \
         (found {found:?})"
    )]
    Unrecognized { path: PathBuf, found: String },
    #[error(
        "{path}: volume belongs to ordinal {volume} but this pod is ordinal {pod}; \
         a StatefulSet never moves volumes between ordinals"
    )]
    OrdinalMismatch { path: PathBuf, volume: u32, pod: u32 },
    #[error("{path}: volume belongs to cluster {found}, expected cluster {expected}")]
    ForeignCluster { path: PathBuf, found: ClusterId, expected: ClusterId },
    #[error("{path}: volume already belongs to cluster {existing}, cannot assign it to {requested}")]
    ClusterAlreadySet { path: PathBuf, existing: ClusterId, requested: ClusterId },
    #[error(
        "{path}: a restore needs an empty or absent data directory, and this one holds {found:?}; \
         restore into a new volume (or delete this one's contents first)"
    )]
    NotEmpty { path: PathBuf, found: String },
}

/// An opened volume: its directory and metadata.
#[derive(Debug, Clone)]
pub struct Volume {
    dir: PathBuf,
    meta: VolumeMeta,
    fresh: bool,
}

impl VolumeMeta {
    /// The metadata of a new volume of `ordinal`, with a freshly minted node id.
    fn new(ordinal: u32, cluster_id: Option<ClusterId>) -> Self {
        VolumeMeta {
            format_version: FORMAT_VERSION,
            node_id: mint_node_id(),
            ordinal,
            cluster_id,
            created_unix_ms: unix_ms(),
            forced_new_cluster: None,
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Volume {
    /// Prepares a new volume in `dir` (absent or empty) that a member of `ordinal` will start
    /// from as a new cluster `cluster_id` holding the data of the snapshot file `backup`: the
    /// snapshot is placed as the volume's pending seed, its revisions bumped by `bump_revision`
    /// (see [`crate::seed::restored_header`]), then the metadata is written. Checking the snapshot is the caller's job (`snapshot::inspect`); the member
    /// checks it again before it seeds.
    pub fn create_restored(
        dir: &Path,
        ordinal: u32,
        cluster_id: ClusterId,
        backup: &Path,
        bump_revision: u64,
    ) -> Result<Self, VolumeError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| VolumeError::Io { path, source }
        };
        fs::create_dir_all(dir).map_err(io(dir))?;
        let mut found = Vec::new();
        for entry in fs::read_dir(dir).map_err(io(dir))? {
            let name = entry.map_err(io(dir))?.file_name().to_string_lossy().into_owned();
            if !IGNORED_ENTRIES.contains(&name.as_str()) {
                found.push(name);
            }
        }
        if !found.is_empty() {
            found.sort();
            return Err(VolumeError::NotEmpty { path: dir.to_path_buf(), found: found.join(", ") });
        }
        // The seed first: a crash before the metadata leaves a directory that no member will
        // use (it is not empty and has no metadata), never an empty volume that could bootstrap.
        crate::seed::place(backup, dir, bump_revision).map_err(io(dir))?;
        let meta = VolumeMeta::new(ordinal, Some(cluster_id));
        write_atomically(dir, &meta)?;
        tracing::info!(dir = %dir.display(), node_id = meta.node_id, ordinal, cluster_id = %cluster_id, "prepared a restored volume");
        Ok(Self { dir: dir.to_path_buf(), meta, fresh: false })
    }

    /// Moves this volume to the new cluster `cluster_id` for a quorum-loss recovery and records
    /// that the recovery is under way (see [`VolumeMeta::forced_new_cluster`]).
    pub fn begin_force_new_cluster(&mut self, cluster_id: ClusterId) -> Result<(), VolumeError> {
        let mut meta = self.meta.clone();
        meta.forced_new_cluster =
            Some(ForcedNewCluster { from_cluster: meta.cluster_id, unix_ms: unix_ms(), done: false });
        meta.cluster_id = Some(cluster_id);
        write_atomically(&self.dir, &meta)?;
        self.meta = meta;
        Ok(())
    }

    /// Records that the recovery is done (the volume was seeded as the new cluster).
    pub fn finish_force_new_cluster(&mut self) -> Result<(), VolumeError> {
        let mut meta = self.meta.clone();
        if let Some(f) = meta.forced_new_cluster.as_mut() {
            f.done = true;
        }
        write_atomically(&self.dir, &meta)?;
        self.meta = meta;
        Ok(())
    }

    /// Forgets that a recovery ran (a start without `force_new_cluster`): setting it again
    /// will act again. A recovery still under way is kept.
    pub fn rearm_force_new_cluster(&mut self) -> Result<(), VolumeError> {
        if !self.meta.forced_new_cluster.as_ref().is_some_and(|f| f.done) {
            return Ok(());
        }
        let mut meta = self.meta.clone();
        meta.forced_new_cluster = None;
        write_atomically(&self.dir, &meta)?;
        self.meta = meta;
        Ok(())
    }

    /// Opens the volume in `dir`, initialising it (and minting a node id) when the directory is
    /// absent or empty.
    ///
    /// `ordinal` is the pod's ordinal; an existing volume of another ordinal is refused.
    /// `expected_cluster`, when given, must equal the volume's cluster id if it has one.
    pub fn open(dir: &Path, ordinal: u32, expected_cluster: Option<ClusterId>) -> Result<Self, VolumeError> {
        let meta_path = dir.join(META_FILE);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| VolumeError::Io { path, source }
        };
        fs::create_dir_all(dir).map_err(io(dir))?;

        let (meta, fresh) = match fs::read(&meta_path) {
            Ok(bytes) => (Self::parse(&meta_path, &bytes)?, false),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut found = Vec::new();
                for entry in fs::read_dir(dir).map_err(io(dir))? {
                    let name = entry.map_err(io(dir))?.file_name().to_string_lossy().into_owned();
                    if !IGNORED_ENTRIES.contains(&name.as_str()) && !name.starts_with(META_FILE) {
                        found.push(name);
                    }
                }
                if !found.is_empty() {
                    found.sort();
                    return Err(VolumeError::Unrecognized {
                        path: dir.to_path_buf(),
                        found: found.join(", "),
                    });
                }
                let meta = VolumeMeta::new(ordinal, None);
                write_atomically(dir, &meta)?;
                tracing::info!(dir = %dir.display(), node_id = meta.node_id, ordinal, "initialised a fresh volume");
                (meta, true)
            }
            Err(e) => return Err(VolumeError::Io { path: meta_path, source: e }),
        };

        if meta.ordinal != ordinal {
            return Err(VolumeError::OrdinalMismatch { path: meta_path, volume: meta.ordinal, pod: ordinal });
        }
        if let (Some(found), Some(expected)) = (meta.cluster_id, expected_cluster) {
            if found != expected {
                return Err(VolumeError::ForeignCluster { path: meta_path, found, expected });
            }
        }
        Ok(Self { dir: dir.to_path_buf(), meta, fresh })
    }

    fn parse(path: &Path, bytes: &[u8]) -> Result<VolumeMeta, VolumeError> {
        let corrupt = |reason: String| VolumeError::Corrupt { path: path.to_path_buf(), reason };
        if bytes.is_empty() {
            return Err(corrupt("file is empty".into()));
        }
        // Read the format version on its own first, so a newer format is reported as such even
        // when its other fields changed.
        #[derive(Deserialize)]
        struct Version {
            format_version: u32,
        }
        let version: Version = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
        if version.format_version > FORMAT_VERSION {
            return Err(VolumeError::NewerFormat {
                path: path.to_path_buf(),
                found: version.format_version,
                supported: FORMAT_VERSION,
            });
        }
        if version.format_version < UPGRADABLE_FROM {
            return Err(VolumeError::OlderFormat {
                path: path.to_path_buf(),
                found: version.format_version,
                supported: FORMAT_VERSION,
            });
        }
        let meta: VolumeMeta = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
        if meta.node_id == 0 {
            return Err(corrupt("node_id is 0".into()));
        }
        Ok(meta)
    }

    /// Records the cluster this volume belongs to. Setting the same id again is a no-op;
    /// setting a different one is refused.
    pub fn set_cluster_id(&mut self, cluster_id: ClusterId) -> Result<(), VolumeError> {
        match self.meta.cluster_id {
            Some(existing) if existing == cluster_id => Ok(()),
            Some(existing) => Err(VolumeError::ClusterAlreadySet {
                path: self.dir.join(META_FILE),
                existing,
                requested: cluster_id,
            }),
            None => {
                let mut meta = self.meta.clone();
                meta.cluster_id = Some(cluster_id);
                write_atomically(&self.dir, &meta)?;
                self.meta = meta;
                Ok(())
            }
        }
    }

    /// The volume's metadata.
    pub fn meta(&self) -> &VolumeMeta {
        &self.meta
    }

    /// The volume's Raft node id.
    pub fn node_id(&self) -> u64 {
        self.meta.node_id
    }

    /// The cluster the volume belongs to, if any yet.
    pub fn cluster_id(&self) -> Option<ClusterId> {
        self.meta.cluster_id
    }

    /// Whether this open initialised the volume (it was empty).
    pub fn is_fresh(&self) -> bool {
        self.fresh
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Mints a node id: random, never 0 (0 means "none" on the wire).
fn mint_node_id() -> u64 {
    loop {
        let id: u64 = rand::random();
        if id != 0 {
            return id;
        }
    }
}

/// Writes `meta` to `dir/META_FILE` atomically: tmp file, fsync, rename, fsync dir.
/// Records in the volume's metadata file that its store is of the current format: called once
/// the store of a volume of an older format has been opened (and with that, upgraded).
pub(crate) fn record_current_format(volume: &Volume) -> Result<(), VolumeError> {
    if volume.meta.format_version >= FORMAT_VERSION {
        return Ok(());
    }
    let meta = VolumeMeta { format_version: FORMAT_VERSION, ..volume.meta.clone() };
    write_atomically(&volume.dir, &meta)?;
    tracing::warn!(
        dir = %volume.dir.display(), from = volume.meta.format_version, to = FORMAT_VERSION,
        "upgraded the volume format"
    );
    Ok(())
}

fn write_atomically(dir: &Path, meta: &VolumeMeta) -> Result<(), VolumeError> {
    let path = dir.join(META_FILE);
    let tmp = dir.join(format!("{META_FILE}.tmp"));
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| VolumeError::Io { path: p, source }
    };
    let mut bytes = serde_json::to_vec_pretty(meta)
        .map_err(|e| VolumeError::Corrupt { path: path.clone(), reason: format!("cannot encode: {e}") })?;
    bytes.push(b'\n');
    let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(&bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    fs::rename(&tmp, &path).map_err(io(&path))?;
    sync_dir(dir).map_err(io(dir))?;
    Ok(())
}

/// Fsyncs a directory so a rename inside it is durable.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Removes the file `name` in `dir`, if there is one, and fsyncs `dir` so the removal is
/// durable.
pub(crate) fn remove_durably(dir: &Path, name: &str) -> std::io::Result<()> {
    match fs::remove_file(dir.join(name)) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_volume_mints_an_id_and_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let v = Volume::open(dir.path(), 2, None).unwrap();
        assert!(v.is_fresh());
        assert_ne!(v.node_id(), 0);
        assert_eq!(v.cluster_id(), None);
        let again = Volume::open(dir.path(), 2, None).unwrap();
        assert!(!again.is_fresh());
        assert_eq!(again.node_id(), v.node_id(), "same volume, same node id");
    }

    #[test]
    fn empty_volume_gets_a_new_id() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let va = Volume::open(a.path(), 0, None).unwrap();
        let vb = Volume::open(b.path(), 0, None).unwrap();
        assert_ne!(va.node_id(), vb.node_id(), "same ordinal, new volume: a replacement, new id");
    }

    #[test]
    fn lost_and_found_does_not_make_a_volume_used() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("lost+found")).unwrap();
        assert!(Volume::open(dir.path(), 0, None).unwrap().is_fresh());
    }

    #[test]
    fn cluster_id_is_set_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut v = Volume::open(dir.path(), 0, None).unwrap();
        let a = ClusterId::random();
        v.set_cluster_id(a).unwrap();
        v.set_cluster_id(a).unwrap();
        let err = v.set_cluster_id(ClusterId::random()).unwrap_err();
        assert!(matches!(err, VolumeError::ClusterAlreadySet { .. }), "{err}");
        assert_eq!(Volume::open(dir.path(), 0, Some(a)).unwrap().cluster_id(), Some(a));
    }

    #[test]
    fn foreign_cluster_is_refused_with_the_file_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut v = Volume::open(dir.path(), 0, None).unwrap();
        let a = ClusterId::random();
        v.set_cluster_id(a).unwrap();
        let b = ClusterId::random();
        let err = Volume::open(dir.path(), 0, Some(b)).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, VolumeError::ForeignCluster { .. }));
        assert!(
            msg.contains(META_FILE) && msg.contains(&a.to_string()) && msg.contains(&b.to_string()),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "one line: {msg}");
    }

    #[test]
    fn truncated_metadata_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        Volume::open(dir.path(), 0, None).unwrap();
        let path = dir.path().join(META_FILE);
        let bytes = fs::read(&path).unwrap();
        for cut in [0, 1, bytes.len() / 2, bytes.len() - 3] {
            fs::write(&path, &bytes[..cut]).unwrap();
            let err = Volume::open(dir.path(), 0, None).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, VolumeError::Corrupt { .. }), "cut at {cut}: {msg}");
            assert!(msg.contains(META_FILE) && !msg.contains('\n'), "{msg}");
        }
        // Nothing was wiped: the directory still holds the (broken) file.
        assert!(path.exists());
    }

    #[test]
    fn newer_and_older_formats_are_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        Volume::open(dir.path(), 0, None).unwrap();
        let path = dir.path().join(META_FILE);
        let written = fs::read_to_string(&path).unwrap();
        assert!(written.contains(&format!("\"format_version\": {FORMAT_VERSION}")), "{written}");
        let with_format = |v: u32| {
            written.replace(
                &format!("\"format_version\": {FORMAT_VERSION}"),
                &format!("\"format_version\": {v}"),
            )
        };
        fs::write(&path, with_format(7)).unwrap();
        let err = Volume::open(dir.path(), 0, None).unwrap_err();
        assert!(matches!(err, VolumeError::NewerFormat { found: 7, .. }), "{err}");
        fs::write(&path, with_format(1)).unwrap();
        let err = Volume::open(dir.path(), 0, None).unwrap_err();
        assert!(matches!(err, VolumeError::OlderFormat { found: 1, .. }), "{err}");
        assert!(err.to_string().contains("new cluster"), "{err}");
        // Format 2 is upgraded in place: it opens, and says so until its store was opened.
        fs::write(&path, with_format(2)).unwrap();
        let volume = Volume::open(dir.path(), 0, None).unwrap();
        assert_eq!(volume.meta().format_version, 2);
        record_current_format(&volume).unwrap();
        assert_eq!(Volume::open(dir.path(), 0, None).unwrap().meta().format_version, FORMAT_VERSION);
    }

    #[test]
    fn unrecognized_non_empty_directory_is_not_touched() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("precious.db"), b"data").unwrap();
        let err = Volume::open(dir.path(), 0, None).unwrap_err();
        assert!(matches!(err, VolumeError::Unrecognized { .. }), "{err}");
        assert!(err.to_string().contains("precious.db"));
        assert_eq!(fs::read(dir.path().join("precious.db")).unwrap(), b"data");
        assert!(!dir.path().join(META_FILE).exists());
    }

    #[test]
    fn other_ordinals_volume_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        Volume::open(dir.path(), 1, None).unwrap();
        let err = Volume::open(dir.path(), 2, None).unwrap_err();
        assert!(matches!(err, VolumeError::OrdinalMismatch { volume: 1, pod: 2, .. }), "{err}");
    }

    #[test]
    fn cluster_id_parses_and_prints() {
        let id = ClusterId::random();
        assert_eq!(id.to_string().parse::<ClusterId>().unwrap(), id);
        assert!("xyz".parse::<ClusterId>().is_err());
        assert!("zz".repeat(16).parse::<ClusterId>().is_err());
        assert!("é".repeat(16).parse::<ClusterId>().is_err());
    }
}
