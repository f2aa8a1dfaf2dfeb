//! Snapshot files: format, writer, reader, and the handle openraft streams in chunks.
//!
//! A snapshot is one file under `<data dir>/snapshots/`:
//!
//! ```text
//! "KVSETSNAP4\n"                      magic (11 bytes)
//! u32 LE n, n bytes                   postcard(SnapshotHeader): openraft meta, store revision,
//!                                     compact revision, desired replicas, the lease table,
//!                                     users, roles and permissions
//! repeated, in (revision, sub-revision) order:
//!   u32 LE klen, key bytes            revision (8 B BE), sub-revision (4 B BE)
//!   u32 LE vlen, value bytes          the record of that change (`crate::keys::record`)
//! u32 LE 0xFFFF_FFFF                  end of records
//! u64 LE count                        number of records
//! u32 LE crc32                        CRC-32 of every byte before it
//! ```
//!
//! Files of earlier formats are still read (see `SnapshotReader::next_change`): format 3
//! ("KVSETSNAP3\n", kvset 0.2) has the same header and one record per version in (key, revision)
//! order, keyed by the escaped user key, revision and sub-revision, with a postcard `Version`;
//! format 2 ("KVSETSNAP2\n") is format 3 from before access control (no users or roles).
//!
//! Files are written under a temporary name, fsynced, renamed to `snap-<id>.snap` and the
//! directory fsynced, so a crash never leaves a half-written file under a final name. A file
//! received from a leader is checked (magic, structure, count, checksum, meta) before any of it
//! is applied.

use std::fs;
use std::io;
use std::io::BufReader;
use std::io::BufWriter;
use std::io::Read;
use std::io::Write;
use std::path::Path;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::Context;
use std::task::Poll;

use serde::Deserialize;
use serde::Serialize;
use tokio::io::AsyncRead;
use tokio::io::AsyncSeek;
use tokio::io::AsyncWrite;
use tokio::io::ReadBuf;

use crate::auth::AuthState;
use crate::codec;
use crate::index::Rev;
use crate::keys;
use crate::keys::legacy;
use crate::keys::record;
use crate::keys::Version;
use crate::types::Lease;
use crate::SnapshotMeta;

const MAGIC: &[u8] = b"KVSETSNAP4\n";
/// Files of kvset 0.2, one record per version in key order: read, never written.
const MAGIC_V3: &[u8] = b"KVSETSNAP3\n";
/// Files written before access control: read, never written.
const MAGIC_V2: &[u8] = b"KVSETSNAP2\n";
const END: u32 = u32::MAX;
/// Largest header or record field accepted when reading (a corrupt length must not allocate
/// gigabytes): well above the server's key and value limits.
const MAX_FIELD: u32 = 64 << 20;

/// What a snapshot file says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotHeader {
    pub meta: SnapshotMeta,
    /// Store revision at the snapshot.
    pub revision: i64,
    /// Compact revision at the snapshot.
    pub compact_revision: i64,
    /// Desired voter count recorded in the state machine, if ever set.
    pub replicas: Option<u32>,
    /// Every lease.
    pub leases: Vec<Lease>,
    /// Users, roles and permissions (format 3 on; empty in a format 2 file).
    pub auth: AuthState,
}

/// The header of format 2 files (written before access control existed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SnapshotHeaderV2 {
    meta: SnapshotMeta,
    revision: i64,
    compact_revision: i64,
    replicas: Option<u32>,
    leases: Vec<Lease>,
}

/// A snapshot file being read or written, as openraft's `SnapshotData`.
///
/// It is a Tokio file plus its path: openraft writes received chunks into it, and
/// `install_snapshot` needs the path to verify and keep the file.
#[derive(Debug)]
pub struct SnapshotFile {
    path: PathBuf,
    file: tokio::fs::File,
}

impl SnapshotFile {
    /// Creates a new empty file at `path` for receiving a snapshot.
    pub(crate) async fn create(path: PathBuf) -> io::Result<Self> {
        let file = tokio::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path).await?;
        Ok(Self { path, file })
    }

    /// Creates a new empty file in the snapshot directory `dir`, for a snapshot received from
    /// the leader; the state machine's install renames it once it has been verified.
    pub async fn create_receiving(dir: &Path) -> io::Result<Self> {
        Self::create(dir.join(format!("recv-{:016x}.partial", rand::random::<u64>()))).await
    }

    /// Opens an existing snapshot file for reading.
    pub(crate) async fn open(path: PathBuf) -> io::Result<Self> {
        let file = tokio::fs::File::open(&path).await?;
        Ok(Self { path, file })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Flushes buffered writes and fsyncs the file; returns its path.
    pub(crate) async fn finish(mut self) -> io::Result<PathBuf> {
        use tokio::io::AsyncWriteExt;
        self.file.flush().await?;
        self.file.sync_all().await?;
        Ok(self.path)
    }
}

impl AsyncRead for SnapshotFile {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_read(cx, buf)
    }
}

impl AsyncWrite for SnapshotFile {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.file).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_shutdown(cx)
    }
}

impl AsyncSeek for SnapshotFile {
    fn start_seek(mut self: Pin<&mut Self>, position: io::SeekFrom) -> io::Result<()> {
        Pin::new(&mut self.file).start_seek(position)
    }

    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Pin::new(&mut self.file).poll_complete(cx)
    }
}

/// Writes a snapshot file, computing the checksum as it goes.
pub(crate) struct SnapshotWriter {
    out: BufWriter<fs::File>,
    crc: crc32fast::Hasher,
    count: u64,
    bytes: u64,
}

impl SnapshotWriter {
    /// Creates `path` (which must not exist) and writes the magic and header.
    pub(crate) fn create(path: &Path, header: &SnapshotHeader) -> io::Result<Self> {
        let file = fs::OpenOptions::new().write(true).create_new(true).open(path)?;
        let mut w = Self {
            out: BufWriter::with_capacity(1 << 20, file),
            crc: crc32fast::Hasher::new(),
            count: 0,
            bytes: 0,
        };
        w.put(MAGIC)?;
        let h = codec::encode("snapshot header", header).map_err(io::Error::other)?;
        w.put_field(&h)?;
        Ok(w)
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.crc.update(bytes);
        self.bytes += bytes.len() as u64;
        self.out.write_all(bytes)
    }

    fn put_field(&mut self, bytes: &[u8]) -> io::Result<()> {
        let len = u32::try_from(bytes.len()).ok().filter(|l| *l < MAX_FIELD).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("snapshot field of {} bytes", bytes.len()))
        })?;
        self.put(&len.to_le_bytes())?;
        self.put(bytes)
    }

    /// Appends one record: a history key and its encoded version.
    pub(crate) fn record(&mut self, key: &[u8], encoded_value: &[u8]) -> io::Result<()> {
        self.put_field(key)?;
        self.put_field(encoded_value)?;
        self.count += 1;
        Ok(())
    }

    /// Writes the trailer and fsyncs. Returns the file size in bytes.
    pub(crate) fn finish(self) -> io::Result<u64> {
        let (file, bytes) = self.trailer()?;
        file.sync_all()?;
        Ok(bytes)
    }

    /// Writes the trailer without fsyncing (a file read back at once and then deleted).
    pub(crate) fn finish_unsynced(self) -> io::Result<u64> {
        Ok(self.trailer()?.1)
    }

    fn trailer(mut self) -> io::Result<(fs::File, u64)> {
        self.put(&END.to_le_bytes())?;
        self.put(&self.count.to_le_bytes())?;
        let crc = self.crc.clone().finalize();
        self.out.write_all(&crc.to_le_bytes())?;
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        Ok((file, self.bytes + 4))
    }
}

/// Reads and checks a snapshot file.
pub(crate) struct SnapshotReader {
    input: BufReader<fs::File>,
    crc: crc32fast::Hasher,
    count: u64,
    header: SnapshotHeader,
    done: bool,
    /// Bytes read so far.
    consumed: u64,
    /// Whether zero bytes after the checksum are allowed (etcd's sector padding).
    padded: bool,
    /// The file's format: 2, 3 or 4 (see the module docs).
    format: u8,
}

fn corrupt(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl SnapshotReader {
    /// Opens `path` and reads its header.
    pub(crate) fn open(path: &Path) -> io::Result<Self> {
        let file = fs::File::open(path)?;
        let mut r = Self {
            input: BufReader::with_capacity(1 << 20, file),
            crc: crc32fast::Hasher::new(),
            count: 0,
            header: SnapshotHeader {
                meta: SnapshotMeta::default(),
                revision: 0,
                compact_revision: 0,
                replicas: None,
                leases: Vec::new(),
                auth: AuthState::default(),
            },
            done: false,
            consumed: 0,
            padded: false,
            format: 4,
        };
        let mut magic = [0u8; MAGIC.len()];
        r.take(&mut magic)?;
        r.format = match &magic[..] {
            m if m == MAGIC => 4,
            m if m == MAGIC_V3 => 3,
            m if m == MAGIC_V2 => 2,
            _ => return Err(corrupt(format!("{}: not a kvset snapshot (bad magic)", path.display()))),
        };
        let len = r.take_u32()?;
        let header = r.take_field(len)?;
        r.header = if r.format >= 3 {
            codec::decode("snapshot header", &header).map_err(|e| corrupt(e.to_string()))?
        } else {
            let v2: SnapshotHeaderV2 =
                codec::decode("snapshot header", &header).map_err(|e| corrupt(e.to_string()))?;
            SnapshotHeader {
                meta: v2.meta,
                revision: v2.revision,
                compact_revision: v2.compact_revision,
                replicas: v2.replicas,
                leases: v2.leases,
                auth: AuthState::default(),
            }
        };
        Ok(r)
    }

    /// The header.
    pub(crate) fn header(&self) -> &SnapshotHeader {
        &self.header
    }

    fn take(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.input.read_exact(buf).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                corrupt("snapshot is truncated")
            } else {
                e
            }
        })?;
        self.crc.update(buf);
        self.consumed += buf.len() as u64;
        Ok(())
    }

    fn take_u32(&mut self) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.take(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn take_field(&mut self, len: u32) -> io::Result<Vec<u8>> {
        if len >= MAX_FIELD {
            return Err(corrupt(format!("snapshot field length {len} is implausible")));
        }
        let mut v = vec![0u8; len as usize];
        self.take(&mut v)?;
        Ok(v)
    }

    /// Returns the next record (key, encoded value), or `None` after the last one once the
    /// trailer's count and checksum have been verified.
    pub(crate) fn next_record(&mut self) -> io::Result<Option<(Vec<u8>, Vec<u8>)>> {
        if self.done {
            return Ok(None);
        }
        let klen = self.take_u32()?;
        if klen == END {
            let mut count = [0u8; 8];
            self.take(&mut count)?;
            let count = u64::from_le_bytes(count);
            let expected_crc = self.crc.clone().finalize();
            let mut crc = [0u8; 4];
            self.input.read_exact(&mut crc).map_err(|_| corrupt("snapshot is truncated (no checksum)"))?;
            if count != self.count {
                return Err(corrupt(format!("snapshot holds {} records, trailer says {count}", self.count)));
            }
            if u32::from_le_bytes(crc) != expected_crc {
                return Err(corrupt("snapshot checksum mismatch"));
            }
            self.consumed += 4;
            if self.padded {
                let mut rest = Vec::new();
                (&mut self.input).take(SECTOR).read_to_end(&mut rest)?;
                if rest.len() as u64 >= SECTOR || rest.iter().any(|b| *b != 0) {
                    return Err(corrupt(
                        "the bytes after the snapshot's checksum are not etcd's zero padding",
                    ));
                }
            } else {
                let mut rest = [0u8; 1];
                if self.input.read(&mut rest)? != 0 {
                    return Err(corrupt("snapshot has bytes after its checksum"));
                }
            }
            self.done = true;
            return Ok(None);
        }
        let key = self.take_field(klen)?;
        let vlen = self.take_u32()?;
        let value = self.take_field(vlen)?;
        self.count += 1;
        Ok(Some((key, value)))
    }

    /// Returns the next change: where it is stored and its record, whatever the file's format
    /// (a record of format 2 or 3 is converted), or `None` after the last one once the trailer
    /// has been verified. A record that does not decode is an error.
    pub(crate) fn next_change(&mut self) -> io::Result<Option<(Rev, Vec<u8>)>> {
        let Some((k, v)) = self.next_record()? else { return Ok(None) };
        if self.format == 4 {
            let mut full = [0u8; 13];
            if k.len() != 12 {
                return Err(corrupt(format!("bad record key {k:?}")));
            }
            full[0] = keys::RECORD;
            full[1..].copy_from_slice(&k);
            let rev =
                keys::parse_record_key(&full).ok_or_else(|| corrupt(format!("bad record key {k:?}")))?;
            if record::decode(&v).is_none() {
                return Err(corrupt(format!("undecodable record at {}.{}", rev.main, rev.sub)));
            }
            return Ok(Some((rev, v)));
        }
        let (key, revision, sub) =
            legacy::parse_history(&k, false).ok_or_else(|| corrupt(format!("bad history key {k:?}")))?;
        let version: Version = codec::decode("key version", &v).map_err(|e| corrupt(e.to_string()))?;
        Ok(Some((Rev::new(revision, sub), record::encode(&key, &version))))
    }
}

/// etcd pads a streamed snapshot to a multiple of this (`etcdctl snapshot save`).
const SECTOR: u64 = 512;

/// Writes to `dst` the kvset snapshot inside `src`, a file in etcd's framing as
/// `etcdctl snapshot save` writes it (the snapshot, zero padding to a 512-byte multiple, then a
/// SHA-256 of everything before it), checking the snapshot and the padding on the way. The
/// caller checks the digest. Returns the snapshot's size.
pub fn unframe_etcd(src: &Path, dst: &Path, digest_len: u64) -> io::Result<u64> {
    let framed = fs::metadata(src)?.len();
    if framed < digest_len {
        return Err(corrupt("too short for etcd's framing"));
    }
    {
        let mut input = fs::File::open(src)?.take(framed - digest_len);
        let mut out = fs::File::create(dst)?;
        io::copy(&mut input, &mut out)?;
    }
    let mut r = SnapshotReader::open(dst)?;
    r.padded = true;
    while r.next_record()?.is_some() {}
    let inner = r.consumed;
    let out = fs::OpenOptions::new().write(true).open(dst)?;
    out.set_len(inner)?;
    out.sync_all()?;
    Ok(inner)
}

/// Reads only the header of the snapshot at `path`.
pub(crate) fn read_header(path: &Path) -> io::Result<SnapshotHeader> {
    Ok(SnapshotReader::open(path)?.header.clone())
}

/// Checks a whole snapshot file (structure, count, checksum) without using its records.
pub fn verify(path: &Path) -> io::Result<SnapshotHeader> {
    Ok(inspect(path)?.0)
}

/// Checks a whole snapshot file like [`verify`] and also returns how many records (versions
/// of keys) it holds.
pub fn inspect(path: &Path) -> io::Result<(SnapshotHeader, u64)> {
    let mut r = SnapshotReader::open(path)?;
    while r.next_record()?.is_some() {}
    Ok((r.header.clone(), r.count))
}

/// Copies the records of the snapshot `src` into a new file `dst` of the current format (fsynced)
/// under the header
/// `header` makes of `src`'s, checking `src` on the way (a damaged `src` fails the copy).
/// Returns `src`'s header and its number of records.
pub(crate) fn rewrite(
    src: &Path,
    dst: &Path,
    header: impl FnOnce(&SnapshotHeader) -> io::Result<SnapshotHeader>,
) -> io::Result<(SnapshotHeader, u64)> {
    let mut r = SnapshotReader::open(src)?;
    let mut w = SnapshotWriter::create(dst, &header(&r.header)?)?;
    while let Some((rev, record)) = r.next_change()? {
        w.record(&keys::record_key(rev)[1..], &record)?;
    }
    w.finish()?;
    Ok((r.header, r.count))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_sample(path: &Path, n: usize) -> SnapshotHeader {
        let header = SnapshotHeader {
            meta: SnapshotMeta::default(),
            revision: 42,
            compact_revision: 7,
            replicas: Some(3),
            leases: vec![Lease { id: 5, ttl: 60, grant: 0, applied_at: None }],
            auth: AuthState::default(),
        };
        let mut w = SnapshotWriter::create(path, &header).unwrap();
        for i in 0..n {
            w.record(format!("key-{i}").as_bytes(), format!("value-{i}").as_bytes()).unwrap();
        }
        w.finish().unwrap();
        header
    }

    #[test]
    fn files_of_format_2_are_read_with_no_users() {
        // A format 2 file as the previous release wrote it: its magic, its header, no records.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v2.snap");
        let v2 = SnapshotHeaderV2 {
            meta: SnapshotMeta::default(),
            revision: 42,
            compact_revision: 7,
            replicas: Some(3),
            leases: vec![Lease { id: 5, ttl: 60, grant: 0, applied_at: None }],
        };
        let header = codec::encode("header", &v2).unwrap();
        let mut bytes = MAGIC_V2.to_vec();
        bytes.extend_from_slice(&(header.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(&END.to_le_bytes());
        bytes.extend_from_slice(&0u64.to_le_bytes());
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        fs::write(&path, &bytes).unwrap();
        let (read, count) = inspect(&path).unwrap();
        assert_eq!((read.revision, read.compact_revision, read.replicas, count), (42, 7, Some(3), 0));
        assert_eq!(read.leases, v2.leases);
        assert_eq!(read.auth, AuthState::default());
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.snap");
        let header = write_sample(&path, 1000);
        let mut r = SnapshotReader::open(&path).unwrap();
        assert_eq!(r.header(), &header);
        let mut n = 0;
        while let Some((k, v)) = r.next_record().unwrap() {
            assert_eq!(k, format!("key-{n}").into_bytes());
            assert_eq!(v, format!("value-{n}").into_bytes());
            n += 1;
        }
        assert_eq!(n, 1000);
    }

    #[test]
    fn every_truncation_and_every_bit_flip_in_a_small_file_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.snap");
        write_sample(&path, 3);
        let good = fs::read(&path).unwrap();
        let bad = dir.path().join("bad.snap");
        for cut in 0..good.len() {
            fs::write(&bad, &good[..cut]).unwrap();
            assert!(verify(&bad).is_err(), "truncation at {cut} went unnoticed");
        }
        for i in 0..good.len() {
            let mut flipped = good.clone();
            flipped[i] ^= 0x10;
            fs::write(&bad, &flipped).unwrap();
            assert!(verify(&bad).is_err(), "bit flip at byte {i} went unnoticed");
        }
        let mut longer = good.clone();
        longer.push(0);
        fs::write(&bad, &longer).unwrap();
        assert!(verify(&bad).is_err(), "trailing garbage went unnoticed");
    }
}
