//! Raft actor: owns the raft-rs `RawNode`. One loop, as in raft-rs' five_mem_node:
//! take every input that is ready (so proposals arriving together share one Ready),
//! then handle the Ready with async persistence: entries go to the WAL actor, and only
//! once it reports them fdatasync'ed (`on_persist_ready`) can they commit and be applied.

use super::*;
use crate::storage::raft_log::RaftLog;
use ::raft::{Config, RawNode, StateRole};
use futures::{FutureExt, StreamExt};
use glommio::channels::shared_channel::ConnectedSender;
use std::collections::HashMap;
use std::time::Duration;

pub enum RaftInput {
    Net(ToRaft),
    Persisted(Persisted),
    Apply(ApplyToRaft),
    Tick,
}

/// Inputs handled per loop turn before the Ready is processed.
const MAX_INPUTS_PER_TURN: usize = 8192;
/// A read-index request unanswered for this many ticks is sent again (raft-rs drops
/// them silently while a new leader has not committed in its term).
const READ_RETRY_TICKS: u64 = 2;
/// ... and fails with a timeout after this many.
const READ_TIMEOUT_TICKS: u64 = 50;

pub struct RaftActor {
    node: RawNode<RaftLog>,
    to_wal: ConnectedSender<ToWal>,
    to_apply: ConnectedSender<ToApply>,
    to_net: Vec<ConnectedSender<ToNet>>,
    /// Ready numbers handed to the WAL and not yet reported persisted.
    last_sent_ready: u64,
    last_persisted_ready: u64,
    /// A later ready with nothing to write, acknowledged once the WAL catches up.
    empty_ready: u64,
    /// Latest hard state whose only change (the commit index) needed no fsync.
    pending_hs: Option<::raft::eraftpb::HardState>,
    new_reads: Vec<ReqId>,
    inflight_reads: HashMap<u64, (Vec<ReqId>, u64)>,
    next_read_ctx: u64,
    ticks: u64,
    leader: u64,
    leading: bool,
    wal_stats: crate::model::WalStats,
}

pub struct RaftSetup {
    pub id: u64,
    pub log: RaftLog,
    pub applied: u64,
    pub heartbeat_ms: u64,
    pub election_ms: u64,
}

impl RaftActor {
    pub fn new(
        setup: RaftSetup,
        to_wal: ConnectedSender<ToWal>,
        to_apply: ConnectedSender<ToApply>,
        to_net: Vec<ConnectedSender<ToNet>>,
    ) -> Result<RaftActor, ::raft::Error> {
        let cfg = Config {
            id: setup.id,
            election_tick: (setup.election_ms / setup.heartbeat_ms).max(2) as usize,
            heartbeat_tick: 1,
            applied: setup.applied,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        cfg.validate()?;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let mut node = RawNode::new(&cfg, setup.log, &logger)?;
        // A one-voter group need not wait out an election timeout to lead.
        let voters = node
            .raft
            .prs()
            .conf()
            .voters()
            .ids()
            .iter()
            .collect::<Vec<_>>();
        if voters == vec![setup.id] {
            node.campaign()?;
        }
        Ok(RaftActor {
            node,
            to_wal,
            to_apply,
            to_net,
            last_sent_ready: 0,
            last_persisted_ready: 0,
            empty_ready: 0,
            pending_hs: None,
            new_reads: Vec::new(),
            inflight_reads: HashMap::new(),
            next_read_ctx: 1,
            ticks: 0,
            leader: 0,
            leading: false,
            wal_stats: Default::default(),
        })
    }

    pub fn ticker(heartbeat_ms: u64) -> BoxStream<RaftInput> {
        Box::pin(futures::stream::unfold((), move |_| async move {
            glommio::timer::sleep(Duration::from_millis(heartbeat_ms)).await;
            Some((RaftInput::Tick, ()))
        }))
    }

    pub async fn run(mut self, mut inputs: futures::stream::SelectAll<BoxStream<RaftInput>>) {
        while let Some(first) = inputs.next().await {
            self.handle(first).await;
            for _ in 0..MAX_INPUTS_PER_TURN {
                match inputs.next().now_or_never() {
                    Some(Some(m)) => self.handle(m).await,
                    _ => break,
                }
            }
            self.issue_reads();
            self.on_ready().await;
        }
    }

    async fn reply(&self, ids: Vec<ReqId>, err: KvError) {
        let mut by_shard: HashMap<usize, Vec<ReqId>> = HashMap::new();
        for id in ids {
            by_shard.entry(shard_of(id)).or_default().push(id);
        }
        for (shard, ids) in by_shard {
            if let Some(tx) = self.to_net.get(shard) {
                let _ = tx.send(ToNet::Failed(ids, err.clone())).await;
            }
        }
    }

    async fn handle(&mut self, input: RaftInput) {
        match input {
            RaftInput::Net(ToRaft::Propose { id, data }) => {
                if let Err(e) = self.node.propose(Vec::new(), data) {
                    tracing::debug!("propose dropped: {e}");
                    self.reply(vec![id], KvError::Internal("no leader".into()))
                        .await;
                }
            }
            RaftInput::Net(ToRaft::ReadIndex { id }) => self.new_reads.push(id),
            RaftInput::Net(ToRaft::Status { id }) => {
                let st = RaftStatus {
                    leader: self.leader,
                    term: self.node.raft.term,
                    last_index: self.node.raft.raft_log.last_index(),
                    commit: self.node.raft.raft_log.committed,
                    wal: self.wal_stats,
                };
                if let Some(tx) = self.to_net.get(shard_of(id)) {
                    let _ = tx.send(ToNet::Status(id, st)).await;
                }
            }
            RaftInput::Persisted(p) => {
                assert!(
                    p.number > self.last_persisted_ready,
                    "persist acks must advance"
                );
                self.wal_stats = p.stats;
                self.last_persisted_ready = p.number;
                self.node.on_persist_ready(p.number);
                if p.number == self.last_sent_ready && self.empty_ready > p.number {
                    self.node.on_persist_ready(self.empty_ready);
                }
            }
            RaftInput::Apply(ApplyToRaft::Propose(data)) => {
                // Lease revokes and checkpoints: meaningless off the leader, retried by
                // the lessor if lost.
                if let Err(e) = self.node.propose(Vec::new(), data) {
                    tracing::debug!("internal proposal dropped: {e}");
                }
            }
            RaftInput::Apply(ApplyToRaft::Checkpointed { index, term }) => {
                self.node.mut_store().compact(index, term);
                self.node.advance_apply_to(index);
                let _ = self.to_wal.send(ToWal::Release { index }).await;
            }
            RaftInput::Tick => {
                self.ticks += 1;
                self.node.tick();
                self.retry_reads().await;
            }
        }
    }

    /// One read-index request covers every linearizable read that arrived this turn.
    fn issue_reads(&mut self) {
        if self.new_reads.is_empty() {
            return;
        }
        let ctx = self.next_read_ctx;
        self.next_read_ctx += 1;
        let ids = std::mem::take(&mut self.new_reads);
        self.node.read_index(ctx.to_be_bytes().to_vec());
        self.inflight_reads.insert(ctx, (ids, self.ticks));
    }

    async fn retry_reads(&mut self) {
        let now = self.ticks;
        let mut expired = Vec::new();
        for (ctx, (ids, issued)) in self.inflight_reads.iter() {
            let age = now - issued;
            if age >= READ_TIMEOUT_TICKS {
                expired.push(*ctx);
            } else if age.is_multiple_of(READ_RETRY_TICKS) && age > 0 {
                assert!(!ids.is_empty());
                self.node.read_index(ctx.to_be_bytes().to_vec());
            }
        }
        for ctx in expired {
            if let Some((ids, _)) = self.inflight_reads.remove(&ctx) {
                self.reply(ids, KvError::Timeout).await;
            }
        }
    }

    async fn on_ready(&mut self) {
        // Bounded: each pass consumes the node's pending work.
        for _ in 0..16 {
            if !self.node.has_ready()
                || self.last_sent_ready - self.last_persisted_ready >= MAX_INFLIGHT_PERSISTS
            {
                return;
            }
            let mut rd = self.node.ready();
            if let Some(ss) = rd.ss() {
                self.leader = ss.leader_id;
                let leading = ss.raft_state == StateRole::Leader;
                if leading {
                    tracing::info!(term = self.node.raft.term, "became leader");
                }
                if leading != self.leading {
                    self.leading = leading;
                    if self.to_apply.send(ToApply::Leader(leading)).await.is_err() {
                        return;
                    }
                }
            }
            // A one-voter group sends no messages; peers arrive with the cluster issue.
            debug_assert!(rd.messages().is_empty() && rd.persisted_messages().is_empty());
            for rs in rd.take_read_states() {
                let mut ctx = [0u8; 8];
                if rs.request_ctx.len() == 8 {
                    ctx.copy_from_slice(&rs.request_ctx);
                }
                if let Some((ids, _)) = self.inflight_reads.remove(&u64::from_be_bytes(ctx)) {
                    let _ = self
                        .to_apply
                        .send(ToApply::ReadBarrier {
                            index: rs.index,
                            ids,
                        })
                        .await;
                }
            }
            let committed = rd.take_committed_entries();
            if !committed.is_empty()
                && self
                    .to_apply
                    .send(ToApply::Committed(committed))
                    .await
                    .is_err()
            {
                return;
            }
            let number = rd.number();
            let entries = rd.take_entries();
            // raft-rs reads appended entries back from Storage once advance_append_async
            // moves them out of its unstable log; durability is tracked separately by
            // on_persist_ready, so committing waits for the WAL regardless.
            let store = self.node.mut_store();
            store.append(entries.clone());
            if let Some(hs) = rd.hs() {
                store.set_hard_state(hs.clone());
            }
            // A commit-index-only change need not be synced (etcd's MustSync): it rides
            // along with the next write.
            let needs_persist = !entries.is_empty() || rd.must_sync();
            let hard_state = match rd.hs().cloned() {
                Some(hs) if !needs_persist => {
                    self.pending_hs = Some(hs);
                    None
                }
                Some(hs) => {
                    self.pending_hs = None;
                    Some(hs)
                }
                None if needs_persist => self.pending_hs.take(),
                None => None,
            };
            self.node.advance_append_async(rd);
            if needs_persist {
                self.last_sent_ready = number;
                let msg = ToWal::Persist {
                    number,
                    entries,
                    hard_state,
                };
                if self.to_wal.send(msg).await.is_err() {
                    return;
                }
            } else if self.last_sent_ready == self.last_persisted_ready {
                // Nothing to write and nothing in flight: it is persisted already.
                self.node.on_persist_ready(number);
            } else {
                self.empty_ready = number;
            }
        }
    }
}
