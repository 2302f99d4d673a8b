//! etcd's Watch service over gRPC: one bidirectional stream carries many watches. The
//! stream lives on one shard's watch hub (chosen round robin when it opens); requests
//! are forwarded to it in order and its bounded output becomes the response stream.
//!
//! The service is written out here rather than generated: its response body sends a
//! revision's events to N watchers as one shared encoding with each watcher's id spliced
//! in front (protobuf fields may come in any order), so fan-out costs one encode per
//! revision, and writes whatever the hub has queued as one chunk.

use super::v3rpc::{header, kv_to_pb, to_status, Gateway};
use crate::actors::bridge::{BridgeRequest, WatchCmd};
use crate::actors::watch::{Delivery, StreamId, WatchOut, WatchSpec, WatcherEvents, STREAM_BUFFER};
use crate::error::KvError;
use crate::etcdpb::etcdserverpb as pb;
use crate::etcdpb::mvccpb;
use crate::model::{Event, EventKind, PermType};
use bytes::{BufMut, Bytes, BytesMut};
use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use http_body::Frame;
use prost::Message;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use tonic::codegen::{http, Body, BoxFuture, StdError};
use tonic::{Request, Status, Streaming};

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

/// WatchResponse fields `header` and `events` of a delivery, encoded by the first stream
/// that sends it.
fn shared_body(d: &Delivery) -> &Bytes {
    d.encoded.get_or_init(|| {
        let r = pb::WatchResponse {
            header: header(&d.header),
            events: d.events.iter().cloned().map(event_to_pb).collect(),
            ..Default::default()
        };
        Bytes::from(r.encode_to_vec())
    })
}

/// WatchResponse's field number for `watch_id`.
const WATCH_ID_FIELD: u32 = 2;
/// gRPC's message prefix: a compressed flag byte and a big-endian u32 length.
const GRPC_PREFIX_BYTES: usize = 5;
/// A response body chunk is cut once it holds this much (more messages wait for the
/// next chunk; h2 splits chunks into frames by itself).
const CHUNK_BYTES: usize = 64 << 10;

fn put_grpc_prefix(buf: &mut BytesMut, len: usize) {
    buf.put_u8(0);
    buf.put_u32(len as u32);
}

fn put_response(buf: &mut BytesMut, r: &pb::WatchResponse) {
    let len = r.encoded_len();
    buf.reserve(GRPC_PREFIX_BYTES + len);
    put_grpc_prefix(buf, len);
    r.encode_raw(buf);
}

/// Appends one hub message as gRPC messages (etcd's WatchResponses). A delivery goes out
/// as its shared encoding with each watcher's id in front (protobuf fields may come in
/// any order), so a revision fanned out to N watchers costs N copies, not N encodes;
/// what would need fragmenting is built per watcher.
pub fn put_messages(buf: &mut BytesMut, m: WatchOut, max_bytes: usize) {
    let WatchOut::Events(list) = m else {
        for r in to_pb(m, max_bytes) {
            put_response(buf, &r);
        }
        return;
    };
    for w in list {
        let body_len = shared_body(&w.delivery).len();
        // + the watch id field (at most 11 bytes), as watcher_to_pb measures the whole
        // response.
        if w.fragment && w.delivery.events.len() >= 2 && body_len + 11 >= max_bytes {
            for r in watcher_to_pb(w, max_bytes) {
                put_response(buf, &r);
            }
            continue;
        }
        // proto3 leaves a zero field out, as prost's own encoding would.
        let id_len = if w.watch_id != 0 {
            prost::encoding::int64::encoded_len(WATCH_ID_FIELD, &w.watch_id)
        } else {
            0
        };
        buf.reserve(GRPC_PREFIX_BYTES + id_len + body_len);
        put_grpc_prefix(buf, id_len + body_len);
        if w.watch_id != 0 {
            prost::encoding::int64::encode(WATCH_ID_FIELD, &w.watch_id, buf);
        }
        buf.put_slice(shared_body(&w.delivery));
    }
}

/// The Watch call's response body: the hub's messages for this stream as gRPC
/// messages, as many as are waiting written into one chunk, then grpc-status 0 when the
/// hub closes the stream. Back-pressure: hyper polls it only when the HTTP/2 stream has
/// window, so a client that stops reading fills the hub's bounded channel and its
/// watchers fall back to catching up from the store.
pub struct WatchBody {
    rx: mpsc::Receiver<WatchOut>,
    max_bytes: usize,
    ended: bool,
    _close: CloseOnDrop,
}

impl Body for WatchBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let mut buf = BytesMut::new();
        // Bounded by CHUNK_BYTES and by what the channel holds.
        while buf.len() < CHUNK_BYTES {
            match self.rx.poll_next_unpin(cx) {
                Poll::Ready(Some(m)) => put_messages(&mut buf, m, self.max_bytes),
                Poll::Ready(None) if buf.is_empty() => {
                    self.ended = true;
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                Poll::Ready(None) | Poll::Pending => break,
            }
        }
        if buf.is_empty() {
            return Poll::Pending; // the channel has our waker
        }
        Poll::Ready(Some(Ok(Frame::data(buf.freeze()))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

/// The `etcdserverpb.Watch` service, written out: tonic decodes the requests; the
/// response body is `WatchBody`, which frames the messages itself.
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
        let gateway = self.gateway.clone();
        let limit = self.max_decoding_bytes;
        Box::pin(async move {
            // No compression is offered (as tonic answers without its compression
            // features).
            if let Some(enc) = req.headers().get("grpc-encoding") {
                if enc.as_bytes() != b"identity" {
                    let msg = format!(
                        "Content is compressed with `{}` which isn't supported",
                        String::from_utf8_lossy(enc.as_bytes())
                    );
                    return Ok(Status::unimplemented(msg).into_http());
                }
            }
            let req = Request::from_http(req.map(|body| {
                Streaming::new_request(
                    tonic_prost::ProstDecoder::<pb::WatchRequest>::default(),
                    body,
                    None,
                    Some(limit),
                )
            }));
            Ok(match gateway.watch(req).await {
                Ok(body) => {
                    let mut resp = http::Response::new(tonic::body::Body::new(body));
                    resp.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/grpc"),
                    );
                    resp
                }
                Err(status) => status.into_http(),
            })
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
    async fn watch(&self, req: Request<Streaming<pb::WatchRequest>>) -> Result<WatchBody, Status> {
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
        Ok(WatchBody {
            rx,
            max_bytes: self.max_request_bytes(),
            ended: false,
            _close: CloseOnDrop { stream, bridge },
        })
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

    /// The gRPC messages in `buf`, decoded.
    fn decode_all(mut buf: &[u8]) -> Vec<pb::WatchResponse> {
        let mut out = Vec::new();
        while !buf.is_empty() {
            assert_eq!(buf[0], 0, "uncompressed");
            let len = u32::from_be_bytes(buf[1..5].try_into().unwrap()) as usize;
            out.push(pb::WatchResponse::decode(&buf[5..5 + len]).unwrap());
            buf = &buf[5 + len..];
        }
        out
    }

    /// A shared delivery framed for several watchers (zero, large, negative ids) decodes
    /// to exactly the responses built for each watcher alone, and is encoded once.
    #[test]
    fn shared_messages_decode_as_per_watcher_responses() {
        let header = Header {
            cluster_id: 7,
            member_id: 9,
            revision: 42,
            raft_term: 3,
        };
        let delivery = Delivery::new(header, vec![event("a", 41, true), event("b", 42, false)]);
        let list: Vec<WatcherEvents> = [0, 1, 300, i64::MAX, -1]
            .into_iter()
            .map(|watch_id| WatcherEvents {
                watch_id,
                delivery: delivery.clone(),
                fragment: false,
            })
            .collect();
        let out = WatchOut::Events(list);
        let mut buf = BytesMut::new();
        put_messages(&mut buf, out.clone(), 1 << 20);
        assert_eq!(decode_all(&buf), to_pb(out, 1 << 20));
        assert!(
            delivery.encoded.get().is_some(),
            "encoded once, then reused"
        );
    }

    /// The response body: whatever is queued goes out as one chunk of gRPC messages; an
    /// empty open stream is pending (woken by the next message); a stream the hub closed
    /// ends with grpc-status 0 as trailers; dropping the body tells the hub to close.
    #[test]
    fn body_chunks_what_is_queued_and_ends_with_ok_trailers() {
        let (mut tx, rx) = mpsc::channel(8);
        let (bridge, mut bridge_rx) = mpsc::channel(8);
        let mut body = WatchBody {
            rx,
            max_bytes: 1 << 20,
            ended: false,
            _close: CloseOnDrop { stream: 7, bridge },
        };
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut body).poll_frame(&mut cx).is_pending());
        let created = WatchOut::Created {
            header: Header::default(),
            watch_id: 3,
            error: None,
        };
        let delivery = Delivery::new(Header::default(), vec![event("a", 5, false)]);
        let events = WatchOut::Events(vec![WatcherEvents {
            watch_id: 3,
            delivery,
            fragment: false,
        }]);
        tx.try_send(created.clone()).unwrap();
        tx.try_send(events.clone()).unwrap();
        let Poll::Ready(Some(Ok(frame))) = Pin::new(&mut body).poll_frame(&mut cx) else {
            panic!("a data frame");
        };
        let data = frame.into_data().expect("data");
        let mut want = to_pb(created, 1 << 20);
        want.extend(to_pb(events, 1 << 20));
        assert_eq!(decode_all(&data), want, "both messages in one chunk");
        drop(tx);
        let Poll::Ready(Some(Ok(frame))) = Pin::new(&mut body).poll_frame(&mut cx) else {
            panic!("trailers");
        };
        let trailers = frame.into_trailers().expect("trailers");
        assert_eq!(trailers.get("grpc-status").unwrap(), "0");
        assert!(body.is_end_stream());
        assert!(matches!(
            Pin::new(&mut body).poll_frame(&mut cx),
            Poll::Ready(None)
        ));
        drop(body);
        assert!(matches!(
            bridge_rx.try_recv(),
            Ok(BridgeRequest::Watch(7, WatchCmd::Close))
        ));
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
        let mut buf = BytesMut::new();
        put_messages(&mut buf, out, 100);
        let got = decode_all(&buf);
        assert!(got.len() > 1);
        let mut n = 0;
        for (i, r) in got.iter().enumerate() {
            assert_eq!(r.fragment, i + 1 < got.len());
            assert_eq!(r.watch_id, 5);
            n += r.events.len();
        }
        assert_eq!(n, 10);
    }
}
