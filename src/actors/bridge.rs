//! Bridge from front ends on other runtimes (tonic on tokio) into a shard: a bounded
//! `futures` mpsc per shard (glommio accepts wake-ups from foreign threads), drained by
//! a task that runs each request on the shard exactly as the native front end does.

use super::network::Shard;
use super::watch::{StreamId, WatchOut, WatchSpec};
use crate::cluster::Member;
use crate::error::KvError;
use crate::model::*;
use futures::channel::{mpsc, oneshot};
use futures::StreamExt;
use std::rc::Rc;

type Reply<T> = oneshot::Sender<Result<T, KvError>>;
pub type Observed = mpsc::Receiver<Result<(Header, KeyValue), KvError>>;

/// Runs `work` unless the requester goes away first (a lock wait ends with its client).
async fn answer<T>(tx: Reply<T>, work: impl std::future::Future<Output = Result<T, KvError>>) {
    let mut tx = tx;
    let outcome = {
        let gone = tx.cancellation();
        futures::pin_mut!(gone);
        futures::pin_mut!(work);
        match futures::future::select(work, gone).await {
            futures::future::Either::Left((r, _)) => Some(r),
            futures::future::Either::Right(_) => None,
        }
    };
    if let Some(r) = outcome {
        let _ = tx.send(r);
    }
}

pub enum BridgeRequest {
    Range(RangeRequest, Reply<(Header, RangeResponse)>),
    Write(
        WriteRequest,
        Option<AuthUser>,
        Reply<(Header, WriteResponse)>,
    ),
    Header(Reply<Header>),
    /// etcd's Authenticate (name, password): the token.
    Authenticate(String, String, Reply<(Header, String)>),
    Defragment(Reply<Header>),
    Alarm(AlarmRequest, Reply<(Header, Vec<AlarmMember>)>),
    Status(Reply<(Header, Status)>),
    HashKv(i64, Reply<(Header, crate::storage::mvcc::KvHash)>),
    Hash(Reply<(Header, u32)>),
    Snapshot(Reply<(Header, std::path::PathBuf)>),
    LeaseGrant(i64, i64, Reply<(Header, i64, i64)>),
    LeaseRevoke(i64, Option<AuthUser>, Reply<Header>),
    LeaseKeepAlive(i64, Reply<(Header, i64)>),
    LeaseTimeToLive(i64, bool, Reply<(Header, LeaseTimeToLive)>),
    LeaseList(Reply<(Header, Vec<i64>)>),
    Lock(Vec<u8>, i64, Reply<(Header, Vec<u8>)>),
    Unlock(Vec<u8>, Reply<Header>),
    Campaign(Vec<u8>, i64, Vec<u8>, Reply<(Header, LeaderKey)>),
    Proclaim(LeaderKey, Vec<u8>, Reply<Header>),
    Resign(LeaderKey, Reply<Header>),
    Leader(Vec<u8>, Reply<(Header, KeyValue)>),
    Observe(Vec<u8>, oneshot::Sender<Observed>),
    MemberList(Reply<(Header, Vec<Member>)>),
    MemberAdd(Vec<String>, bool, Reply<(Header, Member, Vec<Member>)>),
    MemberRemove(u64, Reply<(Header, Vec<Member>)>),
    MemberUpdate(u64, Vec<String>, Reply<(Header, Vec<Member>)>),
    /// With the caller's auth token, for the leader when this member forwards it.
    MemberPromote(u64, Option<String>, Reply<(Header, Vec<Member>)>),
    MoveLeader(u64, Reply<Header>),
    /// Watch stream commands, handled in order on the stream's shard.
    Watch(StreamId, WatchCmd),
}

pub enum WatchCmd {
    Open(mpsc::Sender<WatchOut>),
    Create(WatchSpec),
    /// A create the front end refused (permission denied): answered in stream order.
    Refuse(i64, String),
    Cancel(i64),
    Progress,
    Close,
}

/// Requests queued per shard before senders wait.
pub const BRIDGE_MAILBOX: usize = 4096;

pub fn channel() -> (mpsc::Sender<BridgeRequest>, mpsc::Receiver<BridgeRequest>) {
    mpsc::channel(BRIDGE_MAILBOX)
}

/// Serves bridged requests on this shard until every sender is gone.
pub async fn serve(shard: Rc<Shard>, mut inbox: mpsc::Receiver<BridgeRequest>) {
    while let Some(req) = inbox.next().await {
        let req = match req {
            // Synchronous and order-sensitive: never reordered through a spawned task.
            BridgeRequest::Watch(stream, cmd) => {
                match cmd {
                    WatchCmd::Open(tx) => shard.watch_open(stream, tx),
                    WatchCmd::Create(spec) => shard.watch_create(stream, spec),
                    WatchCmd::Refuse(id, reason) => shard.watch_refuse(stream, id, reason),
                    WatchCmd::Cancel(id) => shard.watch_cancel(stream, id),
                    WatchCmd::Progress => shard.watch_progress(stream),
                    WatchCmd::Close => shard.watch_close(stream),
                }
                continue;
            }
            other => other,
        };
        let shard = shard.clone();
        glommio::spawn_local(async move {
            match req {
                BridgeRequest::Range(r, tx) => {
                    let _ = tx.send(shard.range(r).await);
                }
                BridgeRequest::Write(w, who, tx) => {
                    let _ = tx.send(shard.write_as(w, who).await);
                }
                BridgeRequest::Header(tx) => {
                    let _ = tx.send(shard.current_header());
                }
                BridgeRequest::Authenticate(name, password, tx) => {
                    let r = crate::api::native_auth::authenticate(&shard, name, password).await;
                    let _ = tx.send(r);
                }
                BridgeRequest::Defragment(tx) => {
                    let _ = tx.send(shard.defragment().await);
                }
                BridgeRequest::Alarm(a, tx) => {
                    let _ = tx.send(shard.alarm(a).await);
                }
                BridgeRequest::Status(tx) => {
                    let _ = tx.send(shard.status().await);
                }
                BridgeRequest::HashKv(rev, tx) => {
                    let _ = tx.send(shard.hash_kv(rev).await);
                }
                BridgeRequest::Hash(tx) => {
                    let _ = tx.send(shard.hash_all().await);
                }
                BridgeRequest::Snapshot(tx) => {
                    let _ = tx.send(shard.snapshot_copy().await);
                }
                BridgeRequest::LeaseGrant(id, ttl, tx) => {
                    let _ = tx.send(shard.lease_grant(id, ttl).await);
                }
                BridgeRequest::LeaseRevoke(id, who, tx) => {
                    let _ = tx.send(shard.lease_revoke_as(id, who).await);
                }
                BridgeRequest::LeaseKeepAlive(id, tx) => {
                    let _ = tx.send(shard.lease_keepalive(id).await);
                }
                BridgeRequest::LeaseTimeToLive(id, keys, tx) => {
                    let _ = tx.send(shard.lease_time_to_live(id, keys).await);
                }
                BridgeRequest::LeaseList(tx) => {
                    let _ = tx.send(shard.lease_list().await);
                }
                BridgeRequest::Lock(name, lease, tx) => answer(tx, shard.lock(name, lease)).await,
                BridgeRequest::Unlock(key, tx) => answer(tx, shard.unlock(key)).await,
                BridgeRequest::Campaign(name, lease, value, tx) => {
                    answer(tx, shard.campaign(name, lease, value)).await
                }
                BridgeRequest::Proclaim(leader, value, tx) => {
                    answer(tx, shard.proclaim(leader, value)).await
                }
                BridgeRequest::Resign(leader, tx) => answer(tx, shard.resign(leader)).await,
                BridgeRequest::Leader(name, tx) => answer(tx, shard.leader(&name)).await,
                BridgeRequest::Observe(name, tx) => {
                    let _ = tx.send(shard.observe(name));
                }
                BridgeRequest::MemberList(tx) => {
                    let _ = tx.send(shard.member_list());
                }
                BridgeRequest::MemberAdd(urls, learner, tx) => {
                    let _ = tx.send(shard.member_add(urls, learner).await);
                }
                BridgeRequest::MemberRemove(id, tx) => {
                    let _ = tx.send(shard.member_remove(id).await);
                }
                BridgeRequest::MemberUpdate(id, urls, tx) => {
                    let _ = tx.send(shard.member_update(id, urls).await);
                }
                BridgeRequest::MemberPromote(id, token, tx) => {
                    let _ = tx.send(shard.member_promote(id, token).await);
                }
                BridgeRequest::MoveLeader(to, tx) => {
                    let _ = tx.send(shard.move_leader(to).await);
                }
                BridgeRequest::Watch(..) => {} // handled above
            }
        })
        .detach();
    }
}
