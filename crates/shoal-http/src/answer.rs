//! [`Answer`]: what a [`crate::Front`] answers — a status, header lines as
//! they go on the wire, and the whole body.
//!
//! Why not an `http::Response`: a proxied answer's headers were parsed
//! from the replica's head into a `HeaderMap` (a hash and a checked copy
//! each, two allocations), looked up and added to by hashing, and walked
//! again to be written: ≈ 1.4k instructions a request, where the gateway
//! passes on a few lines it has already checked (BENCHMARKS.md, "CPU per
//! proxied request"). An answer keeps those lines as bytes: added to by
//! appending, read by a scan of a few lines, written with one copy. Every
//! line in it is valid (names are tokens, values have no CR, LF or NUL):
//! lines come only from `HeaderName`/`HeaderValue`s or from heads
//! `httparse` checked.

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode, header};

use crate::{ApiError, ErrorBody};

/// A status, header lines and a whole body.
#[derive(Debug, Clone)]
pub struct Answer {
    status: StatusCode,
    /// `name: value\r\n` each; none of the framing headers
    /// (`content-length`, `transfer-encoding`, `connection`), which the
    /// writer says itself.
    lines: Vec<u8>,
    /// A `date` line is among them.
    dated: bool,
    body: Bytes,
}

impl Answer {
    /// An answer with no headers yet.
    pub fn new(status: StatusCode, body: Bytes) -> Answer {
        Answer {
            status,
            lines: Vec::new(),
            dated: false,
            body,
        }
    }

    /// Like [`Answer::new`], with room for `lines` bytes of header lines.
    pub fn with_capacity(status: StatusCode, body: Bytes, lines: usize) -> Answer {
        Answer {
            lines: Vec::with_capacity(lines),
            ..Answer::new(status, body)
        }
    }

    /// Its status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// Its body.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Sets its body.
    pub fn set_body(&mut self, body: Bytes) {
        self.body = body;
    }

    /// Its body, taken.
    pub fn into_body(self) -> Bytes {
        self.body
    }

    /// Adds the header `name: value` (after any of the same name).
    /// Framing headers are the writer's to say, and ignored here.
    pub fn push(&mut self, name: &HeaderName, value: &HeaderValue) {
        self.push_line(name.as_str().as_bytes(), value.as_bytes());
    }

    /// Adds a header line as `httparse` read it (so it is valid).
    pub fn push_parsed(&mut self, line: &httparse::Header<'_>) {
        self.push_line(line.name.as_bytes(), line.value);
    }

    /// Adds a line whose name and value are known to be valid.
    fn push_line(&mut self, name: &[u8], value: &[u8]) {
        if framing(name) {
            return;
        }
        self.dated |= name.eq_ignore_ascii_case(b"date");
        self.lines.reserve(name.len() + value.len() + 4);
        self.lines.extend_from_slice(name);
        self.lines.extend_from_slice(b": ");
        self.lines.extend_from_slice(value);
        self.lines.extend_from_slice(b"\r\n");
    }

    /// The value of the first header named `name` (any case).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers()
            .find(|(line, _)| line.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, value)| value)
    }

    /// Each header's name and value, in order.
    pub fn headers(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.lines
            .split(|&b| b == b'\n')
            .filter_map(|line| line.strip_suffix(b"\r"))
            .filter_map(|line| {
                let colon = line.iter().position(|&b| b == b':')?;
                Some((&line[..colon], line[colon + 1..].trim_ascii()))
            })
    }

    /// The header lines as written: `name: value\r\n` each.
    pub(crate) fn lines(&self) -> &[u8] {
        &self.lines
    }

    /// Whether it has a `date` header.
    pub(crate) fn dated(&self) -> bool {
        self.dated
    }
}

/// Whether `name` is a header the writer of an answer says itself.
fn framing(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"content-length")
        || name.eq_ignore_ascii_case(b"transfer-encoding")
        || name.eq_ignore_ascii_case(b"connection")
}

impl IntoResponse for Answer {
    /// For hyper's connections and the router: the lines into a map.
    fn into_response(self) -> Response {
        let mut headers = http::HeaderMap::new();
        for (name, value) in self.headers() {
            // Valid by construction (see the module doc).
            if let (Ok(name), Ok(value)) =
                (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
            {
                headers.append(name, value);
            }
        }
        let mut response = Response::new(Body::from(self.body));
        *response.status_mut() = self.status;
        *response.headers_mut() = headers;
        response
    }
}

impl ApiError {
    /// The error as an [`Answer`]: what [`IntoResponse`] makes of it,
    /// logged the same way.
    pub fn into_answer(self) -> Answer {
        self.log();
        let body = serde_json::to_vec(&ErrorBody {
            error: self.message,
        })
        .unwrap_or_default();
        let mut answer = Answer::new(self.status, body.into());
        answer.push(
            &header::CONTENT_TYPE,
            &HeaderValue::from_static("application/json"),
        );
        if let Some(secs) = self.retry_after {
            answer.push(&header::RETRY_AFTER, &HeaderValue::from(secs));
        }
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_added_read_and_made_a_response() {
        let mut answer = Answer::new(StatusCode::CREATED, Bytes::from_static(b"{}"));
        answer.push(&header::CONTENT_TYPE, &HeaderValue::from_static("a/b"));
        let mut slots = [httparse::EMPTY_HEADER; 4];
        httparse::parse_headers(
            b"X-Shoal-Model-Version:  7 \r\nContent-Length: 2\r\nDate: today\r\n\r\n",
            &mut slots,
        )
        .unwrap();
        for line in slots.iter().filter(|h| !h.name.is_empty()) {
            answer.push_parsed(line);
        }
        answer.push(&header::CONNECTION, &HeaderValue::from_static("close"));
        // Framing headers are the writer's: not kept. (httparse trims
        // the value.)
        assert_eq!(
            String::from_utf8_lossy(answer.lines()),
            "content-type: a/b\r\nX-Shoal-Model-Version: 7\r\nDate: today\r\n"
        );
        assert!(answer.dated());
        assert_eq!(answer.header("x-shoal-model-version"), Some(&b"7"[..]));
        assert_eq!(answer.header("CONTENT-TYPE"), Some(&b"a/b"[..]));
        assert_eq!(answer.header("content-length"), None);
        let response = answer.clone().into_response();
        assert_eq!(response.status(), StatusCode::CREATED);
        assert_eq!(response.headers()["x-shoal-model-version"], "7");
        assert_eq!(response.headers()["date"], "today");
        assert_eq!(response.headers().len(), 3);
    }

    #[tokio::test]
    async fn errors_answer_as_they_respond() {
        let error = || ApiError {
            retry_after: Some(3),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy")
        };
        let answer = error().into_answer();
        let response = error().into_response();
        assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer.body().as_ref(), br#"{"error":"busy"}"#);
        assert_eq!(answer.header("retry-after"), Some(&b"3"[..]));
        // The same status, headers (in order) and body as the response.
        assert_eq!(answer.status(), response.status());
        let from_response: Vec<(&[u8], &[u8])> = response
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()))
            .collect();
        assert_eq!(answer.headers().collect::<Vec<_>>(), from_response);
        let body = crate::read_body(response.into_body(), usize::MAX).await;
        assert_eq!(answer.body(), &body.unwrap());
    }
}
