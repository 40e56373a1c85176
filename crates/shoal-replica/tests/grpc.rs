//! The replica's gRPC service on a real socket: Triton's own
//! `tritonclient.grpc` used unchanged (answers equal to REST's, errors with
//! the right codes), typed contents, the replica and version in the
//! response metadata, and a stateful model's sequence carried over gRPC
//! with the protocol's sequence parameters.

use std::collections::BTreeMap;
use std::sync::Arc;

use shoal_core::{Tensor, TensorData};
use shoal_grpc::pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use shoal_grpc::pb::infer_parameter::ParameterChoice;
use shoal_grpc::pb::model_infer_request::InferInputTensor;
use shoal_grpc::pb::{InferParameter, InferTensorContents, ModelInferRequest};
use shoal_replica::{ModelSpec, ReplicaConfig, ReplicaServer};
use shoal_runtime::tract::TractBackend;
use shoal_runtime::{LoadOptions, LoadedModel};
use shoal_testkit::{HttpClient, Samples, model_path};

fn vad_state() -> BTreeMap<String, String> {
    [("h", "hn"), ("c", "cn")]
        .into_iter()
        .map(|(i, o)| (i.to_owned(), o.to_owned()))
        .collect()
}

async fn start() -> ReplicaServer {
    let config = ReplicaConfig {
        id: Some("grpc-test".into()),
        grpc_addr: Some(([127, 0, 0, 1], 0).into()),
        models: vec![
            ModelSpec {
                name: "digits".parse().unwrap(),
                version: "2".parse().unwrap(),
                path: model_path("digits-v2.onnx"),
            },
            ModelSpec {
                name: "vad".parse().unwrap(),
                version: "1".parse().unwrap(),
                path: model_path("silero_vad_16k_sequence.onnx"),
            },
        ],
        load_options: [(
            "vad".parse().unwrap(),
            LoadOptions::default().with_state(&vad_state()),
        )]
        .into(),
        ..ReplicaConfig::default()
    };
    let server = ReplicaServer::start(config, Arc::new(TractBackend::default()))
        .await
        .unwrap();
    server.replica.wait_ready().await;
    server
}

async fn client(server: &ReplicaServer) -> GrpcInferenceServiceClient<tonic::transport::Channel> {
    let addr = server.grpc_addr.expect("a gRPC address");
    GrpcInferenceServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triton_grpc_client_works_unchanged() {
    let server = start().await;
    let samples = Samples::load();
    #[allow(clippy::cast_precision_loss)]
    let min_accuracy = samples.accuracy["digits-v2"] - 1.0 / samples.labels.len() as f64 - 1e-9;
    let summary = shoal_testkit::tritonclient_grpc_check(
        &server.grpc_addr.unwrap().to_string(),
        &server.addr.to_string(),
        "digits",
        min_accuracy,
    )
    .await;
    assert_eq!(summary["platform"], "tract_onnx", "{summary}");
    // The gRPC requests count in the same metrics as REST's.
    let metrics = HttpClient::new()
        .get(&format!("http://{}/metrics", server.addr))
        .await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.lines()
            .any(|l| l.starts_with("model_predictions_total")
                && l.contains("outcome=\"invalid_input\"")),
        "{text}"
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_contents_answer_as_rest_does_and_name_the_replica() {
    let server = start().await;
    let samples = Samples::load();
    let rows = 8;
    let data: Vec<f32> = samples.inputs[..rows].iter().flatten().copied().collect();
    let request = ModelInferRequest {
        model_name: "digits".into(),
        inputs: vec![InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![rows as i64, 64],
            parameters: Default::default(),
            contents: Some(InferTensorContents {
                fp32_contents: data,
                ..Default::default()
            }),
        }],
        ..Default::default()
    };
    let response = client(&server).await.model_infer(request).await.unwrap();
    let metadata = response.metadata();
    assert_eq!(metadata.get("x-shoal-replica").unwrap(), "grpc-test");
    assert_eq!(metadata.get("x-shoal-model-version").unwrap(), "2");
    let response = response.into_inner();
    assert_eq!(
        (
            response.model_name.as_str(),
            response.model_version.as_str()
        ),
        ("digits", "2")
    );
    let outputs = shoal_grpc::codec::decode_response(response).unwrap();

    let rest = HttpClient::new()
        .post_json(
            &format!("http://{}/v2/models/digits/infer", server.addr),
            samples.request(0..rows),
        )
        .await
        .json();
    let rest = shoal_oip::decode_response(rest.to_string().as_bytes()).unwrap();
    assert_eq!(outputs, rest.outputs, "gRPC and REST answers");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_carries_its_state_over_grpc() {
    let server = start().await;
    let frames = 4;
    // The reference: the state carried by hand through one model.
    let bytes = std::fs::read(model_path("silero_vad_16k_sequence.onnx")).unwrap();
    let model = LoadedModel::load(
        &TractBackend::default(),
        &bytes,
        &LoadOptions::default().with_state(&vad_state()),
    )
    .unwrap();
    let step = |k: usize| {
        Tensor::new(
            "input",
            vec![1, shoal_testkit::VAD_FRAME],
            TensorData::Fp32(shoal_testkit::vad_frame(k)),
        )
        .unwrap()
    };
    let expected: Vec<Vec<Tensor>> = model
        .run_sequence((0..frames).map(|k| vec![step(k)]))
        .unwrap();

    let mut client = client(&server).await;
    // Step `k` of sequence 7 with these flags, as raw bytes or typed contents.
    let request = |k: usize, start: Option<bool>, end: Option<bool>, raw: bool| {
        let p = |c| InferParameter {
            parameter_choice: Some(c),
        };
        let mut parameters = std::collections::HashMap::new();
        parameters.insert("sequence_id".to_owned(), p(ParameterChoice::Int64Param(7)));
        for (name, flag) in [("sequence_start", start), ("sequence_end", end)] {
            if let Some(flag) = flag {
                parameters.insert(name.to_owned(), p(ParameterChoice::BoolParam(flag)));
            }
        }
        let (name, shape, data) = step(k).into_parts();
        let TensorData::Fp32(data) = data else {
            unreachable!()
        };
        let (contents, raw_input_contents) = if raw {
            (
                None,
                vec![data.iter().flat_map(|x| x.to_le_bytes()).collect()],
            )
        } else {
            let contents = InferTensorContents {
                fp32_contents: data,
                ..Default::default()
            };
            (Some(contents), Vec::new())
        };
        ModelInferRequest {
            model_name: "vad".into(),
            parameters,
            inputs: vec![InferInputTensor {
                name,
                datatype: "FP32".into(),
                shape: shape.iter().map(|&d| d as i64).collect(),
                parameters: Default::default(),
                contents,
            }],
            raw_input_contents,
            ..Default::default()
        }
    };
    for (k, expected) in expected.iter().enumerate() {
        let step = request(k, Some(k == 0), Some(k + 1 == frames), true);
        let answer = client.model_infer(step).await.unwrap().into_inner();
        let outputs = shoal_grpc::codec::decode_response(answer).unwrap();
        assert_eq!(&outputs, expected, "step {k}");
    }
    // A later step of a sequence that ended is refused, as over REST.
    let request = request(0, None, None, false);
    let status = client.model_infer(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("sequence"), "{status:?}");
    server.stop().await.unwrap();
}
