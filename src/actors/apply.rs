//! Apply actor: applies each batch of committed entries in ONE LMDB write txn (with the
//! applied index and term in the same txn), then answers the waiting requests and the
//! linearizable reads whose read index is now applied. Every `snapshot_count` entries it
//! syncs LMDB off the executor and tells the raft actor the log below may go. It also
//! runs the lessor (see `lessor.rs`) and hands each batch's events to the watch hubs.

use super::lessor::Lessor;
use super::*;
use crate::model::{AuthRequest, AuthResponse, Header, LeaseTimeToLive};
use crate::storage::auth::Tokens;
use crate::storage::backend::{Backend, Store};
use crate::storage::mvcc::Applier;
use ::raft::eraftpb::EntryType;
use futures::{FutureExt, StreamExt};
use glommio::channels::shared_channel::ConnectedSender;
use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Committed-entry messages merged into one LMDB txn.
const MAX_MESSAGES_PER_TXN: usize = 256;
/// How often expired leases are looked for (etcd: 500 ms).
const LEASE_TICK: Duration = Duration::from_millis(500);
/// Lease checkpoints per raft entry.
const MAX_CHECKPOINTS_PER_ENTRY: usize = 1000;

pub enum ApplyInput {
    Raft(ToApply),
    Lessor(ToLessor),
    Tick,
}

pub fn lease_ticker() -> BoxStream<ApplyInput> {
    Box::pin(futures::stream::unfold((), |_| async {
        glommio::timer::sleep(LEASE_TICK).await;
        Some((ApplyInput::Tick, ()))
    }))
}

pub struct ApplyActor {
    backend: Backend,
    epoch: u64,
    cluster_id: u64,
    member_id: u64,
    snapshot_count: u64,
    applied_index: u64,
    applied_term: u64,
    last_checkpoint: u64,
    checkpoint_running: Rc<Cell<bool>>,
    waiting_reads: Vec<(u64, Vec<ReqId>)>,
    to_net: Vec<ConnectedSender<ToNet>>,
    to_raft: Rc<ConnectedSender<ApplyToRaft>>,
    lessor: Lessor,
    /// Watchers registered on all shards; events are built only when non-zero.
    watching: Arc<AtomicUsize>,
    lease_checkpoint_interval: Duration,
    last_lease_checkpoint: Instant,
    tokens: Arc<Tokens>,
    /// An applied auth enable/disable: refresh the front ends' flag once it is committed.
    auth_flag_stale: Cell<bool>,
    /// What the other actors read through; swapped by an online defragmentation.
    store: Store,
    db_dir: std::path::PathBuf,
    /// Online defragmentations so far (names their scratch directories).
    defrags: u64,
}

pub struct ApplySetup {
    pub backend: Backend,
    pub epoch: u64,
    pub cluster_id: u64,
    pub member_id: u64,
    pub snapshot_count: u64,
    pub applied_index: u64,
    pub applied_term: u64,
    pub watching: Arc<AtomicUsize>,
    pub lease_checkpoint_interval: Duration,
    pub tokens: Arc<Tokens>,
    pub store: Store,
    pub db_dir: std::path::PathBuf,
}

fn fatal(e: impl std::fmt::Display) -> ! {
    // A committed entry that cannot be applied leaves the state machine unknowable; etcd
    // panics here. Restart replays the WAL from the last applied index.
    tracing::error!("apply: {e}; stopping");
    eprintln!("corekv: fatal: apply: {e}");
    std::process::exit(2)
}

impl ApplyActor {
    pub fn new(
        s: ApplySetup,
        to_net: Vec<ConnectedSender<ToNet>>,
        to_raft: ConnectedSender<ApplyToRaft>,
    ) -> ApplyActor {
        assert!(s.snapshot_count > 0);
        let stored = s
            .backend
            .read_txn()
            .and_then(|txn| crate::storage::mvcc::leases(&s.backend, &txn))
            .unwrap_or_else(|e| fatal(format!("loading leases: {e}")));
        let now = Instant::now();
        s.tokens.set_applied(s.applied_index);
        ApplyActor {
            lessor: Lessor::new(stored, now),
            watching: s.watching,
            lease_checkpoint_interval: s.lease_checkpoint_interval,
            last_lease_checkpoint: now,
            tokens: s.tokens,
            auth_flag_stale: Cell::new(false),
            store: s.store,
            db_dir: s.db_dir,
            defrags: 0,
            backend: s.backend,
            epoch: s.epoch,
            cluster_id: s.cluster_id,
            member_id: s.member_id,
            snapshot_count: s.snapshot_count,
            applied_index: s.applied_index,
            applied_term: s.applied_term,
            last_checkpoint: s.applied_index,
            checkpoint_running: Rc::new(Cell::new(false)),
            waiting_reads: Vec::new(),
            to_net,
            to_raft: Rc::new(to_raft),
        }
    }

    pub async fn run(mut self, mut inbox: futures::stream::SelectAll<BoxStream<ApplyInput>>) {
        while let Some(first) = inbox.next().await {
            let mut entries = Vec::new();
            let mut confs = HashMap::new();
            let mut install = None;
            let mut msg = Some(first);
            let mut taken = 0;
            while let Some(m) = msg.take() {
                match m {
                    ApplyInput::Raft(ToApply::Committed {
                        entries: es,
                        conf_states,
                    }) => {
                        entries.extend(es);
                        confs.extend(conf_states);
                    }
                    ApplyInput::Raft(ToApply::InstallSnapshot {
                        path,
                        index,
                        term,
                        done,
                    }) => {
                        // Applied after the entries gathered before it; nothing after.
                        install = Some((path, index, term, done));
                        break;
                    }
                    ApplyInput::Raft(ToApply::ReadBarrier { index, ids }) => {
                        self.waiting_reads.push((index, ids))
                    }
                    ApplyInput::Raft(ToApply::Leader(is_leader)) => {
                        self.lessor.set_leader(is_leader, Instant::now())
                    }
                    ApplyInput::Lessor(ToLessor::Defragment { id }) => {
                        let r = self.defragment().await;
                        if let Some(tx) = self.to_net.get(shard_of(id)) {
                            let _ = tx.send(ToNet::Lease(id, r)).await;
                        }
                    }
                    ApplyInput::Lessor(q) => self.answer_lease_query(q).await,
                    ApplyInput::Tick => self.lease_tick(),
                }
                taken += 1;
                if taken < MAX_MESSAGES_PER_TXN {
                    msg = inbox.next().now_or_never().flatten();
                }
            }
            if !entries.is_empty() {
                let (replies, batch) = self.apply(entries, &confs);
                // Watchers first: a client that sees its write acknowledged and then
                // starts a watch must not receive the write twice or not at all (the hub
                // orders registrations after the batches it has seen).
                if let Some(batch) = batch {
                    self.send_events(batch).await;
                }
                self.send_replies(replies).await;
                let _ = self
                    .to_raft
                    .try_send(ApplyToRaft::Applied(self.applied_index));
            }
            if let Some((path, index, term, done)) = install {
                let result = self.install_snapshot(path, index, term).await;
                let _ = done.send(result);
            }
            self.release_reads().await;
            self.maybe_checkpoint();
        }
    }

    /// Online defragmentation: no batch is applied meanwhile (this actor is the only
    /// writer); readers keep the old environment until the swap, then move over.
    async fn defragment(&mut self) -> Result<LeaseReply, KvError> {
        self.defrags += 1;
        let db_dir = self.db_dir.clone();
        let scratch = db_dir.with_file_name(format!("db.defrag-{}", self.defrags));
        let current = self.backend.clone();
        let started = Instant::now();
        let before = current.file_size_bytes();
        let fresh = glommio::executor()
            .spawn_blocking(move || {
                crate::storage::backend::defragment_online(&current, &db_dir, &scratch)
            })
            .await?;
        let after = fresh.file_size_bytes();
        self.backend = fresh.clone();
        self.store.swap(fresh);
        tracing::info!(
            before,
            after,
            took_ms = started.elapsed().as_millis() as u64,
            "defragmented"
        );
        Ok(LeaseReply::Defragmented)
    }

    /// Replaces the state with a leader's snapshot (on the blocking pool: it rewrites the
    /// whole database), then lets watchers catch up from the store and reloads leases.
    async fn install_snapshot(
        &mut self,
        path: std::path::PathBuf,
        index: u64,
        term: u64,
    ) -> Result<(), String> {
        let rev_before = self
            .backend
            .read_txn()
            .and_then(|t| crate::storage::mvcc::current_revision(&self.backend, &t))
            .map_err(|e| e.to_string())?;
        let backend = self.backend.clone();
        let (got_index, got_term) = glommio::executor()
            .spawn_blocking(move || crate::storage::snapshot::install(&backend, &path))
            .await?;
        if (got_index, got_term) != (index, term) {
            return Err(format!(
                "snapshot holds index {got_index} term {got_term}, raft said {index} {term}"
            ));
        }
        self.applied_index = index;
        self.applied_term = term;
        self.tokens.set_applied(index);
        self.last_checkpoint = index;
        let txn = self.backend.read_txn().map_err(|e| e.to_string())?;
        let rev_after = crate::storage::mvcc::current_revision(&self.backend, &txn)
            .map_err(|e| e.to_string())?;
        let stored =
            crate::storage::mvcc::leases(&self.backend, &txn).map_err(|e| e.to_string())?;
        drop(txn);
        let leading = self.lessor.is_leader();
        self.lessor = Lessor::new(stored, Instant::now());
        self.lessor.set_leader(leading, Instant::now());
        self.tokens.sync_enabled(&self.backend);
        tracing::info!(index, revision = rev_after, "snapshot installed");
        if rev_after > rev_before {
            // No events at hand: the hubs read the revisions from the store.
            self.send_events(Arc::new(WatchBatch {
                from_rev: rev_before + 1,
                to_rev: rev_after,
                events: None,
            }))
            .await;
        }
        let _ = self
            .to_raft
            .try_send(ApplyToRaft::Checkpointed { index, term });
        Ok(())
    }

    #[allow(clippy::type_complexity)]
    fn apply(
        &mut self,
        entries: Vec<::raft::eraftpb::Entry>,
        confs: &HashMap<u64, Option<::raft::eraftpb::ConfState>>,
    ) -> (
        Vec<(ReqId, Header, Result<WriteResponse, KvError>)>,
        Option<Arc<WatchBatch>>,
    ) {
        let first = entries[0].index;
        assert!(
            first <= self.applied_index + 1,
            "committed entries must not skip indexes"
        );
        let mut replies = Vec::new();
        let mut applier = Applier::begin(&self.backend).unwrap_or_else(|e| fatal(e));
        if self.watching.load(Ordering::Relaxed) > 0 {
            applier.collect_events();
        }
        let rev_before = applier.revision();
        let mut last = (self.applied_index, self.applied_term);
        let mut conf_changed = false;
        for e in entries {
            if e.index <= self.applied_index {
                continue; // already in LMDB (replayed after restart)
            }
            assert_eq!(e.index, last.0 + 1, "entries apply in order");
            last = (e.index, e.term);
            if e.get_entry_type() != EntryType::EntryNormal {
                conf_changed = true;
                let result = self.apply_member_change(&mut applier, &e, confs.get(&e.index));
                if let Ok(ProposalRef { epoch, id }) = postcard::from_bytes(&e.context) {
                    if epoch == self.epoch {
                        let header = Header {
                            cluster_id: self.cluster_id,
                            member_id: self.member_id,
                            revision: applier.revision(),
                            raft_term: e.term,
                        };
                        replies.push((id, header, result));
                    }
                }
                continue;
            }
            if e.data.is_empty() {
                continue; // a new leader's no-op
            }
            let proposal = match Proposal::decode(&e.data) {
                Ok(p) => p,
                Err(err) => {
                    // Passed the WAL's CRC yet does not decode: skip it the same way on
                    // every replay so all members stay identical.
                    tracing::error!(index = e.index, "undecodable entry skipped: {err}");
                    continue;
                }
            };
            let mut result = applier.apply_as(&proposal.req, proposal.auth.as_ref());
            if let (WriteRequest::Auth(a), Ok(r)) = (&proposal.req, &mut result) {
                self.auth_applied(a, r, e.index);
            }
            if let (WriteRequest::LeaseCheckpoint(cps), Ok(_)) = (&proposal.req, &result) {
                self.lessor.checkpointed(cps);
            }
            if applier.poisoned() {
                fatal(format!(
                    "backend write failed at index {}: {result:?}",
                    e.index
                ));
            }
            if proposal.epoch == self.epoch {
                let header = Header {
                    cluster_id: self.cluster_id,
                    member_id: self.member_id,
                    revision: applier.revision(),
                    raft_term: e.term,
                };
                replies.push((proposal.id, header, result));
            }
        }
        let rev_after = applier.revision();
        // Only a membership change can remove this member: no extra read otherwise.
        let removed_self = conf_changed && applier.member_removed(self.member_id).unwrap_or(false);
        let events = applier.take_events();
        let lease_changes = applier.take_lease_changes();
        applier.finish(last.0, last.1).unwrap_or_else(|e| fatal(e));
        if self.auth_flag_stale.replace(false) {
            self.tokens.sync_enabled(&self.backend);
        }
        if removed_self {
            let msg = "this member has been permanently removed from the cluster";
            let _ = self.backend.sync();
            tracing::warn!("{msg}; stopping");
            eprintln!("corekv: {msg}");
            std::process::exit(1);
        }
        self.applied_index = last.0;
        self.applied_term = last.1;
        self.tokens.set_applied(last.0);
        let now = Instant::now();
        for c in lease_changes {
            self.lessor.apply(c, now);
        }
        assert!(rev_after >= rev_before, "revisions never go back");
        let batch = (rev_after > rev_before).then(|| {
            Arc::new(WatchBatch {
                from_rev: rev_before + 1,
                to_rev: rev_after,
                events,
            })
        });
        (replies, batch)
    }

    /// Token side effects of an applied auth request, on every member alike: an
    /// Authenticate entry issues `prefix.index`; disable, user delete and password change
    /// end tokens.
    fn auth_applied(&self, req: &AuthRequest, resp: &mut WriteResponse, index: u64) {
        if let (
            AuthRequest::Authenticate { name, .. },
            WriteResponse::Auth(AuthResponse::Token(t)),
        ) = (req, &mut *resp)
        {
            t.push_str(&format!(".{index}"));
            self.tokens.issue(t.clone(), name.clone());
        }
        self.tokens.invalidate(req);
        if matches!(req, AuthRequest::Enable | AuthRequest::Disable) {
            self.auth_flag_stale.set(true);
        }
    }

    /// Stores a membership change with the configuration raft computed for it.
    fn apply_member_change(
        &self,
        applier: &mut Applier,
        e: &::raft::eraftpb::Entry,
        conf: Option<&Option<::raft::eraftpb::ConfState>>,
    ) -> Result<WriteResponse, KvError> {
        use ::raft::eraftpb::{ConfChange, ConfChangeV2};
        use protobuf::Message as _;
        let context = match e.get_entry_type() {
            EntryType::EntryConfChangeV2 => {
                ConfChangeV2::parse_from_bytes(&e.data).map(|cc| cc.get_context().to_vec())
            }
            _ => ConfChange::parse_from_bytes(&e.data).map(|cc| cc.get_context().to_vec()),
        };
        let change = context
            .ok()
            .and_then(|c| postcard::from_bytes::<crate::cluster::MemberChange>(&c).ok());
        let cs_bytes = match conf {
            Some(Some(cs)) => Some(
                cs.write_to_bytes()
                    .map_err(|e| KvError::Internal(e.to_string()))?,
            ),
            _ => None,
        };
        let refused = cs_bytes.is_none();
        let members = applier.member_change(change.as_ref(), cs_bytes.as_deref());
        if applier.poisoned() {
            fatal(format!("backend write failed at index {}", e.index));
        }
        if refused {
            return Err(KvError::Internal(
                "membership change refused by raft".into(),
            ));
        }
        members.map(WriteResponse::Members)
    }

    /// Every shard's watch hub sees every batch, in order.
    async fn send_events(&self, batch: Arc<WatchBatch>) {
        for tx in &self.to_net {
            let _ = tx.send(ToNet::Events(batch.clone())).await;
        }
    }

    async fn answer_lease_query(&mut self, q: ToLessor) {
        let now = Instant::now();
        let (id, reply) = match q {
            ToLessor::KeepAlive { id, lease } => {
                (id, self.lessor.renew(lease, now).map(LeaseReply::KeepAlive))
            }
            // Only the leader's timers are renewed: followers send the caller there.
            ToLessor::TimeToLive { id, .. } if !self.lessor.is_leader() => {
                (id, Err(KvError::NotLeader))
            }
            ToLessor::TimeToLive { id, lease, keys } => {
                let ttl = match self.lessor.time_to_live(lease, now) {
                    None => Ok(LeaseTimeToLive {
                        id: lease,
                        ttl_secs: -1,
                        granted_ttl_secs: 0,
                        keys: Vec::new(),
                    }),
                    Some((remaining, granted)) => {
                        let keys = if keys {
                            self.backend.read_txn().and_then(|txn| {
                                crate::storage::mvcc::lease_attached_keys(
                                    &self.backend,
                                    &txn,
                                    lease,
                                )
                            })
                        } else {
                            Ok(Vec::new())
                        };
                        keys.map(|keys| LeaseTimeToLive {
                            id: lease,
                            ttl_secs: remaining,
                            granted_ttl_secs: granted,
                            keys,
                        })
                    }
                };
                (id, ttl.map(LeaseReply::TimeToLive))
            }
            ToLessor::Leases { id } => (id, Ok(LeaseReply::Leases(self.lessor.ids()))),
            // Handled by the run loop (it needs `&mut self` across an await).
            ToLessor::Defragment { id } => (id, Err(KvError::Internal("misrouted".into()))),
        };
        if let Some(tx) = self.to_net.get(shard_of(id)) {
            let _ = tx.send(ToNet::Lease(id, reply)).await;
        }
    }

    /// Leader only: proposes revokes for expired leases and, every interval, checkpoints.
    fn lease_tick(&mut self) {
        let now = Instant::now();
        for id in self.lessor.expired(now) {
            tracing::debug!(lease = %format!("{id:x}"), "lease expired; revoking");
            self.propose(WriteRequest::LeaseRevoke { id });
        }
        if self.lessor.is_leader()
            && now.duration_since(self.last_lease_checkpoint) >= self.lease_checkpoint_interval
        {
            self.last_lease_checkpoint = now;
            let min_secs = self.lease_checkpoint_interval.as_secs() as i64;
            let cps = self.lessor.checkpoints(now, min_secs);
            for chunk in cps.chunks(MAX_CHECKPOINTS_PER_ENTRY) {
                self.propose(WriteRequest::LeaseCheckpoint(chunk.to_vec()));
            }
        }
    }

    /// Internal proposals carry epoch 0: nobody waits for their reply. A full mailbox
    /// drops the proposal; the next tick proposes again.
    fn propose(&self, req: WriteRequest) {
        let proposal = Proposal {
            epoch: 0,
            id: 0,
            req,
            auth: None,
        };
        match postcard::to_allocvec(&proposal) {
            Ok(data) => {
                if self.to_raft.try_send(ApplyToRaft::Propose(data)).is_err() {
                    tracing::debug!("raft mailbox full; internal proposal retried later");
                }
            }
            Err(e) => tracing::error!("encoding internal proposal: {e}"),
        }
    }

    async fn send_replies(&self, replies: Vec<(ReqId, Header, Result<WriteResponse, KvError>)>) {
        let mut by_shard: HashMap<usize, Vec<_>> = HashMap::new();
        for r in replies {
            by_shard.entry(shard_of(r.0)).or_default().push(r);
        }
        for (shard, batch) in by_shard {
            if let Some(tx) = self.to_net.get(shard) {
                let _ = tx.send(ToNet::Written(batch)).await;
            }
        }
    }

    async fn release_reads(&mut self) {
        let applied = self.applied_index;
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting_reads)
            .into_iter()
            .partition(|(index, _)| *index <= applied);
        self.waiting_reads = waiting;
        let mut by_shard: HashMap<usize, Vec<ReqId>> = HashMap::new();
        for id in ready.into_iter().flat_map(|(_, ids)| ids) {
            by_shard.entry(shard_of(id)).or_default().push(id);
        }
        for (shard, ids) in by_shard {
            if let Some(tx) = self.to_net.get(shard) {
                let _ = tx.send(ToNet::ReadReady(ids)).await;
            }
        }
    }

    /// Syncs LMDB on the blocking pool (not on this executor), then reports the index.
    fn maybe_checkpoint(&mut self) {
        if self.applied_index - self.last_checkpoint < self.snapshot_count
            || self.checkpoint_running.get()
        {
            return;
        }
        let (index, term) = (self.applied_index, self.applied_term);
        self.last_checkpoint = index;
        self.checkpoint_running.set(true);
        let backend = self.backend.clone();
        let running = self.checkpoint_running.clone();
        let to_raft = self.to_raft.clone();
        glommio::spawn_local(async move {
            let synced = glommio::executor()
                .spawn_blocking(move || backend.sync())
                .await;
            running.set(false);
            match synced {
                Ok(()) => {
                    tracing::debug!(index, "checkpoint: lmdb synced");
                    // Best effort: a later checkpoint covers a skipped one.
                    let _ = to_raft.try_send(ApplyToRaft::Checkpointed { index, term });
                }
                Err(e) => fatal(format!("lmdb sync: {e}")),
            }
        })
        .detach();
    }
}
