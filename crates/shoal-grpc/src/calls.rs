//! What a gRPC call goes through between hyper and the service, as tonic's
//! own server would do it: the caller's address as a request extension
//! (`tonic::Request::remote_addr`), the body as tonic's, and the client's
//! deadline. A call whose `grpc-timeout` passes before it is answered
//! fails with `DEADLINE_EXCEEDED` and its work is dropped (tonic's server
//! does the same, answering `CANCELLED`; the protocol's document asks for
//! `DEADLINE_EXCEEDED`). A header that is not a valid timeout is ignored,
//! as tonic ignores it.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::codegen::{Service, http};
use tonic::transport::server::TcpConnectInfo;

use crate::GrpcService;

/// The header a client's deadline comes in.
const GRPC_TIMEOUT: &str = "grpc-timeout";

/// A connection's calls to `S`.
#[derive(Clone)]
pub(crate) struct Served<S> {
    service: S,
    peer: TcpConnectInfo,
}

impl<S> Served<S> {
    /// Calls to `service` from the connection whose addresses are `peer`.
    pub(crate) fn new(service: S, peer: TcpConnectInfo) -> Served<S> {
        Served { service, peer }
    }
}

impl<S: GrpcService> Service<http::Request<hyper::body::Incoming>> for Served<S> {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = WithDeadline<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.service.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<hyper::body::Incoming>) -> Self::Future {
        let deadline = request
            .headers()
            .get(GRPC_TIMEOUT)
            .and_then(|value| timeout(value.as_bytes()));
        let mut request = request.map(tonic::body::Body::new);
        request.extensions_mut().insert(self.peer.clone());
        WithDeadline {
            answer: self.service.call(request),
            deadline: deadline.map(|d| (d, Box::pin(tokio::time::sleep(d)))),
        }
    }
}

pin_project_lite::pin_project! {
    /// A call's answer, or `DEADLINE_EXCEEDED` once its deadline passes.
    pub(crate) struct WithDeadline<F> {
        #[pin]
        answer: F,
        // The client's timeout and when it ends; `None` without one.
        deadline: Option<(Duration, Pin<Box<tokio::time::Sleep>>)>,
    }
}

impl<F> Future for WithDeadline<F>
where
    F: Future<Output = Result<http::Response<tonic::body::Body>, Infallible>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(answer) = this.answer.poll(cx) {
            return Poll::Ready(answer);
        }
        match this.deadline {
            Some((timeout, sleep)) => {
                std::task::ready!(sleep.as_mut().poll(cx));
                let status = tonic::Status::deadline_exceeded(format!(
                    "the call's deadline (grpc-timeout: {timeout:?}) passed before it was answered"
                ));
                Poll::Ready(Ok(status.into_http()))
            }
            None => Poll::Pending,
        }
    }
}

/// The duration a `grpc-timeout` value says: at most eight digits and a
/// unit (`H`, `M`, `S`, `m`, `u`, `n`), as gRPC over HTTP/2 defines it;
/// `None` for anything else.
fn timeout(value: &[u8]) -> Option<Duration> {
    let (unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_are_read_in_every_unit() {
        assert_eq!(timeout(b"2H"), Some(Duration::from_secs(7200)));
        assert_eq!(timeout(b"3M"), Some(Duration::from_secs(180)));
        assert_eq!(timeout(b"10S"), Some(Duration::from_secs(10)));
        assert_eq!(timeout(b"250m"), Some(Duration::from_millis(250)));
        assert_eq!(
            timeout(b"99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(timeout(b"7n"), Some(Duration::from_nanos(7)));
    }

    #[test]
    fn bad_timeouts_are_ignored() {
        for bad in [
            &b""[..],
            b"S",
            b"10",
            b"10s",
            b"123456789S",
            b"-1S",
            b"1.5S",
            b" 1S",
        ] {
            assert_eq!(timeout(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
