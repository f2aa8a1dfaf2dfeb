//! `kvset snapshot save | status | restore | trigger`: backups of a running member, their
//! checks, and restoring one into the volume of a new cluster; and `kvset defrag`.

use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;
use std::time::Instant;

use anyhow::bail;
use anyhow::Context;
use kvset_client::Client;
use kvset_client::ClientOptions;
use kvset_server::identity::Identity;
use kvset_storage::seed;
use kvset_storage::ClusterId;
use kvset_storage::Volume;
use serde_json::json;

use crate::output::print_json;
use crate::output::Format;
use crate::SnapshotCommand;

/// Runs a `kvset snapshot` subcommand.
pub async fn run(
    command: SnapshotCommand,
    endpoints: &[String],
    format: Format,
    options: &ClientOptions,
) -> anyhow::Result<()> {
    match command {
        SnapshotCommand::Save { file: Some(file), .. } => save(endpoints, &file, format, options).await,
        SnapshotCommand::Save { file: None, dir: Some(dir), keep } => {
            let ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0);
            std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
            save(endpoints, &dir.join(format!("{BACKUP_PREFIX}{ms:013}.snap")), format, options).await?;
            if let Some(keep) = keep {
                prune(&dir, keep as usize)?;
            }
            Ok(())
        }
        SnapshotCommand::Save { file: None, dir: None, .. } => bail!("give a FILE or --dir"),
        SnapshotCommand::Status { file } => status(&file, format),
        SnapshotCommand::Restore { file, data_dir, name, bump_revision } => {
            restore(&file, &data_dir, &name, bump_revision, format)
        }
        SnapshotCommand::Trigger => trigger(endpoints, format, options).await,
    }
}

/// Streams a backup from the first endpoint into `FILE.part`, checks it, then renames it to
/// `file`: a backup under its final name is always whole and checked.
async fn save(
    endpoints: &[String],
    file: &Path,
    format: Format,
    options: &ClientOptions,
) -> anyhow::Result<()> {
    let endpoint = endpoints.first().cloned().unwrap_or_default();
    if file.exists() {
        bail!("{}: already exists; refusing to overwrite a backup", file.display());
    }
    let client = Client::new([endpoint.clone()], options.clone())?;
    let part = PathBuf::from(format!("{}.part", file.display()));
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&part).with_context(|| format!("{}: cannot create", part.display()))?,
    );
    let started = Instant::now();
    let show = format == Format::Human && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut shown = Instant::now() - Duration::from_secs(1);
    let result = client
        .backup(&endpoint, &mut out, |done, total| {
            if show && (shown.elapsed() >= Duration::from_millis(100) || done == total) {
                shown = Instant::now();
                eprint!("\r{}", progress_bar(done, total));
            }
        })
        .await;
    if show {
        eprintln!();
    }
    let finished = result.map_err(anyhow::Error::from).and_then(|(revision, bytes)| {
        let f = out.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        Ok((revision, bytes))
    });
    let (revision, bytes) = match finished {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            return Err(e.context(format!("backup from {endpoint} failed; nothing was saved")));
        }
    };
    let summary = match seed::summarize(&part) {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            bail!("the backup from {endpoint} is damaged ({e}); nothing was saved");
        }
    };
    std::fs::rename(&part, file).with_context(|| format!("{}: cannot rename into place", file.display()))?;
    let secs = started.elapsed().as_secs_f64();
    match format {
        Format::Json => print_json(&json!({
            "file": file.display().to_string(), "endpoint": endpoint, "revision": revision, "bytes": bytes,
            "keys": summary.keys, "versions": summary.versions, "seconds": secs,
        })),
        Format::Human => println!(
            "saved {} from {endpoint}: revision {revision}, {} keys, {} versions, {bytes} bytes in {secs:.1} s",
            file.display(),
            summary.keys,
            summary.versions
        ),
    }
    Ok(())
}

/// Name prefix of the backups `save --dir` writes (and `--keep` prunes).
const BACKUP_PREFIX: &str = "kvset-backup-";

/// Deletes the oldest `kvset-backup-*.snap` files in `dir` until `keep` remain (names sort by
/// time). Other files are never touched.
fn prune(dir: &Path, keep: usize) -> anyhow::Result<()> {
    let mut backups: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(BACKUP_PREFIX) && n.ends_with(".snap"))
        })
        .collect();
    backups.sort();
    let excess = backups.len().saturating_sub(keep);
    for old in &backups[..excess] {
        std::fs::remove_file(old)
            .with_context(|| format!("{}: cannot delete an old backup", old.display()))?;
        eprintln!("deleted old backup {}", old.display());
    }
    Ok(())
}

/// `[=====>    ]  42% 12.3/29.1 MiB`
fn progress_bar(done: u64, total: u64) -> String {
    let width = 30;
    let filled = (done * width as u64).checked_div(total).map_or(width, |f| f.min(width as u64) as usize);
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let pct = (done * 100).checked_div(total).unwrap_or(100);
    format!(
        "[{}{}] {pct:3}% {:.1}/{:.1} MiB",
        "=".repeat(filled),
        " ".repeat(width - filled),
        mib(done),
        mib(total)
    )
}

/// A backup as kvset reads it: the file itself, or the kvset snapshot inside a file that
/// `etcdctl snapshot save` wrote (etcd's framing: padding to 512-byte sectors and a SHA-256,
/// which must match), unwrapped into a temporary file that is removed on drop.
struct Backup {
    path: PathBuf,
    etcd_framed: bool,
}

impl Backup {
    fn open(file: &Path) -> anyhow::Result<Self> {
        const DIGEST: u64 = 32;
        let len = std::fs::metadata(file).with_context(|| format!("{}: cannot read", file.display()))?.len();
        let framed = len > DIGEST
            && (len - DIGEST).is_multiple_of(512)
            && sha256_trailer_matches(file, len - DIGEST)
                .with_context(|| format!("{}: cannot read", file.display()))?;
        if !framed {
            return Ok(Self { path: file.to_path_buf(), etcd_framed: false });
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!("kvset-unframed-{}-{nanos}.snap", std::process::id()));
        let backup = Self { path, etcd_framed: true };
        kvset_storage::snapshot::unframe_etcd(file, &backup.path, DIGEST)?;
        Ok(backup)
    }
}

/// Whether the bytes of `file` after the first `body` bytes are the SHA-256 of those, read as
/// a stream (a backup can be larger than memory).
fn sha256_trailer_matches(file: &Path, body: u64) -> std::io::Result<bool> {
    use std::io::Read;
    let mut input = std::io::BufReader::new(std::fs::File::open(file)?);
    let mut sha = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 16];
    let mut left = body;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = input.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        sha.update(&buf[..n]);
        left -= n as u64;
    }
    let mut trailer = Vec::new();
    input.read_to_end(&mut trailer)?;
    Ok(sha.finish().as_ref() == trailer.as_slice())
}

impl Drop for Backup {
    fn drop(&mut self) {
        if self.etcd_framed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Prints what a backup holds and whether it is whole; a damaged file fails the command.
fn status(file: &Path, format: Format) -> anyhow::Result<()> {
    let check = |e: String| anyhow::anyhow!("{}: checksum or structure check failed: {e}", file.display());
    let backup = Backup::open(file).map_err(|e| check(format!("{e:#}")))?;
    let summary = seed::summarize(&backup.path).map_err(|e| check(e.to_string()))?;
    let h = &summary.header;
    match format {
        Format::Json => print_json(&json!({
            "file": file.display().to_string(), "revision": h.revision, "compact_revision": h.compact_revision,
            "keys": summary.keys, "versions": summary.versions, "leases": h.leases.len(), "bytes": summary.bytes,
            "checksum": "ok", "etcd_framing": backup.etcd_framed,
        })),
        Format::Human => println!(
            "{}: revision {}, compact revision {}, {} keys, {} versions, {} leases, {} bytes, checksum ok{}",
            file.display(),
            h.revision,
            h.compact_revision,
            summary.keys,
            summary.versions,
            h.leases.len(),
            summary.bytes,
            if backup.etcd_framed { " (saved by etcdctl: etcd's framing and SHA-256 ok)" } else { "" }
        ),
    }
    Ok(())
}

/// Prepares the volume of member `name` in `data_dir` to start a new cluster from `file`.
fn restore(
    file: &Path,
    data_dir: &Path,
    name: &str,
    bump_revision: u64,
    format: Format,
) -> anyhow::Result<()> {
    let identity = Identity::from_name(name).map_err(|e| anyhow::anyhow!("--name {name:?}: {e}"))?;
    let unusable =
        |e: String| anyhow::anyhow!("{}: not a usable backup ({e}); nothing was changed", file.display());
    let backup = Backup::open(file).map_err(|e| unusable(format!("{e:#}")))?;
    let summary = seed::summarize(&backup.path).map_err(|e| unusable(e.to_string()))?;
    let cluster = ClusterId::random();
    let volume = Volume::create_restored(data_dir, identity.ordinal, cluster, &backup.path, bump_revision)?;
    let revision = summary.header.revision.saturating_add(bump_revision as i64);
    match format {
        Format::Json => print_json(&json!({
            "data_dir": data_dir.display().to_string(), "name": name, "cluster_id": cluster.to_string(),
            "node_id": volume.node_id(), "revision": revision, "backup_revision": summary.header.revision,
            "keys": summary.keys,
        })),
        Format::Human => println!(
            "restored revision {} ({} keys) into {} for {name}: new cluster {cluster}, node {}; it continues at \
             revision {revision}, everything below compacted.\n\
             Start {name} on this volume: it serves as a cluster of one; the other ordinals, started with empty \
             volumes, join it.",
            summary.header.revision,
            summary.keys,
            data_dir.display(),
            volume.node_id()
        ),
    }
    Ok(())
}

/// `kvset defrag`: offline on a data directory, or online on each endpoint's member in turn.
pub async fn defrag(
    data_dir: Option<PathBuf>,
    endpoints: &[String],
    format: Format,
    options: &ClientOptions,
) -> anyhow::Result<()> {
    if let Some(dir) = data_dir {
        if !dir.join("kvset-volume.json").is_file() {
            bail!("{}: not a kvset data directory (no kvset-volume.json)", dir.display());
        }
        let report = tokio::task::spawn_blocking(move || kvset_storage::defrag::run(&dir, Duration::ZERO))
            .await?
            .context("defragmentation failed (is the member still running?)")?;
        match format {
            Format::Json => print_json(&json!({
                "before_bytes": report.before, "after_bytes": report.after, "keys": report.keys,
                "seconds": report.elapsed.as_secs_f64(),
            })),
            Format::Human => println!(
                "defragmented: {} -> {} bytes ({} keys) in {:.1} s",
                report.before,
                report.after,
                report.keys,
                report.elapsed.as_secs_f64()
            ),
        }
        return Ok(());
    }
    let client = Client::new(endpoints.iter().cloned(), options.clone())?;
    for endpoint in endpoints {
        let started = Instant::now();
        let incarnation = client.status_of(endpoint).await?.started_unix_ms;
        let before = client.defragment(endpoint).await?.db_size_bytes;
        // Back once a new start of the member answers Status with its size measured (the
        // size is measured every few seconds, the first time at start).
        let deadline = Instant::now() + Duration::from_secs(300);
        let status = loop {
            if let Ok(s) = client.status_of(endpoint).await {
                if s.started_unix_ms != incarnation && s.db_size_bytes > 0 {
                    break s;
                }
            }
            if Instant::now() > deadline {
                bail!("{endpoint}: not back within 300 s after the defragmentation request");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let secs = started.elapsed().as_secs_f64();
        match format {
            Format::Json => print_json(&json!({
                "endpoint": endpoint, "before_bytes": before, "after_bytes": status.db_size_bytes, "seconds": secs,
            })),
            Format::Human => println!(
                "{endpoint}: defragmented, {before} -> {} bytes; it did not serve for {secs:.1} s",
                status.db_size_bytes
            ),
        }
    }
    Ok(())
}

/// Makes the first endpoint's member build a Raft snapshot now (log compaction).
async fn trigger(endpoints: &[String], format: Format, options: &ClientOptions) -> anyhow::Result<()> {
    let endpoint = endpoints.first().cloned().unwrap_or_default();
    let client = Client::new([endpoint.clone()], options.clone())?;
    let resp = client.snapshot(&endpoint).await?;
    match format {
        Format::Json => print_json(&json!({"endpoint": endpoint, "last_log_index": resp.last_log_index})),
        Format::Human => {
            println!("snapshot of {endpoint} covers the log up to index {}", resp.last_log_index)
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_keeps_the_newest_backups_and_touches_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        for name in
            ["kvset-backup-0000000001.snap", "kvset-backup-0000000003.snap", "kvset-backup-0000000002.snap"]
        {
            std::fs::write(dir.path().join(name), "x").unwrap();
        }
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        std::fs::write(dir.path().join("kvset-backup-0000000004.snap.part"), "x").unwrap();
        prune(dir.path(), 2).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "kvset-backup-0000000002.snap",
                "kvset-backup-0000000003.snap",
                "kvset-backup-0000000004.snap.part",
                "notes.txt"
            ]
        );
    }

    #[test]
    fn progress_bar_is_bounded() {
        assert!(progress_bar(0, 0).contains("100%"));
        assert!(progress_bar(5, 10).contains(" 50%"));
        assert!(progress_bar(10, 10).starts_with(&format!("[{}]", "=".repeat(30))));
    }
}
