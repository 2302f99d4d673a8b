//! etcd's Watch service over gRPC: one bidirectional stream carries many watches. The
//! stream lives on one shard's watch hub (chosen round robin when it opens); requests
//! are forwarded to it in order and its bounded output becomes the response stream.

use super::v3rpc::{header, kv_to_pb, to_status, BoxStream, Gateway};
use crate::actors::bridge::{BridgeRequest, WatchCmd};
use crate::actors::watch::{StreamId, WatchOut, WatchSpec, STREAM_BUFFER};
use crate::error::KvError;
use crate::etcdpb::etcdserverpb as pb;
use crate::etcdpb::etcdserverpb::watch_server::Watch;
use crate::etcdpb::mvccpb;
use crate::model::{Event, EventKind, PermType};
use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use prost::Message;
use std::sync::atomic::{AtomicU64, Ordering};
use tonic::{Request, Response, Status, Streaming};

pub(crate) static NEXT_STREAM: AtomicU64 = AtomicU64::new(1);

pub fn spec_from_pb(c: pb::WatchCreateRequest) -> WatchSpec {
    WatchSpec {
        key: c.key,
        range_end: c.range_end,
        start_rev: c.start_revision,
        watch_id: c.watch_id,
        prev_kv: c.prev_kv,
        no_put: c.filters.contains(&0),
        no_delete: c.filters.contains(&1),
        progress_notify: c.progress_notify,
        fragment: c.fragment,
    }
}

pub fn event_to_pb(e: Event) -> mvccpb::Event {
    mvccpb::Event {
        r#type: match e.kind {
            EventKind::Put => 0,
            EventKind::Delete => 1,
        },
        kv: Some(kv_to_pb(e.kv)),
        prev_kv: e.prev_kv.map(kv_to_pb),
    }
}

/// One hub message as etcd's responses; a large revision is split into fragments when
/// the watcher asked for them (etcd's sendFragments).
pub fn to_pb(m: WatchOut, max_bytes: usize) -> Vec<pb::WatchResponse> {
    match m {
        WatchOut::Created {
            header: h,
            watch_id,
            error,
        } => vec![pb::WatchResponse {
            header: header(&h),
            watch_id,
            created: true,
            canceled: error.is_some(),
            cancel_reason: error.unwrap_or_default(),
            ..Default::default()
        }],
        WatchOut::Events {
            header: h,
            watch_id,
            events,
            fragment,
        } => {
            let events: Vec<mvccpb::Event> = events.into_iter().map(event_to_pb).collect();
            let whole = pb::WatchResponse {
                header: header(&h),
                watch_id,
                events,
                ..Default::default()
            };
            if !fragment || whole.events.len() < 2 || whole.encoded_len() < max_bytes {
                return vec![whole];
            }
            let mut out: Vec<pb::WatchResponse> = Vec::new();
            let mut chunk: Vec<mvccpb::Event> = Vec::new();
            let mut size = 0;
            for ev in whole.events {
                let len = ev.encoded_len();
                if !chunk.is_empty() && size + len > max_bytes {
                    out.push(pb::WatchResponse {
                        header: header(&h),
                        watch_id,
                        fragment: true,
                        events: std::mem::take(&mut chunk),
                        ..Default::default()
                    });
                    size = 0;
                }
                size += len;
                chunk.push(ev);
            }
            out.push(pb::WatchResponse {
                header: header(&h),
                watch_id,
                events: chunk,
                ..Default::default()
            });
            out
        }
        WatchOut::Canceled {
            header: h,
            watch_id,
            compact_revision,
            reason,
        } => vec![pb::WatchResponse {
            header: header(&h),
            watch_id,
            canceled: true,
            compact_revision,
            cancel_reason: reason,
            ..Default::default()
        }],
        WatchOut::Progress {
            header: h,
            watch_id,
        } => vec![pb::WatchResponse {
            header: header(&h),
            watch_id,
            ..Default::default()
        }],
    }
}

/// A status as Go's grpc prints it (etcd puts this text in a refused watch's reason).
pub(crate) fn grpc_error_text(e: &Status) -> String {
    let code = match e.code() {
        tonic::Code::PermissionDenied => "PermissionDenied",
        tonic::Code::InvalidArgument => "InvalidArgument",
        tonic::Code::Unauthenticated => "Unauthenticated",
        tonic::Code::FailedPrecondition => "FailedPrecondition",
        _ => "Unknown",
    };
    format!("rpc error: code = {code} desc = {}", e.message())
}

/// Closes the hub's side when tonic drops the response stream (client gone).
pub(crate) struct CloseOnDrop {
    pub(crate) stream: StreamId,
    pub(crate) bridge: mpsc::Sender<BridgeRequest>,
}

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        let msg = BridgeRequest::Watch(self.stream, WatchCmd::Close);
        if let Err(e) = self.bridge.try_send(msg) {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let mut bridge = self.bridge.clone();
                let msg = e.into_inner();
                rt.spawn(async move {
                    let _ = bridge.send(msg).await;
                });
            }
        }
    }
}

#[tonic::async_trait]
impl Watch for Gateway {
    async fn watch(
        &self,
        req: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<BoxStream<pb::WatchResponse>>, Status> {
        let stream = NEXT_STREAM.fetch_add(1, Ordering::Relaxed);
        let mut bridge = self.shard_sender(self.pick_shard());
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        bridge
            .send(BridgeRequest::Watch(stream, WatchCmd::Open(tx)))
            .await
            .map_err(|_| to_status(KvError::Stopped))?;
        let who = self.caller(&req)?;
        let gateway = self.clone();
        let mut inbound = req.into_inner();
        let mut forward = bridge.clone();
        tokio::spawn(async move {
            // Bounded by the client's stream; an error or end of input stops reading
            // (as etcd, the responses keep flowing after the client half-closes).
            while let Some(Ok(r)) = inbound.next().await {
                use pb::watch_request::RequestUnion as U;
                let cmd = match r.request_union {
                    Some(U::CreateRequest(c)) => {
                        let spec = spec_from_pb(c);
                        let key: &[u8] = if spec.key.is_empty() { &[0] } else { &spec.key };
                        match gateway.check_range(&who, key, &spec.range_end, PermType::Read) {
                            Ok(()) => WatchCmd::Create(spec),
                            Err(e) => WatchCmd::Refuse(spec.watch_id, grpc_error_text(&e)),
                        }
                    }
                    Some(U::CancelRequest(c)) => WatchCmd::Cancel(c.watch_id),
                    Some(U::ProgressRequest(_)) => WatchCmd::Progress,
                    None => continue,
                };
                if forward
                    .send(BridgeRequest::Watch(stream, cmd))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        let guard = CloseOnDrop { stream, bridge };
        let max_bytes = self.max_request_bytes();
        let out = rx.flat_map(move |m| {
            let _keep = &guard;
            futures::stream::iter(to_pb(m, max_bytes).into_iter().map(Ok))
        });
        Ok(Response::new(Box::pin(out)))
    }
}
