//! Admission before decode: when the inference pool's threads and queue
//! are full, a request is refused with 503 and `Retry-After` before its
//! body is read or parsed — a malformed body then gets 503, not 400 — and
//! once the pool drains the same body gets the 400 that says what is
//! wrong.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use http::{Method, StatusCode};
use serde_json::json;
use shoal_core::{ModelName, Version};
use shoal_replica::loader::{ArtifactSource, LoadSpec};
use shoal_replica::store::InstallPolicy;
use shoal_replica::{Replica, ReplicaConfig};
use shoal_runtime::LoadOptions;
use shoal_runtime::tract::TractBackend;
use shoal_testkit::{call_router, eventually, model_path};

async fn post(app: &Router, body: String) -> (StatusCode, http::HeaderMap, String) {
    let json = [("content-type", "application/json")];
    let reply = call_router(app, Method::POST, "/v2/models/slow/infer", &json, body).await;
    (reply.status, reply.headers.clone(), reply.text())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overload_is_refused_before_the_body_is_parsed() {
    let config = ReplicaConfig {
        threads: Some(1),
        max_queue: Some(1),
        ..ReplicaConfig::default()
    };
    let replica = Arc::new(Replica::new(
        "r-admission".into(),
        Arc::new(TractBackend::default()),
        &config,
    ));
    replica
        .load(
            LoadSpec {
                model: ModelName::new("slow").unwrap(),
                version: Version::new("1").unwrap(),
                source: ArtifactSource::Path(model_path("digits-slow.onnx")),
                sha256: None,
                options: LoadOptions::default(),
            },
            InstallPolicy::default(),
        )
        .await
        .unwrap();
    let app = shoal_replica::http::router(replica.clone());
    // 128 rows of the slow model: about a second each.
    let heavy = json!({
        "inputs": [{"name": "input", "shape": [128, 64], "datatype": "FP32", "data": vec![0.5f32; 128 * 64]}],
    })
    .to_string();
    let running = {
        let (app, body) = (app.clone(), heavy.clone());
        tokio::spawn(async move { post(&app, body).await })
    };
    let pool = replica.pool().clone();
    eventually("one inference running", Duration::from_secs(30), || {
        let stats = pool.stats();
        async move { (stats.running == 1).then_some(()) }
    })
    .await;
    let waiting = {
        let (app, body) = (app.clone(), heavy.clone());
        tokio::spawn(async move { post(&app, body).await })
    };
    eventually("one inference queued", Duration::from_secs(30), || {
        let stats = pool.stats();
        async move { (stats.queued == 1).then_some(()) }
    })
    .await;

    // Full: refused unread, whatever the body.
    let (status, headers, body) = post(&app, "this is not JSON".into()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(headers["retry-after"], "1");
    assert!(body.contains("overloaded"), "{body}");

    // The two admitted before it are answered.
    for task in [running, waiting] {
        let (status, _, body) = task.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // Room again: the body is read, and what is wrong with it is said.
    let (status, _, body) = post(&app, "this is not JSON".into()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let metrics = replica.encode_metrics();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("model_predictions_total")
                && l.contains("overloaded")
                && l.ends_with(" 1")),
        "{metrics}"
    );
}

/// The same over gRPC: the model's name is read from the message's bytes,
/// the request admitted or refused (`Unavailable`, `retry-after`), and
/// only then is the message decoded and checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_overload_is_refused_before_the_message_is_decoded() {
    use shoal_grpc::pb::ModelInferRequest;
    use shoal_grpc::pb::grpc_inference_service_client::GrpcInferenceServiceClient;
    use shoal_grpc::pb::model_infer_request::InferInputTensor;

    let config = ReplicaConfig {
        grpc_addr: Some(([127, 0, 0, 1], 0).into()),
        threads: Some(1),
        max_queue: Some(1),
        models: vec![shoal_replica::ModelSpec {
            name: "slow".parse().unwrap(),
            version: "1".parse().unwrap(),
            path: model_path("digits-slow.onnx"),
        }],
        ..ReplicaConfig::default()
    };
    let server = shoal_replica::ReplicaServer::start(config, Arc::new(TractBackend::default()))
        .await
        .unwrap();
    server.replica.wait_ready().await;
    let addr = server.grpc_addr.expect("a gRPC address");
    let client = GrpcInferenceServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let request = |rows: i64, datatype: &str| ModelInferRequest {
        model_name: "slow".into(),
        inputs: vec![InferInputTensor {
            name: "input".into(),
            datatype: datatype.into(),
            shape: vec![rows, 64],
            ..Default::default()
        }],
        raw_input_contents: vec![vec![0; usize::try_from(rows).unwrap() * 64 * 4]],
        ..Default::default()
    };
    // 128 rows of the slow model: about a second each.
    let heavy = || {
        let mut client = client.clone();
        let request = request(128, "FP32");
        tokio::spawn(async move { client.model_infer(request).await })
    };
    let running = heavy();
    let pool = server.replica.pool().clone();
    eventually("one inference running", Duration::from_secs(30), || {
        let stats = pool.stats();
        async move { (stats.running == 1).then_some(()) }
    })
    .await;
    let waiting = heavy();
    eventually("one inference queued", Duration::from_secs(30), || {
        let stats = pool.stats();
        async move { (stats.queued == 1).then_some(()) }
    })
    .await;

    // A message whose model is readable but which does not decode: an
    // `id` (field 3) that is not UTF-8, which reading the model skips.
    let undecodable = || {
        let mut message = prost::Message::encode_to_vec(&request(1, "FP32"));
        message.extend_from_slice(&[0x1a, 0x02, 0xff, 0xfe]);
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        shoal_grpc::admit::model_infer_raw(channel, tonic::Request::new(message.into()))
    };
    // Full: refused undecoded, whatever the message holds.
    for refused in [
        client
            .clone()
            .model_infer(request(1, "NOT_A_TYPE"))
            .await
            .unwrap_err(),
        undecodable().await.unwrap_err(),
    ] {
        assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
        assert_eq!(refused.metadata().get("retry-after").unwrap(), "1");
        assert!(refused.message().contains("overloaded"), "{refused:?}");
    }

    for task in [running, waiting] {
        let answer = task.await.unwrap().unwrap().into_inner();
        assert_eq!(answer.outputs[0].shape, [128, 10]);
    }
    // Room again: decoded, and what is wrong is said.
    let refused = client
        .clone()
        .model_infer(request(1, "NOT_A_TYPE"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("NOT_A_TYPE"), "{refused:?}");
    let refused = undecodable().await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("UTF-8"), "{refused:?}");
    // An unknown model is named without decoding the tensors either.
    let mut unknown = request(1, "NOT_A_TYPE");
    unknown.model_name = "nope".into();
    let refused = client.clone().model_infer(unknown).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");
    server.stop().await.unwrap();
}
