//! The client URLs' listeners on the gRPC thread: plaintext or TLS per URL (etcd serves
//! `https://10.0.0.1:2379,http://127.0.0.1:2379` side by side), each TLS handshake in its
//! own task so a slow or silent client never holds up the accept loop, and the verified
//! client certificate's CN carried to the services as connection info.

use crate::tls::TlsSide;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Handshaken connections waiting for the HTTP/2 server; a full queue stops accepting.
const ACCEPTED_QUEUE: usize = 128;

/// What the services learn about a connection (a request extension).
#[derive(Clone, Debug, Default)]
pub struct ConnInfo {
    pub remote: Option<std::net::SocketAddr>,
    /// CN of the verified client certificate under --client-cert-auth: the user when a
    /// request carries no token (etcd's AuthInfoFromTLS).
    pub cert_user: Option<String>,
}

pub enum ClientIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ClientIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ClientIo::Plain(s) => s.is_write_vectored(),
            ClientIo::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// Accepts on `listener` until the process exits; yields plaintext connections at once
/// and TLS ones after their handshake (`tls` given). Runs on the current tokio runtime.
pub fn incoming(
    listener: tokio::net::TcpListener,
    tls: Option<TlsSide>,
) -> impl futures::Stream<Item = Result<WithInfo, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<WithInfo>(ACCEPTED_QUEUE);
    tokio::spawn(async move {
        let acceptor = tls
            .as_ref()
            .map(|t| tokio_rustls::TlsAcceptor::from(t.server.clone()));
        let cn_is_user = tls.as_ref().is_some_and(|t| t.client_cert_auth);
        // Bounded by the process's life; accept errors (EMFILE) back off briefly.
        loop {
            let (conn, remote) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("grpc accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Small unary replies must not wait for Nagle + delayed ACK (~40 ms).
            if let Err(e) = conn.set_nodelay(true) {
                tracing::debug!("set_nodelay: {e}");
            }
            let Some(acceptor) = acceptor.clone() else {
                let info = ConnInfo {
                    remote: Some(remote),
                    cert_user: None,
                };
                if tx
                    .send(WithInfo(ClientIo::Plain(conn), info))
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            };
            let tx = tx.clone();
            let side = tls.clone();
            tokio::spawn(async move {
                let timeout = std::time::Duration::from_millis(crate::tls::HANDSHAKE_TIMEOUT_MS);
                let s = match tokio::time::timeout(timeout, acceptor.accept(conn)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        return tracing::info!(%remote, "client TLS handshake refused: {e}")
                    }
                    Err(_) => return tracing::info!(%remote, "client TLS handshake timed out"),
                };
                if let Some(side) = &side {
                    if let Err(e) =
                        crate::tls::check_identity(side, s.get_ref().1.peer_certificates())
                    {
                        return tracing::info!(%remote, "client TLS refused: {e}");
                    }
                }
                let cert_user = if cn_is_user {
                    s.get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(crate::tls::common_name)
                } else {
                    None
                };
                let info = ConnInfo {
                    remote: Some(remote),
                    cert_user,
                };
                // The server gone (process exit) is the only way this fails.
                if tx
                    .send(WithInfo(ClientIo::Tls(Box::new(s)), info))
                    .await
                    .is_err()
                {
                    tracing::debug!(%remote, "grpc server gone; connection dropped");
                }
            });
        }
    });
    futures::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|c| (Ok(c), rx)) },
    )
}

/// A connection with the info computed when it was accepted.
pub struct WithInfo(pub ClientIo, pub ConnInfo);

impl tonic::transport::server::Connected for WithInfo {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.1.clone()
    }
}

impl AsyncRead for WithInfo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for WithInfo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}
