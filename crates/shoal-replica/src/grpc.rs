//! The replica's gRPC surface: the Open Inference Protocol's
//! `inference.GRPCInferenceService` (`shoal-grpc`), on its own port
//! (`--grpc-addr`), so `tritonclient.grpc` and KServe's gRPC clients work
//! unchanged. Every request takes the same path as a REST one
//! ([`crate::inference`]); failures carry the gRPC code for the HTTP status
//! REST would answer ([`shoal_grpc::status`]), with `retry-after` when
//! retrying elsewhere may help. Answers carry the replica and the version
//! that served them as `x-shoal-replica` and `x-shoal-model-version` metadata.
//!
//! As for REST, a request is admitted before it is decoded: `ModelInfer`
//! is served from the message's bytes ([`shoal_grpc::admit`]), whose
//! model name and version are read without parsing the tensors; the
//! protobuf decode and the check into Shoal's tensors come after
//! admission, on a blocking thread when the message is large.

use std::sync::Arc;

use shoal_api::replica::{REPLICA_HEADER, SEQUENCE_FROM_HEADER, VERSION_HEADER};
use shoal_grpc::admit::{DecodeAfterAdmission, InferBeforeDecode, RawInfer};
use shoal_grpc::pb::grpc_inference_service_server::GrpcInferenceService;
use shoal_grpc::pb::{
    ModelInferRequest, ModelInferResponse, ModelMetadataRequest, ModelMetadataResponse,
    ModelReadyRequest, ModelReadyResponse, ServerLiveRequest, ServerLiveResponse,
    ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest, ServerReadyResponse,
};
use shoal_http::ApiError;
use tonic::codegen::BoxFuture;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};

use crate::Replica;
use crate::inference::{self, Call};

/// The service over one replica.
#[derive(Debug, Clone)]
pub struct GrpcReplica {
    replica: Arc<Replica>,
}

impl GrpcReplica {
    /// The tonic service for `replica`, with messages up to its body limit,
    /// decoding inference requests only once admitted.
    pub fn service(replica: Arc<Replica>) -> DecodeAfterAdmission<GrpcReplica> {
        let limit = replica.body_limit;
        DecodeAfterAdmission::new(GrpcReplica { replica }, limit)
    }
}

impl InferBeforeDecode for GrpcReplica {
    /// Admits the request by the model named in its bytes, then decodes
    /// it (see [`inference::infer`]).
    fn model_infer(
        self: Arc<Self>,
        request: Request<RawInfer>,
    ) -> BoxFuture<Response<ModelInferResponse>, Status> {
        Box::pin(async move {
            let (metadata, _, raw) = request.into_parts();
            let (model, asked) = raw.model()?;
            let moved_from = metadata
                .get(SEQUENCE_FROM_HEADER)
                .and_then(|v| v.to_str().ok());
            let call = Call {
                model: &model,
                version: version(&asked),
                moved_from,
            };
            let limits = self.replica.limits;
            let served = inference::infer(&self.replica, call, || async move {
                Ok(raw.decode(limits).await)
            })
            .await
            .map_err(|e| status_of(&e))?;
            let version = served.serving.version.as_str();
            let (request, outputs) = served.answer.map_err(|e| status_of(&e))?;
            let mut response = Response::new(shoal_grpc::codec::encode_response(
                served.serving.model.as_str(),
                version,
                request.id.as_deref(),
                &outputs,
            ));
            let metadata = response.metadata_mut();
            if let Ok(v) = MetadataValue::try_from(self.replica.id()) {
                metadata.insert(REPLICA_HEADER, v);
            }
            if let Ok(v) = MetadataValue::try_from(version) {
                metadata.insert(VERSION_HEADER, v);
            }
            Ok(response)
        })
    }
}

/// The gRPC status for a failure REST answers with `e`.
pub fn status_of(e: &ApiError) -> Status {
    let mut status = Status::new(
        shoal_grpc::status::code_for_http(e.status.as_u16()),
        e.message.clone(),
    );
    if let Some(after) = e.retry_after
        && let Ok(v) = MetadataValue::try_from(after.to_string())
    {
        status.metadata_mut().insert("retry-after", v);
    }
    status
}

/// `Some(version)` unless empty (the protocol's "any version").
fn version(v: &str) -> Option<&str> {
    (!v.is_empty()).then_some(v)
}

#[tonic::async_trait]
impl GrpcInferenceService for GrpcReplica {
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
            ready: self.replica.ready_state().ready,
        }))
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let r = request.into_inner();
        let ready = self
            .replica
            .store()
            .lookup(&r.name, version(&r.version))
            .is_ok();
        Ok(Response::new(ModelReadyResponse { ready }))
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
        let metadata = crate::http::model_metadata_of(&self.replica, &r.name, version(&r.version))
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(shoal_grpc::codec::model_metadata(&metadata)))
    }

    /// Not reached through [`GrpcReplica::service`]; the same path.
    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        shoal_grpc::admit::model_infer_decoded(Arc::new(self.clone()), request).await
    }
}
