//! Write coalescing for TLS streams.
//!
//! HTTP/2 writes a response as several small frames (HEADERS, DATA, trailing HEADERS) and then
//! flushes. Over `tokio_rustls` every write becomes its own TLS record and its own `writev`, so a gRPC
//! response costs three records, three system calls and three wake-ups of the peer. [`Coalesce`]
//! buffers plaintext until the writer flushes (or the buffer is full) and hands it to the TLS stream
//! in one piece: one record, one system call.
//!
//! The buffer is allocated on the first write after a flush and released by the flush, so an idle
//! connection holds no buffer at all.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Plaintext buffered before it is passed on: one full TLS record.
pub const COALESCE_BYTES: usize = 16 * 1024;

/// The first allocation after a drain: a typical response fits without regrowing.
const INITIAL_BYTES: usize = 4 * 1024;

/// Writes `buf[*pos..]` to `w`, moving `pos` on, until all of it is written (`Ready(Ok)`) or `w`
/// takes no more for now (`Pending`). A writer that takes nothing is an error (`WriteZero`).
pub fn poll_write_from<W: AsyncWrite + Unpin>(
    w: &mut W,
    cx: &mut Context<'_>,
    buf: &[u8],
    pos: &mut usize,
) -> Poll<io::Result<()>> {
    while *pos < buf.len() {
        let n = ready!(Pin::new(&mut *w).poll_write(cx, &buf[*pos..]))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        *pos += n;
    }
    Poll::Ready(Ok(()))
}

/// An [`AsyncWrite`] that gathers writes until `poll_flush` (reads pass straight through).
#[derive(Debug)]
pub struct Coalesce<T> {
    inner: T,
    buf: Vec<u8>,
    /// How much of `buf` the inner writer has taken.
    written: usize,
    /// A flush was put off once so the rest of a response could join it.
    deferred: bool,
}

impl<T> Coalesce<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            written: 0,
            deferred: false,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    /// Bytes accepted but not yet passed on.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.written
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    fn reserve(&mut self, additional: usize) {
        if self.buf.capacity() == 0 {
            self.buf.reserve(additional.max(INITIAL_BYTES));
        } else {
            self.buf.reserve(additional);
        }
    }

    /// Passes everything buffered to the inner writer, then releases the buffer.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(poll_write_from(
            &mut self.inner,
            cx,
            &self.buf,
            &mut self.written
        ))?;
        self.buf = Vec::new();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.buf.len() + data.len() > COALESCE_BYTES {
            ready!(this.poll_drain(cx))?;
        }
        if data.len() >= COALESCE_BYTES {
            return Pin::new(&mut this.inner).poll_write(cx, data);
        }
        this.reserve(data.len());
        this.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let total = bufs.iter().fold(0usize, |n, b| n.saturating_add(b.len()));
        if this.buf.len().saturating_add(total) > COALESCE_BYTES {
            ready!(this.poll_drain(cx))?;
        }
        if total >= COALESCE_BYTES {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        this.reserve(total);
        for b in bufs {
            this.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // hyper writes a response's trailers (gRPC status) from another task, usually a moment after
        // the flush of its head and data: putting the first flush off by one scheduler turn lets them
        // share a record and a system call. At most once per flush, so it never stalls.
        if !this.deferred && this.buffered() > 0 {
            this.deferred = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.deferred = false;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    /// Records each write it receives.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
        /// Accept at most this many bytes per write (short writes).
        limit: usize,
        flushed: usize,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = data.len().min(self.limit);
            self.writes.push(data[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_flush(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.flushed += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .map(|rt| rt.block_on(f))
            .unwrap_or_else(|e| panic!("runtime: {e}"))
    }

    #[test]
    fn small_writes_reach_the_inner_writer_as_one_on_flush() {
        block_on(async {
            let mut w = Coalesce::new(Recorder {
                limit: usize::MAX,
                ..Default::default()
            });
            for part in [&b"head"[..], b"data", b"trailers"] {
                let n = poll_fn(|cx| Pin::new(&mut w).poll_write(cx, part)).await;
                assert_eq!(n.ok(), Some(part.len()));
            }
            let slices = [io::IoSlice::new(b"ab"), io::IoSlice::new(b"cd")];
            let n = poll_fn(|cx| Pin::new(&mut w).poll_write_vectored(cx, &slices)).await;
            assert_eq!(n.ok(), Some(4));
            assert!(
                w.get_ref().writes.is_empty(),
                "nothing passes before a flush"
            );
            assert_eq!(w.buffered(), 20);
            // The first flush is put off by one turn (and wakes itself), the next goes through.
            let waker = std::task::Waker::noop();
            let mut cx = Context::from_waker(waker);
            assert!(Pin::new(&mut w).poll_flush(&mut cx).is_pending());
            assert!(poll_fn(|cx| Pin::new(&mut w).poll_flush(cx)).await.is_ok());
            assert_eq!(w.get_ref().writes, vec![b"headdatatrailersabcd".to_vec()]);
            assert_eq!(w.get_ref().flushed, 1);
            assert_eq!(w.buf.capacity(), 0, "the buffer is released when drained");
        });
    }

    #[test]
    fn short_writes_and_large_writes_lose_nothing() {
        block_on(async {
            let mut w = Coalesce::new(Recorder {
                limit: 1000,
                ..Default::default()
            });
            let small = vec![1u8; 10_000];
            let big = vec![2u8; COALESCE_BYTES + 5];
            let mut sent = Vec::new();
            for data in [&small, &small, &big] {
                let mut off = 0;
                while off < data.len() {
                    let n = poll_fn(|cx| Pin::new(&mut w).poll_write(cx, &data[off..]))
                        .await
                        .unwrap_or(0);
                    assert!(n > 0);
                    sent.extend_from_slice(&data[off..off + n]);
                    off += n;
                }
            }
            assert!(
                poll_fn(|cx| Pin::new(&mut w).poll_shutdown(cx))
                    .await
                    .is_ok()
            );
            let received: Vec<u8> = w.get_ref().writes.concat();
            assert_eq!(received, sent);
            assert_eq!(received.len(), 20_000 + COALESCE_BYTES + 5);
        });
    }
}
