//! The LMDB environment (heed): MVCC buckets plus `meta`, opened without per-txn fsync
//! because the WAL is the durability; `sync` is called at checkpoints.

use crate::error::KvError;
use heed::types::Bytes;
use heed::{Database, Env, EnvFlags, EnvOpenOptions, RoTxn, RwTxn, WithoutTls};
use std::path::Path;
use std::sync::Arc;

pub type Db = Database<Bytes, Bytes>;

/// Keys of the `meta` bucket.
pub mod meta_key {
    pub const APPLIED_INDEX: &[u8] = b"applied_index";
    pub const APPLIED_TERM: &[u8] = b"applied_term";
    pub const CONF_STATE: &[u8] = b"conf_state";
    pub const REVISION: &[u8] = b"revision";
    pub const COMPACTED: &[u8] = b"compacted";
    pub const ALARMS: &[u8] = b"alarms";
    /// postcard Vec<cluster::Member> / Vec<u64> of removed member IDs.
    pub const MEMBERS: &[u8] = b"members";
    pub const REMOVED: &[u8] = b"removed";
    pub const CLUSTER_ID: &[u8] = b"cluster_id";
    /// Whose data dir this is: the one meta key that is not replicated (snapshots
    /// neither carry nor overwrite it).
    pub const MEMBER_ID: &[u8] = b"member_id";
}

#[derive(Clone)]
pub struct Backend {
    pub env: Env<WithoutTls>,
    /// revision (main, sub) -> record, like etcd's `key` bucket.
    pub kv: Db,
    /// user key -> latest revision of that key (+ tombstone flag).
    pub index: Db,
    pub meta: Db,
    /// lease id (8 bytes big-endian) -> postcard `Lease`.
    pub lease: Db,
    /// lease id ++ user key -> (): the keys attached to each lease.
    pub lease_keys: Db,
}

impl Backend {
    /// Opens (creating if needed) the environment in `dir`. `map_size_bytes` bounds the
    /// file; the quota check keeps the data well below it.
    pub fn open(dir: &Path, map_size_bytes: usize) -> Result<Backend, KvError> {
        assert!(map_size_bytes >= 1 << 20, "map size must be at least 1 MiB");
        std::fs::create_dir_all(dir)
            .map_err(|e| KvError::Internal(format!("create {}: {e}", dir.display())))?;
        let page = page_size::get_or_4k();
        let map_size_bytes = map_size_bytes.div_ceil(page) * page;
        // SAFETY: the environment is opened once per process; no other code maps the file.
        let env = unsafe {
            let mut opts = EnvOpenOptions::new().read_txn_without_tls();
            opts.map_size(map_size_bytes).max_dbs(8).max_readers(1024);
            // WRITE_MAP: a commit leaves its dirty pages in the shared mapping instead of
            // copying each one out with pwrite (A/B, 3 members, 1000 clients: 5 µs less
            // server CPU per put, about 9%). LMDB then sizes the file to the map (sparse),
            // so sizes below come from its page counts, not the file's length.
            opts.flags(EnvFlags::NO_SYNC | EnvFlags::WRITE_MAP);
            opts.open(dir)?
        };
        let mut wtxn = env.write_txn()?;
        let kv = env.create_database(&mut wtxn, Some("kv"))?;
        let index = env.create_database(&mut wtxn, Some("index"))?;
        let meta = env.create_database(&mut wtxn, Some("meta"))?;
        let lease = env.create_database(&mut wtxn, Some("lease"))?;
        let lease_keys = env.create_database(&mut wtxn, Some("lease_keys"))?;
        wtxn.commit()?;
        Ok(Backend {
            env,
            kv,
            index,
            meta,
            lease,
            lease_keys,
        })
    }

    /// Every database with a stable tag (the snapshot format names them by tag).
    pub fn dbs(&self) -> [(u8, Db); 5] {
        [
            (1, self.kv),
            (2, self.index),
            (3, self.meta),
            (4, self.lease),
            (5, self.lease_keys),
        ]
    }

    /// Bytes in use (pages up to the last one LMDB allocated): what the quota limits.
    pub fn size_in_use_bytes(&self) -> u64 {
        let info = self.env.info();
        (info.last_page_number as u64 + 1) * page_size::get_or_4k() as u64
    }

    /// What etcd calls the db size: the data file up to its last page. (With WRITE_MAP
    /// the file's length is the map size, a sparse reservation, so it is not used.)
    pub fn file_size_bytes(&self) -> u64 {
        self.size_in_use_bytes()
    }

    /// Makes every committed txn durable (LMDB runs with NO_SYNC between checkpoints).
    pub fn sync(&self) -> Result<(), KvError> {
        self.env.force_sync()?;
        Ok(())
    }

    pub fn get_u64(&self, txn: &RoTxn, key: &[u8]) -> Result<u64, KvError> {
        Ok(match self.meta.get(txn, key)? {
            Some(b) if b.len() == 8 => u64::from_be_bytes(b.try_into().unwrap_or([0; 8])),
            Some(_) => return Err(KvError::Internal(format!("meta {key:?}: bad length"))),
            None => 0,
        })
    }

    pub fn put_u64(&self, txn: &mut RwTxn, key: &[u8], v: u64) -> Result<(), KvError> {
        self.meta.put(txn, key, &v.to_be_bytes())?;
        Ok(())
    }

    pub fn read_txn(&self) -> Result<RoTxn<'_, WithoutTls>, KvError> {
        Ok(self.env.read_txn()?)
    }
}

/// The member's LMDB environment as the actors reach it: the current `Backend`, which an
/// online defragmentation replaces whole. Readers take a txn together with the backend it
/// belongs to (heed refuses a txn of one environment with databases of another), and a
/// txn opened after a swap is retried on the new environment, so no read is served from
/// the old file once writes go to the new one. The apply actor, the only writer, swaps.
#[derive(Clone)]
pub struct Store {
    current: Arc<arc_swap::ArcSwap<Backend>>,
}

/// Attempts to open a read txn on the current environment (a swap is rare: one retry
/// almost always suffices).
const MAX_READ_ATTEMPTS: usize = 8;

impl Store {
    pub fn new(b: Backend) -> Store {
        Store {
            current: Arc::new(arc_swap::ArcSwap::from_pointee(b)),
        }
    }

    /// The backend now: for sizes, syncs and work that opens its own txns.
    pub fn current(&self) -> Arc<Backend> {
        self.current.load_full()
    }

    /// A read txn and the backend it belongs to.
    pub fn read(&self) -> Result<(Arc<Backend>, RoTxn<'static, WithoutTls>), KvError> {
        for _ in 0..MAX_READ_ATTEMPTS {
            let b = self.current.load_full();
            let txn = b.env.clone().static_read_txn()?;
            if Arc::ptr_eq(&b, &self.current.load()) {
                return Ok((b, txn));
            }
        }
        Err(KvError::Internal(
            "backend swapped repeatedly during a read".into(),
        ))
    }

    /// Makes `b` the backend every later read and write uses.
    pub fn swap(&self, b: Backend) {
        self.current.store(Arc::new(b));
    }
}

/// Online defragmentation (etcd's Maintenance.Defragment), run by the apply actor between
/// batches, so nothing is written meanwhile: a compacting copy of `current` into the
/// fresh directory `scratch`, made durable and opened, then swapped with `db_dir` in one
/// atomic `renameat2(RENAME_EXCHANGE)` (a crash at any point leaves either the old or
/// the new complete environment at `db_dir`); the old files go (readers still in them
/// keep their mapping until they finish). The caller swaps the returned backend in.
pub fn defragment_online(
    current: &Backend,
    db_dir: &Path,
    scratch: &Path,
) -> Result<Backend, KvError> {
    use std::os::unix::ffi::OsStrExt;
    assert!(db_dir != scratch && db_dir.parent() == scratch.parent());
    let _ = std::fs::remove_dir_all(scratch); // left by a crash during a previous run
    let fresh = compacted_copy(current, db_dir, scratch).inspect_err(|_| {
        let _ = std::fs::remove_dir_all(scratch);
    })?;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes());
    let (from, to) = match (c(scratch), c(db_dir)) {
        (Ok(a), Ok(b)) => (a, b),
        _ => return Err(KvError::Internal("defragment: path with a NUL byte".into())),
    };
    // SAFETY: two NUL-terminated paths; AT_FDCWD resolves them like rename(2).
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        drop(fresh);
        let _ = std::fs::remove_dir_all(scratch);
        return Err(KvError::Internal(format!(
            "defragment: exchange directories: {e}"
        )));
    }
    // From here the fresh environment is the one at `db_dir` and must be used whatever
    // happens next: writing on to the old one (now at `scratch`) would lose those writes
    // at the next start.
    if let Some(parent) = db_dir.parent() {
        if let Err(e) = std::fs::File::open(parent).and_then(|d| d.sync_all()) {
            tracing::warn!("defragment: syncing the member dir: {e}");
        }
    }
    // `scratch` now holds the old files.
    if let Err(e) = std::fs::remove_dir_all(scratch) {
        tracing::warn!("defragment: removing the old files: {e}");
    }
    Ok(fresh)
}

/// The compacting copy of `current` in the new directory `scratch`, durable, opened with
/// the same map size.
fn compacted_copy(current: &Backend, db_dir: &Path, scratch: &Path) -> Result<Backend, KvError> {
    let io = |what: &str, e: std::io::Error| KvError::Internal(format!("defragment: {what}: {e}"));
    std::fs::create_dir_all(scratch).map_err(|e| io("create scratch dir", e))?;
    let copy = current
        .env
        .copy_to_path(scratch.join("data.mdb"), heed::CompactionOption::Enabled)?;
    if let Ok(m) = std::fs::metadata(db_dir.join("data.mdb")) {
        copy.set_permissions(m.permissions())
            .map_err(|e| io("keep the file mode", e))?;
    }
    copy.sync_all()
        .map_err(|e| io("sync the compacted copy", e))?;
    drop(copy);
    Backend::open(scratch, current.env.info().map_size)
}

/// Removes scratch directories an interrupted online defragmentation left in `member_dir`.
pub fn remove_defrag_leftovers(member_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(member_dir) else {
        return;
    };
    for e in entries.flatten().take(1000) {
        if e.file_name().to_string_lossy().starts_with("db.defrag-") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// etcd's offline defragmentation (`etcdctl defrag --data-dir`): the online procedure on
/// an environment no server has open (the caller holds the data dir's lock). Returns the
/// file size before and after.
pub fn defragment_offline(db_dir: &Path) -> Result<(u64, u64), KvError> {
    let data = db_dir.join("data.mdb");
    let length = std::fs::metadata(&data)
        .map_err(|e| KvError::Client(format!("{}: {e}", data.display())))?
        .len();
    // The length is at least the pages in use (with WRITE_MAP it is the old map size).
    let map_size_bytes = (length as usize).max(1 << 20);
    let current = Backend::open(db_dir, map_size_bytes)?;
    let before = current.file_size_bytes();
    let scratch = db_dir.with_file_name("db.defrag-offline");
    let fresh = defragment_online(&current, db_dir, &scratch)?;
    let after = fresh.file_size_bytes();
    assert!(
        after > 0,
        "a compacted environment still has its meta pages"
    );
    Ok((before, after))
}

/// Page size without another dependency.
mod page_size {
    pub fn get_or_4k() -> usize {
        // SAFETY: sysconf has no preconditions.
        let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if v > 0 {
            v as usize
        } else {
            4096
        }
    }
}
