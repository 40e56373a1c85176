//! gRPC end to end, as real processes: `shoal replica --grpc-addr` and
//! `shoal gateway --grpc-addr` serve `tritonclient.grpc` unchanged (answers
//! equal to REST's through the same process), and the gateway routes gRPC
//! with REST's policies: when a replica dies, requests retry on the other
//! and none fails.

use std::time::Duration;

use shoal_grpc::pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use shoal_grpc::pb::model_infer_request::InferInputTensor;
use shoal_grpc::pb::{InferTensorContents, ModelInferRequest};
use shoal_testkit::{ChildGuard, Samples, TempDir, eventually, model_path, spawn_command_collect};

mod common;
use common::shoal;

/// Starts `shoal ROLE --addr 127.0.0.1:0 --grpc-addr 127.0.0.1:0 ARGS`:
/// the child, its REST address and its gRPC address.
fn start(role: &str, dir: &std::path::Path, args: &[&str]) -> (ChildGuard, String, String) {
    let mut command = std::process::Command::new(shoal());
    command
        .args([role, "--addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir)
        .args(args);
    let (child, lines) = spawn_command_collect(command, "listening on http://");
    let after = |marker: &str| {
        lines
            .iter()
            .find_map(|l| l.split_once(marker).map(|(_, a)| a.trim().to_owned()))
            .unwrap_or_else(|| panic!("no {marker:?} line in {lines:?}"))
    };
    let rest = after("listening on http://");
    let grpc = after("gRPC listening on ");
    (child, rest, grpc)
}

/// The accuracy `model` (`digits-v1`, `digits-v2`) must reach on the
/// held-out samples, less one sample's worth.
fn min_accuracy_of(model: &str) -> f64 {
    let samples = Samples::load();
    #[allow(clippy::cast_precision_loss)]
    let slack = 1.0 / samples.labels.len() as f64;
    samples.accuracy[model] - slack - 1e-9
}

fn min_accuracy() -> f64 {
    min_accuracy_of("digits-v2")
}

fn one_row(k: usize) -> ModelInferRequest {
    let samples = Samples::load();
    ModelInferRequest {
        model_name: "digits".into(),
        inputs: vec![InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![1, 64],
            parameters: Default::default(),
            contents: Some(InferTensorContents {
                fp32_contents: samples.inputs[k % samples.inputs.len()].clone(),
                ..Default::default()
            }),
        }],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_grpc_through_a_replica_and_a_gateway_and_a_replica_lost() {
    let tmp = TempDir::new("grpc-e2e");
    let model = format!("digits={}@2", model_path("digits-v2.onnx").display());
    let (a, a_rest, a_grpc) = start("replica", &tmp.join("a"), &["--model", &model, "--id", "a"]);
    let (b, b_rest, _) = start("replica", &tmp.join("b"), &["--model", &model, "--id", "b"]);
    for rest in [&a_rest, &b_rest] {
        let url = format!("http://{rest}/ready");
        eventually("the replica to be ready", Duration::from_secs(60), || {
            let url = url.clone();
            async move {
                let reply = shoal_testkit::HttpClient::new().get(&url).await;
                reply.status.is_success().then_some(())
            }
        })
        .await;
    }
    // A replica, directly.
    let summary =
        shoal_testkit::tritonclient_grpc_check(&a_grpc, &a_rest, "digits", min_accuracy()).await;
    assert_eq!(summary["platform"], "tract_onnx", "{summary}");

    let (_gateway, g_rest, g_grpc) = start(
        "gateway",
        &tmp.join("gateway"),
        &[
            "--replica",
            &a_rest,
            "--replica",
            &b_rest,
            "--health-interval-ms",
            "200",
        ],
    );
    eventually(
        "the gateway to see both replicas",
        Duration::from_secs(60),
        || {
            let url = format!("http://{g_rest}/ready");
            async move {
                let reply = shoal_testkit::HttpClient::new().get(&url).await;
                let body = reply.json();
                (body["ready"] == true && body["endpoints"] == 2).then_some(())
            }
        },
    )
    .await;
    // Through the gateway, as a client of Triton would.
    shoal_testkit::tritonclient_grpc_check(&g_grpc, &g_rest, "digits", min_accuracy()).await;

    // Requests name who answered; when that replica dies, none fails.
    let mut client = GrpcInferenceServiceClient::connect(format!("http://{g_grpc}"))
        .await
        .unwrap();
    let response = client.model_infer(one_row(0)).await.unwrap();
    let first = response.metadata().get("x-shoal-replica").unwrap();
    let first = first.to_str().unwrap().to_owned();
    let (dead, survivor) = if first == a_rest || first == "a" {
        (a, (b_rest.clone(), "b"))
    } else {
        (b, (a_rest.clone(), "a"))
    };
    drop(dead);
    for k in 0..60 {
        let response = client
            .model_infer(one_row(k))
            .await
            .unwrap_or_else(|s| panic!("request {k} after replica {first} died: {s:?}"));
        let by = response.metadata().get("x-shoal-replica").unwrap();
        let by = by.to_str().unwrap();
        assert!(
            by == survivor.0 || by == survivor.1,
            "{by} answered after it died"
        );
        assert_eq!(response.into_inner().model_version, "2");
    }

    // An unknown model is NOT_FOUND through the gateway too, saying so.
    let mut unknown = one_row(0);
    unknown.model_name = "nope".into();
    let status = client.model_infer(unknown).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");

    // A gateway with API keys checks the caller before decoding the
    // message: without a key even an undecodable one is UNAUTHENTICATED.
    let (_guarded, guarded_rest, guarded_grpc) = start(
        "gateway",
        &tmp.join("guarded"),
        &["--replica", &survivor.0, "--api-key", "team-a:s3cret"],
    );
    eventually(
        "the guarded gateway to be ready",
        Duration::from_secs(60),
        || {
            let url = format!("http://{guarded_rest}/ready");
            async move {
                let reply = shoal_testkit::HttpClient::new().get(&url).await;
                (reply.json()["ready"] == true).then_some(())
            }
        },
    )
    .await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{guarded_grpc}"))
        .unwrap()
        .connect_lazy();
    let send = |message: Vec<u8>, key: Option<&str>| {
        let mut request = tonic::Request::new(message.into());
        if let Some(key) = key {
            request
                .metadata_mut()
                .insert("x-api-key", key.parse().unwrap());
        }
        shoal_grpc::admit::model_infer_raw(channel.clone(), request)
    };
    // The model is readable; an `id` (field 3) that is not UTF-8 is not.
    let mut undecodable = prost::Message::encode_to_vec(&one_row(0));
    undecodable.extend_from_slice(&[0x1a, 0x02, 0xff, 0xfe]);
    let status = send(undecodable.clone(), None).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("API key"), "{status:?}");
    let status = send(undecodable, Some("s3cret")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("UTF-8"), "{status:?}");
    let good = prost::Message::encode_to_vec(&one_row(1));
    let answer = send(good, Some("s3cret")).await.unwrap().into_inner();
    assert_eq!(answer.model_version, "2");
}

/// `shoal up --grpc-addr`: the fleet's gateway serves gRPC at the address
/// `shoal up` prints and writes to `fleet.json`, and `tritonclient.grpc`
/// gets the same answers there as over REST.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shoal_up_serves_grpc_through_its_gateway() {
    let tmp = TempDir::new("grpc-up");
    let data = tmp.join("fleet");
    let (_up, gateway, _control, lines) =
        common::shoal_up_printing(&data, &["--grpc-addr", "127.0.0.1:0", "--replicas", "2"]);
    let printed = lines
        .iter()
        .find_map(|l| l.trim_start().strip_prefix("gateway gRPC"))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("shoal up printed no gRPC address: {lines:?}"))
        .to_owned();
    let fleet: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("fleet.json")).unwrap()).unwrap();
    assert_eq!(fleet["grpc"][0][1], printed.as_str(), "{fleet}");
    assert_ne!(
        printed, "127.0.0.1:0",
        "the bound address, not the asked one"
    );
    let rest = gateway.trim_start_matches("http://");
    // shoal up serves its bundled model, digits v1.
    let accuracy = min_accuracy_of("digits-v1");
    shoal_testkit::tritonclient_grpc_check(&printed, rest, "digits", accuracy).await;
}
