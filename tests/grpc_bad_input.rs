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
