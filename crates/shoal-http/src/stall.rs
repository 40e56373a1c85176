//! Request bodies that stop arriving.
//!
//! hyper hands a handler a streamed body as its frames come and never gives
//! up on one: a client that stops sending in the middle of an upload holds
//! its connection, and whatever the handler holds meanwhile (a spool file,
//! a place in an inference queue), for good. [`Stalling`] fails such a body
//! once nothing has come for [`READ_TIMEOUT`], the server loop's limit for
//! a request that stops arriving; [`body_error`] answers it 408 (and any
//! other failed read 400).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::StatusCode;
use http_body::{Body, Frame, SizeHint};

use crate::ApiError;
use crate::READ_TIMEOUT;

/// The error a [`Stalling`] body fails with.
#[derive(Debug, thiserror::Error)]
#[error("the request body stopped arriving: nothing came for {} s", READ_TIMEOUT.as_secs())]
pub struct Stalled;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body that fails with [`Stalled`] when its next frame takes longer
/// than [`READ_TIMEOUT`] (each frame gets the whole timeout: slow is not
/// stalled).
pub struct Stalling<B> {
    body: B,
    /// Made at the first frame not ready at once: most bodies need none.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whether the timer runs for the frame being waited for.
    waiting: bool,
}

impl<B> Stalling<B> {
    /// `body`, failing when it stalls.
    pub fn new(body: B) -> Stalling<B> {
        Stalling {
            body,
            timer: None,
            waiting: false,
        }
    }
}

impl<B> Body for Stalling<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            this.waiting = false;
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        if !this.waiting {
            this.waiting = true;
            let deadline = tokio::time::Instant::now() + READ_TIMEOUT;
            match &mut this.timer {
                Some(timer) => timer.as_mut().reset(deadline),
                None => this.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        if let Some(timer) = &mut this.timer
            && timer.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Some(Err(Box::new(Stalled))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// What a failed body read answers: 408 when the body stalled (anywhere
/// in the error's chain: body wrappers box the errors they pass on), 400
/// saying why otherwise.
pub fn body_error(e: &(dyn std::error::Error + 'static)) -> ApiError {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.is::<Stalled>() {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!("{Stalled}; send the body without pauses"),
            );
        }
        cause = c.source();
    }
    ApiError::bad_request(format!("cannot read the request body: {e}"))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::body::Body;
    use futures::StreamExt;
    use tokio::time::Instant;

    use super::*;

    fn chunk(text: &'static str) -> Result<Bytes, std::io::Error> {
        Ok(Bytes::from_static(text.as_bytes()))
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_arriving_is_refused_408() {
        // Its first bytes, then nothing, the connection still open.
        let body = futures::stream::iter([chunk("[1,")]).chain(futures::stream::pending());
        let start = Instant::now();
        let read = crate::read_body(Body::from_stream(body), 1 << 20);
        let refused = tokio::time::timeout(READ_TIMEOUT * 2, read)
            .await
            .expect("the stalled body was waited for")
            .unwrap_err();
        assert_eq!(start.elapsed(), READ_TIMEOUT);
        assert_eq!(refused.status, StatusCode::REQUEST_TIMEOUT);
        assert_eq!(
            refused.message,
            "the request body stopped arriving: nothing came for 60 s; send the body without pauses"
        );
        // Nothing at all.
        let nothing = futures::stream::pending::<Result<Bytes, std::io::Error>>();
        let read = crate::read_body(Body::from_stream(nothing), 1 << 20);
        let refused = tokio::time::timeout(READ_TIMEOUT * 2, read)
            .await
            .expect("the empty body was waited for")
            .unwrap_err();
        assert_eq!(refused.status, StatusCode::REQUEST_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_body_is_read_whole() {
        // A chunk every 50 s: each within the timeout, all far past it.
        let (tx, rx) = futures::channel::mpsc::unbounded();
        tokio::spawn(async move {
            for piece in ["[1,", "2,", "3]"] {
                tokio::time::sleep(Duration::from_secs(50)).await;
                tx.unbounded_send(chunk(piece)).unwrap();
            }
        });
        let body = Body::from_stream(rx);
        let start = Instant::now();
        let read = crate::read_body(body, 1 << 20).await.unwrap();
        assert_eq!(read, "[1,2,3]");
        assert_eq!(start.elapsed(), Duration::from_secs(150));
    }

    #[test]
    fn other_failures_are_bad_requests() {
        let e = std::io::Error::other("connection reset");
        let answer = body_error(&e);
        assert_eq!(answer.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            answer.message,
            "cannot read the request body: connection reset"
        );
        // Found behind the errors that wrap it.
        let wrapped = axum::Error::new(Box::new(Stalled) as BoxError);
        assert_eq!(body_error(&wrapped).status, StatusCode::REQUEST_TIMEOUT);
    }
}
