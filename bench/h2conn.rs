//! The load generator's gRPC transport for unary calls: one HTTP/2 connection driven by
//! hyper directly, wrapped as the tower service tonic's generated clients take.
//!
//! Why not tonic's `Channel`: it puts every call through a `tower::buffer` (an mpsc
//! hop to a worker task, a semaphore permit, a oneshot back), a boxed reconnect service and
//! header-adding layers. The loader shares the machine with the server it measures, so its
//! CPU per call is taken from the server: with `Channel`, 1000 clients over 100 connections
//! cost the loader ~29 µs of CPU per put against a 3-member corekv (~35% of the 2-core VM).
//! Both systems are driven through this same transport, so the comparison stays like for
//! like; a lighter loader only stops hiding the faster server's headroom.

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tonic::body::Body;

/// A cloneable handle on one HTTP/2 connection; clones multiplex streams on it.
#[derive(Clone)]
pub struct H2Conn {
    send: SendRequest<Body>,
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<Response<Incoming>, hyper::Error>> + Send>>;

impl tower_service::Service<Request<Body>> for H2Conn {
    type Response = Response<Incoming>;
    type Error = hyper::Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.send.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        Box::pin(self.send.send_request(req))
    }
}

/// Dials `url` (http:// or https://host:port), completes the HTTP/2 handshake and spawns the
/// connection's driver on the current tokio runtime. Returns the handle and the origin
/// the generated clients put into each request's URI.
pub async fn connect(url: &str) -> Result<(H2Conn, Uri), String> {
    let origin: Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let authority = origin
        .authority()
        .ok_or_else(|| format!("{url}: no host:port"))?
        .as_str()
        .to_string();
    let io = crate::tls::dial(&origin).await?;
    let (send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .map_err(|e| format!("http/2 handshake with {authority}: {e}"))?;
    tokio::spawn(async move {
        // Ends when the server closes the connection or every handle is dropped; calls in
        // flight then fail with the error, which the load loop counts.
        let _ = conn.await;
    });
    Ok((H2Conn { send }, origin))
}
