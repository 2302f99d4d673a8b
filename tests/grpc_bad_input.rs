//! Bad input on the etcd gRPC port gets a clear gRPC status and leaves the server serving:
//! malformed protobuf, an oversized message, an unknown method, garbage bytes, and a
//! connection cut in the middle of a request.

mod common;
use common::*;
use corekv::etcdpb::etcdserverpb::{kv_client::KvClient, PutRequest, RangeRequest};
use std::io::Write;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// Sends and receives raw bytes, so a test can put anything on the wire.
#[derive(Default, Clone)]
struct RawCodec;
struct RawEnc;
struct RawDec;

impl Encoder for RawEnc {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        let mut v = vec![0u8; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEnc;
    type Decoder = RawDec;
    fn encoder(&mut self) -> RawEnc {
        RawEnc
    }
    fn decoder(&mut self) -> RawDec {
        RawDec
    }
}

async fn raw_call(ep: &str, path: &'static str, body: Vec<u8>) -> Result<Vec<u8>, tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{ep}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(64 << 20);
    grpc.ready().await.expect("ready");
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    grpc.unary(tonic::Request::new(body), path, RawCodec)
        .await
        .map(|r| r.into_inner())
}

async fn still_serves(ep: &str, key: &str) {
    let mut kv = KvClient::connect(format!("http://{ep}"))
        .await
        .expect("connect");
    kv.put(PutRequest {
        key: key.into(),
        value: b"ok".to_vec(),
        ..Default::default()
    })
    .await
    .expect("put after bad input");
    let got = kv
        .range(RangeRequest {
            key: key.into(),
            ..Default::default()
        })
        .await
        .expect("range after bad input")
        .into_inner();
    assert_eq!(got.kvs[0].value, b"ok");
}

#[test]
fn grpc_bad_input_gets_clear_status_and_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(&dir.path().join("d"), &SMALL_WAL);
    let ep = s.grpc_endpoint();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Malformed protobuf: a field header promising more bytes than follow.
        let err = raw_call(
            &ep,
            "/etcdserverpb.KV/Put",
            vec![0x0a, 0xff, 0xff, 0x03, 0x01],
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Internal, "{err:?}");
        assert!(err.message().contains("decode"), "{err:?}");

        // Over --max-request-bytes + gRPC overhead: refused before decoding.
        let err = raw_call(&ep, "/etcdserverpb.KV/Put", vec![0u8; 3 << 20])
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");

        // A valid message whose request is too large for etcd's limit.
        let big = PutRequest {
            key: b"big".to_vec(),
            value: vec![b'x'; 1_700_000],
            ..Default::default()
        };
        let mut kv = KvClient::connect(format!("http://{ep}")).await.unwrap();
        let err = kv.put(big).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert_eq!(err.message(), "etcdserver: request is too large");

        // etcd's errors with etcd's codes.
        let err = kv.put(PutRequest::default()).await.unwrap_err();
        assert_eq!(
            (err.code(), err.message()),
            (
                tonic::Code::InvalidArgument,
                "etcdserver: key is not provided"
            )
        );
        let err = kv
            .range(RangeRequest {
                key: b"k".to_vec(),
                revision: 1_000_000,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::OutOfRange);
        assert_eq!(
            err.message(),
            "etcdserver: mvcc: required revision is a future revision"
        );

        // Unknown method and unknown service.
        let err = raw_call(&ep, "/etcdserverpb.KV/NoSuchMethod", vec![])
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unimplemented, "{err:?}");
        let err = raw_call(&ep, "/nosuch.Service/Call", vec![])
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unimplemented, "{err:?}");

        still_serves(&ep, "after-protobuf").await;
    });

    // Garbage bytes instead of HTTP/2, and a request cut off mid-frame.
    for payload in [b"GET / HTTP/1.1\r\n\r\n\x00\xff\xfe garbage".to_vec(), {
        let mut v = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        v.extend_from_slice(&[0, 0, 100, 1, 4, 0, 0, 0, 1, 0x82]); // HEADERS frame, truncated
        v
    }] {
        let mut c = std::net::TcpStream::connect(&ep).unwrap();
        let _ = c.write_all(&payload);
        drop(c);
    }
    assert!(s.is_running(), "server died on bad gRPC input");
    rt.block_on(still_serves(&ep, "after-garbage"));
}

/// What a raw HTTP/2 client saw within `window`: the server's SETTINGS entries, how many
/// PINGs came (never answered), and after how long the server closed the connection.
struct H2Seen {
    settings: Vec<(u16, u32)>,
    pings: u32,
    closed_after: Option<std::time::Duration>,
}

fn watch_h2_connection(endpoint: &str, window: std::time::Duration) -> H2Seen {
    use std::io::Read;
    let started = std::time::Instant::now();
    let mut c = std::net::TcpStream::connect(endpoint).unwrap();
    c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    c.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).unwrap(); // empty SETTINGS
    let mut seen = H2Seen {
        settings: Vec::new(),
        pings: 0,
        closed_after: None,
    };
    // Bounded by `window`: every read waits at most until it ends.
    while started.elapsed() < window {
        c.set_read_timeout(Some(
            window
                .saturating_sub(started.elapsed())
                .max(std::time::Duration::from_millis(1)),
        ))
        .unwrap();
        let mut head = [0u8; 9];
        match c.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                seen.closed_after = Some(started.elapsed());
                break;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break
            }
            Err(_) => {
                seen.closed_after = Some(started.elapsed());
                break;
            }
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        if c.read_exact(&mut payload).is_err() {
            seen.closed_after = Some(started.elapsed());
            break;
        }
        match (head[3], head[4]) {
            (4, 0) => {
                for e in payload.chunks_exact(6) {
                    seen.settings.push((
                        u16::from_be_bytes([e[0], e[1]]),
                        u32::from_be_bytes([e[2], e[3], e[4], e[5]]),
                    ));
                }
                let _ = c.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]); // SETTINGS ack
            }
            (6, 0) => seen.pings += 1,
            (7, _) => {
                seen.closed_after = Some(started.elapsed());
                break;
            }
            _ => {}
        }
    }
    seen
}

#[test]
fn keepalive_and_stream_limit_flags_shape_grpc_connections() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(
        &dir.path().join("tuned"),
        &[
            "--grpc-keepalive-interval",
            "200ms",
            "--grpc-keepalive-timeout",
            "300ms",
            "--max-concurrent-streams",
            "7",
        ],
    );
    let seen = watch_h2_connection(&s.grpc_endpoint(), std::time::Duration::from_secs(5));
    // SETTINGS_MAX_CONCURRENT_STREAMS (0x3) is the flag's value.
    assert!(seen.settings.contains(&(3, 7)), "{:?}", seen.settings);
    // An idle connection is pinged after the interval and closed when no ack comes.
    assert!(seen.pings >= 1, "no keepalive ping");
    let closed = seen
        .closed_after
        .expect("connection closed for the missing ping ack");
    assert!(
        closed >= std::time::Duration::from_millis(400),
        "closed after {closed:?}, before interval + timeout"
    );
    // Defaults (etcd's: ping every 2 h): no ping and no close within a second.
    let d = Server::start(&dir.path().join("defaults"), &[]);
    let seen = watch_h2_connection(&d.grpc_endpoint(), std::time::Duration::from_secs(1));
    assert_eq!(seen.pings, 0);
    assert!(seen.closed_after.is_none());
    // Both keep serving.
    for srv in [&s, &d] {
        srv.ok(&["put", "after", "pings"]);
    }
}
