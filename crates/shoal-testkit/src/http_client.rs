//! A small HTTP/1 client for tests against real servers: pooled
//! connections, whole bodies, JSON helpers.

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// A pooled HTTP/1 client.
#[derive(Debug, Clone)]
pub struct HttpClient {
    client: Client<HttpConnector, Full<Bytes>>,
}

/// A whole response.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status code.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON; panics with the body text if it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The message of a Shoal error body, checking its shape
    /// (`{"error": "…"}`, nothing else).
    pub fn error(&self) -> String {
        let v = self.json();
        assert_eq!(
            v.as_object().map(|o| o.len()),
            Some(1),
            "error body has one field: {v}"
        );
        v["error"].as_str().expect("error is a string").to_owned()
    }
}

/// Calls `app` in-process (the router as a tower service, no socket) and
/// collects the whole response.
pub async fn call_router(
    app: &axum::Router,
    method: Method,
    uri: &str,
    headers: &[(&str, &str)],
    body: impl Into<axum::body::Body>,
) -> Reply {
    use tower::ServiceExt;
    let mut request = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = app
        .clone()
        .oneshot(request.body(body.into()).expect("a valid request"))
        .await
        .expect("routers do not fail");
    let (parts, body) = response.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.expect("a whole body").to_bytes(),
    }
}

impl Default for HttpClient {
    fn default() -> Self {
        HttpClient::new()
    }
}

impl HttpClient {
    /// A new client.
    pub fn new() -> HttpClient {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        HttpClient {
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }

    /// Sends a request; transport errors come back as `Err(text)`. A
    /// request to a control plane the test registered carries its admin
    /// token ([`crate::tokens`]) unless `headers` set `authorization`.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<Reply, String> {
        let explicit = headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("authorization"));
        let token = (!explicit)
            .then(|| crate::tokens::admin_token_for(url))
            .flatten();
        let bearer = token.map(|t| format!("Bearer {t}"));
        let mut all: Vec<(&str, &str)> = headers.to_vec();
        if let Some(b) = &bearer {
            all.push(("authorization", b));
        }
        self.send_as(method, url, &all, body).await
    }

    /// Sends exactly these headers (no token added): for tests of
    /// authentication itself.
    pub async fn send_as(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<Reply, String> {
        let mut builder = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let request = builder
            .body(Full::new(body.into()))
            .map_err(|e| e.to_string())?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// GET `url`; panics on transport errors.
    pub async fn get(&self, url: &str) -> Reply {
        self.send(Method::GET, url, &[], Bytes::new())
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"))
    }

    /// POST a JSON body to `url`; panics on transport errors.
    pub async fn post_json(&self, url: &str, body: impl Into<Bytes>) -> Reply {
        self.send(
            Method::POST,
            url,
            &[("content-type", "application/json")],
            body,
        )
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"))
    }

    /// PUT a JSON body to `url`; panics on transport errors.
    pub async fn put_json(&self, url: &str, body: impl Into<Bytes>) -> Reply {
        self.send(
            Method::PUT,
            url,
            &[("content-type", "application/json")],
            body,
        )
        .await
        .unwrap_or_else(|e| panic!("PUT {url}: {e}"))
    }
}
