//! etcd's MVCC on LMDB.
//!
//! Layout: `kv` maps revision (main, sub as 16 big-endian bytes) to a [`Record`], like
//! etcd's `key` bucket; `index` maps each user key to its latest revision. Every record
//! points at the previous revision of its key, so a read at an older revision walks back
//! from the latest one: O(1) index updates on the write path, O(versions since R) reads.

use crate::error::KvError;
use crate::model::*;
use crate::storage::auth;
use crate::storage::backend::{meta_key, Backend};
use heed::{PutFlags, RoTxn, RwTxn};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::ops::Bound;

/// Revision of a fresh store, as etcd (the first write gets revision 2).
pub const INITIAL_REVISION: i64 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Rev {
    pub main: i64,
    pub sub: i64,
}

impl Rev {
    fn to_key(self) -> [u8; 16] {
        let mut k = [0u8; 16];
        k[..8].copy_from_slice(&(self.main as u64).to_be_bytes());
        k[8..].copy_from_slice(&(self.sub as u64).to_be_bytes());
        k
    }
    fn from_key(k: &[u8]) -> Result<Rev, KvError> {
        if k.len() != 16 {
            return Err(KvError::Internal("kv: bad revision key".into()));
        }
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        a.copy_from_slice(&k[..8]);
        b.copy_from_slice(&k[8..]);
        Ok(Rev {
            main: u64::from_be_bytes(a) as i64,
            sub: u64::from_be_bytes(b) as i64,
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    #[serde(with = "serde_bytes")]
    key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    value: Vec<u8>,
    create_revision: i64,
    version: i64,
    lease: i64,
    tombstone: bool,
    prev: Option<Rev>,
}

impl Record {
    fn to_kv(&self, rev: Rev) -> KeyValue {
        KeyValue {
            key: self.key.clone(),
            create_revision: self.create_revision,
            mod_revision: rev.main,
            version: self.version,
            value: self.value.clone(),
            lease: self.lease,
        }
    }
}

/// The key's latest revision, plus the live generation's create revision and version
/// so a put need not read the previous record.
#[derive(Clone, Copy, Debug)]
struct IndexEntry {
    latest: Rev,
    tombstone: bool,
    create_revision: i64,
    version: i64,
    /// Lease of the live record (0 = none), so a delete can detach it without a read.
    lease: i64,
}

const INDEX_ENTRY_BYTES: usize = 41;
/// Entries written before leases existed carry no lease field.
const INDEX_ENTRY_BYTES_V0: usize = 33;

impl IndexEntry {
    fn encode(self) -> [u8; INDEX_ENTRY_BYTES] {
        let mut b = [0u8; INDEX_ENTRY_BYTES];
        b[..16].copy_from_slice(&self.latest.to_key());
        b[16] = self.tombstone as u8;
        b[17..25].copy_from_slice(&self.create_revision.to_be_bytes());
        b[25..33].copy_from_slice(&self.version.to_be_bytes());
        b[33..41].copy_from_slice(&self.lease.to_be_bytes());
        b
    }
    fn decode(b: &[u8]) -> Result<IndexEntry, KvError> {
        if b.len() != INDEX_ENTRY_BYTES && b.len() != INDEX_ENTRY_BYTES_V0 {
            return Err(KvError::Internal("index: bad entry".into()));
        }
        let i64_at = |at: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[at..at + 8]);
            i64::from_be_bytes(x)
        };
        Ok(IndexEntry {
            latest: Rev::from_key(&b[..16])?,
            tombstone: b[16] != 0,
            create_revision: i64_at(17),
            version: i64_at(25),
            lease: if b.len() == INDEX_ENTRY_BYTES {
                i64_at(33)
            } else {
                0
            },
        })
    }
    fn live(self) -> Option<IndexEntry> {
        (!self.tombstone).then_some(self)
    }
}

pub fn current_revision(b: &Backend, txn: &RoTxn) -> Result<i64, KvError> {
    let r = b.get_u64(txn, meta_key::REVISION)? as i64;
    Ok(r.max(INITIAL_REVISION))
}

/// Keys with a live (not deleted) latest version.
pub fn live_keys(b: &Backend, txn: &RoTxn) -> Result<u64, KvError> {
    let mut n = 0;
    for item in b.index.iter(txn)? {
        let (_, v) = item?;
        n += u64::from(IndexEntry::decode(v)?.live().is_some());
    }
    Ok(n)
}

pub fn compacted_revision(b: &Backend, txn: &RoTxn) -> Result<i64, KvError> {
    Ok(b.get_u64(txn, meta_key::COMPACTED)? as i64)
}

pub fn alarms(b: &Backend, txn: &RoTxn) -> Result<Vec<AlarmMember>, KvError> {
    match b.meta.get(txn, meta_key::ALARMS)? {
        Some(bytes) => Ok(postcard::from_bytes(bytes)?),
        None => Ok(Vec::new()),
    }
}

fn lease_key(id: i64) -> [u8; 8] {
    (id as u64).to_be_bytes()
}

fn lease_key_entry(id: i64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + key.len());
    k.extend_from_slice(&lease_key(id));
    k.extend_from_slice(key);
    k
}

pub fn lease_get(b: &Backend, txn: &RoTxn, id: i64) -> Result<Option<Lease>, KvError> {
    match b.lease.get(txn, &lease_key(id))? {
        Some(bytes) => Ok(Some(postcard::from_bytes(bytes)?)),
        None => Ok(None),
    }
}

/// Every lease, for the lessor at start-up and for `lease list`.
pub fn leases(b: &Backend, txn: &RoTxn) -> Result<Vec<Lease>, KvError> {
    let mut out = Vec::new();
    for item in b.lease.iter(txn)? {
        let (_, v) = item?;
        out.push(postcard::from_bytes(v)?);
    }
    Ok(out)
}

/// Keys attached to a lease, in key order.
pub fn lease_attached_keys(b: &Backend, txn: &RoTxn, id: i64) -> Result<Vec<Vec<u8>>, KvError> {
    let mut out = Vec::new();
    for item in b.lease_keys.prefix_iter(txn, &lease_key(id))? {
        let (k, _) = item?;
        out.push(k[8..].to_vec());
    }
    Ok(out)
}

/// Events with revisions in `[from, to]` in revision order, at most `limit` revisions'
/// worth (a revision is never split), for watchers catching up from the store. Returns
/// the events and the next revision to read.
pub fn events_between(
    b: &Backend,
    txn: &RoTxn,
    from: i64,
    to: i64,
    limit: usize,
) -> Result<(Vec<Event>, i64), KvError> {
    assert!(limit > 0);
    let lower = Rev { main: from, sub: 0 }.to_key();
    let upper = Rev {
        main: to + 1,
        sub: 0,
    }
    .to_key();
    let bounds: (Bound<&[u8]>, Bound<&[u8]>) =
        (Bound::Included(&lower[..]), Bound::Excluded(&upper[..]));
    let mut out: Vec<Event> = Vec::new();
    let mut next = to + 1;
    for item in b.kv.range(txn, &bounds)? {
        let (k, v) = item?;
        let rev = Rev::from_key(k)?;
        if out.len() >= limit && out.last().is_some_and(|e| e.kv.mod_revision != rev.main) {
            next = rev.main;
            break;
        }
        let rec: Record = postcard::from_bytes(v)?;
        let prev_kv = match rec.prev {
            Some(p) => get_record(b, txn, p)?
                .filter(|r| !r.tombstone)
                .map(|r| r.to_kv(p)),
            None => None,
        };
        out.push(Event {
            kind: if rec.tombstone {
                EventKind::Delete
            } else {
                EventKind::Put
            },
            kv: rec.to_kv(rev),
            prev_kv,
        });
    }
    Ok((out, next))
}

fn get_record(b: &Backend, txn: &RoTxn, rev: Rev) -> Result<Option<Record>, KvError> {
    match b.kv.get(txn, &rev.to_key())? {
        Some(bytes) => Ok(Some(postcard::from_bytes(bytes)?)),
        None => Ok(None),
    }
}

/// The live record of a key at revision `at`, walking back from its latest revision.
fn resolve(
    b: &Backend,
    txn: &RoTxn,
    entry: IndexEntry,
    at: i64,
) -> Result<Option<(Rev, Record)>, KvError> {
    if entry.latest.main <= at && entry.tombstone {
        return Ok(None);
    }
    let mut rev = entry.latest;
    // Bounded by the number of revisions of this key, which compaction bounds.
    for _ in 0..u32::MAX {
        let Some(rec) = get_record(b, txn, rev)? else {
            return Ok(None); // history below here was compacted away
        };
        if rev.main <= at {
            return Ok(if rec.tombstone {
                None
            } else {
                Some((rev, rec))
            });
        }
        match rec.prev {
            Some(p) => rev = p,
            None => return Ok(None),
        }
    }
    Err(KvError::Internal("mvcc: revision chain too long".into()))
}

/// Calls `f` for each index entry with a key in etcd's `[key, end)`; stops when it returns false.
fn for_each_key(
    b: &Backend,
    txn: &RoTxn,
    key: &[u8],
    end: &[u8],
    mut f: impl FnMut(&[u8], IndexEntry) -> Result<bool, KvError>,
) -> Result<(), KvError> {
    if end.is_empty() {
        if let Some(v) = b.index.get(txn, key)? {
            f(key, IndexEntry::decode(v)?)?;
        }
        return Ok(());
    }
    let upper = if end == [0] {
        Bound::Unbounded
    } else if end <= key {
        return Ok(()); // empty range
    } else {
        Bound::Excluded(end)
    };
    let bounds: (Bound<&[u8]>, Bound<&[u8]>) = (Bound::Included(key), upper);
    for item in b.index.range(txn, &bounds)? {
        let (k, v) = item?;
        if !f(k, IndexEntry::decode(v)?)? {
            break;
        }
    }
    Ok(())
}

/// Live key-values in `[key, end)` at revision `at`.
fn live_kvs(
    b: &Backend,
    txn: &RoTxn,
    key: &[u8],
    end: &[u8],
    at: i64,
) -> Result<Vec<(Rev, Record)>, KvError> {
    let mut out = Vec::new();
    for_each_key(b, txn, key, end, |_, entry| {
        if let Some(found) = resolve(b, txn, entry, at)? {
            out.push(found);
        }
        Ok(true)
    })?;
    Ok(out)
}

/// What `hash_kv` found: the hash and the revisions it was taken between.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvHash {
    pub hash: u32,
    /// The revision hashed up to.
    pub hash_revision: i64,
    pub current_revision: i64,
    /// -1 when nothing was ever compacted (etcd's answer then).
    pub compact_revision: i64,
}

/// etcd's HashKV, bit for bit: CRC-32C (Castagnoli) over "key", then every record of
/// the key bucket up to `rev` (0 = current) as etcd stores it — revision key `main BE
/// | '_' | sub BE` (+ 't' for a tombstone) and the mvccpb.KeyValue protobuf (a tombstone
/// holds only the key) — skipping records at or below the compact revision that a
/// compaction at `rev` would drop. Members with the same history agree, and so does
/// an etcd that saw the same writes. Blocking (a full scan): run on a blocking pool.
pub fn hash_kv(b: &Backend, rev: i64) -> Result<KvHash, KvError> {
    use prost::Message as _;
    let txn = b.read_txn()?;
    let current = current_revision(b, &txn)?;
    let compacted = compacted_revision(b, &txn)?;
    if rev > 0 && rev <= compacted {
        return Err(KvError::Compacted);
    }
    if rev > current {
        return Err(KvError::FutureRev);
    }
    let at = if rev <= 0 { current } else { rev };
    let upper = Rev {
        main: at + 1,
        sub: 0,
    }
    .to_key();
    let bounds: (Bound<&[u8]>, Bound<&[u8]>) = (Bound::Unbounded, Bound::Excluded(&upper));
    // etcd's kvindex.Keep(at): the latest revision <= at of every key live at `at`.
    let mut latest: HashMap<Vec<u8>, (Rev, bool)> = HashMap::new();
    for item in b.kv.range(&txn, &bounds)? {
        let (k, v) = item?;
        let rec: Record = postcard::from_bytes(v)?;
        latest.insert(rec.key, (Rev::from_key(k)?, rec.tombstone));
    }
    let keep: HashSet<Rev> = latest
        .into_values()
        .filter(|(_, tombstone)| !tombstone)
        .map(|(r, _)| r)
        .collect();
    let mut crc = crc32c::crc32c_append(0, b"key");
    for item in b.kv.range(&txn, &bounds)? {
        let (k, v) = item?;
        let rev = Rev::from_key(k)?;
        if rev.main <= compacted && !keep.is_empty() && !keep.contains(&rev) {
            continue;
        }
        let rec: Record = postcard::from_bytes(v)?;
        let mut key = [0u8; 18];
        key[..8].copy_from_slice(&(rev.main as u64).to_be_bytes());
        key[8] = b'_';
        key[9..17].copy_from_slice(&(rev.sub as u64).to_be_bytes());
        key[17] = b't';
        let pb = if rec.tombstone {
            crate::etcdpb::mvccpb::KeyValue {
                key: rec.key,
                ..Default::default()
            }
        } else {
            crate::etcdpb::mvccpb::KeyValue {
                key: rec.key,
                create_revision: rec.create_revision,
                mod_revision: rev.main,
                version: rec.version,
                value: rec.value,
                lease: rec.lease,
            }
        };
        crc = crc32c::crc32c_append(crc, &key[..if rec.tombstone { 18 } else { 17 }]);
        crc = crc32c::crc32c_append(crc, &pb.encode_to_vec());
    }
    assert!(at <= current && (rev <= 0 || at > compacted));
    Ok(KvHash {
        hash: crc,
        hash_revision: at,
        current_revision: current,
        compact_revision: if compacted > 0 { compacted } else { -1 },
    })
}

/// Maintenance.Hash: CRC-32C over every record of the replicated tables (kv, leases),
/// for comparing members' state. etcd hashes its whole bolt file, so the numbers differ
/// from etcd's by design. Blocking: run on a blocking pool.
pub fn hash_all(b: &Backend) -> Result<u32, KvError> {
    let txn = b.read_txn()?;
    let mut crc = 0u32;
    for (name, db) in [
        (&b"kv"[..], b.kv),
        (&b"lease"[..], b.lease),
        (&b"lease_keys"[..], b.lease_keys),
    ] {
        crc = crc32c::crc32c_append(crc, name);
        for item in db.iter(&txn)? {
            let (k, v) = item?;
            crc = crc32c::crc32c_append(crc, k);
            crc = crc32c::crc32c_append(crc, v);
        }
    }
    Ok(crc)
}

/// Checks a read revision against the store: etcd's compacted / future errors.
fn check_read_rev(requested: i64, current: i64, compacted: i64) -> Result<i64, KvError> {
    let at = if requested <= 0 { current } else { requested };
    if at > current {
        return Err(KvError::FutureRev);
    }
    if requested > 0 && at < compacted {
        return Err(KvError::Compacted);
    }
    Ok(at)
}

/// etcd's Range. Returns the response and the revision for its header.
pub fn range(
    b: &Backend,
    txn: &RoTxn,
    req: &RangeRequest,
) -> Result<(RangeResponse, i64), KvError> {
    let current = current_revision(b, txn)?;
    let compacted = compacted_revision(b, txn)?;
    let at = check_read_rev(req.revision, current, compacted)?;
    Ok((range_at(b, txn, req, at)?, current))
}

fn range_at(
    b: &Backend,
    txn: &RoTxn,
    req: &RangeRequest,
    at: i64,
) -> Result<RangeResponse, KvError> {
    let filtered = req.min_mod_revision != 0
        || req.max_mod_revision != 0
        || req.min_create_revision != 0
        || req.max_create_revision != 0;
    // As etcd: sorting and filtering need every key; otherwise fetch limit + 1 for `more`.
    let fetch_limit = if req.sort_order != SortOrder::None || filtered || req.limit <= 0 {
        usize::MAX
    } else {
        req.limit as usize + 1
    };
    let mut count: i64 = 0;
    let mut kvs: Vec<KeyValue> = Vec::new();
    for_each_key(b, txn, &req.key, &req.range_end, |_, entry| {
        // Fast path: at the latest revision the index alone says whether the key is live.
        if entry.latest.main <= at {
            if entry.tombstone {
                return Ok(true);
            }
            count += 1;
            if !req.count_only && kvs.len() < fetch_limit {
                if let Some(rec) = get_record(b, txn, entry.latest)? {
                    kvs.push(rec.to_kv(entry.latest));
                }
            }
            return Ok(true);
        }
        if let Some((rev, rec)) = resolve(b, txn, entry, at)? {
            count += 1;
            if !req.count_only && kvs.len() < fetch_limit {
                kvs.push(rec.to_kv(rev));
            }
        }
        Ok(true)
    })?;
    if req.count_only {
        return Ok(RangeResponse {
            kvs: Vec::new(),
            more: false,
            count,
        });
    }
    if filtered {
        kvs.retain(|kv| {
            (req.min_mod_revision == 0 || kv.mod_revision >= req.min_mod_revision)
                && (req.max_mod_revision == 0 || kv.mod_revision <= req.max_mod_revision)
                && (req.min_create_revision == 0 || kv.create_revision >= req.min_create_revision)
                && (req.max_create_revision == 0 || kv.create_revision <= req.max_create_revision)
        });
    }
    let mut order = req.sort_order;
    if req.sort_target != SortTarget::Key && order == SortOrder::None {
        order = SortOrder::Ascend; // etcd: results come key-sorted; other targets default to ascend
    }
    if order != SortOrder::None {
        kvs.sort_by(|a, b| {
            let ord = match req.sort_target {
                SortTarget::Key => a.key.cmp(&b.key),
                SortTarget::Version => a.version.cmp(&b.version),
                SortTarget::Create => a.create_revision.cmp(&b.create_revision),
                SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
                SortTarget::Value => a.value.cmp(&b.value),
            };
            if order == SortOrder::Descend {
                ord.reverse()
            } else {
                ord
            }
        });
    }
    let mut more = false;
    if req.limit > 0 && kvs.len() > req.limit as usize {
        kvs.truncate(req.limit as usize);
        more = true;
    }
    if req.keys_only {
        for kv in &mut kvs {
            kv.value.clear();
        }
    }
    Ok(RangeResponse { kvs, more, count })
}

fn compare_holds(c: &Compare, kv: &KeyValue) -> bool {
    use std::cmp::Ordering;
    let ord: Ordering = match &c.target {
        CompareTarget::Version(v) => kv.version.cmp(v),
        CompareTarget::Create(v) => kv.create_revision.cmp(v),
        CompareTarget::Mod(v) => kv.mod_revision.cmp(v),
        CompareTarget::Value(v) => kv.value.as_slice().cmp(v.as_slice()),
        CompareTarget::Lease(v) => kv.lease.cmp(v),
    };
    match c.result {
        CompareResult::Equal => ord == Ordering::Equal,
        CompareResult::NotEqual => ord != Ordering::Equal,
        CompareResult::Greater => ord == Ordering::Greater,
        CompareResult::Less => ord == Ordering::Less,
    }
}

/// etcd's applyCompare: every key in the range must satisfy it; a missing key compares
/// as the zero KeyValue, except that a value compare on a missing key always fails.
fn eval_compare(b: &Backend, txn: &RoTxn, c: &Compare, at: i64) -> Result<bool, KvError> {
    let kvs = live_kvs(b, txn, &c.key, &c.range_end, at)?;
    if kvs.is_empty() {
        return Ok(
            !matches!(c.target, CompareTarget::Value(_)) && compare_holds(c, &KeyValue::default())
        );
    }
    Ok(kvs
        .iter()
        .all(|(rev, rec)| compare_holds(c, &rec.to_kv(*rev))))
}

/// Applies committed write requests inside one LMDB write transaction (one per batch).
pub struct Applier<'e> {
    b: &'e Backend,
    txn: RwTxn<'e>,
    revision: i64,
    compacted: i64,
    alarms: Vec<AlarmMember>,
    alarms_dirty: bool,
    /// Set when a backend write failed: the txn holds a partial request and must not
    /// be committed.
    poisoned: bool,
    /// Changes for watchers, collected only while someone watches.
    events: Option<Vec<Event>>,
    lease_changes: Vec<LeaseChange>,
}

/// What the in-memory lessor must learn from an applied batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseChange {
    Granted(Lease),
    Revoked(i64),
}

/// Sub-revision counter of the request being applied.
struct WriteRev {
    main: i64,
    sub: i64,
}

impl WriteRev {
    fn next(&mut self) -> Rev {
        let r = Rev {
            main: self.main,
            sub: self.sub,
        };
        self.sub += 1;
        r
    }
}

impl<'e> Applier<'e> {
    pub fn begin(b: &'e Backend) -> Result<Applier<'e>, KvError> {
        let txn = b.env.write_txn()?;
        let revision = current_revision(b, &txn)?;
        let compacted = compacted_revision(b, &txn)?;
        let alarms = alarms(b, &txn)?;
        Ok(Applier {
            b,
            txn,
            revision,
            compacted,
            alarms,
            alarms_dirty: false,
            poisoned: false,
            events: None,
            lease_changes: Vec::new(),
        })
    }

    /// Collects watch events from here on (see `take_events`).
    pub fn collect_events(&mut self) {
        self.events.get_or_insert_with(Vec::new);
    }

    /// Events of the requests applied so far, in revision order.
    pub fn take_events(&mut self) -> Option<Vec<Event>> {
        self.events.take()
    }

    pub fn take_lease_changes(&mut self) -> Vec<LeaseChange> {
        std::mem::take(&mut self.lease_changes)
    }

    /// Marks the batch unusable when a backend write fails part-way through a request.
    fn poison<T>(&mut self, r: Result<T, heed::Error>) -> Result<T, KvError> {
        self.poisoned |= r.is_err();
        Ok(r?)
    }

    fn poison_kv<T>(&mut self, r: Result<T, KvError>) -> Result<T, KvError> {
        self.poisoned |= r.is_err();
        r
    }

    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// Whether a backend write failed part-way (the batch must be abandoned).
    pub fn poisoned(&self) -> bool {
        self.poisoned
    }

    pub fn has_alarm(&self, alarm: AlarmType) -> bool {
        self.alarms.iter().any(|a| a.alarm == alarm)
    }

    /// Applies one request atomically: validation happens before any write, so an error
    /// leaves the store untouched (as etcd checks a txn's puts before running it).
    pub fn apply(&mut self, req: &WriteRequest) -> Result<WriteResponse, KvError> {
        self.apply_as(req, None)
    }

    /// `apply` on behalf of a client: the auth store's checks come first, against the
    /// state every replica has at this entry (None: the server's own request).
    pub fn apply_as(
        &mut self,
        req: &WriteRequest,
        who: Option<&AuthUser>,
    ) -> Result<WriteResponse, KvError> {
        if let Some(who) = who {
            self.check_permitted(req, who)?;
        }
        if let WriteRequest::Auth(a) = req {
            let r = auth::apply(self.b, &mut self.txn, who, a);
            if matches!(r, Err(KvError::Internal(_) | KvError::NoSpace)) {
                self.poisoned = true; // a backend write failed part-way
            }
            return r.map(WriteResponse::Auth);
        }
        if req.may_grow() && self.has_alarm(AlarmType::Nospace) {
            return Err(KvError::NoSpace);
        }
        let mut wr = WriteRev {
            main: self.revision + 1,
            sub: 0,
        };
        let events_before = self.events.as_ref().map_or(0, Vec::len);
        let resp = self.apply_one(req, &mut wr);
        if resp.is_err() {
            // Validation failed before any write: nothing happened, nothing to watch.
            if let Some(ev) = &mut self.events {
                ev.truncate(events_before);
            }
        }
        if wr.sub > 0 {
            self.revision = wr.main;
        }
        resp
    }

    fn apply_one(
        &mut self,
        req: &WriteRequest,
        wr: &mut WriteRev,
    ) -> Result<WriteResponse, KvError> {
        let wr = &mut *wr;
        Ok(match req {
            WriteRequest::Put(p) => {
                self.check_put(p)?;
                WriteResponse::Put(self.put(p, wr)?)
            }
            WriteRequest::DeleteRange(d) => WriteResponse::DeleteRange(self.delete(d, wr)?),
            WriteRequest::Txn(t) => WriteResponse::Txn(self.txn(t, wr)?),
            WriteRequest::Compact(c) => {
                self.compact(c.revision)?;
                WriteResponse::Compact
            }
            WriteRequest::Alarm(a) => WriteResponse::Alarm(self.alarm(a)),
            WriteRequest::LeaseGrant { id, ttl_secs } => {
                self.lease_grant(*id, *ttl_secs)?;
                WriteResponse::LeaseGrant {
                    id: *id,
                    ttl_secs: *ttl_secs,
                }
            }
            WriteRequest::LeaseRevoke { id } => {
                self.lease_revoke(*id, wr)?;
                WriteResponse::LeaseRevoke
            }
            WriteRequest::LeaseCheckpoint(cps) => {
                self.lease_checkpoint(cps)?;
                WriteResponse::LeaseCheckpoint
            }
            WriteRequest::PublishMember {
                id,
                name,
                client_urls,
                native_urls,
            } => {
                let mut members = crate::cluster::load_members(self.b, &self.txn)?;
                if let Some(m) = members.iter_mut().find(|m| m.id == *id) {
                    m.name = name.clone();
                    m.client_urls = client_urls.clone();
                    m.native_urls = native_urls.clone();
                }
                let r = crate::cluster::store_members(self.b, &mut self.txn, &members);
                self.poison_kv(r)?;
                WriteResponse::Members(members)
            }
            WriteRequest::Auth(_) => unreachable!("auth requests are applied by apply_as"),
        })
    }

    /// etcd's authApplierV3 checks: key permissions of puts, deletes and txns (reads too
    /// when prev_kv is asked), and that a lease a put attaches to (or a revoke deletes
    /// through) carries only keys this user may write.
    fn check_permitted(&self, req: &WriteRequest, who: &AuthUser) -> Result<(), KvError> {
        if !auth::enabled(self.b, &self.txn)? {
            return Ok(());
        }
        match req {
            WriteRequest::Put(_) | WriteRequest::DeleteRange(_) | WriteRequest::Txn(_) => {
                self.check_op(req_op(req), who, 0)
            }
            WriteRequest::LeaseRevoke { id } => self.check_lease_keys(*id, who),
            _ => Ok(()),
        }
    }

    fn check_op(&self, op: Option<OpRef>, who: &AuthUser, depth: usize) -> Result<(), KvError> {
        use PermType::{Read, Write};
        if depth > MAX_CHECKED_TXN_DEPTH {
            return Err(KvError::Internal("txn nested too deeply".into()));
        }
        let (b, t) = (self.b, &self.txn);
        match op {
            None => Ok(()),
            Some(OpRef::Range(r)) => auth::check_range(b, t, who, &r.key, &r.range_end, Read),
            Some(OpRef::Put(p)) => {
                auth::check_range(b, t, who, &p.key, &[], Write)?;
                self.check_lease_keys(p.lease, who)?;
                if p.prev_kv {
                    auth::check_range(b, t, who, &p.key, &[], Read)?;
                }
                Ok(())
            }
            Some(OpRef::Delete(d)) => {
                auth::check_range(b, t, who, &d.key, &d.range_end, Write)?;
                if d.prev_kv {
                    auth::check_range(b, t, who, &d.key, &d.range_end, Read)?;
                }
                Ok(())
            }
            Some(OpRef::Txn(tx)) => {
                for c in &tx.compare {
                    auth::check_range(b, t, who, &c.key, &c.range_end, Read)?;
                }
                for op in tx.success.iter().chain(tx.failure.iter()) {
                    self.check_op(Some(OpRef::of(op)), who, depth + 1)?;
                }
                Ok(())
            }
        }
    }

    fn check_lease_keys(&self, lease: i64, who: &AuthUser) -> Result<(), KvError> {
        if lease == 0 {
            return Ok(());
        }
        for key in lease_attached_keys(self.b, &self.txn, lease)? {
            auth::check_range(self.b, &self.txn, who, &key, &[], PermType::Write)?;
        }
        Ok(())
    }

    /// Whether `id` is among the removed members (as of this txn).
    pub fn member_removed(&self, id: u64) -> Result<bool, KvError> {
        Ok(crate::cluster::load_removed(self.b, &self.txn)?.contains(&id))
    }

    /// Records an applied membership change (None: raft refused it, nothing changes)
    /// with the configuration raft computed; returns the membership after it.
    pub fn member_change(
        &mut self,
        change: Option<&crate::cluster::MemberChange>,
        conf_state: Option<&[u8]>,
    ) -> Result<Vec<crate::cluster::Member>, KvError> {
        let mut members = crate::cluster::load_members(self.b, &self.txn)?;
        let (Some(change), Some(cs)) = (change, conf_state) else {
            return Ok(members);
        };
        let mut removed = crate::cluster::load_removed(self.b, &self.txn)?;
        crate::cluster::apply_change(&mut members, &mut removed, change);
        let r = crate::cluster::store_members(self.b, &mut self.txn, &members)
            .and_then(|_| crate::cluster::store_removed(self.b, &mut self.txn, &removed));
        self.poison_kv(r)?;
        let r = self.set_conf_state(cs);
        self.poison_kv(r)?;
        Ok(members)
    }

    fn lease_grant(&mut self, id: i64, ttl_secs: i64) -> Result<(), KvError> {
        assert!(id != 0, "the proposer picks a lease id");
        if lease_get(self.b, &self.txn, id)?.is_some() {
            return Err(KvError::LeaseExist);
        }
        let lease = Lease {
            id,
            ttl_secs,
            remaining_secs: 0,
        };
        let bytes = postcard::to_allocvec(&lease)?;
        let r = self.b.lease.put(&mut self.txn, &lease_key(id), &bytes);
        self.poison(r)?;
        self.lease_changes.push(LeaseChange::Granted(lease));
        Ok(())
    }

    /// Deletes every attached key in one revision, then the lease.
    fn lease_revoke(&mut self, id: i64, wr: &mut WriteRev) -> Result<(), KvError> {
        if lease_get(self.b, &self.txn, id)?.is_none() {
            return Err(KvError::LeaseNotFound);
        }
        for key in lease_attached_keys(self.b, &self.txn, id)? {
            let d = DeleteRangeRequest {
                key,
                range_end: Vec::new(),
                prev_kv: false,
            };
            self.delete(&d, wr)?;
        }
        let r = self.b.lease.delete(&mut self.txn, &lease_key(id));
        self.poison(r)?;
        self.lease_changes.push(LeaseChange::Revoked(id));
        Ok(())
    }

    fn lease_checkpoint(&mut self, cps: &[(i64, i64)]) -> Result<(), KvError> {
        for &(id, remaining_secs) in cps {
            // A lease revoked since the leader took the checkpoint is simply gone.
            if let Some(mut l) = lease_get(self.b, &self.txn, id)? {
                l.remaining_secs = remaining_secs;
                let bytes = postcard::to_allocvec(&l)?;
                let r = self.b.lease.put(&mut self.txn, &lease_key(id), &bytes);
                self.poison(r)?;
            }
        }
        Ok(())
    }

    /// Moves a key's lease attachment from `old` to `new` (either may be 0 = none).
    fn reattach(&mut self, key: &[u8], old: i64, new: i64) -> Result<(), KvError> {
        if old == new {
            return Ok(());
        }
        if old != 0 {
            let r = self
                .b
                .lease_keys
                .delete(&mut self.txn, &lease_key_entry(old, key));
            self.poison(r)?;
        }
        if new != 0 {
            let r = self
                .b
                .lease_keys
                .put(&mut self.txn, &lease_key_entry(new, key), &[]);
            self.poison(r)?;
        }
        Ok(())
    }

    fn check_put(&self, p: &PutRequest) -> Result<(), KvError> {
        if p.lease != 0 && !p.ignore_lease && lease_get(self.b, &self.txn, p.lease)?.is_none() {
            return Err(KvError::LeaseNotFound);
        }
        if p.ignore_value || p.ignore_lease {
            let live = match self.b.index.get(&self.txn, &p.key)? {
                Some(v) => !IndexEntry::decode(v)?.tombstone,
                None => false,
            };
            if !live {
                return Err(KvError::KeyNotFound);
            }
        }
        Ok(())
    }

    fn index_get(&self, key: &[u8]) -> Result<Option<IndexEntry>, KvError> {
        match self.b.index.get(&self.txn, key)? {
            Some(v) => Ok(Some(IndexEntry::decode(v)?)),
            None => Ok(None),
        }
    }

    fn write_record(&mut self, rev: Rev, rec: &Record) -> Result<(), KvError> {
        let r = self.write_record_inner(rev, rec);
        self.poisoned |= r.is_err();
        r
    }

    fn write_record_inner(&mut self, rev: Rev, rec: &Record) -> Result<(), KvError> {
        let bytes = postcard::to_allocvec(rec)?;
        let key = rev.to_key();
        // Revisions only grow, so a record lands after the table's last key: APPEND skips
        // the B-tree search and fills pages instead of splitting them in half. LMDB refuses
        // it (KeyExist) for a key that is not the largest; that never happens while
        // revisions grow, and the ordinary put below keeps the old behaviour if it did.
        match self
            .b
            .kv
            .put_with_flags(&mut self.txn, PutFlags::APPEND, &key, &bytes)
        {
            Err(heed::Error::Mdb(heed::MdbError::KeyExist)) => {
                tracing::warn!(?rev, "kv: revision not above the last stored one");
                self.b.kv.put(&mut self.txn, &key, &bytes)?;
            }
            r => r?,
        }
        let entry = IndexEntry {
            latest: rev,
            tombstone: rec.tombstone,
            create_revision: rec.create_revision,
            version: rec.version,
            lease: rec.lease,
        };
        self.b.index.put(&mut self.txn, &rec.key, &entry.encode())?;
        Ok(())
    }

    fn put(&mut self, p: &PutRequest, wr: &mut WriteRev) -> Result<PutResponse, KvError> {
        let entry = self.index_get(&p.key)?;
        let live = entry.and_then(IndexEntry::live);
        // The previous record is read only when the request or a watcher needs it.
        let need_prev = p.prev_kv || p.ignore_value || p.ignore_lease || self.events.is_some();
        let prev = match live {
            Some(e) if need_prev => get_record(self.b, &self.txn, e.latest)?.map(|r| (e.latest, r)),
            _ => None,
        };
        let rev = wr.next();
        let rec = Record {
            key: p.key.clone(),
            value: match (&prev, p.ignore_value) {
                (Some((_, r)), true) => r.value.clone(),
                _ => p.value.clone(),
            },
            create_revision: live.map_or(rev.main, |e| e.create_revision),
            version: live.map_or(1, |e| e.version + 1),
            lease: match (&prev, p.ignore_lease) {
                (Some((_, r)), true) => r.lease,
                _ => p.lease,
            },
            tombstone: false,
            prev: entry.map(|e| e.latest),
        };
        self.reattach(&rec.key, live.map_or(0, |e| e.lease), rec.lease)?;
        self.write_record(rev, &rec)?;
        let prev_kv = prev.map(|(r, old)| old.to_kv(r));
        if let Some(ev) = &mut self.events {
            ev.push(Event {
                kind: EventKind::Put,
                kv: rec.to_kv(rev),
                prev_kv: prev_kv.clone(),
            });
        }
        Ok(PutResponse {
            prev_kv: if p.prev_kv { prev_kv } else { None },
        })
    }

    fn delete(
        &mut self,
        d: &DeleteRangeRequest,
        wr: &mut WriteRev,
    ) -> Result<DeleteRangeResponse, KvError> {
        // Live keys from the index alone; records are read only for prev_kv and watchers.
        let mut live: Vec<(Vec<u8>, Rev, i64)> = Vec::new();
        for_each_key(self.b, &self.txn, &d.key, &d.range_end, |k, e| {
            if !e.tombstone {
                live.push((k.to_vec(), e.latest, e.lease));
            }
            Ok(true)
        })?;
        let mut resp = DeleteRangeResponse {
            deleted: live.len() as i64,
            prev_kvs: Vec::new(),
        };
        let need_prev = d.prev_kv || self.events.is_some();
        for (key, rev, lease) in live {
            let prev_kv = if need_prev {
                get_record(self.b, &self.txn, rev)?.map(|rec| rec.to_kv(rev))
            } else {
                None
            };
            self.reattach(&key, lease, 0)?;
            let tomb = Record {
                key,
                value: Vec::new(),
                create_revision: 0,
                version: 0,
                lease: 0,
                tombstone: true,
                prev: Some(rev),
            };
            let at = wr.next();
            self.write_record(at, &tomb)?;
            if let Some(ev) = &mut self.events {
                ev.push(Event {
                    kind: EventKind::Delete,
                    kv: tomb.to_kv(at),
                    prev_kv: prev_kv.clone(),
                });
            }
            if d.prev_kv {
                resp.prev_kvs.extend(prev_kv);
            }
        }
        Ok(resp)
    }

    /// Checks what etcd checks before running a txn branch: ranges at valid revisions,
    /// puts with ignore_value/ignore_lease on live keys, leases that exist.
    fn check_ops(&self, ops: &[RequestOp]) -> Result<(), KvError> {
        for op in ops {
            match op {
                RequestOp::Put(p) => self.check_put(p)?,
                RequestOp::Range(r) => {
                    check_read_rev(r.revision, self.revision, self.compacted)?;
                }
                RequestOp::DeleteRange(_) => {}
                RequestOp::Txn(t) => {
                    // Nested branch is chosen against the same state; check both.
                    self.check_ops(&t.success)?;
                    self.check_ops(&t.failure)?;
                }
            }
        }
        Ok(())
    }

    fn txn(&mut self, t: &TxnRequest, wr: &mut WriteRev) -> Result<TxnResponse, KvError> {
        let mut succeeded = true;
        for c in &t.compare {
            if !eval_compare(self.b, &self.txn, c, self.revision)? {
                succeeded = false;
                break;
            }
        }
        let ops = if succeeded { &t.success } else { &t.failure };
        self.check_ops(ops)?;
        let mut responses = Vec::with_capacity(ops.len());
        let mut op_revisions = Vec::with_capacity(ops.len());
        for op in ops {
            responses.push(match op {
                RequestOp::Range(r) => {
                    // Reads inside a txn see the txn's own earlier writes (etcd does too).
                    let at = if r.revision > 0 { r.revision } else { i64::MAX };
                    ResponseOp::Range(range_at(self.b, &self.txn, r, at)?)
                }
                RequestOp::Put(p) => ResponseOp::Put(self.put(p, wr)?),
                RequestOp::DeleteRange(d) => ResponseOp::DeleteRange(self.delete(d, wr)?),
                RequestOp::Txn(inner) => ResponseOp::Txn(self.txn(inner, wr)?),
            });
            op_revisions.push(if wr.sub > 0 { wr.main } else { wr.main - 1 });
        }
        Ok(TxnResponse {
            succeeded,
            responses,
            op_revisions,
        })
    }

    /// Removes history below `at`, keeping the latest live version of each key.
    fn compact(&mut self, at: i64) -> Result<(), KvError> {
        if at > self.revision {
            return Err(KvError::FutureRev);
        }
        if at <= self.compacted {
            return Err(KvError::Compacted);
        }
        let r = self.compact_below(at);
        self.poisoned |= r.is_err();
        r
    }

    fn compact_below(&mut self, at: i64) -> Result<(), KvError> {
        let upper = Rev {
            main: at + 1,
            sub: 0,
        }
        .to_key();
        let bounds: (Bound<&[u8]>, Bound<&[u8]>) = (Bound::Unbounded, Bound::Excluded(&upper));
        // The latest revision <= at of each key; everything else below `at` goes.
        let mut latest: HashMap<Vec<u8>, (Rev, bool)> = HashMap::new();
        let mut doomed: Vec<Rev> = Vec::new();
        for item in self.b.kv.range(&self.txn, &bounds)? {
            let (k, v) = item?;
            let rev = Rev::from_key(k)?;
            let rec: Record = postcard::from_bytes(v)?;
            if let Some((old, _)) = latest.insert(rec.key, (rev, rec.tombstone)) {
                doomed.push(old);
            }
        }
        let mut dead_keys: HashSet<Vec<u8>> = HashSet::new();
        for (key, (rev, tombstone)) in latest {
            if tombstone {
                doomed.push(rev);
                if self.index_get(&key)?.is_some_and(|e| e.latest == rev) {
                    dead_keys.insert(key);
                }
            }
        }
        for rev in doomed {
            self.b.kv.delete(&mut self.txn, &rev.to_key())?;
        }
        for key in dead_keys {
            self.b.index.delete(&mut self.txn, &key)?;
        }
        self.compacted = at;
        self.b
            .put_u64(&mut self.txn, meta_key::COMPACTED, at as u64)?;
        Ok(())
    }

    fn alarm(&mut self, a: &AlarmRequest) -> Vec<AlarmMember> {
        let m = AlarmMember {
            member_id: a.member_id,
            alarm: a.alarm,
        };
        match a.action {
            AlarmAction::Get => self
                .alarms
                .iter()
                .filter(|x| a.alarm == AlarmType::None || x.alarm == a.alarm)
                .copied()
                .collect(),
            AlarmAction::Activate => {
                if a.alarm != AlarmType::None && !self.alarms.contains(&m) {
                    self.alarms.push(m);
                    self.alarms_dirty = true;
                }
                vec![m]
            }
            AlarmAction::Deactivate => {
                let before = self.alarms.len();
                self.alarms.retain(|x| *x != m);
                if self.alarms.len() != before {
                    self.alarms_dirty = true;
                    vec![m]
                } else {
                    Vec::new()
                }
            }
        }
    }

    /// Writes the revision, alarms and applied index/term, then commits the batch.
    pub fn finish(mut self, applied_index: u64, applied_term: u64) -> Result<(), KvError> {
        let b = self.b;
        b.put_u64(&mut self.txn, meta_key::REVISION, self.revision as u64)?;
        b.put_u64(&mut self.txn, meta_key::APPLIED_INDEX, applied_index)?;
        b.put_u64(&mut self.txn, meta_key::APPLIED_TERM, applied_term)?;
        if self.alarms_dirty {
            let bytes = postcard::to_allocvec(&self.alarms)?;
            b.meta.put(&mut self.txn, meta_key::ALARMS, &bytes)?;
        }
        self.txn.commit()?;
        Ok(())
    }

    /// Stores the raft conf state with the batch (bootstrap and membership changes).
    pub fn set_conf_state(&mut self, bytes: &[u8]) -> Result<(), KvError> {
        self.b
            .meta
            .put(&mut self.txn, meta_key::CONF_STATE, bytes)?;
        Ok(())
    }
}

/// Front ends refuse deeper txns long before this; the bound keeps the walk finite.
const MAX_CHECKED_TXN_DEPTH: usize = 128;

/// A borrowed KV operation, for permission checks that walk txns.
enum OpRef<'a> {
    Range(&'a RangeRequest),
    Put(&'a PutRequest),
    Delete(&'a DeleteRangeRequest),
    Txn(&'a TxnRequest),
}

impl<'a> OpRef<'a> {
    fn of(op: &'a RequestOp) -> OpRef<'a> {
        match op {
            RequestOp::Range(r) => OpRef::Range(r),
            RequestOp::Put(p) => OpRef::Put(p),
            RequestOp::DeleteRange(d) => OpRef::Delete(d),
            RequestOp::Txn(t) => OpRef::Txn(t),
        }
    }
}

fn req_op(req: &WriteRequest) -> Option<OpRef<'_>> {
    match req {
        WriteRequest::Put(p) => Some(OpRef::Put(p)),
        WriteRequest::DeleteRange(d) => Some(OpRef::Delete(d)),
        WriteRequest::Txn(t) => Some(OpRef::Txn(t)),
        _ => None,
    }
}
