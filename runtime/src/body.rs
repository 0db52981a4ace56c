//! A request or response body that holds something (a count of calls in flight, a permit, a place
//! in a bound) for as long as it is still being read.

use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::body::{Body, Frame, SizeHint};

/// `inner`, holding `guard` until the body has ended (its last frame read, or an error) or is
/// dropped: whatever the guard counts is given back as soon as nothing more will come.
#[derive(Debug)]
pub struct HoldUntilEnd<B, G> {
    inner: B,
    guard: Option<G>,
}

impl<B, G> HoldUntilEnd<B, G> {
    /// `inner`, holding `guard` (`None`: nothing held).
    pub fn new(inner: B, guard: Option<G>) -> Self {
        Self { inner, guard }
    }
}

impl<B: Body + Unpin, G: Unpin> Body for HoldUntilEnd<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = &mut *self;
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        match &frame {
            Poll::Ready(None | Some(Err(_))) => this.guard = None,
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.guard = None,
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use std::collections::VecDeque;
    use std::sync::Arc;

    /// Frames one by one, its end known only when it comes (a streamed body).
    struct Frames(VecDeque<Bytes>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    /// The guard goes with the end of the body (the end read, or the last frame of a body that
    /// knows it is the last), or with the body dropped unread.
    #[tokio::test]
    async fn the_guard_is_let_go_when_the_body_ends() {
        let held = Arc::new(());
        let frames = Frames(VecDeque::from([
            Bytes::from_static(b"a"),
            Bytes::from_static(b"b"),
        ]));
        let mut body = HoldUntilEnd::new(frames, Some(held.clone()));
        body.frame().await.unwrap().unwrap();
        body.frame().await.unwrap().unwrap();
        assert_eq!(Arc::strong_count(&held), 2, "held until the end is read");
        assert!(body.frame().await.is_none());
        assert_eq!(Arc::strong_count(&held), 1, "let go at the end");

        let full = http_body_util::Full::new(Bytes::from_static(b"ab"));
        let mut body = HoldUntilEnd::new(full, Some(held.clone()));
        body.frame().await.unwrap().unwrap();
        assert_eq!(Arc::strong_count(&held), 1, "let go with the last frame");

        let body = HoldUntilEnd::new(http_body_util::Empty::<Bytes>::new(), Some(held.clone()));
        assert_eq!(Arc::strong_count(&held), 2);
        drop(body);
        assert_eq!(Arc::strong_count(&held), 1, "let go when dropped");
    }
}
