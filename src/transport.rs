//! A write half whose flushes are coalesced: capnp-futures flushes after every message,
//! which costs one `send` per response. Here `poll_flush` only marks the buffer dirty
//! and wakes a companion task, which yields once (letting the current burst of
//! responses be written) and then flushes them all in one go. Single-threaded (glommio
//! tasks on one executor), so the shared state is an `Rc<RefCell<_>>`.

use futures::io::{AsyncWrite, BufWriter};
use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

struct Shared<W> {
    inner: BufWriter<W>,
    dirty: bool,
    closed: bool,
    failed: Option<io::ErrorKind>,
    /// The socket keeps one waiter; whichever side made progress wakes the other.
    flusher: Option<Waker>,
    writer: Option<Waker>,
}

impl<W> Shared<W> {
    fn wake_flusher(&mut self) {
        if let Some(w) = self.flusher.take() {
            w.wake();
        }
    }
    fn wake_writer(&mut self) {
        if let Some(w) = self.writer.take() {
            w.wake();
        }
    }
}

pub struct CoalescingWriter<W> {
    shared: Rc<RefCell<Shared<W>>>,
}

/// Wraps `inner`; spawns the flusher task on the current glommio executor.
pub fn coalescing<W: AsyncWrite + Unpin + 'static>(inner: W) -> CoalescingWriter<W> {
    let shared = Rc::new(RefCell::new(Shared {
        inner: BufWriter::with_capacity(64 * 1024, inner),
        dirty: false,
        closed: false,
        failed: None,
        flusher: None,
        writer: None,
    }));
    glommio::spawn_local(flusher(shared.clone())).detach();
    CoalescingWriter { shared }
}

/// Resolves to Pending exactly once, so other ready tasks run first.
async fn yield_once() {
    let mut yielded = false;
    futures::future::poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}

async fn flusher<W: AsyncWrite + Unpin>(shared: Rc<RefCell<Shared<W>>>) {
    // Ends when the writer is dropped or closed, or the socket fails.
    loop {
        let go = futures::future::poll_fn(|cx| {
            let mut s = shared.borrow_mut();
            if s.dirty {
                Poll::Ready(true)
            } else if s.closed {
                Poll::Ready(false)
            } else {
                s.flusher = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
        if !go {
            return;
        }
        yield_once().await;
        shared.borrow_mut().dirty = false;
        let result = futures::future::poll_fn(|cx| {
            let mut s = shared.borrow_mut();
            let r = Pin::new(&mut s.inner).poll_flush(cx);
            match r {
                Poll::Pending => {
                    s.flusher = Some(cx.waker().clone());
                    Poll::Pending
                }
                Poll::Ready(r) => {
                    s.wake_writer();
                    Poll::Ready(r)
                }
            }
        })
        .await;
        if let Err(e) = result {
            let mut s = shared.borrow_mut();
            s.failed = Some(e.kind());
            s.wake_writer();
            return;
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for CoalescingWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut s = self.shared.borrow_mut();
        if let Some(kind) = s.failed {
            return Poll::Ready(Err(io::Error::from(kind)));
        }
        match Pin::new(&mut s.inner).poll_write(cx, buf) {
            Poll::Pending => {
                s.writer = Some(cx.waker().clone());
                Poll::Pending
            }
            ready => {
                s.wake_flusher();
                ready
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut s = self.shared.borrow_mut();
        if let Some(kind) = s.failed {
            return Poll::Ready(Err(io::Error::from(kind)));
        }
        s.dirty = true;
        s.wake_flusher();
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut s = self.shared.borrow_mut();
        let r = Pin::new(&mut s.inner).poll_close(cx);
        if r.is_ready() {
            s.closed = true;
            s.wake_flusher();
        } else {
            s.writer = Some(cx.waker().clone());
        }
        r
    }
}

impl<W> Drop for CoalescingWriter<W> {
    fn drop(&mut self) {
        let mut s = self.shared.borrow_mut();
        s.closed = true;
        s.wake_flusher();
    }
}
