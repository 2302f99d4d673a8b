//! Raft snapshots of the LMDB state: a consistent copy made from one read txn while the
//! server keeps serving, streamed to lagging or new followers, installed in one write txn.
//!
//! File format: `MAGIC`, then records `u8 db tag | u32 LE key len | key | u32 LE value
//! len | value`, then an end tag and the CRC32C of everything before it. Blocking: run
//! on a blocking pool, never on a shard's executor.

use crate::storage::backend::{meta_key, Backend};
use protobuf::Message as _;
use raft::eraftpb::{ConfState, SnapshotMetadata};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"CKSNAP1\n";
const END_TAG: u8 = 0xff;
/// The meta table's tag in `Backend::dbs`.
const META_TAG: u8 = 3;
/// Keys and values are bounded by LMDB (keys 511 B with longer-keys off, values by the
/// request limit); anything larger in a file is corruption.
const MAX_FIELD_BYTES: usize = 256 << 20;

struct CrcWriter<W: Write> {
    inner: W,
    crc: u32,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

struct CrcReader<R: Read> {
    inner: R,
    crc: u32,
}

impl<R: Read> Read for CrcReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        Ok(n)
    }
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Writes a snapshot of the current state into `dir`; returns its metadata and path.
pub fn create(backend: &Backend, dir: &Path) -> Result<(SnapshotMetadata, PathBuf), String> {
    let txn = backend.read_txn().map_err(err)?;
    let index = backend
        .get_u64(&txn, meta_key::APPLIED_INDEX)
        .map_err(err)?;
    let term = backend.get_u64(&txn, meta_key::APPLIED_TERM).map_err(err)?;
    let conf_state = match backend.meta.get(&txn, meta_key::CONF_STATE).map_err(err)? {
        Some(b) => ConfState::parse_from_bytes(b).map_err(err)?,
        None => return Err("no conf state to snapshot".into()),
    };
    if index == 0 {
        return Err("nothing applied yet".into());
    }
    let tmp = dir.join("snapshot.tmp");
    write_records(backend, &txn, &tmp)?;
    drop(txn);
    let path = dir.join(format!("snap-{term:016x}-{index:016x}.db"));
    std::fs::rename(&tmp, &path).map_err(err)?;
    // Older snapshots are superseded (a transfer in progress keeps its open handle).
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if p != path && name.starts_with("snap-") {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
    let meta = SnapshotMetadata {
        index,
        term,
        conf_state: Some(conf_state).into(),
        ..Default::default()
    };
    Ok((meta, path))
}

/// Writes every record visible in `txn` to `path` in the snapshot format, synced.
fn write_records(
    backend: &Backend,
    txn: &heed::RoTxn<'_, heed::WithoutTls>,
    path: &Path,
) -> Result<(), String> {
    let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut w = CrcWriter {
        inner: BufWriter::with_capacity(1 << 20, file),
        crc: 0,
    };
    w.write_all(MAGIC).map_err(err)?;
    for (tag, db) in backend.dbs() {
        for item in db.iter(txn).map_err(err)? {
            let (k, v) = item.map_err(err)?;
            if tag == META_TAG && k == meta_key::MEMBER_ID {
                continue; // per data dir, not replicated
            }
            w.write_all(&[tag]).map_err(err)?;
            w.write_all(&(k.len() as u32).to_le_bytes()).map_err(err)?;
            w.write_all(k).map_err(err)?;
            w.write_all(&(v.len() as u32).to_le_bytes()).map_err(err)?;
            w.write_all(v).map_err(err)?;
        }
    }
    w.write_all(&[END_TAG]).map_err(err)?;
    let crc = w.crc;
    let mut file = w.inner.into_inner().map_err(err)?;
    file.write_all(&crc.to_le_bytes()).map_err(err)?;
    file.sync_all().map_err(err)
}

/// Name prefix of copies made for clients (Maintenance.Snapshot); left-overs from a
/// crash are removed at start-up.
pub const CLIENT_COPY_PREFIX: &str = "client-";

/// A consistent copy of the state for a client (`etcdctl snapshot save`), in `dir`.
/// The caller streams and then deletes it. Blocking: run on a blocking pool.
pub fn save_copy(backend: &Backend, dir: &Path) -> Result<PathBuf, String> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let txn = backend.read_txn().map_err(err)?;
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!("{CLIENT_COPY_PREFIX}{n}.db"));
    write_records(backend, &txn, &path)?;
    // etcdctl refuses a download whose length minus the SHA-256 is not a multiple of
    // 512 (bolt files are whole pages): pad with zeros, which `install` never reads.
    let len = std::fs::metadata(&path).map_err(err)?.len();
    let padded = len.div_ceil(CLIENT_COPY_ALIGN_BYTES) * CLIENT_COPY_ALIGN_BYTES;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(err)?;
    f.set_len(padded).map_err(err)?;
    f.sync_all().map_err(err)?;
    assert_eq!(padded % CLIENT_COPY_ALIGN_BYTES, 0);
    Ok(path)
}

/// Client copies are padded to a multiple of this (etcdctl checks it).
const CLIENT_COPY_ALIGN_BYTES: u64 = 512;

/// Bytes of SHA-256 that Maintenance.Snapshot appends after the data (as etcd does).
pub const SHA256_BYTES: usize = 32;

/// What `restore` put into the new data dir.
#[derive(Debug, PartialEq, Eq)]
pub struct Restored {
    pub revision: i64,
    pub keys: u64,
}

/// `corekv snapshot restore`: a saved snapshot (data + SHA-256, as `etcdctl snapshot
/// save` writes it) becomes the state of a new data dir without any cluster identity,
/// so the first `corekv serve` on it bootstraps a new cluster from its flags around the
/// restored keyspace (revisions, history and leases kept), as etcd's restore does.
pub fn restore(file: &Path, db_dir: &Path, skip_hash_check: bool) -> Result<Restored, String> {
    use sha2::Digest;
    let bad = |e: String| format!("snapshot {}: {e}", file.display());
    let bytes = std::fs::metadata(file)
        .map_err(|e| bad(e.to_string()))?
        .len();
    if !skip_hash_check {
        if bytes < SHA256_BYTES as u64 {
            return Err(bad("too short to hold its SHA-256".into()));
        }
        let mut f = std::fs::File::open(file).map_err(|e| bad(e.to_string()))?;
        let mut body = (&mut f).take(bytes - SHA256_BYTES as u64);
        let mut sha = sha2::Sha256::new();
        std::io::copy(&mut body, &mut sha).map_err(|e| bad(e.to_string()))?;
        let mut want = [0u8; SHA256_BYTES];
        f.read_exact(&mut want).map_err(|e| bad(e.to_string()))?;
        if sha.finalize()[..] != want[..] {
            return Err(bad(
                "SHA-256 mismatch (use --skip-hash-check for a copy without one)".into(),
            ));
        }
    }
    std::fs::create_dir_all(db_dir).map_err(|e| format!("{}: {e}", db_dir.display()))?;
    let map_size = (bytes as usize).saturating_mul(4).max(64 << 20);
    let backend = Backend::open(db_dir, map_size).map_err(err)?;
    install(&backend, file)?;
    let mut txn = backend.env.write_txn().map_err(err)?;
    for key in [
        meta_key::MEMBER_ID,
        meta_key::CLUSTER_ID,
        meta_key::MEMBERS,
        meta_key::REMOVED,
        meta_key::CONF_STATE,
        meta_key::APPLIED_INDEX,
        meta_key::APPLIED_TERM,
    ] {
        backend.meta.delete(&mut txn, key).map_err(err)?;
    }
    let revision = backend.get_u64(&txn, meta_key::REVISION).map_err(err)? as i64;
    let keys = crate::storage::mvcc::live_keys(&backend, &txn).map_err(err)?;
    txn.commit().map_err(err)?;
    backend.sync().map_err(err)?;
    Ok(Restored { revision, keys })
}

/// `snapshot status`: what a saved file holds, read without installing it.
#[derive(Debug, PartialEq, Eq)]
pub struct FileStatus {
    /// CRC-32C of the records (the file's own checksum, verified).
    pub hash: u32,
    pub revision: i64,
    /// Records in the file over all tables (etcd counts its bolt keys the same way).
    pub total_keys: u64,
    pub total_size: u64,
}

/// Reads every record of a snapshot file, checks its CRC, and reports what it holds.
pub fn status(path: &Path) -> Result<FileStatus, String> {
    let bad = |e: String| format!("snapshot {}: {e}", path.display());
    let total_size = std::fs::metadata(path)
        .map_err(|e| bad(e.to_string()))?
        .len();
    let (mut total_keys, mut revision) = (0u64, 0i64);
    let crc = read_records(path, |tag, k, v| {
        if tag == META_TAG && k == meta_key::REVISION {
            let b: [u8; 8] = v
                .try_into()
                .map_err(|_| bad("bad revision record".into()))?;
            revision = u64::from_be_bytes(b) as i64;
        }
        total_keys += 1;
        Ok(())
    })?;
    Ok(FileStatus {
        hash: crc,
        revision,
        total_keys,
        total_size,
    })
}

/// Reads a snapshot file: checks the magic, hands every record (tag, key, value) to
/// `each`, checks the CRC after the end tag, and returns it. Trailing bytes (padding,
/// SHA-256) are not read.
fn read_records(
    path: &Path,
    mut each: impl FnMut(u8, Vec<u8>, Vec<u8>) -> Result<(), String>,
) -> Result<u32, String> {
    let bad = |e: String| format!("snapshot {}: {e}", path.display());
    let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let mut r = CrcReader {
        inner: BufReader::with_capacity(1 << 20, file),
        crc: 0,
    };
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).map_err(|e| bad(e.to_string()))?;
    if &magic != MAGIC {
        return Err(bad("not a corekv snapshot".into()));
    }
    // Bounded by the file: every pass consumes at least one byte.
    loop {
        let mut tag = [0u8; 1];
        r.read_exact(&mut tag).map_err(|e| bad(e.to_string()))?;
        if tag[0] == END_TAG {
            break;
        }
        let k = read_field(&mut r).map_err(bad)?;
        let v = read_field(&mut r).map_err(bad)?;
        each(tag[0], k, v)?;
    }
    let crc = r.crc;
    let mut want = [0u8; 4];
    r.inner
        .read_exact(&mut want)
        .map_err(|e| bad(e.to_string()))?;
    if u32::from_le_bytes(want) != crc {
        return Err(bad("CRC mismatch".into()));
    }
    Ok(crc)
}

fn read_field<R: Read>(r: &mut R) -> Result<Vec<u8>, String> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).map_err(err)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FIELD_BYTES {
        return Err(format!("field of {len} bytes"));
    }
    let mut v = vec![0u8; len];
    r.read_exact(&mut v).map_err(err)?;
    Ok(v)
}

/// Replaces the whole state with the snapshot at `path` in one write txn (this member's
/// ID is kept), then syncs. Returns the applied (index, term) it carried.
pub fn install(backend: &Backend, path: &Path) -> Result<(u64, u64), String> {
    let bad = |e: String| format!("snapshot {}: {e}", path.display());
    let mut txn = backend.env.write_txn().map_err(err)?;
    let member_id = backend
        .meta
        .get(&txn, meta_key::MEMBER_ID)
        .map_err(err)?
        .map(|b| b.to_vec());
    let dbs = backend.dbs();
    for (_, db) in dbs {
        db.clear(&mut txn).map_err(err)?;
    }
    read_records(path, |tag, k, v| {
        let db = dbs
            .iter()
            .find(|(t, _)| *t == tag)
            .map(|(_, db)| *db)
            .ok_or_else(|| bad(format!("unknown database tag {tag}")))?;
        db.put(&mut txn, &k, &v).map_err(err)
    })?;
    if let Some(id) = member_id {
        backend
            .meta
            .put(&mut txn, meta_key::MEMBER_ID, &id)
            .map_err(err)?;
    }
    let index = backend
        .get_u64(&txn, meta_key::APPLIED_INDEX)
        .map_err(err)?;
    let term = backend.get_u64(&txn, meta_key::APPLIED_TERM).map_err(err)?;
    txn.commit().map_err(err)?;
    backend.sync().map_err(err)?;
    Ok((index, term))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_round_trips_and_detects_damage() {
        let dir = tempfile::tempdir().unwrap();
        let a = Backend::open(&dir.path().join("a"), 64 << 20).unwrap();
        let b = Backend::open(&dir.path().join("b"), 64 << 20).unwrap();
        {
            let mut t = a.env.write_txn().unwrap();
            a.put_u64(&mut t, meta_key::APPLIED_INDEX, 42).unwrap();
            a.put_u64(&mut t, meta_key::APPLIED_TERM, 3).unwrap();
            a.put_u64(&mut t, meta_key::MEMBER_ID, 1).unwrap();
            let cs = ConfState {
                voters: vec![1, 2, 3],
                ..Default::default()
            };
            a.meta
                .put(&mut t, meta_key::CONF_STATE, &cs.write_to_bytes().unwrap())
                .unwrap();
            a.kv.put(&mut t, b"k1", b"v1").unwrap();
            a.lease.put(&mut t, b"l", b"x").unwrap();
            t.commit().unwrap();
            let mut t = b.env.write_txn().unwrap();
            b.put_u64(&mut t, meta_key::MEMBER_ID, 2).unwrap();
            b.kv.put(&mut t, b"stale", b"gone").unwrap();
            t.commit().unwrap();
        }
        let snaps = dir.path().join("snaps");
        std::fs::create_dir_all(&snaps).unwrap();
        let (meta, path) = create(&a, &snaps).unwrap();
        assert_eq!((meta.index, meta.term), (42, 3));
        assert_eq!(meta.get_conf_state().voters, vec![1, 2, 3]);
        assert_eq!(install(&b, &path).unwrap(), (42, 3));
        let t = b.read_txn().unwrap();
        assert_eq!(b.kv.get(&t, b"k1").unwrap(), Some(&b"v1"[..]));
        assert_eq!(b.kv.get(&t, b"stale").unwrap(), None);
        assert_eq!(b.get_u64(&t, meta_key::MEMBER_ID).unwrap(), 2);
        drop(t);
        // One flipped byte anywhere is refused and leaves the state as it was.
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        let broken = snaps.join("broken.db");
        std::fs::write(&broken, &bytes).unwrap();
        assert!(install(&b, &broken).is_err());
        let t = b.read_txn().unwrap();
        assert_eq!(b.kv.get(&t, b"k1").unwrap(), Some(&b"v1"[..]));
    }
}
