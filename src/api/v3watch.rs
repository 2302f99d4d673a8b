//! etcd's Watch service over gRPC: one bidirectional stream carries many watches. The
//! stream lives on one shard's watch hub (chosen round robin when it opens); requests
//! are forwarded to it in order and its bounded output becomes the response stream.
//!
//! The service is written out here rather than generated: its encoder sends a revision's
//! events to N watchers as one shared encoding with each watcher's id spliced in front
//! (protobuf fields may come in any order), so fan-out costs one encode per revision.

use super::v3rpc::{header, kv_to_pb, to_status, BoxStream, Gateway};
use crate::actors::bridge::{BridgeRequest, WatchCmd};
use crate::actors::watch::{Delivery, StreamId, WatchOut, WatchSpec, WatcherEvents, STREAM_BUFFER};
use crate::error::KvError;
use crate::etcdpb::etcdserverpb as pb;
use crate::etcdpb::mvccpb;
use crate::model::{Event, EventKind, PermType};
use bytes::{BufMut, Bytes};
use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use prost::Message;
use std::sync::atomic::{AtomicU64, Ordering};
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::codegen::{http, Body, BoxFuture, StdError};
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

/// One hub message as etcd's responses.
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
        WatchOut::Events(list) => list
            .into_iter()
            .flat_map(|w| watcher_to_pb(w, max_bytes))
            .collect(),
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

/// One watcher's events as etcd's responses; a large revision is split into fragments
/// when the watcher asked for them (etcd's sendFragments).
fn watcher_to_pb(w: WatcherEvents, max_bytes: usize) -> Vec<pb::WatchResponse> {
    let WatcherEvents {
        watch_id,
        delivery,
        fragment,
    } = w;
    let h = delivery.header;
    let events: Vec<mvccpb::Event> = delivery.events.iter().cloned().map(event_to_pb).collect();
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

/// What the Watch stream sends: a response built for one watcher, or a watcher's id in
/// front of a delivery encoded once for every watcher that gets it.
pub enum WatchFrame {
    Single(pb::WatchResponse),
    Shared { watch_id: i64, body: Bytes },
}

/// WatchResponse fields `header` and `events` of a delivery, encoded by the first stream
/// that sends it.
fn shared_body(d: &Delivery) -> Bytes {
    d.encoded
        .get_or_init(|| {
            let r = pb::WatchResponse {
                header: header(&d.header),
                events: d.events.iter().cloned().map(event_to_pb).collect(),
                ..Default::default()
            };
            Bytes::from(r.encode_to_vec())
        })
        .clone()
}

/// One hub message as frames; what would need fragmenting goes the per-watcher way.
pub fn to_frames(m: WatchOut, max_bytes: usize) -> Vec<WatchFrame> {
    let WatchOut::Events(list) = m else {
        return to_pb(m, max_bytes)
            .into_iter()
            .map(WatchFrame::Single)
            .collect();
    };
    let mut frames = Vec::with_capacity(list.len());
    for w in list {
        let body = shared_body(&w.delivery);
        // + the watch id field (at most 11 bytes), as watcher_to_pb measures the whole
        // response.
        if !w.fragment || w.delivery.events.len() < 2 || body.len() + 11 < max_bytes {
            frames.push(WatchFrame::Shared {
                watch_id: w.watch_id,
                body,
            });
        } else {
            frames.extend(
                watcher_to_pb(w, max_bytes)
                    .into_iter()
                    .map(WatchFrame::Single),
            );
        }
    }
    frames
}

/// WatchResponse's field number for `watch_id`.
const WATCH_ID_FIELD: u32 = 2;

pub struct WatchEncoder;

impl Encoder for WatchEncoder {
    type Item = WatchFrame;
    type Error = Status;

    fn encode(&mut self, item: WatchFrame, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        write_frame(item, buf)
    }
}

fn write_frame(item: WatchFrame, buf: &mut impl BufMut) -> Result<(), Status> {
    match item {
        WatchFrame::Single(r) => r.encode(buf).map_err(|e| Status::internal(e.to_string())),
        WatchFrame::Shared { watch_id, body } => {
            // proto3 leaves a zero field out, as prost's own encoding would.
            if watch_id != 0 {
                prost::encoding::int64::encode(WATCH_ID_FIELD, &watch_id, buf);
            }
            buf.put_slice(&body);
            Ok(())
        }
    }
}

#[derive(Clone, Copy, Default)]
pub struct WatchCodec;

impl Codec for WatchCodec {
    type Encode = WatchFrame;
    type Decode = pb::WatchRequest;
    type Encoder = WatchEncoder;
    type Decoder = tonic_prost::ProstDecoder<pb::WatchRequest>;

    fn encoder(&mut self) -> WatchEncoder {
        WatchEncoder
    }
    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

/// The `etcdserverpb.Watch` service (what tonic would generate, with `WatchCodec`).
#[derive(Clone)]
pub struct WatchService {
    gateway: Gateway,
    max_decoding_bytes: usize,
}

impl WatchService {
    pub fn new(gateway: Gateway, max_decoding_bytes: usize) -> Self {
        WatchService {
            gateway,
            max_decoding_bytes,
        }
    }
}

impl tonic::server::NamedService for WatchService {
    const NAME: &'static str = "etcdserverpb.Watch";
}

struct WatchCall(Gateway);

impl tonic::server::StreamingService<pb::WatchRequest> for WatchCall {
    type Response = WatchFrame;
    type ResponseStream = BoxStream<WatchFrame>;
    type Future = BoxFuture<Response<BoxStream<WatchFrame>>, Status>;

    fn call(&mut self, req: Request<Streaming<pb::WatchRequest>>) -> Self::Future {
        let gateway = self.0.clone();
        Box::pin(async move { gateway.watch(req).await })
    }
}

impl<B> tonic::codegen::Service<http::Request<B>> for WatchService
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), std::convert::Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(
        &mut self,
        req: http::Request<B>,
    ) -> BoxFuture<http::Response<tonic::body::Body>, std::convert::Infallible> {
        if req.uri().path() != "/etcdserverpb.Watch/Watch" {
            return Box::pin(async {
                Ok(Status::unimplemented("unknown method").into_http::<tonic::body::Body>())
            });
        }
        let call = WatchCall(self.gateway.clone());
        let limit = self.max_decoding_bytes;
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(WatchCodec)
                .apply_max_message_size_config(Some(limit), None);
            Ok(grpc.streaming(call, req).await)
        })
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

impl Gateway {
    async fn watch(
        &self,
        req: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<BoxStream<WatchFrame>>, Status> {
        let stream = NEXT_STREAM.fetch_add(1, Ordering::Relaxed);
        let mut bridge = self.shard_sender(self.pick_shard());
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        bridge
            .send(BridgeRequest::Watch(stream, WatchCmd::Open(tx)))
            .await
            .map_err(|_| to_status(KvError::Stopped))?;
        let who = self.caller(&req).await?;
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
            futures::stream::iter(to_frames(m, max_bytes).into_iter().map(Ok))
        });
        Ok(Response::new(Box::pin(out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Header, KeyValue};

    fn event(key: &str, rev: i64, prev: bool) -> Event {
        let kv = |v: &str| KeyValue {
            key: key.into(),
            value: v.into(),
            create_revision: 2,
            mod_revision: rev,
            version: rev - 1,
            lease: 0,
        };
        Event {
            kind: EventKind::Put,
            kv: kv("new"),
            prev_kv: prev.then(|| kv("old")),
        }
    }

    /// A shared frame decodes, for every watch id (zero, large, negative), to exactly the
    /// response built for that watcher alone.
    #[test]
    fn shared_frames_decode_as_per_watcher_responses() {
        let header = Header {
            cluster_id: 7,
            member_id: 9,
            revision: 42,
            raft_term: 3,
        };
        let delivery = Delivery::new(header, vec![event("a", 41, true), event("b", 42, false)]);
        for watch_id in [0, 1, 300, i64::MAX, -1] {
            let out = WatchOut::Events(vec![WatcherEvents {
                watch_id,
                delivery: delivery.clone(),
                fragment: false,
            }]);
            let frames = to_frames(out.clone(), 1 << 20);
            assert_eq!(frames.len(), 1);
            assert!(matches!(frames[0], WatchFrame::Shared { .. }));
            let mut wire = Vec::new();
            for f in frames {
                write_frame(f, &mut wire).unwrap();
            }
            let got = pb::WatchResponse::decode(wire.as_slice()).unwrap();
            assert_eq!(vec![got], to_pb(out, 1 << 20), "watch id {watch_id}");
        }
        assert!(
            delivery.encoded.get().is_some(),
            "encoded once, then reused"
        );
    }

    /// A watcher that asked for fragments still gets them from a shared delivery.
    #[test]
    fn fragmenting_watchers_get_fragments() {
        let events: Vec<Event> = (0..10).map(|i| event("k", 10 + i, false)).collect();
        let delivery = Delivery::new(Header::default(), events);
        let out = WatchOut::Events(vec![WatcherEvents {
            watch_id: 5,
            delivery,
            fragment: true,
        }]);
        let frames = to_frames(out, 100);
        assert!(frames.len() > 1);
        let mut n = 0;
        for (i, f) in frames.iter().enumerate() {
            let WatchFrame::Single(r) = f else {
                panic!("fragments are built per watcher");
            };
            assert_eq!(r.fragment, i + 1 < frames.len());
            n += r.events.len();
        }
        assert_eq!(n, 10);
    }
}
