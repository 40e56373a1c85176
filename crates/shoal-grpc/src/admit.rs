//! `ModelInfer` with its message decoded *after* the server has admitted
//! it. tonic's generated server decodes every protobuf message before the
//! handler runs, so an overloaded replica would pay for parsing a request
//! it is about to refuse. [`DecodeAfterAdmission`] serves the whole
//! service but takes the `ModelInfer` route itself, with a codec that hands
//! the handler the message's bytes ([`RawInfer`]): the handler reads the
//! model's name and version from them (skipping every other field, which
//! costs nothing for length-delimited ones), admits the request or refuses
//! it, and only then decodes it ([`RawInfer::decode`], on a blocking
//! thread when it is large). Every other method goes to the generated
//! server unchanged.

use std::convert::Infallible;
use std::sync::Arc;

use prost::Message;
use shoal_oip::{DecodedRequest, Limits};
use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic::codegen::{BoxFuture, Bytes, Context, Poll, Service, StdError, http};
use tonic::server::NamedService;
use tonic_prost::ProstEncoder;

use crate::pb::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};
use crate::pb::{ModelInferRequest, ModelInferResponse};

/// The route of `ModelInfer`.
pub const MODEL_INFER_PATH: &str = "/inference.GRPCInferenceService/ModelInfer";

/// A `ModelInfer` request's message, not yet decoded.
#[derive(Debug, Clone)]
pub struct RawInfer {
    message: Bytes,
}

/// The two fields of `ModelInferRequest` a server routes by; decoding into
/// it skips the others.
#[derive(Clone, PartialEq, prost::Message)]
struct Head {
    #[prost(string, tag = "1")]
    model_name: String,
    #[prost(string, tag = "2")]
    model_version: String,
}

impl RawInfer {
    /// The message as it came (for tests and proxies).
    pub fn new(message: Bytes) -> Self {
        RawInfer { message }
    }

    /// The model and version (empty: the model's default) the request is
    /// for, without decoding the rest. A message that is not protobuf is
    /// `InvalidArgument`.
    pub fn model(&self) -> Result<(String, String), tonic::Status> {
        let head = Head::decode(self.message.clone()).map_err(|e| {
            tonic::Status::invalid_argument(format!(
                "invalid ModelInferRequest: not a protobuf message ({e})"
            ))
        })?;
        Ok((head.model_name, head.model_version))
    }

    /// Decodes and checks the request into tensors within `limits`, on a
    /// blocking thread when it is large ([`shoal_http::decode_off_worker`]).
    /// `Err` says what is wrong, for an `InvalidArgument`.
    pub async fn decode(self, limits: Limits) -> Result<DecodedRequest, String> {
        let len = self.message.len();
        shoal_http::decode_off_worker(len, move || {
            let request = ModelInferRequest::decode(self.message)
                .map_err(|e| format!("invalid ModelInferRequest: {e}"))?;
            crate::codec::decode_request(request, &limits).map_err(|e| e.0)
        })
        .await?
    }
}

/// What serves `ModelInfer` from undecoded messages.
pub trait InferBeforeDecode: Send + Sync + 'static {
    /// Serves one `ModelInfer` call.
    fn model_infer(
        self: Arc<Self>,
        request: tonic::Request<RawInfer>,
    ) -> BoxFuture<tonic::Response<ModelInferResponse>, tonic::Status>;
}

/// The generated trait's `model_infer`, for a `T` that serves it from
/// bytes: the message is encoded back and served like any other, so a
/// service has one inference path (the generated method is not reached
/// through [`DecodeAfterAdmission`]).
pub async fn model_infer_decoded<T: InferBeforeDecode>(
    handler: Arc<T>,
    request: tonic::Request<ModelInferRequest>,
) -> Result<tonic::Response<ModelInferResponse>, tonic::Status> {
    handler
        .model_infer(request.map(|m| RawInfer::new(m.encode_to_vec().into())))
        .await
}

/// The generated server for `T`, with `ModelInfer` taken by `T`'s
/// [`InferBeforeDecode`].
#[derive(Debug)]
pub struct DecodeAfterAdmission<T> {
    server: GrpcInferenceServiceServer<T>,
    handler: Arc<T>,
    max_decoding: usize,
}

impl<T> Clone for DecodeAfterAdmission<T> {
    fn clone(&self) -> Self {
        DecodeAfterAdmission {
            server: self.server.clone(),
            handler: self.handler.clone(),
            max_decoding: self.max_decoding,
        }
    }
}

impl<T: GrpcInferenceService + InferBeforeDecode> DecodeAfterAdmission<T> {
    /// Serves `handler`, refusing messages over `max_decoding` bytes (with
    /// `ResourceExhausted`, as tonic does).
    pub fn new(handler: T, max_decoding: usize) -> Self {
        let handler = Arc::new(handler);
        DecodeAfterAdmission {
            server: GrpcInferenceServiceServer::from_arc(handler.clone())
                .max_decoding_message_size(max_decoding)
                .max_encoding_message_size(usize::MAX),
            handler,
            max_decoding,
        }
    }
}

impl<T> NamedService for DecodeAfterAdmission<T> {
    const NAME: &'static str = crate::pb::grpc_inference_service_server::SERVICE_NAME;
}

impl<T, B> Service<http::Request<B>> for DecodeAfterAdmission<T>
where
    T: GrpcInferenceService + InferBeforeDecode,
    B: tonic::codegen::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::<http::Request<B>>::poll_ready(&mut self.server, cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != MODEL_INFER_PATH {
            return self.server.call(request);
        }
        let handler = Infer(self.handler.clone());
        let max_decoding = self.max_decoding;
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(RawCodec)
                .apply_max_message_size_config(Some(max_decoding), Some(usize::MAX));
            Ok(grpc.unary(handler, request).await)
        })
    }
}

/// `ModelInfer` as tonic's unary service.
struct Infer<T>(Arc<T>);

impl<T: InferBeforeDecode> tonic::server::UnaryService<RawInfer> for Infer<T> {
    type Response = ModelInferResponse;
    type Future = BoxFuture<tonic::Response<ModelInferResponse>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<RawInfer>) -> Self::Future {
        self.0.clone().model_infer(request)
    }
}

/// Answers encoded with prost; requests kept as bytes.
#[derive(Debug, Clone, Copy)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = ModelInferResponse;
    type Decode = RawInfer;
    type Encoder = ProstEncoder<ModelInferResponse>;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawDecoder
    }
}

/// Takes a message's bytes as they are (no copy: tonic's buffer is split).
#[derive(Debug, Clone, Copy)]
struct RawDecoder;

impl Decoder for RawDecoder {
    type Item = RawInfer;
    type Error = tonic::Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<RawInfer>, tonic::Status> {
        use bytes::Buf;
        Ok(Some(RawInfer {
            message: buf.copy_to_bytes(buf.remaining()),
        }))
    }
}

/// Sends `message` (with its metadata) as a `ModelInfer` call's bytes, as
/// they are: for tests that must send what a typed client cannot (a
/// message that fails to decode), and for proxies that forward without
/// decoding.
pub async fn model_infer_raw(
    channel: tonic::transport::Channel,
    message: tonic::Request<Bytes>,
) -> Result<tonic::Response<ModelInferResponse>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("the server is not ready: {e}")))?;
    let path = http::uri::PathAndQuery::from_static(MODEL_INFER_PATH);
    grpc.unary(message.map(RawInfer::new), path, RawClientCodec)
        .await
}

/// Requests sent as bytes; answers decoded with prost.
#[derive(Debug, Clone, Copy)]
struct RawClientCodec;

impl Codec for RawClientCodec {
    type Encode = RawInfer;
    type Decode = ModelInferResponse;
    type Encoder = RawEncoder;
    type Decoder = tonic_prost::ProstDecoder<ModelInferResponse>;

    fn encoder(&mut self) -> Self::Encoder {
        RawEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

/// Writes a message's bytes as they are.
#[derive(Debug, Clone, Copy)]
struct RawEncoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = RawInfer;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: RawInfer,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        buf.put(item.message);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::model_infer_request::InferInputTensor;

    fn request() -> ModelInferRequest {
        ModelInferRequest {
            model_name: "digits".into(),
            model_version: "2".into(),
            id: "r1".into(),
            inputs: vec![InferInputTensor {
                name: "x".into(),
                datatype: "FP32".into(),
                shape: vec![1, 2],
                ..Default::default()
            }],
            raw_input_contents: vec![[1.0f32.to_le_bytes(), 2.0f32.to_le_bytes()].concat()],
            ..Default::default()
        }
    }

    #[test]
    fn the_model_is_read_without_decoding_the_rest() {
        let raw = RawInfer::new(request().encode_to_vec().into());
        assert_eq!(raw.model().unwrap(), ("digits".into(), "2".into()));
        let empty = RawInfer::new(Bytes::new());
        assert_eq!(empty.model().unwrap(), (String::new(), String::new()));
    }

    #[test]
    fn a_message_that_is_not_protobuf_is_an_invalid_argument() {
        let raw = RawInfer::new(Bytes::from_static(b"\x0a\xff\xff\xff\xff\x0f{"));
        let status = raw.model().unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains("not a protobuf message"),
            "{status:?}"
        );
    }

    /// Answers with the model and version it read from the bytes.
    struct Echo;

    impl InferBeforeDecode for Echo {
        fn model_infer(
            self: Arc<Self>,
            request: tonic::Request<RawInfer>,
        ) -> BoxFuture<tonic::Response<ModelInferResponse>, tonic::Status> {
            Box::pin(async move {
                let (model_name, model_version) = request.get_ref().model()?;
                Ok(tonic::Response::new(ModelInferResponse {
                    model_name,
                    model_version,
                    ..Default::default()
                }))
            })
        }
    }

    #[tokio::test]
    async fn a_decoded_message_is_served_from_its_bytes() {
        let answer = model_infer_decoded(Arc::new(Echo), tonic::Request::new(request()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (answer.model_name.as_str(), answer.model_version.as_str()),
            ("digits", "2")
        );
    }

    #[tokio::test]
    async fn decoding_gives_what_the_typed_path_gives() {
        let limits = Limits::default();
        let typed = crate::codec::decode_request(request(), &limits).unwrap();
        let raw = RawInfer::new(request().encode_to_vec().into());
        assert_eq!(raw.decode(limits).await.unwrap(), typed);
        // Large enough to be decoded on a blocking thread.
        let mut big = request();
        let n = shoal_http::DECODE_INLINE_BYTES;
        big.inputs[0].shape = vec![1, n as i64];
        big.raw_input_contents = vec![vec![0; n * 4]];
        let decoded = RawInfer::new(big.encode_to_vec().into())
            .decode(limits)
            .await
            .unwrap();
        assert_eq!(decoded.inputs[0].shape(), &[1, n]);
        let bad = RawInfer::new(Bytes::from_static(b"\x0a\x05ab"));
        assert!(
            bad.decode(limits)
                .await
                .unwrap_err()
                .contains("invalid ModelInferRequest")
        );
    }
}
