//! Watch fan-out hub, one per shard: the watchers of the streams (gRPC watch streams,
//! native connections) served on this shard. The apply actor sends every applied batch
//! to every hub; each hub matches it against its own watchers, so fan-out work spreads
//! over the cores where the clients are.
//!
//! Synced watchers get events straight from the batch. A watcher starting at an older
//! revision, or whose stream was full when a batch came (a slow consumer), is *unsynced*:
//! it reads the revisions it missed from LMDB, in bounded steps, until it reaches the
//! hub's revision. Nothing ever blocks the apply path and no event is dropped: a
//! watcher's `next_rev` advances only when a send succeeded.

use super::WatchBatch;
use crate::model::{prefix_end, Event, EventKind, Header};
use crate::storage::backend::Store;
use crate::storage::mvcc;
use futures::channel::mpsc;
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

pub type StreamId = u64;
/// Messages buffered per stream before its watchers fall back to catching up.
pub const STREAM_BUFFER: usize = 256;
/// Control messages (created, canceled) a stream may owe before it is closed.
const MAX_PENDING_CONTROL: usize = 4096;
/// Events read from LMDB per catch-up step.
pub const MAX_CATCHUP_EVENTS: usize = 8192;
/// etcd's auto watch id.
const AUTO_WATCH_ID: i64 = 0;

#[derive(Clone, Debug, Default)]
pub struct WatchSpec {
    pub key: Vec<u8>,
    /// etcd's range end: empty = one key, "\0" = every key from `key` on.
    pub range_end: Vec<u8>,
    /// 0 = from the next revision.
    pub start_rev: i64,
    pub watch_id: i64,
    pub prev_kv: bool,
    pub no_put: bool,
    pub no_delete: bool,
    pub progress_notify: bool,
    pub fragment: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum WatchOut {
    Created {
        header: Header,
        watch_id: i64,
        /// Set when the watch could not be created: it is canceled with this reason.
        error: Option<String>,
    },
    /// One batch (or catch-up step) for every watcher of the stream that got events from
    /// it: one channel message per stream, not per watcher (never empty).
    Events(Vec<WatcherEvents>),
    Canceled {
        header: Header,
        watch_id: i64,
        compact_revision: i64,
        reason: String,
    },
    /// watch_id -1: a progress report for the whole stream.
    Progress { header: Header, watch_id: i64 },
}

/// One watcher's share of a batch.
#[derive(Clone, Debug, PartialEq)]
pub struct WatcherEvents {
    pub watch_id: i64,
    pub delivery: Arc<Delivery>,
    pub fragment: bool,
}

/// A batch's events as some watchers get them: one per batch and distinct event list,
/// shared by every watcher that gets that list, so a revision fanned out to N watchers is
/// built (and encoded for gRPC) once, not N times.
#[derive(Debug)]
pub struct Delivery {
    pub header: Header,
    pub events: Vec<Event>,
    /// The gRPC encoding of `header` and `events`, made by the first stream sending it.
    pub encoded: OnceLock<bytes::Bytes>,
}

impl Delivery {
    pub fn new(header: Header, events: Vec<Event>) -> Arc<Delivery> {
        Arc::new(Delivery {
            header,
            events,
            encoded: OnceLock::new(),
        })
    }
}

impl PartialEq for Delivery {
    fn eq(&self, other: &Self) -> bool {
        self.header == other.header && self.events == other.events
    }
}

/// Hands out one `Delivery` per distinct (event subset, prev_kv) of a batch.
struct Deliveries<'a> {
    events: &'a [Event],
    header: Header,
    made: HashMap<(Vec<u32>, bool), Arc<Delivery>>,
    /// The last one handed out: watchers on one key ask for the same subset in a row,
    /// so most lookups end here without hashing.
    last: Option<(Vec<u32>, bool, Arc<Delivery>)>,
}

impl<'a> Deliveries<'a> {
    fn new(events: &'a [Event], header: Header) -> Self {
        Deliveries {
            events,
            header,
            made: HashMap::new(),
            last: None,
        }
    }

    /// `picked`: indexes into the batch's events, ascending.
    fn get(&mut self, picked: &[u32], prev_kv: bool) -> Arc<Delivery> {
        debug_assert!(picked.windows(2).all(|w| w[0] < w[1]));
        if let Some((p, kv, d)) = &self.last {
            if *kv == prev_kv && p.as_slice() == picked {
                return d.clone();
            }
        }
        let (events, header) = (self.events, self.header);
        let d = self
            .made
            .entry((picked.to_vec(), prev_kv))
            .or_insert_with_key(|(picked, prev_kv)| {
                let evs = picked
                    .iter()
                    .filter_map(|&i| events.get(i as usize))
                    .map(|e| event_for(e, *prev_kv))
                    .collect();
                Delivery::new(header, evs)
            })
            .clone();
        self.last = Some((picked.to_vec(), prev_kv, d.clone()));
        d
    }
}

/// Per stream, what one batch gives its watchers: the message and the slots it covers.
#[derive(Default)]
struct Outgoing {
    by_stream: HashMap<StreamId, (Vec<WatcherEvents>, Vec<Wid>)>,
}

impl Outgoing {
    fn push(&mut self, stream: StreamId, wid: Wid, events: WatcherEvents) {
        let (msg, wids) = self.by_stream.entry(stream).or_default();
        msg.push(events);
        wids.push(wid);
    }
}

/// Slot of a watcher in the hub's slab.
type Wid = u32;

struct Stream {
    tx: mpsc::Sender<WatchOut>,
    /// This stream's watchers, sorted by watch id (ids are looked up in the slab).
    watchers: Vec<Wid>,
    next_auto_id: i64,
    /// Control messages owed because the stream was full; sent before any more events.
    pending: VecDeque<WatchOut>,
}

/// A watcher's filter, compact: the key bytes are shared by every watcher on that key
/// (or prefix), the options are bits. Idle watchers cost ~64 B here plus their index
/// entries.
struct Spec {
    key: Rc<[u8]>,
    range_end: Option<Box<[u8]>>,
    watch_id: i64,
    flags: u8,
    // State bits live here too: they fit the struct's padding.
    synced: bool,
    notified: bool,
}

const PREV_KV: u8 = 1;
const NO_PUT: u8 = 2;
const NO_DELETE: u8 = 4;
const PROGRESS_NOTIFY: u8 = 8;
const FRAGMENT: u8 = 16;

impl Spec {
    fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
    fn range_end(&self) -> &[u8] {
        self.range_end.as_deref().unwrap_or(&[])
    }
}

struct Watcher {
    stream: StreamId,
    spec: Spec,
    /// The first revision not yet delivered.
    next_rev: i64,
}

impl Watcher {
    fn events(&self, delivery: Arc<Delivery>) -> WatcherEvents {
        WatcherEvents {
            watch_id: self.spec.watch_id,
            delivery,
            fragment: self.spec.has(FRAGMENT),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Key,
    Prefix,
    Range,
}

fn shape(key: &[u8], range_end: &[u8]) -> Shape {
    if range_end.is_empty() {
        Shape::Key
    } else if !key.is_empty() && range_end == prefix_end(key).as_slice() {
        Shape::Prefix
    } else {
        Shape::Range
    }
}

fn matches(spec: &Spec, ev: &Event) -> bool {
    crate::model::in_range(&ev.kv.key, &spec.key, spec.range_end())
        && !(spec.has(NO_PUT) && ev.kind == EventKind::Put)
        && !(spec.has(NO_DELETE) && ev.kind == EventKind::Delete)
}

/// What decides which events of a read a watcher gets: its key space, its filters and
/// its position. Key bytes are shared per key, so their address names them.
fn same_events_key(w: &Watcher) -> (*const u8, usize, &[u8], u8, i64) {
    let key = &w.spec.key;
    (
        key.as_ptr(),
        key.len(),
        w.spec.range_end(),
        w.spec.flags & (NO_PUT | NO_DELETE),
        w.next_rev,
    )
}

fn event_for(ev: &Event, prev_kv: bool) -> Event {
    Event {
        kind: ev.kind,
        kv: ev.kv.clone(),
        prev_kv: ev.prev_kv.as_ref().filter(|_| prev_kv).cloned(),
    }
}

pub struct WatchHub {
    backend: Store,
    cluster_id: u64,
    member_id: u64,
    raft_term: Rc<Cell<u64>>,
    /// Every event up to this revision has been offered to the synced watchers.
    last_rev: i64,
    streams: HashMap<StreamId, Stream>,
    /// Slab of watchers; `free` holds empty slots.
    watchers: Vec<Option<Watcher>>,
    free: Vec<Wid>,
    live: usize,
    by_key: HashMap<Rc<[u8]>, Vec<Wid>>,
    by_prefix: HashMap<Rc<[u8]>, Vec<Wid>>,
    /// Prefix lengths in use, so a key is looked up only at those lengths.
    prefix_lens: BTreeMap<usize, usize>,
    ranges: Vec<Wid>,
    unsynced: usize,
    watching: Arc<AtomicUsize>,
}

impl WatchHub {
    pub fn new(
        backend: Store,
        cluster_id: u64,
        member_id: u64,
        raft_term: Rc<Cell<u64>>,
        watching: Arc<AtomicUsize>,
    ) -> Result<WatchHub, crate::error::KvError> {
        let last_rev = {
            let (b, txn) = backend.read()?;
            mvcc::current_revision(&b, &txn)?
        };
        Ok(WatchHub {
            backend,
            cluster_id,
            member_id,
            raft_term,
            last_rev,
            streams: HashMap::new(),
            watchers: Vec::new(),
            free: Vec::new(),
            live: 0,
            by_key: HashMap::new(),
            by_prefix: HashMap::new(),
            prefix_lens: BTreeMap::new(),
            ranges: Vec::new(),
            unsynced: 0,
            watching,
        })
    }

    fn header(&self) -> Header {
        Header {
            cluster_id: self.cluster_id,
            member_id: self.member_id,
            revision: self.last_rev,
            raft_term: self.raft_term.get(),
        }
    }

    pub fn has_unsynced(&self) -> bool {
        self.unsynced > 0 || self.streams.values().any(|s| !s.pending.is_empty())
    }

    pub fn watcher_count(&self) -> usize {
        self.live
    }

    /// Position in the stream's list and slot of the watcher with `watch_id`.
    fn find(&self, stream: StreamId, watch_id: i64) -> Option<(usize, Wid)> {
        let s = self.streams.get(&stream)?;
        let at = s
            .watchers
            .binary_search_by_key(&watch_id, |w| {
                self.get(*w).map_or(i64::MIN, |w| w.spec.watch_id)
            })
            .ok()?;
        Some((at, s.watchers[at]))
    }

    fn get(&self, wid: Wid) -> Option<&Watcher> {
        self.watchers.get(wid as usize).and_then(Option::as_ref)
    }

    fn get_mut(&mut self, wid: Wid) -> Option<&mut Watcher> {
        self.watchers.get_mut(wid as usize).and_then(Option::as_mut)
    }

    /// Live watchers' slots (bounded by the slab's size).
    fn wids(&self, keep: impl Fn(&Watcher) -> bool) -> Vec<Wid> {
        self.watchers
            .iter()
            .enumerate()
            .filter_map(|(i, w)| w.as_ref().filter(|w| keep(w)).map(|_| i as Wid))
            .collect()
    }

    pub fn open_stream(&mut self, id: StreamId, tx: mpsc::Sender<WatchOut>) {
        let s = Stream {
            tx,
            watchers: Vec::new(),
            next_auto_id: 0,
            pending: VecDeque::new(),
        };
        let old = self.streams.insert(id, s);
        assert!(old.is_none(), "stream ids are unique");
    }

    pub fn close_stream(&mut self, id: StreamId) {
        if let Some(s) = self.streams.remove(&id) {
            for wid in s.watchers {
                self.remove_watcher(wid);
            }
        }
    }

    /// Sends a control message in order: behind any still owed, else directly.
    fn control(&mut self, stream: StreamId, msg: WatchOut) {
        let Some(s) = self.streams.get_mut(&stream) else {
            return;
        };
        if s.pending.is_empty() {
            match s.tx.try_send(msg) {
                Ok(()) => return,
                Err(e) if e.is_full() => s.pending.push_back(e.into_inner()),
                Err(_) => return, // receiver gone; the stream is being closed
            }
        } else {
            s.pending.push_back(msg);
        }
        if s.pending.len() > MAX_PENDING_CONTROL {
            tracing::warn!(stream, "watch stream not reading; closing it");
            self.close_stream(stream);
        }
    }

    /// Answers a create the front end refused (etcd: created + canceled with the reason).
    pub fn refuse(&mut self, stream: StreamId, watch_id: i64, reason: String) {
        let msg = WatchOut::Created {
            header: self.header(),
            watch_id,
            error: Some(reason),
        };
        self.control(stream, msg);
    }

    pub fn create(&mut self, stream: StreamId, mut spec: WatchSpec) {
        let header = self.header();
        let taken = |hub: &WatchHub, id: i64| hub.find(stream, id).is_some();
        let duplicate = spec.watch_id != AUTO_WATCH_ID && taken(self, spec.watch_id);
        let mut auto_id = self.streams.get(&stream).map_or(0, |s| s.next_auto_id);
        if spec.watch_id == AUTO_WATCH_ID {
            while taken(self, auto_id) {
                auto_id += 1;
            }
        }
        let Some(s) = self.streams.get_mut(&stream) else {
            return;
        };
        // etcd: an empty key watches from "\0"; an end of "\0" means every key after it.
        if spec.key.is_empty() {
            spec.key = vec![0];
        }
        let error = if !spec.range_end.is_empty()
            && spec.range_end != [0]
            && spec.key.as_slice() >= spec.range_end.as_slice()
        {
            Some("mvcc: watcher range is empty".to_string())
        } else if duplicate {
            Some("mvcc: duplicate watch ID provided on the WatchStream".to_string())
        } else {
            None
        };
        let watch_id = if error.is_some() {
            -1
        } else if spec.watch_id != AUTO_WATCH_ID {
            spec.watch_id
        } else {
            s.next_auto_id = auto_id + 1;
            auto_id
        };
        if error.is_some() {
            let msg = WatchOut::Created {
                header,
                watch_id,
                error,
            };
            self.control(stream, msg);
            return;
        }
        spec.watch_id = watch_id;
        // "From now" is the store's revision, which may be ahead of the batches this hub
        // has seen: a client that saw its put acknowledged must not get it as an event.
        let store_rev = self
            .backend
            .read()
            .and_then(|(b, t)| mvcc::current_revision(&b, &t))
            .unwrap_or(self.last_rev);
        let next_rev = if spec.start_rev > 0 {
            spec.start_rev
        } else {
            store_rev.max(self.last_rev) + 1
        };
        let wid = match self.free.pop() {
            Some(w) => w,
            None => {
                self.watchers.push(None);
                (self.watchers.len() - 1) as Wid
            }
        };
        let mut spec = self.index(wid, spec);
        spec.synced = next_rev > self.last_rev;
        if !spec.synced {
            self.unsynced += 1;
        }
        debug_assert!(
            self.watchers[wid as usize].is_none(),
            "free slots are empty"
        );
        self.watchers[wid as usize] = Some(Watcher {
            stream,
            spec,
            next_rev,
        });
        self.live += 1;
        // Sorted by watch id (auto ids only grow; explicit ones may land anywhere).
        let ids = &self.watchers;
        if let Some(s) = self.streams.get_mut(&stream) {
            let id_of = |w: &Wid| {
                ids[*w as usize]
                    .as_ref()
                    .map_or(i64::MIN, |w| w.spec.watch_id)
            };
            let at = s.watchers.partition_point(|w| id_of(w) < watch_id);
            s.watchers.insert(at, wid);
        }
        self.watching.fetch_add(1, Ordering::Relaxed);
        let msg = WatchOut::Created {
            header,
            watch_id,
            error: None,
        };
        self.control(stream, msg);
        if !self
            .streams
            .get(&stream)
            .is_some_and(|s| s.pending.is_empty())
        {
            self.unsync(wid, next_rev); // its events must follow the owed "created"
        }
    }

    /// Files the watcher under its shape and returns its compact spec, sharing the key
    /// bytes with watchers already on that key or prefix.
    fn index(&mut self, wid: Wid, spec: WatchSpec) -> Spec {
        let flags = (spec.prev_kv as u8 * PREV_KV)
            | (spec.no_put as u8 * NO_PUT)
            | (spec.no_delete as u8 * NO_DELETE)
            | (spec.progress_notify as u8 * PROGRESS_NOTIFY)
            | (spec.fragment as u8 * FRAGMENT);
        let shape = shape(&spec.key, &spec.range_end);
        let map = match shape {
            Shape::Key => Some(&mut self.by_key),
            Shape::Prefix => Some(&mut self.by_prefix),
            Shape::Range => None,
        };
        let key: Rc<[u8]> = match map {
            Some(map) => {
                let key = match map.get_key_value(spec.key.as_slice()) {
                    Some((k, _)) => k.clone(),
                    None => Rc::from(spec.key.as_slice()),
                };
                map.entry(key.clone()).or_default().push(wid);
                key
            }
            None => {
                self.ranges.push(wid);
                Rc::from(spec.key.as_slice())
            }
        };
        if shape == Shape::Prefix {
            *self.prefix_lens.entry(key.len()).or_default() += 1;
        }
        Spec {
            key,
            range_end: (!spec.range_end.is_empty()).then(|| spec.range_end.into_boxed_slice()),
            watch_id: spec.watch_id,
            flags,
            synced: false,
            notified: false,
        }
    }

    fn unindex(&mut self, wid: Wid, spec: &Spec) {
        fn drop_from(map: &mut HashMap<Rc<[u8]>, Vec<Wid>>, key: &[u8], wid: Wid) {
            if let Some(v) = map.get_mut(key) {
                v.retain(|w| *w != wid);
                if v.is_empty() {
                    map.remove(key);
                }
            }
        }
        match shape(&spec.key, spec.range_end()) {
            Shape::Key => drop_from(&mut self.by_key, &spec.key, wid),
            Shape::Prefix => {
                drop_from(&mut self.by_prefix, &spec.key, wid);
                if let Some(n) = self.prefix_lens.get_mut(&spec.key.len()) {
                    *n -= 1;
                    if *n == 0 {
                        self.prefix_lens.remove(&spec.key.len());
                    }
                }
            }
            Shape::Range => self.ranges.retain(|w| *w != wid),
        }
    }

    fn remove_watcher(&mut self, wid: Wid) -> Option<Watcher> {
        let w = self.watchers.get_mut(wid as usize)?.take()?;
        self.free.push(wid);
        self.live -= 1;
        if let Some(s) = self.streams.get_mut(&w.stream) {
            s.watchers.retain(|x| *x != wid);
        }
        self.unindex(wid, &w.spec);
        if !w.spec.synced {
            self.unsynced -= 1;
        }
        self.watching.fetch_sub(1, Ordering::Relaxed);
        Some(w)
    }

    pub fn cancel(&mut self, stream: StreamId, watch_id: i64) {
        let Some((_, wid)) = self.find(stream, watch_id) else {
            return; // etcd answers nothing for an unknown id
        };
        self.remove_watcher(wid);
        let msg = WatchOut::Canceled {
            header: self.header(),
            watch_id,
            compact_revision: 0,
            reason: String::new(),
        };
        self.control(stream, msg);
    }

    /// A progress report for the whole stream (etcd's RequestProgress).
    pub fn request_progress(&mut self, stream: StreamId) {
        let msg = WatchOut::Progress {
            header: self.header(),
            watch_id: -1,
        };
        self.control(stream, msg);
    }

    fn unsync(&mut self, wid: Wid, from_rev: i64) {
        if let Some(w) = self.get_mut(wid) {
            w.next_rev = w.next_rev.max(from_rev);
            if w.spec.synced {
                w.spec.synced = false;
                self.unsynced += 1;
            }
        }
    }

    /// Watchers whose key space may contain `key`.
    fn candidates(&self, key: &[u8], out: &mut Vec<Wid>) {
        if let Some(v) = self.by_key.get(key) {
            out.extend_from_slice(v);
        }
        for (&len, _) in self.prefix_lens.range(..=key.len()) {
            if let Some(v) = self.by_prefix.get(&key[..len]) {
                out.extend_from_slice(v);
            }
        }
        out.extend_from_slice(&self.ranges);
    }

    /// Offers one applied batch to the synced watchers.
    pub fn on_batch(&mut self, batch: &WatchBatch) {
        if batch.to_rev <= self.last_rev {
            return; // already in the store when this hub started
        }
        let from_rev = batch.from_rev.max(self.last_rev + 1);
        self.last_rev = batch.to_rev;
        if self.live == 0 {
            return;
        }
        let Some(events) = &batch.events else {
            // Applied while nobody watched: whoever watches now reads it from the store.
            let synced = self.wids(|w| w.spec.synced);
            for wid in synced {
                self.unsync(wid, from_rev);
            }
            return;
        };
        // (watcher, event index) for every match, in event order.
        let mut hits: Vec<(Wid, u32)> = Vec::new();
        let mut cands = Vec::new();
        for (i, ev) in events.iter().enumerate() {
            if ev.kv.mod_revision < from_rev {
                continue;
            }
            cands.clear();
            self.candidates(&ev.kv.key, &mut cands);
            for wid in &cands {
                let Some(w) = self.get(*wid) else {
                    continue;
                };
                if w.spec.synced && ev.kv.mod_revision >= w.next_rev && matches(&w.spec, ev) {
                    hits.push((*wid, i as u32));
                }
            }
        }
        // By watcher, each watcher's indexes ascending. One event (the common batch
        // under light load) gives each watcher one hit at most: nothing to group.
        if events.len() > 1 {
            hits.sort_unstable();
        }
        let mut deliveries = Deliveries::new(events, self.header());
        let mut out = Outgoing::default();
        let mut picked: Vec<u32> = Vec::new();
        for group in hits.chunk_by(|a, b| a.0 == b.0) {
            let wid = group[0].0;
            let Some(w) = self.get(wid) else {
                continue;
            };
            picked.clear();
            picked.extend(group.iter().map(|h| h.1));
            let delivery = deliveries.get(&picked, w.spec.has(PREV_KV));
            out.push(w.stream, wid, w.events(delivery));
        }
        let next_rev = batch.to_rev + 1;
        self.send(out, |hub, wid| hub.unsync(wid, from_rev), next_rev);
    }

    /// Sends each stream its message (streams owing control messages count as full).
    /// Watchers whose message went out are done up to `next_rev`; those of a full
    /// stream go to `on_full`; a gone stream is closed.
    fn send(&mut self, out: Outgoing, on_full: impl Fn(&mut WatchHub, Wid), next_rev: i64) -> bool {
        let mut dead = Vec::new();
        let mut sent = false;
        for (stream, (msg, wids)) in out.by_stream {
            debug_assert_eq!(msg.len(), wids.len());
            let Some(s) = self.streams.get_mut(&stream) else {
                continue;
            };
            let result = if s.pending.is_empty() {
                s.tx.try_send(WatchOut::Events(msg))
                    .map_err(|e| e.is_disconnected())
            } else {
                Err(false)
            };
            match result {
                Ok(()) => {
                    sent = true;
                    for wid in wids {
                        if let Some(w) = self.get_mut(wid) {
                            w.next_rev = w.next_rev.max(next_rev);
                            w.spec.notified = true;
                        }
                    }
                }
                Err(true) => dead.push(stream),
                Err(false) => wids.into_iter().for_each(|wid| on_full(self, wid)),
            }
        }
        for stream in dead {
            self.close_stream(stream);
        }
        sent
    }

    /// One bounded catch-up step for unsynced watchers: owed control messages first, then
    /// compaction checks, then one read of the store shared by every unsynced watcher.
    /// Returns whether anything was sent (else every stream that is owed is full).
    pub fn catch_up(&mut self) -> bool {
        let stream_ids: Vec<StreamId> = self.streams.keys().copied().collect();
        let mut dead = Vec::new();
        let mut sent = 0usize;
        for id in stream_ids {
            let Some(s) = self.streams.get_mut(&id) else {
                continue;
            };
            if s.tx.is_closed() {
                dead.push(id);
                continue;
            }
            while let Some(msg) = s.pending.pop_front() {
                match s.tx.try_send(msg) {
                    Ok(()) => sent += 1,
                    Err(e) if e.is_full() => {
                        s.pending.push_front(e.into_inner());
                        break;
                    }
                    Err(_) => {
                        dead.push(id);
                        break;
                    }
                }
            }
        }
        for id in dead {
            self.close_stream(id);
        }
        if self.unsynced == 0 {
            return sent > 0;
        }
        match self.catch_up_from_store() {
            Ok(progressed) => sent > 0 || progressed,
            Err(e) => {
                tracing::error!("watch catch-up: {e}");
                sent > 0
            }
        }
    }

    /// Returns whether a watcher got events or became synced.
    fn catch_up_from_store(&mut self) -> Result<bool, crate::error::KvError> {
        let (backend, txn) = self.backend.read()?;
        let compacted = mvcc::compacted_revision(&backend, &txn)?;
        let ready = |hub: &WatchHub, w: &Watcher| {
            !w.spec.synced
                && hub
                    .streams
                    .get(&w.stream)
                    .is_some_and(|s| s.pending.is_empty())
        };
        let doomed = self.wids(|w| ready(self, w) && w.next_rev < compacted);
        for wid in doomed {
            if let Some(w) = self.remove_watcher(wid) {
                let msg = WatchOut::Canceled {
                    // etcd's compacted response carries no revision in its header.
                    header: Header {
                        revision: 0,
                        ..self.header()
                    },
                    watch_id: w.spec.watch_id,
                    compact_revision: compacted,
                    // etcd sends no reason: clients derive the error from the revision.
                    reason: String::new(),
                };
                self.control(w.stream, msg);
            }
        }
        let waiting = self.wids(|w| ready(self, w));
        let Some(from) = waiting
            .iter()
            .filter_map(|id| self.get(*id).map(|w| w.next_rev))
            .min()
        else {
            return Ok(false);
        };
        let to = self.last_rev;
        let (events, next) = if from <= to {
            mvcc::events_between(&backend, &txn, from, to, MAX_CATCHUP_EVENTS)?
        } else {
            (Vec::new(), to + 1)
        };
        // Watchers with the same filter and position get the same events: sorted so they
        // sit together, each group's events are picked once (not once per watcher).
        let mut waiting = waiting;
        waiting.sort_by(|a, b| match (self.get(*a), self.get(*b)) {
            (Some(a), Some(b)) => same_events_key(a).cmp(&same_events_key(b)),
            (a, b) => a.is_some().cmp(&b.is_some()),
        });
        let mut deliveries = Deliveries::new(&events, self.header());
        let mut out = Outgoing::default();
        let mut picked: Vec<u32> = Vec::new();
        let mut group_of: Option<Wid> = None;
        for &wid in &waiting {
            let Some(w) = self.get(wid) else {
                continue;
            };
            let same = group_of
                .and_then(|g| self.get(g))
                .is_some_and(|g| same_events_key(g) == same_events_key(w));
            if !same {
                picked.clear();
                picked.extend(
                    (0u32..)
                        .zip(&events)
                        .filter(|(_, e)| {
                            e.kv.mod_revision >= w.next_rev
                                && e.kv.mod_revision < next
                                && matches(&w.spec, e)
                        })
                        .map(|(i, _)| i),
                );
                group_of = Some(wid);
            }
            if picked.is_empty() {
                // Nothing for it in this step: it is done up to `next` already.
                if let Some(w) = self.get_mut(wid) {
                    w.next_rev = w.next_rev.max(next);
                }
            } else {
                let delivery = deliveries.get(&picked, w.spec.has(PREV_KV));
                out.push(w.stream, wid, w.events(delivery));
            }
        }
        // A full stream's watchers stay where they are: tried again next step.
        let progressed = self.send(out, |_, _| {}, next);
        let last_rev = self.last_rev;
        let mut synced_now = 0;
        for wid in waiting {
            if let Some(w) = self.get_mut(wid) {
                if !w.spec.synced && w.next_rev > last_rev {
                    w.spec.synced = true;
                    synced_now += 1;
                }
            }
        }
        self.unsynced -= synced_now;
        Ok(progressed || synced_now > 0)
    }

    /// Periodic progress notification to synced watchers that asked for it and got no
    /// events since the last one.
    pub fn progress_tick(&mut self) {
        let header = self.header();
        for w in self.watchers.iter_mut().flatten() {
            let notified = std::mem::take(&mut w.spec.notified);
            if !w.spec.has(PROGRESS_NOTIFY) || !w.spec.synced || notified {
                continue;
            }
            if let Some(s) = self.streams.get_mut(&w.stream) {
                if s.pending.is_empty() {
                    let _ = s.tx.try_send(WatchOut::Progress {
                        header,
                        watch_id: w.spec.watch_id,
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{PutRequest, WriteRequest};
    use crate::storage::backend::Backend;
    use crate::storage::mvcc::Applier;

    /// Applies puts of `keys` (one revision each); returns the batch the apply actor
    /// would send, with or without its events.
    fn apply(b: &Backend, keys: &[&str], with_events: bool) -> WatchBatch {
        let mut a = Applier::begin(b).unwrap();
        if with_events {
            a.collect_events();
        }
        let from_rev = a.revision() + 1;
        for k in keys {
            let put = PutRequest {
                key: k.as_bytes().to_vec(),
                value: b"v".to_vec(),
                ..Default::default()
            };
            a.apply(&WriteRequest::Put(put)).unwrap();
        }
        let to_rev = a.revision();
        let events = a.take_events();
        a.finish(1, 1).unwrap();
        WatchBatch {
            from_rev,
            to_rev,
            events,
        }
    }

    fn drain(rx: &mut mpsc::Receiver<WatchOut>, revs: &mut Vec<i64>) {
        while let Ok(m) = rx.try_recv() {
            if let WatchOut::Events(list) = m {
                for w in list {
                    revs.extend(w.delivery.events.iter().map(|e| e.kv.mod_revision));
                }
            }
        }
    }

    /// A stream with room for one message: every path (history, live batches, batches
    /// built without events, a full stream) must still deliver each revision once, in
    /// order.
    #[test]
    fn slow_stream_falls_back_to_the_store_without_loss() {
        let dir = tempfile::tempdir().unwrap();
        let b = Backend::open(dir.path(), 64 << 20).unwrap();
        apply(&b, &["a", "b", "a"], true); // revisions 2..4: history
        let watching = Arc::new(AtomicUsize::new(0));
        let mut hub = WatchHub::new(
            Store::new(b.clone()),
            1,
            2,
            Rc::new(Cell::new(1)),
            watching.clone(),
        )
        .unwrap();
        let (tx, mut rx) = mpsc::channel(0); // capacity: one message
        hub.open_stream(7, tx);
        hub.create(
            7,
            WatchSpec {
                key: vec![0],
                range_end: vec![0],
                start_rev: 2,
                ..Default::default()
            },
        );
        assert_eq!(watching.load(Ordering::Relaxed), 1);
        assert!(
            hub.has_unsynced(),
            "a start in the past catches up from the store"
        );
        let mut revs = Vec::new();
        // Live batches arrive while the stream is full; one was applied without events.
        hub.on_batch(&apply(&b, &["c"], true));
        hub.on_batch(&apply(&b, &["d", "e"], false));
        hub.on_batch(&apply(&b, &["f"], true));
        for _ in 0..100 {
            drain(&mut rx, &mut revs);
            hub.catch_up();
            if !hub.has_unsynced() {
                break;
            }
        }
        drain(&mut rx, &mut revs);
        assert!(!hub.has_unsynced());
        // Synced again: the next batch goes straight out...
        hub.on_batch(&apply(&b, &["g"], true));
        assert!(!hub.has_unsynced());
        // ... and one that finds the stream full sends its watcher back to the store.
        hub.on_batch(&apply(&b, &["h"], true));
        assert!(hub.has_unsynced(), "a full stream must unsync, not drop");
        for _ in 0..100 {
            drain(&mut rx, &mut revs);
            hub.catch_up();
            if !hub.has_unsynced() {
                break;
            }
        }
        drain(&mut rx, &mut revs);
        assert_eq!(revs, (2..=10).collect::<Vec<i64>>());
        hub.close_stream(7);
        assert_eq!(watching.load(Ordering::Relaxed), 0);
        assert_eq!(hub.watcher_count(), 0);
    }

    /// Many watchers on one stream: a batch is one message carrying every watcher's share;
    /// watchers catching up from different revisions (grouped by filter and position)
    /// each get exactly their own revisions, in order, once.
    #[test]
    fn one_message_per_stream_and_grouped_catch_up() {
        let dir = tempfile::tempdir().unwrap();
        let b = Backend::open(dir.path(), 64 << 20).unwrap();
        apply(&b, &["k", "x", "k", "k"], true); // revisions 2..5
        let mut hub = WatchHub::new(
            Store::new(b.clone()),
            1,
            2,
            Rc::new(Cell::new(1)),
            Default::default(),
        )
        .unwrap();
        let (tx, mut rx) = mpsc::channel(0); // capacity: one message
        hub.open_stream(1, tx);
        // Watch ids 0..12: on "k" from revisions 2, 3, 4 and now, plus prefix watchers.
        let starts = [2, 3, 4, 0];
        for i in 0..12 {
            let prefix = i % 2 == 1;
            hub.create(
                1,
                WatchSpec {
                    key: b"k".to_vec(),
                    range_end: if prefix { prefix_end(b"k") } else { Vec::new() },
                    start_rev: starts[i % 4],
                    ..Default::default()
                },
            );
        }
        let mut got: HashMap<i64, Vec<i64>> = HashMap::new();
        let mut collect = |rx: &mut mpsc::Receiver<WatchOut>| {
            let mut messages = 0;
            while let Ok(m) = rx.try_recv() {
                if let WatchOut::Events(list) = m {
                    messages += 1;
                    assert!(!list.is_empty());
                    for w in list {
                        let revs = got.entry(w.watch_id).or_default();
                        revs.extend(w.delivery.events.iter().map(|e| e.kv.mod_revision));
                    }
                }
            }
            messages
        };
        for _ in 0..100 {
            collect(&mut rx);
            hub.catch_up();
            if !hub.has_unsynced() {
                break;
            }
        }
        collect(&mut rx);
        assert!(!hub.has_unsynced());
        hub.on_batch(&apply(&b, &["k", "kz"], true)); // revisions 6, 7
        assert_eq!(collect(&mut rx), 1, "one message for the whole stream");
        for id in 0..12i64 {
            let from = match starts[id as usize % 4] {
                0 => 6,
                r => r,
            };
            let prefix = id % 2 == 1;
            let want: Vec<i64> = (from..=7)
                .filter(|r| *r != 3 && (prefix || *r != 7))
                .collect();
            assert_eq!(
                got.get(&id).cloned().unwrap_or_default(),
                want,
                "watch {id}"
            );
        }
    }

    #[test]
    fn matching_by_key_prefix_and_range() {
        let dir = tempfile::tempdir().unwrap();
        let b = Backend::open(dir.path(), 64 << 20).unwrap();
        let mut hub = WatchHub::new(
            Store::new(b.clone()),
            1,
            2,
            Rc::new(Cell::new(1)),
            Default::default(),
        )
        .unwrap();
        let specs = [
            (b"k1".to_vec(), Vec::new()),
            (b"k".to_vec(), prefix_end(b"k")),
            (b"k2".to_vec(), b"k3".to_vec()),
            (b"z".to_vec(), vec![0]),
        ];
        let mut rxs = Vec::new();
        for (i, (key, range_end)) in specs.into_iter().enumerate() {
            let (tx, rx) = mpsc::channel(16);
            hub.open_stream(i as u64, tx);
            hub.create(
                i as u64,
                WatchSpec {
                    key,
                    range_end,
                    ..Default::default()
                },
            );
            rxs.push(rx);
        }
        hub.on_batch(&apply(&b, &["k1", "k2", "k25", "k3", "zz", "a"], true));
        let got: Vec<Vec<String>> = rxs
            .iter_mut()
            .map(|rx| {
                let mut keys = Vec::new();
                while let Ok(m) = rx.try_recv() {
                    if let WatchOut::Events(list) = m {
                        keys.extend(list.iter().flat_map(|w| {
                            w.delivery
                                .events
                                .iter()
                                .map(|e| String::from_utf8_lossy(&e.kv.key).into_owned())
                        }));
                    }
                }
                keys
            })
            .collect();
        assert_eq!(got[0], ["k1"]);
        assert_eq!(got[1], ["k1", "k2", "k25", "k3"]);
        assert_eq!(got[2], ["k2", "k25"]);
        assert_eq!(got[3], ["zz"]);
    }

    /// Watch ids per stream: auto ids count up past explicit ones, duplicates are
    /// refused, cancel finds the right watcher.
    #[test]
    fn watch_ids_duplicates_and_cancel() {
        let dir = tempfile::tempdir().unwrap();
        let b = Backend::open(dir.path(), 64 << 20).unwrap();
        let mut hub = WatchHub::new(
            Store::new(b),
            1,
            2,
            Rc::new(Cell::new(1)),
            Default::default(),
        )
        .unwrap();
        let (tx, mut rx) = mpsc::channel(64);
        hub.open_stream(1, tx);
        let spec = |id: i64| WatchSpec {
            key: b"k".to_vec(),
            watch_id: id,
            ..Default::default()
        };
        for id in [5, 0, 0, 2, 5, 0] {
            hub.create(1, spec(id));
        }
        hub.cancel(1, 2);
        hub.cancel(1, 42); // unknown: no answer
        let mut got = Vec::new();
        while let Ok(m) = rx.try_recv() {
            got.push(match m {
                WatchOut::Created {
                    watch_id, error, ..
                } => (watch_id, error.is_some(), "created"),
                WatchOut::Canceled { watch_id, .. } => (watch_id, true, "canceled"),
                _ => (0, false, "other"),
            });
        }
        assert_eq!(
            got,
            vec![
                (5, false, "created"),
                (0, false, "created"),
                (1, false, "created"),
                (2, false, "created"),
                (-1, true, "created"), // duplicate 5
                (3, false, "created"),
                (2, true, "canceled"),
            ]
        );
        assert_eq!(hub.watcher_count(), 4);
        hub.cancel(1, 5);
        assert_eq!(hub.watcher_count(), 3);
        hub.close_stream(1);
        assert_eq!(hub.watcher_count(), 0);
    }
}
