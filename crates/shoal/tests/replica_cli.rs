//! The real `shoal replica` binary: starts on port 0, serves the bundled
//! model, stops cleanly on SIGTERM, and refuses bad command lines clearly.

use std::time::Duration;

use nix::sys::signal::Signal;
use shoal_testkit::{HttpClient, Samples, model_path, spawn_server};

mod common;
use common::shoal;

async fn wait_ready(http: &HttpClient, base: &str) {
    // A separate process: the only way to learn it is ready is to ask.
    let mut backoff = Duration::from_millis(5);
    for _ in 0..200 {
        if http.get(&format!("{base}/ready")).await.status == 200 {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(100));
    }
    panic!("replica at {base} never became ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_replica_serves_and_stops_on_sigterm() {
    let data = std::env::temp_dir().join(format!("shoal-cli-test-{}", std::process::id()));
    let v1 = format!("digits={}", model_path("digits-v1.onnx").display());
    let ocr = format!(
        "ocr={}@3",
        model_path("ch_ppocr_mobile_v2.0_cls_infer.onnx").display()
    );
    let (mut child, addr) = spawn_server(
        shoal(),
        &[
            "replica",
            "--addr",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
            "--model",
            &v1,
            "--model",
            &ocr,
            "--input-shape",
            "ocr:x=-1,3,48,192",
        ],
    );
    let base = format!("http://{addr}");
    let http = HttpClient::new();
    wait_ready(&http, &base).await;

    let samples = Samples::load();
    let r = http
        .post_json(
            &format!("{base}/v2/models/digits/infer"),
            samples.request(0..5),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let labels: Vec<i64> = r.json()["outputs"][1]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(labels.len(), 5);
    let meta = http
        .get(&format!("{base}/v2/models/ocr/versions/3"))
        .await
        .json();
    assert_eq!(
        meta["inputs"][0]["shape"],
        serde_json::json!([-1, 3, 48, 192])
    );

    child.signal(Signal::SIGTERM);
    let status = tokio::task::spawn_blocking(move || child.wait_timeout(Duration::from_secs(10)))
        .await
        .unwrap()
        .expect("replica exits after SIGTERM");
    assert!(status.success(), "{status}");
    let _ = std::fs::remove_dir_all(&data);
}

#[test]
fn bad_command_lines_say_what_is_wrong() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(shoal())
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["replica", "--addr", "127.0.0.1:0"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("nothing to serve: give --control URL"),
        "{err}"
    );
    let (code, err) = run(&[
        "replica",
        "--addr",
        "127.0.0.1:0",
        "--model",
        "digits=/nonexistent.onnx",
    ]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("model file /nonexistent.onnx (for --model digits) does not exist"),
        "{err}"
    );
    let (code, err) = run(&["replica", "--model", "digits"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("expected NAME=PATH[@VERSION]"), "{err}");
    let v1 = format!("digits={}", model_path("digits-v1.onnx").display());
    let (code, err) = run(&[
        "replica",
        "--addr",
        "127.0.0.1:0",
        "--model",
        &v1,
        "--input-shape",
        "input=1,x",
    ]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("--input-shape input=1,x: expected D,D,… (-1 for dynamic)"),
        "{err}"
    );
    // With two models, a shape must say which one it is for.
    let ocr = format!(
        "ocr={}",
        model_path("ch_ppocr_mobile_v2.0_cls_infer.onnx").display()
    );
    let (code, err) = run(&[
        "replica",
        "--addr",
        "127.0.0.1:0",
        "--model",
        &v1,
        "--model",
        &ocr,
        "--input-shape",
        "x=-1,3,48,192",
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("say which model it is for"), "{err}");
}
