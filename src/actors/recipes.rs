//! Locks and elections on KV + lease + watch, run on a shard exactly as etcd's
//! `clientv3/concurrency` package runs them for its v3lock/v3election services: owner
//! keys `NAME/<lease hex>` attached to the caller's lease, ordered by create revision;
//! a waiter watches the key created just before its own until it is deleted. Same key
//! layout as etcd, so etcdctl, clientv3 and corekv clients interoperate.

use super::network::Shard;
use super::watch::{StreamId, WatchOut, WatchSpec};
use crate::error::KvError;
use crate::model::*;
use futures::channel::mpsc;
use futures::StreamExt;
use std::rc::Rc;

/// Waits at most this many predecessors' deletions (each wait is one watch).
const MAX_WAITS: usize = 1 << 20;

fn owner_key(name: &[u8], lease: i64) -> Vec<u8> {
    let mut k = name.to_vec();
    k.push(b'/');
    k.extend_from_slice(format!("{lease:x}").as_bytes());
    k
}

fn prefix_of(name: &[u8]) -> Vec<u8> {
    let mut p = name.to_vec();
    p.push(b'/');
    p
}

fn first_created(prefix: &[u8], descend: bool, max_create_rev: i64) -> RangeRequest {
    RangeRequest {
        key: prefix.to_vec(),
        range_end: prefix_end(prefix),
        limit: 1,
        sort_order: if descend {
            SortOrder::Descend
        } else {
            SortOrder::Ascend
        },
        sort_target: SortTarget::Create,
        max_create_revision: max_create_rev,
        ..Default::default()
    }
}

fn create_rev_is(key: &[u8], rev: i64) -> Compare {
    Compare {
        key: key.to_vec(),
        range_end: Vec::new(),
        target: CompareTarget::Create(rev),
        result: CompareResult::Equal,
    }
}

fn range_kvs(r: Option<&ResponseOp>) -> &[KeyValue] {
    match r {
        Some(ResponseOp::Range(r)) => &r.kvs,
        _ => &[],
    }
}

/// A watch registered on this shard's hub by the server itself (recipes, native
/// clients); closed when dropped.
pub struct InternalWatch {
    shard: Rc<Shard>,
    stream: StreamId,
    rx: mpsc::Receiver<WatchOut>,
}

impl Drop for InternalWatch {
    fn drop(&mut self) {
        self.shard.watch_close(self.stream);
    }
}

impl InternalWatch {
    pub fn new(shard: &Rc<Shard>, spec: WatchSpec) -> InternalWatch {
        let stream = shard.internal_stream_id();
        let (tx, rx) = mpsc::channel(super::watch::STREAM_BUFFER);
        shard.watch_open(stream, tx);
        shard.watch_create(stream, spec);
        InternalWatch {
            shard: shard.clone(),
            stream,
            rx,
        }
    }

    /// The hub's next message for this watch (None once the hub closed the stream).
    pub async fn next_out(&mut self) -> Option<WatchOut> {
        self.rx.next().await
    }

    /// The next batch of events (skipping the created notice).
    async fn next_events(&mut self) -> Result<(Header, Vec<Event>), KvError> {
        loop {
            match self.rx.next().await {
                None => return Err(KvError::Stopped),
                // One watcher per internal stream: one entry per message.
                Some(WatchOut::Events(mut list)) => {
                    if let Some(d) = list.pop().map(|w| w.delivery) {
                        return Ok((d.header, d.events.clone()));
                    }
                }
                Some(WatchOut::Canceled {
                    compact_revision, ..
                }) if compact_revision != 0 => return Err(KvError::Compacted),
                Some(WatchOut::Canceled { .. }) => return Err(KvError::Stopped),
                Some(WatchOut::Created { error: Some(e), .. }) => return Err(KvError::Internal(e)),
                Some(_) => {}
            }
        }
    }
}

impl Shard {
    async fn txn(self: &Rc<Self>, t: TxnRequest) -> Result<(Header, TxnResponse), KvError> {
        match self.write(WriteRequest::Txn(t)).await? {
            (h, WriteResponse::Txn(r)) => Ok((h, r)),
            _ => Err(KvError::Internal("unexpected txn response".into())),
        }
    }

    /// Waits until `key` is deleted at or after revision `rev`.
    async fn wait_delete(self: &Rc<Self>, key: &[u8], rev: i64) -> Result<(), KvError> {
        let mut w = InternalWatch::new(
            self,
            WatchSpec {
                key: key.to_vec(),
                start_rev: rev,
                no_put: true,
                ..Default::default()
            },
        );
        loop {
            let (_, events) = w.next_events().await?;
            if events.iter().any(|e| e.kind == EventKind::Delete) {
                return Ok(());
            }
        }
    }

    /// etcd's waitDeletes: until no key under `prefix` was created at or below `max_rev`.
    async fn wait_deletes(self: &Rc<Self>, prefix: &[u8], max_rev: i64) -> Result<Header, KvError> {
        for _ in 0..MAX_WAITS {
            let (h, r) = self.range(first_created(prefix, true, max_rev)).await?;
            let Some(last) = r.kvs.first() else {
                return Ok(h);
            };
            self.wait_delete(&last.key, h.revision).await?;
        }
        Err(KvError::Timeout)
    }

    /// etcd's Mutex.Lock on the caller's lease: returns the owner key once held.
    pub async fn lock(
        self: &Rc<Self>,
        name: Vec<u8>,
        lease: i64,
    ) -> Result<(Header, Vec<u8>), KvError> {
        let prefix = prefix_of(&name);
        let key = owner_key(&name, lease);
        let get_owner = RequestOp::Range(first_created(&prefix, false, 0));
        let (h, r) = self
            .txn(TxnRequest {
                compare: vec![create_rev_is(&key, 0)],
                success: vec![
                    RequestOp::Put(PutRequest {
                        key: key.clone(),
                        lease,
                        ..Default::default()
                    }),
                    get_owner.clone(),
                ],
                failure: vec![
                    RequestOp::Range(RangeRequest {
                        key: key.clone(),
                        ..Default::default()
                    }),
                    get_owner,
                ],
            })
            .await?;
        let my_rev = if r.succeeded {
            h.revision
        } else {
            range_kvs(r.responses.first())
                .first()
                .map_or(h.revision, |kv| kv.create_revision)
        };
        let owner = range_kvs(r.responses.get(1)).first();
        if owner.is_none_or(|o| o.create_revision == my_rev) {
            return Ok((h, key));
        }
        let h = self.wait_deletes(&prefix, my_rev - 1).await?;
        Ok((h, key))
    }

    pub async fn unlock(self: &Rc<Self>, key: Vec<u8>) -> Result<Header, KvError> {
        let (h, _) = self
            .write(WriteRequest::DeleteRange(DeleteRangeRequest {
                key,
                ..Default::default()
            }))
            .await?;
        Ok(h)
    }

    /// etcd's Election.Campaign: returns once this lease's key is the oldest under `name`.
    pub async fn campaign(
        self: &Rc<Self>,
        name: Vec<u8>,
        lease: i64,
        value: Vec<u8>,
    ) -> Result<(Header, LeaderKey), KvError> {
        let prefix = prefix_of(&name);
        let key = owner_key(&name, lease);
        let (h, r) = self
            .txn(TxnRequest {
                compare: vec![create_rev_is(&key, 0)],
                success: vec![RequestOp::Put(PutRequest {
                    key: key.clone(),
                    value: value.clone(),
                    lease,
                    ..Default::default()
                })],
                failure: vec![RequestOp::Range(RangeRequest {
                    key: key.clone(),
                    ..Default::default()
                })],
            })
            .await?;
        let mut leader = LeaderKey {
            name,
            key,
            rev: h.revision,
            lease,
        };
        if !r.succeeded {
            if let Some(kv) = range_kvs(r.responses.first()).first() {
                leader.rev = kv.create_revision;
                if kv.value != value {
                    if let Err(e) = self.proclaim(leader.clone(), value).await {
                        let _ = self.resign(leader).await;
                        return Err(e);
                    }
                }
            }
        }
        self.wait_deletes(&prefix, leader.rev - 1).await?;
        Ok((h, leader))
    }

    pub async fn proclaim(
        self: &Rc<Self>,
        leader: LeaderKey,
        value: Vec<u8>,
    ) -> Result<Header, KvError> {
        let (h, r) = self
            .txn(TxnRequest {
                compare: vec![create_rev_is(&leader.key, leader.rev)],
                success: vec![RequestOp::Put(PutRequest {
                    key: leader.key.clone(),
                    value,
                    lease: leader.lease,
                    ..Default::default()
                })],
                failure: Vec::new(),
            })
            .await?;
        if !r.succeeded {
            return Err(KvError::ElectionNotLeader);
        }
        Ok(h)
    }

    pub async fn resign(self: &Rc<Self>, leader: LeaderKey) -> Result<Header, KvError> {
        let (h, _) = self
            .txn(TxnRequest {
                compare: vec![create_rev_is(&leader.key, leader.rev)],
                success: vec![RequestOp::DeleteRange(DeleteRangeRequest {
                    key: leader.key.clone(),
                    ..Default::default()
                })],
                failure: Vec::new(),
            })
            .await?;
        Ok(h)
    }

    /// The current leader's key-value (the oldest key under `name`).
    pub async fn leader(self: &Rc<Self>, name: &[u8]) -> Result<(Header, KeyValue), KvError> {
        let (h, r) = self
            .range(first_created(&prefix_of(name), false, 0))
            .await?;
        let kv = r.kvs.into_iter().next().ok_or(KvError::ElectionNoLeader)?;
        Ok((h, kv))
    }

    /// etcd's Election.Observe: the leader now, then every change of leader or of its
    /// value, until the receiver is dropped.
    pub fn observe(
        self: &Rc<Self>,
        name: Vec<u8>,
    ) -> mpsc::Receiver<Result<(Header, KeyValue), KvError>> {
        let (mut tx, rx) = mpsc::channel(16);
        let me = self.clone();
        glommio::spawn_local(async move {
            if let Err(e) = me.observe_into(&name, &mut tx).await {
                let _ = futures::SinkExt::send(&mut tx, Err(e)).await;
            }
        })
        .detach();
        rx
    }

    async fn observe_into(
        self: &Rc<Self>,
        name: &[u8],
        tx: &mut mpsc::Sender<Result<(Header, KeyValue), KvError>>,
    ) -> Result<(), KvError> {
        use futures::SinkExt;
        let prefix = prefix_of(name);
        // Each round follows one leader until its key is deleted; the loop ends when
        // the observer goes away.
        while !tx.is_closed() {
            let (h, r) = self.range(first_created(&prefix, false, 0)).await?;
            let (mut hdr, kv) = match r.kvs.into_iter().next() {
                Some(kv) => (h, kv),
                None => {
                    let mut w = InternalWatch::new(
                        self,
                        WatchSpec {
                            key: prefix.clone(),
                            range_end: prefix_end(&prefix),
                            start_rev: h.revision,
                            no_delete: true,
                            ..Default::default()
                        },
                    );
                    let (hdr, events) = w.next_events().await?;
                    match events.into_iter().next() {
                        Some(e) => (hdr, e.kv),
                        None => continue,
                    }
                }
            };
            if tx.send(Ok((hdr, kv.clone()))).await.is_err() {
                return Ok(());
            }
            let mut w = InternalWatch::new(
                self,
                WatchSpec {
                    key: kv.key.clone(),
                    start_rev: hdr.revision + 1,
                    ..Default::default()
                },
            );
            'follow: loop {
                let (h, events) = w.next_events().await?;
                for e in events {
                    if e.kind == EventKind::Delete {
                        break 'follow;
                    }
                    hdr = h;
                    if tx.send(Ok((hdr, e.kv))).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }
}
