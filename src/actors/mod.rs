//! Thread-per-core runtime: one glommio executor per shard, pinned to a core. Every shard
//! runs a network actor; the raft, wal and apply actors run on the shards the
//! configuration names. Actors talk only through bounded SPSC `shared_channel`s, so a
//! full mailbox pushes back on its sender instead of growing.

pub mod apply;
pub mod bridge;
pub mod lessor;
pub mod membership;
pub mod network;
pub mod peer;
pub mod peer_stream;
pub mod raft;
pub mod recipes;
pub mod wal;
pub mod watch;

use crate::error::KvError;
use crate::model::{Event, Header, LeaseTimeToLive, WalStats, WriteRequest, WriteResponse};
use ::raft::eraftpb::{Entry, HardState};
use futures::Stream;
use glommio::channels::shared_channel::{self, ConnectedReceiver, SharedReceiver, SharedSender};
use serde::{Deserialize, Serialize};
use std::pin::Pin;

/// Request id: shard in the top 16 bits, a per-shard sequence below.
pub type ReqId = u64;

pub fn shard_of(id: ReqId) -> usize {
    (id >> 48) as usize
}

/// What a raft entry carries: the write plus who is waiting for it. `epoch` is a per-boot
/// nonce so entries replayed after a restart never answer a new request with the same id.
#[derive(Serialize, Deserialize)]
pub struct Proposal {
    pub epoch: u64,
    pub id: ReqId,
    pub req: WriteRequest,
    /// The client's identity for the auth store's checks at apply time; None for the
    /// server's own requests (lease expiry, alarms, publish), which are never refused.
    pub auth: Option<crate::model::AuthUser>,
}

/// The entry format before auth (no `auth` field): a WAL written by an older corekv still
/// replays, as the server's own requests.
#[derive(Deserialize)]
struct ProposalWithoutAuth {
    epoch: u64,
    id: ReqId,
    req: WriteRequest,
}

impl Proposal {
    pub fn decode(data: &[u8]) -> Result<Proposal, postcard::Error> {
        postcard::from_bytes(data).or_else(|e| {
            let old: ProposalWithoutAuth = postcard::from_bytes(data).map_err(|_| e)?;
            Ok(Proposal {
                epoch: old.epoch,
                id: old.id,
                req: old.req,
                auth: None,
            })
        })
    }
}

/// network -> raft
pub enum ToRaft {
    Propose {
        id: ReqId,
        data: Vec<u8>,
    },
    ReadIndex {
        id: ReqId,
    },
    Status {
        id: ReqId,
    },
    /// A membership change; `context` (postcard `ProposalRef`) names the requester.
    ConfChange {
        id: ReqId,
        context: Vec<u8>,
        cc: ::raft::eraftpb::ConfChangeV2,
    },
    /// Leader only; answered with a Status once `to` leads.
    TransferLeader {
        id: ReqId,
        to: u64,
    },
}

/// Who waits for a conf change entry (its raft entry context).
#[derive(Serialize, Deserialize)]
pub struct ProposalRef {
    pub epoch: u64,
    pub id: ReqId,
}

/// raft -> wal
pub enum ToWal {
    Persist {
        number: u64,
        entries: Vec<Entry>,
        hard_state: Option<HardState>,
        /// A snapshot (index, term) installed in LMDB by this ready.
        snapshot: Option<(u64, u64)>,
    },
    /// Segments whose entries are all <= index may go (they are in a synced checkpoint).
    Release { index: u64 },
}

/// wal -> raft: everything up to ready `number` is fdatasync'ed.
pub struct Persisted {
    pub number: u64,
    pub stats: WalStats,
}

/// raft -> apply
pub enum ToApply {
    Committed {
        entries: Vec<Entry>,
        /// The configuration after each conf change entry among `entries` (None when
        /// raft refused the change: then the membership stays as it was).
        conf_states: Vec<(u64, Option<::raft::eraftpb::ConfState>)>,
    },
    /// Replace the state with a snapshot from the leader, sync, then answer.
    InstallSnapshot {
        path: std::path::PathBuf,
        index: u64,
        term: u64,
        done: futures::channel::oneshot::Sender<Result<(), String>>,
    },
    /// Answer these linearizable reads once `index` is applied.
    ReadBarrier { index: u64, ids: Vec<ReqId> },
    /// This member became (true) or stopped being (false) the leader.
    Leader(bool),
}

/// network -> apply: lease queries the lessor answers (not through raft, as etcd).
/// network -> apply: lessor queries, and online defragmentation (the apply actor is the
/// one writer, so it does it between batches).
pub enum ToLessor {
    KeepAlive { id: ReqId, lease: i64 },
    TimeToLive { id: ReqId, lease: i64, keys: bool },
    Leases { id: ReqId },
    Defragment { id: ReqId },
}

pub enum LeaseReply {
    /// TTL after renewal; 0 when the lease does not exist.
    KeepAlive(i64),
    TimeToLive(LeaseTimeToLive),
    Leases(Vec<i64>),
    Defragmented,
}

/// apply -> every network shard: what one applied batch changed. `events` is None when
/// nobody watched while it was applied; watchers then read the revisions from the store.
pub struct WatchBatch {
    pub from_rev: i64,
    pub to_rev: i64,
    pub events: Option<Vec<Event>>,
}

/// apply -> raft
pub enum ApplyToRaft {
    /// LMDB is synced up to this index: the raft log and WAL below it can go.
    Checkpointed { index: u64, term: u64 },
    /// An entry the apply actor proposes itself (lease revokes and checkpoints).
    Propose(Vec<u8>),
    /// Entries up to here are applied (best effort: a lost one is covered by the next).
    Applied(u64),
}

#[derive(Clone, Debug, Default)]
pub struct RaftStatus {
    pub leader: u64,
    pub term: u64,
    pub last_index: u64,
    pub commit: u64,
    pub wal: WalStats,
    pub is_learner: bool,
}

/// raft/apply -> network
pub enum ToNet {
    Written(Vec<(ReqId, Header, Result<WriteResponse, KvError>)>),
    ReadReady(Vec<ReqId>),
    Failed(Vec<ReqId>, KvError),
    Status(ReqId, RaftStatus),
    Lease(ReqId, Result<LeaseReply, KvError>),
    Events(std::sync::Arc<WatchBatch>),
}

pub type BoxStream<T> = Pin<Box<dyn Stream<Item = T>>>;

/// Connects a receiver and maps its messages into an actor's input type.
pub async fn connect_rx<T: Send + 'static, U: 'static>(
    rx: SharedReceiver<T>,
    f: fn(T) -> U,
) -> BoxStream<U> {
    use futures::StreamExt;
    let rx: ConnectedReceiver<T> = rx.connect().await;
    Box::pin(rx.map(f))
}

/// Both ends of one bounded SPSC mailbox, each taken by the shard that uses it.
pub type Mailbox<T> = (Option<SharedSender<T>>, Option<SharedReceiver<T>>);

/// Channel endpoints created up front and moved into the shards that own them.
pub struct Mailboxes {
    pub net_to_raft: Vec<Mailbox<ToRaft>>,
    pub raft_to_net: Vec<Mailbox<ToNet>>,
    pub apply_to_net: Vec<Mailbox<ToNet>>,
    pub net_to_apply: Vec<Mailbox<ToLessor>>,
    pub raft_to_wal: Mailbox<ToWal>,
    pub wal_to_raft: Mailbox<Persisted>,
    pub raft_to_apply: Mailbox<ToApply>,
    pub apply_to_raft: Mailbox<ApplyToRaft>,
}

/// Mailbox capacities (messages). The raft actor keeps at most `MAX_INFLIGHT_PERSISTS`
/// readies at the WAL, below both WAL mailboxes' capacity, so neither side ever blocks
/// on the other (no cycle of full mailboxes).
pub const NET_MAILBOX: usize = 4096;
pub const WAL_MAILBOX: usize = 256;
pub const MAX_INFLIGHT_PERSISTS: u64 = 128;
pub const APPLY_MAILBOX: usize = 1024;
pub const LESSOR_MAILBOX: usize = 1024;
/// The apply actor only `try_send`s here (raft also sends to apply: no waiting cycle).
pub const APPLY_TO_RAFT_MAILBOX: usize = 256;

fn pair<T: Send>(cap: usize) -> Mailbox<T> {
    let (s, r) = shared_channel::new_bounded(cap);
    (Some(s), Some(r))
}

impl Mailboxes {
    pub fn new(shards: usize) -> Mailboxes {
        assert!(shards >= 1);
        const { assert!(MAX_INFLIGHT_PERSISTS < WAL_MAILBOX as u64) };
        Mailboxes {
            net_to_raft: (0..shards).map(|_| pair(NET_MAILBOX)).collect(),
            raft_to_net: (0..shards).map(|_| pair(NET_MAILBOX)).collect(),
            apply_to_net: (0..shards).map(|_| pair(NET_MAILBOX)).collect(),
            net_to_apply: (0..shards).map(|_| pair(LESSOR_MAILBOX)).collect(),
            raft_to_wal: pair(WAL_MAILBOX),
            wal_to_raft: pair(WAL_MAILBOX),
            raft_to_apply: pair(APPLY_MAILBOX),
            apply_to_raft: pair(APPLY_TO_RAFT_MAILBOX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AuthUser, CompactionRequest};

    #[test]
    fn entries_written_before_auth_still_decode() {
        #[derive(Serialize)]
        struct Old {
            epoch: u64,
            id: ReqId,
            req: WriteRequest,
        }
        let req = WriteRequest::Compact(CompactionRequest {
            revision: 3,
            physical: false,
        });
        let old = postcard::to_allocvec(&Old {
            epoch: 7,
            id: 9,
            req: req.clone(),
        })
        .unwrap();
        let p = Proposal::decode(&old).unwrap();
        assert_eq!((p.epoch, p.id, &p.req, &p.auth), (7, 9, &req, &None));
        let who = AuthUser {
            name: "alice".into(),
            revision: 4,
        };
        let new = postcard::to_allocvec(&Proposal {
            epoch: 1,
            id: 2,
            req,
            auth: Some(who.clone()),
        })
        .unwrap();
        assert_eq!(Proposal::decode(&new).unwrap().auth, Some(who));
        assert!(Proposal::decode(&[0xff; 3]).is_err());
    }
}
