//! Extractors that refuse bad requests in the JSON error shape: axum's own
//! `Path`, `Query` and `Json` answer their rejections as plain text (`Failed
//! to deserialize query string…`); these wrap them and turn every
//! rejection into an [`ApiError`] with the rejection's status and a
//! message that says which part of the request was wrong.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::ApiError;

/// Path parameters; a rejection (say, invalid percent-encoding) is a 400
/// in JSON.
#[derive(Debug, Clone, Copy, Default)]
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| Path(v))
            .map_err(|e| ApiError::new(e.status(), format!("bad path: {}", e.body_text())))
    }
}

/// The query string; a rejection is a 400 in JSON naming the parameter.
#[derive(Debug, Clone, Copy, Default)]
pub struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| Query(v))
            .map_err(|e| ApiError::new(e.status(), format!("bad query: {}", e.body_text())))
    }
}

/// A JSON body; a rejection says why in JSON: 415 without a JSON content
/// type, 413 over the body limit, 400 for anything wrong with the JSON
/// itself (syntax, a missing, unknown or mistyped field).
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        axum::Json::<T>::from_request(req, state)
            .await
            .map(|axum::Json(v)| Json(v))
            .map_err(|e| {
                let status = match e.status() {
                    http::StatusCode::UNPROCESSABLE_ENTITY => http::StatusCode::BAD_REQUEST,
                    other => other,
                };
                ApiError::new(status, e.body_text())
            })
    }
}

/// A JSON body that may be absent: no body (or no JSON content type and no
/// body) gives `T::default()`; anything else is read as [`Json`].
#[derive(Debug, Clone, Copy, Default)]
pub struct OptionalJson<T>(pub T);

impl<T, S> FromRequest<S> for OptionalJson<T>
where
    T: DeserializeOwned + Default,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let empty = req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() == b"0")
            || (!req.headers().contains_key(http::header::CONTENT_TYPE)
                && !req.headers().contains_key(http::header::CONTENT_LENGTH)
                && !req.headers().contains_key(http::header::TRANSFER_ENCODING));
        if empty {
            return Ok(OptionalJson(T::default()));
        }
        Json::<T>::from_request(req, state)
            .await
            .map(|Json(v)| OptionalJson(v))
    }
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::body::Body;
    use axum::routing::{get, post};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;

    #[derive(serde::Deserialize, Default)]
    struct Q {
        #[allow(dead_code)]
        limit: u32,
    }

    async fn call(app: &Router, request: http::Request<Body>) -> (u16, serde_json::Value) {
        let response = app.clone().oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn every_rejection_is_json() {
        let app = Router::new()
            .route(
                "/m/{name}",
                get(|Path(name): Path<String>| async move { name }),
            )
            .route("/q", get(|Query(_): Query<Q>| async { "ok" }))
            .route("/j", post(|Json(_): Json<Q>| async { "ok" }))
            .route(
                "/o",
                post(|OptionalJson(_): OptionalJson<Q>| async { "ok" }),
            );
        let get_req = |uri: &str| http::Request::get(uri).body(Body::empty()).unwrap();
        let (status, body) = call(&app, get_req("/m/%ff")).await;
        assert_eq!(status, 400);
        assert!(
            body["error"].as_str().unwrap().starts_with("bad path"),
            "{body}"
        );
        let (status, body) = call(&app, get_req("/q?limit=x")).await;
        assert_eq!(status, 400);
        assert!(body["error"].as_str().unwrap().contains("limit"), "{body}");
        let post_req = |uri: &str, ct: Option<&str>, body: &'static str| {
            let mut b = http::Request::post(uri);
            if let Some(ct) = ct {
                b = b.header("content-type", ct);
            }
            b.body(Body::from(body)).unwrap()
        };
        let (status, _) = call(&app, post_req("/j", None, "{}")).await;
        assert_eq!(status, 415);
        let (status, body) = call(&app, post_req("/j", Some("application/json"), "{")).await;
        assert_eq!(status, 400, "{body}");
        let (status, body) = call(
            &app,
            post_req("/j", Some("application/json"), r#"{"limit":"x"}"#),
        )
        .await;
        assert_eq!(status, 400, "{body}");
        assert!(body["error"].as_str().unwrap().contains("limit"), "{body}");
        // An optional body may be left out.
        let response = app
            .clone()
            .oneshot(http::Request::post("/o").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
}
