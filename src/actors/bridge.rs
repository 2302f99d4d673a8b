//! Bridge from front ends on other runtimes (tonic on tokio) into a shard: a bounded
//! `futures` mpsc per shard (glommio accepts wake-ups from foreign threads), drained by
//! a task that runs each request on the shard exactly as the native front end does.

use super::network::Shard;
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
}

/// Requests queued per shard before senders wait.
pub const BRIDGE_MAILBOX: usize = 4096;

pub fn channel() -> (mpsc::Sender<BridgeRequest>, mpsc::Receiver<BridgeRequest>) {
    mpsc::channel(BRIDGE_MAILBOX)
}

/// Serves bridged requests on this shard until every sender is gone.
pub async fn serve(shard: Rc<Shard>, mut inbox: mpsc::Receiver<BridgeRequest>) {
    while let Some(req) = inbox.next().await {
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
            }
        })
        .detach();
    }
}
