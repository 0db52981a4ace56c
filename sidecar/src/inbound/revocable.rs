//! A response body that ends early when the request it answers is no longer allowed: a policy
//! change denies the method or path it was decided under ([`super::authz::Authorizer::request_revoked`]).
//! The body then fails, and hyper ends the response the way a failed body ends: on h2 it resets
//! that stream alone (the connection's other streams go on); on HTTP/1.1 the response stops short
//! and the connection closes. Held only while a response is in flight.
//!
//! The watch is armed only when it can matter: when the app's body makes the response wait, or
//! when the policy has moved since the request was decided. A response whose body is at hand as
//! it is sent (most small ones) pays one read of the policy version per frame and no task
//! registration, allocation or receiver of its own.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use meshid_identity::peer::VerifiedPeer;

use super::authz::Decided;
use super::http::InboundHttp;
use crate::http::{Body, BoxError};

type Watch = Pin<Box<dyn Future<Output = ()> + Send + Sync>>;

/// `inner`, ended with an error once a policy change denies the request it answers.
pub struct Revocable {
    inner: Body,
    state: State,
}

enum State {
    /// Not watched yet: what watching needs.
    Unarmed(Unarmed),
    Armed(Watch),
    /// The body has ended (or been ended): nothing more to watch.
    Done,
}

struct Unarmed {
    http: Arc<InboundHttp>,
    peer: Arc<VerifiedPeer>,
    decided: Decided,
}

impl Revocable {
    /// `http` is the listener's (an `Arc` the connection already holds: this clones a pointer,
    /// not the authorizer's stores); `peer` the caller; `decided` what it was allowed under.
    pub fn new(
        inner: Body,
        http: Arc<InboundHttp>,
        peer: Arc<VerifiedPeer>,
        decided: Decided,
    ) -> Self {
        Self {
            inner,
            state: State::Unarmed(Unarmed {
                http,
                peer,
                decided,
            }),
        }
    }

    /// Arms the watch if it is not yet, and polls it: `Ready` once the request is denied.
    fn poll_watch(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let State::Unarmed(_) = self.state {
            let State::Unarmed(u) = std::mem::replace(&mut self.state, State::Done) else {
                unreachable!("matched just above")
            };
            let watch = u.http.authz().request_revoked(u.peer, u.decided);
            self.state = State::Armed(Box::pin(watch));
        }
        match &mut self.state {
            State::Armed(watch) => watch.as_mut().poll(cx),
            _ => Poll::Pending,
        }
    }

    fn revoke(&mut self) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.state = State::Done;
        // Whatever the app still sends is not passed on.
        self.inner = http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed();
        Poll::Ready(Some(Err(Box::new(RequestRevoked))))
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
        // A policy that moved since the request was decided is looked at before anything more
        // is passed on; an armed watch is polled every time.
        let watch_now = match &this.state {
            State::Unarmed(u) => {
                *u.http.authz().shared().policy_changed.borrow() != u.decided.version
            }
            State::Armed(_) => true,
            State::Done => false,
        };
        if watch_now && this.poll_watch(cx).is_ready() {
            return this.revoke();
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match polled {
            Poll::Ready(None) => this.state = State::Done,
            // The app makes the response wait: from here on a policy change must wake it.
            Poll::Pending
                if matches!(this.state, State::Unarmed(_)) && this.poll_watch(cx).is_ready() =>
            {
                return this.revoke();
            }
            _ => {}
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
