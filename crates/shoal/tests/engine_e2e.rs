//! The engine a version asks for, end to end: a version pushed with
//! `--engine ort` is prepared by ONNX Runtime on the control plane, served
//! by it on every replica (the model's platform says so) with tract's
//! answers, and `model show` records it; on a machine without ONNX
//! Runtime, `ort` fails the load with a message saying how to install it
//! and `auto` serves with tract. `shoal deploy --engine/--max-batch`
//! changes a served version's options, and replicas swap in the version
//! loaded again with them without failing a request.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use shoal_core::{Engine, Tensor, TensorData};
use shoal_runtime::tract::TractBackend;
use shoal_runtime::{LoadOptions, LoadedModel};
use shoal_testkit::{
    ChildGuard, HttpClient, Samples, TempDir, eventually, model_bytes, model_path,
    spawn_command_until,
};

mod common;
use common::{Traffic, cli, cli_fails, converged_on, shoal, shoal_up};

/// The labels tract gives the first `rows` digits samples.
fn tract_labels(file: &str, rows: usize) -> Vec<i64> {
    let model = LoadedModel::load(
        &TractBackend::default(),
        &model_bytes(file),
        &LoadOptions::default(),
    )
    .unwrap();
    let samples = Samples::load();
    let data: Vec<f32> = samples.inputs[..rows].iter().flatten().copied().collect();
    let input = Tensor::new("input", vec![rows, 64], TensorData::Fp32(data)).unwrap();
    let outputs = model.infer_blocking(vec![input]).unwrap();
    match outputs.iter().find(|t| t.name == "label").unwrap().data() {
        TensorData::Int64(v) => v.clone(),
        other => panic!("label is {:?}", other.datatype()),
    }
}

fn labels_of(answer: &Value) -> Vec<i64> {
    let label = answer["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "label")
        .unwrap_or_else(|| panic!("{answer}"));
    serde_json::from_value(label["data"].clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_pushed_for_onnx_runtime_is_served_by_it() {
    let tmp = TempDir::new("engine-e2e");
    let (_up, gateway, control) = shoal_up(&tmp.join("up"), &["--replicas", "2"]);
    let v2 = model_path("digits-v2.onnx");
    let v2 = v2.to_str().unwrap();

    let e = cli_fails(
        &control,
        &["model", "push", "digits", v2, "--engine", "onnx"],
    );
    assert!(e.contains("use tract, ort or auto"), "{e}");

    let pushed = cli(
        &control,
        &["model", "push", "digits", v2, "--engine", "ort"],
    );
    assert_eq!(
        (pushed["version"].as_str(), pushed["engine"].as_str()),
        (Some("2"), Some("ort")),
        "{pushed}"
    );
    cli(&control, &["deploy", "digits:2"]);
    converged_on(&control, "digits:2", 2).await;

    let http = HttpClient::new();
    let status = cli(&control, &["status"]);
    for r in status["replicas"].as_array().unwrap() {
        let address = r["address"].as_str().unwrap();
        let reply = http
            .get(&format!("http://{address}/v2/models/digits/versions/2"))
            .await;
        let meta: Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(meta["platform"], "onnxruntime_onnx", "{address}: {meta}");
    }
    let expected = tract_labels("digits-v2.onnx", 32);
    let samples = Samples::load();
    for _ in 0..4 {
        let reply = http
            .post_json(
                &format!("{gateway}/v2/models/digits/infer"),
                samples.request(0..32),
            )
            .await;
        assert!(reply.status.is_success(), "{reply:?}");
        let answer: Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(
            labels_of(&answer),
            expected,
            "ONNX Runtime agrees with tract"
        );
    }
    let shown = cli(&control, &["model", "show", "digits:2"]);
    assert_eq!(shown["engine"], "ort", "{shown}");
}

/// The platform each replica serves `digits:1` on.
async fn platforms(http: &HttpClient, control: &str) -> Vec<String> {
    let status = cli(control, &["status"]);
    let mut out = Vec::new();
    for r in status["replicas"].as_array().unwrap() {
        let address = r["address"].as_str().unwrap();
        let reply = http
            .get(&format!("http://{address}/v2/models/digits/versions/1"))
            .await;
        let meta: Value = serde_json::from_slice(&reply.body).unwrap_or_default();
        out.push(meta["platform"].as_str().unwrap_or("none").to_owned());
    }
    out
}

/// Batches the replicas ran of `digits:1`.
async fn batches(http: &HttpClient, control: &str) -> f64 {
    let status = cli(control, &["status"]);
    let mut batches = 0.0;
    for r in status["replicas"].as_array().unwrap() {
        let url = format!("http://{}/metrics", r["address"].as_str().unwrap());
        let metrics = String::from_utf8_lossy(&http.get(&url).await.body).into_owned();
        batches += shoal_testkit::metric_sum(
            &metrics,
            "model_batch_rows_count",
            &[("model", "digits"), ("model_version", "1")],
        );
    }
    batches
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_changes_a_served_versions_engine_and_batching_without_failing_a_request() {
    let tmp = TempDir::new("engine-deploy");
    let (_up, gateway, control) = shoal_up(&tmp.join("up"), &["--replicas", "2"]);
    let http = HttpClient::new();
    converged_on(&control, "digits:1", 2).await;
    assert_eq!(
        platforms(&http, &control).await,
        ["tract_onnx", "tract_onnx"]
    );

    // Bad options: refused, nothing changes.
    for (flags, says) in [
        (&["--engine", "onnx"][..], "use tract, ort or auto"),
        (&["--max-batch", "0"][..], "max batch 0"),
        (
            &["--max-batch", "8", "--no-batching"][..],
            "cannot be used with",
        ),
    ] {
        let args = [&["deploy", "digits:1"][..], flags].concat();
        let e = cli_fails(&control, &args);
        assert!(e.contains(says), "{flags:?}: {e}");
    }
    let e = cli_fails(&control, &["deploy", "digits:9", "--engine", "ort"]);
    assert!(e.contains("no version digits:9"), "{e}");
    let shown = cli(&control, &["model", "show", "digits:1"]);
    assert_eq!(
        (shown["engine"].as_str(), &shown["batching"]),
        (Some("tract"), &Value::Null)
    );

    let traffic = Traffic::start(&gateway, 8);
    // ONNX Runtime, batched: every replica loads digits:1 again and swaps.
    cli(
        &control,
        &[
            "deploy",
            "digits:1",
            "--engine",
            "ort",
            "--max-batch",
            "16",
            "--batch-delay",
            "1ms",
        ],
    );
    let shown = cli(&control, &["model", "show", "digits:1"]);
    assert_eq!(shown["engine"], "ort", "{shown}");
    assert_eq!(shown["batching"]["max_batch"], 16, "{shown}");
    eventually(
        "both replicas on ONNX Runtime",
        Duration::from_secs(60),
        || {
            let (http, control) = (http.clone(), control.clone());
            async move {
                let p = platforms(&http, &control).await;
                p.iter().all(|p| p == "onnxruntime_onnx").then_some(())
            }
        },
    )
    .await;
    // Back to tract, keeping the batching: the replicas batch on tract.
    cli(&control, &["deploy", "digits:1", "--engine", "tract"]);
    eventually(
        "both replicas back on tract",
        Duration::from_secs(60),
        || {
            let (http, control) = (http.clone(), control.clone());
            async move {
                let p = platforms(&http, &control).await;
                p.iter().all(|p| p == "tract_onnx").then_some(())
            }
        },
    )
    .await;
    eventually("batches on tract", Duration::from_secs(60), || {
        let (http, control) = (http.clone(), control.clone());
        async move { (batches(&http, &control).await > 0.0).then_some(()) }
    })
    .await;
    let shown = cli(&control, &["deploy", "digits:1", "--no-batching"]);
    assert_eq!(shown["model"], "digits", "{shown}");
    let shown = cli(&control, &["model", "show", "digits:1"]);
    assert_eq!(
        (shown["engine"].as_str(), &shown["batching"]),
        (Some("tract"), &Value::Null)
    );
    converged_on(&control, "digits:1", 2).await;
    let (versions, failures) = traffic.finish().await;
    assert!(
        failures.is_empty(),
        "requests failed across the swaps: {failures:?}"
    );
    assert!(versions.iter().all(|v| v == "1"), "{versions:?}");
}

/// `shoal replica --model digits=… --engine ENGINE` on a machine where
/// ONNX Runtime cannot be found (a home without the Python package, no
/// ORT_DYLIB_PATH).
fn replica_without_onnx_runtime(home: &Path, engine: Engine) -> (ChildGuard, String) {
    let mut command = std::process::Command::new(shoal());
    command
        .args(["replica", "--addr", "127.0.0.1:0", "--data-dir"])
        .arg(home.join(format!("replica-{engine}")))
        .arg("--model")
        .arg(format!(
            "digits={}",
            model_path("digits-v1.onnx").to_str().unwrap()
        ))
        .args(["--engine", engine.as_str()])
        .env("HOME", home)
        .env_remove("ORT_DYLIB_PATH")
        .env_remove("VIRTUAL_ENV");
    let (child, line) = spawn_command_until(command, "listening on http://");
    let addr = line.rsplit("http://").next().unwrap().trim().to_owned();
    (child, format!("http://{addr}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_onnx_runtime_ort_says_how_to_install_it_and_auto_uses_tract() {
    assert!(
        !Path::new("/usr/lib/python3/dist-packages/onnxruntime").exists()
            && !Path::new("/usr/local/lib/python3.11/dist-packages/onnxruntime").exists(),
        "this test needs ONNX Runtime installed for the user only (scripts/setup-python)"
    );
    let home = TempDir::new("engine-no-ort");
    let http = HttpClient::new();

    let (_ort, url) = replica_without_onnx_runtime(&home.0, Engine::Ort);
    let failure = eventually("the load to fail", Duration::from_secs(60), || {
        let http = http.clone();
        let url = url.clone();
        async move {
            let reply = http.get(&format!("{url}/ready")).await;
            let ready: Value = serde_json::from_slice(&reply.body).ok()?;
            ready["failures"]["digits:1"].as_str().map(str::to_owned)
        }
    })
    .await;
    assert!(
        failure.contains("ONNX Runtime was not found")
            && failure.contains("pip install --user onnxruntime==")
            && failure.contains("ORT_DYLIB_PATH"),
        "{failure}"
    );

    let (_auto, url) = replica_without_onnx_runtime(&home.0, Engine::Auto);
    eventually("auto to serve with tract", Duration::from_secs(60), || {
        let http = http.clone();
        let url = url.clone();
        async move {
            let reply = http.get(&format!("{url}/ready")).await;
            reply.status.is_success().then_some(())
        }
    })
    .await;
    let reply = http
        .get(&format!("{url}/v2/models/digits/versions/1"))
        .await;
    let meta: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(meta["platform"], "tract_onnx", "{meta}");
    let reply = http
        .post_json(
            &format!("{url}/v2/models/digits/infer"),
            Samples::load().request(0..8),
        )
        .await;
    let answer: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(labels_of(&answer), tract_labels("digits-v1.onnx", 8));
}
