//! A peer connection's byte stream: plaintext, or TLS as the dialing or the accepting
//! side (`https://` peer URLs). The peer protocol above it is the same for all three.

use futures::io::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use std::pin::Pin;
use std::task::{Context, Poll};

pub enum PeerStream {
    Plain(TcpStream),
    Dialed(Box<futures_rustls::client::TlsStream<TcpStream>>),
    Accepted(Box<futures_rustls::server::TlsStream<TcpStream>>),
}

impl PeerStream {
    /// The certificates the other side presented (TLS only).
    pub fn peer_certificates(&self) -> Option<&[rustls::pki_types::CertificateDer<'static>]> {
        match self {
            PeerStream::Plain(_) => None,
            PeerStream::Dialed(s) => s.get_ref().1.peer_certificates(),
            PeerStream::Accepted(s) => s.get_ref().1.peer_certificates(),
        }
    }

    pub fn is_tls(&self) -> bool {
        !matches!(self, PeerStream::Plain(_))
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            PeerStream::Dialed(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            PeerStream::Accepted(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            PeerStream::Dialed(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            PeerStream::Accepted(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_flush(cx),
            PeerStream::Dialed(s) => Pin::new(s.as_mut()).poll_flush(cx),
            PeerStream::Accepted(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_close(cx),
            PeerStream::Dialed(s) => Pin::new(s.as_mut()).poll_close(cx),
            PeerStream::Accepted(s) => Pin::new(s.as_mut()).poll_close(cx),
        }
    }
}
