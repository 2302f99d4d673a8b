//! Raft actor: owns the raft-rs `RawNode`. One loop, as in raft-rs' five_mem_node:
//! take every input that is ready (so proposals arriving together share one Ready),
//! then handle the Ready with async persistence: entries go to the WAL actor, and only
//! once it reports them fdatasync'ed (`on_persist_ready`) can they commit and be applied.

use super::peer::{PeerEvent, Transport};
use super::*;
use crate::cluster::MemberChange;
use crate::storage::backend::Store;
use crate::storage::raft_log::RaftLog;
use ::raft::eraftpb::{
    ConfChange, ConfChangeV2, EntryType, Message, MessageType, Snapshot, SnapshotMetadata,
};
use ::raft::{Config, RawNode, SnapshotStatus, StateRole};
use futures::{FutureExt, StreamExt};
use glommio::channels::shared_channel::ConnectedSender;
use protobuf::Message as _;
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

pub enum RaftInput {
    Net(ToRaft),
    Persisted(Persisted),
    Apply(ApplyToRaft),
    Peer(PeerEvent),
    /// A snapshot file for followers is ready (or could not be made).
    SnapshotMade(Result<(SnapshotMetadata, PathBuf), String>),
    /// This commit index has waited COMMIT_FLUSH_DELAY for an append to carry it.
    FlushCommit(u64),
    Tick,
}

/// Inputs handled per loop turn before the Ready is processed.
const MAX_INPUTS_PER_TURN: usize = 8192;
/// A read-index request unanswered for this many ticks is sent again (raft-rs drops
/// them silently while a new leader has not committed in its term).
const READ_RETRY_TICKS: u64 = 2;
/// ... and fails with a timeout after this many.
const READ_TIMEOUT_TICKS: u64 = 50;

/// How long a new commit index may wait on the leader for the next append to carry it
/// before an append of its own tells the followers (see `flush_commit`). Puts forwarded by
/// a follower do not wait: that follower is told at once.
const COMMIT_FLUSH_DELAY: Duration = Duration::from_micros(1000);

/// Entries kept in memory below a checkpoint, so a follower that was briefly away
/// catches up from the log instead of a snapshot (etcd keeps 5000; fewer when
/// --snapshot-count is smaller, so a follower further behind than that gets a snapshot).
const MAX_CATCH_UP_ENTRIES: u64 = 5000;

pub struct RaftActor {
    node: RawNode<RaftLog>,
    transport: Transport,
    /// Messages raft-rs allows out only once their ready is fdatasync'ed.
    persisted_msgs: VecDeque<(u64, Vec<Message>)>,
    backend: Store,
    snap_dir: PathBuf,
    snapshot_running: bool,
    self_tx: futures::channel::mpsc::Sender<RaftInput>,
    auto_promote_within: u64,
    catch_up_entries: u64,
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
    /// The leader raft last reported (0 = none known), published for the network actors.
    leader_hint: std::sync::Arc<std::sync::atomic::AtomicU64>,
    leading: bool,
    wal_stats: crate::model::WalStats,
    /// Leader transfers in progress: (request, target, tick started).
    transfers: Vec<(ReqId, u64, u64)>,
    /// The highest commit index sent to each peer (appends and heartbeats carry one).
    commit_told: HashMap<u64, u64>,
    /// Per follower, the last log index of a proposal it forwarded: it waits on the
    /// commit to answer its client, so it is told as soon as the leader knows.
    forwarded_upto: HashMap<u64, u64>,
    /// A FlushCommit timer is pending.
    flush_armed: bool,
}

pub struct RaftSetup {
    pub id: u64,
    pub log: RaftLog,
    pub applied: u64,
    pub heartbeat_ms: u64,
    pub election_ms: u64,
    pub backend: Store,
    pub snap_dir: PathBuf,
    /// Promote learners within this many entries of the leader (0 = never).
    pub auto_promote_within: u64,
    pub snapshot_count: u64,
    /// Where the leader's ID is published for the network actors.
    pub leader_hint: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl RaftActor {
    /// Checks a peer's message before raft steps it: raft-rs aborts on some that no
    /// correct member sends (a commit beyond the log, entries that rewrite committed
    /// ones), and a snapshot must come from the leader of its term. The rest raft
    /// judges itself (terms, indexes, rejections). Dropped messages are logged.
    fn admissible(&self, m: &Message) -> bool {
        let raft = &self.node.raft;
        let log = &raft.raft_log;
        let last = log.last_index();
        let why = match m.get_msg_type() {
            MessageType::MsgHeartbeat if m.commit > last => Some(format!(
                "heartbeat commit {} beyond the last index {last}",
                m.commit
            )),
            MessageType::MsgAppend => m
                .entries
                .iter()
                .take_while(|e| e.index <= log.committed)
                .find(|e| log.term(e.index).ok() != Some(e.term))
                .map(|e| format!("append rewrites committed entry {}", e.index)),
            MessageType::MsgAppendResponse if !m.reject && m.index > last => Some(format!(
                "append response for index {} beyond the last index {last}",
                m.index
            )),
            MessageType::MsgSnapshot
                if m.term == raft.term && raft.leader_id != 0 && m.from != raft.leader_id =>
            {
                Some(format!(
                    "snapshot from {:x}, not the leader {:x}",
                    m.from, raft.leader_id
                ))
            }
            _ => None,
        };
        if let Some(why) = &why {
            tracing::warn!(from = %format!("{:x}", m.from), "peer message dropped: {why}");
        }
        why.is_none()
    }

    pub fn new(
        setup: RaftSetup,
        to_wal: ConnectedSender<ToWal>,
        to_apply: ConnectedSender<ToApply>,
        to_net: Vec<ConnectedSender<ToNet>>,
        transport: Transport,
        self_tx: futures::channel::mpsc::Sender<RaftInput>,
    ) -> Result<RaftActor, ::raft::Error> {
        let election_tick = (setup.election_ms / setup.heartbeat_ms).max(2) as usize;
        let cfg = Config {
            id: setup.id,
            election_tick,
            // raft-rs (and etcd) randomise a follower's timeout in [ET, 2 ET), so with
            // the vote rounds a failover can take just over 2 ET. [ET, 1.5 ET) keeps it
            // inside 2 ET; half an election timeout still separates candidates by far
            // more than a round trip.
            max_election_tick: election_tick + election_tick / 2,
            heartbeat_tick: 1,
            applied: setup.applied,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            // A new commit index reaches the followers after the leader has applied and
            // answered (flush_commit), or with the next append, not in a message of its
            // own ahead of the client's reply.
            skip_bcast_commit: true,
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
            transport,
            persisted_msgs: VecDeque::new(),
            backend: setup.backend,
            snap_dir: setup.snap_dir,
            snapshot_running: false,
            self_tx,
            auto_promote_within: setup.auto_promote_within,
            catch_up_entries: setup.snapshot_count.min(MAX_CATCH_UP_ENTRIES),
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
            leader_hint: setup.leader_hint,
            leading: false,
            wal_stats: Default::default(),
            transfers: Vec::new(),
            commit_told: HashMap::new(),
            forwarded_upto: HashMap::new(),
            flush_armed: false,
        })
    }

    /// One tick per `heartbeat_ms` of wall-clock time. Deadlines advance by a fixed
    /// period, so a busy actor (each turn awaits a WAL fsync) does not stretch the
    /// election timeout; after a stall longer than a period the missed ticks are
    /// dropped (as Go's time.Ticker, which etcd uses) rather than fired in a burst.
    pub fn ticker(heartbeat_ms: u64) -> BoxStream<RaftInput> {
        assert!(heartbeat_ms > 0, "heartbeat interval must be positive");
        let period = Duration::from_millis(heartbeat_ms);
        let first = std::time::Instant::now() + period;
        Box::pin(futures::stream::unfold(first, move |deadline| async move {
            let now = std::time::Instant::now();
            if deadline > now {
                glommio::timer::sleep(deadline - now).await;
            }
            let now = std::time::Instant::now();
            let next = if now >= deadline + period {
                now + period
            } else {
                deadline + period
            };
            debug_assert!(next > deadline);
            Some((RaftInput::Tick, next))
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
            self.flush_commit_to_forwarders();
            self.on_ready().await;
            self.maybe_make_snapshot();
        }
    }

    /// raft-rs asked for a snapshot (a follower is behind the log): copy LMDB on the
    /// blocking pool; raft-rs retries sending until the copy is prepared.
    fn maybe_make_snapshot(&mut self) {
        if self.snapshot_running || !self.node.store().snapshot_wanted() {
            return;
        }
        self.snapshot_running = true;
        let backend = self.backend.current();
        let dir = self.snap_dir.clone();
        let mut tx = self.self_tx.clone();
        glommio::spawn_local(async move {
            let made = glommio::executor()
                .spawn_blocking(move || crate::storage::snapshot::create(&backend, &dir))
                .await;
            let _ = futures::SinkExt::send(&mut tx, RaftInput::SnapshotMade(made)).await;
        })
        .detach();
    }

    fn leader(&self) -> u64 {
        self.leader_hint.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn is_learner(&self) -> bool {
        self.node
            .raft
            .prs()
            .conf()
            .learners()
            .contains(&self.node.raft.id)
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
                // A follower forwards to the leader (raft-rs); with no leader known the
                // proposal is dropped and the client told so at once.
                if let Err(e) = self.node.propose(Vec::new(), data) {
                    tracing::debug!("propose dropped: {e}");
                    self.reply(vec![id], KvError::NoLeader).await;
                }
            }
            RaftInput::Net(ToRaft::ConfChange { id, context, cc }) => {
                if let Err(e) = self.check_conf_change(&cc) {
                    self.reply(vec![id], e).await;
                } else if let Err(e) = self.node.propose_conf_change(context, cc) {
                    tracing::debug!("conf change dropped: {e}");
                    self.reply(vec![id], KvError::NoLeader).await;
                }
            }
            RaftInput::Net(ToRaft::TransferLeader { id, to }) => {
                if !self.leading {
                    self.reply(vec![id], KvError::NotLeader).await;
                } else if !self.node.raft.prs().conf().voters().contains(to) {
                    self.reply(vec![id], KvError::BadLeaderTransferee).await;
                } else {
                    self.node.transfer_leader(to);
                    self.transfers.push((id, to, self.ticks));
                }
            }
            RaftInput::Peer(PeerEvent::Message(m)) if !self.admissible(&m) => {}
            RaftInput::Peer(PeerEvent::Message(m)) => {
                let forwarder =
                    (self.leading && m.get_msg_type() == MessageType::MsgPropose).then_some(m.from);
                if let Err(e) = self.node.step(*m) {
                    tracing::debug!("step: {e}");
                } else if let Some(from) = forwarder {
                    // Bounded by the membership: the transport drops other senders.
                    let last = self.node.raft.raft_log.last_index();
                    self.forwarded_upto.insert(from, last);
                }
            }
            RaftInput::Peer(PeerEvent::Unreachable(to)) => self.node.report_unreachable(to),
            RaftInput::Peer(PeerEvent::SnapshotSent { to, ok }) => {
                let status = if ok {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                self.node.report_snapshot(to, status);
            }
            RaftInput::SnapshotMade(made) => {
                self.snapshot_running = false;
                match made {
                    Ok((meta, path)) => {
                        tracing::info!(index = meta.index, "snapshot prepared for followers");
                        let mut snap = Snapshot::default();
                        snap.set_metadata(meta);
                        snap.set_data(path.to_string_lossy().as_bytes().to_vec().into());
                        self.node.mut_store().set_prepared_snapshot(snap);
                    }
                    Err(e) => tracing::warn!("making a snapshot: {e}"),
                }
            }
            RaftInput::Net(ToRaft::ReadIndex { id }) => self.new_reads.push(id),
            RaftInput::Net(ToRaft::Status { id }) => {
                let st = RaftStatus {
                    leader: self.leader(),
                    term: self.node.raft.term,
                    last_index: self.node.raft.raft_log.last_index(),
                    commit: self.node.raft.raft_log.committed,
                    wal: self.wal_stats,
                    is_learner: self.is_learner(),
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
                let mut upto = p.number;
                if p.number == self.last_sent_ready && self.empty_ready > p.number {
                    self.node.on_persist_ready(self.empty_ready);
                    upto = self.empty_ready;
                }
                self.send_persisted_msgs(upto);
            }
            RaftInput::Apply(ApplyToRaft::Propose(data)) => {
                // Lease revokes and checkpoints: meaningless off the leader, retried by
                // the lessor if lost.
                if let Err(e) = self.node.propose(Vec::new(), data) {
                    tracing::debug!("internal proposal dropped: {e}");
                }
            }
            RaftInput::Apply(ApplyToRaft::Applied(index)) => {
                self.advance_applied(index);
                self.arm_commit_flush();
            }
            RaftInput::FlushCommit(index) => {
                self.flush_armed = false;
                self.flush_commit(|_, told| told < index);
                // Committed since the timer was armed: wait for an append once more.
                self.arm_commit_flush();
            }
            RaftInput::Apply(ApplyToRaft::Checkpointed { index, term: _ }) => {
                self.advance_applied(index);
                self.node
                    .mut_store()
                    .compact(index.saturating_sub(self.catch_up_entries));
                let _ = self.to_wal.send(ToWal::Release { index }).await;
            }
            RaftInput::Tick => {
                self.ticks += 1;
                self.stagger_election_timeout();
                self.node.tick();
                self.retry_reads().await;
                self.check_transfers().await;
                if self.leading && self.auto_promote_within > 0 && self.ticks.is_multiple_of(10) {
                    self.auto_promote();
                }
            }
        }
    }

    /// A follower's election timeout is a slot in [ET, 1.5 ET) by its rank among the
    /// voters, not a random draw: with 100 ms ticks a draw has 5 values, so two
    /// survivors of a leader crash often timed out in the same tick, both won a pre-vote
    /// and split the vote (another ET: CI once saw 2.6 s for a 1 s timeout). Distinct slots
    /// are a tick or more apart (when the range has a tick per voter; else the random
    /// draw stays). Candidates keep raft-rs's random draw, so a split that
    /// still happens is not repeated in lockstep. Applied before each tick, so whatever
    /// raft-rs drew on its last reset is replaced before it is compared.
    fn stagger_election_timeout(&mut self) {
        let raft = &mut self.node.raft;
        if raft.state != StateRole::Follower {
            return;
        }
        let voters = raft.prs().conf().voters().ids();
        if !voters.contains(raft.id) {
            return; // a learner never campaigns
        }
        let rank = voters.iter().filter(|id| *id < raft.id).count();
        let min = raft.election_timeout();
        let span = min / 2; // max_election_tick = ET + ET / 2
        if span < voters.len() {
            // Too few ticks for a slot each (short timeouts, 7+ voters): shared slots
            // would collide every time, so keep the random draw.
            return;
        }
        let slot = rank * span / voters.len();
        let timeout = min + slot;
        debug_assert!(timeout >= min && timeout < min + span);
        if raft.randomized_election_timeout() != timeout {
            raft.set_randomized_election_timeout(timeout);
        }
    }

    /// Tells raft-rs how far the state machine got (it refuses a second membership change,
    /// or to campaign, while a conf change lies between applied and committed). raft-rs
    /// wants applied <= persisted: an installed snapshot is applied before its WAL
    /// marker is durable, so clamp.
    fn advance_applied(&mut self, index: u64) {
        let log = &self.node.raft.raft_log;
        let to = index.min(log.persisted).min(log.committed);
        if to > log.applied {
            self.node.advance_apply_to(to);
        }
    }

    /// Hands messages to the peer transport, noting the commit index each peer is told.
    fn send_msgs(&mut self, msgs: Vec<Message>) {
        for m in &msgs {
            let told = self.commit_told.entry(m.to).or_insert(0);
            *told = (*told).max(m.commit);
        }
        self.transport.send(msgs);
    }

    /// With skip_bcast_commit raft-rs tells followers a new commit index only with the
    /// next append, so a put answered by the leader costs no extra round of messages
    /// while the next put's append is coming anyway. Peers for which `wanted(id, told)`
    /// holds and that have not been told the current commit index get an append now.
    fn flush_commit(&mut self, wanted: impl Fn(u64, u64) -> bool) {
        if !self.leading {
            return;
        }
        let behind: Vec<u64> = self
            .peers_behind()
            .filter(|(id, told)| wanted(*id, *told))
            .map(|(id, _)| id)
            .collect();
        for id in behind {
            self.node.raft.send_append(id);
        }
    }

    /// Peers not yet sent the current commit index, with the one they were sent.
    fn peers_behind(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let committed = self.node.raft.raft_log.committed;
        let self_id = self.node.raft.id;
        self.node
            .raft
            .prs()
            .iter()
            .map(|(id, _)| (*id, self.commit_told.get(id).copied().unwrap_or(0)))
            .filter(move |(id, told)| *id != self_id && *told < committed)
    }

    /// Followers waiting on the commit of a proposal they forwarded are told at once.
    fn flush_commit_to_forwarders(&mut self) {
        if self.forwarded_upto.is_empty() {
            return;
        }
        let committed = self.node.raft.raft_log.committed;
        let waiting = std::mem::take(&mut self.forwarded_upto);
        self.flush_commit(|id, told| waiting.get(&id).is_some_and(|upto| *upto > told));
        // Still waiting: proposals not committed yet.
        self.forwarded_upto = waiting
            .into_iter()
            .filter(|(_, upto)| *upto > committed)
            .collect();
    }

    /// Everyone else (watchers and serializable reads on followers) learns the commit
    /// index within COMMIT_FLUSH_DELAY once the leader has applied it (twice that if it
    /// moved while the timer ran). Under load the appends sent meanwhile carry it, and
    /// the timer sends nothing.
    fn arm_commit_flush(&mut self) {
        if !self.leading || self.flush_armed || self.peers_behind().next().is_none() {
            return;
        }
        self.flush_armed = true;
        let index = self.node.raft.raft_log.committed;
        let mut tx = self.self_tx.clone();
        glommio::spawn_local(async move {
            glommio::timer::sleep(COMMIT_FLUSH_DELAY).await;
            let _ = futures::SinkExt::send(&mut tx, RaftInput::FlushCommit(index)).await;
        })
        .detach();
    }

    /// Sends the messages of every ready up to `number` (now durable).
    fn send_persisted_msgs(&mut self, number: u64) {
        while self
            .persisted_msgs
            .front()
            .is_some_and(|(n, _)| *n <= number)
        {
            if let Some((_, msgs)) = self.persisted_msgs.pop_front() {
                self.send_msgs(msgs);
            }
        }
    }

    /// etcd's checks before a membership change is proposed.
    fn check_conf_change(&self, cc: &ConfChangeV2) -> Result<(), KvError> {
        use ::raft::eraftpb::ConfChangeType;
        let conf = self.node.raft.prs().conf();
        // A peer URL update re-adds a member in its current role (a no-op for raft).
        if let Ok(MemberChange::UpdatePeerUrls(id, _)) = postcard::from_bytes(cc.get_context()) {
            return if conf.voters().contains(id) || conf.learners().contains(&id) {
                Ok(())
            } else {
                Err(KvError::MemberNotFound)
            };
        }
        for c in cc.get_changes() {
            let id = c.node_id;
            let known = conf.voters().contains(id) || conf.learners().contains(&id);
            match c.get_change_type() {
                ConfChangeType::AddNode if conf.learners().contains(&id) => {
                    // Promotion: only a learner in sync with the leader (etcd: match
                    // index at least 90% of the leader's commit).
                    if !self.leading {
                        return Err(KvError::NotLeader);
                    }
                    let committed = self.node.raft.raft_log.committed;
                    let matched = self.node.raft.prs().get(id).map_or(0, |p| p.matched);
                    if (matched as f64) < committed as f64 * 0.9 {
                        return Err(KvError::LearnerNotReady);
                    }
                }
                ConfChangeType::AddNode | ConfChangeType::AddLearnerNode if known => {
                    return Err(KvError::MemberExists)
                }
                ConfChangeType::RemoveNode if !known => return Err(KvError::MemberNotFound),
                _ => {}
            }
        }
        Ok(())
    }

    /// Leader only: promotes learners whose log is within the configured bound.
    fn auto_promote(&mut self) {
        use ::raft::eraftpb::{ConfChangeSingle, ConfChangeType};
        if self.node.raft.has_pending_conf() {
            return;
        }
        let last = self.node.raft.raft_log.last_index();
        let within = self.auto_promote_within;
        let ready: Vec<u64> = self
            .node
            .raft
            .prs()
            .conf()
            .learners()
            .iter()
            .copied()
            .filter(|id| {
                self.node
                    .raft
                    .prs()
                    .get(*id)
                    .is_some_and(|p| p.matched + within >= last)
            })
            .collect();
        if let Some(&id) = ready.first() {
            let mut single = ConfChangeSingle::default();
            single.set_change_type(ConfChangeType::AddNode);
            single.node_id = id;
            let mut cc = ConfChangeV2::default();
            cc.set_changes(vec![single].into());
            let change = postcard::to_allocvec(&MemberChange::Promote(id)).unwrap_or_default();
            cc.set_context(change.into());
            tracing::info!(learner = %format!("{id:x}"), "auto-promoting a caught-up learner");
            if let Err(e) = self.node.propose_conf_change(Vec::new(), cc) {
                tracing::debug!("auto-promote dropped: {e}");
            }
        }
    }

    /// Leader transfers answer once the target leads, or time out.
    async fn check_transfers(&mut self) {
        if self.transfers.is_empty() {
            return;
        }
        let now = self.ticks;
        let timeout = self.node.raft.election_timeout() as u64 * 2;
        let leader = self.leader();
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.transfers)
            .into_iter()
            .partition(|(_, to, started)| *to == leader || now - started > timeout);
        self.transfers = waiting;
        for (id, to, _) in done {
            if to == leader {
                if let Some(tx) = self.to_net.get(shard_of(id)) {
                    let st = RaftStatus {
                        leader,
                        term: self.node.raft.term,
                        ..Default::default()
                    };
                    let _ = tx.send(ToNet::Status(id, st)).await;
                }
            } else {
                self.reply(vec![id], KvError::LeaderTransferTimeout).await;
            }
        }
    }

    /// Applies committed membership changes to raft's configuration (raft-rs wants this
    /// when the entry is applied; the apply actor stores the resulting ConfState with
    /// the entry, so both agree at every index) and to the transport's peer list.
    fn apply_conf_changes(
        &mut self,
        entries: &[::raft::eraftpb::Entry],
    ) -> Vec<(u64, Option<::raft::eraftpb::ConfState>)> {
        let mut out = Vec::new();
        for e in entries {
            // raft-rs takes either version; corekv proposes V2, V1 may come from old logs.
            let applied = match e.get_entry_type() {
                EntryType::EntryConfChangeV2 => ConfChangeV2::parse_from_bytes(&e.data)
                    .ok()
                    .map(|cc| (self.node.apply_conf_change(&cc), cc.get_context().to_vec())),
                EntryType::EntryConfChange => ConfChange::parse_from_bytes(&e.data)
                    .ok()
                    .map(|cc| (self.node.apply_conf_change(&cc), cc.get_context().to_vec())),
                EntryType::EntryNormal => continue,
            };
            let Some((result, context)) = applied else {
                tracing::error!(index = e.index, "undecodable conf change skipped");
                out.push((e.index, None));
                continue;
            };
            match result {
                Ok(cs) => {
                    if let Ok(change) = postcard::from_bytes::<MemberChange>(&context) {
                        self.update_peers(&change);
                    }
                    tracing::info!(index = e.index, voters = ?cs.voters, learners = ?cs.learners, "membership changed");
                    out.push((e.index, Some(cs)));
                }
                Err(err) => {
                    tracing::warn!(index = e.index, "conf change refused by raft: {err}");
                    out.push((e.index, None));
                }
            }
        }
        out
    }

    fn update_peers(&mut self, change: &MemberChange) {
        {
            let mut peers = self.transport.ctx().peers.borrow_mut();
            match change {
                MemberChange::Add(m) => {
                    peers.insert(m.id, m.peer_urls.clone());
                }
                MemberChange::Remove(id) => {
                    peers.remove(id);
                }
                MemberChange::UpdatePeerUrls(id, urls) => {
                    peers.insert(*id, urls.clone());
                }
                MemberChange::Promote(_) => {}
            }
        }
        self.transport.sync_peers();
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
                self.leader_hint
                    .store(ss.leader_id, std::sync::atomic::Ordering::Relaxed);
                let leading = ss.raft_state == StateRole::Leader;
                if leading {
                    tracing::info!(term = self.node.raft.term, "became leader");
                }
                if leading != self.leading {
                    self.leading = leading;
                    self.commit_told.clear();
                    self.forwarded_upto.clear();
                    if self.to_apply.send(ToApply::Leader(leading)).await.is_err() {
                        return;
                    }
                }
            }
            // The leader's appends and heartbeats may go before its own write is durable
            // (raft's parallel append); everything else waits for the WAL.
            let msgs = rd.take_messages();
            if !msgs.is_empty() {
                self.send_msgs(msgs);
            }
            if !rd.snapshot().is_empty() {
                let snap = rd.snapshot().clone();
                if !self.install_snapshot(snap).await {
                    return;
                }
            }
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
            // Handed to the apply actor after the WAL write is queued, so the write is
            // on its way to the disk while LMDB applies.
            let committed = rd.take_committed_entries();
            let to_apply = (!committed.is_empty()).then(|| {
                let conf_states = self.apply_conf_changes(&committed);
                ToApply::Committed {
                    entries: committed,
                    conf_states,
                }
            });
            let number = rd.number();
            let persisted_msgs = rd.take_persisted_messages();
            let snapshot_marker = (!rd.snapshot().is_empty()).then(|| {
                let m = rd.snapshot().get_metadata();
                (m.index, m.term)
            });
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
            let needs_persist = !entries.is_empty() || rd.must_sync() || snapshot_marker.is_some();
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
                if !persisted_msgs.is_empty() {
                    self.persisted_msgs.push_back((number, persisted_msgs));
                }
                let msg = ToWal::Persist {
                    number,
                    entries,
                    hard_state,
                    snapshot: snapshot_marker,
                };
                if self.to_wal.send(msg).await.is_err() {
                    return;
                }
            } else if self.last_sent_ready == self.last_persisted_ready {
                // Nothing to write and nothing in flight: it is persisted already.
                self.node.on_persist_ready(number);
                self.send_msgs(persisted_msgs);
            } else {
                self.empty_ready = number;
                if !persisted_msgs.is_empty() {
                    self.persisted_msgs.push_back((number, persisted_msgs));
                }
            }
            if let Some(msg) = to_apply {
                if self.to_apply.send(msg).await.is_err() {
                    return;
                }
            }
        }
    }

    /// Installs a snapshot received from the leader: the apply actor replaces LMDB's
    /// contents and syncs before the WAL records the marker, so a crash in between
    /// leaves either the old state with its log or the new state (never a gap).
    async fn install_snapshot(&mut self, snap: Snapshot) -> bool {
        let meta = snap.get_metadata().clone();
        let path = PathBuf::from(String::from_utf8_lossy(snap.get_data()).into_owned());
        tracing::info!(
            index = meta.index,
            term = meta.term,
            "installing snapshot from the leader"
        );
        let (done_tx, done_rx) = futures::channel::oneshot::channel();
        let msg = ToApply::InstallSnapshot {
            path: path.clone(),
            index: meta.index,
            term: meta.term,
            done: done_tx,
        };
        if self.to_apply.send(msg).await.is_err() {
            return false;
        }
        match done_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!("installing snapshot: {e}; stopping");
                eprintln!("corekv: fatal: installing snapshot: {e}");
                std::process::exit(2);
            }
            Err(_) => return false,
        }
        let _ = std::fs::remove_file(&path);
        self.node.mut_store().apply_snapshot(&meta);
        // The peer list follows the snapshot's membership.
        let members = self
            .backend
            .read()
            .and_then(|(b, txn)| crate::cluster::load_members(&b, &txn))
            .unwrap_or_default();
        {
            let mut peers = self.transport.ctx().peers.borrow_mut();
            peers.clear();
            for m in members {
                peers.insert(m.id, m.peer_urls);
            }
        }
        self.transport.sync_peers();
        true
    }
}
