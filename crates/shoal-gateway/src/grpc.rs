//! The gateway's gRPC surface: `inference.GRPCInferenceService` on
//! `--grpc-addr`, routed by the very path REST requests take. A
//! `ModelInferRequest` is decoded only once its caller's API key and rate
//! limit pass ([`shoal_grpc::admit`]: the model's name is read from the
//! message's bytes first), then checked and turned into a REST request with
//! every tensor as binary data (`shoal_oip::binary::encode_request`: raw
//! bytes stay raw), which [`crate::proxy::infer_common`] routes like any
//! other (API keys and rate limits from the gRPC metadata, the model's
//! traffic split and sticky header, sequences, balancing, health, retries
//! within the budget, hedging, shadowing, metrics); the replica's answer
//! comes back as a `ModelInferResponse` with `raw_output_contents`, and a
//! failure as the gRPC code for the HTTP status REST would answer, with
//! `retry-after`. The gateway's `x-shoal-*` headers become response
//! metadata. Replicas need no gRPC port for this.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use shoal_grpc::admit::{DecodeAfterAdmission, InferBeforeDecode, RawInfer};
use shoal_grpc::pb::grpc_inference_service_server::GrpcInferenceService;
use shoal_grpc::pb::{
    ModelInferRequest, ModelInferResponse, ModelMetadataRequest, ModelMetadataResponse,
    ModelReadyRequest, ModelReadyResponse, ServerLiveRequest, ServerLiveResponse,
    ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest, ServerReadyResponse,
};
use shoal_http::{Answer, ApiError, RequestBody, RequestHeaders, header_str};
use tonic::codegen::BoxFuture;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Response, Status};

use crate::Gateway;
use crate::proxy;

/// The service over one gateway.
#[derive(Clone)]
pub struct GrpcGateway {
    gateway: Arc<Gateway>,
}

impl std::fmt::Debug for GrpcGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GrpcGateway")
    }
}

impl GrpcGateway {
    /// The tonic service for `gateway`, with messages up to its body
    /// limit, decoding inference requests only once the caller is admitted.
    pub fn service(gateway: Arc<Gateway>) -> DecodeAfterAdmission<GrpcGateway> {
        let limit = gateway.config.body_limit;
        DecodeAfterAdmission::new(GrpcGateway { gateway }, limit)
    }

    /// Routes one inference: the caller's API key and rate limit are
    /// checked first, as REST checks them before reading the body; the
    /// message is decoded once they pass.
    async fn infer(
        &self,
        peer: SocketAddr,
        metadata: MetadataMap,
        raw: RawInfer,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let (model, asked) = raw.model()?;
        let mut headers = headers_of(metadata);
        let pinned = version(&asked).map(str::to_owned);
        let (body, admitted) = match self.gateway.protection.admit(&headers, Some(peer)) {
            Err(refusal) => (Err(proxy::refusal_error(&self.gateway, refusal)), None),
            Ok(who) => match raw.decode(shoal_oip::Limits::default()).await {
                Ok(decoded) => {
                    let (body, json_len) = shoal_oip::binary::encode_request(&decoded);
                    headers.insert(shoal_oip::BINARY_HEADER, HeaderValue::from(json_len));
                    headers.insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/octet-stream"),
                    );
                    (Ok(RequestBody::Whole(body.into())), Some(who))
                }
                Err(e) => (Err(ApiError::bad_request(e)), None),
            },
        };
        let answer = proxy::infer_common(
            self.gateway.clone(),
            model,
            pinned,
            peer,
            RequestHeaders::Map(headers),
            body,
            admitted,
        )
        .await;
        if answer.status() != StatusCode::OK {
            return Err(status_of(&answer));
        }
        let forwarded: Vec<(&str, &str)> = FORWARDED
            .iter()
            .filter_map(|name| Some((*name, header_str(answer.header(name)?)?)))
            .collect();
        let json_len = answer.header(shoal_oip::BINARY_HEADER).and_then(header_str);
        let bytes = answer.body();
        let decoded = shoal_oip::decode_response_parts(bytes, json_len)
            .map_err(|e| Status::internal(format!("the replica's answer is not valid: {}", e.0)))?;
        let mut response = Response::new(shoal_grpc::codec::encode_response(
            &decoded.model_name,
            decoded.model_version.as_deref().unwrap_or_default(),
            decoded.id.as_deref(),
            &decoded.outputs,
        ));
        for (name, value) in forwarded {
            if let Ok(v) = MetadataValue::try_from(value) {
                response.metadata_mut().insert(name, v);
            }
        }
        Ok(response)
    }
}

/// The caller's address (unspecified when tonic does not know it).
fn peer_of<T>(request: &Request<T>) -> SocketAddr {
    request
        .remote_addr()
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
}

impl InferBeforeDecode for GrpcGateway {
    fn model_infer(
        self: Arc<Self>,
        request: Request<RawInfer>,
    ) -> BoxFuture<Response<ModelInferResponse>, Status> {
        Box::pin(async move {
            let peer = peer_of(&request);
            let (metadata, _, raw) = request.into_parts();
            self.infer(peer, metadata, raw).await
        })
    }
}

/// Response headers the gateway adds that gRPC clients see as metadata.
const FORWARDED: [&str; 4] = [
    shoal_api::replica::REPLICA_HEADER,
    shoal_api::replica::VERSION_HEADER,
    "x-shoal-retried-from",
    "x-shoal-hedged-from",
];

/// The gRPC status for a REST answer that is not a success: the code for
/// its HTTP status, its `{"error": …}` message, its `Retry-After`.
fn status_of(answer: &Answer) -> Status {
    let (status, message) = proxy::error_of(answer);
    let mut grpc = Status::new(shoal_grpc::status::code_for_http(status.as_u16()), message);
    if let Some(v) = answer.header("retry-after").and_then(header_str)
        && let Ok(v) = MetadataValue::try_from(v)
    {
        grpc.metadata_mut().insert("retry-after", v);
    }
    grpc
}

/// The request's metadata as the headers a REST request would carry
/// (API key, sticky and session headers…), without gRPC's own.
fn headers_of(metadata: MetadataMap) -> HeaderMap {
    let mut headers = metadata.into_headers();
    for grpc_only in [
        header::CONTENT_TYPE,
        header::CONTENT_LENGTH,
        header::TE,
        header::USER_AGENT,
    ] {
        headers.remove(grpc_only);
    }
    // Timeouts and encodings of gRPC's own, which REST would not read.
    let grpc: Vec<_> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("grpc-"))
        .cloned()
        .collect();
    for k in grpc {
        headers.remove(k);
    }
    headers
}

/// `Some(version)` unless empty (the protocol's "any version").
fn version(v: &str) -> Option<&str> {
    (!v.is_empty()).then_some(v)
}

/// A metadata or readiness read, forwarded to a replica serving `model`.
async fn forward(gateway: &Gateway, model: &str, v: &str, suffix: &str) -> Answer {
    let path = match version(v) {
        Some(v) => format!("/v2/models/{model}/versions/{v}{suffix}"),
        None => format!("/v2/models/{model}{suffix}"),
    };
    proxy::forward_get(gateway, model, version(v), &path).await
}

#[tonic::async_trait]
impl GrpcInferenceService for GrpcGateway {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse {
            ready: proxy::any_available(&self.gateway),
        }))
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let r = request.into_inner();
        let answer = forward(&self.gateway, &r.name, &r.version, "/ready").await;
        Ok(Response::new(ModelReadyResponse {
            ready: answer.status() == StatusCode::OK,
        }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(shoal_grpc::codec::server_metadata(
            &shoal_oip::ServerMetadata::shoal(),
        )))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let r = request.into_inner();
        let answer = forward(&self.gateway, &r.name, &r.version, "").await;
        if answer.status() != StatusCode::OK {
            return Err(status_of(&answer));
        }
        let metadata: shoal_oip::ModelMetadata = serde_json::from_slice(answer.body())
            .map_err(|e| Status::internal(format!("the replica's metadata is not valid: {e}")))?;
        Ok(Response::new(shoal_grpc::codec::model_metadata(&metadata)))
    }

    /// Not reached through [`GrpcGateway::service`]; the same path.
    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        shoal_grpc::admit::model_infer_decoded(Arc::new(self.clone()), request).await
    }
}
