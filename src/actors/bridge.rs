//! Bridge from front ends on other runtimes (tonic on tokio) into a shard: a bounded
//! `futures` mpsc per shard (glommio accepts wake-ups from foreign threads), drained by
//! a task that runs each request on the shard exactly as the native front end does.

use super::network::Shard;
use super::watch::{StreamId, WatchOut, WatchSpec};
use crate::error::KvError;
use crate::model::*;
use futures::channel::{mpsc, oneshot};
use futures::StreamExt;
use std::rc::Rc;

type Reply<T> = oneshot::Sender<Result<T, KvError>>;

pub enum BridgeRequest {
    Range(RangeRequest, Reply<(Header, RangeResponse)>),
    Write(WriteRequest, Reply<(Header, WriteResponse)>),
    Alarm(AlarmRequest, Reply<(Header, Vec<AlarmMember>)>),
    Status(Reply<(Header, Status)>),
    LeaseGrant(i64, i64, Reply<(Header, i64, i64)>),
    LeaseRevoke(i64, Reply<Header>),
    LeaseKeepAlive(i64, Reply<(Header, i64)>),
    LeaseTimeToLive(i64, bool, Reply<(Header, LeaseTimeToLive)>),
    LeaseList(Reply<(Header, Vec<i64>)>),
    /// Watch stream commands, handled in order on the stream's shard.
    Watch(StreamId, WatchCmd),
}

pub enum WatchCmd {
    Open(mpsc::Sender<WatchOut>),
    Create(WatchSpec),
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
                BridgeRequest::Write(w, tx) => {
                    let _ = tx.send(shard.write(w).await);
                }
                BridgeRequest::Alarm(a, tx) => {
                    let _ = tx.send(shard.alarm(a).await);
                }
                BridgeRequest::Status(tx) => {
                    let _ = tx.send(shard.status().await);
                }
                BridgeRequest::LeaseGrant(id, ttl, tx) => {
                    let _ = tx.send(shard.lease_grant(id, ttl).await);
                }
                BridgeRequest::LeaseRevoke(id, tx) => {
                    let _ = tx.send(shard.lease_revoke(id).await);
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
                BridgeRequest::Watch(..) => {} // handled above
            }
        })
        .detach();
    }
}
