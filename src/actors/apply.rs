//! Apply actor: applies each batch of committed entries in ONE LMDB write txn (with the
//! applied index and term in the same txn), then answers the waiting requests and the
//! linearizable reads whose read index is now applied. Every `snapshot_count` entries it
//! syncs LMDB off the executor and tells the raft actor the log below may go.

use super::*;
use crate::model::Header;
use crate::storage::backend::Backend;
use crate::storage::mvcc::Applier;
use ::raft::eraftpb::EntryType;
use futures::{FutureExt, StreamExt};
use glommio::channels::shared_channel::ConnectedSender;
use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;

/// Committed-entry messages merged into one LMDB txn.
const MAX_MESSAGES_PER_TXN: usize = 256;

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
}

pub struct ApplySetup {
    pub backend: Backend,
    pub epoch: u64,
    pub cluster_id: u64,
    pub member_id: u64,
    pub snapshot_count: u64,
    pub applied_index: u64,
    pub applied_term: u64,
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
        ApplyActor {
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

    pub async fn run(mut self, mut inbox: BoxStream<ToApply>) {
        while let Some(first) = inbox.next().await {
            let mut entries = Vec::new();
            let mut msg = Some(first);
            let mut taken = 0;
            while let Some(m) = msg.take() {
                match m {
                    ToApply::Committed(es) => entries.extend(es),
                    ToApply::ReadBarrier { index, ids } => self.waiting_reads.push((index, ids)),
                }
                taken += 1;
                if taken < MAX_MESSAGES_PER_TXN {
                    msg = inbox.next().now_or_never().flatten();
                }
            }
            if !entries.is_empty() {
                let replies = self.apply(entries);
                self.send_replies(replies).await;
            }
            self.release_reads().await;
            self.maybe_checkpoint();
        }
    }

    fn apply(
        &mut self,
        entries: Vec<::raft::eraftpb::Entry>,
    ) -> Vec<(ReqId, Header, Result<WriteResponse, KvError>)> {
        let first = entries[0].index;
        assert!(
            first <= self.applied_index + 1,
            "committed entries must not skip indexes"
        );
        let mut replies = Vec::new();
        let mut applier = Applier::begin(&self.backend).unwrap_or_else(|e| fatal(e));
        let mut last = (self.applied_index, self.applied_term);
        for e in entries {
            if e.index <= self.applied_index {
                continue; // already in LMDB (replayed after restart)
            }
            assert_eq!(e.index, last.0 + 1, "entries apply in order");
            last = (e.index, e.term);
            if e.get_entry_type() != EntryType::EntryNormal || e.data.is_empty() {
                continue; // leader no-op; conf changes arrive with the cluster issue
            }
            let proposal: Proposal = match postcard::from_bytes(&e.data) {
                Ok(p) => p,
                Err(err) => {
                    // Passed the WAL's CRC yet does not decode: skip it the same way on
                    // every replay so all members stay identical.
                    tracing::error!(index = e.index, "undecodable entry skipped: {err}");
                    continue;
                }
            };
            let result = applier.apply(&proposal.req);
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
        applier.finish(last.0, last.1).unwrap_or_else(|e| fatal(e));
        self.applied_index = last.0;
        self.applied_term = last.1;
        replies
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
