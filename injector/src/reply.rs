//! The webhook's response bodies. An answer to a review holds its share of the review budget (see
//! [`super::budget`]) until it has been handed to the connection, in pieces of at most
//! [`PIECE`] bytes (so the connection never buffers much more than one piece ahead of the client),
//! and at most for its send timeout: a client that stops reading its answers cannot pin memory or
//! budget, the answer is dropped and the stream or connection fails.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use hyper::body::{Body, Frame, SizeHint};
use tokio::task::AbortHandle;

use super::budget::Room;

/// The largest piece handed to the connection at once. A client that opens its window by a byte
/// and stops is handed one piece, which h2 keeps after the answer's send timeout released its
/// budget, until the connection ends (at its maximum age): 4 KiB x 64 streams x 64 connections, 16
/// MiB from one source at most (16 KiB pieces made it 64 MiB).
pub const PIECE: usize = 4 * 1024;

/// A response body: a whole text, sent in pieces.
#[derive(Debug)]
pub struct Reply {
    slot: Arc<Mutex<Slot>>,
    len: u64,
    timeout: Option<Duration>,
    watchdog: Option<AbortHandle>,
}

#[derive(Debug)]
enum Slot {
    /// The text still to send, and the budget it holds (released with it).
    Sending {
        text: Bytes,
        _room: Option<Room>,
    },
    Done,
    Expired,
}

/// Why an answer was not sent.
#[derive(Debug, thiserror::Error)]
#[error("the answer was not taken within {0:?}")]
pub struct SendTimeout(Duration);

impl Reply {
    /// A small body that holds no budget (errors, health checks).
    pub fn plain(text: impl Into<Bytes>) -> Self {
        Self::new(text.into(), None, None)
    }

    /// An answer holding `room` until it is sent, or for `timeout` at most (then it is dropped
    /// and the response fails). Needs a tokio runtime.
    pub fn holding(text: Bytes, room: Room, timeout: Duration) -> Self {
        Self::new(text, Some(room), Some(timeout))
    }

    fn new(text: Bytes, permit: Option<Room>, timeout: Option<Duration>) -> Self {
        let len = text.len() as u64;
        let slot = Arc::new(Mutex::new(if text.is_empty() {
            Slot::Done
        } else {
            Slot::Sending {
                text,
                _room: permit,
            }
        }));
        let watchdog = timeout.map(|timeout| {
            let slot = slot.clone();
            tokio::spawn(async move {
                tokio::time::sleep(timeout).await;
                let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
                if matches!(*slot, Slot::Sending { .. }) {
                    *slot = Slot::Expired;
                }
            })
            .abort_handle()
        });
        Self {
            slot,
            len,
            timeout,
            watchdog,
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if let Some(watchdog) = &self.watchdog {
            watchdog.abort();
        }
    }
}

impl Body for Reply {
    type Data = Bytes;
    type Error = SendTimeout;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, SendTimeout>>> {
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        let (piece, last) = match &mut *slot {
            Slot::Done => return Poll::Ready(None),
            Slot::Expired => {
                return Poll::Ready(Some(Err(SendTimeout(self.timeout.unwrap_or_default()))));
            }
            Slot::Sending { text, .. } => {
                // A copy, so the pieces in the connection's buffers never keep the whole text.
                let n = text.len().min(PIECE);
                let piece = Bytes::copy_from_slice(&text[..n]);
                text.advance(n);
                (piece, text.is_empty())
            }
        };
        if last {
            // Releases the budget with the text.
            *slot = Slot::Done;
        }
        Poll::Ready(Some(Ok(Frame::data(piece))))
    }

    fn is_end_stream(&self) -> bool {
        matches!(
            *self.slot.lock().unwrap_or_else(PoisonError::into_inner),
            Slot::Done
        )
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len)
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;
    use crate::budget::ReviewBudget;

    #[tokio::test(start_paused = true)]
    async fn an_answer_gives_its_room_back_when_sent_or_when_its_time_is_up() {
        let budget = ReviewBudget::new(4 * 100_000, 1_000);
        let wait = Duration::from_secs(1);
        let text = Bytes::from(vec![b'x'; 40_000]);

        // Sent: in pieces of at most PIECE bytes, the room given back with the last one.
        let room = budget.review(100_000, wait).await.unwrap();
        let mut reply = Reply::holding(text.clone(), room, Duration::from_secs(10));
        assert_eq!(reply.size_hint().exact(), Some(40_000));
        let mut got = Vec::new();
        while let Some(frame) = reply.frame().await {
            let data = frame.unwrap().into_data().unwrap();
            assert!(data.len() <= PIECE);
            got.extend_from_slice(&data);
            let done = got.len() == text.len();
            assert_eq!(
                budget.free().1 == 300_000,
                done,
                "room held until the last piece"
            );
        }
        assert_eq!(got, text);

        // Not taken in time: dropped, the room given back, the body fails.
        let room = budget.review(100_000, wait).await.unwrap();
        let mut stuck = Reply::holding(text, room, Duration::from_secs(10));
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert_eq!(budget.free().1, 200_000);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(budget.free().1, 300_000);
        assert!(stuck.frame().await.unwrap().is_err());
    }
}
