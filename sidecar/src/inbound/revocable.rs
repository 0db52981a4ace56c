//! A response body that ends early when the request it answers is no longer allowed: a policy
//! change denies the method or path it was decided under ([`super::authz::Authorizer::request_revoked`]).
//! The body then fails, and hyper ends the response the way a failed body ends: on h2 it resets
//! that stream alone (the connection's other streams go on); on HTTP/1.1 the response stops short
//! and the connection closes. Held only while a response is in flight.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use crate::http::{Body, BoxError};

/// `inner`, ended with an error once `revoked` resolves.
pub struct Revocable {
    inner: Body,
    /// `None` once the body has ended (or been ended): nothing more to watch.
    revoked: Option<Pin<Box<dyn Future<Output = ()> + Send + Sync>>>,
}

impl Revocable {
    pub fn new(inner: Body, revoked: impl Future<Output = ()> + Send + Sync + 'static) -> Self {
        Self {
            inner,
            revoked: Some(Box::pin(revoked)),
        }
    }
}

/// Why a [`Revocable`] body failed.
#[derive(Debug, thiserror::Error)]
#[error("the policy no longer allows this request")]
pub struct RequestRevoked;

impl HttpBody for Revocable {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(revoked) = this.revoked.as_mut()
            && revoked.as_mut().poll(cx).is_ready()
        {
            this.revoked = None;
            // Whatever the app still sends is not passed on.
            this.inner = http_body_util::Empty::new()
                .map_err(|never| match never {})
                .boxed();
            return Poll::Ready(Some(Err(Box::new(RequestRevoked))));
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) {
            this.revoked = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
