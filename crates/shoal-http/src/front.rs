//! The inference route as a [`Front`] takes it: an [`Inference`] — the
//! model and version its path names, its headers, its body — rather than
//! an `http::Request`.
//!
//! Why: on the path every proxied request takes, building the request's
//! `HeaderMap` (a hash and a checked copy per header, two allocations) and
//! its `Uri` cost more than everything the gateway then read from them
//! (BENCHMARKS.md, "CPU per proxied request"). A request the server loop
//! read itself keeps its header lines where they are, in the head it
//! parsed ([`RequestHeaders::Head`]), and its body whole
//! ([`RequestBody::Whole`]); one hyper read (unusual framing, percent-encoded
//! names through the router) carries its `HeaderMap` and streaming body.
//! Handlers read either through the [`Headers`] trait, which `HeaderMap`
//! implements too.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, StatusCode};
use smallvec::SmallVec;

use crate::{Answer, ApiError};

/// The inference route of a server, served before its router: given a
/// `POST` to `/v2/models/{model}[/versions/{version}]/infer` (see
/// [`crate::infer_path`]), it answers. It skips the router's matching, its
/// extensions (`ConnectInfo`, `MatchedPath`, `OriginalUri`) and its
/// extractors, and (for requests the server loop reads) `http`'s request
/// types.
pub type Front =
    Arc<dyn Fn(Inference) -> futures::future::BoxFuture<'static, Answer> + Send + Sync>;

/// One inference request, as a [`Front`] gets it.
pub struct Inference {
    /// The model its path names.
    pub model: String,
    /// The version its path names, if any.
    pub version: Option<String>,
    /// The client's address.
    pub peer: SocketAddr,
    /// Its headers, where they were read.
    pub headers: RequestHeaders,
    /// Its body, whole or still to be read.
    pub body: RequestBody,
}

/// A request's headers: as the server loop read them, or a `HeaderMap`.
pub enum RequestHeaders {
    /// The header lines of a head the server loop parsed.
    Head(RawHead),
    /// Headers hyper (or a gRPC request's metadata) gave.
    Map(HeaderMap),
}

/// Where one header line's name and value are in a [`RawHead`]: start and
/// end of each (a head is at most `MAX_HEAD` bytes, checked when parsed).
pub(crate) type Line = [u16; 4];

/// The header lines of a request head, checked by `httparse`, in place:
/// the head's bytes and where each name and value is in them. Names are
/// compared without regard to case, as HTTP names are.
pub struct RawHead {
    pub(crate) head: Bytes,
    /// Inline for the few headers clients send (curl and wrk send 3–5).
    pub(crate) lines: SmallVec<[Line; 8]>,
}

/// Header lookup by name, over a `HeaderMap` or a head as read. Values
/// are bytes (a header need not be text: see [`crate::text_of`]); a
/// repeated header reads as its first value, as `HeaderMap::get` gives.
pub trait Headers {
    /// The value of the first header `name`.
    fn first(&self, name: &HeaderName) -> Option<&[u8]>;

    /// The value of the first header named `name` (any case).
    fn first_named(&self, name: &str) -> Option<&[u8]>;

    /// The values of the headers `names`, found in one pass: a map's
    /// lookup hashes its name each time, while a request has few headers
    /// to compare. For hot paths that read several.
    fn find<const N: usize>(&self, names: [&HeaderName; N]) -> [Option<&[u8]>; N];
}

impl Headers for HeaderMap {
    fn first(&self, name: &HeaderName) -> Option<&[u8]> {
        self.get(name).map(http::HeaderValue::as_bytes)
    }

    fn first_named(&self, name: &str) -> Option<&[u8]> {
        self.get(name).map(http::HeaderValue::as_bytes)
    }

    fn find<const N: usize>(&self, names: [&HeaderName; N]) -> [Option<&[u8]>; N] {
        let mut found = [None; N];
        for (name, value) in self {
            for (slot, wanted) in found.iter_mut().zip(names) {
                if slot.is_none() && name == wanted {
                    *slot = Some(value.as_bytes());
                }
            }
        }
        found
    }
}

impl Headers for RawHead {
    fn first(&self, name: &HeaderName) -> Option<&[u8]> {
        self.first_named(name.as_str())
    }

    fn first_named(&self, name: &str) -> Option<&[u8]> {
        let [found] = self.find_bytes([name.as_bytes()]);
        found
    }

    fn find<const N: usize>(&self, names: [&HeaderName; N]) -> [Option<&[u8]>; N] {
        // `HeaderName`s are lowercase; each name's text taken once.
        self.find_bytes(names.map(|name| name.as_str().as_bytes()))
    }
}

impl RawHead {
    /// The bytes at `from..to` of the head.
    fn at(&self, from: u16, to: u16) -> &[u8] {
        &self.head[usize::from(from)..usize::from(to)]
    }

    /// [`Headers::find`] of names as bytes, in any case.
    fn find_bytes<const N: usize>(&self, names: [&[u8]; N]) -> [Option<&[u8]>; N] {
        let mut found = [None; N];
        for &[ns, ne, vs, ve] in &self.lines {
            let name = self.at(ns, ne);
            for (slot, wanted) in found.iter_mut().zip(names) {
                if slot.is_none() && name.eq_ignore_ascii_case(wanted) {
                    *slot = Some(self.at(vs, ve));
                }
            }
        }
        found
    }
}

impl Headers for RequestHeaders {
    fn first(&self, name: &HeaderName) -> Option<&[u8]> {
        match self {
            RequestHeaders::Head(head) => head.first(name),
            RequestHeaders::Map(map) => map.first(name),
        }
    }

    fn first_named(&self, name: &str) -> Option<&[u8]> {
        match self {
            RequestHeaders::Head(head) => head.first_named(name),
            RequestHeaders::Map(map) => map.first_named(name),
        }
    }

    fn find<const N: usize>(&self, names: [&HeaderName; N]) -> [Option<&[u8]>; N] {
        match self {
            RequestHeaders::Head(head) => head.find(names),
            RequestHeaders::Map(map) => map.find(names),
        }
    }
}

/// A request's body: whole already, or still to be read.
pub enum RequestBody {
    /// Read whole by the server loop (or decoded from a gRPC message).
    Whole(Bytes),
    /// Still coming: read by [`RequestBody::read`] up to a limit.
    Streamed(Body),
}

impl RequestBody {
    /// The body, read whole when it is not yet; 413 when it is larger than
    /// `limit`, as [`crate::read_body`] answers.
    pub async fn read(self, limit: usize) -> Result<Bytes, ApiError> {
        match self {
            RequestBody::Whole(bytes) if bytes.len() > limit => Err(too_large(limit)),
            RequestBody::Whole(bytes) => Ok(bytes),
            RequestBody::Streamed(body) => crate::read_body(body, limit).await,
        }
    }

    /// Refuses, before anything is read, a body still to come whose
    /// declared `Content-Length` (in `headers`) is over `limit`. A whole
    /// body's length is its own ([`RequestBody::read`] checks it): no
    /// header to look up.
    pub fn check_declared(&self, headers: &impl Headers, limit: usize) -> Result<(), ApiError> {
        match self {
            RequestBody::Whole(_) => Ok(()),
            RequestBody::Streamed(_) => {
                crate::check_length(headers.first(&http::header::CONTENT_LENGTH), limit)
            }
        }
    }
}

/// The 413 of a body larger than `limit`.
pub(crate) fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body is larger than the limit of {limit} bytes"),
    )
}

/// A header's value as text, when it is visible ASCII (or tabs), as
/// `HeaderValue::to_str` reads it.
pub fn header_str(value: &[u8]) -> Option<&str> {
    if value
        .iter()
        .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b))
    {
        // Checked: ASCII.
        std::str::from_utf8(value).ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    /// A head of `lines` (`name: value` each) as the server loop keeps it.
    fn raw(lines: &[&str]) -> RawHead {
        let mut text = String::new();
        let mut at = SmallVec::new();
        for line in lines {
            let (name, value) = line.split_once(':').unwrap();
            let ns = text.len();
            text.push_str(name);
            let ne = text.len();
            text.push_str(": ");
            let vs = text.len();
            text.push_str(value.trim());
            let ve = text.len();
            text.push_str("\r\n");
            at.push([ns, ne, vs, ve].map(|n| u16::try_from(n).unwrap()));
        }
        RawHead {
            head: Bytes::from(text),
            lines: at,
        }
    }

    #[test]
    fn a_head_and_a_map_read_alike() {
        let lines = [
            "Content-Length: 12",
            "X-Session: first",
            "x-session: second",
            "x-bin: caf\u{e9}",
        ];
        let head = raw(&lines);
        let mut map = HeaderMap::new();
        for line in lines {
            let (name, value) = line.split_once(": ").unwrap();
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(value.as_bytes()).unwrap(),
            );
        }
        let session = HeaderName::from_static("x-session");
        let bin = HeaderName::from_static("x-bin");
        let absent = HeaderName::from_static("x-absent");
        let names = [
            &session,
            &http::header::CONTENT_LENGTH,
            &absent,
            &session,
            &bin,
        ];
        let from_head = head.find(names);
        let from_map = map.find(names);
        assert_eq!(from_head, from_map);
        // A repeated header reads as its first value; a name asked twice is
        // found twice; the name's case does not matter.
        assert_eq!(from_head[0], Some(&b"first"[..]));
        assert_eq!(from_head[3], Some(&b"first"[..]));
        assert_eq!(from_head[2], None);
        for name in names {
            assert_eq!(head.first(name), map.first(name), "{name}");
            assert_eq!(head.first(name), map.get(name).map(HeaderValue::as_bytes));
        }
        assert_eq!(head.first_named("X-SESSION"), Some(&b"first"[..]));
        assert_eq!(map.first_named("X-SESSION"), Some(&b"first"[..]));
        let either = RequestHeaders::Head(head);
        assert_eq!(either.find(names), from_map);
        assert_eq!(either.first_named("content-length"), Some(&b"12"[..]));
    }

    #[test]
    fn header_text_is_what_header_value_calls_text() {
        for value in [
            &b"plain"[..],
            b"tab\there",
            b"",
            b"caf\xc3\xa9",
            b"bell\x07",
            b"del\x7f",
        ] {
            let expected = HeaderValue::from_bytes(value)
                .ok()
                .and_then(|v| v.to_str().ok().map(str::to_owned));
            assert_eq!(header_str(value).map(str::to_owned), expected, "{value:?}");
        }
    }

    #[tokio::test]
    async fn whole_bodies_are_limited_as_read_ones_are() {
        let whole = RequestBody::Whole(Bytes::from_static(b"hello!"));
        let streamed = RequestBody::Streamed(Body::from("hello!"));
        let (a, b) = (whole.read(5).await, streamed.read(5).await);
        let (a, b) = (a.unwrap_err(), b.unwrap_err());
        assert_eq!((a.status, &a.message), (b.status, &b.message));
        assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
        let ok = RequestBody::Whole(Bytes::from_static(b"hello")).read(5);
        assert_eq!(ok.await.unwrap(), "hello");
    }

    #[test]
    fn only_a_body_still_to_come_is_refused_by_its_declared_length() {
        let mut declared = HeaderMap::new();
        declared.insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("6"));
        let streamed = RequestBody::Streamed(Body::from("hello!"));
        let refused = streamed.check_declared(&declared, 5).unwrap_err();
        assert_eq!(refused.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(streamed.check_declared(&declared, 6).is_ok());
        assert!(streamed.check_declared(&HeaderMap::new(), 0).is_ok());
        // A whole body's length is checked when it is read, not here.
        let whole = RequestBody::Whole(Bytes::from_static(b"hello!"));
        assert!(whole.check_declared(&declared, 5).is_ok());
    }
}
